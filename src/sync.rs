//! Durability primitives shared by the log, the checkpoint and the data dir: fdatasync,
//! directory fsync and the write-temp-then-rename pattern.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// fdatasync(2): the file's data and the metadata needed to read it back (its size).
pub fn fdatasync(file: &File) -> io::Result<()> {
    // SAFETY: plain syscall on an fd we borrow for the duration of the call.
    if unsafe { libc::fdatasync(file.as_raw_fd()) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// fsync a directory so that names created, renamed or removed in it are durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Replace `path` with `bytes` atomically and durably: write a temp file, fdatasync it,
/// rename it over `path`, fsync the directory.
pub fn write_file_durably(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        // The daemon's own state (vote, purged, identity): nobody else's to read or change.
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    fdatasync(&f)?;
    fs::rename(&tmp, path)?;
    fsync_dir(path.parent().unwrap_or(Path::new(".")))
}

#[cfg(test)]
pub mod tests {
    use std::path::{Path, PathBuf};

    /// A unique directory under the system temp dir, removed on drop (even on panic).
    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new(tag: &str) -> TempDir {
            use std::sync::atomic::{AtomicU64, Ordering};
            static N: AtomicU64 = AtomicU64::new(0);
            let p = std::env::temp_dir().join(format!(
                "seguro-unit-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Poll `cond` every 5 ms for at most 20 s.
    pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !cond() {
            assert!(std::time::Instant::now() < deadline, "timed out: {what}");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn durable_write_replaces_content() {
        let t = TempDir::new("sync");
        let p = t.path().join("f");
        super::write_file_durably(&p, b"one").unwrap();
        super::write_file_durably(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert!(!p.with_extension("tmp").exists());
    }
}
