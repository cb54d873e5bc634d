//! The core of the file system: what each operation means on the leader. It speaks FUSE's
//! vocabulary (inode numbers, `FileAttr`, the kernel's invalidation notifier) but not its
//! protocol: `fuse.rs` decodes requests and sends replies. Writes reach replication only
//! through `replication::pipeline::Pipeline` (the overlay, the group commit's batch and the
//! role are shared with it as data).
//!
//! - Data ops (write, truncate, fallocate) join the open batch and the overlay and return
//!   at once; the page cache and the overlay serve reads until the entry is applied.
//! - Namespace ops and chmod/chown/utimes are proposed in a batch of their own and answered
//!   after the entry is applied, with the errno the tree produced.
//! - fsync/fsyncdir close the open batch and wait until the log holds every batch accepted
//!   before them durably (fdatasync'd), or fail with EIO.
//! - While the data dir's free space is below `disk_reserve_bytes`, ops that add replicated
//!   bytes (write, fallocate, create, mknod, mkdir, rename, link, symlink) answer ENOSPC at
//!   once, as a native full disk does, instead of being proposed (`diskfull.rs`); ops that
//!   free space (unlink, rmdir, truncate) and fsync still run. fsync never answers 0 for
//!   bytes that are not durable: it waits for them as always, and answers EIO on timeout.
//! - Files named in `local_names` (lock.mdb) live in `DATA_DIR/local/`, are never
//!   replicated, and are served with plain syscalls.
//!
//! Only the leader's mount is writable (`replication/role.rs`); elsewhere mutations of the
//! tree answer EROFS, while host-local files stay writable (LMDB readers need lock.mdb).
//! On a node that did not propose an applied op, the kernel's cached pages, attributes and
//! names for it are invalidated, so readers of a follower mount see committed data.
//!
//! `ns_lock` orders namespace ops against everything else: a namespace op holds it
//! exclusively from proposal to apply, so no data op is ever addressed by a path that is
//! about to change, and no read sees the tree half-way through a rename.

pub mod inodes;

use std::collections::{HashMap, VecDeque};
use std::ffi::OsStr;
use std::fs::{self, File, Metadata, OpenOptions};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType};

use crate::config::Limits;
use crate::counters::{FsyncOutcome, Registry};
use crate::diskfull::SpaceGate;
use crate::op::{NodeKind, Op, Owner, Timespec};
use crate::replication::group_commit::split_write;
use crate::replication::overlay::{merge_read, size_after, Overlay, Piece, PieceKind};
use crate::replication::pipeline::Pipeline;
use crate::replication::role::LeadershipHooks;
use crate::replication::state_machine::ApplyObserver;
use inodes::{join, Area, Inodes, ROOT_INO};

/// An errno to answer the kernel with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl From<io::Error> for Errno {
    fn from(e: io::Error) -> Errno {
        Errno(e.raw_os_error().unwrap_or(libc::EIO))
    }
}

pub type FsResult<T> = Result<T, Errno>;

/// An open file or directory.
enum OpenHandle {
    File {
        ino: u64,
        file: Arc<File>,
    },
    Dir {
        entries: Vec<(u64, FileType, Vec<u8>)>,
    },
}

/// The file system's shared state. All methods are called from FUSE worker threads.
pub struct Fs {
    tree_root: PathBuf,
    local_root: PathBuf,
    data_dir: PathBuf,
    local_names: Vec<Vec<u8>>,
    limits: Limits,
    inodes: Mutex<Inodes>,
    handles: Mutex<HashMap<u64, OpenHandle>>,
    next_fh: AtomicU64,
    ns_lock: RwLock<()>,
    overlay: Arc<Mutex<Overlay>>,
    /// Replication: every write, fsync and namespace op goes through it.
    pipeline: Arc<dyn Pipeline>,
    /// Where durability waits are counted and timed.
    registry: Arc<Registry>,
    /// Invalidations go to the kernel from their own thread (see `Invalidator`).
    invalidator: Invalidator,
    /// Free space on the data dir, for refusing new bytes before the disk is full.
    space: SpaceGate,
    /// When this leader last accepted a write or truncate of each inode: its mtime and
    /// ctime as callers see them at once. The mtime is replicated with the data (a
    /// stamp), so the tree catches up with it; ctime cannot be set, so it is shown from
    /// here until an attribute change (or the end of this run) replaces it with the tree's.
    stamps: Mutex<HashMap<u64, Timespec>>,
    /// Ops proposed alone that were answered EIO before they applied (at most
    /// `abandoned_ops_max`, oldest first). The kernel kept its cache as if each failed, so
    /// one that applies after all is invalidated like another node's op.
    abandoned: Mutex<VecDeque<Op>>,
}

/// What `Fs::new` needs from the replication side.
pub struct FsParts {
    pub data_dir: PathBuf,
    pub tree_root: PathBuf,
    pub local_root: PathBuf,
    pub local_names: Vec<String>,
    pub limits: Limits,
    pub overlay: Arc<Mutex<Overlay>>,
    pub pipeline: Arc<dyn Pipeline>,
    pub registry: Arc<Registry>,
}

fn kind_of(m: &Metadata) -> FileType {
    FileType::from_std(m.file_type()).unwrap_or(FileType::RegularFile)
}

fn system_time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs()) + Duration::from_nanos(nsec as u64)
    }
}

/// A time for `utimensat`, from the kernel's setattr.
pub fn to_timespec(t: SystemTime) -> Timespec {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timespec {
            sec: d.as_secs() as i64,
            nsec: d.subsec_nanos(),
        },
        Err(e) => {
            let d = e.duration();
            Timespec {
                sec: -(d.as_secs() as i64) - i64::from(d.subsec_nanos() > 0),
                nsec: if d.subsec_nanos() > 0 {
                    1_000_000_000 - d.subsec_nanos()
                } else {
                    0
                },
            }
        }
    }
}

fn attr_from(ino: u64, m: &Metadata, size: u64) -> FileAttr {
    FileAttr {
        ino: fuser::INodeNo(ino),
        size,
        blocks: m.blocks(),
        atime: system_time(m.atime(), m.atime_nsec()),
        mtime: system_time(m.mtime(), m.mtime_nsec()),
        ctime: system_time(m.ctime(), m.ctime_nsec()),
        crtime: UNIX_EPOCH,
        kind: kind_of(m),
        perm: (m.mode() & 0o7777) as u16,
        nlink: m.nlink() as u32,
        uid: m.uid(),
        gid: m.gid(),
        rdev: m.rdev() as u32,
        blksize: 4096,
        flags: 0,
    }
}

impl Fs {
    pub fn new(p: FsParts) -> io::Result<Fs> {
        let root_st_ino = fs::metadata(&p.tree_root)?.ino();
        let space = SpaceGate::new(p.data_dir.clone(), &p.limits, p.registry.disk.clone());
        Ok(Fs {
            tree_root: p.tree_root,
            local_root: p.local_root,
            data_dir: p.data_dir,
            local_names: p.local_names.into_iter().map(String::into_bytes).collect(),
            limits: p.limits,
            inodes: Mutex::new(Inodes::new(root_st_ino)),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            ns_lock: RwLock::new(()),
            overlay: p.overlay,
            pipeline: p.pipeline,
            space,
            registry: p.registry,
            invalidator: Invalidator::default(),
            stamps: Mutex::default(),
            abandoned: Mutex::default(),
        })
    }

    /// Called once the FUSE session exists: start sending cache invalidations.
    pub fn set_notifier(self: &Arc<Self>, n: fuser::Notifier) -> io::Result<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel(INVALIDATIONS_QUEUED_MAX);
        if self.invalidator.tx.set(tx).is_err() {
            return Ok(());
        }
        let fs = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("fuse-invalidate".into())
            .spawn(move || {
                while let Ok(inv) = rx.recv() {
                    let Some(fs) = fs.upgrade() else { return };
                    send_invalidations(&n, inv);
                    if fs.invalidator.overflowed.swap(false, Ordering::AcqRel) {
                        send_invalidations(&n, fs.everything());
                    }
                }
            })?;
        Ok(())
    }

    pub fn writable(&self) -> bool {
        self.pipeline.writable()
    }

    /// Mutations of the replicated tree need a writable (leader) mount.
    fn check_writable(&self) -> FsResult<()> {
        if self.failed() {
            Err(Errno(libc::EIO))
        } else if self.pipeline.writable() {
            Ok(())
        } else {
            Err(Errno(libc::EROFS))
        }
    }

    /// New replicated bytes need room on the data dir: ENOSPC at once, as a native full
    /// disk answers, rather than an entry the log may have no room for.
    fn check_room(&self) -> FsResult<()> {
        if self.space.has_room() {
            Ok(())
        } else {
            Err(Errno(libc::ENOSPC))
        }
    }

    fn is_local_name(&self, name: &OsStr) -> bool {
        self.local_names
            .iter()
            .any(|n| n.as_slice() == name.as_bytes())
    }

    fn abs(&self, area: Area, rel: &str) -> PathBuf {
        let root = match area {
            Area::Tree => &self.tree_root,
            Area::Local => &self.local_root,
        };
        if rel.is_empty() {
            root.clone()
        } else {
            root.join(rel)
        }
    }

    fn failed(&self) -> bool {
        self.pipeline.failed()
    }

    fn node(&self, ino: u64) -> FsResult<inodes::Node> {
        self.inodes
            .lock()
            .expect("inodes mutex poisoned")
            .get(ino)
            .cloned()
            .ok_or(Errno(libc::ENOENT))
    }

    /// The path of a directory inode (parents are always tree directories).
    fn dir_path(&self, ino: u64) -> FsResult<String> {
        let n = self.node(ino)?;
        if !n.is_dir {
            return Err(Errno(libc::ENOTDIR));
        }
        n.path.ok_or(Errno(libc::ENOENT))
    }

    fn child(&self, parent: u64, name: &OsStr) -> FsResult<(Area, String)> {
        let name = name.to_str().ok_or(Errno(libc::EINVAL))?;
        if name.len() > 255 {
            return Err(Errno(libc::ENAMETOOLONG));
        }
        let dir = self.dir_path(parent)?;
        if dir.len() + 1 + name.len() > crate::config::TREE_PATH_BYTES_MAX {
            return Err(Errno(libc::ENAMETOOLONG));
        }
        let area = if self.is_local_name(OsStr::new(name)) {
            Area::Local
        } else {
            Area::Tree
        };
        Ok((area, join(&dir, name)))
    }

    /// Attributes of a file whose metadata `stat` reads. For tree files the overlay lock
    /// spans the stat: otherwise an entry applied in between would be counted in neither
    /// the tree size nor the overlay, and the kernel would cache a size that is too small.
    fn attr_with<F>(&self, area: Area, stat: F) -> FsResult<(FileAttr, Metadata)>
    where
        F: FnOnce() -> io::Result<(u64, Metadata)>,
    {
        if area == Area::Local {
            let (ino, m) = stat()?;
            return Ok((attr_from(ino, &m, m.len()), m));
        }
        let o = self.overlay.lock().expect("overlay mutex poisoned");
        let (ino, m) = stat()?;
        let size = if m.is_file() {
            size_after(m.len(), o.pieces(ino))
        } else {
            m.len()
        };
        let mut attr = attr_from(ino, &m, size);
        if let Some(t) = self.stamps.lock().expect("stamps mutex poisoned").get(&ino) {
            let t = system_time(t.sec, i64::from(t.nsec));
            (attr.mtime, attr.ctime) = (t, t);
        }
        Ok((attr, m))
    }

    /// Register `path` (which must exist) and return its attributes.
    fn entry(&self, area: Area, path: &str) -> FsResult<FileAttr> {
        let (attr, _) = self.attr_with(area, || {
            let m = fs::symlink_metadata(self.abs(area, path))?;
            // Lock order: overlay, then inodes.
            let ino = self.inodes.lock().expect("inodes mutex poisoned").lookup(
                path,
                area,
                m.ino(),
                m.is_dir(),
            );
            Ok((ino, m))
        })?;
        Ok(attr)
    }

    // ---- waiting on the log ----------------------------------------------------------

    /// Propose `op` alone and wait until it is applied; returns the tree's errno for it.
    fn propose_and_wait(&self, op: Op) -> FsResult<()> {
        self.check_writable()?;
        if op.needs_room() {
            self.check_room()?;
        }
        match self.pipeline.propose_alone(op.clone()) {
            Ok(0) => Ok(()),
            Ok(errno) => Err(Errno(errno)),
            Err(why) => {
                tracing::error!(%why, "namespace op failed");
                // It may still apply (a full disk or a slow quorum held it up).
                let mut abandoned = self.abandoned.lock().expect("abandoned mutex poisoned");
                if abandoned.len() == self.limits.abandoned_ops_max {
                    abandoned.pop_front();
                }
                abandoned.push_back(op);
                Err(Errno(libc::EIO))
            }
        }
    }

    /// Whether `op` is one this leader answered EIO before it applied (forgetting it).
    fn take_abandoned(&self, op: &Op) -> bool {
        let mut abandoned = self.abandoned.lock().expect("abandoned mutex poisoned");
        match abandoned.iter().position(|a| a == op) {
            Some(i) => abandoned.remove(i).is_some(),
            None => false,
        }
    }

    /// fsync: every op accepted before this call must be durable in this node's log and
    /// in the logs of `acks` other voters, all within this node's current term. Every call
    /// is counted and, when it answers 0, timed (`counters.rs`).
    pub fn wait_durable(&self) -> FsResult<()> {
        let started = std::time::Instant::now();
        let outcome = self.pipeline.durable();
        self.registry.fsync.record(outcome, started.elapsed());
        if outcome == FsyncOutcome::Ok {
            Ok(())
        } else {
            Err(Errno(libc::EIO))
        }
    }

    /// Block while the overlay holds more than `inflight_bytes_max` (backpressure).
    fn wait_for_room(&self) -> FsResult<()> {
        let max = self.limits.inflight_bytes_max;
        let room = || self.overlay.lock().expect("overlay mutex poisoned").bytes() < max;
        if self.pipeline.wait_until(&room) {
            Ok(())
        } else {
            Err(Errno(libc::EIO))
        }
    }

    /// Accept data ops for `ino` at `path` into the open batch and the overlay; from now
    /// on the file shows this moment as its mtime and ctime, as a local file system would.
    fn accept_data(&self, ino: u64, ops: Vec<(Op, PieceKind)>) {
        let now = to_timespec(SystemTime::now());
        self.stamps
            .lock()
            .expect("stamps mutex poisoned")
            .insert(ino, now);
        let mut ops = Some(ops);
        self.pipeline.accept(&mut |group| {
            // Lock order: the group commit, then the overlay (the proposer never holds
            // both; the state machine holds only the overlay). Pieces must enter the
            // overlay under the group commit's lock, or their batch could be applied before
            // they are there and they would never be dropped.
            let mut o = self.overlay.lock().expect("overlay mutex poisoned");
            for (op, kind) in ops.take().expect("accept runs `add` once") {
                let seq = group.push_data_stamped(op, now);
                o.push(ino, Piece { seq, kind });
            }
        });
    }

    // ---- operations -------------------------------------------------------------------

    pub fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<FileAttr> {
        let _ns = self.ns_lock.read().expect("ns lock poisoned");
        let (area, path) = self.child(parent, name)?;
        self.entry(area, &path)
    }

    pub fn forget(&self, ino: u64, n: u64) {
        self.inodes
            .lock()
            .expect("inodes mutex poisoned")
            .forget(ino, n);
    }

    fn open_file_of(&self, ino: u64) -> Option<Arc<File>> {
        let h = self.handles.lock().expect("handles mutex poisoned");
        h.values().find_map(|h| match h {
            OpenHandle::File { ino: i, file } if *i == ino => Some(file.clone()),
            _ => None,
        })
    }

    pub fn getattr(&self, ino: u64) -> FsResult<FileAttr> {
        let _ns = self.ns_lock.read().expect("ns lock poisoned");
        let n = self.node(ino)?;
        let file = match &n.path {
            Some(_) => None,
            // Unlinked but open: the handle's descriptor still reaches the file.
            None => Some(self.open_file_of(ino).ok_or(Errno(libc::ENOENT))?),
        };
        let (attr, _) = self.attr_with(n.area, || {
            let m = match &file {
                Some(f) => f.metadata()?,
                None => fs::symlink_metadata(self.abs(n.area, n.path.as_deref().unwrap_or("")))?,
            };
            Ok((ino, m))
        })?;
        Ok(attr)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn setattr(
        &self,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<Timespec>,
        mtime: Option<Timespec>,
    ) -> FsResult<FileAttr> {
        let n = self.node(ino)?;
        let Some(path) = n.path.clone() else {
            // Unlinked: nobody else can ever see it, so change the file directly.
            if let (Some(size), Some(f)) = (size, self.open_file_of(ino)) {
                f.set_len(size)?;
            }
            return self.getattr(ino);
        };
        if n.area == Area::Local {
            // Host-local: the same syscalls the state machine would make, made here.
            let mut local = crate::tree::TreeApplier::new(
                self.local_root.clone(),
                crate::tree::TreeLimits {
                    open_files_max: 1,
                    direct_bytes_min: 0,
                },
            );
            if let Some(size) = size {
                local.apply_local(&Op::Truncate {
                    path: path.clone(),
                    size,
                })?;
            }
            local.apply_local(&Op::SetAttr {
                path,
                mode,
                uid,
                gid,
                atime,
                mtime,
            })?;
            return self.getattr(ino);
        }
        if let Some(size) = size {
            if n.is_dir {
                return Err(Errno(libc::EISDIR));
            }
            self.check_writable()?;
            let _ns = self.ns_lock.read().expect("ns lock poisoned");
            self.accept_data(
                ino,
                vec![(
                    Op::Truncate {
                        path: path.clone(),
                        size,
                    },
                    PieceKind::Truncate { size },
                )],
            );
        }
        if mode.is_some() || uid.is_some() || gid.is_some() || atime.is_some() || mtime.is_some() {
            let _ns = self.ns_lock.write().expect("ns lock poisoned");
            self.propose_and_wait(Op::SetAttr {
                path,
                mode,
                uid,
                gid,
                atime,
                mtime,
            })?;
            // The tree's times are right now: this change set its ctime (and any time
            // asked for), after every stamp accepted before it.
            self.stamps
                .lock()
                .expect("stamps mutex poisoned")
                .remove(&ino);
        }
        self.getattr(ino)
    }

    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        let n = self.node(ino)?;
        let p = n.path.ok_or(Errno(libc::ENOENT))?;
        Ok(fs::read_link(self.abs(n.area, &p))?
            .into_os_string()
            .into_vec())
    }

    fn new_fh(&self, h: OpenHandle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles
            .lock()
            .expect("handles mutex poisoned")
            .insert(fh, h);
        fh
    }

    /// Handles are opened read-write whatever the caller asked for: page-cache writeback
    /// may arrive on any handle of the inode. A file the daemon may not write (it does
    /// not run as root) is opened read-only; writes to it then fail with the real errno.
    fn open_path(&self, area: Area, path: &str) -> FsResult<File> {
        let p = self.abs(area, path);
        match OpenOptions::new().read(true).write(true).open(&p) {
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => Ok(File::open(&p)?),
            r => Ok(r?),
        }
    }

    pub fn open(&self, ino: u64, flags: i32) -> FsResult<u64> {
        let _ns = self.ns_lock.read().expect("ns lock poisoned");
        let n = self.node(ino)?;
        let path = n.path.ok_or(Errno(libc::ENOENT))?;
        if n.is_dir {
            return Err(Errno(libc::EISDIR));
        }
        if n.area == Area::Tree && flags & libc::O_ACCMODE != libc::O_RDONLY {
            self.check_writable()?;
        }
        let file = self.open_path(n.area, &path)?;
        Ok(self.new_fh(OpenHandle::File {
            ino,
            file: Arc::new(file),
        }))
    }

    fn file_handle(&self, fh: u64) -> FsResult<(u64, Arc<File>)> {
        match self
            .handles
            .lock()
            .expect("handles mutex poisoned")
            .get(&fh)
        {
            Some(OpenHandle::File { ino, file }) => Ok((*ino, file.clone())),
            _ => Err(Errno(libc::EBADF)),
        }
    }

    pub fn read(&self, ino: u64, fh: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let (_, file) = self.file_handle(fh)?;
        let n = self.node(ino)?;
        if n.area == Area::Local || n.path.is_none() {
            let mut buf = vec![0u8; size as usize];
            let got = file.read_at(&mut buf, offset)?;
            buf.truncate(got);
            return Ok(buf);
        }
        // The overlay lock spans the tree read so an apply cannot slip in between.
        let o = self.overlay.lock().expect("overlay mutex poisoned");
        let base_size = file.metadata()?.len();
        let want = base_size.saturating_sub(offset).min(size as u64) as usize;
        let mut base = vec![0u8; want];
        let mut got = 0;
        while got < want {
            let k = file.read_at(&mut base[got..], offset + got as u64)?;
            if k == 0 {
                break;
            }
            got += k;
        }
        base.truncate(got);
        Ok(merge_read(
            &base,
            base_size,
            o.pieces(ino),
            offset,
            size as usize,
        ))
    }

    pub fn write(&self, ino: u64, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        let (_, file) = self.file_handle(fh)?;
        let n = self.node(ino)?;
        if n.area == Area::Local || n.path.is_none() {
            // Host-local, or unlinked (no other process can ever open it again).
            file.write_all_at(data, offset)?;
            return Ok(data.len() as u32);
        }
        self.check_writable()?;
        self.check_room()?;
        self.wait_for_room()?;
        let _ns = self.ns_lock.read().expect("ns lock poisoned");
        // Re-read the path under the namespace lock: a rename may have just finished.
        let path = self.node(ino)?.path.ok_or(Errno(libc::ENOENT))?;
        let ops = split_write(&path, offset, data, self.limits.entry_bytes_max)
            .into_iter()
            .map(|op| {
                let Op::Write { offset, data, .. } = &op else {
                    unreachable!("split_write makes writes")
                };
                // The overlay shares the op's bytes: no copy.
                let kind = PieceKind::Write {
                    offset: *offset,
                    data: data.clone(),
                };
                (op, kind)
            })
            .collect();
        self.accept_data(ino, ops);
        Ok(data.len() as u32)
    }

    /// close(2) of one descriptor: report a failed log so the application learns of it.
    pub fn flush(&self) -> FsResult<()> {
        if self.failed() {
            Err(Errno(libc::EIO))
        } else {
            Ok(())
        }
    }

    pub fn release(&self, fh: u64) {
        self.handles
            .lock()
            .expect("handles mutex poisoned")
            .remove(&fh);
    }

    pub fn fsync(&self, ino: u64, fh: u64) -> FsResult<()> {
        let n = self.node(ino)?;
        if n.area == Area::Local || n.path.is_none() {
            let (_, file) = self.file_handle(fh)?;
            return Ok(crate::sync::fdatasync(&file)?);
        }
        self.wait_durable()
    }

    pub fn opendir(&self, ino: u64) -> FsResult<u64> {
        let _ns = self.ns_lock.read().expect("ns lock poisoned");
        let path = self.dir_path(ino)?;
        let parent_ino = if ino == ROOT_INO {
            ROOT_INO
        } else {
            // The kernel does not use ".."'s inode from readdir; the root is good enough
            // when the parent has not been looked up.
            let parent = tree_parent(&path);
            self.peek_ino(Area::Tree, parent).unwrap_or(ROOT_INO)
        };
        let mut entries = vec![
            (ino, FileType::Directory, b".".to_vec()),
            (parent_ino, FileType::Directory, b"..".to_vec()),
        ];
        for area in [Area::Tree, Area::Local] {
            let dir = self.abs(area, &path);
            let iter = match fs::read_dir(&dir) {
                Ok(it) => it,
                Err(e) if area == Area::Local && e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            };
            for e in iter {
                let e = e?;
                let name = e.file_name();
                // Only local names come from local/, and never from tree/.
                if (area == Area::Local) != self.is_local_name(&name) {
                    continue;
                }
                let ft = e.file_type()?;
                if area == Area::Local && ft.is_dir() {
                    continue;
                }
                let kind = FileType::from_std(ft).unwrap_or(FileType::RegularFile);
                let st_ino = std::os::unix::fs::DirEntryExt::ino(&e);
                let ino = self
                    .inodes
                    .lock()
                    .expect("inodes mutex poisoned")
                    .peek(area, st_ino)
                    .unwrap_or(st_ino);
                entries.push((ino, kind, name.into_vec()));
            }
        }
        Ok(self.new_fh(OpenHandle::Dir { entries }))
    }

    fn peek_ino(&self, area: Area, path: &str) -> Option<u64> {
        let st_ino = fs::symlink_metadata(self.abs(area, path)).ok()?.ino();
        self.inodes
            .lock()
            .expect("inodes mutex poisoned")
            .peek(area, st_ino)
    }

    /// Directory entries from `offset` on (the caller stops when the reply is full).
    pub fn readdir(&self, fh: u64, offset: u64) -> FsResult<Vec<(u64, FileType, Vec<u8>)>> {
        match self
            .handles
            .lock()
            .expect("handles mutex poisoned")
            .get(&fh)
        {
            Some(OpenHandle::Dir { entries }) => {
                Ok(entries.iter().skip(offset as usize).cloned().collect())
            }
            _ => Err(Errno(libc::EBADF)),
        }
    }

    pub fn fsyncdir(&self) -> FsResult<()> {
        self.wait_durable()
    }

    pub fn statfs(&self) -> FsResult<libc::statvfs> {
        let c = std::ffi::CString::new(self.data_dir.as_os_str().as_bytes())
            .map_err(|_| Errno(libc::EINVAL))?;
        // SAFETY: statvfs fills the zeroed struct we pass for a valid path.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return Err(io::Error::last_os_error().into());
        }
        Ok(st)
    }

    fn create_local(&self, path: &str, mode: u32, excl: bool, owner: Owner) -> FsResult<()> {
        let p = self.abs(Area::Local, path);
        if let Some(parent) = p.parent() {
            // The local mirror of a tree directory is made on demand, only if the tree
            // directory exists.
            if !self.abs(Area::Tree, tree_parent(path)).is_dir() {
                return Err(Errno(libc::ENOENT));
            }
            fs::create_dir_all(parent)?;
        }
        let mut o = OpenOptions::new();
        o.write(true).mode(mode);
        if excl {
            o.create_new(true);
        } else {
            o.create(true);
        }
        // Whether the open made the file: only a new file takes the caller's mode and ids.
        let existed = p.exists();
        let f = o.open(&p)?;
        if !existed {
            // The daemon's umask (077) must not narrow what the caller asked for, and the
            // file is the caller's (LMDB run by another user opens lock.mdb again).
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } == 0 {
                std::os::unix::fs::fchown(&f, Some(owner.uid), Some(owner.gid))?;
            }
            f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        }
        Ok(())
    }

    pub fn create(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
        owner: Owner,
    ) -> FsResult<(FileAttr, u64)> {
        let (area, path) = self.child(parent, name)?;
        let excl = flags & libc::O_EXCL != 0;
        let attr = {
            let _ns = self.ns_lock.write().expect("ns lock poisoned");
            match area {
                Area::Local => self.create_local(&path, mode & 0o7777, excl, owner)?,
                Area::Tree => self.propose_and_wait(Op::Make {
                    path: path.clone(),
                    kind: NodeKind::File {
                        mode: mode & 0o7777,
                        excl,
                    },
                    owner,
                })?,
            }
            self.entry(area, &path)?
        };
        let ino = attr.ino.0;
        if flags & libc::O_TRUNC != 0 && attr.size > 0 {
            self.setattr(ino, None, None, None, Some(0), None, None)?;
        }
        let file = self.open_path(area, &path)?;
        let fh = self.new_fh(OpenHandle::File {
            ino,
            file: Arc::new(file),
        });
        Ok((self.getattr(ino)?, fh))
    }

    /// mknod: a regular file as an exclusive create; a FIFO, socket or device node as a
    /// node in the tree (what passes through it is never replicated: the kernel serves
    /// FIFOs and sockets itself, and the mount is `nodev`).
    pub fn mknod(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        rdev: u32,
        owner: Owner,
    ) -> FsResult<FileAttr> {
        let (area, path) = self.child(parent, name)?;
        let _ns = self.ns_lock.write().expect("ns lock poisoned");
        let regular = mode & libc::S_IFMT == libc::S_IFREG;
        match area {
            Area::Local if regular => self.create_local(&path, mode & 0o7777, true, owner)?,
            // Host-local names are files LMDB shares per host; nothing else belongs there.
            Area::Local => return Err(Errno(libc::EPERM)),
            Area::Tree => self.propose_and_wait(Op::Make {
                path: path.clone(),
                kind: if regular {
                    NodeKind::File {
                        mode: mode & 0o7777,
                        excl: true,
                    }
                } else {
                    NodeKind::Special {
                        mode: mode & (libc::S_IFMT | 0o7777),
                        rdev: u64::from(rdev),
                    }
                },
                owner,
            })?,
        }
        self.entry(area, &path)
    }

    pub fn mkdir(&self, parent: u64, name: &OsStr, mode: u32, owner: Owner) -> FsResult<FileAttr> {
        let (area, path) = self.child(parent, name)?;
        if area == Area::Local {
            return Err(Errno(libc::EPERM));
        }
        let _ns = self.ns_lock.write().expect("ns lock poisoned");
        self.propose_and_wait(Op::Make {
            path: path.clone(),
            kind: NodeKind::Dir {
                mode: mode & 0o7777,
            },
            owner,
        })?;
        self.entry(Area::Tree, &path)
    }

    pub fn unlink(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        let (area, path) = self.child(parent, name)?;
        let _ns = self.ns_lock.write().expect("ns lock poisoned");
        match area {
            Area::Local => fs::remove_file(self.abs(Area::Local, &path))?,
            Area::Tree => self.propose_and_wait(Op::Unlink { path: path.clone() })?,
        }
        self.inodes
            .lock()
            .expect("inodes mutex poisoned")
            .detach(area, &path);
        Ok(())
    }

    pub fn rmdir(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        let (area, path) = self.child(parent, name)?;
        if area == Area::Local {
            return Err(Errno(libc::ENOTDIR));
        }
        let _ns = self.ns_lock.write().expect("ns lock poisoned");
        let local = self.abs(Area::Local, &path);
        // A directory holding a host-local file (lock.mdb) is not empty.
        if let Ok(mut it) = fs::read_dir(&local) {
            if it.next().is_some() {
                return Err(Errno(libc::ENOTEMPTY));
            }
        }
        self.propose_and_wait(Op::Rmdir { path: path.clone() })?;
        let _ = fs::remove_dir(&local);
        self.inodes
            .lock()
            .expect("inodes mutex poisoned")
            .detach(Area::Tree, &path);
        Ok(())
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> FsResult<()> {
        if flags & !libc::RENAME_NOREPLACE != 0 {
            // RENAME_EXCHANGE / WHITEOUT: not needed by vere or LMDB.
            return Err(Errno(libc::EINVAL));
        }
        let (area, from) = self.child(parent, name)?;
        let (to_area, to) = self.child(newparent, newname)?;
        if area != to_area {
            return Err(Errno(libc::EXDEV));
        }
        let _ns = self.ns_lock.write().expect("ns lock poisoned");
        match area {
            Area::Local => {
                if flags & libc::RENAME_NOREPLACE != 0 && self.abs(area, &to).exists() {
                    return Err(Errno(libc::EEXIST));
                }
                if !self.abs(area, &from).exists() {
                    return Err(Errno(libc::ENOENT));
                }
                // The target's local mirror directory is made on demand, if the tree
                // directory exists.
                if !self.abs(Area::Tree, tree_parent(&to)).is_dir() {
                    return Err(Errno(libc::ENOENT));
                }
                if let Some(parent) = self.abs(area, &to).parent() {
                    fs::create_dir_all(parent)?;
                }
                fs::rename(self.abs(area, &from), self.abs(area, &to))?;
            }
            Area::Tree => {
                // Paths below a directory move with it: none may outgrow the cap.
                if to.len() > from.len() {
                    let below = longest_below(&self.abs(Area::Tree, &from))?;
                    if to.len() + below > crate::config::TREE_PATH_BYTES_MAX {
                        return Err(Errno(libc::ENAMETOOLONG));
                    }
                }
                // A directory still holding a host-local file is not empty, so it cannot
                // be replaced.
                if let Ok(mut it) = fs::read_dir(self.abs(Area::Local, &to)) {
                    if it.next().is_some() {
                        return Err(Errno(libc::ENOTEMPTY));
                    }
                }
                self.propose_and_wait(Op::Rename {
                    from: from.clone(),
                    to: to.clone(),
                    flags,
                })?;
                // Host-local files under a renamed directory move with it.
                let local_from = self.abs(Area::Local, &from);
                if local_from.is_dir() {
                    let local_to = self.abs(Area::Local, &to);
                    if let Some(p) = local_to.parent() {
                        fs::create_dir_all(p)?;
                    }
                    let _ = fs::remove_dir_all(&local_to);
                    fs::rename(&local_from, &local_to)?;
                }
            }
        }
        let mut inodes = self.inodes.lock().expect("inodes mutex poisoned");
        inodes.detach(area, &to);
        inodes.rename(area, &from, &to);
        if area == Area::Tree {
            inodes.rename(Area::Local, &from, &to);
        }
        Ok(())
    }

    pub fn link(&self, ino: u64, newparent: u64, newname: &OsStr) -> FsResult<FileAttr> {
        let n = self.node(ino)?;
        let from = n.path.ok_or(Errno(libc::ENOENT))?;
        let (area, to) = self.child(newparent, newname)?;
        if n.is_dir {
            return Err(Errno(libc::EPERM));
        }
        if area != n.area || area == Area::Local {
            return Err(Errno(libc::EXDEV));
        }
        let _ns = self.ns_lock.write().expect("ns lock poisoned");
        self.propose_and_wait(Op::Link {
            from,
            to: to.clone(),
        })?;
        self.entry(area, &to)
    }

    pub fn symlink(
        &self,
        parent: u64,
        name: &OsStr,
        target: &std::path::Path,
        owner: Owner,
    ) -> FsResult<FileAttr> {
        let (area, path) = self.child(parent, name)?;
        if area == Area::Local {
            return Err(Errno(libc::EPERM));
        }
        let target = target.to_str().ok_or(Errno(libc::EINVAL))?.to_string();
        let _ns = self.ns_lock.write().expect("ns lock poisoned");
        self.propose_and_wait(Op::Make {
            path: path.clone(),
            kind: NodeKind::Symlink { target },
            owner,
        })?;
        self.entry(area, &path)
    }

    pub fn fallocate(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        length: u64,
        mode: i32,
    ) -> FsResult<()> {
        if mode != 0 {
            return Err(Errno(libc::EOPNOTSUPP));
        }
        let end = offset.checked_add(length).ok_or(Errno(libc::EFBIG))?;
        let n = self.node(ino)?;
        if n.area == Area::Local || n.path.is_none() {
            let (_, file) = self.file_handle(fh)?;
            if end > file.metadata()?.len() {
                file.set_len(end)?;
            }
            return Ok(());
        }
        self.check_writable()?;
        self.check_room()?;
        let _ns = self.ns_lock.read().expect("ns lock poisoned");
        let path = self.node(ino)?.path.ok_or(Errno(libc::ENOENT))?;
        // Size check and truncate-to-grow are one step under the group commit's and the
        // overlay's locks, so a concurrent write past `end` cannot be cut off by it.
        // The tree's length is read under them too: an apply in between would move bytes
        // from the overlay into the tree, and a stale length would then cut them off.
        let tree_file = self.abs(Area::Tree, &path);
        let mut path = Some(path);
        let mut stat = Ok(());
        self.pipeline.accept(&mut |group| {
            let mut o = self.overlay.lock().expect("overlay mutex poisoned");
            let tree_len = match fs::metadata(&tree_file) {
                Ok(m) => m.len(),
                Err(e) => {
                    stat = Err(e);
                    return;
                }
            };
            if end > size_after(tree_len, o.pieces(ino)) {
                let now = to_timespec(SystemTime::now());
                self.stamps
                    .lock()
                    .expect("stamps mutex poisoned")
                    .insert(ino, now);
                let path = path.take().expect("accept runs `add` once");
                let seq = group.push_data_stamped(Op::Truncate { path, size: end }, now);
                o.push(
                    ino,
                    Piece {
                        seq,
                        kind: PieceKind::Truncate { size: end },
                    },
                );
            }
        });
        stat?;
        Ok(())
    }
}

/// The longest relative path below `dir`, counting its leading '/' (0 when `dir` is not a
/// directory or is empty). Walks the subtree: only a directory rename to a longer name
/// needs it.
fn longest_below(dir: &std::path::Path) -> io::Result<usize> {
    let mut longest = 0;
    // Never through a symlink: its target's paths do not move.
    if !fs::symlink_metadata(dir)?.is_dir() {
        return Ok(0);
    }
    let mut stack = vec![(dir.to_path_buf(), 0usize)];
    while let Some((d, depth_bytes)) = stack.pop() {
        for e in fs::read_dir(&d)? {
            let e = e?;
            let bytes = depth_bytes + 1 + e.file_name().len();
            longest = longest.max(bytes);
            if e.file_type()?.is_dir() {
                stack.push((e.path(), bytes));
            }
        }
    }
    Ok(longest)
}

/// Parent directory of a relative path.
fn tree_parent(path: &str) -> &str {
    crate::tree::parent_of(path)
}

/// Invalidation batches waiting for the invalidation thread; past this, they collapse
/// into one "invalidate everything".
const INVALIDATIONS_QUEUED_MAX: usize = 1024;

/// Invalidations to send to the kernel: (inode, offset, len) for data, (parent, name)
/// for names.
#[derive(Default)]
struct Invalidations {
    inodes: Vec<(u64, i64, i64)>,
    entries: Vec<(u64, String)>,
}

/// Hands invalidations to a dedicated thread. A kernel notification can block (it takes
/// the directory's lock, which the kernel may hold while one of our handlers waits for
/// Raft), so it must never run on a thread that Raft or the state machine needs.
#[derive(Default)]
struct Invalidator {
    tx: OnceLock<std::sync::mpsc::SyncSender<Invalidations>>,
    overflowed: AtomicBool,
}

fn send_invalidations(n: &fuser::Notifier, inv: Invalidations) {
    // Errors mean the kernel holds nothing to invalidate (ENOENT) or the session is gone;
    // neither needs handling.
    for (ino, off, len) in inv.inodes {
        let _ = n.inval_inode(fuser::INodeNo(ino), off, len);
    }
    for (parent, name) in inv.entries {
        let _ = n.inval_entry(fuser::INodeNo(parent), OsStr::new(&name));
    }
}

impl Fs {
    fn name_entry(&self, inodes: &Inodes, path: &str, out: &mut Invalidations) {
        let (parent, name) = match path.rfind('/') {
            Some(i) => (&path[..i], &path[i + 1..]),
            None => ("", path),
        };
        if let Some(p) = inodes.find(Area::Tree, parent) {
            out.entries.push((p, name.to_string()));
        }
    }

    fn send(&self, inv: Invalidations) {
        let Some(tx) = self.invalidator.tx.get() else {
            return;
        };
        if inv.inodes.is_empty() && inv.entries.is_empty() {
            return;
        }
        if tx.try_send(inv).is_err() {
            self.invalidator.overflowed.store(true, Ordering::Release);
            let _ = tx.try_send(Invalidations::default());
        }
    }

    /// Every cached page, attribute and name the kernel may hold for this mount.
    fn everything(&self) -> Invalidations {
        let mut inv = Invalidations::default();
        let inodes = self.inodes.lock().expect("inodes mutex poisoned");
        for (ino, area, path) in inodes.all_paths() {
            inv.inodes.push((ino, 0, 0));
            if area == Area::Tree && !path.is_empty() {
                self.name_entry(&inodes, &path, &mut inv);
            }
        }
        inv
    }

    fn invalidate_all(&self) {
        let inv = self.everything();
        self.send(inv);
    }
}

impl ApplyObserver for Fs {
    fn applied(&self, op: &Op, own: bool) {
        if own && self.pipeline.writable() && !self.take_abandoned(op) {
            // The leader's kernel cache already shows its own writes.
            return;
        }
        let mut inv = Invalidations::default();
        {
            let mut inodes = self.inodes.lock().expect("inodes mutex poisoned");
            match op {
                Op::Write { path, offset, data } => {
                    if let Some(ino) = inodes.find(Area::Tree, path) {
                        inv.inodes.push((ino, *offset as i64, data.len() as i64));
                    }
                }
                Op::Truncate { path, .. } => {
                    if let Some(ino) = inodes.find(Area::Tree, path) {
                        inv.inodes.push((ino, 0, 0));
                    }
                }
                // Attributes only (a negative offset): a stamp follows every run of
                // writes, and must not drop the pages LMDB readers have cached.
                Op::SetAttr { path, .. } => {
                    if let Some(ino) = inodes.find(Area::Tree, path) {
                        inv.inodes.push((ino, -1, 0));
                    }
                }
                Op::Create { path, .. }
                | Op::Mkdir { path, .. }
                | Op::Symlink { path, .. }
                | Op::Make { path, .. }
                | Op::Link { to: path, .. } => self.name_entry(&inodes, path, &mut inv),
                Op::Unlink { path } | Op::Rmdir { path } => {
                    self.name_entry(&inodes, path, &mut inv);
                    inodes.detach(Area::Tree, path);
                }
                Op::Rename { from, to, .. } => {
                    self.name_entry(&inodes, from, &mut inv);
                    self.name_entry(&inodes, to, &mut inv);
                    inodes.detach(Area::Tree, to);
                    inodes.rename(Area::Tree, from, to);
                }
                Op::Digest => {}
            }
        }
        self.send(inv);
    }

    fn reset(&self) {
        self.invalidate_all();
    }
}

impl LeadershipHooks for Fs {
    fn lost(&self) {
        // None of this was acknowledged: fsyncs covering it fail (generation changed).
        self.pipeline.drop_unproposed();
        self.overlay.lock().expect("overlay mutex poisoned").clear();
        self.stamps.lock().expect("stamps mutex poisoned").clear();
        // The page cache may hold those unacknowledged writes: drop it, so reads come
        // from the committed tree.
        self.invalidate_all();
    }

    fn gained(&self) {
        self.invalidate_all();
    }
}

#[cfg(test)]
mod tests;
