//! The node's data directory: its layout, its exclusive lock and its identity file.
//!
//! ```text
//! DATA_DIR/
//!   identity      format version, node id, cluster label; refuses a dir made for another
//!                 node or cluster (`rekey` rewrites the label when the cluster key changes)
//!   lock          flock'd while a daemon owns the dir
//!   raft/         log segments, vote, committed (log_store.rs)
//!   applied       the applied-index checkpoint (checkpoint.rs)
//!   tree/         the committed file tree, a plain directory
//!   tree.staging/ where new names are made before they enter tree/ (tree.rs)
//!   import.pending while `seguro-fs import` fills a new data dir (a mount refuses it)
//!   local/        per-host files that are never replicated (lock.mdb)
//!   seguro-fs.log the default log of a `--background` daemon (and .log.1, the one before)
//! ```
//!
//! Everything here but the tree's and host-local files is the daemon's own and private to
//! its user (0600 files, 0700 directories); a data dir made by an earlier release with
//! looser modes is tightened when it is opened ([`tighten`]).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::sync::{fsync_dir, write_file_durably};

const FORMAT: &str = "seguro-fs data dir v1";

/// Present while `seguro-fs import` fills a new data dir: its tree is not a committed
/// state until the import's checkpoint is written, so a mount refuses it.
pub const IMPORT_PENDING: &str = "import.pending";

/// The default log file of a `--background` daemon, which is opened before the data dir
/// is: it (and its rotated `.1`) does not make a new data dir count as someone else's.
pub const LOG_FILE_NAME: &str = "seguro-fs.log";

fn is_log_file(name: &std::ffi::OsStr) -> bool {
    let name = name.as_encoded_bytes();
    name == LOG_FILE_NAME.as_bytes() || name.strip_suffix(b".1") == Some(LOG_FILE_NAME.as_bytes())
}

/// Why a data dir cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("data dir {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "data dir {path} is already in use by another seguro-fs process (pid {pid}); \
         unmount that mount first or choose another data dir"
    )]
    InUse { path: PathBuf, pid: String },
    #[error(
        "data dir {path} belongs to {found}, not to this node ({expected}); \
         use the data dir made for this node, or a new empty one"
    )]
    Foreign {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error(
        "data dir {path} was made with another cluster key ({found}, this key is \
         {expected}); if the cluster's key was replaced, stop every member and run \
         `seguro-fs rekey {path} --cluster-key-file NEW_KEY` on each (docs/OPERATIONS.md, \
         \"Rotating the cluster key\"); otherwise use the key file of this data dir's cluster"
    )]
    OtherKey {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("data dir {path} is not a seguro-fs data dir (it is non-empty and has no identity file); choose an empty or new directory")]
    NotOurs { path: PathBuf },
    #[error(
        "data dir {path} has a path of {bytes} bytes, longer than {max}: the tree's paths \
         must fit PATH_MAX below it on every member; choose a shorter path"
    )]
    PathTooLong {
        path: PathBuf,
        bytes: usize,
        max: usize,
    },
    #[error(
        "data dir {path}: an import into it did not finish (it holds {IMPORT_PENDING}); \
         remove the data dir and run seguro-fs import again"
    )]
    ImportUnfinished { path: PathBuf },
    #[error("data dir {path} has no identity file: it is not a seguro-fs data dir")]
    NoIdentity { path: PathBuf },
    #[error("data dir {path} belongs to a standalone node, which has no cluster key to replace")]
    Standalone { path: PathBuf },
}

/// The mode of a new data dir's `tree/`, the mount's root directory: what `mkdir` gives a
/// new `.urb/log` under the usual umask. `chown`/`chmod` through the mount change it.
const TREE_ROOT_MODE: u32 = 0o755;

/// Names under the data dir that hold the tree or host-local files: their modes are the
/// ones callers chose, so they are never tightened (only `local/` itself, which no caller
/// sees).
const CALLERS_FILES: [&str; 4] = ["tree", "tree.new", "tree.old", "local"];

/// Take group and other permissions away from the daemon's own files under `root` (the
/// data dir itself, everything in it but the tree and the host-local files, recursively);
/// returns what changed, as `path 0644->0600`.
pub fn tighten(root: &Path) -> io::Result<Vec<String>> {
    let mut changed = Vec::new();
    let mut fix = |p: &Path, shown: String| -> io::Result<()> {
        let m = fs::symlink_metadata(p)?;
        let mode = m.permissions().mode() & 0o7777;
        if !m.file_type().is_symlink() && mode & 0o077 != 0 {
            fs::set_permissions(p, fs::Permissions::from_mode(mode & !0o077))?;
            changed.push(format!("{shown} {mode:04o}->{:04o}", mode & !0o077));
        }
        Ok(())
    };
    fix(root, ".".into())?;
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        for e in fs::read_dir(&dir)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let shown = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            if rel.is_empty() && CALLERS_FILES.contains(&name.as_str()) {
                if name == "local" {
                    fix(&e.path(), shown)?;
                }
                continue;
            }
            fix(&e.path(), shown.clone())?;
            if e.file_type()?.is_dir() {
                stack.push((e.path(), shown));
            }
        }
    }
    changed.sort();
    Ok(changed)
}

/// An opened, locked data dir. Dropping it releases the lock.
#[derive(Debug)]
pub struct DataDir {
    pub root: PathBuf,
    // Held for the flock; closing the fd releases it.
    _lock: File,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DataDirError + '_ {
    move |source| DataDirError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Whether a live process holds `root`'s lock (a data dir that does not exist is not in
/// use). Probes with a non-blocking flock that is released at once.
pub fn in_use(root: &Path) -> bool {
    let Ok(f) = File::open(root.join("lock")) else {
        return false;
    };
    // SAFETY: flock on an fd we own; closing it (drop) releases the probe.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) != 0 }
}

/// The identity file's contents for `node_id` of `cluster`.
fn identity(node_id: u64, cluster: &str) -> String {
    format!("{FORMAT}\nnode_id={node_id}\ncluster={cluster}\n")
}

/// The cluster label an identity file records ("" if none).
fn found_cluster(identity: &str) -> String {
    identity
        .lines()
        .find_map(|l| l.strip_prefix("cluster="))
        .unwrap_or_default()
        .to_string()
}

/// Create and flock `root/lock` (non-blocking), recording our pid in it.
fn lock(root: &Path) -> Result<File, DataDirError> {
    let lock_path = root.join("lock");
    let mut lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock_path)
        .map_err(io_err(&lock_path))?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let pid = fs::read_to_string(&lock_path).unwrap_or_default();
        return Err(DataDirError::InUse {
            path: root.to_path_buf(),
            pid: pid.trim().to_string(),
        });
    }
    lock.set_len(0).map_err(io_err(&lock_path))?;
    write!(lock, "{}", std::process::id()).map_err(io_err(&lock_path))?;
    Ok(lock)
}

impl DataDir {
    /// Open (creating if needed) and lock `root` for node `node_id` of `cluster` (a label
    /// that identifies the cluster without revealing its key).
    pub fn open(root: &Path, node_id: u64, cluster: &str) -> Result<DataDir, DataDirError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .map_err(io_err(root))?;
        let root = root.canonicalize().map_err(io_err(root))?;
        let bytes = root.as_os_str().len();
        if bytes > crate::config::DATA_DIR_PATH_BYTES_MAX {
            return Err(DataDirError::PathTooLong {
                path: root,
                bytes,
                max: crate::config::DATA_DIR_PATH_BYTES_MAX,
            });
        }
        let lock_path = root.join("lock");
        let identity_path = root.join("identity");
        if !identity_path.exists() && !lock_path.exists() {
            let non_empty = fs::read_dir(&root)
                .map_err(io_err(&root))?
                .any(|e| e.map_or(true, |e| !is_log_file(&e.file_name())));
            if non_empty {
                return Err(DataDirError::NotOurs { path: root });
            }
        }
        let lock = lock(&root)?;
        if root.join(IMPORT_PENDING).exists() {
            return Err(DataDirError::ImportUnfinished { path: root });
        }
        let expected = identity(node_id, cluster);
        match fs::read_to_string(&identity_path) {
            Ok(found) if found == expected => {}
            Ok(found) if found == identity(node_id, &found_cluster(&found)) => {
                let found = found_cluster(&found);
                if found.starts_with("key-") && cluster.starts_with("key-") {
                    return Err(DataDirError::OtherKey {
                        path: root,
                        found,
                        expected: cluster.to_string(),
                    });
                }
                return Err(DataDirError::Foreign {
                    path: root,
                    found: format!("cluster={found}"),
                    expected: format!("cluster={cluster}"),
                });
            }
            Ok(found) => {
                return Err(DataDirError::Foreign {
                    path: root,
                    found: found.trim().replace('\n', ", "),
                    expected: expected.trim().replace('\n', ", "),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                for (sub, mode) in [("raft", 0o700), ("tree", TREE_ROOT_MODE), ("local", 0o700)] {
                    let p = root.join(sub);
                    fs::create_dir_all(&p).map_err(io_err(&p))?;
                    // Exactly, whatever the umask: tree/ is the mount's root as users see it.
                    fs::set_permissions(&p, fs::Permissions::from_mode(mode))
                        .map_err(io_err(&p))?;
                }
                write_file_durably(&identity_path, expected.as_bytes())
                    .map_err(io_err(&identity_path))?;
                fsync_dir(&root).map_err(io_err(&root))?;
            }
            Err(e) => return Err(io_err(&identity_path)(e)),
        }
        let tightened = tighten(&root).map_err(io_err(&root))?;
        if !tightened.is_empty() {
            tracing::warn!(
                data_dir = %root.display(),
                changed = %tightened.join(", "),
                "the data dir's own files were open to other local users; made them private \
                 to the daemon's user"
            );
        }
        Ok(DataDir { root, _lock: lock })
    }

    /// Record that the cluster of the (stopped) data dir at `root` now uses the key whose
    /// label is `cluster`, keeping its log and tree. Returns the label it replaced. The
    /// Raft state does not depend on the key, only the links do, so this is all a key
    /// rotation changes on disk.
    pub fn rekey(root: &Path, cluster: &str) -> Result<String, DataDirError> {
        let identity_path = root.join("identity");
        let found = match fs::read_to_string(&identity_path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(DataDirError::NoIdentity {
                    path: root.to_path_buf(),
                })
            }
            Err(e) => return Err(io_err(&identity_path)(e)),
        };
        let root = root.canonicalize().map_err(io_err(root))?;
        // Held while the identity is rewritten: a running daemon keeps the old key.
        let _lock = lock(&root)?;
        let old = found_cluster(&found);
        let node_id = found
            .lines()
            .find_map(|l| l.strip_prefix("node_id="))
            .and_then(|id| id.parse::<u64>().ok());
        let Some(node_id) = node_id.filter(|&id| found == identity(id, &old)) else {
            return Err(DataDirError::NotOurs { path: root });
        };
        if !old.starts_with("key-") {
            return Err(DataDirError::Standalone { path: root });
        }
        if old != cluster {
            let identity_path = root.join("identity");
            write_file_durably(&identity_path, identity(node_id, cluster).as_bytes())
                .map_err(io_err(&identity_path))?;
            fsync_dir(&root).map_err(io_err(&root))?;
        }
        Ok(old)
    }

    pub fn raft_dir(&self) -> PathBuf {
        self.root.join("raft")
    }
    pub fn tree_dir(&self) -> PathBuf {
        self.root.join("tree")
    }
    pub fn local_dir(&self) -> PathBuf {
        self.root.join("local")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::tests::TempDir;

    #[test]
    fn lock_identity_and_foreign_dirs() {
        let t = TempDir::new("datadir");
        let d = t.path().join("d");
        let dd = DataDir::open(&d, 1, "standalone").unwrap();
        assert!(d.join("tree").is_dir() && d.join("raft").is_dir());
        // A second opener is refused while the first holds the lock.
        match DataDir::open(&d, 1, "standalone") {
            Err(DataDirError::InUse { pid, .. }) => assert_eq!(pid, std::process::id().to_string()),
            other => panic!("expected InUse, got {other:?}"),
        }
        drop(dd);
        // Reopening as the same node works; as another node it is refused.
        drop(DataDir::open(&d, 1, "standalone").unwrap());
        assert!(matches!(
            DataDir::open(&d, 2, "standalone"),
            Err(DataDirError::Foreign { .. })
        ));
        assert!(matches!(
            DataDir::open(&d, 1, "key-0123"),
            Err(DataDirError::Foreign { .. })
        ));
        // A new data dir holding only a background daemon's log is still new.
        let logged = t.path().join("logged");
        fs::create_dir_all(&logged).unwrap();
        fs::write(logged.join(LOG_FILE_NAME), b"starting\n").unwrap();
        fs::write(logged.join("seguro-fs.log.1"), b"older\n").unwrap();
        drop(DataDir::open(&logged, 1, "standalone").unwrap());
        // A non-empty directory that is not a data dir is not taken over.
        let other = t.path().join("other");
        fs::create_dir_all(&other).unwrap();
        fs::write(other.join("precious"), b"x").unwrap();
        assert!(matches!(
            DataDir::open(&other, 1, "standalone"),
            Err(DataDirError::NotOurs { .. })
        ));
        // A data dir an import did not finish is refused.
        fs::write(d.join(IMPORT_PENDING), b"").unwrap();
        let e = DataDir::open(&d, 1, "standalone").unwrap_err();
        assert!(matches!(e, DataDirError::ImportUnfinished { .. }), "{e}");
        fs::remove_file(d.join(IMPORT_PENDING)).unwrap();
        drop(DataDir::open(&d, 1, "standalone").unwrap());
        // A data dir whose path leaves the tree's paths no room under PATH_MAX.
        let deep = (0..5).fold(t.path().to_path_buf(), |p, i| {
            p.join(format!("{i}{}", "x".repeat(199)))
        });
        let e = DataDir::open(&deep, 1, "standalone").unwrap_err();
        assert!(matches!(e, DataDirError::PathTooLong { .. }), "{e}");
        assert!(e.to_string().contains("choose a shorter path"), "{e}");
    }

    #[test]
    fn rekey_moves_a_stopped_dir_to_a_new_key_only() {
        let t = TempDir::new("datadir-rekey");
        let d = t.path().join("d");
        fs::create_dir_all(&d).unwrap();
        drop(DataDir::open(&d, 3, "key-aaaa").unwrap());
        fs::write(d.join("tree/kept"), b"data").unwrap();
        let e = DataDir::open(&d, 3, "key-bbbb").unwrap_err();
        assert!(matches!(e, DataDirError::OtherKey { .. }), "{e}");
        assert!(e.to_string().contains("seguro-fs rekey"), "{e}");
        // Not while a daemon holds the dir.
        let held = DataDir::open(&d, 3, "key-aaaa").unwrap();
        assert!(matches!(
            DataDir::rekey(&d, "key-bbbb"),
            Err(DataDirError::InUse { .. })
        ));
        drop(held);
        assert_eq!(DataDir::rekey(&d, "key-bbbb").unwrap(), "key-aaaa");
        assert_eq!(DataDir::rekey(&d, "key-bbbb").unwrap(), "key-bbbb");
        drop(DataDir::open(&d, 3, "key-bbbb").unwrap());
        assert_eq!(fs::read(d.join("tree/kept")).unwrap(), b"data");
        // The node id is kept: the dir still refuses another node.
        assert!(matches!(
            DataDir::open(&d, 2, "key-bbbb"),
            Err(DataDirError::Foreign { .. })
        ));
        assert!(matches!(
            DataDir::open(&d, 3, "key-aaaa"),
            Err(DataDirError::OtherKey { .. })
        ));
        // A standalone dir, a dir without identity, a foreign identity: left alone.
        let solo = t.path().join("solo");
        drop(DataDir::open(&solo, 1, "standalone").unwrap());
        assert!(matches!(
            DataDir::rekey(&solo, "key-bbbb"),
            Err(DataDirError::Standalone { .. })
        ));
        let empty = t.path().join("empty");
        fs::create_dir_all(&empty).unwrap();
        assert!(matches!(
            DataDir::rekey(&empty, "key-bbbb"),
            Err(DataDirError::NoIdentity { .. })
        ));
        let odd = t.path().join("odd");
        fs::create_dir_all(&odd).unwrap();
        fs::write(odd.join("identity"), "something else\ncluster=key-aaaa\n").unwrap();
        assert!(matches!(
            DataDir::rekey(&odd, "key-bbbb"),
            Err(DataDirError::NotOurs { .. })
        ));
        assert_eq!(
            fs::read_to_string(odd.join("identity")).unwrap(),
            "something else\ncluster=key-aaaa\n"
        );
    }
}
