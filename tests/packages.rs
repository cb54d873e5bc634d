//! Package tests: the .deb and .rpm that `packaging/build` writes to TARGET_DIR/packages.
//! The .deb is installed with dpkg; a pier is mounted from an fstab line of type seguro-fs
//! (the packaged mount.seguro-fs helper), a vere-shaped LMDB workload runs on it and is
//! verified through the mount and in DATA_DIR/tree after umount; it is mounted again
//! through fuse.seguro-fs with a config file, and served by the packaged unit's
//! ExecStart= (READY=1 on NOTIFY_SOCKET, SIGTERM to stop); then the package is purged. The
//! .rpm's file list, requirements and scripts are read with `rpm -qp`.
//!
//! Ignored by default (a plain `cargo test` needs no packages); scripts/test runs them with
//! `--ignored` after `packaging/build`. They fail, not skip, when a package is missing.
//! They need root (dpkg, mount) and change the machine's package database, so the .deb test
//! refuses to run over an existing seguro-fs installation rather than purge it.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::mount::{copy_tree, force_unmount, is_mounted, run_bounded, TestDir};
use common::vere;

/// Events and image size of the workload: two rolls and a chop, a few seconds.
const WORKLOAD_EVENTS: u64 = 1500;
const IMAGE_BYTES: u64 = 4 << 20;
/// mount(8) returns once the daemon has mounted (it waits for the node to be writable).
const MOUNT_TIMEOUT: Duration = Duration::from_secs(90);
/// After umount the daemon drains, checkpoints and exits.
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);
/// dpkg and rpm on a local file.
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

/// What the .deb must install (paths as dpkg records them) and remove again on purge.
const DEB_FILES: &[&str] = &[
    "/usr/bin/seguro-fs",
    "/sbin/mount.seguro-fs",
    "/lib/systemd/system/seguro-fs@.service",
    "/usr/share/man/man1/seguro-fs.1.gz",
    "/usr/share/man/man1/seguro-fs-mount.1.gz",
    "/usr/share/man/man1/seguro-fs-status.1.gz",
    "/usr/share/man/man1/seguro-fs-members.1.gz",
    "/usr/share/man/man1/seguro-fs-restore.1.gz",
    "/usr/share/man/man8/mount.seguro-fs.8.gz",
    "/usr/share/bash-completion/completions/seguro-fs",
    "/usr/share/zsh/vendor-completions/_seguro-fs",
    "/usr/share/fish/vendor_completions.d/seguro-fs.fish",
    "/usr/share/doc/seguro-fs/README.md",
    "/usr/share/doc/seguro-fs/OPERATIONS.md",
    "/usr/share/doc/seguro-fs/CONFIGURATION.md",
    "/usr/share/doc/seguro-fs/TROUBLESHOOTING.md",
    "/usr/share/doc/seguro-fs/examples/fstab",
    "/usr/share/doc/seguro-fs/examples/zod.toml",
    "/usr/share/doc/seguro-fs/examples/urbit-ship",
    "/usr/share/doc/seguro-fs/examples/srv-zod-.urb-log.mount",
];

/// What the .rpm must list (Fedora's directories).
const RPM_FILES: &[&str] = &[
    "/usr/bin/seguro-fs",
    "/usr/sbin/mount.seguro-fs",
    "/usr/lib/systemd/system/seguro-fs@.service",
    "/usr/share/man/man1/seguro-fs.1",
    "/usr/share/man/man1/seguro-fs-mount.1",
    "/usr/share/man/man1/seguro-fs-status.1",
    "/usr/share/man/man1/seguro-fs-members.1",
    "/usr/share/man/man1/seguro-fs-restore.1",
    "/usr/share/man/man8/mount.seguro-fs.8",
    "/usr/share/bash-completion/completions/seguro-fs",
    "/usr/share/zsh/site-functions/_seguro-fs",
    "/usr/share/fish/vendor_completions.d/seguro-fs.fish",
    "/usr/share/doc/seguro-fs/README.md",
    "/usr/share/doc/seguro-fs/OPERATIONS.md",
    "/usr/share/doc/seguro-fs/CONFIGURATION.md",
    "/usr/share/doc/seguro-fs/TROUBLESHOOTING.md",
    "/usr/share/doc/seguro-fs/examples/fstab",
    "/usr/share/doc/seguro-fs/examples/zod.toml",
    "/usr/share/doc/seguro-fs/examples/urbit-ship",
    "/usr/share/doc/seguro-fs/examples/srv-zod-.urb-log.mount",
];

/// TARGET_DIR/packages: this test binary is TARGET_DIR/PROFILE/deps/packages-HASH.
fn packages_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.ancestors()
        .nth(3)
        .expect("test binary lives in TARGET_DIR/PROFILE/deps")
        .join("packages")
}

/// The one package file with this extension; panics (the test fails) when there is none.
fn package(ext: &str) -> PathBuf {
    let dir = packages_dir();
    let found: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}: run packaging/build first", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    match found.as_slice() {
        [one] => one.clone(),
        [] => panic!("no .{ext} in {}: run packaging/build first", dir.display()),
        many => panic!("more than one .{ext} in {}: {many:?}", dir.display()),
    }
}

/// Run a command to completion within `timeout`, killing it past that.
fn run(cmd: &mut Command, timeout: Duration) -> Output {
    run_bounded(cmd, timeout).unwrap_or_else(|e| panic!("{e}"))
}

/// Run and require success; returns stdout.
fn run_ok(cmd: &mut Command) -> String {
    let what = format!("{cmd:?}");
    let out = run(cmd, TOOL_TIMEOUT);
    assert!(
        out.status.success(),
        "{what} failed with {}:\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn deb_installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}", "seguro-fs"])
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains("installed")
        })
}

/// The instance name round 3 of the .deb test runs the unit template as.
const UNIT_INSTANCE: &str = "seguro-pkgtest";

/// `/etc/seguro-fs/UNIT_INSTANCE.toml`, removed on drop (before the package is purged, so
/// the purge can remove the then empty directory).
struct EtcConfig(PathBuf);

impl EtcConfig {
    fn write(text: &str) -> EtcConfig {
        let path = Path::new("/etc/seguro-fs").join(format!("{UNIT_INSTANCE}.toml"));
        assert!(!path.exists(), "{} exists already", path.display());
        fs::write(&path, text).unwrap();
        EtcConfig(path)
    }
}

impl Drop for EtcConfig {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Purges the package on drop (also when the test fails half-way).
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        if deb_installed() {
            let _ = Command::new("dpkg")
                .args(["--purge", "seguro-fs"])
                .stdout(Stdio::null())
                .status();
        }
    }
}

/// The fstab-mounted pier: on drop, detaches the mount and SIGKILLs the daemon if the test
/// did not get to unmount it cleanly.
struct Mounted {
    mountpoint: PathBuf,
    pid: Option<u32>,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(pid) = self.pid.take() {
            common::mount::signal(pid, libc::SIGKILL);
            let _ = wait_exit(pid, EXIT_TIMEOUT);
        }
        if is_mounted(&self.mountpoint) {
            force_unmount(&self.mountpoint);
        }
    }
}

/// PIDs of processes (other than this one) whose command line contains `needle`.
fn pgrep(needle: &Path) -> Vec<u32> {
    let out = Command::new("pgrep")
        .arg("-f")
        .arg(needle)
        .output()
        .expect("pgrep (procps)");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|&p| p != std::process::id())
        .collect()
}

/// Wait (bounded) for `pid` to exit. This process is the daemon's subreaper (see
/// [`become_subreaper`]), so the exit is reaped here and its status returned.
fn wait_exit(pid: u32, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut status = 0;
        // SAFETY: WNOHANG wait for one specific pid; `status` is a valid out pointer.
        let r = unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) };
        if r == pid as i32 {
            return Some(status);
        }
        if r < 0 && !Path::new(&format!("/proc/{pid}")).exists() {
            // Not our descendant after all, and gone.
            return Some(-1);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Make this process the reaper of orphaned descendants, so the daemon that
/// mount.seguro-fs leaves running in the background is reparented to this test: its exit
/// status becomes visible, and it cannot linger as a zombie of a PID 1 that does not reap.
fn become_subreaper() {
    // SAFETY: prctl with an integer argument; affects only this process.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(r, 0, "prctl(PR_SET_CHILD_SUBREAPER)");
}

/// (file system type, source) of the mount at `mountpoint`, from /proc/self/mountinfo.
fn mount_entry(mountpoint: &Path) -> Option<(String, String)> {
    let canon = mountpoint.canonicalize().ok()?;
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let line = info
        .lines()
        .find(|l| l.split(' ').nth(4).map(Path::new) == Some(canon.as_path()))?;
    let mut after = line.split(" - ").nth(1)?.split(' ');
    Some((after.next()?.to_string(), after.next()?.to_string()))
}

/// Write `line` as the only entry of the fstab file `fstab`, run `mount --fstab FSTAB LOG`
/// and check that LOG is a seguro-fs FUSE mount of `data` when mount returns, served by
/// one daemon running the packaged binary (its PID goes into `mounted`).
fn mount_from_fstab(fstab: &Path, line: &str, data: &Path, log: &Path, mounted: &mut Mounted) {
    fs::write(fstab, format!("# seguro-fs package test\n{line}\n")).unwrap();
    let out = run(
        Command::new("mount").arg("--fstab").arg(fstab).arg(log),
        MOUNT_TIMEOUT,
    );
    // A daemon left running by a mount that failed half-way is stopped by the guard.
    mounted.pid = pgrep(data).first().copied();
    assert!(
        out.status.success(),
        "mount --fstab with {line:?} failed with {}:\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The daemon mounts with mount(2) as root (type "fuse", or "fuse.seguro-fs" through
    // fusermount3) and names itself in the source field.
    let (fstype, source) = mount_entry(log)
        .unwrap_or_else(|| panic!("{} is not mounted when mount returns", log.display()));
    assert!(
        fstype == "fuse" || fstype == "fuse.seguro-fs",
        "{} is a {fstype} mount, not FUSE",
        log.display()
    );
    assert_eq!(source, format!("seguro-fs:{}", data.display()));
    let pids = pgrep(data);
    assert_eq!(
        pids.len(),
        1,
        "expected one daemon serving {}: {pids:?}",
        data.display()
    );
    let pid = pids[0];
    mounted.pid = Some(pid);
    assert_eq!(
        fs::read_link(format!("/proc/{pid}/exe")).unwrap(),
        Path::new("/usr/bin/seguro-fs"),
        "the daemon is not the packaged binary"
    );
}

/// `umount LOG`: the FUSE session ends and the daemon drains, checkpoints and exits 0 by
/// itself (bounded wait).
fn unmount_and_wait(data: &Path, log: &Path, mounted: &mut Mounted) {
    let pid = mounted.pid.expect("a daemon is serving the mount");
    run_ok(Command::new("umount").arg(log));
    assert!(!is_mounted(log), "still mounted after umount");
    let status = wait_exit(pid, EXIT_TIMEOUT)
        .unwrap_or_else(|| panic!("daemon {pid} still running {EXIT_TIMEOUT:?} after umount"));
    mounted.pid = None;
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "daemon {pid} exited with wait status {status:#x}, expected a clean exit 0"
    );
    assert!(
        pgrep(data).is_empty(),
        "a daemon still serves {}",
        data.display()
    );
}

#[test]
#[ignore = "needs the packages from packaging/build and root; scripts/test runs it"]
fn deb_installs_mounts_from_fstab_runs_vere_and_purges() {
    let deb = package("deb");
    assert!(
        !deb_installed(),
        "seguro-fs is already installed on this machine; this test installs and purges it, \
         so remove it first: dpkg --purge seguro-fs"
    );
    become_subreaper();
    let t = TestDir::new("deb");
    let data = t.join("data");
    let log = t.join("pier/.urb/log");
    fs::create_dir_all(&log).unwrap();
    for p in [&data, &log] {
        assert!(
            !p.to_str().unwrap().contains(char::is_whitespace),
            "fstab fields cannot hold whitespace: {}",
            p.display()
        );
    }

    let _installed = Installed;
    run_ok(Command::new("dpkg").arg("-i").arg(&deb));
    for f in DEB_FILES {
        assert!(
            Path::new(f).is_file(),
            "{f} not installed by {}",
            deb.display()
        );
    }
    assert!(
        Path::new("/etc/seguro-fs").is_dir(),
        "/etc/seguro-fs not created"
    );
    let listed = run_ok(Command::new("dpkg").args(["-L", "seguro-fs"]));
    for f in DEB_FILES {
        assert!(
            listed.lines().any(|l| l == *f),
            "dpkg -L lacks {f}:\n{listed}"
        );
    }
    let version = run_ok(Command::new("/usr/bin/seguro-fs").arg("--version"));
    assert_eq!(
        version.trim(),
        format!("seguro-fs {}", env!("CARGO_PKG_VERSION"))
    );

    // Round 1: type seguro-fs, settings inline; mount(8) runs the packaged
    // /sbin/mount.seguro-fs. The daemon it leaves running is reparented to this test.
    let mut mounted = Mounted {
        mountpoint: log.clone(),
        pid: None,
    };
    let fstab = t.join("fstab");
    let line = format!(
        "{} {} seguro-fs _netdev,nofail,node_id=1,ack_timeout_ms=10000 0 0",
        data.display(),
        log.display()
    );
    mount_from_fstab(&fstab, &line, &data, &log, &mut mounted);
    let image = t.join("image.src");
    let summary = vere::run_workload(&log, 0x9ac, WORKLOAD_EVENTS, &image, IMAGE_BYTES)
        .expect("vere workload on the fstab mount");
    assert!(summary.epochs.len() >= 2, "{summary:?}");
    vere::verify_workload(&log, &summary, IMAGE_BYTES).expect("verify through the mount");
    unmount_and_wait(&data, &log, &mut mounted);

    // Round 2: type fuse.seguro-fs (mount(8) runs fuse3's mount.fuse3, which runs
    // `seguro-fs SPEC DIR -o OPTIONS`) with the settings in a config file, as in the
    // packaged examples. The log written in round 1 is all there.
    let config = t.join("pier.toml");
    fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\nmountpoint = \"{}\"\nnode_id = 1\n",
            data.display(),
            log.display()
        ),
    )
    .unwrap();
    let line = format!(
        "{} {} fuse.seguro-fs _netdev,nofail,config={} 0 0",
        data.display(),
        log.display(),
        config.display()
    );
    mount_from_fstab(&fstab, &line, &data, &log, &mut mounted);
    vere::verify_workload(&log, &summary, IMAGE_BYTES).expect("verify after the remount");
    unmount_and_wait(&data, &log, &mut mounted);

    // Round 3: the packaged unit's ExecStart= for an instance, run as systemd would (no
    // systemd runs here): the config in /etc/seguro-fs/INSTANCE.toml, READY=1 on
    // NOTIFY_SOCKET once mounted (Type=notify), and SIGTERM (systemctl stop) unmounts and
    // exits 0.
    let unit = fs::read_to_string("/lib/systemd/system/seguro-fs@.service").unwrap();
    assert!(unit.lines().any(|l| l == "Type=notify"), "{unit}");
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("the unit has an ExecStart=")
        .replace("%i", UNIT_INSTANCE);
    // With a ship: the unit runs it too (a standalone node leads, so it starts), and
    // `systemctl stop` (SIGTERM) stops it before the daemon exits.
    let ship_out = t.join("ship.out");
    let etc_config = EtcConfig::write(&format!(
        "data_dir = \"{}\"\nmountpoint = \"{}\"\nnode_id = 1\n\
         ship_command = \"echo $$ $SEGURO_NODE_ID > {}.tmp && mv {}.tmp {}; exec sleep 600\"\n",
        data.display(),
        log.display(),
        ship_out.display(),
        ship_out.display(),
        ship_out.display()
    ));
    let notify_path = t.join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(MOUNT_TIMEOUT)).unwrap();
    let argv: Vec<&str> = exec.split_whitespace().collect();
    let daemon_log = fs::File::create(t.join("unit.log")).unwrap();
    let mut child = Command::new(argv[0])
        .args(&argv[1..])
        .env("NOTIFY_SOCKET", &notify_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(daemon_log)
        .spawn()
        .unwrap_or_else(|e| panic!("{exec}: {e}"));
    mounted.pid = Some(child.id());
    let mut buf = [0u8; 512];
    let n = notify.recv(&mut buf).unwrap_or_else(|e| {
        panic!(
            "no sd_notify message within {MOUNT_TIMEOUT:?} ({e}):\n{}",
            fs::read_to_string(t.join("unit.log")).unwrap_or_default()
        )
    });
    let message = String::from_utf8_lossy(&buf[..n]);
    assert!(message.lines().any(|l| l == "READY=1"), "{message:?}");
    assert!(is_mounted(&log), "READY=1 before the log was mounted");
    vere::verify_workload(&log, &summary, IMAGE_BYTES).expect("verify under the unit");
    let deadline = Instant::now() + MOUNT_TIMEOUT;
    let ship = loop {
        if let Ok(text) = fs::read_to_string(&ship_out) {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "the unit's daemon never started the ship:\n{}",
            fs::read_to_string(t.join("unit.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let (ship_pid, node) = ship.trim().split_once(' ').expect("PID NODE");
    assert_eq!(node, "1", "SEGURO_NODE_ID in the ship's environment");
    let ship_pid: u32 = ship_pid.parse().unwrap();
    common::mount::signal(child.id(), libc::SIGTERM);
    let deadline = Instant::now() + EXIT_TIMEOUT;
    // Bounded by the deadline; on timeout the guard SIGKILLs the daemon by PID.
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the unit's daemon ignored SIGTERM for {EXIT_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    mounted.pid = None;
    assert!(
        status.success(),
        "the unit's daemon exited with {status} after SIGTERM:\n{}",
        fs::read_to_string(t.join("unit.log")).unwrap_or_default()
    );
    assert!(!is_mounted(&log), "still mounted after SIGTERM");
    let unit_log = fs::read_to_string(t.join("unit.log")).unwrap_or_default();
    assert!(
        unit_log
            .lines()
            .any(|l| l.contains("ship stopped") && l.contains("shutdown")),
        "the daemon did not stop its ship on SIGTERM:\n{unit_log}"
    );
    // Orphans are reparented to this test (a subreaper): gone means absent or a zombie.
    let ship_alive = fs::read_to_string(format!("/proc/{ship_pid}/stat"))
        .ok()
        .and_then(|st| st.rsplit_once(") ").map(|(_, r)| !r.starts_with('Z')))
        .unwrap_or(false);
    assert!(
        !ship_alive,
        "the ship (pid {ship_pid}) outlived its unit's daemon"
    );
    drop(etc_config);

    // The replicated tree is itself the pier's log: LMDB opens it and every event is there
    // (a copy, so LMDB's lock files do not land in the data dir).
    let copy = t.join("tree-copy");
    copy_tree(&data.join("tree"), &copy);
    vere::verify_workload(&copy, &summary, IMAGE_BYTES).expect("verify DATA_DIR/tree");

    run_ok(Command::new("dpkg").args(["--purge", "seguro-fs"]));
    assert!(!deb_installed(), "still installed after dpkg --purge");
    for f in DEB_FILES {
        assert!(!Path::new(f).exists(), "{f} left behind by dpkg --purge");
    }
    assert!(
        !Path::new("/etc/seguro-fs").exists(),
        "/etc/seguro-fs left behind by purge"
    );
}

#[test]
#[ignore = "needs the packages from packaging/build; scripts/test runs it"]
fn rpm_lists_the_fedora_paths_and_requires_fuse3() {
    let rpm = package("rpm");
    let listed = run_ok(Command::new("rpm").arg("-qlp").arg(&rpm));
    for f in RPM_FILES {
        assert!(
            listed.lines().any(|l| l == *f),
            "rpm -qlp lacks {f}:\n{listed}"
        );
    }
    let requires = run_ok(Command::new("rpm").args(["-qp", "--requires"]).arg(&rpm));
    assert!(
        requires
            .lines()
            .any(|l| l.split_whitespace().next() == Some("fuse3")),
        "the rpm does not require fuse3:\n{requires}"
    );
    // /etc/seguro-fs is made by %post (cargo-generate-rpm cannot package an empty dir).
    let scripts = run_ok(Command::new("rpm").args(["-qp", "--scripts"]).arg(&rpm));
    assert!(
        scripts.contains("install -d -m 0755 /etc/seguro-fs"),
        "the rpm's %post does not create /etc/seguro-fs:\n{scripts}"
    );
    let info = run_ok(
        Command::new("rpm")
            .args(["-qp", "--queryformat", "%{NAME} %{VERSION}"])
            .arg(&rpm),
    );
    assert_eq!(info, format!("seguro-fs {}", env!("CARGO_PKG_VERSION")));
}
