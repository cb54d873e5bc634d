//! Test support: real seguro-fs daemons as child processes, real FUSE mounts, and drop
//! guards that unmount and stop them by PID even when a test fails.
#![allow(dead_code)]

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a daemon gets to mount, and to exit after SIGTERM.
const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// Daemon arguments that checkpoint every 16 entries and keep no log below a checkpoint,
/// so a member behind gets a snapshot (and `raft/purged` is written).
pub const PURGE_AT_EVERY_CHECKPOINT: [&str; 6] = [
    "--checkpoint-entries",
    "16",
    "--log-keep-entries",
    "0",
    "--log-keep-bytes",
    "0",
];

/// Keep `cmd`'s child from inheriting this test process's open files. LMDB opens data.mdb
/// without O_CLOEXEC, so a daemon that a parallel test starts while this process has an env
/// open in some test's mount holds that file for its whole life, and the mount's clean stop
/// fails with EBUSY (seen once in `tests/diskfull.rs`, a daemon that "did not stop"). Every
/// descriptor above stderr is marked close-on-exec in the child before it execs.
pub fn no_inherited_files(cmd: &mut Command) -> &mut Command {
    // SAFETY: the closure runs between fork and exec and makes one async-signal-safe
    // system call.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, || {
            let r = libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            if r == -1 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        })
    }
}

/// The daemon under test; `SEGURO_BIN` names another build (to measure a release against
/// an earlier one with the same test).
pub fn bin() -> PathBuf {
    std::env::var_os("SEGURO_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_seguro-fs")),
        PathBuf::from,
    )
}

/// A directory removed on drop. Declare it before the daemons that use it, so it is
/// dropped after they are stopped.
pub struct TestDir(PathBuf);

impl TestDir {
    pub fn new(tag: &str) -> TestDir {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let base = std::env::var_os("SEGURO_TEST_TMP")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let p = base.join(format!(
            "seguro-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TestDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        // Dead mounts left by kill -9 (see `Daemon::kill9`) go first.
        let prefix = format!("{}/", self.0.display());
        for m in fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| m.starts_with(&prefix))
        {
            force_unmount(Path::new(m));
        }
        let _ = fs::remove_dir_all(&self.0);
    }
}

pub fn is_mounted(mountpoint: &Path) -> bool {
    let Ok(canon) = mountpoint.canonicalize() else {
        // A dead FUSE mount ("transport endpoint not connected") cannot be resolved.
        return fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split(' ').nth(4) == mountpoint.to_str());
    };
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4).map(Path::new) == Some(canon.as_path()))
}

/// Detach a mount whose daemon is gone.
pub fn force_unmount(mountpoint: &Path) {
    let _ = Command::new("umount")
        .arg("-l")
        .arg(mountpoint)
        .stderr(Stdio::null())
        .status();
}

/// A running `seguro-fs mount` child.
pub struct Daemon {
    child: Option<Child>,
    pub data_dir: PathBuf,
    pub mountpoint: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    /// Start a daemon and wait until its mount is up. Panics with the daemon's log if it
    /// exits or does not mount in time.
    pub fn start(data_dir: &Path, mountpoint: &Path, extra: &[&str]) -> Daemon {
        // A mount left dead by a previous kill -9 is detached only now, when whoever used
        // it has been stopped: detaching it earlier would let a straggler write into the
        // directory underneath.
        if is_mounted(mountpoint) {
            force_unmount(mountpoint);
        }
        fs::create_dir_all(mountpoint).unwrap();
        let log = unique(data_dir.with_extension("daemon"));
        let out = fs::File::create(&log).unwrap();
        let child = no_inherited_files(&mut Command::new(bin()))
            .arg("mount")
            .arg(data_dir)
            .arg(mountpoint)
            .args(extra)
            .env("SEGURO_LOG", "info,openraft=warn")
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("spawn seguro-fs");
        let mut d = Daemon {
            child: Some(child),
            data_dir: data_dir.to_path_buf(),
            mountpoint: mountpoint.to_path_buf(),
            log,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if is_mounted(mountpoint) {
                return d;
            }
            if let Some(status) = d.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "seguro-fs exited with {status} before mounting:\n{}",
                    d.log_text()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "seguro-fs did not mount within {START_TIMEOUT:?}:\n{}",
                    d.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, wait for a clean exit (status 0) and for the mount to be gone.
    pub fn stop(mut self) -> String {
        let mut child = self.child.take().expect("running");
        signal(child.id(), libc::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                force_unmount(&self.mountpoint);
                panic!(
                    "seguro-fs did not stop within {STOP_TIMEOUT:?}:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let text = self.log_text();
        assert!(status.success(), "seguro-fs exited with {status}:\n{text}");
        assert!(
            !is_mounted(&self.mountpoint),
            "still mounted after a clean stop"
        );
        text
    }

    /// Wait for the daemon to exit by itself within `timeout` (panics if it does not);
    /// returns its exit status and log.
    pub fn wait_exit(mut self, timeout: Duration) -> (std::process::ExitStatus, String) {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return (st, self.log_text());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                force_unmount(&self.mountpoint);
                panic!(
                    "seguro-fs did not exit by itself within {timeout:?}:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL (a crash): the kernel aborts the FUSE connection. The dead mount stays
    /// (every access fails with ENOTCONN, so no straggler can write underneath it) until
    /// the next `Daemon::start` on this mountpoint or the `TestDir` is dropped.
    pub fn kill9(mut self) {
        let mut child = self.child.take().expect("running");
        signal(child.id(), libc::SIGKILL);
        let _ = child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), libc::SIGKILL);
            let _ = child.wait();
            force_unmount(&self.mountpoint);
            if std::thread::panicking() {
                eprintln!(
                    "--- seguro-fs log ({}):\n{}",
                    self.log.display(),
                    self.log_text()
                );
            }
        }
    }
}

fn unique(p: PathBuf) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    p.with_extension(format!("log{}", N.fetch_add(1, Ordering::Relaxed)))
}

pub fn signal(pid: u32, sig: i32) {
    // SAFETY: sending a signal to a child we spawned and have not yet reaped.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// A child process running one `#[ignore]`d test of the current test binary (the way
/// these tests get a second, independent process with its own LMDB environment).
pub struct ChildTest {
    child: Option<Child>,
}

impl ChildTest {
    pub fn spawn(test_name: &str, envs: &[(&str, String)]) -> ChildTest {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            test_name,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ]);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        ChildTest {
            child: Some(
                no_inherited_files(&mut cmd)
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("spawn child test"),
            ),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Wait (bounded) for the child to finish; true if it passed.
    pub fn wait(mut self, timeout: Duration) -> bool {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s.success();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill9(mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), libc::SIGKILL);
            let _ = c.wait();
        }
    }
}

impl Drop for ChildTest {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), libc::SIGKILL);
            let _ = c.wait();
        }
    }
}

/// Copy a directory tree (to open a replica's tree with LMDB without adding lock files
/// to it).
pub fn copy_tree(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success(), "cp -a {} {}", from.display(), to.display());
}

/// Whether a daemon holds `data_dir` (its `lock` file is flock'd), probed without blocking.
pub fn data_dir_in_use(data_dir: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(f) = fs::File::open(data_dir.join("lock")) else {
        return false;
    };
    // SAFETY: flock on an fd we own; dropping it releases the probe.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) != 0 }
}

/// Create (or truncate) `path`, write `data`, fdatasync. The namespace op and the fsync
/// both have to succeed.
pub fn write_fsync(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = fs::File::create(path)?;
    f.write_all(data)?;
    f.sync_data()
}

/// Run `cmd` (stdin closed, output captured) to its end within `timeout`; past it the
/// command is killed. Its output, or why there is none.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> Result<Output, String> {
    fn drain<R: Read + Send + 'static>(mut r: R) -> JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    }
    let what = format!("{cmd:?}");
    let mut child = no_inherited_files(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{what}: {e}"))?;
    // Both pipes are read while we wait, so a chatty command cannot block on a full pipe.
    let stdout = drain(child.stdout.take().expect("piped"));
    let stderr = drain(child.stderr.take().expect("piped"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            r => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(match r {
                    Err(e) => format!("{what}: {e}"),
                    Ok(_) => format!("{what} did not finish within {timeout:?}"),
                });
            }
        }
    };
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}
