//! Mounting the way fstab does: `-o` option strings, the TOML config file, `--background`
//! with its readiness report, the `mount.seguro-fs` helper (what mount(8) runs for type
//! `seguro-fs`), the real `mount.fuse3` (type `fuse.seguro-fs`) and systemd's
//! NOTIFY_SOCKET, all with the real binaries and real FUSE mounts.

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::mount::{bin, force_unmount, is_mounted, no_inherited_files, signal, TestDir};

/// How long one command (a mount that reports readiness, a validation) may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a daemon gets to exit once its mount is gone.
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// The helper binary, built by `cargo build --workspace` (scripts/test does it first).
fn helper() -> PathBuf {
    let p = bin().with_file_name("mount-seguro-fs");
    assert!(
        p.is_file(),
        "{} is missing: build the workspace first (cargo build --workspace)",
        p.display()
    );
    p
}

/// Run `cmd` to completion (bounded), capturing its output.
fn run(cmd: &mut Command) -> Output {
    let mut child = no_inherited_files(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{cmd:?} did not finish within {COMMAND_TIMEOUT:?}:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn alive(pid: u32) -> bool {
    // A daemon reparented to a PID 1 that does not reap stays a zombie: that is gone too.
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !matches!(
            s.rsplit(") ").next().and_then(|r| r.chars().next()),
            Some('Z' | 'X')
        )
    })
}

/// A background daemon started by a command that returned: unmounted and killed by PID
/// (from DATA_DIR/lock) on drop, so a failing test leaves nothing behind.
struct Background {
    data_dir: PathBuf,
    mountpoint: PathBuf,
}

impl Background {
    fn new(data_dir: &Path, mountpoint: &Path) -> Background {
        Background {
            data_dir: data_dir.to_path_buf(),
            mountpoint: mountpoint.to_path_buf(),
        }
    }

    /// The daemon's pid, as it wrote it into the data dir's lock file.
    fn pid(&self) -> Option<u32> {
        let pid: u32 = fs::read_to_string(self.data_dir.join("lock"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let ours = fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains("seguro-fs"));
        (ours && alive(pid)).then_some(pid)
    }

    fn log(&self, log_file: &Path) -> String {
        fs::read_to_string(log_file).unwrap_or_default()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let pid = self.pid();
        if is_mounted(&self.mountpoint) {
            force_unmount(&self.mountpoint);
        }
        if let Some(pid) = pid {
            signal(pid, libc::SIGKILL);
            let deadline = Instant::now() + EXIT_TIMEOUT;
            while alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// umount(8) the mount and wait (bounded) for its daemon to exit.
fn unmount_and_wait(mount: &Background) {
    let pid = mount.pid().expect("the daemon is running");
    let out = run(Command::new("umount").arg(&mount.mountpoint));
    assert!(out.status.success(), "umount: {}", stderr(&out));
    let deadline = Instant::now() + EXIT_TIMEOUT;
    while alive(pid) {
        assert!(
            Instant::now() < deadline,
            "daemon {pid} still running {EXIT_TIMEOUT:?} after umount"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Write through the mount, fsync, unmount with umount(8), and check that the daemon
/// exits and the data is in DATA_DIR/tree.
fn write_unmount_and_check(mount: &Background) {
    let mut f = fs::File::create(mount.mountpoint.join("event.log")).unwrap();
    f.write_all(b"event 1\n").unwrap();
    f.sync_all().unwrap();
    drop(f);
    unmount_and_wait(mount);
    assert_eq!(
        fs::read(mount.data_dir.join("tree/event.log")).unwrap(),
        b"event 1\n"
    );
}

#[test]
fn mount_options_are_checked_by_the_binary() {
    let t = TestDir::new("options");
    let mp = t.join("mp");
    fs::create_dir_all(&mp).unwrap();
    let d = t.join("data");
    let check = |opts: &str| {
        run(Command::new(bin())
            .args(["mount", "--check"])
            .arg(&d)
            .arg(&mp)
            .args(["-o", opts]))
    };
    let key = t.join("zod.key");
    fs::write(&key, "0123456789abcdef0123456789abcdef\n").unwrap();
    // What mount(8) and mount.fuse3 pass around the seguro-fs options.
    let out = check(&format!(
        "rw,noatime,nodev,noexec,nosuid,node_id=2,peers=1=127.0.0.1:7100,2=127.0.0.2:7100,\
         3=127.0.0.3:7100,acks=1,cluster_key_file={},_netdev,nofail,user,dev,suid,defaults,\
         x-systemd.requires=network-online.target,comment=zod",
        key.display()
    ));
    assert!(out.status.success(), "{}", stderr(&out));
    for (opts, want) in [
        ("rw,foo", "seguro-fs: error: unknown mount option \"foo\""),
        ("ro", "mount option \"ro\" is not supported"),
        (
            "node_id=2,2=127.0.0.2:7100",
            "looks like a member of a peers list",
        ),
        (
            "fuse_threads=0",
            "-o fuse_threads = 0 is out of range: allowed 1..=64",
        ),
    ] {
        let out = check(opts);
        assert_eq!(out.status.code(), Some(1), "-o {opts}");
        assert!(stderr(&out).contains(want), "-o {opts}: {}", stderr(&out));
    }
    // --check validates without touching anything.
    assert!(!d.exists());
    assert!(!is_mounted(&mp));
}

#[test]
fn config_file_is_read_by_the_binary() {
    let t = TestDir::new("config-file");
    let mp = t.join("mp");
    fs::create_dir_all(&mp).unwrap();
    let file = t.join("zod.toml");
    let log = t.join("zod.log");
    fs::write(
        &file,
        format!(
            "data_dir = \"{}\"\nmountpoint = \"{}\"\nlog_file = \"{}\"\nfuse_threads = 2\n",
            t.join("data").display(),
            mp.display(),
            log.display()
        ),
    )
    .unwrap();
    let out = run(Command::new(bin())
        .args(["mount", "--check", "--config"])
        .arg(&file));
    assert!(out.status.success(), "{}", stderr(&out));
    // A flag overrides the file; a bad value names the flag.
    let out = run(Command::new(bin())
        .args(["mount", "--check", "--fuse-threads", "65", "--config"])
        .arg(&file));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--fuse-threads = 65 is out of range: allowed 1..=64"));
    let bad = t.join("bad.toml");
    fs::write(&bad, "ack_timeout_ms = 5\n").unwrap();
    let out = run(Command::new(bin())
        .args(["mount", "/d", "/m", "--check", "--config"])
        .arg(&bad));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!(
            "config {}: ack_timeout_ms = 5 is out of range: allowed 10..=3600000",
            bad.display()
        )),
        "{}",
        stderr(&out)
    );

    // The unit-file form: everything from the file, in the background, logging where the
    // file says.
    let out = run(Command::new(bin())
        .args(["mount", "--background", "--config"])
        .arg(&file));
    let mount = Background::new(&t.join("data"), &mp);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(is_mounted(&mp), "mounted when the command returns");
    assert!(mount.log(&log).contains("mounted"), "{}", mount.log(&log));
    write_unmount_and_check(&mount);
    assert!(
        mount.log(&log).contains("unmounted cleanly"),
        "{}",
        mount.log(&log)
    );
}

#[test]
fn helper_refuses_bad_usage_and_bad_options() {
    let t = TestDir::new("helper-bad");
    let mp = t.join("mp");
    fs::create_dir_all(&mp).unwrap();
    let out = run(Command::new(helper()).arg(t.join("data")));
    assert_eq!(out.status.code(), Some(1), "usage errors exit 1 (mount(8))");
    assert!(stderr(&out).contains("usage: mount.seguro-fs"));
    let out = run(Command::new(helper())
        .arg(t.join("data"))
        .arg(&mp)
        .args(["-o", "rw,badopt"]));
    assert_eq!(out.status.code(), Some(32), "mount failure (mount(8))");
    assert!(
        stderr(&out).contains("unknown mount option \"badopt\""),
        "{}",
        stderr(&out)
    );
    // -s (sloppy) lets an unknown option through; -f (fake) only checks.
    let out = run(Command::new(helper()).arg(t.join("data")).arg(&mp).args([
        "-s",
        "-f",
        "-o",
        "rw,badopt",
    ]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!is_mounted(&mp) && !t.join("data").exists());
}

#[test]
fn helper_reports_the_daemons_failure() {
    let t = TestDir::new("helper-fail");
    let data = t.join("data");
    let mp = t.join("mp");
    fs::create_dir_all(&mp).unwrap();
    // Refused before the fork: the mountpoint is not empty.
    fs::write(mp.join("junk"), b"x").unwrap();
    let out = run(Command::new(helper())
        .arg(&data)
        .arg(&mp)
        .args(["-o", "rw"]));
    assert_eq!(out.status.code(), Some(32));
    assert!(stderr(&out).contains("is not empty"), "{}", stderr(&out));
    fs::remove_file(mp.join("junk")).unwrap();

    // Refused by the daemon after the fork (the data dir belongs to node 1), reported
    // through the readiness pipe.
    let out = run(Command::new(helper())
        .arg(&data)
        .arg(&mp)
        .args(["-o", "node_id=1"]));
    let mount = Background::new(&data, &mp);
    assert!(out.status.success(), "{}", stderr(&out));
    write_unmount_and_check(&mount);
    let out = run(Command::new(helper())
        .arg(&data)
        .arg(&mp)
        .args(["-o", "node_id=2"]));
    assert_eq!(out.status.code(), Some(32));
    let err = stderr(&out);
    assert!(
        err.contains("seguro-fs: error: data dir") && err.contains("not to this node"),
        "{err}"
    );
    assert!(!is_mounted(&mp));
}

#[test]
fn helper_mounts_in_the_background() {
    let t = TestDir::new("helper-ok");
    let data = t.join("data");
    let mp = t.join("mp");
    fs::create_dir_all(&mp).unwrap();
    // mount(8) runs the helper as /sbin/mount.seguro-fs: a link with that name; it finds
    // seguro-fs beside the file the link points to.
    let link = t.join("mount.seguro-fs");
    std::os::unix::fs::symlink(helper(), &link).unwrap();
    let out = run(Command::new(&link)
        .arg(&data)
        .arg(&mp)
        .args(["-n", "-o", "rw,noatime,nodev,nosuid,fuse_threads=2,_netdev"])
        .env_remove("SEGURO_FS_BIN")
        .env("PATH", "/usr/bin:/bin"));
    let mount = Background::new(&data, &mp);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(is_mounted(&mp), "mounted when the helper returns");
    let log = data.join("seguro-fs.log");
    assert!(mount.log(&log).contains("mounted"), "{}", mount.log(&log));
    write_unmount_and_check(&mount);
}

#[test]
fn mount_fuse3_runs_the_binary_in_its_fstab_form() {
    let t = TestDir::new("mount-fuse3");
    let data = t.join("data");
    let mp = t.join("mp");
    fs::create_dir_all(&mp).unwrap();
    let path = format!(
        "{}:/usr/sbin:/usr/bin:/sbin:/bin",
        bin().parent().unwrap().display()
    );
    let out = run(Command::new("mount.fuse3")
        .arg(&data)
        .arg(&mp)
        .args(["-t", "fuse.seguro-fs", "-o", "rw,_netdev,nofail,node_id=1"])
        .env("PATH", path));
    let mount = Background::new(&data, &mp);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(is_mounted(&mp), "mounted when mount.fuse3 returns");
    write_unmount_and_check(&mount);
}

#[test]
fn foreground_mount_notifies_systemd() {
    let t = TestDir::new("notify");
    let data = t.join("data");
    let mp = t.join("mp");
    fs::create_dir_all(&mp).unwrap();
    let socket_path = t.join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(COMMAND_TIMEOUT)).unwrap();
    let child = no_inherited_files(&mut Command::new(bin()))
        .arg("mount")
        .arg(&data)
        .arg(&mp)
        .env("NOTIFY_SOCKET", &socket_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    /// Kills the daemon (until it is reaped) and detaches its mount.
    struct Stop(Option<std::process::Child>, PathBuf);
    impl Drop for Stop {
        fn drop(&mut self) {
            if let Some(mut child) = self.0.take() {
                signal(child.id(), libc::SIGKILL);
                let _ = child.wait();
            }
            if is_mounted(&self.1) {
                force_unmount(&self.1);
            }
        }
    }
    let mut guard = Stop(Some(child), mp.clone());
    let mut buf = [0u8; 64];
    // A signal to this test process (another test's child exiting) can interrupt the
    // wait; try again, a bounded number of times.
    let n = (0..10)
        .map(|_| socket.recv(&mut buf))
        .find(|r| !matches!(r, Err(e) if e.kind() == std::io::ErrorKind::Interrupted))
        .expect("10 waits interrupted")
        .expect("READY=1 within the timeout");
    assert_eq!(&buf[..n], b"READY=1");
    assert!(is_mounted(&mp), "READY=1 is sent once mounted");
    let child = guard.0.as_mut().unwrap();
    signal(child.id(), libc::SIGTERM);
    let deadline = Instant::now() + EXIT_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    guard.0 = None;
    assert!(status.success());
    assert!(!is_mounted(&mp));
}

/// `seguro-fs status DATA_DIR --json`.
fn status(data: &Path) -> String {
    let out = run(Command::new(bin()).arg("status").arg(data).arg("--json"));
    assert!(out.status.success(), "{}", stderr(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn join_keeps_a_pristine_lowest_id_from_initialising() {
    let t = TestDir::new("join");
    let mp = t.join("mp");
    fs::create_dir_all(&mp).unwrap();
    let key = t.join("k");
    fs::write(&key, "0123456789abcdef0123456789abcdef\n").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let opts = format!(
        "peers=1=127.0.0.1:{port},cluster_key_file={},heartbeat_ms=50,election_timeout_min_ms=200",
        key.display()
    );
    let mount_with = |data: &Path, extra: &str| {
        let out = run(Command::new(bin())
            .args(["mount", "--background"])
            .arg(data)
            .arg(&mp)
            .arg("-o")
            .arg(format!("{opts}{extra}")));
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(is_mounted(&mp));
        Background::new(data, &mp)
    };

    // With join, node 1 (the lowest id) mounts as a pristine member and waits; many
    // election timeouts later it is still not part of any cluster.
    let joined = t.join("joined");
    let mount = mount_with(&joined, ",join");
    std::thread::sleep(Duration::from_millis(2_000));
    let s = status(&joined);
    assert!(
        s.contains("\"members\":[]") && s.contains("\"writable\":false"),
        "{s}"
    );
    assert!(
        fs::write(mp.join("f"), b"x").is_err(),
        "not writable while waiting"
    );
    // Gone before the next daemon binds the same port.
    unmount_and_wait(&mount);

    // Without it, the same node initialises the cluster and leads.
    let fresh = t.join("fresh");
    let mount = mount_with(&fresh, "");
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    while !status(&fresh).contains("\"writable\":true") {
        assert!(Instant::now() < deadline, "{}", status(&fresh));
        std::thread::sleep(Duration::from_millis(50));
    }
    write_unmount_and_check(&mount);
}
