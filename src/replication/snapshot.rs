//! Tree images: the snapshot a member that is behind the purged log (or new) receives.
//!
//! An image is a stream, written and read in bounded buffers whatever the tree's size:
//!
//! ```text
//! "SEGSNAP2"  root mode u32, owner
//! record*  tag 1 dir:     path, mode, owner, mtime
//!          tag 2 file:    path, mode, owner, mtime, size u64, then size bytes
//!          tag 3 symlink: path, target, owner
//!          tag 4 special: path, st_mode u32 (type too), rdev u64, owner, mtime
//! tag 0    blake3 of every byte before this tag
//! ```
//! (strings are u32 length + bytes; owner is uid u32 + gid u32; mtime is i64 seconds +
//! u32 nanoseconds.) An image of the previous format, "SEGSNAP1", has no owners and no
//! tag 4, and still unpacks (its files keep the unpacking daemon's ids).
//!
//! Installing writes the image into `tree.new/`, checks the digest, syncs it, and swaps it
//! in through `install.pending` so that a crash at any step either keeps the old tree or
//! finishes the swap on restart (`recover_install`). A member that already holds an older
//! tree receives a delta against it instead (`delta.rs`), rebuilt into the same image
//! stream and installed the same way.

pub mod delta;

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::{self, BufReader, BufWriter, Read, Seek, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use super::checkpoint::{Checkpoint, CheckpointFile};
use crate::diskfull::{self, DiskFullPolicy, Waiter};
use crate::sync::{fdatasync, fsync_dir};

const MAGIC: &[u8; 8] = b"SEGSNAP2";
const MAGIC_V1: &[u8; 8] = b"SEGSNAP1";
const BUF_BYTES: usize = 1 << 20;
const PATH_BYTES_MAX: u32 = 4096;

struct HashWriter<W: Write> {
    inner: W,
    hash: blake3::Hasher,
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(b)?;
        self.hash.update(&b[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

struct HashReader<R: Read> {
    inner: R,
    hash: blake3::Hasher,
}

impl<R: Read> Read for HashReader<R> {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(b)?;
        self.hash.update(&b[..n]);
        Ok(n)
    }
}

fn put_str(w: &mut impl Write, s: &[u8]) -> io::Result<()> {
    w.write_all(&(s.len() as u32).to_le_bytes())?;
    w.write_all(s)
}

fn put_owner(w: &mut impl Write, m: &fs::Metadata) -> io::Result<()> {
    w.write_all(&m.uid().to_le_bytes())?;
    w.write_all(&m.gid().to_le_bytes())
}

fn bad(why: impl Into<String>) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("snapshot image: {}", why.into()),
    )
}

/// Visit every entry under `root` in image order (depth first, names sorted), with its
/// relative path and metadata. Both the length precomputation and the writer use it, so
/// they cannot disagree about what the image holds.
fn walk(
    root: &Path,
    mut visit: impl FnMut(&str, &fs::Metadata) -> io::Result<()>,
) -> io::Result<()> {
    let mut stack = vec![String::new()];
    while let Some(dir) = stack.pop() {
        let abs = if dir.is_empty() {
            root.to_path_buf()
        } else {
            root.join(&dir)
        };
        let mut names: Vec<_> = fs::read_dir(&abs)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        names.sort();
        for name in names.into_iter().rev() {
            let name = name
                .into_string()
                .map_err(|n| bad(format!("non-UTF-8 name {n:?}")))?;
            let rel = if dir.is_empty() {
                name
            } else {
                format!("{dir}/{name}")
            };
            let m = fs::symlink_metadata(root.join(&rel))?;
            visit(&rel, &m)?;
            if m.is_dir() {
                stack.push(rel);
            }
        }
    }
    Ok(())
}

/// The exact size `write_image` will produce for `root` as it is now. openraft's chunked
/// sender asks for the snapshot's length before reading it, and the image is still being
/// written then.
pub fn image_len(root: &Path) -> io::Result<u64> {
    let mut len = 8 + 4 + 8 + 1 + 32; // magic, root mode and owner, end tag, digest
    walk(root, |rel, m| {
        let path_bytes = 4 + rel.len() as u64;
        if m.is_dir() {
            len += 1 + path_bytes + 4 + 8 + 12;
        } else if m.file_type().is_symlink() {
            len += 1 + path_bytes + 4 + fs::read_link(root.join(rel))?.as_os_str().len() as u64 + 8;
        } else if m.is_file() {
            len += 1 + path_bytes + 4 + 8 + 12 + 8 + m.len();
        } else {
            len += 1 + path_bytes + 4 + 8 + 8 + 12;
        }
        Ok(())
    })?;
    Ok(len)
}

/// Why [`write_image`] stopped before the end: its `keep_going` said nobody wants the
/// image any more.
#[derive(Debug, thiserror::Error)]
#[error("abandoned: no member reads this image any more")]
pub struct Abandoned;

/// Whether `e` is [`write_image`] giving up because of `keep_going`.
pub fn is_abandoned(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<Abandoned>())
}

/// Write the image of `root` into `f` (synced); returns its size. `keep_going` is asked
/// before each node and after each MiB of content; when it says no, the write stops with
/// [`Abandoned`].
pub fn write_image(root: &Path, f: File, keep_going: &dyn Fn() -> bool) -> io::Result<u64> {
    let mut w = HashWriter {
        inner: BufWriter::with_capacity(BUF_BYTES, f),
        hash: blake3::Hasher::new(),
    };
    w.write_all(MAGIC)?;
    let root_meta = fs::metadata(root)?;
    w.write_all(&(root_meta.mode() & 0o7777).to_le_bytes())?;
    put_owner(&mut w, &root_meta)?;
    let mut buf = vec![0u8; BUF_BYTES];
    let stop_unless_wanted = || {
        if keep_going() {
            Ok(())
        } else {
            Err(io::Error::other(Abandoned))
        }
    };
    walk(root, |rel, m| {
        stop_unless_wanted()?;
        let p = root.join(rel);
        let mtime = |w: &mut HashWriter<_>| -> io::Result<()> {
            w.write_all(&m.mtime().to_le_bytes())?;
            w.write_all(&(m.mtime_nsec() as u32).to_le_bytes())
        };
        if m.is_dir() {
            w.write_all(&[1])?;
            put_str(&mut w, rel.as_bytes())?;
            w.write_all(&(m.mode() & 0o7777).to_le_bytes())?;
            put_owner(&mut w, m)?;
            mtime(&mut w)?;
        } else if m.file_type().is_symlink() {
            w.write_all(&[3])?;
            put_str(&mut w, rel.as_bytes())?;
            let target = fs::read_link(&p)?;
            put_str(&mut w, target.as_os_str().as_encoded_bytes())?;
            put_owner(&mut w, m)?;
        } else if !m.is_file() {
            w.write_all(&[4])?;
            put_str(&mut w, rel.as_bytes())?;
            w.write_all(&m.mode().to_le_bytes())?;
            w.write_all(&m.rdev().to_le_bytes())?;
            put_owner(&mut w, m)?;
            mtime(&mut w)?;
        } else {
            w.write_all(&[2])?;
            put_str(&mut w, rel.as_bytes())?;
            w.write_all(&(m.mode() & 0o7777).to_le_bytes())?;
            put_owner(&mut w, m)?;
            mtime(&mut w)?;
            let mut src = File::open(&p)?;
            let size = m.len();
            w.write_all(&size.to_le_bytes())?;
            let mut left = size;
            while left > 0 {
                let n = (left as usize).min(buf.len());
                src.read_exact(&mut buf[..n])?;
                w.write_all(&buf[..n])?;
                left -= n as u64;
                stop_unless_wanted()?;
            }
        }
        Ok(())
    })?;
    w.write_all(&[0])?;
    let digest = *w.hash.finalize().as_bytes();
    let mut inner = w.inner.into_inner().map_err(|e| e.into_error())?;
    inner.write_all(&digest)?;
    fdatasync(&inner)?;
    Ok(inner.metadata()?.len())
}

/// The snapshot id of a tree image of `len` bytes at `index`, as sent to a member.
pub fn image_id(index: u64, len: u64) -> String {
    format!("tree-{index}-{len}")
}

/// The image length an id made by [`image_id`] carries; None for another id (a checkpoint's
/// `tree-INDEX`, or an earlier release's image).
pub fn image_len_of_id(id: &str) -> Option<u64> {
    let (_, len) = id.strip_prefix("tree-")?.split_once('-')?;
    len.parse().ok()
}

/// Bytes (a digest) as lowercase hex, as `status`, `verify` and the logs show them.
pub fn hex(d: &[u8]) -> String {
    d.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The content digest of a tree: every name, its type, permission bits, size and bytes
/// (symlinks: their target), in the image walk's order. Times are left out on purpose:
/// each replica's apply sets its own mtimes, while the bytes vere reads must be identical.
/// `verify` compares this across members and `restore` checks its copy with it.
pub fn tree_digest(root: &Path) -> io::Result<[u8; 32]> {
    let mut h = blake3::Hasher::new();
    h.update(b"seguro-fs tree digest v1\0");
    h.update(&(fs::metadata(root)?.mode() & 0o7777).to_le_bytes());
    let mut buf = vec![0u8; BUF_BYTES];
    walk(root, |rel, m| {
        h.update(&(rel.len() as u32).to_le_bytes());
        h.update(rel.as_bytes());
        h.update(&(m.mode() & 0o7777).to_le_bytes());
        if m.is_dir() {
            h.update(b"d");
        } else if m.file_type().is_symlink() {
            let target = fs::read_link(root.join(rel))?;
            h.update(b"l");
            h.update(&(target.as_os_str().len() as u32).to_le_bytes());
            h.update(target.as_os_str().as_encoded_bytes());
        } else if m.is_file() {
            h.update(b"f");
            h.update(&m.len().to_le_bytes());
            let mut f = File::open(root.join(rel))?;
            let mut left = m.len();
            while left > 0 {
                let n = (left as usize).min(buf.len());
                f.read_exact(&mut buf[..n])?;
                h.update(&buf[..n]);
                left -= n as u64;
            }
        } else {
            // FIFOs, sockets, device nodes: their type and device number.
            h.update(b"o");
            h.update(&(m.mode() & libc::S_IFMT).to_le_bytes());
            h.update(&m.rdev().to_le_bytes());
        }
        Ok(())
    })?;
    Ok(*h.finalize().as_bytes())
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn read_str(r: &mut impl Read) -> io::Result<String> {
    let n = read_u32(r)?;
    if n > PATH_BYTES_MAX {
        return Err(bad("path too long"));
    }
    let mut b = vec![0u8; n as usize];
    r.read_exact(&mut b)?;
    let s = String::from_utf8(b).map_err(|_| bad("non-UTF-8 path"))?;
    // Paths come from another machine: never let one escape the new tree.
    if s.is_empty()
        || s.starts_with('/')
        || s.split('/').any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(bad(format!("unsafe path {s:?}")));
    }
    Ok(s)
}

fn set_mtime(p: &Path, sec: i64, nsec: u32) -> io::Result<()> {
    let c =
        std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).map_err(|_| bad("nul in path"))?;
    let ts = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: sec,
            tv_nsec: nsec as i64,
        },
    ];
    // SAFETY: valid path and a two-element timespec array.
    if unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Give `p` (not following a symlink) the ids an image recorded, if any. Before any
/// chmod: a chown clears set-id bits.
fn set_owner(p: &Path, ids: Option<(u32, u32)>) -> io::Result<()> {
    match ids {
        Some((uid, gid)) => std::os::unix::fs::lchown(p, Some(uid), Some(gid)),
        None => Ok(()),
    }
}

/// Unpack `image` into the empty directory `dest`, verifying the digest; everything is
/// synced when this returns Ok.
pub fn unpack_image(image: &Path, dest: &Path) -> io::Result<()> {
    unpack_from(
        BufReader::with_capacity(BUF_BYTES, File::open(image)?),
        dest,
    )
    .map(|_| ())
}

/// Unpack the image read from `image` into the empty directory `dest`, verifying and
/// returning its digest; everything is synced when this returns Ok. Reads exactly the
/// image's bytes, nothing past its digest.
fn unpack_from(image: impl Read, dest: &Path) -> io::Result<[u8; 32]> {
    let mut r = HashReader {
        inner: image,
        hash: blake3::Hasher::new(),
    };
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)?;
    let v1 = match &magic {
        MAGIC => false,
        MAGIC_V1 => true,
        _ => return Err(bad("bad magic")),
    };
    // Owners are only given when this daemon may give files away (root); an image of
    // the previous format has none.
    let owner = |r: &mut HashReader<_>| -> io::Result<Option<(u32, u32)>> {
        if v1 {
            return Ok(None);
        }
        let ids = (read_u32(r)?, read_u32(r)?);
        // SAFETY: geteuid has no preconditions.
        Ok((unsafe { libc::geteuid() } == 0).then_some(ids))
    };
    let root_mode = read_u32(&mut r)?;
    set_owner(dest, owner(&mut r)?)?;
    fs::set_permissions(dest, fs::Permissions::from_mode(root_mode))?;
    let mut buf = vec![0u8; BUF_BYTES];
    let mut dirs: Vec<(PathBuf, i64, u32)> = vec![];
    let mut synced_dirs = vec![dest.to_path_buf()];
    loop {
        let mut tag = [0u8; 1];
        r.read_exact(&mut tag)?;
        match tag[0] {
            0 => break,
            1 => {
                let rel = read_str(&mut r)?;
                let mode = read_u32(&mut r)?;
                let ids = owner(&mut r)?;
                let sec = read_u64(&mut r)? as i64;
                let nsec = read_u32(&mut r)?;
                let p = dest.join(&rel);
                fs::create_dir(&p)?;
                set_owner(&p, ids)?;
                fs::set_permissions(&p, fs::Permissions::from_mode(mode))?;
                dirs.push((p.clone(), sec, nsec));
                synced_dirs.push(p);
            }
            2 => {
                let rel = read_str(&mut r)?;
                let mode = read_u32(&mut r)?;
                let ids = owner(&mut r)?;
                let sec = read_u64(&mut r)? as i64;
                let nsec = read_u32(&mut r)?;
                let size = read_u64(&mut r)?;
                let p = dest.join(&rel);
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode)
                    .open(&p)?;
                let mut left = size;
                while left > 0 {
                    let n = (left as usize).min(buf.len());
                    r.read_exact(&mut buf[..n])?;
                    f.write_all(&buf[..n])?;
                    left -= n as u64;
                }
                set_owner(&p, ids)?;
                fs::set_permissions(&p, fs::Permissions::from_mode(mode))?;
                fdatasync(&f)?;
                drop(f);
                set_mtime(&p, sec, nsec)?;
            }
            3 => {
                let rel = read_str(&mut r)?;
                let n = read_u32(&mut r)?;
                if n > PATH_BYTES_MAX {
                    return Err(bad("symlink target too long"));
                }
                let mut t = vec![0u8; n as usize];
                r.read_exact(&mut t)?;
                let target = String::from_utf8(t).map_err(|_| bad("non-UTF-8 symlink target"))?;
                let p = dest.join(rel);
                std::os::unix::fs::symlink(target, &p)?;
                set_owner(&p, owner(&mut r)?)?;
            }
            4 if !v1 => {
                let rel = read_str(&mut r)?;
                let mode = read_u32(&mut r)?;
                let rdev = read_u64(&mut r)?;
                let ids = owner(&mut r)?;
                let sec = read_u64(&mut r)? as i64;
                let nsec = read_u32(&mut r)?;
                let kind = mode & libc::S_IFMT;
                if !matches!(
                    kind,
                    libc::S_IFIFO | libc::S_IFSOCK | libc::S_IFCHR | libc::S_IFBLK
                ) {
                    return Err(bad(format!("special record of type {kind:#o}")));
                }
                let p = dest.join(&rel);
                let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
                    .map_err(|_| bad("nul in path"))?;
                // SAFETY: a valid path; the type is one mknod makes.
                if unsafe { libc::mknod(c.as_ptr(), kind | 0o600, rdev as libc::dev_t) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                set_owner(&p, ids)?;
                fs::set_permissions(&p, fs::Permissions::from_mode(mode & 0o7777))?;
                set_mtime(&p, sec, nsec)?;
            }
            t => return Err(bad(format!("unknown record tag {t}"))),
        }
    }
    let digest = *r.hash.finalize().as_bytes();
    let mut want = [0u8; 32];
    r.inner.read_exact(&mut want)?;
    if digest != want {
        return Err(bad("digest mismatch (corrupt or truncated transfer)"));
    }
    // Directory mtimes last: creating entries inside would bump them again.
    for (p, sec, nsec) in dirs.into_iter().rev() {
        set_mtime(&p, sec, nsec)?;
    }
    for d in synced_dirs {
        fsync_dir(&d)?;
    }
    Ok(digest)
}

/// Progress of an image being written by another thread.
pub const IMAGE_WRITING: u8 = 0;
pub const IMAGE_DONE: u8 = 1;
pub const IMAGE_FAILED: u8 = 2;
/// Still being written, and a transfer has read from it: its walk is finished even if
/// that transfer fails, so the next one (same index) reuses the image.
pub const IMAGE_WRITING_READ: u8 = 3;

/// openraft's snapshot data: a file, which may still be growing while a thread writes the
/// image into it. Reading at the current end waits (polling every few milliseconds) until
/// more bytes arrive or the writer finishes, so openraft can start streaming chunks to a
/// member that is behind long before a large image is complete — the replication stream
/// to that member, which also carries its heartbeats, never stalls for the whole build.
pub struct SnapshotFile {
    file: tokio::fs::File,
    progress: Option<Arc<AtomicU8>>,
    /// The final length of a growing image (seeks from the end use it).
    final_len: u64,
    wait: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Set on a file that receives chunks: reads, writes and seeks go to it directly.
    direct: Option<File>,
    /// How a received chunk that meets a full disk waits for space (receiving files only),
    /// and the wait under way.
    disk: Option<DiskFullPolicy>,
    full: Option<Waiter>,
}

const GROWING_POLL: Duration = Duration::from_millis(5);

impl SnapshotFile {
    /// A complete file.
    pub fn complete(file: File) -> SnapshotFile {
        SnapshotFile {
            file: tokio::fs::File::from_std(file),
            progress: None,
            final_len: 0,
            wait: None,
            direct: None,
            disk: None,
            full: None,
        }
    }

    /// A file that openraft writes received chunks into. Its writes are made at once, not
    /// in a background task as tokio's File makes them: when openraft has taken a chunk,
    /// its bytes are in the file, where the peer server rebuilds a delta from them
    /// (`network.rs`). A chunk is at most `snapshot_chunk_bytes`, written to the page
    /// cache. A write that meets a full disk is tried again every `disk_full_retry_ms` for
    /// up to `disk_full_wait_ms` (its request waits; the leader resends a request that
    /// times out meanwhile), like an apply, instead of failing the transfer.
    pub fn receiving(file: File, disk: DiskFullPolicy) -> io::Result<SnapshotFile> {
        Ok(SnapshotFile {
            direct: Some(file.try_clone()?),
            disk: Some(disk),
            ..SnapshotFile::complete(file)
        })
    }

    /// A file another thread is still writing up to `final_len` bytes; `progress` says
    /// when it is done.
    pub fn growing(file: File, progress: Arc<AtomicU8>, final_len: u64) -> SnapshotFile {
        SnapshotFile {
            progress: Some(progress),
            final_len,
            ..SnapshotFile::complete(file)
        }
    }

    pub async fn sync_data(&self) -> io::Result<()> {
        match &self.direct {
            Some(f) => fdatasync(f),
            None => self.file.sync_data().await,
        }
    }
}

impl tokio::io::AsyncRead for SnapshotFile {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(f) = &mut this.direct {
            let n = f.read(buf.initialize_unfilled())?;
            buf.advance(n);
            return Poll::Ready(Ok(()));
        }
        if let Some(p) = &this.progress {
            let _ = p.compare_exchange(
                IMAGE_WRITING,
                IMAGE_WRITING_READ,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
        loop {
            // Read the writer's state before reading: an end of file seen after it was
            // done is the real end.
            let state = this
                .progress
                .as_ref()
                .map_or(IMAGE_DONE, |p| p.load(Ordering::Acquire));
            if state == IMAGE_FAILED {
                return Poll::Ready(Err(io::Error::other("building the tree image failed")));
            }
            let before = buf.filled().len();
            ready!(Pin::new(&mut this.file).poll_read(cx, buf))?;
            if buf.filled().len() > before || state == IMAGE_DONE || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            let wait = this
                .wait
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(GROWING_POLL)));
            ready!(wait.as_mut().poll(cx));
            this.wait = None;
        }
    }
}

impl tokio::io::AsyncWrite for SnapshotFile {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let Some(f) = &mut this.direct else {
            return Pin::new(&mut this.file).poll_write(cx, buf);
        };
        loop {
            if let Some(sleep) = &mut this.wait {
                ready!(sleep.as_mut().poll(cx));
                this.wait = None;
            }
            match (f.write(buf), &this.disk) {
                (Err(e), Some(disk)) if diskfull::is_full(&e) => {
                    let waiter = this
                        .full
                        .get_or_insert_with(|| disk.waiter("receiving a snapshot chunk"));
                    match waiter.full(&e) {
                        Some(d) => this.wait = Some(Box::pin(tokio::time::sleep(d))),
                        None => return Poll::Ready(Err(e)),
                    }
                }
                (written, _) => {
                    // Ends a wait for space, if there was one (logged when dropped).
                    this.full = None;
                    return Poll::Ready(written);
                }
            }
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match &this.direct {
            Some(_) => Poll::Ready(Ok(())),
            None => Pin::new(&mut this.file).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match &this.direct {
            Some(_) => Poll::Ready(Ok(())),
            None => Pin::new(&mut this.file).poll_shutdown(cx),
        }
    }
}

impl tokio::io::AsyncSeek for SnapshotFile {
    fn start_seek(self: Pin<&mut Self>, position: io::SeekFrom) -> io::Result<()> {
        let this = self.get_mut();
        if let Some(f) = &mut this.direct {
            f.seek(position)?;
            return Ok(());
        }
        let position = match (position, &this.progress) {
            // The end of a growing image is where it will end, not where it is now.
            (io::SeekFrom::End(delta), Some(_)) => io::SeekFrom::Start(
                this.final_len
                    .checked_add_signed(delta)
                    .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?,
            ),
            (p, _) => p,
        };
        Pin::new(&mut this.file).start_seek(position)
    }
    fn poll_complete(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        let this = self.get_mut();
        match &mut this.direct {
            // A direct seek was made in start_seek.
            Some(f) => Poll::Ready(f.stream_position()),
            None => Pin::new(&mut this.file).poll_complete(cx),
        }
    }
}

fn pending_path(data_dir: &Path) -> PathBuf {
    data_dir.join("install.pending")
}

/// Build `data_dir/tree.new` from the received `image` (or delta), synced. `tree/` is
/// left alone, so this can be tried again from the start (after a full disk, say).
pub fn build_new_tree(data_dir: &Path, image: &Path) -> io::Result<()> {
    if delta::is_delta(image)? {
        // Usually rebuilt already, when the last chunk arrived (`network.rs`), where a
        // stale delta can still be refused without stopping this member's Raft.
        if !delta::prepared(data_dir, &delta::closing_digest(image)?) {
            delta::prepare(data_dir, image)?;
        }
        return Ok(());
    }
    delta::forget_prepared(data_dir)?;
    let new = data_dir.join("tree.new");
    let _ = fs::remove_dir_all(&new);
    fs::create_dir(&new)?;
    unpack_image(image, &new)
}

/// Swap the tree `build_new_tree` made in for `tree/` and record `ckpt` as applied. Can be
/// tried again after a failure: every step is idempotent.
pub fn install(
    data_dir: &Path,
    ckpt: &Checkpoint,
    ckpt_file: &mut CheckpointFile,
) -> io::Result<()> {
    // From here a crash is finished by recover_install: the pending file holds the
    // checkpoint to record once tree.new has become tree.
    let (mut pending, _) = CheckpointFile::open(&pending_path(data_dir))?;
    pending.write(ckpt)?;
    fsync_dir(data_dir)?;
    finish_install(data_dir, ckpt, ckpt_file)
}

fn finish_install(
    data_dir: &Path,
    ckpt: &Checkpoint,
    ckpt_file: &mut CheckpointFile,
) -> io::Result<()> {
    let tree = data_dir.join("tree");
    let new = data_dir.join("tree.new");
    let old = data_dir.join("tree.old");
    if new.exists() {
        if tree.exists() {
            let _ = fs::remove_dir_all(&old);
            fs::rename(&tree, &old)?;
        }
        fs::rename(&new, &tree)?;
        fsync_dir(data_dir)?;
    }
    ckpt_file.write(ckpt)?;
    fs::remove_file(pending_path(data_dir))?;
    let _ = fs::remove_file(delta::ready_path(data_dir));
    fsync_dir(data_dir)?;
    let _ = fs::remove_dir_all(&old);
    Ok(())
}

/// Finish an install that a crash interrupted after its image was unpacked and synced;
/// returns the checkpoint it recorded. A crash before that point left `tree/` untouched
/// (a stray `tree.new/` is removed by the next install).
pub fn recover_install(
    data_dir: &Path,
    ckpt_file: &mut CheckpointFile,
) -> io::Result<Option<Checkpoint>> {
    if !pending_path(data_dir).exists() {
        return Ok(None);
    }
    let (_, ckpt) = CheckpointFile::open(&pending_path(data_dir))?;
    if ckpt.applied.is_none() {
        // The crash hit while the pending checkpoint itself was written: the old tree is
        // intact, so drop the half-done install (openraft will send the snapshot again).
        let _ = fs::remove_file(delta::ready_path(data_dir));
        let _ = fs::remove_dir_all(data_dir.join("tree.new"));
        fs::remove_file(pending_path(data_dir))?;
        fsync_dir(data_dir)?;
        return Ok(None);
    }
    finish_install(data_dir, &ckpt, ckpt_file)?;
    Ok(Some(ckpt))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A member learns a whole image's length from its id (to show what it has still to
    /// receive); a checkpoint's id, or an earlier release's, carries none.
    #[test]
    fn an_image_id_carries_its_length() {
        assert_eq!(
            image_len_of_id(&image_id(42, 268_435_456)),
            Some(268_435_456)
        );
        assert_eq!(image_len_of_id(&image_id(0, 0)), Some(0));
        assert_eq!(image_len_of_id("tree-42"), None);
        assert_eq!(image_len_of_id("tree-42-x"), None);
        assert_eq!(image_len_of_id("other-1-2"), None);
    }
    use crate::sync::tests::TempDir;

    fn digest_dir(root: &Path) -> Vec<(String, Vec<u8>, u32)> {
        let mut out = vec![];
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                let m = fs::symlink_metadata(e.path()).unwrap();
                let rel = e.path().strip_prefix(root).unwrap().display().to_string();
                if m.is_dir() {
                    stack.push(e.path());
                    out.push((rel, vec![], m.mode() & 0o7777));
                } else if m.file_type().is_symlink() {
                    out.push((
                        rel,
                        fs::read_link(e.path())
                            .unwrap()
                            .display()
                            .to_string()
                            .into_bytes(),
                        0,
                    ));
                } else if m.is_file() {
                    out.push((rel, fs::read(e.path()).unwrap(), m.mode() & 0o7777));
                } else {
                    out.push((rel, m.rdev().to_le_bytes().to_vec(), m.mode()));
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn image_round_trips_and_corruption_is_caught() {
        let t = TempDir::new("snap");
        let src = t.path().join("src");
        fs::create_dir_all(src.join("0i0/sub")).unwrap();
        fs::set_permissions(&src, fs::Permissions::from_mode(0o750)).unwrap();
        fs::write(src.join("0i0/data.mdb"), vec![7u8; 3 * BUF_BYTES + 5]).unwrap();
        fs::write(src.join("0i0/epoc.txt"), b"2").unwrap();
        fs::write(src.join("empty"), b"").unwrap();
        fs::set_permissions(src.join("empty"), fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink("0i0/epoc.txt", src.join("link")).unwrap();
        let fifo =
            std::ffi::CString::new(src.join("0i0/fifo").as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o640) }, 0);
        let am_root = unsafe { libc::geteuid() } == 0;
        if am_root {
            std::os::unix::fs::lchown(src.join("empty"), Some(1234), Some(5678)).unwrap();
            std::os::unix::fs::lchown(src.join("link"), Some(4321), Some(8765)).unwrap();
        }

        // A reader of a growing image sees every byte, waiting at the end until the
        // writer is done.
        let grown = t.path().join("grown");
        let progress = Arc::new(AtomicU8::new(IMAGE_WRITING));
        let reader_file = {
            File::create(&grown).unwrap();
            File::open(&grown).unwrap()
        };
        let (p2, src2, grown2) = (progress.clone(), src.clone(), grown.clone());
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            let f = OpenOptions::new().write(true).open(&grown2).unwrap();
            write_image(&src2, f, &|| true).unwrap();
            p2.store(IMAGE_DONE, Ordering::Release);
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let streamed = rt.block_on(async {
            use tokio::io::AsyncReadExt;
            use tokio::io::AsyncSeekExt;
            let want = image_len(&src).unwrap();
            let mut r = SnapshotFile::growing(reader_file, progress, want);
            // openraft learns the length first, then reads from the start.
            assert_eq!(r.seek(io::SeekFrom::End(0)).await.unwrap(), want);
            r.seek(io::SeekFrom::Start(0)).await.unwrap();
            let mut all = Vec::new();
            r.read_to_end(&mut all).await.unwrap();
            all
        });
        writer.join().unwrap();
        assert_eq!(streamed, fs::read(&grown).unwrap());
        assert!(streamed.len() > 3 * BUF_BYTES);
        let img = t.path().join("img");
        write_image(&src, File::create(&img).unwrap(), &|| true).unwrap();
        let dst = t.path().join("dst");
        fs::create_dir(&dst).unwrap();
        unpack_image(&img, &dst).unwrap();
        assert_eq!(digest_dir(&src), digest_dir(&dst));
        let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(&dst), mode(&src), "the tree root's mode travels too");
        if am_root {
            let ids = |p: &Path| {
                let m = fs::symlink_metadata(p).unwrap();
                (m.uid(), m.gid())
            };
            assert_eq!(ids(&dst.join("empty")), (1234, 5678), "owners travel");
            assert_eq!(
                ids(&dst.join("link")),
                (4321, 8765),
                "a symlink's owner too"
            );
        }

        // A flipped byte or a truncated image is refused.
        let mut bytes = fs::read(&img).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 1;
        fs::write(&img, &bytes).unwrap();
        let dst2 = t.path().join("dst2");
        fs::create_dir(&dst2).unwrap();
        assert!(unpack_image(&img, &dst2).is_err());
        bytes[mid] ^= 1;
        fs::write(&img, &bytes[..bytes.len() - 40]).unwrap();
        let dst3 = t.path().join("dst3");
        fs::create_dir(&dst3).unwrap();
        assert!(unpack_image(&img, &dst3).is_err());
    }

    #[test]
    fn tree_digest_sees_content_names_and_modes_not_times() {
        let t = TempDir::new("digest");
        let a = t.path().join("a");
        fs::create_dir_all(a.join("0i0")).unwrap();
        fs::write(a.join("0i0/data.mdb"), vec![1u8; BUF_BYTES + 3]).unwrap();
        std::os::unix::fs::symlink("0i0", a.join("cur")).unwrap();
        let d0 = tree_digest(&a).unwrap();
        set_mtime(&a.join("0i0/data.mdb"), 5, 6).unwrap();
        assert_eq!(tree_digest(&a).unwrap(), d0, "mtimes are not part of it");
        let img = t.path().join("img");
        write_image(&a, File::create(&img).unwrap(), &|| true).unwrap();
        let b = t.path().join("b");
        fs::create_dir(&b).unwrap();
        unpack_image(&img, &b).unwrap();
        assert_eq!(
            tree_digest(&b).unwrap(),
            d0,
            "an unpacked image has the same digest"
        );
        // One flipped byte, a mode, a name: each changes it.
        let mut bytes = fs::read(b.join("0i0/data.mdb")).unwrap();
        bytes[BUF_BYTES + 1] ^= 0x40;
        fs::write(b.join("0i0/data.mdb"), &bytes).unwrap();
        assert_ne!(tree_digest(&b).unwrap(), d0);
        bytes[BUF_BYTES + 1] ^= 0x40;
        fs::write(b.join("0i0/data.mdb"), &bytes).unwrap();
        assert_eq!(tree_digest(&b).unwrap(), d0);
        fs::set_permissions(b.join("0i0"), fs::Permissions::from_mode(0o700)).unwrap();
        assert_ne!(tree_digest(&b).unwrap(), d0);
        fs::rename(a.join("cur"), a.join("cur2")).unwrap();
        assert_ne!(tree_digest(&a).unwrap(), d0);
    }

    #[test]
    fn paths_cannot_escape() {
        for p in ["../x", "/etc/passwd", "a/../../b", "a//b", ""] {
            let mut b = Vec::new();
            put_str(&mut b, p.as_bytes()).unwrap();
            assert!(read_str(&mut &b[..]).is_err(), "{p:?} accepted");
        }
    }
}
