//! The Raft log on disk: segment files of checksummed records and the vote.
//!
//! `append` writes the records, fdatasyncs each touched segment once, and only then calls
//! `log_io_completed` and advances [`FlushState`]. Reporting a flush before fdatasync would
//! make fsync acknowledgements lie, so there is no other path to `log_io_completed(Ok)`.
//! The sync runs inline: openraft 0.9 awaits the flush of each append before doing
//! anything else, so a separate flusher thread only added a thread hop to every fsync
//! (measured: see docs/BENCHMARKS.md). A large record's page-aligned middle is written with
//! O_DIRECT (`direct_write.rs`), the rest through the page cache; the fdatasync covers both.
//! A failed fdatasync is sticky: the page cache's state is unknown after it (the
//! "fsyncgate" lesson), so every later append fails too; openraft stops on it and the
//! daemon exits for its service manager to restart it (daemon.rs).
//! The exception is a full disk (ENOSPC, EDQUOT, see `diskfull.rs`), at any step of an
//! append (record write, pre-zeroing, rotation, fdatasync) or of a vote save: the batch's
//! in-memory bookkeeping is rolled back, segments it created are deleted, and the whole
//! batch is written again from its encoded records every `disk_full_retry_ms`, for at most
//! `disk_full_wait_ms`. Nothing is reported flushed until an fdatasync after a complete
//! rewrite succeeds.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::ops::{Bound, RangeBounds};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{AnyError, EntryPayload, LogId, RaftLogReader, StorageError, StorageIOError, Vote};
use rkyv::util::AlignedVec;
use tokio::sync::watch;

use super::direct_write::DirectWrites;
use super::early::{EarlyAppend, Record};
use super::received::Received;
use super::record::{self, HEADER_BYTES};
use super::{Entry, TypeConfig};
use crate::diskfull::{self, DiskFullPolicy};
use crate::sync::{fdatasync, fsync_dir, write_file_durably};

type StorageResult<T> = Result<T, StorageError<u64>>;

/// What `append` has made durable (fdatasync'd before it reports). fsync waiters watch this.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlushState {
    /// Highest batch seq of this daemon run (`origin`) that is durable in the log.
    pub flushed_seq: u64,
    /// Highest log index that is durable.
    pub flushed_index: u64,
    /// Highest batch seq of this run handed to the log (written or being written, not
    /// necessarily durable), and the last log index of that append: what an fsync counts
    /// its acknowledgements against while the leader's own flush runs. Updated without
    /// waking anyone (`Replicated::durable_within_term` waits for the answers instead).
    pub appended_seq: u64,
    pub appended_index: u64,
    /// An fdatasync failed; nothing will be reported flushed again.
    pub failed: bool,
}

/// Options the log store is created with.
#[derive(Debug, Clone)]
pub struct LogOptions {
    pub dir: PathBuf,
    pub segment_bytes_max: u64,
    /// This daemon run's batch origin: appends of its batches advance `flushed_seq`.
    pub origin: u64,
    /// Test hook: while this file exists, fdatasync of the log reports EIO (ENOSPC if
    /// the file starts with `ENOSPC`), after `delay-ms=N` milliseconds if it says so.
    pub fault_sync_file: Option<PathBuf>,
    /// How a full disk is waited out.
    pub disk: DiskFullPolicy,
    /// Bytes (in record form) of entries kept decoded in memory at most (`log_cache_bytes`).
    pub cache_bytes_max: u64,
    /// Records of at least this many bytes are written with O_DIRECT where the file
    /// system allows (`direct_write_bytes_min`); 0 never.
    pub direct_bytes_min: u64,
    /// Early replication (a cluster member): offered each append before it is written.
    pub early: Option<Arc<EarlyAppend>>,
    /// Records received from the leader (a cluster member), written as they are.
    pub received: Option<Arc<Received>>,
    /// A cluster member's id: a committed vote naming it (it led when it stopped) is read
    /// back uncommitted, so it leads again only in a new term won by election. Its
    /// followers may hold entries it sent early and never made durable itself (a crash, or
    /// a failed fdatasync rolled back); leading its old term again would give other
    /// contents the same log ids, which followers take as matching.
    pub own_vote_uncommitted: Option<u64>,
}

struct Segment {
    path: PathBuf,
    file: Arc<File>,
    /// The active segment's handle for direct writes, if the log makes them.
    direct: Option<Arc<File>>,
}

#[derive(Clone, Copy)]
struct Loc {
    seg_first: u64,
    offset: u64,
}

struct Inner {
    dir: PathBuf,
    segment_bytes_max: u64,
    origin: u64,
    /// Keyed by the index of the first record the segment was created for.
    segments: BTreeMap<u64, Segment>,
    active_len: u64,
    /// The active segment holds zeros (written and synced) up to here; appends inside
    /// this window change no file size, so their fdatasync writes data only.
    zeroed_len: u64,
    locs: BTreeMap<u64, Loc>,
    last_log_id: Option<LogId<u64>>,
    purged: Option<LogId<u64>>,
    vote: Option<Vote<u64>>,
    /// Direct writes of large records (`None`: all through the page cache).
    direct: Option<DirectWrites>,
    /// The newest appended entries, decoded, for openraft's reads after an append (the
    /// apply on every member, and each follower's replication stream on the leader): they
    /// skip the read, checksum and decode of the record. Holds only entries that are in
    /// `locs` (truncate, purge and rollback drop theirs).
    recent: Recent,
}

/// A byte-bounded window of the newest entries that some reader has still to read.
///
/// Each reader (the store itself, whose reads are openraft's apply, and each reader
/// openraft takes for a replication stream) has a mark: the end of the furthest range it
/// read. Entries below every live reader's mark are dropped at the next read, so a
/// follower or a single node keeps only what it has not applied, and a leader also what a stream has not
/// sent yet: under a sustained write openraft's streams trail the log by up to the
/// overlay's window, and reading those entries back from disk was the leader's largest
/// cost (TUNING.md). A reader that stops reading (a stream to a member that is down) holds
/// entries only up to `bytes_max`, oldest evicted first. Everything here is a hint: an
/// entry not found is read from its segment.
struct Recent {
    entries: BTreeMap<u64, (Arc<Entry>, u64)>,
    bytes: u64,
    bytes_max: u64,
    /// The marks of the live readers; a reader's mark dies with its last clone.
    readers: Vec<Weak<AtomicU64>>,
}

impl Recent {
    fn insert(&mut self, entry: Entry, record_bytes: u64) {
        let index = entry.log_id.index;
        if let Some((_, old)) = self.entries.remove(&index) {
            self.bytes -= old;
        }
        if record_bytes > self.bytes_max {
            return;
        }
        self.entries.insert(index, (Arc::new(entry), record_bytes));
        self.bytes += record_bytes;
        while self.bytes > self.bytes_max {
            let (_, (_, b)) = self.entries.pop_first().expect("bytes > 0 means entries");
            self.bytes -= b;
        }
    }

    /// Drop the entries at `from` and after (truncated, or an append rolled back): the
    /// entries appended there next are new to every reader, whatever it read before.
    fn forget_from(&mut self, from: u64) {
        for (_, (_, b)) in self.entries.split_off(&from) {
            self.bytes -= b;
        }
        for mark in self.readers.iter().filter_map(Weak::upgrade) {
            mark.fetch_min(from, Ordering::Relaxed);
        }
    }

    /// A new reader's mark, from which nothing has been read yet.
    fn new_reader(&mut self) -> Arc<AtomicU64> {
        let mark = Arc::new(AtomicU64::new(0));
        self.readers.retain(|r| r.strong_count() > 0);
        self.readers.push(Arc::downgrade(&mark));
        mark
    }

    /// Drop the entries every live reader has read past.
    fn forget_read(&mut self) {
        let floor = self
            .readers
            .iter()
            .filter_map(|r| r.upgrade().map(|m| m.load(Ordering::Relaxed)))
            .min();
        if let Some(floor) = floor.filter(|&f| f > 0) {
            self.forget_upto(floor - 1);
        }
    }

    /// Drop the entries up to `upto`.
    fn forget_upto(&mut self, upto: u64) {
        let keep = self.entries.split_off(&(upto + 1));
        for (_, (_, b)) in std::mem::replace(&mut self.entries, keep) {
            self.bytes -= b;
        }
    }
}

/// One segment file of the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentSpan {
    /// Index of the first record the segment was created for.
    pub first: u64,
    /// Index of its last record (for the last segment, the log's last index).
    pub last: u64,
    /// Its size on disk.
    pub bytes: u64,
}

/// What the log holds now: retention's input, and what `status` and /metrics report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    /// Oldest first.
    pub segments: Vec<SegmentSpan>,
    /// Entries up to here are purged (openraft will not read them again).
    pub purged: Option<u64>,
    /// The oldest entry a lagging member can still be sent.
    pub first_index: u64,
}

impl Layout {
    /// Bytes of the log's segment files.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }
}

/// Durability reporting, shared by the clones of a store.
struct Flush {
    state: watch::Sender<FlushState>,
    fault: Option<PathBuf>,
    failed: AtomicBool,
}

impl Flush {
    /// fdatasync `files`. A failure is sticky, except a full disk: the caller rewrites
    /// the batch and syncs again (see [`LogStore::try_append`]).
    fn sync(&self, files: &[Arc<File>]) -> io::Result<()> {
        if self.failed.load(Ordering::Acquire) {
            return Err(io::Error::other("an earlier log fdatasync failed"));
        }
        let mut result = Ok(());
        for f in files {
            result = match self.fault.as_deref().map(fs::read) {
                // The hook file says which error (by default EIO) and how long the failing
                // fdatasync takes first (`delay-ms=N`, a slow disk; by default none).
                Some(Ok(text)) => {
                    let text = String::from_utf8_lossy(&text);
                    let delay = text
                        .split_whitespace()
                        .find_map(|w| w.strip_prefix("delay-ms=")?.parse().ok());
                    std::thread::sleep(std::time::Duration::from_millis(delay.unwrap_or(0)));
                    Err(io::Error::from_raw_os_error(
                        if text.starts_with("ENOSPC") {
                            libc::ENOSPC
                        } else {
                            libc::EIO
                        },
                    ))
                }
                _ => fdatasync(f),
            };
            if result.is_err() {
                break;
            }
        }
        match &result {
            Err(e) if !diskfull::is_full(e) => self.fail(e),
            _ => {}
        }
        result
    }

    /// Nothing will be reported flushed again.
    fn fail(&self, e: &io::Error) {
        tracing::error!(error = %e, "log fdatasync failed; nothing can be made durable here until a restart");
        self.failed.store(true, Ordering::Release);
        self.state.send_modify(|s| s.failed = true);
    }
}

/// One record of a batch being appended, encoded once and kept until it is durable.
struct Pending {
    log_id: LogId<u64>,
    /// Shared with early replication's senders, which send the same bytes.
    bytes: Arc<Vec<u8>>,
}

/// How one attempt at appending a batch ended badly.
enum AppendFailure {
    /// A record write, pre-zeroing or rotation failed: fatal, as before.
    Write(io::Error),
    /// The fdatasync failed: reported through the flush callback.
    Sync(io::Error),
}

impl AppendFailure {
    fn error(&self) -> &io::Error {
        match self {
            AppendFailure::Write(e) | AppendFailure::Sync(e) => e,
        }
    }
}

/// Where the log ended before a batch: what a failed attempt is rolled back to.
struct Mark {
    active_len: u64,
    zeroed_len: u64,
    last_log_id: Option<LogId<u64>>,
    last_segment: Option<u64>,
}

/// The log store handed to openraft. Cloning shares the same log and the same reader mark;
/// `get_log_reader` makes a reader with a mark of its own (see [`Recent`]).
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Mutex<Inner>>,
    flush: Arc<Flush>,
    disk: DiskFullPolicy,
    early: Option<Arc<EarlyAppend>>,
    received: Option<Arc<Received>>,
    read_mark: Arc<AtomicU64>,
}

/// Records smaller than this are written into pre-zeroed space (see `Inner::prezero`).
const PREZERO_RECORD_BYTES_MAX: u64 = 256 << 10;
/// How far ahead of the log's end zeros are kept.
const PREZERO_WINDOW_BYTES: u64 = 1 << 20;

/// The vote saved in `dir`, as written.
fn read_vote_file(dir: &Path) -> io::Result<Option<Vote<u64>>> {
    match fs::read_to_string(dir.join("vote")) {
        Ok(s) => match parse_numbers(&s).as_deref() {
            Some([t, n, c]) => Ok(Some(if *c == 1 {
                Vote::new_committed(*t, *n)
            } else {
                Vote::new(*t, *n)
            })),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "raft/vote is unreadable",
            )),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether `file` holds only zeros in `from..to`.
fn zeros_from(file: &File, from: u64, to: u64) -> io::Result<bool> {
    let mut buf = vec![0u8; 64 << 10];
    let mut at = from;
    while at < to {
        let n = ((to - at) as usize).min(buf.len());
        file.read_exact_at(&mut buf[..n], at)?;
        if buf[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        at += n as u64;
    }
    Ok(true)
}

fn seg_name(first: u64) -> String {
    format!("{first:020}.seg")
}

fn io_write(e: io::Error) -> StorageError<u64> {
    StorageIOError::write_logs(AnyError::new(&e)).into()
}

fn io_read(e: io::Error) -> StorageError<u64> {
    StorageIOError::read_logs(AnyError::new(&e)).into()
}

fn corrupt(path: &Path, offset: u64, why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "log segment {} is corrupt at byte {offset}: {why}; the log cannot be trusted, \
             restore this node from a replica",
            path.display()
        ),
    )
}

fn encode_log_id(id: &LogId<u64>) -> String {
    format!(
        "{} {} {}",
        id.leader_id.term, id.leader_id.node_id, id.index
    )
}

fn parse_numbers(s: &str) -> Option<Vec<u64>> {
    s.split_whitespace().map(|w| w.parse().ok()).collect()
}

fn decode_log_id(s: &str) -> Option<LogId<u64>> {
    match parse_numbers(s)?.as_slice() {
        [t, n, i] => Some(LogId::new(openraft::CommittedLeaderId::new(*t, *n), *i)),
        _ => None,
    }
}

/// No record body is larger: entries are at most `entry_bytes_max` (≤ 16 MiB) plus framing.
const RECORD_BODY_BYTES_MAX: u64 = 64 << 20;

fn read_record(
    file: &File,
    offset: u64,
) -> io::Result<Option<(record::Header, AlignedVec<16>, [u8; HEADER_BYTES])>> {
    let mut hb = [0u8; HEADER_BYTES];
    match file.read_exact_at(&mut hb, offset) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let Some(h) = record::decode_header(&hb) else {
        return Ok(None);
    };
    // The checksum covers the body, so a damaged length field is only caught after the
    // body is read: bound what it can make us allocate (found by reading, while fuzzing).
    if u64::from(h.body_bytes) > RECORD_BODY_BYTES_MAX
        || offset + (HEADER_BYTES as u64) + u64::from(h.body_bytes) > file.metadata()?.len()
    {
        return Ok(None);
    }
    let mut body = AlignedVec::<16>::with_capacity(h.body_bytes as usize);
    body.resize(h.body_bytes as usize, 0);
    match file.read_exact_at(&mut body, offset + HEADER_BYTES as u64) {
        Ok(()) => Ok(Some((h, body, hb))),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}

impl Inner {
    fn open(opts: &LogOptions) -> io::Result<Inner> {
        fs::create_dir_all(&opts.dir)?;
        let purged = match fs::read_to_string(opts.dir.join("purged")) {
            Ok(s) => Some(decode_log_id(&s).ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, "raft/purged is unreadable")
            })?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let vote = read_vote_file(&opts.dir)?.map(|v| match opts.own_vote_uncommitted {
            Some(me) if v.committed && v.leader_id.node_id == me => Vote::new(v.leader_id.term, me),
            _ => v,
        });
        let mut firsts: Vec<u64> = fs::read_dir(&opts.dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_suffix(".seg")?.parse().ok()
            })
            .collect();
        firsts.sort_unstable();

        let mut inner = Inner {
            dir: opts.dir.clone(),
            segment_bytes_max: opts.segment_bytes_max,
            origin: opts.origin,
            segments: BTreeMap::new(),
            active_len: 0,
            zeroed_len: 0,
            locs: BTreeMap::new(),
            last_log_id: purged,
            purged,
            vote,
            direct: DirectWrites::new(opts.direct_bytes_min),
            recent: Recent {
                entries: BTreeMap::new(),
                bytes: 0,
                bytes_max: opts.cache_bytes_max,
                readers: Vec::new(),
            },
        };
        let n = firsts.len();
        for (i, first) in firsts.into_iter().enumerate() {
            let path = opts.dir.join(seg_name(first));
            let file = OpenOptions::new().read(true).write(true).open(&path)?;
            let len = file.metadata()?.len();
            let mut offset = 0u64;
            while offset < len {
                let Some((h, body, hb)) = read_record(&file, offset)? else {
                    break;
                };
                let Ok(entry) = record::decode_body(&hb, &h, &body) else {
                    break;
                };
                if let Some(last) = inner.last_log_id {
                    if h.index != last.index + 1 && h.index > last.index {
                        return Err(corrupt(&path, offset, "gap in log indexes"));
                    }
                }
                if inner.purged.is_none_or(|p| h.index > p.index) {
                    inner.locs.insert(
                        h.index,
                        Loc {
                            seg_first: first,
                            offset,
                        },
                    );
                    inner.last_log_id = Some(entry.log_id);
                }
                offset += h.record_bytes();
            }
            if offset < len {
                if i + 1 == n {
                    // The end of the log: what follows is pre-zeroed space, or an append
                    // that was never reported flushed (torn, or pages persisted out of
                    // order). Cut it, so stale bytes can never read as a continuation.
                    if zeros_from(&file, offset, len)? {
                        tracing::info!(segment = %path.display(), offset, bytes = len - offset, "log ends here; cutting the pre-zeroed space after it (it holds no data)");
                    } else {
                        tracing::info!(segment = %path.display(), offset, bytes = len - offset, "log ends here; cutting a torn append after it, which was never reported flushed, so no fsync ever acknowledged it");
                    }
                    file.set_len(offset)?;
                    fdatasync(&file)?;
                } else if !zeros_from(&file, offset, len)? {
                    // A completed segment only ever has pre-zeroed space after its records.
                    return Err(corrupt(&path, offset, "unreadable record"));
                }
            }
            inner.active_len = offset;
            inner.zeroed_len = offset;
            // Only the last segment is written to again.
            let direct = if i + 1 == n {
                inner.direct_handle(&path, &file)
            } else {
                None
            };
            inner.segments.insert(
                first,
                Segment {
                    path,
                    file: Arc::new(file),
                    direct,
                },
            );
        }
        Ok(inner)
    }

    /// Start a new segment for records from `first` on, durably named. The segment before
    /// it is synced first: once the new name is durable, recovery takes the old segment as
    /// complete and refuses one whose end is torn (its records of this batch, written but
    /// not yet synced, with a direct write's middle possibly on disk before its header).
    fn rotate(&mut self, first: u64) -> io::Result<()> {
        if let Some(seg) = self.segments.values().next_back() {
            fdatasync(&seg.file)?;
        }
        let path = self.dir.join(seg_name(first));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        fsync_dir(&self.dir)?;
        // The segment before is complete: its direct handle is not needed again.
        if let Some(mut last) = self.segments.last_entry() {
            last.get_mut().direct = None;
        }
        let direct = self.direct_handle(&path, &file);
        self.segments.insert(
            first,
            Segment {
                path,
                file: Arc::new(file),
                direct,
            },
        );
        self.active_len = 0;
        self.zeroed_len = 0;
        Ok(())
    }

    /// A handle for direct writes to the segment at `path`, if this log makes them and
    /// its file system takes them.
    fn direct_handle(&self, path: &Path, file: &File) -> Option<Arc<File>> {
        self.direct.as_ref()?.open(path, file).map(Arc::new)
    }

    /// The last segment is written to again (after a rollback or a truncate removed the
    /// ones after it): give it back its direct handle.
    fn reopen_last_direct(&mut self) {
        let handle = match self.segments.values().next_back() {
            Some(seg) if seg.direct.is_none() => self.direct_handle(&seg.path, &seg.file),
            _ => return,
        };
        if let Some(mut last) = self.segments.last_entry() {
            last.get_mut().direct = handle;
        }
    }

    /// Before a small record goes in at `active_len`, make sure zeros are already there
    /// for it and for `PREZERO_WINDOW_BYTES` beyond: on ext4 an append that grows the file
    /// makes fdatasync commit the journal too, an overwrite does not (measured here:
    /// 108 µs vs 195 µs per 4 KiB O_DSYNC write). Large records just append: the size
    /// change is cheap next to their data.
    fn prezero(&mut self, file: &File, record_bytes: u64) -> io::Result<()> {
        // Zeros may only ever go past the end of the log: never over a record.
        self.zeroed_len = self.zeroed_len.max(self.active_len);
        let end = self.active_len + record_bytes;
        if end <= self.zeroed_len || record_bytes >= PREZERO_RECORD_BYTES_MAX {
            return Ok(());
        }
        let target = (end + PREZERO_WINDOW_BYTES).min(self.segment_bytes_max.max(end));
        let zeros = vec![0u8; (target - self.zeroed_len) as usize];
        file.write_all_at(&zeros, self.zeroed_len)?;
        self.zeroed_len = target;
        Ok(())
    }

    /// Where the log ends now, to roll a failed append back to.
    fn mark(&self) -> Mark {
        Mark {
            active_len: self.active_len,
            zeroed_len: self.zeroed_len,
            last_log_id: self.last_log_id,
            last_segment: self.segments.keys().next_back().copied(),
        }
    }

    /// Forget an attempt that wrote records from index `first` on, and delete the segments
    /// it created: the retry writes the same records to the same places again. Bytes it
    /// left past `mark.active_len` are never read as records (the retry overwrites them, or
    /// recovery cuts them as an unflushed tail).
    fn rollback(&mut self, mark: &Mark, first: u64) {
        let created: Vec<u64> = match mark.last_segment {
            Some(k) => self.segments.range(k + 1..).map(|(k, _)| *k).collect(),
            None => self.segments.keys().copied().collect(),
        };
        let removed_any = !created.is_empty();
        for k in created {
            let seg = self.segments.remove(&k).expect("listed above");
            if let Err(e) = fs::remove_file(&seg.path) {
                tracing::warn!(segment = %seg.path.display(), error = %e, "could not remove a log segment of a failed append");
            }
        }
        // `rotate` made the new segment's name durable; its removal must be too, or after a
        // power cut during the wait the empty segment would be back as the last one, after
        // an old one that may end in this attempt's torn record (recovery refuses that).
        if removed_any {
            if let Err(e) = fsync_dir(&self.dir) {
                tracing::warn!(dir = %self.dir.display(), error = %e, "could not sync the log dir after removing a failed append's segment");
            }
        }
        self.locs.split_off(&first);
        self.recent.forget_from(first);
        self.reopen_last_direct();
        self.active_len = mark.active_len;
        self.zeroed_len = mark.zeroed_len;
        self.last_log_id = mark.last_log_id;
    }

    /// Where the entries of `start..end` are: read them with [`read_entries`] after the
    /// lock is released, so replication reads never hold up an append.
    fn locate(&self, start: u64, end: u64) -> Vec<Source> {
        self.locs
            .range(start..end)
            .map(|(&index, loc)| match self.recent.entries.get(&index) {
                Some((entry, _)) => Source::Recent(entry.clone()),
                None => {
                    let seg = &self.segments[&loc.seg_first];
                    Source::Record {
                        index,
                        file: seg.file.clone(),
                        path: seg.path.clone(),
                        offset: loc.offset,
                    }
                }
            })
            .collect()
    }

    fn entries(&self, start: u64, end: u64) -> io::Result<Vec<Entry>> {
        read_entries(self.locate(start, end))
    }
}

/// Where one entry is read from.
enum Source {
    /// The window of newest entries.
    Recent(Arc<Entry>),
    /// Its record in a segment file.
    Record {
        index: u64,
        file: Arc<File>,
        path: PathBuf,
        offset: u64,
    },
}

fn read_entries(located: Vec<Source>) -> io::Result<Vec<Entry>> {
    let mut out = Vec::with_capacity(located.len());
    for source in located {
        let (index, file, path, offset) = match source {
            Source::Recent(entry) => {
                out.push(Entry::clone(&entry));
                continue;
            }
            Source::Record {
                index,
                file,
                path,
                offset,
            } => (index, file, path, offset),
        };
        let (h, body, hb) =
            read_record(&file, offset)?.ok_or_else(|| corrupt(&path, offset, "record vanished"))?;
        if h.index != index {
            return Err(corrupt(
                &path,
                offset,
                "record index changed under a reader",
            ));
        }
        let e = record::decode_body(&hb, &h, &body)
            .map_err(|e| corrupt(&path, offset, &e.to_string()))?;
        out.push(e);
    }
    Ok(out)
}

fn bounds(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s + 1,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e + 1,
        Bound::Excluded(&e) => e,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

impl LogStore {
    /// Open (recovering a torn tail). The returned watch receiver reports durable
    /// progress.
    pub fn open(opts: LogOptions) -> io::Result<(LogStore, watch::Receiver<FlushState>)> {
        let mut inner = Inner::open(&opts)?;
        let flushed_index = inner.last_log_id.map_or(0, |l| l.index);
        // The store's own reads are openraft's apply.
        let read_mark = inner.recent.new_reader();
        let (state, state_rx) = watch::channel(FlushState {
            flushed_index,
            ..FlushState::default()
        });
        Ok((
            LogStore {
                inner: Arc::new(Mutex::new(inner)),
                flush: Arc::new(Flush {
                    state,
                    fault: opts.fault_sync_file,
                    failed: AtomicBool::new(false),
                }),
                disk: opts.disk,
                early: opts.early,
                received: opts.received,
                read_mark,
            },
            state_rx,
        ))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("log store mutex poisoned")
    }

    /// `entry` in record form: the record it was received in from the leader, if that is
    /// held (`received.rs`), else encoded here.
    fn record_of(&self, entry: &Entry) -> Arc<Vec<u8>> {
        match self.received.as_ref().and_then(|r| r.take(&entry.log_id)) {
            Some(bytes) => {
                debug_assert!(
                    *bytes == record::encode(entry),
                    "the record received for {} is not its entry's encoding",
                    entry.log_id
                );
                bytes
            }
            None => Arc::new(record::encode(entry)),
        }
    }

    /// The segments and how far back the log reaches, for retention (`retention.rs`),
    /// `status` and /metrics. The files are sized after the lock is released, so this
    /// never holds up an append.
    pub fn layout(&self) -> io::Result<Layout> {
        let (spans, purged, first_index) = {
            let g = self.lock();
            let last = g.last_log_id.map_or(0, |l| l.index);
            let firsts: Vec<u64> = g.segments.keys().copied().collect();
            let spans: Vec<(u64, u64, Arc<File>)> = g
                .segments
                .iter()
                .enumerate()
                .map(|(i, (&first, seg))| {
                    let end = firsts.get(i + 1).map_or(last, |next| next - 1);
                    (first, end.max(first), seg.file.clone())
                })
                .collect();
            let purged = g.purged.map(|p| p.index);
            let first_index = g
                .locs
                .keys()
                .next()
                .copied()
                .unwrap_or_else(|| purged.map_or(0, |p| p + 1));
            (spans, purged, first_index)
        };
        let segments = spans
            .into_iter()
            .map(|(first, last, file)| {
                Ok(SegmentSpan {
                    first,
                    last,
                    bytes: file.metadata()?.len(),
                })
            })
            .collect::<io::Result<_>>()?;
        Ok(Layout {
            segments,
            purged,
            first_index,
        })
    }

    /// Write `batch` after the log's end and fdatasync the segments it touched. On a full
    /// disk the attempt is rolled back, so the next one writes every record again: that
    /// rewrite is what makes a retried fdatasync honest after one that failed with ENOSPC
    /// (the pages whose writeback failed may be clean and stale now; rewritten, they are
    /// dirty with the right bytes, so a successful fdatasync covers all of them).
    fn try_append(&self, batch: &[Pending]) -> Result<(), AppendFailure> {
        let Some(first) = batch.first().map(|r| r.log_id.index) else {
            return Ok(());
        };
        let mut g = self.lock();
        let mark = g.mark();
        let mut files: Vec<Arc<File>> = Vec::new();
        let mut write = || -> io::Result<()> {
            for rec in batch {
                let index = rec.log_id.index;
                if g.segments.is_empty() || g.active_len >= g.segment_bytes_max {
                    g.rotate(index)?;
                }
                let (&seg_first, seg) = g.segments.last_key_value().expect("a segment exists");
                let file = seg.file.clone();
                let direct = seg.direct.clone();
                let len = rec.bytes.len() as u64;
                let direct = direct.filter(|_| g.direct.as_ref().is_some_and(|w| w.wants(len)));
                if direct.is_none() {
                    // A direct record needs no zeros ahead: the kernel would write them
                    // back before the direct write over them.
                    g.prezero(&file, len)?;
                }
                let offset = g.active_len;
                match (direct, g.direct.as_mut()) {
                    (Some(d), Some(w)) => w.write_at(&file, &d, &rec.bytes, offset)?,
                    _ => file.write_all_at(&rec.bytes, offset)?,
                }
                if !files.iter().any(|f| Arc::ptr_eq(f, &file)) {
                    files.push(file);
                }
                g.active_len += rec.bytes.len() as u64;
                g.locs.insert(index, Loc { seg_first, offset });
                g.last_log_id = Some(rec.log_id);
            }
            Ok(())
        };
        if let Err(e) = write() {
            if diskfull::is_full(&e) {
                g.rollback(&mark, first);
            }
            return Err(AppendFailure::Write(e));
        }
        // Readers (replication streams) need not wait for the disk. No other append,
        // truncate or purge can run meanwhile: openraft awaits this one first.
        drop(g);
        if let Err(e) = self.flush.sync(&files) {
            if diskfull::is_full(&e) {
                self.lock().rollback(&mark, first);
            }
            return Err(AppendFailure::Sync(e));
        }
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry>> {
        let (start, end) = bounds(&range);
        let located = {
            let mut g = self.lock();
            let located = g.locate(start, end);
            let log_end = g.last_log_id.map_or(0, |l| l.index + 1);
            self.read_mark
                .fetch_max(end.min(log_end), Ordering::Relaxed);
            g.recent.forget_read();
            located
        };
        read_entries(located).map_err(io_read)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let g = self.lock();
        Ok(LogState {
            last_purged_log_id: g.purged,
            last_log_id: g.last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        LogStore {
            read_mark: self.lock().recent.new_reader(),
            ..self.clone()
        }
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> StorageResult<()> {
        let text = format!(
            "{} {} {}",
            vote.leader_id.term,
            vote.leader_id.node_id,
            u8::from(vote.committed)
        );
        // Each try rewrites the temp file whole before its fdatasync and rename, so a
        // retry after ENOSPC is as durable as a first try.
        self.disk
            .retry("raft vote save", || {
                let mut g = self.lock();
                write_file_durably(&g.dir.join("vote"), text.as_bytes())?;
                g.vote = Some(*vote);
                Ok(())
            })
            .await
            .map_err(|e| StorageError::from(StorageIOError::write_vote(AnyError::new(&e))))
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<u64>>> {
        Ok(self.lock().vote)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let origin = self.lock().origin;
        let mut seq = None;
        let mut last_index = 0;
        let entries: Vec<Entry> = entries.into_iter().collect();
        let batch: Vec<Pending> = entries
            .iter()
            .map(|entry| {
                if let EntryPayload::Normal(b) = &entry.payload {
                    if b.origin == origin {
                        seq = Some(b.seq);
                    }
                }
                last_index = entry.log_id.index;
                Pending {
                    log_id: entry.log_id,
                    bytes: self.record_of(entry),
                }
            })
            .collect();
        self.flush.state.send_if_modified(|s| {
            s.appended_index = s.appended_index.max(last_index);
            if let Some(seq) = seq {
                s.appended_seq = s.appended_seq.max(seq);
            }
            false
        });
        if let Some(early) = &self.early {
            // Before the write: the followers' fdatasync runs while ours does.
            let prev = self.lock().last_log_id;
            let records: Vec<Record> = batch
                .iter()
                .map(|p| Record {
                    log_id: p.log_id,
                    bytes: p.bytes.clone(),
                })
                .collect();
            early.offer(prev, &records);
        }
        let mut wait = self.disk.waiter("raft log append");
        let failure = loop {
            match self.try_append(&batch) {
                Ok(()) => break None,
                Err(f) if diskfull::is_full(f.error()) => match wait.full(f.error()) {
                    Some(d) => tokio::time::sleep(d).await,
                    None => break Some(f),
                },
                Err(f) => break Some(f),
            }
        };
        drop(wait);
        match failure {
            None => {
                // Flushed never passes written: what is reported is what this append
                // just wrote and fdatasync'd.
                debug_assert!(
                    self.lock()
                        .last_log_id
                        .is_some_and(|l| l.index >= last_index),
                    "reporting index {last_index} flushed beyond the log's last entry"
                );
                {
                    let mut g = self.lock();
                    for (entry, rec) in entries.into_iter().zip(&batch) {
                        g.recent.insert(entry, rec.bytes.len() as u64);
                    }
                }
                self.flush.state.send_modify(|s| {
                    s.flushed_index = s.flushed_index.max(last_index);
                    if let Some(seq) = seq {
                        s.flushed_seq = s.flushed_seq.max(seq);
                    }
                });
                callback.log_io_completed(Ok(()));
            }
            Some(AppendFailure::Write(e)) => {
                // Nothing more will be made durable here: fsync waiters fail at once rather
                // than at their timeout, and the daemon stops (openraft takes this as fatal).
                self.flush.fail(&e);
                return Err(io_write(e));
            }
            Some(AppendFailure::Sync(e)) => {
                if diskfull::is_full(&e) {
                    // Waited out: now as sticky as any other failed fdatasync.
                    self.flush.fail(&e);
                }
                callback.log_io_completed(Err(e));
            }
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> StorageResult<()> {
        let mut g = self.lock();
        let Some(loc) = g.locs.get(&log_id.index).copied() else {
            return Ok(());
        };
        let later: Vec<u64> = g
            .segments
            .range(loc.seg_first + 1..)
            .map(|(k, _)| *k)
            .collect();
        for k in later {
            let seg = g.segments.remove(&k).expect("listed above");
            fs::remove_file(&seg.path).map_err(io_write)?;
        }
        let seg = &g.segments[&loc.seg_first];
        seg.file.set_len(loc.offset).map_err(io_write)?;
        fdatasync(&seg.file).map_err(io_write)?;
        fsync_dir(&g.dir).map_err(io_write)?;
        g.active_len = loc.offset;
        g.zeroed_len = loc.offset;
        g.reopen_last_direct();
        g.locs.split_off(&log_id.index);
        g.recent.forget_from(log_id.index);
        let prev = g.locs.keys().next_back().copied();
        g.last_log_id = match prev {
            Some(i) => g
                .entries(i, i + 1)
                .map_err(io_read)?
                .pop()
                .map(|e| e.log_id),
            None => g.purged,
        };
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> StorageResult<()> {
        // Record the purge point first: after a crash, recovery skips records at or below
        // it, so deleting segments afterwards can never expose a gap.
        let path = self.lock().dir.join("purged");
        self.disk
            .retry("raft log purge", || {
                write_file_durably(&path, encode_log_id(&log_id).as_bytes())
            })
            .await
            .map_err(io_write)?;
        let mut g = self.lock();
        g.purged = Some(log_id);
        let keep = g.locs.split_off(&(log_id.index + 1));
        g.locs = keep;
        g.recent.forget_upto(log_id.index);
        if g.last_log_id.is_none_or(|l| l.index < log_id.index) {
            g.last_log_id = Some(log_id);
        }
        // A segment may go when every record in it is purged, i.e. the next segment starts
        // at or below the purge point + 1. The active (last) segment always stays.
        let firsts: Vec<u64> = g.segments.keys().copied().collect();
        for pair in firsts.windows(2) {
            if pair[1] <= log_id.index + 1 {
                let seg = g.segments.remove(&pair[0]).expect("listed above");
                fs::remove_file(&seg.path).map_err(io_write)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::state_machine::StateMachine;
    use crate::sync::tests::TempDir;
    use openraft::testing::{StoreBuilder, Suite};
    use std::os::unix::fs::FileExt;

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, Arc<TempDir>> for Builder {
        async fn build(&self) -> Result<(Arc<TempDir>, LogStore, StateMachine), StorageError<u64>> {
            let t = Arc::new(TempDir::new("suite"));
            let (log, _) = LogStore::open(LogOptions {
                dir: t.path().join("raft"),
                segment_bytes_max: 4 << 20,
                origin: 1,
                fault_sync_file: None,
                disk: DiskFullPolicy::default(),
                // Small, so the suite's reads meet entries both in and past the window.
                cache_bytes_max: 4 << 10,
                direct_bytes_min: 256 << 10,
                early: None,
                received: None,
                own_vote_uncommitted: None,
            })
            .map_err(io_write)?;
            let sm = StateMachine::for_test(t.path()).map_err(io_write)?;
            Ok((t, log, sm))
        }
    }

    /// `blocking_append` of `entries` on a thread of its own (it may wait for space).
    fn append_in_background(
        log: &LogStore,
        entries: Vec<Entry>,
    ) -> std::thread::JoinHandle<Result<(), String>> {
        use openraft::storage::RaftLogStorageExt;
        let mut writer = log.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(writer.blocking_append(entries))
                .map_err(|e| e.to_string())
        })
    }

    /// Start appending `entries` on a full disk and check that the append waits for space
    /// (the disk policy's gauge) with nothing more reported flushed than `flushed` and the
    /// log not failed; the append is left running.
    fn append_waiting_for_space(
        log: &LogStore,
        flush: &watch::Receiver<FlushState>,
        gauges: &crate::diskfull::DiskGauges,
        entries: Vec<Entry>,
        flushed: u64,
    ) -> std::thread::JoinHandle<Result<(), String>> {
        let appending = append_in_background(log, entries);
        crate::sync::tests::wait_until("the append waits for space", || {
            gauges.waiting.load(Ordering::Relaxed) == 1
        });
        assert!(!appending.is_finished());
        assert_eq!(
            flush.borrow().flushed_index,
            flushed,
            "nothing flushed while full"
        );
        assert!(!flush.borrow().failed, "a full disk is not a failed log");
        appending
    }

    /// Entry `index` of term 1: one write of `len` bytes of value `index` at `offset`.
    fn write_entry(index: u64, offset: u64, len: usize) -> Entry {
        use crate::op::{Batch, Op};
        openraft::Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Batch {
                origin: 1,
                seq: index,
                ops: vec![Op::Write {
                    path: "f".into(),
                    offset,
                    data: vec![index as u8; len].into(),
                }],
            }),
        }
    }

    /// A log with a window of `cache_bytes` in a fresh directory, and a runtime to drive it.
    fn open_with_cache(
        name: &str,
        cache_bytes: u64,
    ) -> (tokio::runtime::Runtime, TempDir, LogStore) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let t = TempDir::new(name);
        let mut o = opts(&t.path().join("raft"));
        o.segment_bytes_max = 4 << 20;
        o.cache_bytes_max = cache_bytes;
        let (log, _) = LogStore::open(o).unwrap();
        (rt, t, log)
    }

    /// The indexes the window holds.
    fn cached(log: &LogStore) -> Vec<u64> {
        log.lock().recent.entries.keys().copied().collect()
    }

    /// Entries 1..=`sizes.len()` read back as [`write_entry`] made them: entry i a write of
    /// `sizes[i - 1]` bytes of value i.
    fn assert_writes(rt: &tokio::runtime::Runtime, log: &mut LogStore, sizes: &[usize]) {
        use crate::op::Op;
        let got = rt
            .block_on(log.try_get_log_entries(1..=sizes.len() as u64))
            .unwrap();
        assert_eq!(got.len(), sizes.len());
        for (i, (e, len)) in got.iter().zip(sizes).enumerate() {
            assert_eq!(e.log_id.index, i as u64 + 1);
            let EntryPayload::Normal(b) = &e.payload else {
                panic!("entry {} is not a batch", i + 1)
            };
            let Op::Write { data, .. } = &b.ops[0] else {
                panic!("entry {} is not a write", i + 1)
            };
            assert_eq!(data.len(), *len);
            assert!(data.iter().all(|&x| x == e.log_id.index as u8));
        }
    }

    fn blank(index: u64) -> Entry {
        openraft::Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    fn opts(dir: &Path) -> LogOptions {
        LogOptions {
            dir: dir.to_path_buf(),
            segment_bytes_max: 1000,
            origin: 1,
            fault_sync_file: None,
            disk: DiskFullPolicy::default(),
            cache_bytes_max: 0,
            direct_bytes_min: 256 << 10,
            early: None,
            received: None,
            own_vote_uncommitted: None,
        }
    }

    /// The window of newest entries answers reads of what was just appended, and never an
    /// entry the log no longer holds: a follower's conflicting suffix, truncated and
    /// appended again, reads back as the new entries; purged ones leave the window; the
    /// window stays within its bytes, and a read spanning it and the files is whole.
    #[test]
    fn recent_entries_follow_truncate_purge_and_their_bound() {
        use crate::op::{Batch, Op};
        use openraft::storage::RaftLogStorageExt;
        let (rt, _t, mut log) = open_with_cache("log-recent", 64 << 10);
        // A stream that reads nothing: only truncate, purge and the bound evict here.
        let _stream = rt.block_on(log.get_log_reader());
        let write = |term: u64, index: u64, byte: u8| Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Normal(Batch {
                origin: 2,
                seq: index,
                ops: vec![Op::Write {
                    path: "f".into(),
                    offset: 0,
                    data: vec![byte; 1000].into(),
                }],
            }),
        };
        rt.block_on(log.blocking_append((1..=10).map(|i| write(1, i, 1))))
            .unwrap();
        assert_eq!(log.lock().recent.entries.len(), 10);
        rt.block_on(log.truncate(LogId::new(openraft::CommittedLeaderId::new(1, 1), 6)))
            .unwrap();
        rt.block_on(log.blocking_append((6..=8).map(|i| write(2, i, 2))))
            .unwrap();
        let expect: Vec<Entry> = (1..=5)
            .map(|i| write(1, i, 1))
            .chain((6..=8).map(|i| write(2, i, 2)))
            .collect();
        assert!(rt.block_on(log.try_get_log_entries(1..=8)).unwrap() == expect);
        rt.block_on(log.purge(LogId::new(openraft::CommittedLeaderId::new(1, 1), 3)))
            .unwrap();
        assert!(log.lock().recent.entries.keys().all(|&i| i > 3));
        rt.block_on(log.blocking_append((9..=200).map(|i| write(2, i, 3))))
            .unwrap();
        {
            let g = log.lock();
            assert!(g.recent.bytes <= 64 << 10, "{} bytes", g.recent.bytes);
            assert_eq!(g.recent.entries.keys().next_back(), Some(&200));
            assert!(
                !g.recent.entries.contains_key(&9),
                "the oldest were evicted"
            );
        }
        let got = rt.block_on(log.try_get_log_entries(4..=200)).unwrap();
        let expect: Vec<Entry> = (4..=5)
            .map(|i| write(1, i, 1))
            .chain((6..=8).map(|i| write(2, i, 2)))
            .chain((9..=200).map(|i| write(2, i, 3)))
            .collect();
        assert!(got == expect, "a read across the window and the files");
        // An entry too large for the window replaces a cached one at its index.
        let huge = Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(3, 1), 150),
            payload: EntryPayload::Normal(Batch {
                origin: 2,
                seq: 150,
                ops: vec![Op::Write {
                    path: "f".into(),
                    offset: 0,
                    data: vec![4; 100 << 10].into(),
                }],
            }),
        };
        rt.block_on(log.truncate(LogId::new(openraft::CommittedLeaderId::new(2, 1), 150)))
            .unwrap();
        rt.block_on(log.blocking_append([huge.clone()])).unwrap();
        assert!(rt.block_on(log.try_get_log_entries(150..=150)).unwrap() == vec![huge]);
    }

    /// A follower's log store, with the records its network would hold for it.
    fn open_receiving(name: &str) -> (tokio::runtime::Runtime, TempDir, Arc<Received>, LogStore) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let t = TempDir::new(name);
        let received = Arc::new(Received::default());
        let mut o = opts(&t.path().join("raft"));
        o.received = Some(received.clone());
        let (log, _) = LogStore::open(o).unwrap();
        (rt, t, received, log)
    }

    /// A follower's append takes the record it received for an entry instead of encoding
    /// the entry again, and the entry reads back from it.
    #[test]
    fn a_record_received_from_the_leader_is_written_as_it_is() {
        use openraft::storage::RaftLogStorageExt;
        let (rt, _t, received, mut log) = open_receiving("log-received");
        let e = write_entry(1, 0, 100);
        let bytes = Arc::new(record::encode(&e));
        let _held = received.hold([(e.log_id, bytes)]);
        rt.block_on(log.blocking_append([e.clone()])).unwrap();
        assert!(
            received.take(&e.log_id).is_none(),
            "the append took the received record"
        );
        let got = rt.block_on(log.try_get_log_entries(1..=1)).unwrap();
        assert!(
            got == vec![e],
            "the entry reads back from the record written"
        );
    }

    /// Debug builds check each received record against its entry's encoding: bytes that
    /// are not that entry's never reach the log unnoticed.
    #[cfg(debug_assertions)]
    #[test]
    #[should_panic(expected = "is not its entry's encoding")]
    fn a_received_record_that_is_not_its_entry_is_caught() {
        use openraft::storage::RaftLogStorageExt;
        let (rt, _t, received, mut log) = open_receiving("log-received-other");
        let e = write_entry(1, 0, 100);
        let other = Arc::new(record::encode(&write_entry(1, 0, 50)));
        let _held = received.hold([(e.log_id, other)]);
        let _ = rt.block_on(log.blocking_append([e]));
    }

    /// The window drops what every live reader has read past: the store's own reads (the
    /// apply) and each reader openraft takes for a stream. A stream that has not read an
    /// entry yet keeps it; a dropped reader no longer holds anything back; an unbounded
    /// read never marks entries not yet appended as read.
    #[test]
    fn recent_entries_stay_until_every_reader_has_read_them() {
        use openraft::storage::RaftLogStorageExt;
        let (rt, _t, mut log) = open_with_cache("log-readers", 1 << 20);
        let entry = |index: u64| write_entry(index, 0, 1000);
        rt.block_on(log.blocking_append((1..=10).map(entry)))
            .unwrap();
        let mut stream = rt.block_on(log.get_log_reader());

        // The apply reads 1..=5; the stream has read nothing: all stay.
        let got = rt.block_on(log.try_get_log_entries(1..=5)).unwrap();
        assert!(got == (1..=5).map(entry).collect::<Vec<_>>());
        assert_eq!(cached(&log), (1..=10).collect::<Vec<_>>());

        // The stream reads 1..=7: both have read 1..=5, which go.
        let got = rt.block_on(stream.try_get_log_entries(1..=7)).unwrap();
        assert!(got == (1..=7).map(entry).collect::<Vec<_>>());
        assert_eq!(cached(&log), (6..=10).collect::<Vec<_>>());

        // A clone of the stream's reader shares its mark.
        let mut clone = stream.clone();
        rt.block_on(clone.try_get_log_entries(8..=9)).unwrap();
        rt.block_on(log.try_get_log_entries(6..=8)).unwrap();
        assert_eq!(cached(&log), (9..=10).collect::<Vec<_>>());

        // With the stream gone, the apply alone decides; an unbounded read marks only
        // what the log holds, so entries appended after it stay.
        drop((stream, clone));
        rt.block_on(log.try_get_log_entries(9..)).unwrap();
        assert!(cached(&log).is_empty());
        rt.block_on(log.blocking_append((11..=12).map(entry)))
            .unwrap();
        assert_eq!(cached(&log), vec![11, 12]);
        rt.block_on(log.try_get_log_entries(11..=11)).unwrap();
        assert_eq!(cached(&log), vec![12]);
        let got = rt.block_on(log.try_get_log_entries(1..=12)).unwrap();
        assert!(
            got == (1..=12).map(entry).collect::<Vec<_>>(),
            "dropped entries read from disk"
        );

        // Entries appended again after a truncate are new to a reader that had read past
        // them.
        assert!(cached(&log).is_empty());
        rt.block_on(log.truncate(LogId::new(openraft::CommittedLeaderId::new(1, 1), 11)))
            .unwrap();
        rt.block_on(log.blocking_append((11..=12).map(entry)))
            .unwrap();
        rt.block_on(log.try_get_log_entries(11..=11)).unwrap();
        assert_eq!(cached(&log), vec![12]);
    }

    /// A cluster member that led when it stopped reads its vote back uncommitted, so it
    /// leads again only in a new term: its followers may hold entries it sent early and
    /// lost. Another node's vote, and a standalone node's own, are read back as saved.
    #[test]
    fn a_member_that_led_restarts_with_its_own_vote_uncommitted() {
        let t = TempDir::new("log-vote");
        let rt = tokio::runtime::Runtime::new().unwrap();
        let read = |me: Option<u64>| {
            let mut o = opts(t.path());
            o.own_vote_uncommitted = me;
            let (mut log, _) = LogStore::open(o).unwrap();
            rt.block_on(log.read_vote()).unwrap()
        };
        {
            let (mut log, _) = LogStore::open(opts(t.path())).unwrap();
            rt.block_on(log.save_vote(&Vote::new_committed(5, 1)))
                .unwrap();
        }
        assert_eq!(read(Some(1)), Some(Vote::new(5, 1)));
        assert_eq!(read(Some(2)), Some(Vote::new_committed(5, 1)));
        assert_eq!(read(None), Some(Vote::new_committed(5, 1)));
        // Only the reading changes: the saved vote is left as it was.
        assert_eq!(read(Some(1)), Some(Vote::new(5, 1)));
        assert_eq!(
            read_vote_file(t.path()).unwrap(),
            Some(Vote::new_committed(5, 1))
        );
    }

    #[test]
    fn a_damaged_length_field_allocates_nothing_large() {
        fn hwm_kib() -> u64 {
            let s = fs::read_to_string("/proc/self/status").unwrap();
            let line = s.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
            line.split_whitespace().nth(1).unwrap().parse().unwrap()
        }
        let t = TempDir::new("log-length");
        let p = t.path().join("seg");
        let mut hb = [0u8; HEADER_BYTES];
        hb[..4].copy_from_slice(b"SEG1");
        // Past the cap (4 GiB claimed), and under it but past the file's end.
        for claimed in [u32::MAX, (RECORD_BODY_BYTES_MAX as u32) - 1] {
            hb[4..8].copy_from_slice(&claimed.to_le_bytes());
            fs::write(&p, [&hb[..], &[0u8; 4096][..]].concat()).unwrap();
            assert!(
                record::decode_header(&hb).is_some(),
                "the header itself parses"
            );
            let before = hwm_kib();
            let f = File::open(&p).unwrap();
            assert!(read_record(&f, 0).unwrap().is_none(), "claimed {claimed}");
            // Zero-filling a 4 GiB body would raise the peak by gigabytes; other tests in
            // this process may add some megabytes.
            let grown = hwm_kib().saturating_sub(before);
            assert!(
                grown < 256 << 10,
                "claimed {claimed} bytes: peak grew {grown} KiB"
            );
        }
    }

    #[test]
    fn recovery_cuts_the_tail_and_refuses_a_damaged_completed_segment() {
        use openraft::storage::RaftLogStorageExt;
        let rt = tokio::runtime::Runtime::new().unwrap();
        let t = TempDir::new("log-recovery");
        let dir = t.path().join("raft");
        let last = |dir: &Path| {
            let (mut log, _) = LogStore::open(opts(dir))?;
            let state = rt.block_on(log.get_log_state()).unwrap();
            Ok::<_, io::Error>(state.last_log_id.map(|l| l.index))
        };
        {
            let (mut log, flush) = LogStore::open(opts(&dir)).unwrap();
            // Small records land in pre-zeroed space; 40 of them span several segments.
            rt.block_on(log.blocking_append((1..=40).map(blank)))
                .unwrap();
            assert_eq!(flush.borrow().flushed_index, 40);
        }
        let mut segs: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "seg"))
            .collect();
        segs.sort();
        assert!(segs.len() >= 3, "{segs:?}");
        assert_eq!(last(&dir).unwrap(), Some(40));
        // Reopening cut the pre-zeroed tail: the active segment ends at its last record.
        let tail = segs.last().unwrap();
        let len = fs::metadata(tail).unwrap().len();
        assert_eq!(
            len % HEADER_BYTES as u64,
            0,
            "only whole blank records remain"
        );

        // A torn append at the end is dropped, the records before it stay.
        let f = OpenOptions::new().write(true).open(tail).unwrap();
        f.write_all_at(b"SEG1 torn record header and some bytes", len)
            .unwrap();
        assert_eq!(last(&dir).unwrap(), Some(40));
        assert_eq!(fs::metadata(tail).unwrap().len(), len);

        // A flipped byte inside a completed segment is corruption, not a tail.
        let f = OpenOptions::new().write(true).open(&segs[0]).unwrap();
        f.write_all_at(&[0xff], 60).unwrap();
        let err = last(&dir).unwrap_err();
        assert!(err.to_string().contains("corrupt"), "{err}");
    }

    #[test]
    fn mixed_large_and_small_records_read_back_intact() {
        use openraft::storage::RaftLogStorageExt;
        let rt = tokio::runtime::Runtime::new().unwrap();
        let t = TempDir::new("log-mixed");
        let dir = t.path().join("raft");
        let entry = |index: u64, len: usize| write_entry(index, 0, len);
        // Small, large (no pre-zeroing), small again: the small one after the large one
        // must not zero over it.
        let sizes = [100usize, 300 << 10, 100, 200, 1 << 20, 50, 60];
        let mut o = opts(&dir);
        o.segment_bytes_max = 64 << 20;
        let check = |log: &mut LogStore| assert_writes(&rt, log, &sizes);
        {
            let (mut log, _) = LogStore::open(o.clone()).unwrap();
            for (i, len) in sizes.iter().enumerate() {
                rt.block_on(log.blocking_append([entry(i as u64 + 1, *len)]))
                    .unwrap();
            }
            check(&mut log);
        }
        let (mut log, _) = LogStore::open(o).unwrap();
        check(&mut log);
    }

    /// A large record's page-aligned middle goes to the disk directly, not through the
    /// page cache (`direct_write.rs`), and reads back intact before and after reopening,
    /// as do the small records around it, whose pages share the large one's head and
    /// tail. With `direct_bytes_min` 0 the same middle is in the page cache.
    #[test]
    fn a_large_records_middle_bypasses_the_page_cache() {
        use openraft::storage::RaftLogStorageExt;
        let rt = tokio::runtime::Runtime::new().unwrap();
        let sizes = [100usize, 1 << 20, 300, (1 << 20) + 4096, 10];
        for (direct_bytes_min, direct) in [(256 << 10, true), (0, false)] {
            let t = TempDir::new("log-direct");
            let dir = t.path().join("raft");
            let mut o = opts(&dir);
            o.segment_bytes_max = 64 << 20;
            o.direct_bytes_min = direct_bytes_min;
            let check = |log: &mut LogStore| assert_writes(&rt, log, &sizes);
            let (mut log, _) = LogStore::open(o.clone()).unwrap();
            for (i, len) in sizes.iter().enumerate() {
                rt.block_on(log.blocking_append([write_entry(i as u64 + 1, 0, *len)]))
                    .unwrap();
            }
            let (start, end) = {
                let g = log.lock();
                (g.locs[&2].offset, g.locs[&3].offset)
            };
            let resident = super::super::direct_write::resident_pages(&dir.join(seg_name(1)));
            let whole = &resident[start.div_ceil(4096) as usize..(end / 4096) as usize];
            assert!(whole.len() >= 250, "{} whole pages", whole.len());
            let cached = whole.iter().filter(|r| **r).count();
            if direct {
                assert_eq!(cached, 0, "pages of the direct middle in the page cache");
            } else {
                assert_eq!(cached, whole.len(), "a buffered record's pages not cached");
            }
            check(&mut log);
            drop(log);
            let (mut log, _) = LogStore::open(o).unwrap();
            check(&mut log);
        }
    }

    /// The log's file system fills up in the middle of a batch that also starts new
    /// segments: the append waits (nothing reported flushed), then completes once space is
    /// freed, and every record reads back intact, before and after reopening.
    #[test]
    fn a_full_disk_delays_an_append_until_space_returns_and_loses_nothing() {
        use crate::diskfull::DiskGauges;
        use crate::op::Op;
        use crate::sync::tests::TempDir;
        use crate::test_tmpfs::Tmpfs;
        use openraft::storage::RaftLogStorageExt;
        let tmp = TempDir::new("log-full");
        let t = Tmpfs::mount(tmp.path(), "2m");
        let dir = t.path().join("raft");
        let gauges = Arc::new(DiskGauges::default());
        let mut o = opts(&dir);
        o.disk = DiskFullPolicy::patient(&gauges);
        // 64 KiB each; segments of 1000 bytes: every record starts a segment.
        let entry = |index: u64| write_entry(index, index * 65536, 65536);
        let check = |log: &mut LogStore, rt: &tokio::runtime::Runtime| {
            let got = rt.block_on(log.try_get_log_entries(1..=10)).unwrap();
            assert_eq!(got.len(), 10);
            for (i, e) in got.iter().enumerate() {
                assert_eq!(e.log_id.index, i as u64 + 1);
                let EntryPayload::Normal(b) = &e.payload else {
                    panic!("entry {} is not a batch", i + 1)
                };
                let Op::Write { data, .. } = &b.ops[0] else {
                    panic!()
                };
                assert!(data.iter().all(|&x| x == e.log_id.index as u8));
            }
        };
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (mut log, flush) = LogStore::open(o.clone()).unwrap();
        rt.block_on(log.blocking_append((1..=5).map(entry)))
            .unwrap();
        assert_eq!(flush.borrow().flushed_index, 5);

        let filler = t.fill("filler");
        let appending =
            append_waiting_for_space(&log, &flush, &gauges, (6..=10).map(entry).collect(), 5);
        assert_eq!(flush.borrow().flushed_seq, 5);

        fs::remove_file(filler).unwrap();
        appending.join().unwrap().unwrap();
        assert_eq!(gauges.waiting.load(Ordering::Relaxed), 0);
        assert_eq!(flush.borrow().flushed_index, 10);
        assert_eq!(flush.borrow().flushed_seq, 10);
        check(&mut log, &rt);
        drop(log);
        let (mut log, _) = LogStore::open(o).unwrap();
        check(&mut log, &rt);
        // No segment of a failed attempt was left behind: one per record.
        let segs = fs::read_dir(&dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "seg")
            })
            .count();
        assert_eq!(segs, 10);
    }

    /// The same on ext4 (a loop device, since tmpfs takes no direct I/O), with records large
    /// enough to go direct: a direct write that meets the full disk makes the append wait
    /// with nothing reported flushed, and once space returns the batch is written again
    /// (its middles directly) and every record reads back intact, also after reopening.
    #[test]
    fn a_full_ext4_disk_delays_a_direct_append_until_space_returns() {
        use crate::diskfull::DiskGauges;
        use crate::sync::tests::TempDir;
        use openraft::storage::RaftLogStorageExt;
        use std::process::Command;
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = Command::new("umount").arg(&self.0).status();
            }
        }
        let tmp = TempDir::new("log-full-ext4");
        let img = tmp.path().join("ext4.img");
        File::create(&img).unwrap().set_len(32 << 20).unwrap();
        let st = Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&img)
            .status();
        assert!(st.is_ok_and(|s| s.success()), "mkfs.ext4 {}", img.display());
        let mnt = tmp.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        let st = Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt)
            .status();
        assert!(
            st.is_ok_and(|s| s.success()),
            "mount -o loop {}",
            img.display()
        );
        let _unmount = Unmount(mnt.clone());

        let dir = mnt.join("raft");
        let gauges = Arc::new(DiskGauges::default());
        let mut o = opts(&dir);
        o.segment_bytes_max = 64 << 20;
        o.disk = DiskFullPolicy::patient(&gauges);
        let mib = 1usize << 20;
        let entry = |index: u64| write_entry(index, 0, mib);
        let check =
            |log: &mut LogStore, rt: &tokio::runtime::Runtime| assert_writes(rt, log, &[mib; 8]);
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (mut log, flush) = LogStore::open(o.clone()).unwrap();
        rt.block_on(log.blocking_append((1..=4).map(entry)))
            .unwrap();
        assert_eq!(flush.borrow().flushed_index, 4);

        // Fill the file system to its last block (as root, the reserved blocks too).
        let filler = mnt.join("filler");
        {
            let mut f = File::create(&filler).unwrap();
            let chunk = vec![7u8; 64 << 10];
            // Bounded: the file system has 32 MiB.
            for _ in 0..(32 << 20) / chunk.len() {
                if let Err(e) = std::io::Write::write_all(&mut f, &chunk) {
                    assert!(diskfull::is_full(&e), "{e}");
                    break;
                }
            }
            let _ = f.sync_all();
        }
        let appending =
            append_waiting_for_space(&log, &flush, &gauges, (5..=8).map(entry).collect(), 4);

        fs::remove_file(&filler).unwrap();
        appending.join().unwrap().unwrap();
        assert_eq!(flush.borrow().flushed_index, 8);
        // The retry went direct: the last record's whole pages are not in the page cache.
        let (start, seg_first) = {
            let g = log.lock();
            (g.locs[&8].offset, g.locs[&8].seg_first)
        };
        let resident = super::super::direct_write::resident_pages(&dir.join(seg_name(seg_first)));
        let first_page = start.div_ceil(4096) as usize;
        let whole = &resident[first_page..first_page + 200];
        assert_eq!(
            whole.iter().filter(|r| **r).count(),
            0,
            "record 8 went through the page cache"
        );
        check(&mut log, &rt);
        drop(log);
        let (mut log, _) = LogStore::open(o).unwrap();
        check(&mut log, &rt);
    }

    /// ENOSPC from fdatasync itself (tmpfs never gives one, so through the test hook):
    /// nothing is reported flushed while it lasts, the batch is rewritten and synced
    /// again once it stops, and the records read back intact, also after reopening.
    #[test]
    fn an_enospc_from_fdatasync_is_waited_out_and_the_batch_rewritten() {
        use crate::diskfull::DiskGauges;
        use openraft::storage::RaftLogStorageExt;
        let tmp = TempDir::new("log-sync-enospc");
        let fault = tmp.path().join("fault");
        let gauges = Arc::new(DiskGauges::default());
        let mut o = opts(&tmp.path().join("raft"));
        o.fault_sync_file = Some(fault.clone());
        o.disk = DiskFullPolicy::patient(&gauges);
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (log, flush) = LogStore::open(o.clone()).unwrap();
        rt.block_on(log.clone().blocking_append((1..=3).map(blank)))
            .unwrap();
        assert_eq!(flush.borrow().flushed_index, 3);

        fs::write(&fault, b"ENOSPC").unwrap();
        let appending =
            append_waiting_for_space(&log, &flush, &gauges, (4..=6).map(blank).collect(), 3);

        fs::remove_file(&fault).unwrap();
        appending.join().unwrap().unwrap();
        assert_eq!(flush.borrow().flushed_index, 6);
        let indexes = |log: &mut LogStore| -> Vec<u64> {
            rt.block_on(log.try_get_log_entries(1..=6))
                .unwrap()
                .iter()
                .map(|e| e.log_id.index)
                .collect()
        };
        let mut log = log;
        assert_eq!(indexes(&mut log), (1..=6).collect::<Vec<_>>());
        drop(log);
        let (mut log, _) = LogStore::open(o).unwrap();
        assert_eq!(indexes(&mut log), (1..=6).collect::<Vec<_>>());
    }

    /// openraft's storage conformance suite, run against this log store and state machine:
    /// every case of `Suite::test_store` except `transfer_snapshot`, because shipping the
    /// tree to another node is not part of the single-node build (install_snapshot says so).
    #[test]
    fn openraft_suite() {
        type S = Suite<TypeConfig, LogStore, StateMachine, Builder, Arc<TempDir>>;
        let rt = tokio::runtime::Runtime::new().unwrap();
        macro_rules! run {
            ($($case:ident),* $(,)?) => {$(
                rt.block_on(async {
                    let (_guard, log, sm) = Builder.build().await.unwrap();
                    S::$case(log, sm).await.unwrap_or_else(|e| panic!("{}: {e}", stringify!($case)));
                });
            )*};
        }
        run!(
            last_membership_in_log_initial,
            last_membership_in_log,
            last_membership_in_log_multi_step,
            get_membership_initial,
            get_membership_from_log_and_empty_sm,
            get_membership_from_empty_log_and_sm,
            get_membership_from_log_le_sm_last_applied,
            get_membership_from_log_gt_sm_last_applied_1,
            get_membership_from_log_gt_sm_last_applied_2,
            get_initial_state_without_init,
            get_initial_state_membership_from_log_and_sm,
            get_initial_state_with_state,
            get_initial_state_last_log_gt_sm,
            get_initial_state_last_log_lt_sm,
            get_initial_state_log_ids,
            get_initial_state_re_apply_committed,
            save_vote,
            get_log_entries,
            limited_get_log_entries,
            try_get_log_entry,
            initial_logs,
            get_log_state,
            get_log_id,
            last_id_in_log,
            last_applied_state,
            purge_logs_upto_0,
            purge_logs_upto_5,
            purge_logs_upto_20,
            delete_logs_since_11,
            delete_logs_since_0,
            append_to_log,
            snapshot_meta,
            apply_single,
            apply_multiple,
        );
    }
}
