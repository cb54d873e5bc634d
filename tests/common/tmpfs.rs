//! Test support: a small tmpfs, a file system that really runs out of space, mounted on a
//! directory for the length of a test and unmounted (lazily) by its drop guard.
#![allow(dead_code)]

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted at a path. Declare it after the `TestDir` that holds the path and
/// before the daemons that use it, so it is unmounted after they stop.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// `mount -t tmpfs -o size=SIZE` on `dir` (created if missing); the tests run as root.
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("running mount");
        assert!(
            status.success(),
            "mount -t tmpfs on {}: {status}",
            dir.display()
        );
        Tmpfs(dir.to_path_buf())
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Free bytes (statvfs f_bavail × f_frsize).
    pub fn free_bytes(&self) -> u64 {
        let c = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: statvfs fills the zeroed struct for a valid NUL-terminated path.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
        st.f_bavail * st.f_frsize
    }

    /// Write `name` (in the tmpfs's root) until the file system answers ENOSPC.
    pub fn fill(&self, name: &str) -> PathBuf {
        let p = self.0.join(name);
        let mut f = fs::File::create(&p).unwrap();
        let chunk = vec![0x5au8; 64 << 10];
        // Bounded: even a 1 GiB tmpfs takes 16384 chunks (then 4 KiB ones for the rest).
        for _ in 0..1 << 16 {
            match f.write(&chunk) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                    let small = [0x5au8; 4096];
                    for _ in 0..16 {
                        if f.write(&small).is_err() {
                            break;
                        }
                    }
                    return p;
                }
                Err(e) => panic!("filling {}: {e}", p.display()),
            }
        }
        panic!("{} never filled up", self.0.display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
