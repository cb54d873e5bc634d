//! The Raft state machine: committed entries applied, in order, to `tree/`.
//!
//! Replay after a crash starts at the checkpoint, so everything between the checkpoint and
//! the crash is applied again. Data ops (pwrite, ftruncate, chmod, utimes) converge when
//! replayed over any mix of their own partial effects. Namespace ops do not (a rename whose
//! effect persisted while earlier writes to the old name did not would lose those writes),
//! so before applying an entry that holds one, the state machine syncs the tree and
//! checkpoints the index before it: a replay then repeats at most that single namespace
//! op, whose second application is a harmless ENOENT/EEXIST.
//!
//! A checkpoint is also what openraft calls a snapshot here: `build_snapshot` syncs the tree
//! and records the applied id, after which openraft may purge the log below it. The
//! transferable form, a tree image (`snapshot.rs`), is only built when openraft asks for the
//! current snapshot to send it to a member that is behind: it runs in openraft's state
//! machine task, so no entry is applied while the tree is walked and the image is exactly
//! the state at the applied index. openraft also asks once at startup, only to learn the
//! snapshot's id; that first answer carries no image.
//!
//! A full disk (ENOSPC, EDQUOT) while applying or checkpointing is waited out: the entry is
//! tried again every `disk_full_retry_ms` (`diskfull.rs`), with the lock released between
//! tries, resuming at the op that failed (`Resume`), so an op that already took effect is
//! never applied a second time with a different result (an exclusive create coming back as
//! EEXIST). After `disk_full_wait_ms` the failure is fatal. A checkpoint taken between two
//! tries (openraft builds snapshots in a task of their own) records the entry before, so a
//! replay after a crash repeats the whole entry: only data ops can be partly applied then
//! (a namespace op is proposed alone in its batch), and data ops converge.

use std::collections::VecDeque;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    AnyError, EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership,
};
use tokio::sync::watch;

use super::checkpoint::{Checkpoint, CheckpointFile};
use super::elections::Elections;
use super::overlay::Overlay;
use super::snapshot::{self, SnapshotFile};
use super::{Entry, TypeConfig};
use crate::diskfull::DiskFullPolicy;
use crate::op::{ApplyResult, Batch, Op};
use crate::tree::{TreeApplier, TreeLimits};

type StorageResult<T> = Result<T, StorageError<u64>>;

fn sm_err(e: io::Error) -> StorageError<u64> {
    StorageIOError::write_state_machine(AnyError::new(&e)).into()
}

/// Told about ops this node did not propose (replicated from a leader, or replayed), so
/// the kernel's caches of the mount can be invalidated.
pub trait ApplyObserver: Send + Sync {
    /// `own`: proposed by this daemon run (its kernel cache already holds the result
    /// while it is the writable leader).
    fn applied(&self, op: &Op, own: bool);
    /// The whole tree was replaced (snapshot installed).
    fn reset(&self);
}

pub type ObserverSlot = Arc<OnceLock<Arc<dyn ApplyObserver>>>;

/// The overlay of the daemon run that proposes batches from `origin`.
#[derive(Clone)]
pub struct OverlayLink {
    pub origin: u64,
    pub overlay: Arc<Mutex<Overlay>>,
}

struct Inner {
    data_dir: PathBuf,
    tree: TreeApplier,
    tree_dir: PathBuf,
    tree_limits: TreeLimits,
    observer: ObserverSlot,
    /// openraft's first `get_current_snapshot` (at startup) only wants the id.
    startup_probe_answered: bool,
    /// The newest image: (applied index it holds, path, writer's progress).
    image: Option<(u64, PathBuf, Arc<AtomicU8>, u64)>,
    ckpt_file: CheckpointFile,
    applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, openraft::BasicNode>,
    /// The last checkpoint written (what `get_current_snapshot` reports).
    snapshot: Option<Checkpoint>,
    overlay: Option<OverlayLink>,
    applied_tx: watch::Sender<u64>,
    shared: Arc<Shared>,
    /// How far a batch got before its last try failed with a full disk.
    resume: Option<Resume>,
}

/// The part of a batch already applied when a try stopped at a full disk.
struct Resume {
    index: u64,
    /// The checkpoint a namespace op needs before it was written.
    checkpointed: bool,
    /// The results of the ops applied so far, in order: the next try starts after them.
    errnos: Vec<i32>,
}

/// What admin and peer requests read without the state machine lock, which is held for
/// whole tree walks (images, digests): a status call or a metrics scrape must never wait
/// for one on a runtime thread.
struct Shared {
    /// An export learner's frozen index (`NO_EXPORT`: not an export): entries past it are
    /// acknowledged to Raft but leave the tree alone, so the tree stays the state there.
    export_until: AtomicU64,
    /// Tree digests recorded at digest barriers, newest last (at most `DIGESTS_KEPT`).
    digests: Mutex<VecDeque<(u64, [u8; 32])>>,
    applied_rx: watch::Receiver<u64>,
}

const NO_EXPORT: u64 = u64::MAX;

impl Shared {
    fn export_until(&self) -> Option<u64> {
        Some(self.export_until.load(Ordering::Acquire)).filter(|i| *i != NO_EXPORT)
    }
}

/// Digest barriers remembered for `verify` (it asks right after proposing one).
const DIGESTS_KEPT: usize = 16;

/// Where an export learner's frozen index is kept (absent: not an export).
fn export_path(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("export-until")
}

fn read_export(data_dir: &std::path::Path) -> io::Result<Option<u64>> {
    match std::fs::read_to_string(export_path(data_dir)) {
        Ok(s) => s.trim().parse().map(Some).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} does not hold an index: {s:?}",
                    export_path(data_dir).display()
                ),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// What a member can say about the digest barrier at an index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DigestAnswer {
    /// Not applied yet.
    Pending,
    Recorded([u8; 32]),
    /// Applied, but no digest was taken here at that index; the text says why.
    Unknown(String),
}

impl Inner {
    fn checkpoint(&mut self) -> io::Result<Checkpoint> {
        self.tree.sync()?;
        let c = Checkpoint {
            applied: self.applied,
            membership: self.membership.clone(),
        };
        self.ckpt_file.write(&c)?;
        self.snapshot = Some(c.clone());
        Ok(c)
    }

    /// Apply one entry. After a failure with a full disk the entry is tried again, and
    /// the try resumes where this one stopped.
    fn apply_one(&mut self, entry: &Entry) -> io::Result<ApplyResult> {
        let mut result = ApplyResult::default();
        match &entry.payload {
            EntryPayload::Blank => {}
            EntryPayload::Membership(m) => {
                self.membership = StoredMembership::new(Some(entry.log_id), m.clone());
            }
            EntryPayload::Normal(_)
                if self
                    .shared
                    .export_until()
                    .is_some_and(|until| entry.log_id.index > until) => {}
            EntryPayload::Normal(batch) => {
                let index = entry.log_id.index;
                let mut progress =
                    self.resume
                        .take()
                        .filter(|r| r.index == index)
                        .unwrap_or(Resume {
                            index,
                            checkpointed: false,
                            errnos: Vec::new(),
                        });
                if let Err(e) = self.apply_batch(batch, &mut progress) {
                    self.resume = Some(progress);
                    return Err(e);
                }
                result.errnos = progress.errnos;
            }
        }
        self.applied = Some(entry.log_id);
        self.applied_tx.send_replace(entry.log_id.index);
        Ok(result)
    }

    /// Apply the ops of `batch` that `progress` does not hold results for yet.
    fn apply_batch(&mut self, batch: &Batch, progress: &mut Resume) -> io::Result<()> {
        if !progress.checkpointed && batch.ops.iter().any(|op| op.is_namespace()) {
            self.checkpoint()?;
            progress.checkpointed = true;
        }
        // Hold the overlay lock across apply + drop so readers never see the bytes
        // in neither place (or twice with different values).
        let link = self.overlay.clone().filter(|l| l.origin == batch.origin);
        let mut guard = link
            .as_ref()
            .map(|l| l.overlay.lock().expect("overlay mutex poisoned"));
        for op in &batch.ops[progress.errnos.len()..] {
            if matches!(op, Op::Digest) {
                let d = snapshot::tree_digest(&self.tree_dir)?;
                let mut digests = self.shared.digests.lock().expect("digests mutex");
                if digests.len() == DIGESTS_KEPT {
                    digests.pop_front();
                }
                digests.push_back((progress.index, d));
                progress.errnos.push(0);
                continue;
            }
            progress.errnos.push(self.tree.apply(op)?);
        }
        if let Some(g) = guard.as_mut() {
            g.drop_upto(batch.seq);
        }
        drop(guard);
        if let Some(obs) = self.observer.get() {
            for (op, errno) in batch.ops.iter().zip(&progress.errnos) {
                if *errno == 0 {
                    obs.applied(op, link.is_some());
                }
            }
        }
        Ok(())
    }
}

/// Handle to the state machine; clones share it (the snapshot builder is a clone).
#[derive(Clone)]
pub struct StateMachine {
    inner: Arc<Mutex<Inner>>,
    shared: Arc<Shared>,
    disk: DiskFullPolicy,
    /// Set once Raft runs: a snapshot install pauses this node's elections.
    elections: Arc<OnceLock<Elections>>,
}

impl StateMachine {
    /// Open the state machine over `DATA_DIR/tree/` and its checkpoint, finishing a
    /// snapshot install that a crash interrupted.
    pub fn open(
        data_dir: PathBuf,
        tree_limits: TreeLimits,
        overlay: Option<OverlayLink>,
        observer: ObserverSlot,
        disk: DiskFullPolicy,
    ) -> io::Result<(StateMachine, watch::Receiver<u64>)> {
        let (mut ckpt_file, mut c) = CheckpointFile::open(&data_dir.join("applied"))?;
        if let Some(installed) = snapshot::recover_install(&data_dir, &mut ckpt_file)? {
            tracing::warn!(applied = ?installed.applied, "finished a snapshot install interrupted by a crash");
            c = installed;
        }
        std::fs::create_dir_all(data_dir.join("snapshots"))?;
        let (applied_tx, applied_rx) = watch::channel(c.applied.map_or(0, |l| l.index));
        let snapshot = c.applied.map(|_| c.clone());
        let tree_dir = data_dir.join("tree");
        let shared = Arc::new(Shared {
            export_until: AtomicU64::new(read_export(&data_dir)?.unwrap_or(NO_EXPORT)),
            digests: Mutex::default(),
            applied_rx: applied_rx.clone(),
        });
        Ok((
            StateMachine {
                disk,
                shared: shared.clone(),
                elections: Arc::default(),
                inner: Arc::new(Mutex::new(Inner {
                    tree: TreeApplier::new(tree_dir.clone(), tree_limits),
                    tree_dir,
                    tree_limits,
                    data_dir,
                    observer,
                    startup_probe_answered: false,
                    image: None,
                    ckpt_file,
                    applied: c.applied,
                    membership: c.membership,
                    snapshot,
                    overlay,
                    applied_tx,
                    shared,
                    resume: None,
                })),
            },
            applied_rx,
        ))
    }

    /// The tree limits the state machine's tests open it with.
    #[cfg(test)]
    pub const TEST_TREE_LIMITS: TreeLimits = TreeLimits {
        open_files_max: 8,
        direct_bytes_min: 256 << 10,
    };

    #[cfg(test)]
    pub fn for_test(dir: &std::path::Path) -> io::Result<StateMachine> {
        std::fs::create_dir_all(dir.join("tree"))?;
        Ok(Self::open(
            dir.to_path_buf(),
            Self::TEST_TREE_LIMITS,
            None,
            Arc::default(),
            DiskFullPolicy::default(),
        )?
        .0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("state machine mutex poisoned")
    }

    /// Sync the tree and record the applied id (also done on clean shutdown).
    pub fn checkpoint_now(&self) -> io::Result<()> {
        self.lock().checkpoint().map(drop)
    }

    pub fn set_elections(&self, e: Elections) {
        let _ = self.elections.set(e);
    }

    /// The applied index as it changes.
    pub fn applied_watch(&self) -> watch::Receiver<u64> {
        self.shared.applied_rx.clone()
    }

    /// The digest recorded at the barrier at `index`, if this member took one.
    pub fn digest_at(&self, index: u64) -> DigestAnswer {
        let recorded = {
            let digests = self.shared.digests.lock().expect("digests mutex");
            digests.iter().find(|(i, _)| *i == index).map(|(_, d)| *d)
        };
        if let Some(d) = recorded {
            return DigestAnswer::Recorded(d);
        }
        if *self.shared.applied_rx.borrow() < index {
            return DigestAnswer::Pending;
        }
        DigestAnswer::Unknown(match self.shared.export_until() {
            Some(until) if until < index => format!("an export frozen at index {until}"),
            _ => "no digest taken at that index here (it arrived in a snapshot, or too \
                  many barriers since)"
                .into(),
        })
    }

    /// The index an export learner's tree is frozen at, if this is one.
    pub fn export_until(&self) -> Option<u64> {
        self.shared.export_until()
    }

    /// Make this member an export: its tree stops at `index`. Refused once the tree is
    /// past it. Durable before it returns, so a restart keeps the tree frozen.
    pub fn set_export_until(&self, index: u64) -> io::Result<()> {
        let g = self.lock();
        let applied = g.applied.map_or(0, |l| l.index);
        if applied > index {
            return Err(io::Error::other(format!(
                "this member has already applied index {applied}, past {index}; use a \
                 fresh data dir for the export"
            )));
        }
        let path = export_path(&g.data_dir);
        let tmp = path.with_extension("tmp");
        let f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut &f, format!("{index}\n").as_bytes())?;
        crate::sync::fdatasync(&f)?;
        std::fs::rename(&tmp, &path)?;
        crate::sync::fsync_dir(&g.data_dir)?;
        g.shared.export_until.store(index, Ordering::Release);
        tracing::info!(
            index,
            "this member is an export: its tree stops at this index"
        );
        Ok(())
    }
}

/// Where openraft writes the snapshot being received (an image or a delta).
fn incoming_path(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("snapshots/incoming.img")
}

impl StateMachine {
    /// This member's manifest (`snapshot/delta.rs`), for a leader about to send it a
    /// snapshot. Built under the lock, so no apply moves the tree while it is read (and
    /// one request at a time refreshes the hash cache).
    pub fn manifest(&self, bytes_max: usize) -> io::Result<Vec<u8>> {
        let g = self.lock();
        snapshot::delta::build_manifest(
            &g.tree_dir,
            &snapshot::delta::cache_path(&g.data_dir),
            bytes_max,
        )
    }

    /// An unlinked file in `snapshots/`, gone when its last handle closes.
    pub fn scratch_file(&self) -> io::Result<std::fs::File> {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = self.lock().data_dir.join(format!(
            "snapshots/scratch-{}",
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)?;
        std::fs::remove_file(&p)?;
        Ok(f)
    }

    /// Is the snapshot being received a delta (its first bytes are in the file)?
    pub fn receiving_delta(&self) -> io::Result<bool> {
        snapshot::delta::is_delta(&incoming_path(&self.lock().data_dir))
    }

    /// Rebuild `tree.new/` from the delta just received, before openraft is told the
    /// transfer is done: a delta that no longer matches this tree is refused here, as a
    /// failed transfer the leader retries, where a failed install would stop this
    /// member's Raft. Elections pause meanwhile, as during an install.
    pub async fn prepare_delta(&self) -> io::Result<()> {
        let _pause = self.elections.get().map(Elections::pause);
        let started = std::time::Instant::now();
        // A full disk is waited out as an install waits it out; each try starts again
        // from the delta. The peer server's runtime is multi-threaded: the rebuild blocks
        // this worker only.
        let digest = self
            .disk
            .retry("rebuilding the tree from an incremental snapshot", || {
                tokio::task::block_in_place(|| {
                    let g = self.lock();
                    snapshot::delta::prepare(&g.data_dir, &incoming_path(&g.data_dir))
                })
            })
            .await?;
        tracing::info!(
            digest = %super::snapshot::hex(&digest[..8]),
            ms = started.elapsed().as_millis() as u64,
            "rebuilt the tree from an incremental snapshot"
        );
        Ok(())
    }
}

fn meta_of(c: &Checkpoint) -> SnapshotMeta<u64, openraft::BasicNode> {
    let index = c.applied.map_or(0, |l| l.index);
    SnapshotMeta {
        last_log_id: c.applied,
        last_membership: c.membership.clone(),
        snapshot_id: format!("tree-{index}"),
    }
}

/// The meta of a tree image of `len` bytes sent to a member: its id carries the length, so
/// the member can show what it has still to receive (`snapshot::image_len_of_id`).
fn image_meta(c: &Checkpoint, len: u64) -> SnapshotMeta<u64, openraft::BasicNode> {
    SnapshotMeta {
        snapshot_id: snapshot::image_id(c.applied.map_or(0, |l| l.index), len),
        ..meta_of(c)
    }
}

impl Inner {
    /// An empty file standing in for snapshot data that is never read (checkpoints and the
    /// startup probe only carry an id).
    fn no_image(&self) -> io::Result<Box<SnapshotFile>> {
        let p = self.data_dir.join("snapshots/none");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(p)?;
        Ok(Box::new(SnapshotFile::complete(f)))
    }
}

/// Holders of an image's progress flag that do not read it: the thread writing it and
/// `Inner::image`.
const IMAGE_HOLDERS_NOT_READING: usize = 2;

impl StateMachine {
    /// The image of the tree at the applied index, for a member that is behind. A thread
    /// writes it while holding the state machine lock (no entry is applied meanwhile, so
    /// the image is exactly that state); openraft streams it as it grows.
    pub fn current_image(&self) -> io::Result<Snapshot<TypeConfig>> {
        {
            let g = self.lock();
            let index = g.applied.map_or(0, |l| l.index);
            if let Some((i, p, progress, len)) = &g.image {
                if *i == index && progress.load(Ordering::Acquire) != snapshot::IMAGE_FAILED {
                    let now = Checkpoint {
                        applied: g.applied,
                        membership: g.membership.clone(),
                    };
                    return Ok(Snapshot {
                        meta: image_meta(&now, *len),
                        snapshot: Box::new(SnapshotFile::growing(
                            std::fs::File::open(p)?,
                            progress.clone(),
                            *len,
                        )),
                    });
                }
            }
        }
        let inner = self.inner.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("tree-image".into())
            .spawn(move || {
                let mut g = inner.lock().expect("state machine mutex poisoned");
                let index = g.applied.map_or(0, |l| l.index);
                let now = Checkpoint {
                    applied: g.applied,
                    membership: g.membership.clone(),
                };
                let path = g.data_dir.join(format!("snapshots/tree-{index}.img"));
                let progress = Arc::new(AtomicU8::new(snapshot::IMAGE_WRITING));
                let opened = snapshot::image_len(&g.tree_dir).and_then(|len| {
                    let w = std::fs::File::create(&path)?;
                    Ok((w, std::fs::File::open(&path)?, len))
                });
                let (writer, reader, len) = match opened {
                    Ok(x) => x,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                if let Some((_, old, _, _)) = g.image.replace((index, path, progress.clone(), len))
                {
                    let _ = std::fs::remove_file(old);
                }
                let _ = tx.send(Ok((now, reader, progress.clone(), len)));
                let started = std::time::Instant::now();
                // Held by this thread and by `g.image`; every other holder is a reader. A
                // transfer that fails before it reads (its member is unreachable: openraft
                // asks again every 500 ms while it stays down) drops its reader, and the
                // walk stops instead of pausing applies for the whole tree each time. One
                // that has read is finished, for the next try to reuse.
                let wanted = || {
                    Arc::strong_count(&progress) > IMAGE_HOLDERS_NOT_READING
                        || progress.load(Ordering::Acquire) == snapshot::IMAGE_WRITING_READ
                };
                match snapshot::write_image(&g.tree_dir, writer, &wanted) {
                    Ok(bytes) if bytes != len => {
                        progress.store(snapshot::IMAGE_FAILED, Ordering::Release);
                        tracing::error!(
                            index,
                            bytes,
                            expected = len,
                            "tree image size differs from its precomputed length"
                        );
                    }
                    Ok(bytes) => {
                        progress.store(snapshot::IMAGE_DONE, Ordering::Release);
                        tracing::info!(
                            index,
                            bytes,
                            ms = started.elapsed().as_millis() as u64,
                            "built tree image for a member that is behind"
                        );
                    }
                    Err(e) if snapshot::is_abandoned(&e) => {
                        progress.store(snapshot::IMAGE_FAILED, Ordering::Release);
                        if let Some((_, path, _, _)) = g.image.take() {
                            let _ = std::fs::remove_file(path);
                        }
                        tracing::info!(
                            index,
                            ms = started.elapsed().as_millis() as u64,
                            "stopped building a tree image: its transfer ended before reading it"
                        );
                    }
                    Err(e) => {
                        progress.store(snapshot::IMAGE_FAILED, Ordering::Release);
                        tracing::error!(index, error = %e, "building a tree image failed");
                    }
                }
            })?;
        let (now, reader, progress, len) = rx
            .recv()
            .map_err(|_| io::Error::other("tree image thread died"))??;
        Ok(Snapshot {
            meta: image_meta(&now, len),
            snapshot: Box::new(SnapshotFile::growing(reader, progress, len)),
        })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let c = self
            .disk
            .retry("checkpoint", || self.lock().checkpoint())
            .await
            .map_err(sm_err)?;
        let g = self.lock();
        Ok(Snapshot {
            meta: meta_of(&c),
            snapshot: g.no_image().map_err(sm_err)?,
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(
        Option<LogId<u64>>,
        StoredMembership<u64, openraft::BasicNode>,
    )> {
        let g = self.lock();
        Ok((g.applied, g.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<ApplyResult>>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut out = Vec::new();
        for entry in entries {
            // The lock is taken per try and released before a sleep: status and peer
            // requests never wait for it, and nothing is held across the await. This runs
            // in openraft's state machine task, so the sleep holds up no runtime thread.
            let r = self
                .disk
                .retry("applying to the tree", || self.lock().apply_one(&entry))
                .await
                .map_err(|e| {
                    StorageError::from(StorageIOError::apply(entry.log_id, AnyError::new(&e)))
                })?;
            out.push(r);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<SnapshotFile>> {
        let g = self.lock();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(incoming_path(&g.data_dir))
            .map_err(sm_err)?;
        Ok(Box::new(
            SnapshotFile::receiving(f, self.disk.clone()).map_err(sm_err)?,
        ))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, openraft::BasicNode>,
        snapshot: Box<SnapshotFile>,
    ) -> StorageResult<()> {
        // The unpack below blocks this node's Raft core, heartbeats included; without the
        // pause its election timer would fire the moment it is done and depose the leader.
        let _pause = self.elections.get().map(Elections::pause);
        // openraft wrote the chunks through this handle; make them durable before reading
        // the image back by path.
        snapshot.sync_data().await.map_err(sm_err)?;
        drop(snapshot);
        let data_dir = {
            let g = self.lock();
            if let (Some(until), Some(last)) = (g.shared.export_until(), meta.last_log_id) {
                if last.index > until {
                    // Installing would move the export past its index. Refusing stops this
                    // member's Raft: the export cannot be made from this cluster's log.
                    return Err(sm_err(io::Error::other(format!(
                        "this export stops at index {until}, but the cluster can only send a \
                         snapshot at index {} (its log below that is compacted); choose a \
                         later --until-index",
                        last.index
                    ))));
                }
            }
            g.data_dir.clone()
        };
        let c = Checkpoint {
            applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
        };
        let image = incoming_path(&data_dir);
        let started = std::time::Instant::now();
        // A full disk is waited out like an apply: the old tree stays in place until the
        // new one is whole, so each try starts again from the received snapshot.
        self.disk
            .retry("installing a snapshot", || {
                let _g = self.lock();
                snapshot::build_new_tree(&data_dir, &image)
            })
            .await
            .map_err(sm_err)?;
        self.disk
            .retry("installing a snapshot", || {
                // One lock from the swap to the new state: nobody sees the new tree with
                // the old applied index.
                let mut g = self.lock();
                snapshot::install(&data_dir, &c, &mut g.ckpt_file)?;
                g.tree = TreeApplier::new(g.tree_dir.clone(), g.tree_limits);
                g.applied = c.applied;
                g.membership = c.membership.clone();
                g.snapshot = Some(c.clone());
                g.applied_tx
                    .send_replace(meta.last_log_id.map_or(0, |l| l.index));
                Ok(())
            })
            .await
            .map_err(sm_err)?;
        let _ = std::fs::remove_file(&image);
        tracing::info!(applied = ?c.applied, ms = started.elapsed().as_millis() as u64, "installed tree snapshot");
        let g = self.lock();
        if let Some(obs) = g.observer.get() {
            obs.reset();
        }
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        {
            let mut g = self.lock();
            let first_call = !g.startup_probe_answered;
            g.startup_probe_answered = true;
            let Some(c) = g.snapshot.clone() else {
                return Ok(None);
            };
            if first_call {
                return Ok(Some(Snapshot {
                    meta: meta_of(&c),
                    snapshot: g.no_image().map_err(sm_err)?,
                }));
            }
        }
        // A member needs the tree.
        self.current_image().map(Some).map_err(sm_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diskfull::DiskGauges;
    use crate::sync::tests::{wait_until, TempDir};
    use crate::test_tmpfs::Tmpfs;

    /// A batch that creates a file exclusively and then writes to it meets a full disk at
    /// the write, after the create took effect. The retry resumes at the write: the create
    /// reports 0, not the EEXIST a second create would give, and the data arrives once
    /// space is freed.
    #[test]
    fn a_full_disk_mid_batch_resumes_at_the_failed_op() {
        let tmp = TempDir::new("sm-full");
        let t = Tmpfs::mount(tmp.path(), "2m");
        std::fs::create_dir_all(t.path().join("tree")).unwrap();
        let gauges = Arc::new(DiskGauges::default());
        let disk = DiskFullPolicy::patient(&gauges);
        let (sm, applied) = StateMachine::open(
            t.path().into(),
            StateMachine::TEST_TREE_LIMITS,
            None,
            Arc::default(),
            disk,
        )
        .unwrap();
        // Both checkpoint slots get their pages now, so the checkpoint before the create
        // needs no new space.
        sm.checkpoint_now().unwrap();
        sm.checkpoint_now().unwrap();
        let entry = openraft::Entry::<TypeConfig> {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), 1),
            payload: EntryPayload::Normal(Batch {
                origin: 1,
                seq: 1,
                ops: vec![
                    Op::Create {
                        path: "a".into(),
                        mode: 0o644,
                        excl: true,
                    },
                    Op::Write {
                        path: "a".into(),
                        offset: 0,
                        data: vec![7; 256 << 10].into(),
                    },
                ],
            }),
        };
        let filler = t.fill("filler");
        let mut applier = sm.clone();
        let applying = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(applier.apply([entry]))
                .map_err(|e| e.to_string())
        });
        wait_until("the apply waits for space", || {
            gauges.waiting.load(Ordering::Relaxed) == 1
        });
        assert!(t.path().join("tree/a").exists(), "the create took effect");
        assert_eq!(*applied.borrow(), 0, "the entry is not applied yet");
        std::fs::remove_file(filler).unwrap();
        let out = applying.join().unwrap().unwrap();
        assert_eq!(out, vec![ApplyResult { errnos: vec![0, 0] }]);
        assert_eq!(*applied.borrow(), 1);
        assert_eq!(gauges.waiting.load(Ordering::Relaxed), 0);
        let data = std::fs::read(t.path().join("tree/a")).unwrap();
        assert!(data.len() == 256 << 10 && data.iter().all(|&b| b == 7));
    }

    /// A tree image whose transfer ends before reading it (its member is unreachable, and
    /// openraft asks again every 500 ms) stops being built: the walk gives up, its file
    /// goes and the lock is free again. One that is read is built to the end.
    #[test]
    fn an_image_nobody_reads_stops_being_built() {
        let tmp = TempDir::new("sm-abandon");
        std::fs::create_dir_all(tmp.path().join("tree")).unwrap();
        // Far more than the walk's check interval (1 MiB); sparse, so it costs no disk.
        let big = std::fs::File::create(tmp.path().join("tree/big")).unwrap();
        big.set_len(256 << 20).unwrap();
        let (sm, _) = StateMachine::open(
            tmp.path().into(),
            StateMachine::TEST_TREE_LIMITS,
            None,
            Arc::default(),
            DiskFullPolicy::default(),
        )
        .unwrap();
        let image = tmp.path().join("snapshots/tree-0.img");
        let snapshot = sm.current_image().unwrap();
        assert!(image.exists());
        drop(snapshot);
        wait_until("the image nobody reads to be given up", || {
            !image.exists() && sm.lock().image.is_none()
        });
        // A transfer that read part of its image and failed leaves it to be finished.
        let rt = tokio::runtime::Runtime::new().unwrap();
        let mut data = sm.current_image().unwrap().snapshot;
        let mut first = vec![0u8; 1 << 20];
        rt.block_on(tokio::io::AsyncReadExt::read_exact(&mut *data, &mut first))
            .unwrap();
        drop(data);
        wait_until("the partly read image to be finished", || {
            sm.lock().image.as_ref().is_some_and(|(_, _, progress, _)| {
                progress.load(Ordering::Acquire) == snapshot::IMAGE_DONE
            })
        });
        let snapshot = sm.current_image().unwrap();
        let mut data = snapshot.snapshot;
        let read = rt
            .block_on(tokio::io::copy(&mut *data, &mut tokio::io::sink()))
            .unwrap();
        assert!(read > 256 << 20, "the whole image was read: {read} bytes");
        let g = sm.lock();
        let (_, path, progress, len) = g.image.as_ref().expect("the image is kept");
        assert_eq!(progress.load(Ordering::Acquire), snapshot::IMAGE_DONE);
        assert_eq!((read, path.exists()), (*len, true));
    }
}
