//! `seguro-fs import PIER_LOG_DIR DATA_DIR`: bring an existing pier's `.urb/log` under
//! seguro-fs as the cluster's first committed state.
//!
//! The pier's log (every epoch, `data.mdb`, `image.bin`, `epoc.txt`/`vere.txt`, the
//! top-level env) is copied into a new data dir's `tree/` with its modes, owners and
//! mtimes; host-local names (`lock.mdb`) are left out, as LMDB makes them again. Each copy
//! is read back and compared by blake3 with what was read from the source, and the tree is
//! synced. Then the checkpoint records the tree as applied at log index 0, with the
//! cluster's membership: exactly what openraft's `initialize` would record, so the first
//! mount starts from the imported tree, purges the (empty) log up to index 0 and never
//! initialises again. In a cluster only one member is imported; the others start empty
//! and, since the leader holds no entry at or below index 0, catch up by a tree snapshot.
//!
//! The source is only read. The import refuses a pier whose LMDB env is open in a live
//! process (LMDB keeps a fcntl lock on `lock.mdb` while an env is open, which `F_GETLK`
//! sees from another process) and a data dir that is not new or empty.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{IsTerminal, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::Instant;

use openraft::{CommittedLeaderId, LogId, Membership, StoredMembership};

use crate::config::MountConfig;
use crate::datadir::{DataDir, IMPORT_PENDING};
use crate::replication::checkpoint::{Checkpoint, CheckpointFile};
use crate::replication::snapshot::hex;
use crate::replication::snapshot::tree_digest;
use crate::sync::{fdatasync, fsync_dir, write_file_durably};

/// Progress lines when stderr is not a terminal: one per this share of the bytes.
const PROGRESS_LINES: u64 = 10;

/// One thing to copy, in walk order (a directory before what it holds).
struct Item {
    rel: String,
    meta: fs::Metadata,
}

/// Import the pier log at `source` into the new data dir of `cfg` (its node id, cluster
/// and local names); returns the summary for the operator.
pub fn run(source: &Path, cfg: &MountConfig) -> Result<String, String> {
    // The data dir's own files are private, as the daemon makes them; the tree's get the
    // source's modes explicitly.
    // SAFETY: umask has no preconditions.
    unsafe { libc::umask(crate::daemon::PRIVATE_UMASK) };
    let shown = source.display();
    let src_meta = fs::metadata(source).map_err(|e| format!("{shown}: {e}"))?;
    if !src_meta.is_dir() {
        return Err(format!(
            "{shown} is not a directory (give the pier's .urb/log)"
        ));
    }
    let items = walk(source, &cfg.local_names)?;
    refuse_live_lmdb(source, &items, &cfg.local_names)?;
    let existed = refuse_used_data_dir(&cfg.data_dir)?;
    let data_dir = DataDir::open(&cfg.data_dir, cfg.node_id, &cfg.cluster_label())
        .map_err(|e| e.to_string())?;
    // Until the checkpoint is written, the tree is not a committed state: a mount would
    // take it for an empty node's and never send it to the other members. The marker
    // makes a mount refuse such a data dir, even after a crash of this command.
    let marker = data_dir.root.join(IMPORT_PENDING);
    write_file_durably(&marker, b"seguro-fs import in progress\n")
        .map_err(|e| format!("{}: {e}", marker.display()))?;
    match copy_and_commit(source, cfg, &data_dir, &src_meta, &items) {
        Ok(summary) => {
            fs::remove_file(&marker).map_err(|e| format!("{}: {e}", marker.display()))?;
            fsync_dir(&data_dir.root).map_err(|e| format!("{}: {e}", data_dir.root.display()))?;
            Ok(summary)
        }
        Err(why) => {
            let root = data_dir.root.clone();
            drop(data_dir);
            // The data dir was new or empty: nothing of anyone else's is in it.
            let cleaned = if existed {
                fs::read_dir(&root).and_then(|entries| {
                    entries.into_iter().try_for_each(|e| {
                        let p = e?.path();
                        if p.is_dir() && !p.is_symlink() {
                            fs::remove_dir_all(&p)
                        } else {
                            fs::remove_file(&p)
                        }
                    })
                })
            } else {
                fs::remove_dir_all(&root)
            };
            Err(match cleaned {
                Ok(()) => format!(
                    "{why}; the partly made data dir {} was emptied",
                    root.display()
                ),
                Err(e) => format!(
                    "{why}; emptying the partly made data dir {} failed ({e}): remove it \
                     before importing again (a mount refuses it meanwhile)",
                    root.display()
                ),
            })
        }
    }
}

/// Copy the pier into the tree, verify it and record it as applied at index 0; the
/// summary for the operator.
fn copy_and_commit(
    source: &Path,
    cfg: &MountConfig,
    data_dir: &DataDir,
    src_meta: &fs::Metadata,
    items: &[Item],
) -> Result<String, String> {
    let shown = source.display();
    let tree = data_dir.tree_dir();

    let total_bytes: u64 = items
        .iter()
        .filter(|i| i.meta.is_file())
        .map(|i| i.meta.len())
        .sum();
    let mut progress = Progress::new(total_bytes);
    let mut dirs = vec![(tree.clone(), src_meta.clone())];
    let mut files = 0u64;
    for item in items {
        let (from, to) = (source.join(&item.rel), tree.join(&item.rel));
        let m = &item.meta;
        let ft = m.file_type();
        if ft.is_dir() {
            fs::create_dir(&to).map_err(|e| format!("{}: {e}", to.display()))?;
            dirs.push((to, m.clone()));
        } else if ft.is_symlink() {
            let target = fs::read_link(&from).map_err(|e| format!("{}: {e}", from.display()))?;
            std::os::unix::fs::symlink(&target, &to)
                .map_err(|e| format!("{}: {e}", to.display()))?;
            set_owner(&to, m)?;
        } else {
            copy_file(&from, &to, m, &mut progress)?;
            files += 1;
        }
    }
    progress.done();
    // Directories last, deepest first: entries made inside would change their mtimes.
    for (dir, m) in dirs.iter().rev() {
        set_owner(dir, m)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(m.mode() & 0o7777))
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        set_mtime(dir, m)?;
        fsync_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    // A writer that started while we copied has changed what we read.
    refuse_live_lmdb(source, items, &cfg.local_names)?;

    let zero = LogId::new(CommittedLeaderId::new(0, 0), 0);
    let voters: BTreeSet<u64> = crate::replication::members(cfg).keys().copied().collect();
    let checkpoint = Checkpoint {
        applied: Some(zero),
        membership: StoredMembership::new(
            Some(zero),
            Membership::new(vec![voters], crate::replication::members(cfg)),
        ),
    };
    let (mut file, _) = CheckpointFile::open(&data_dir.root.join("applied"))
        .map_err(|e| format!("checkpoint: {e}"))?;
    file.write(&checkpoint)
        .map_err(|e| format!("checkpoint: {e}"))?;
    fsync_dir(&data_dir.root).map_err(|e| format!("{}: {e}", data_dir.root.display()))?;
    let digest = tree_digest(&tree).map_err(|e| format!("tree digest: {e}"))?;
    Ok(format!(
        "imported {files} files ({total_bytes} bytes) from {shown} into {}, each verified \
         with blake3; tree digest {}. {shown} was left as it was: move it aside, make an \
         empty directory in its place and mount over it (seguro-fs mount {} {shown})",
        data_dir.root.display(),
        hex(&digest),
        data_dir.root.display(),
    ))
}

/// Everything under `root` but host-local names, directories before their contents.
fn walk(root: &Path, local_names: &[String]) -> Result<Vec<Item>, String> {
    let mut out = Vec::new();
    let mut stack = vec![String::new()];
    while let Some(dir) = stack.pop() {
        let abs = root.join(&dir);
        let mut names: Vec<_> = fs::read_dir(&abs)
            .map_err(|e| format!("{}: {e}", abs.display()))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{}: {e}", abs.display()))?;
        names.sort();
        for name in names {
            let name = name.into_string().map_err(|n| {
                format!(
                    "{}: the name {n:?} is not UTF-8, which seguro-fs cannot hold",
                    abs.display()
                )
            })?;
            if local_names.contains(&name) {
                continue;
            }
            let rel = if dir.is_empty() {
                name
            } else {
                format!("{dir}/{name}")
            };
            let meta = fs::symlink_metadata(root.join(&rel))
                .map_err(|e| format!("{}: {e}", root.join(&rel).display()))?;
            let ft = meta.file_type();
            if !(ft.is_dir() || ft.is_file() || ft.is_symlink()) {
                return Err(format!(
                    "{}: not a file, directory or symlink; a pier's log holds none",
                    root.join(&rel).display()
                ));
            }
            if ft.is_dir() {
                stack.push(rel.clone());
            }
            out.push(Item { rel, meta });
        }
    }
    // Parents first: sorted paths put "a" before "a/b".
    out.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(out)
}

/// Refuse while any process holds an LMDB env of the pier open: LMDB keeps a fcntl lock on
/// byte 0 of `lock.mdb` (a write lock while it initialises, a read lock after), and a
/// running urbit would go on writing while we copy.
fn refuse_live_lmdb(source: &Path, items: &[Item], local_names: &[String]) -> Result<(), String> {
    let dirs = std::iter::once(source.to_path_buf()).chain(
        items
            .iter()
            .filter(|i| i.meta.is_dir())
            .map(|i| source.join(&i.rel)),
    );
    for dir in dirs {
        for name in local_names {
            let lock = dir.join(name);
            let Ok(f) = File::open(&lock) else { continue };
            // SAFETY: a zeroed flock is a valid starting value; every field used is set.
            let mut fl: libc::flock = unsafe { std::mem::zeroed() };
            fl.l_type = libc::F_WRLCK as libc::c_short;
            fl.l_whence = libc::SEEK_SET as libc::c_short;
            fl.l_start = 0;
            fl.l_len = 1;
            // SAFETY: F_GETLK on an fd we own, with a valid flock to fill in.
            if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETLK, &mut fl) } != 0 {
                return Err(format!(
                    "{}: {}",
                    lock.display(),
                    std::io::Error::last_os_error()
                ));
            }
            if fl.l_type != libc::F_UNLCK as libc::c_short {
                return Err(format!(
                    "{} is locked by process {}: an LMDB env of this pier is open (urbit is \
                     running?). Stop the ship (and anything reading its log), then import again",
                    lock.display(),
                    fl.l_pid
                ));
            }
        }
    }
    Ok(())
}

/// The data dir must not exist yet or be empty: an import is a new node's first state.
/// Returns whether it exists (empty).
fn refuse_used_data_dir(dir: &Path) -> Result<bool, String> {
    match fs::read_dir(dir).map(|mut entries| entries.next().is_some()) {
        Ok(true) => Err(format!(
            "data dir {} is not empty; import into a new or empty directory (an imported \
             pier becomes the first state of a new node)",
            dir.display()
        )),
        Ok(false) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(format!("data dir {}: {e}", dir.display())),
    }
}

/// Copy one file, hashing what is read; then read the copy back (after fdatasync) and
/// compare hashes, so what the tree holds is known to be what the source held.
fn copy_file(
    from: &Path,
    to: &Path,
    m: &fs::Metadata,
    progress: &mut Progress,
) -> Result<(), String> {
    fn err(p: &Path) -> impl Fn(std::io::Error) -> String + '_ {
        move |e| format!("{}: {e}", p.display())
    }
    let mut src = File::open(from).map_err(err(from))?;
    let mut dst = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .map_err(err(to))?;
    let mut buf = vec![0u8; crate::config::IMPORT_COPY_CHUNK_BYTES];
    let mut read_hash = blake3::Hasher::new();
    let mut copied = 0u64;
    loop {
        let n = src.read(&mut buf).map_err(err(from))?;
        if n == 0 {
            break;
        }
        read_hash.update(&buf[..n]);
        dst.write_all(&buf[..n]).map_err(err(to))?;
        copied += n as u64;
        progress.add(n as u64);
    }
    if copied != m.len() {
        return Err(format!(
            "{} changed size while it was copied ({} bytes, now {copied}): is urbit running?",
            from.display(),
            m.len()
        ));
    }
    set_owner(to, m)?;
    dst.set_permissions(fs::Permissions::from_mode(m.mode() & 0o7777))
        .map_err(err(to))?;
    fdatasync(&dst).map_err(err(to))?;
    drop(dst);
    set_mtime(to, m)?;
    let mut back = blake3::Hasher::new();
    let mut copy = File::open(to).map_err(err(to))?;
    loop {
        let n = copy.read(&mut buf).map_err(err(to))?;
        if n == 0 {
            break;
        }
        back.update(&buf[..n]);
    }
    if back.finalize() != read_hash.finalize() {
        return Err(format!(
            "{}: the copy differs from {} (blake3); remove the data dir and import again",
            to.display(),
            from.display()
        ));
    }
    Ok(())
}

/// The source's owner, when this process may give files away (root).
fn set_owner(p: &Path, m: &fs::Metadata) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    std::os::unix::fs::lchown(p, Some(m.uid()), Some(m.gid()))
        .map_err(|e| format!("{}: {e}", p.display()))
}

fn set_mtime(p: &Path, m: &fs::Metadata) -> Result<(), String> {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("{}: NUL in path", p.display()))?;
    let ts = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: m.mtime(),
            tv_nsec: m.mtime_nsec(),
        },
    ];
    // SAFETY: a valid path and a two-element timespec array.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        return Err(format!(
            "{}: {}",
            p.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Copy progress on stderr: one line rewritten in place on a terminal, a plain line per
/// tenth of the bytes otherwise (a log file, a pipe).
struct Progress {
    total: u64,
    done: u64,
    tty: bool,
    next_line: u64,
    last_line: Option<u64>,
    started: Instant,
}

impl Progress {
    fn new(total: u64) -> Progress {
        Progress {
            total,
            done: 0,
            tty: std::io::stderr().is_terminal(),
            next_line: 0,
            last_line: None,
            started: Instant::now(),
        }
    }

    fn add(&mut self, n: u64) {
        self.done += n;
        let pct = self.done * 100 / self.total.max(1);
        if self.tty {
            let rate = self.done as f64 / 1e6 / self.started.elapsed().as_secs_f64().max(1e-3);
            eprint!(
                "\rimport: {pct:>4}% {:>8} / {} MiB  {rate:.0} MB/s ",
                self.done >> 20,
                self.total >> 20
            );
        } else if pct >= self.next_line {
            self.line(pct);
            self.next_line = pct + 100 / PROGRESS_LINES;
        }
    }

    fn line(&mut self, pct: u64) {
        eprintln!("import: {pct}% ({} of {} bytes)", self.done, self.total);
        self.last_line = Some(pct);
    }

    /// End the progress display; a log always gets its 100% line.
    fn done(&mut self) {
        if self.tty {
            eprintln!();
        } else if self.last_line != Some(100) {
            self.line(100);
        }
    }
}
