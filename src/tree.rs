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

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::op::{Op, Timespec};
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

/// Applies ops to the tree and tracks what is not yet durable.
pub struct TreeApplier {
    root: PathBuf,
    open_files_max: usize,
    files: HashMap<String, File>,
    dirty_files: HashSet<String>,
    dirty_dirs: HashSet<String>,
}

impl TreeApplier {
    pub fn new(root: PathBuf, open_files_max: usize) -> TreeApplier {
        TreeApplier {
            root,
            open_files_max,
            files: HashMap::new(),
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
        if !self.files.contains_key(rel) {
            if self.files.len() >= self.open_files_max {
                // Evict one; a dirty file is synced first so the checkpoint stays honest.
                let victim = self.files.keys().next().cloned().expect("cache is full");
                let f = self.files.remove(&victim).expect("key just read");
                if self.dirty_files.contains(&victim) {
                    fdatasync(&f).map_err(|e| sync_failed(&victim, e))?;
                    self.dirty_files.remove(&victim);
                }
            }
            let f = OpenOptions::new().write(true).open(self.abs(rel))?;
            self.files.insert(rel.to_string(), f);
        }
        Ok(&self.files[rel])
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
            | Op::Symlink { path, .. } => dirty(path),
            _ => {}
        }
    }

    fn apply_inner(&mut self, op: &Op) -> io::Result<()> {
        match op {
            Op::Write { path, offset, data } => {
                self.file(path)?.write_all_at(data, *offset)?;
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
            Op::Create { path, mode, excl } => {
                let mut o = OpenOptions::new();
                o.write(true).mode(*mode);
                if *excl {
                    o.create_new(true);
                } else {
                    o.create(true);
                }
                o.open(self.abs(path)).map(drop)
            }
            Op::Mkdir { path, mode } => {
                let c = cstr(&self.abs(path))?;
                // SAFETY: valid path.
                check(unsafe { libc::mkdir(c.as_ptr(), *mode) })
            }
            Op::Unlink { path } => std::fs::remove_file(self.abs(path)),
            Op::Rmdir { path } => std::fs::remove_dir(self.abs(path)),
            Op::Rename { from, to, flags } => {
                let (a, b) = (cstr(&self.abs(from))?, cstr(&self.abs(to))?);
                // SAFETY: valid paths; flags are 0 or RENAME_NOREPLACE (checked by the leader).
                check(unsafe {
                    libc::renameat2(
                        libc::AT_FDCWD,
                        a.as_ptr(),
                        libc::AT_FDCWD,
                        b.as_ptr(),
                        *flags,
                    )
                })
            }
            Op::Link { from, to } => std::fs::hard_link(self.abs(from), self.abs(to)),
            Op::Symlink { target, path } => std::os::unix::fs::symlink(target, self.abs(path)),
            // The state machine records the digest; the tree itself does not change.
            Op::Digest => Ok(()),
        }
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
                fdatasync(f).map_err(|e| sync_failed(&rel, e))?;
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
        let mut a = TreeApplier::new(t.path().to_path_buf(), 4);
        let w = |p: &str, off, d: &[u8]| Op::Write {
            path: p.into(),
            offset: off,
            data: d.to_vec(),
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
        assert_eq!(std::fs::read(t.path().join("d/f")).unwrap(), b"\0\0\0abc");
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
        assert_eq!(std::fs::read(t.path().join("g")).unwrap(), b"\0\0\0a");
        a.sync().unwrap();
        assert!(a.dirty_files.is_empty() && a.dirty_dirs.is_empty());
    }
}
