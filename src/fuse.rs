//! The thin `fuser::Filesystem` adapter: decode the request, call [`Fs`], send the reply.
//! No file-system logic lives here, so the core can be reasoned about without FUSE.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    Errno as FuseErrno, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig,
    LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow,
    WriteFlags,
};

use crate::counters::FuseErrors;
use crate::fs::{to_timespec, Errno, Fs};
use crate::op::Owner;

/// How long the kernel may cache entries and attributes. This mount is the only writer
/// (it is the leader's), so its own answers stay true; 1 s bounds staleness elsewhere.
const TTL: Duration = Duration::from_secs(1);

pub struct FuseAdapter {
    pub fs: Arc<Fs>,
    pub write_bytes_max: u32,
    /// Failed requests per operation.
    pub errors: Arc<FuseErrors>,
}

/// The caller, who owns what it creates (the kernel sends its fsuid and fsgid).
fn owner(req: &Request) -> Owner {
    Owner {
        uid: req.uid(),
        gid: req.gid(),
    }
}

/// Run one request's call into [`Fs`] inside a tracing span named after the operation,
/// and answer it: `ok` with the value, or the errno, counted per operation
/// (`seguro_fuse_errors_total`) and logged at debug (ENOENT on a lookup is routine; the
/// count shows a pattern).
macro_rules! answer {
    ($self:ident, $op:literal, $call:expr, $reply:ident, |$v:pat_param| $ok:expr) => {{
        let result = {
            let _span = tracing::debug_span!("fuse", op = $op).entered();
            $call
        };
        match result {
            Ok($v) => $ok,
            Err(err) => {
                let err: Errno = err;
                $self.errors.count($op);
                tracing::debug!(op = $op, errno = err.0, "fuse request failed");
                $reply.error(FuseErrno::from_i32(err.0))
            }
        }
    }};
}

fn time(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => undo_fuser_pre_epoch_bug(t),
        TimeOrNow::Now => SystemTime::now(),
    }
}

/// fuser 0.18 builds a pre-1970 time as `epoch - secs - nsecs` where the kernel meant
/// `-secs + nsecs` (its `system_time_from_time` subtracts the nanoseconds). Undo that so
/// utimes before 1970 with a fractional part round-trips.
fn undo_fuser_pre_epoch_bug(t: SystemTime) -> SystemTime {
    match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(_) => t,
        Err(e) => {
            let d = e.duration();
            let (secs, nsecs) = (d.as_secs(), d.subsec_nanos());
            // fuser produced secs' = secs_k, nsecs' = nsecs_k for kernel (-secs_k, +nsecs_k).
            std::time::UNIX_EPOCH - Duration::from_secs(secs) + Duration::from_nanos(nsecs as u64)
        }
    }
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // A larger max_write means fewer, larger WRITEs for big sequential copies; the
        // kernel clamps it to what it supports.
        if let Err(nearest) = config.set_max_write(self.write_bytes_max) {
            let _ = config.set_max_write(nearest);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        answer!(
            self,
            "lookup",
            self.fs.lookup(parent.0, name),
            reply,
            |attr| reply.entry(&TTL, &attr, Generation(0))
        )
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        answer!(self, "getattr", self.fs.getattr(ino.0), reply, |attr| reply
            .attr(&TTL, &attr))
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let atime = atime.map(|t| to_timespec(time(t)));
        let mtime = mtime.map(|t| to_timespec(time(t)));
        answer!(
            self,
            "setattr",
            self.fs.setattr(ino.0, mode, uid, gid, size, atime, mtime),
            reply,
            |attr| reply.attr(&TTL, &attr)
        )
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        answer!(self, "readlink", self.fs.readlink(ino.0), reply, |target| {
            reply.data(&target)
        })
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        answer!(
            self,
            "mknod",
            self.fs
                .mknod(parent.0, name, mode & !umask, rdev, owner(req)),
            reply,
            |attr| reply.entry(&TTL, &attr, Generation(0))
        )
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        answer!(
            self,
            "mkdir",
            self.fs.mkdir(parent.0, name, mode & !umask, owner(req)),
            reply,
            |attr| reply.entry(&TTL, &attr, Generation(0))
        )
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        answer!(
            self,
            "unlink",
            self.fs.unlink(parent.0, name),
            reply,
            |()| reply.ok()
        )
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        answer!(self, "rmdir", self.fs.rmdir(parent.0, name), reply, |()| {
            reply.ok()
        })
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        answer!(
            self,
            "symlink",
            self.fs.symlink(parent.0, link_name, target, owner(req)),
            reply,
            |attr| reply.entry(&TTL, &attr, Generation(0))
        )
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        answer!(
            self,
            "rename",
            self.fs
                .rename(parent.0, name, newparent.0, newname, flags.bits()),
            reply,
            |()| reply.ok()
        )
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        answer!(
            self,
            "link",
            self.fs.link(ino.0, newparent.0, newname),
            reply,
            |attr| reply.entry(&TTL, &attr, Generation(0))
        )
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        // KEEP_CACHE: this mount is the only writer, so cached pages stay valid across
        // opens; dropping them on every open would cost LMDB's readers a re-read.
        // Followers keep no cache across opens: their pages are invalidated as entries
        // apply, but a fresh open is the cheap place to be sure.
        let keep = if self.fs.writable() {
            FopenFlags::FOPEN_KEEP_CACHE
        } else {
            FopenFlags::empty()
        };
        answer!(self, "open", self.fs.open(ino.0, flags.0), reply, |fh| {
            reply.opened(FileHandle(fh), keep)
        })
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        answer!(
            self,
            "read",
            self.fs.read(ino.0, fh.0, offset, size),
            reply,
            |data| reply.data(&data)
        )
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        answer!(
            self,
            "write",
            self.fs.write(ino.0, fh.0, offset, data),
            reply,
            |n| reply.written(n)
        )
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        answer!(self, "flush", self.fs.flush(), reply, |()| reply.ok())
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.fs.release(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        answer!(self, "fsync", self.fs.fsync(ino.0, fh.0), reply, |()| reply
            .ok())
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        answer!(self, "opendir", self.fs.opendir(ino.0), reply, |fh| reply
            .opened(FileHandle(fh), FopenFlags::empty()))
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        answer!(
            self,
            "readdir",
            self.fs.readdir(fh.0, offset),
            reply,
            |entries| {
                for (i, (ino, kind, name)) in entries.into_iter().enumerate() {
                    let next = offset + i as u64 + 1;
                    if reply.add(INodeNo(ino), next, kind, OsStr::from_bytes(&name)) {
                        break;
                    }
                }
                reply.ok();
            }
        )
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.fs.release(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        answer!(self, "fsyncdir", self.fs.fsyncdir(), reply, |()| reply.ok())
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        answer!(self, "statfs", self.fs.statfs(), reply, |s| reply.statfs(
            s.f_blocks,
            s.f_bfree,
            s.f_bavail,
            s.f_files,
            s.f_ffree,
            s.f_bsize as u32,
            s.f_namemax as u32,
            s.f_frsize as u32,
        ))
    }

    // Extended attributes are not replicated. ENOSYS (not EOPNOTSUPP) makes the kernel
    // remember that and stop asking, e.g. for security.capability on every write.
    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(FuseErrno::ENOSYS);
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(FuseErrno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(FuseErrno::ENOSYS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(FuseErrno::ENOSYS);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        answer!(
            self,
            "create",
            self.fs
                .create(parent.0, name, mode & !umask, flags, owner(req)),
            reply,
            |(attr, fh)| reply.created(
                &TTL,
                &attr,
                Generation(0),
                FileHandle(fh),
                FopenFlags::FOPEN_KEEP_CACHE,
            )
        )
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        answer!(
            self,
            "fallocate",
            self.fs.fallocate(ino.0, fh.0, offset, length, mode),
            reply,
            |()| reply.ok()
        )
    }
}
