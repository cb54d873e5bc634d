//! vere-shaped LMDB workloads on a real seguro-fs mount: the full scripted workload with
//! rolls and a chop, verified through the mount, after a remount, and in `DATA_DIR/tree/`
//! opened directly; and a second process reading the env while the writer commits.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::mount::{copy_tree, no_inherited_files, ChildTest, Daemon, TestDir};
use common::vere;

const IMAGE_BYTES: u64 = 8 << 20;

/// A child started through `no_inherited_files` holds none of this process's LMDB files,
/// which a plain spawn hands down (LMDB opens data.mdb without O_CLOEXEC): the inherited
/// descriptor is what kept a parallel test's mount busy.
#[test]
fn children_started_by_the_tests_inherit_no_lmdb_file() {
    let t = TestDir::new("cloexec");
    let log = t.join("log");
    vere::create_pier(&log).unwrap();
    let env = vere::open_env(&log).unwrap();
    let open_fds = |cmd: &mut std::process::Command| {
        let out = cmd.arg("-l").arg("/proc/self/fd").output().unwrap();
        assert!(out.status.success(), "ls /proc/self/fd failed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let plain = open_fds(&mut std::process::Command::new("ls"));
    assert!(
        plain.contains("data.mdb"),
        "a plain child no longer inherits data.mdb (LMDB changed?):\n{plain}"
    );
    let guarded = open_fds(no_inherited_files(&mut std::process::Command::new("ls")));
    assert!(!guarded.contains("data.mdb"), "{guarded}");
    vere::close_env(env).unwrap();
}

#[test]
fn vere_workload_survives_remount_and_tree_is_plain_lmdb() {
    let t = TestDir::new("workload");
    let data = t.join("data");
    let log = t.join("pier/.urb/log");
    let image = t.join("image.src");
    let seed = 0x5e6u64;

    let d = Daemon::start(&data, &log, &[]);
    let summary = vere::run_workload(&log, seed, 3000, &image, IMAGE_BYTES)
        .unwrap_or_else(|e| panic!("workload on the mount failed: {e}\n{}", d.log_text()));
    assert!(summary.epochs.len() >= 2, "{summary:?}");
    vere::verify_workload(&log, &summary, IMAGE_BYTES).expect("verify through the mount");
    assert!(
        !log.join("0i0").exists(),
        "chop must have removed epoch 0i0 (including its lock.mdb)"
    );
    d.stop();

    // Remount: everything comes back from the data dir.
    let d = Daemon::start(&data, &log, &[]);
    vere::verify_workload(&log, &summary, IMAGE_BYTES).expect("verify after remount");
    d.stop();

    // The committed tree is itself a usable .urb/log (copied, so LMDB's lock files do not
    // land in the replica's tree).
    let copy = t.join("tree-copy");
    copy_tree(&data.join("tree"), &copy);
    vere::verify_workload(&copy, &summary, IMAGE_BYTES).expect("verify DATA_DIR/tree without FUSE");
    // lock.mdb never entered the replicated tree.
    for (_, dir) in vere::epochs(&data.join("tree")).unwrap() {
        assert!(
            !dir.join("lock.mdb").exists(),
            "{} holds lock.mdb",
            dir.display()
        );
    }
    assert!(!data.join("tree/lock.mdb").exists());
}

/// Child side of `reader_process_sees_commits_while_writer_commits`.
#[test]
#[ignore = "runs as a child process of another test"]
fn reader_child() {
    let Ok(dir) = std::env::var("SEGURO_READER_DIR") else {
        return;
    };
    let out = PathBuf::from(std::env::var("SEGURO_READER_OUT").unwrap());
    let target: u64 = std::env::var("SEGURO_READER_TARGET")
        .unwrap()
        .parse()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let epoch = vere::Epoch::open(std::path::Path::new(&dir)).expect("reader opens the env");
    let mut seen = Vec::new();
    loop {
        let last = epoch.range().expect("read txn").map_or(0, |(_, l)| l);
        if last > 0 {
            epoch.verify(1, last).expect("reader sees intact events");
        }
        if seen.last() != Some(&last) {
            seen.push(last);
        }
        if last >= target || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let text: Vec<String> = seen.iter().map(u64::to_string).collect();
    std::fs::write(out, text.join("\n")).unwrap();
}

#[test]
fn reader_process_sees_commits_while_writer_commits() {
    let t = TestDir::new("reader");
    let data = t.join("data");
    let log = t.join("log");
    let d = Daemon::start(&data, &log, &[]);
    vere::create_pier(&log).unwrap();
    let epoch_dir = log.join("0i0");
    let target = 2000u64;
    let out = t.join("reader.out");
    let reader = ChildTest::spawn(
        "reader_child",
        &[
            ("SEGURO_READER_DIR", epoch_dir.display().to_string()),
            ("SEGURO_READER_OUT", out.display().to_string()),
            ("SEGURO_READER_TARGET", target.to_string()),
        ],
    );
    let writer = vere::Epoch::open(&epoch_dir).unwrap();
    let mut next = 1u64;
    let mut size = 1u64;
    while next <= target {
        let n = size.min(target - next + 1);
        writer.commit(next, n).unwrap();
        next += n;
        size = size % 37 + 1;
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        reader.wait(Duration::from_secs(150)),
        "reader child failed:\n{}",
        d.log_text()
    );
    let seen: Vec<u64> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(
        seen.last(),
        Some(&target),
        "reader never saw the final commit: {seen:?}"
    );
    assert!(
        seen.len() > 5,
        "the reader should observe the log growing commit by commit, saw {seen:?}"
    );
    drop(writer);
    d.stop();
}

/// The ship's user in `vere_workload_as_an_unprivileged_user_through_a_root_daemon`.
const SHIP_UID: u32 = 1000;

/// Child side of `vere_workload_as_an_unprivileged_user_through_a_root_daemon`: drops to
/// uid and gid 1000 with no supplementary groups, as a ship run by its own user, runs the
/// workload on the mount, verifies it and writes its summary.
#[test]
#[ignore = "runs as a child process of another test"]
fn unprivileged_writer_child() {
    let Ok(log) = std::env::var("SEGURO_USER_LOG") else {
        return;
    };
    let home = PathBuf::from(std::env::var("SEGURO_USER_HOME").unwrap());
    // SAFETY: dropping privileges; glibc applies setgid/setuid to every thread.
    unsafe {
        assert_eq!(libc::setgroups(0, std::ptr::null()), 0);
        assert_eq!(libc::setgid(SHIP_UID), 0);
        assert_eq!(libc::setuid(SHIP_UID), 0);
        assert_eq!((libc::geteuid(), libc::getegid()), (SHIP_UID, SHIP_UID));
    }
    let log = PathBuf::from(log);
    let summary = vere::run_workload(&log, 0x1000, 1200, &home.join("image.src"), IMAGE_BYTES)
        .expect("the workload as uid 1000");
    vere::verify_workload(&log, &summary, IMAGE_BYTES).expect("verify as uid 1000");
    let lines: Vec<String> = std::iter::once(summary.last_event.to_string())
        .chain(
            summary
                .epochs
                .iter()
                .map(|(n, a, b)| format!("{n} {a} {b}")),
        )
        .collect();
    std::fs::write(home.join("summary"), lines.join("\n")).unwrap();
}

/// A ship need not run as root: a root daemon mounts with `allow_other` and
/// `default_permissions`, the pier's log directory is given to the ship's user through the
/// mount, and vere's whole LMDB workload then runs as that user. Every file it made is its
/// own, on the mount and in the replicated tree, and survives a remount.
#[test]
fn vere_workload_as_an_unprivileged_user_through_a_root_daemon() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test starts the daemon as root and the ship as uid {SHIP_UID}"
    );
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let t = TestDir::new("unprivileged");
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data = t.join("data");
    let log = t.join("pier/.urb/log");
    let home = t.join("home");
    std::fs::create_dir(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(SHIP_UID), Some(SHIP_UID)).unwrap();

    let d = Daemon::start(&data, &log, &[]);
    // The operator's one step: the log directory (the mount's root) is the ship's.
    std::os::unix::fs::chown(&log, Some(SHIP_UID), Some(SHIP_UID)).unwrap();
    let child = ChildTest::spawn(
        "unprivileged_writer_child",
        &[
            ("SEGURO_USER_LOG", log.display().to_string()),
            ("SEGURO_USER_HOME", home.display().to_string()),
        ],
    );
    assert!(
        child.wait(Duration::from_secs(300)),
        "the workload as uid {SHIP_UID} failed (its output is above)\n{}",
        d.log_text()
    );
    let text = std::fs::read_to_string(home.join("summary")).unwrap();
    let mut lines = text.lines();
    let last_event = lines.next().unwrap().parse().unwrap();
    let epochs = lines
        .map(|l| {
            let v: Vec<u64> = l.split(' ').map(|x| x.parse().unwrap()).collect();
            (v[0], v[1], v[2])
        })
        .collect();
    let summary = vere::Summary { last_event, epochs };
    assert!(summary.epochs.len() >= 2, "{summary:?}");

    // Every name the ship made is its own, through the mount and in the tree.
    let owned = |root: &std::path::Path| {
        let mut n = 0;
        for (_, dir) in vere::epochs(root).unwrap() {
            for e in std::fs::read_dir(&dir).unwrap() {
                let m = std::fs::symlink_metadata(e.unwrap().path()).unwrap();
                assert_eq!((m.uid(), m.gid()), (SHIP_UID, SHIP_UID));
                n += 1;
            }
            let m = std::fs::metadata(&dir).unwrap();
            assert_eq!((m.uid(), m.gid()), (SHIP_UID, SHIP_UID));
        }
        n
    };
    assert!(owned(&log) >= 8);
    d.stop();
    assert!(owned(&data.join("tree")) >= 6);
    let d = Daemon::start(&data, &log, &[]);
    vere::verify_workload(&log, &summary, IMAGE_BYTES).expect("verify after remount");
    d.stop();
}
