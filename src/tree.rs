//! Applying replicated ops to `DATA_DIR/tree/`, the committed file tree, with plain
//! syscalls; and making what was applied durable at a checkpoint.
//!
//! Error policy: an op's outcome that follows from the tree's contents (ENOENT, EEXIST,
//! ENOTEMPTY, EISDIR, …) is the op's *result*, identical on every replica because their
//! trees are identical, and goes back to the proposer. A failure that is about this host
//! (EIO, ENOSPC, EDQUOT, EROFS) is an `Err`, never an op result: reporting it as one would
//! make this replica diverge. ENOSPC and EDQUOT keep their errno, so the state machine can
//! retry the op once space is freed (every op here is one syscall with no effect when it
//! fails, or a pwrite that a retry simply repeats). A failed fdatasync is never retried:
//! after it the page cache may hold clean pages that never reached the disk, so it is
//! reported without an errno, which makes it fatal (restart replays from the checkpoint).
//!
//! Modes and owners: the daemon runs with umask 077 (its own files are private), so every
//! new name is made in `<tree>.staging/` first, given exactly the mode its caller asked for
//! and the caller's uid/gid (when the daemon runs as root: nobody else may give files
//! away), and only then renamed into the tree. A crash leaves no name or the finished one,
//! never one with the wrong mode or owner that a replay would then keep (EEXIST).

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::op::{NodeKind, Op, Owner, Timespec};
use crate::replication::direct_write::DirectWrites;
use crate::sync::{fdatasync, fsync_dir};

/// The parent of a relative path ("" for top-level names).
pub fn parent_of(path: &str) -> &str {
    path.rfind('/').map_or("", |i| &path[..i])
}

fn is_host_failure(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EIO) | Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EROFS) | None
    )
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// renameat2(2) of `from` to `to` with `flags`.
fn rename(from: &Path, to: &Path, flags: libc::c_uint) -> io::Result<()> {
    let (a, b) = (cstr(from)?, cstr(to)?);
    // SAFETY: two valid NUL-terminated paths.
    check(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    })
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn timespec(t: Option<Timespec>) -> libc::timespec {
    match t {
        Some(t) => libc::timespec {
            tv_sec: t.sec,
            tv_nsec: t.nsec as i64,
        },
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
    }
}

/// How a [`TreeApplier`] uses files.
#[derive(Debug, Clone, Copy)]
pub struct TreeLimits {
    /// Files kept open between ops (`apply_open_files_max`).
    pub open_files_max: usize,
    /// Writes of at least this many bytes have their page-aligned middle written with
    /// O_DIRECT (`direct_write_bytes_min`; 0 never). The checkpoint's fdatasync covers
    /// them like the rest.
    pub direct_bytes_min: u64,
}

/// A file of the tree kept open between ops.
struct OpenFile {
    file: File,
    /// Its handle for direct writes: opened at its first large write (`None` until
    /// then; `Some(None)` where its file system takes no direct I/O).
    direct: Option<Option<File>>,
}

/// Applies ops to the tree and tracks what is not yet durable.
pub struct TreeApplier {
    root: PathBuf,
    /// Where new names are made before they are renamed into place (same file system).
    staging: PathBuf,
    open_files_max: usize,
    files: HashMap<String, OpenFile>,
    direct: Option<DirectWrites>,
    dirty_files: HashSet<String>,
    dirty_dirs: HashSet<String>,
}

impl TreeApplier {
    pub fn new(root: PathBuf, limits: TreeLimits) -> TreeApplier {
        let mut staging = root.clone().into_os_string();
        staging.push(".staging");
        TreeApplier {
            root,
            staging: staging.into(),
            open_files_max: limits.open_files_max,
            files: HashMap::new(),
            direct: DirectWrites::new(limits.direct_bytes_min),
            dirty_files: HashSet::new(),
            dirty_dirs: HashSet::new(),
        }
    }

    pub fn abs(&self, rel: &str) -> PathBuf {
        if rel.is_empty() {
            self.root.clone()
        } else {
            self.root.join(rel)
        }
    }

    fn file(&mut self, rel: &str) -> io::Result<&File> {
        Ok(&self.open_file(rel)?.file)
    }

    fn open_file(&mut self, rel: &str) -> io::Result<&mut OpenFile> {
        if !self.files.contains_key(rel) {
            if self.files.len() >= self.open_files_max {
                // Evict one; a dirty file is synced first so the checkpoint stays honest.
                let victim = self.files.keys().next().cloned().expect("cache is full");
                let f = self.files.remove(&victim).expect("key just read");
                if self.dirty_files.contains(&victim) {
                    fdatasync(&f.file).map_err(|e| sync_failed(&victim, e))?;
                    self.dirty_files.remove(&victim);
                }
            }
            let file = OpenOptions::new().write(true).open(self.abs(rel))?;
            self.files
                .insert(rel.to_string(), OpenFile { file, direct: None });
        }
        Ok(self.files.get_mut(rel).expect("inserted above"))
    }

    /// pwrite `data` at `offset` into `path`: a large write's page-aligned middle with
    /// O_DIRECT, where the file system takes it.
    fn write(&mut self, path: &str, offset: u64, data: &[u8]) -> io::Result<()> {
        let wants = self
            .direct
            .as_ref()
            .is_some_and(|d| d.wants(data.len() as u64));
        if !wants {
            return self.file(path)?.write_all_at(data, offset);
        }
        let abs = self.abs(path);
        let mut direct = self.direct.take().expect("wants above");
        let result = (|| {
            let f = self.open_file(path)?;
            let handle = f.direct.get_or_insert_with(|| direct.open(&abs, &f.file));
            match handle {
                Some(d) => direct.write_at(&f.file, d, data, offset),
                None => f.file.write_all_at(data, offset),
            }
        })();
        self.direct = Some(direct);
        result
    }

    /// Apply one op. `Ok(errno)` is the op's deterministic result (0 = success);
    /// `Err` is a host failure that must stop this replica.
    pub fn apply(&mut self, op: &Op) -> io::Result<i32> {
        let result = self.apply_inner(op);
        match result {
            Ok(()) => {
                if op.is_namespace() {
                    // Names moved: cached handles may now point at other paths.
                    self.files.clear();
                    self.mark_dirs_dirty(op);
                }
                Ok(0)
            }
            Err(e) if is_host_failure(&e) => Err(e),
            Err(e) => Ok(e.raw_os_error().unwrap_or(libc::EIO)),
        }
    }

    fn mark_dirs_dirty(&mut self, op: &Op) {
        let mut dirty = |p: &str| {
            self.dirty_dirs.insert(parent_of(p).to_string());
        };
        match op {
            Op::Rename { from, to, .. } | Op::Link { from, to } => {
                dirty(from);
                dirty(to);
            }
            Op::Create { path, .. }
            | Op::Mkdir { path, .. }
            | Op::Unlink { path }
            | Op::Rmdir { path }
            | Op::Symlink { path, .. }
            | Op::Make { path, .. } => dirty(path),
            _ => {}
        }
    }

    fn apply_inner(&mut self, op: &Op) -> io::Result<()> {
        match op {
            Op::Write { path, offset, data } => {
                self.write(path, *offset, data)?;
                self.dirty_files.insert(path.clone());
                Ok(())
            }
            Op::Truncate { path, size } => {
                self.file(path)?.set_len(*size)?;
                self.dirty_files.insert(path.clone());
                Ok(())
            }
            Op::SetAttr {
                path,
                mode,
                uid,
                gid,
                atime,
                mtime,
            } => {
                let c = cstr(&self.abs(path))?;
                if let Some(mode) = mode {
                    // SAFETY: c is a valid NUL-terminated path.
                    check(unsafe { libc::chmod(c.as_ptr(), *mode & 0o7777) })?;
                }
                if uid.is_some() || gid.is_some() {
                    let u = uid.unwrap_or(u32::MAX);
                    let g = gid.unwrap_or(u32::MAX);
                    // SAFETY: as above; -1 (u32::MAX) leaves an id unchanged.
                    check(unsafe { libc::lchown(c.as_ptr(), u, g) })?;
                }
                if atime.is_some() || mtime.is_some() {
                    let ts = [timespec(*atime), timespec(*mtime)];
                    // SAFETY: as above, with a two-element timespec array.
                    check(unsafe {
                        libc::utimensat(
                            libc::AT_FDCWD,
                            c.as_ptr(),
                            ts.as_ptr(),
                            libc::AT_SYMLINK_NOFOLLOW,
                        )
                    })?;
                }
                self.dirty_dirs.insert(parent_of(path).to_string());
                Ok(())
            }
            Op::Create { path, mode, excl } => self.make(
                path,
                &NodeKind::File {
                    mode: *mode,
                    excl: *excl,
                },
                None,
            ),
            Op::Mkdir { path, mode } => self.make(path, &NodeKind::Dir { mode: *mode }, None),
            Op::Make { path, kind, owner } => self.make(path, kind, Some(*owner)),
            Op::Unlink { path } => std::fs::remove_file(self.abs(path)),
            Op::Rmdir { path } => std::fs::remove_dir(self.abs(path)),
            // flags are 0 or RENAME_NOREPLACE (checked by the leader).
            Op::Rename { from, to, flags } => rename(&self.abs(from), &self.abs(to), *flags),
            Op::Link { from, to } => std::fs::hard_link(self.abs(from), self.abs(to)),
            Op::Symlink { target, path } => self.make(
                path,
                &NodeKind::Symlink {
                    target: target.clone(),
                },
                None,
            ),
            // The state machine records the digest; the tree itself does not change.
            Op::Digest => Ok(()),
        }
    }

    /// Make a new name at `path`: built in the staging directory with its final mode and
    /// owner, then renamed into place without replacing anything. `owner: None` (ops of
    /// earlier releases) leaves the daemon's ids, as those releases did.
    fn make(&mut self, path: &str, kind: &NodeKind, owner: Option<Owner>) -> io::Result<()> {
        let target = self.abs(path);
        if let NodeKind::File { excl: false, .. } = kind {
            // O_CREAT without O_EXCL opens an existing file as it is. O_NONBLOCK: a FIFO
            // there must answer (ENXIO), not block the state machine for a reader.
            match OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&target)
            {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        let parent = std::fs::metadata(self.abs(parent_of(path)))?;
        if !parent.is_dir() {
            return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
        }
        // A set-group-ID directory gives new names its group, and new directories the
        // bit itself, as a local file system does.
        let sgid = parent.mode() & libc::S_ISGID != 0;
        let (uid, mut gid) = owner.map_or((u32::MAX, u32::MAX), |o| (o.uid, o.gid));
        if sgid {
            gid = parent.gid();
        }
        let tmp = self.staging_entry()?;
        let made = make_at(&tmp, kind, sgid, uid, gid).and_then(|()| {
            // NOREPLACE: an existing name is EEXIST, as for create.
            rename(&tmp, &target, libc::RENAME_NOREPLACE)
        });
        if made.is_err() {
            remove_any(&tmp)?;
        }
        made
    }

    /// The staging name, free: the directory is made on first use (private), and what a
    /// crash left there is removed.
    fn staging_entry(&self) -> io::Result<PathBuf> {
        match std::fs::DirBuilder::new().mode(0o700).create(&self.staging) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let tmp = self.staging.join("new");
        remove_any(&tmp)?;
        Ok(tmp)
    }

    /// Apply an op to a host-local file (under `local/`): the same syscalls, every error
    /// returned as is.
    pub fn apply_local(&mut self, op: &Op) -> io::Result<()> {
        self.apply_inner(op)
    }

    /// Make everything applied so far durable: fdatasync written files, fsync directories
    /// whose entries changed. Called before a checkpoint records the applied id.
    pub fn sync(&mut self) -> io::Result<()> {
        // Each name leaves its set only once synced: a checkpoint that failed part-way
        // (then retried) must still sync what it did not reach.
        let files: Vec<String> = self.dirty_files.iter().cloned().collect();
        for rel in files {
            if let Some(f) = self.files.get(&rel) {
                fdatasync(&f.file).map_err(|e| sync_failed(&rel, e))?;
            } else {
                // Closed since it was written (namespace op cleared the cache): reopen.
                match File::open(self.abs(&rel)) {
                    Ok(f) => fdatasync(&f).map_err(|e| sync_failed(&rel, e))?,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
            self.dirty_files.remove(&rel);
        }
        let dirs: Vec<String> = self.dirty_dirs.iter().cloned().collect();
        for rel in dirs {
            match fsync_dir(&self.abs(&rel)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(sync_failed(&rel, e)),
            }
            self.dirty_dirs.remove(&rel);
        }
        Ok(())
    }
}

fn am_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Create the node `kind` at `p` with its exact mode and, when this daemon may give files
/// away (it runs as root), owner `uid`:`gid` (u32::MAX keeps an id).
fn make_at(p: &Path, kind: &NodeKind, sgid: bool, uid: u32, gid: u32) -> io::Result<()> {
    let c = cstr(p)?;
    let mode = match kind {
        NodeKind::File { mode, .. } => {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(p)?;
            Some(*mode & 0o7777)
        }
        NodeKind::Dir { mode } => {
            // SAFETY: valid path.
            check(unsafe { libc::mkdir(c.as_ptr(), 0o700) })?;
            Some(*mode & 0o7777 | if sgid { libc::S_ISGID } else { 0 })
        }
        NodeKind::Symlink { target } => {
            std::os::unix::fs::symlink(target, p)?;
            None
        }
        NodeKind::Special { mode, rdev } => {
            let kind = *mode & libc::S_IFMT;
            if !matches!(
                kind,
                libc::S_IFIFO | libc::S_IFSOCK | libc::S_IFCHR | libc::S_IFBLK
            ) {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            // SAFETY: valid path; the type is one mknod makes.
            check(unsafe { libc::mknod(c.as_ptr(), kind | 0o600, *rdev as libc::dev_t) })?;
            Some(*mode & 0o7777)
        }
    };
    if am_root() && (uid != u32::MAX || gid != u32::MAX) {
        // SAFETY: valid path. Before the chmod: a chown clears set-id bits.
        check(unsafe { libc::lchown(c.as_ptr(), uid, gid) })?;
    }
    if let Some(mode) = mode {
        // SAFETY: valid path (never a symlink here).
        check(unsafe { libc::chmod(c.as_ptr(), mode) })?;
    }
    Ok(())
}

/// Remove whatever `p` is, if anything.
fn remove_any(p: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// A failed fsync of the tree, without its errno: not a full disk to wait out, since a
/// retry could succeed without writing the pages this one failed to write.
fn sync_failed(rel: &str, e: io::Error) -> io::Error {
    io::Error::other(format!(
        "fsync of tree/{rel} failed: {e}; what it covered may not be on disk, so the node \
         stops (a restart replays the log from the last checkpoint)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::tests::TempDir;

    #[test]
    fn ops_apply_and_report_errnos() {
        let t = TempDir::new("tree");
        let root = t.path().join("tree");
        std::fs::create_dir(&root).unwrap();
        let mut a = TreeApplier::new(
            root.clone(),
            TreeLimits {
                open_files_max: 4,
                direct_bytes_min: 256 << 10,
            },
        );
        let w = |p: &str, off, d: &[u8]| Op::Write {
            path: p.into(),
            offset: off,
            data: d.to_vec().into(),
        };
        assert_eq!(
            a.apply(&Op::Mkdir {
                path: "d".into(),
                mode: 0o755
            })
            .unwrap(),
            0
        );
        assert_eq!(
            a.apply(&Op::Mkdir {
                path: "d".into(),
                mode: 0o755
            })
            .unwrap(),
            libc::EEXIST
        );
        assert_eq!(
            a.apply(&Op::Create {
                path: "d/f".into(),
                mode: 0o644,
                excl: true
            })
            .unwrap(),
            0
        );
        assert_eq!(a.apply(&w("d/f", 3, b"abc")).unwrap(), 0);
        assert_eq!(std::fs::read(root.join("d/f")).unwrap(), b"\0\0\0abc");
        assert_eq!(a.apply(&w("nope", 0, b"x")).unwrap(), libc::ENOENT);
        assert_eq!(
            a.apply(&Op::Rmdir { path: "d".into() }).unwrap(),
            libc::ENOTEMPTY
        );
        assert_eq!(
            a.apply(&Op::Rename {
                from: "d/f".into(),
                to: "g".into(),
                flags: 0
            })
            .unwrap(),
            0
        );
        // Replay of an applied rename is a harmless ENOENT, not a second move.
        assert_eq!(
            a.apply(&Op::Rename {
                from: "d/f".into(),
                to: "g".into(),
                flags: 0
            })
            .unwrap(),
            libc::ENOENT
        );
        assert_eq!(
            a.apply(&Op::Truncate {
                path: "g".into(),
                size: 4
            })
            .unwrap(),
            0
        );
        assert_eq!(std::fs::read(root.join("g")).unwrap(), b"\0\0\0a");
        a.sync().unwrap();
        assert!(a.dirty_files.is_empty() && a.dirty_dirs.is_empty());
    }

    /// New names get exactly the mode asked for whatever the umask, the creator's ids
    /// (when run as root), a set-group-ID parent's group; the staging dir is left empty.
    #[test]
    fn new_names_get_exact_modes_and_their_creators_ids() {
        let t = TempDir::new("tree-owner");
        let root = t.path().join("tree");
        std::fs::create_dir(&root).unwrap();
        let mut a = TreeApplier::new(
            root.clone(),
            TreeLimits {
                open_files_max: 4,
                direct_bytes_min: 256 << 10,
            },
        );
        // SAFETY: umask has no preconditions; restored below.
        let old = unsafe { libc::umask(0o077) };
        let owner = Owner {
            uid: 1234,
            gid: 5678,
        };
        let make = |path: &str, kind| Op::Make {
            path: path.into(),
            kind,
            owner,
        };
        let ops = [
            make(
                "f",
                NodeKind::File {
                    mode: 0o664,
                    excl: true,
                },
            ),
            make("d", NodeKind::Dir { mode: 0o2775 }),
            make("l", NodeKind::Symlink { target: "f".into() }),
            make(
                "p",
                NodeKind::Special {
                    mode: libc::S_IFIFO | 0o640,
                    rdev: 0,
                },
            ),
        ];
        for op in &ops {
            assert_eq!(a.apply(op).unwrap(), 0, "{op:?}");
        }
        // Exclusive create of an existing name, and one in a missing directory.
        assert_eq!(a.apply(&ops[0]).unwrap(), libc::EEXIST);
        assert_eq!(
            a.apply(&make("nope/f", NodeKind::Dir { mode: 0o755 }))
                .unwrap(),
            libc::ENOENT
        );
        // Inside the set-group-ID directory: its group, and the bit for a subdirectory.
        assert_eq!(
            a.apply(&make("d/sub", NodeKind::Dir { mode: 0o750 }))
                .unwrap(),
            0
        );
        unsafe { libc::umask(old) };
        let meta = |p: &str| std::fs::symlink_metadata(root.join(p)).unwrap();
        assert_eq!(meta("f").mode() & 0o7777, 0o664);
        assert_eq!(meta("d").mode() & 0o7777, 0o2775);
        assert_eq!(meta("p").mode(), libc::S_IFIFO | 0o640);
        assert_eq!(meta("d/sub").mode() & 0o7777, 0o2750);
        if am_root() {
            for p in ["f", "d", "l", "p"] {
                assert_eq!((meta(p).uid(), meta(p).gid()), (1234, 5678), "{p}");
            }
            assert_eq!((meta("d/sub").uid(), meta("d/sub").gid()), (1234, 5678));
        }
        let staged: Vec<_> = std::fs::read_dir(t.path().join("tree.staging"))
            .unwrap()
            .collect();
        assert!(staged.is_empty(), "staging left {staged:?}");
    }

    /// A large write's page-aligned middle goes to the disk directly, not through the
    /// page cache, and the file reads back as every write left it, small writes over
    /// and around the large one included; with `direct_bytes_min` 0 the middle is cached.
    #[test]
    fn a_large_writes_middle_bypasses_the_page_cache_and_reads_back() {
        use crate::replication::direct_write::resident_pages;
        let mib = 1usize << 20;
        for (direct_bytes_min, direct) in [(256 << 10, true), (0, false)] {
            let t = TempDir::new("tree-direct");
            let root = t.path().join("tree");
            std::fs::create_dir(&root).unwrap();
            std::fs::write(root.join("f"), b"").unwrap();
            let mut a = TreeApplier::new(
                root.clone(),
                TreeLimits {
                    open_files_max: 4,
                    direct_bytes_min,
                },
            );
            let mut want = vec![0u8; 3 * mib];
            let mut w = |offset: usize, data: Vec<u8>| {
                want[offset..offset + data.len()].copy_from_slice(&data);
                let op = Op::Write {
                    path: "f".into(),
                    offset: offset as u64,
                    data: data.into(),
                };
                assert_eq!(a.apply(&op).unwrap(), 0);
            };
            w(100, vec![1; mib]);
            w(mib + 100, vec![2; mib + 5000]);
            // Small writes across the first one's tail and into the second one's middle.
            w(mib - 50, vec![3; 300]);
            w(mib + 8192, vec![4; 10]);
            w(3 * mib - 7, vec![5; 7]);
            let resident = resident_pages(&root.join("f"));
            // The first write's whole pages, but the last (the small write at mib - 50
            // went into it through the page cache).
            let middle = &resident[1..mib / 4096 - 1];
            let cached = middle.iter().filter(|r| **r).count();
            if direct {
                assert_eq!(cached, 0, "pages of a direct middle in the page cache");
            } else {
                assert_eq!(cached, middle.len(), "a buffered write's pages not cached");
            }
            a.sync().unwrap();
            assert!(std::fs::read(root.join("f")).unwrap() == want);
        }
    }
}
