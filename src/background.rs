//! `seguro-fs mount --background`: check everything that can be checked in the foreground,
//! then fork (before any thread exists), and let the parent wait on a pipe until the child
//! daemon reports that it mounted (exit 0) or why it could not (its message, exit 1).
//! The child starts its own session, reads /dev/null and appends its output to the log
//! file. This is what fstab mounts run, through mount.seguro-fs or mount.fuse3.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::{MountConfig, BACKGROUND_READY_MARGIN_MS, LOG_FILE_BYTES_MAX};
use crate::ready::{Ready, MOUNTED};

/// The most of a startup error the parent reads from the pipe.
const READY_MESSAGE_BYTES_MAX: usize = 64 << 10;

/// Which side of the fork this is.
// Returned once per process: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Detached {
    /// The daemon reported that it mounted.
    Parent,
    /// The daemon: run it with this config (absolute paths) and report through `Ready`.
    Child(MountConfig, Ready),
}

fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// The `.1` file a rotated log is moved to.
fn rotated(log: &Path) -> PathBuf {
    let mut p = log.to_path_buf().into_os_string();
    p.push(".1");
    p.into()
}

/// Open the log for appending, first moving a log above [`LOG_FILE_BYTES_MAX`] to `.1`.
fn open_log(cfg: &MountConfig) -> Result<File, String> {
    // The default log lives in the data dir, which may not exist yet; the daemon creates
    // it the same way (DataDir::open).
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(&cfg.data_dir)
        .map_err(|e| format!("data dir {}: {e}", cfg.data_dir.display()))?;
    let log = &cfg.log_file;
    let shown = || log.display().to_string();
    if std::fs::metadata(log).is_ok_and(|m| m.len() > LOG_FILE_BYTES_MAX) {
        std::fs::rename(log, rotated(log)).map_err(|e| format!("log file {}: {e}", shown()))?;
    }
    OpenOptions::new()
        .append(true)
        .create(true)
        // The log names paths and peers: for the daemon's user only, like the data dir.
        .mode(0o600)
        .open(log)
        .map_err(|e| format!("log file {}: {e}", shown()))
}

/// fork(2) is only sound while this is the process's only thread.
fn single_threaded() -> Result<(), String> {
    let threads = std::fs::read_dir("/proc/self/task")
        .map_err(|e| format!("/proc/self/task: {e}"))?
        .count();
    if threads == 1 {
        Ok(())
    } else {
        Err(format!(
            "internal error: {threads} threads exist before the daemon forks"
        ))
    }
}

fn absolute(p: &mut PathBuf) -> Result<(), String> {
    *p = std::path::absolute(&*p).map_err(|e| format!("{}: {e}", p.display()))?;
    Ok(())
}

/// Fork the daemon. Returns `Parent` once it has mounted, `Child` in the daemon, or the
/// reason it did not start (in the parent: the daemon's own message).
pub fn detach(mut cfg: MountConfig) -> Result<Detached, String> {
    crate::daemon::preflight(&cfg).map_err(|e| e.to_string())?;
    // The daemon works from / (so it keeps no directory busy); relative paths must not
    // change meaning.
    absolute(&mut cfg.data_dir)?;
    absolute(&mut cfg.mountpoint)?;
    absolute(&mut cfg.log_file)?;
    if let Some(p) = cfg.fault_log_sync_file.as_mut() {
        absolute(p)?;
    }
    let log = open_log(&cfg)?;
    let devnull = File::open("/dev/null").map_err(|e| format!("/dev/null: {e}"))?;
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(os_err("pipe"));
    }
    // SAFETY: both fds were just created and are owned here only.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    single_threaded()?;
    // SAFETY: the process has a single thread (checked above), so the child inherits no
    // lock held by another thread.
    match unsafe { libc::fork() } {
        -1 => Err(os_err("fork")),
        0 => {
            drop(read_end);
            let mut ready = Ready::new(Some(write_end));
            if let Err(e) = become_daemon(&log, &devnull) {
                ready.failed(&e);
                return Err(e);
            }
            Ok(Detached::Child(cfg, ready))
        }
        pid => {
            drop(write_end);
            wait_ready(File::from(read_end), pid, &cfg).map(|()| Detached::Parent)
        }
    }
}

/// In the child: a new session without a terminal, stdin from /dev/null, stdout and
/// stderr (where tracing writes) appended to the log.
fn become_daemon(log: &File, devnull: &File) -> Result<(), String> {
    // SAFETY: plain syscalls on fds this process owns.
    unsafe {
        if libc::setsid() < 0 {
            return Err(os_err("setsid"));
        }
        if libc::dup2(devnull.as_raw_fd(), 0) < 0
            || libc::dup2(log.as_raw_fd(), 1) < 0
            || libc::dup2(log.as_raw_fd(), 2) < 0
        {
            return Err(os_err("redirecting the daemon's output to its log"));
        }
    }
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
    tracing::info!(
        pid = std::process::id(),
        "seguro-fs daemon starting in the background"
    );
    Ok(())
}

/// In the parent: wait (bounded) for "ok" or an error message, then end-of-file.
fn wait_ready(mut pipe: File, pid: i32, cfg: &MountConfig) -> Result<(), String> {
    let wait_ms = cfg.limits.ready_timeout_ms + BACKGROUND_READY_MARGIN_MS;
    let deadline = Instant::now() + Duration::from_millis(wait_ms);
    let log = cfg.log_file.display();
    let mut message = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "the daemon (pid {pid}) did not report within {wait_ms} ms whether it \
                 mounted; it may still be starting: see {log}"
            ));
        }
        let mut pfd = libc::pollfd {
            fd: pipe.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("waiting for the daemon: {e}"));
        }
        if n == 0 {
            continue;
        }
        match pipe.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                let room = READY_MESSAGE_BYTES_MAX.saturating_sub(message.len());
                message.extend_from_slice(&chunk[..n.min(room)]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("waiting for the daemon: {e}")),
        }
    }
    if message == MOUNTED {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&message);
    let text = text.trim();
    if text.is_empty() {
        Err(format!("the daemon exited before mounting; see {log}"))
    } else {
        Err(text.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_oversized_log_is_moved_aside() {
        let t = crate::sync::tests::TempDir::new("background");
        let data_dir = t.path().join("data");
        let mut cfg = crate::settings::tests::standalone(&data_dir, &t.path().join("mp"));
        cfg.log_file = t.path().join("d.log");
        // A new data dir is created for the default log's sake.
        drop(open_log(&cfg).unwrap());
        assert!(data_dir.is_dir());
        std::fs::write(&cfg.log_file, b"small").unwrap();
        drop(open_log(&cfg).unwrap());
        assert!(!rotated(&cfg.log_file).exists(), "a small log is kept");
        let f = File::options().write(true).open(&cfg.log_file).unwrap();
        f.set_len(LOG_FILE_BYTES_MAX + 1).unwrap();
        drop(open_log(&cfg).unwrap());
        assert_eq!(
            std::fs::metadata(rotated(&cfg.log_file)).unwrap().len(),
            LOG_FILE_BYTES_MAX + 1
        );
        assert_eq!(std::fs::metadata(&cfg.log_file).unwrap().len(), 0);
    }
}
