//! Direct writes of the log's large records and of large tree writes: their page-aligned
//! middle goes to the disk with O_DIRECT instead of through the page cache.
//!
//! Why: a buffered write copies every byte into a page-cache page, and for the log's large
//! records (sequential writes arrive as 1 MiB entries) those are new pages. On the virtual
//! machines this project is measured on, touching a page the guest just got back from the
//! host (free page reporting) costs a host fault, and two vCPUs doing it at once serialise:
//! measured here, one writer fills new page-cache pages at 2.6–4.4 GB/s, two at once at
//! ~0.75 GB/s each, while overwriting cached pages runs at 5.5 GB/s either way. Under a
//! 3-node sequential write half the machine's CPU went to that copy (docs/TUNING.md). The
//! log gains nothing from caching these bytes: the newest entries are kept decoded in
//! memory (`log_cache_bytes`) and followers get them from the sender's memory.
//!
//! Durability does not move: O_DIRECT alone guarantees nothing (the device may cache the
//! data, and a size change is only in the journal), and the append's fdatasync still runs
//! after every write of the batch and makes all of it durable, page cache and direct
//! alike. The on-disk format does not change either: the unaligned head and tail of a
//! record go through the page cache as before, so no page is ever written both ways by
//! one append.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use rkyv::util::AlignedVec;

/// Alignment of a direct write's file offset, length and buffer: the page size of the
/// x86-64 hosts this is built for, so a page is written either through the cache or
/// directly, never both. (With larger pages the kernel still keeps the two coherent, by
/// writing back and dropping the cached pages a direct write overlaps.)
const ALIGN_BYTES: usize = 4096;

/// Direct writes for one log: the size from which a record goes direct, and the aligned
/// buffer its middle is copied into (kept, so its pages stay mapped from one record to
/// the next).
pub struct DirectWrites {
    min_bytes: u64,
    buf: AlignedVec<ALIGN_BYTES>,
}

impl std::fmt::Debug for DirectWrites {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectWrites")
            .field("min_bytes", &self.min_bytes)
            .finish_non_exhaustive()
    }
}

impl DirectWrites {
    /// Records of `min_bytes` and more go direct; 0 turns direct writes off.
    pub fn new(min_bytes: u64) -> Option<DirectWrites> {
        (min_bytes > 0).then(|| DirectWrites {
            min_bytes,
            buf: AlignedVec::new(),
        })
    }

    /// A second handle on the segment at `path` for direct writes, if its file system
    /// takes them at page alignment (statx STATX_DIOALIGN); `None` writes everything
    /// through the page cache, as on a file system without direct I/O (tmpfs, FUSE).
    pub fn open(&self, path: &Path, buffered: &File) -> Option<File> {
        let (offset_align, mem_align) = dio_align(buffered)?;
        if offset_align == 0
            || mem_align == 0
            || ALIGN_BYTES % offset_align as usize != 0
            || ALIGN_BYTES % mem_align as usize != 0
        {
            return None;
        }
        match OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::debug!(file = %path.display(), error = %e, "no direct writes for this file");
                None
            }
        }
    }

    /// Whether a record of `len` bytes goes direct.
    pub fn wants(&self, len: u64) -> bool {
        len >= self.min_bytes
    }

    /// Write `bytes` at `offset`: the page-aligned middle through `direct`, the rest
    /// through `buffered` (the same file). A short direct write, or one that fails for a
    /// reason of its own (EINVAL, ENOMEM: anything but what a buffered write would meet
    /// too), is finished through the page cache: the outcome must not depend on the
    /// path, or a tree replica would record an op result the others do not.
    pub fn write_at(
        &mut self,
        buffered: &File,
        direct: &File,
        bytes: &[u8],
        offset: u64,
    ) -> io::Result<()> {
        let (head, middle) = split(offset, bytes.len() as u64);
        if middle == 0 {
            return buffered.write_all_at(bytes, offset);
        }
        let (head, middle) = (head as usize, middle as usize);
        buffered.write_all_at(&bytes[..head], offset)?;
        self.buf.clear();
        self.buf.extend_from_slice(&bytes[head..head + middle]);
        let at = offset + head as u64;
        let done = match direct.write_at(&self.buf, at) {
            Ok(n) => n,
            Err(e) if is_shared_failure(&e) => return Err(e),
            Err(e) => {
                tracing::debug!(error = %e, "a direct write failed; writing through the page cache");
                0
            }
        };
        buffered.write_all_at(&bytes[head + done..], at + done as u64)
    }
}

/// Failures the page cache would meet as well: the disk (EIO), no room (ENOSPC, EDQUOT),
/// a read-only file system. Returned as they are, for the caller's full-disk or fatal path.
fn is_shared_failure(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EIO) | Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EROFS)
    )
}

/// For a record of `len` bytes at `offset`: the length of its head before the first page
/// boundary, and of the page-aligned middle after it (0 if it spans no whole page).
pub fn split(offset: u64, len: u64) -> (u64, u64) {
    let a = ALIGN_BYTES as u64;
    let start = offset.next_multiple_of(a);
    let end = (offset + len) / a * a;
    if end <= start {
        (len, 0)
    } else {
        (start - offset, end - start)
    }
}

/// The file system's direct I/O alignment for this file (offset, memory), if it has one.
fn dio_align(file: &File) -> Option<(u32, u32)> {
    // SAFETY: statx fills the zeroed struct we own; the empty path with AT_EMPTY_PATH
    // names the fd we borrow for the call.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    (rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0)
        .then_some((stx.stx_dio_offset_align, stx.stx_dio_mem_align))
}

#[cfg(test)]
/// Which pages of the file at `path` are in the page cache (mincore of a mapping
/// that is never touched, so looking does not bring any in).
pub fn resident_pages(path: &Path) -> Vec<bool> {
    let f = File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    let mut pages = vec![0u8; len.div_ceil(4096)];
    // SAFETY: a read-only shared mapping of a file we hold open, only passed to
    // mincore and unmapped before it goes out of scope.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED, "{}", io::Error::last_os_error());
        assert_eq!(libc::mincore(p, len, pages.as_mut_ptr()), 0);
        libc::munmap(p, len);
    }
    pages.iter().map(|b| b & 1 == 1).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_splits_at_page_boundaries() {
        // (offset, len) -> (head, middle)
        let table = [
            ((0, 4096), (0, 4096)),
            ((0, 4095), (4095, 0)),
            ((1, 4096), (4096, 0)),
            ((100, 1 << 20), (3996, (1 << 20) - 4096)),
            ((4096, 3 * 4096 + 5), (0, 3 * 4096)),
            ((4000, 200), (200, 0)),
            ((4000, 8192 + 96), (96, 8192)),
        ];
        for ((offset, len), want) in table {
            let (head, middle) = split(offset, len);
            assert_eq!((head, middle), want, "offset {offset} len {len}");
            assert!((offset + head) % 4096 == 0 || middle == 0);
            assert!(head + middle <= len);
        }
    }
}
