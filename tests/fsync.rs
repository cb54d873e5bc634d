//! fsync is honest: it reaches the daemon, waits for the log's fdatasync, fails with EIO
//! when that fdatasync fails (after which the daemon takes its mount down and exits
//! non-zero), and what it acknowledged survives SIGKILL.

mod common;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::time::Duration;

use common::cluster::{status_of, Status};
use common::mount::{Daemon, TestDir};

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

#[test]
fn fsync_fails_with_eio_when_the_log_fdatasync_fails() {
    let t = TestDir::new("fsync-fault");
    let data = t.join("data");
    let mnt = t.join("mnt");
    let fault = t.join("fault");
    let d = Daemon::start(
        &data,
        &mnt,
        &[
            "--fault-log-sync-file",
            fault.to_str().unwrap(),
            "--ack-timeout-ms",
            "2000",
        ],
    );

    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(mnt.join("data.mdb"))
        .unwrap();
    f.write_all_at(b"durable", 0).unwrap();
    f.sync_data()
        .expect("fdatasync succeeds while the log can sync");
    let mut g = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DSYNC)
        .open(mnt.join("data.mdb"))
        .unwrap();
    g.write_all(b"dsync ok")
        .expect("an O_DSYNC write succeeds while the log can sync");

    // From now on the log's fdatasync fails. If FSYNC were answered ENOSYS (or not waited
    // for), the kernel would report success here.
    std::fs::write(&fault, b"").unwrap();
    f.write_all_at(b"doomed!", 4096).unwrap();
    let e = f
        .sync_data()
        .expect_err("fdatasync must fail when the log cannot sync");
    assert_eq!(errno(&e), libc::EIO, "{e}");
    let e = f.sync_all().expect_err("fsync must fail too");
    assert_eq!(errno(&e), libc::EIO, "{e}");

    // The failure is sticky: after fsyncgate, nothing may be acknowledged again.
    std::fs::remove_file(&fault).unwrap();
    let e = f.sync_data().expect_err("a failed log stays failed");
    assert_eq!(errno(&e), libc::EIO, "{e}");
    // An O_DSYNC write is a write plus an fsync: it must fail as well.
    let e = g.write_all(b"meta").expect_err("O_DSYNC write must fail");
    assert_eq!(errno(&e), libc::EIO, "{e}");
    // And a failed log takes no new writers.
    let e = OpenOptions::new()
        .write(true)
        .open(mnt.join("data.mdb"))
        .expect_err("opening for write after a log failure");
    assert_eq!(errno(&e), libc::EIO, "{e}");
    drop(g);
    // A node whose log failed can never acknowledge again: rather than serve a mount that
    // only fails, the daemon takes it down and exits non-zero, so systemd restarts it —
    // also while a file stays open on the mount (vere keeps its LMDB env open), which
    // keeps the unmount busy: then the daemon gives up after --ack-timeout-ms and exits,
    // leaving a dead mount for the restart to detach.
    let (st, log) = d.wait_exit(Duration::from_secs(60));
    assert!(!st.success(), "exit status {st} after a failed log:\n{log}");
    assert!(log.contains("replication stopped"), "{log}");
    let e = f
        .write_all_at(b"after", 0)
        .expect_err("a write through the daemon that exited");
    assert_eq!(errno(&e), libc::ENOTCONN, "{e}");
    drop(f);

    // What was acknowledged before the fault is there after a restart.
    let d = Daemon::start(&data, &mnt, &[]);
    let mut buf = [0u8; 7];
    std::fs::File::open(mnt.join("data.mdb"))
        .unwrap()
        .read_exact_at(&mut buf, 0)
        .unwrap();
    assert_eq!(
        &buf, b"dsync o",
        "the O_DSYNC write landed at offset 0 over 'durable'"
    );
    d.stop();
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    let t = TestDir::new("fsync-kill");
    let data = t.join("data");
    let mnt = t.join("mnt");
    let d = Daemon::start(&data, &mnt, &[]);
    // 3 MiB in one write (split across entries) plus scattered small writes.
    let big: Vec<u8> = (0..3u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let f = File::create(mnt.join("f")).unwrap();
    f.write_all_at(&big, 0).unwrap();
    for k in 0..50u64 {
        f.write_all_at(&k.to_le_bytes(), k * 60_013).unwrap();
    }
    f.sync_data().unwrap();
    d.kill9();

    let mut expect = big.clone();
    for k in 0..50u64 {
        let o = (k * 60_013) as usize;
        expect[o..o + 8].copy_from_slice(&k.to_le_bytes());
    }
    let d = Daemon::start(&data, &mnt, &[]);
    assert_eq!(std::fs::read(mnt.join("f")).unwrap(), expect);
    d.stop();
    // And the tree holds it too once the daemon has checkpointed on stop.
    assert_eq!(std::fs::read(data.join("tree/f")).unwrap(), expect);
}

/// O_SYNC writes and fsyncdir are sync points too. An O_SYNC write returns once it is
/// durable; fsyncdir makes every write before it durable, here a plain write that nothing
/// else would have logged yet (the batch linger is long). Both survive kill -9.
#[test]
fn o_sync_writes_and_fsyncdir_are_durable_across_sigkill() {
    let t = TestDir::new("fsync-osync");
    let data = t.join("data");
    let mnt = t.join("mnt");
    let d = Daemon::start(&data, &mnt, &["--batch-linger-us", "1000000"]);
    let osync = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .custom_flags(libc::O_SYNC)
        .open(mnt.join("osync"))
        .unwrap();
    osync.write_all_at(b"o_sync", 0).unwrap();
    let plain = File::create(mnt.join("plain")).unwrap();
    plain.write_all_at(b"before fsyncdir", 0).unwrap();
    File::open(&mnt).unwrap().sync_all().unwrap();
    drop((osync, plain));
    d.kill9();
    let d = Daemon::start(&data, &mnt, &[]);
    assert_eq!(std::fs::read(mnt.join("osync")).unwrap(), b"o_sync");
    assert_eq!(
        std::fs::read(mnt.join("plain")).unwrap(),
        b"before fsyncdir"
    );
    d.stop();
}

/// Group commit's linger (`batch_linger_us`): a commit's WRITEs wait for the FSYNC that
/// follows them and travel with it as one log entry, so the sync point costs one log
/// flush; a WRITE that no FSYNC follows is still logged once the linger is over.
#[test]
fn the_writes_before_an_fsync_travel_in_one_entry_and_unsynced_writes_still_go() {
    let t = TestDir::new("fsync-linger");
    let data = t.join("data");
    let mnt = t.join("mnt");
    // Long enough for the three writes below on a loaded machine, short enough to wait out.
    let d = Daemon::start(&data, &mnt, &["--batch-linger-us", "1000000"]);
    let last_index = || {
        let line = status_of(&data).unwrap_or_else(|e| panic!("status: {e}"));
        Status::parse(&line)
            .unwrap_or_else(|| panic!("status: {line}"))
            .last_index
    };
    let f = File::create(mnt.join("f")).unwrap();
    // The create was applied before open returned: its entry is in the log.
    let before = last_index();
    for (k, word) in [&b"one"[..], b"two", b"three"].into_iter().enumerate() {
        f.write_all_at(word, k as u64 * 4096).unwrap();
    }
    f.sync_data().unwrap();
    assert_eq!(
        last_index(),
        before + 1,
        "three WRITEs and their FSYNC as one entry"
    );
    f.write_all_at(b"four", 3 * 4096).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while last_index() < before + 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "a WRITE without FSYNC was never logged"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(f);
    d.stop();
}

/// After a crash the next start cleans up: a killed daemon's dead mount ("Transport endpoint
/// is not connected") is detached by the daemon that restarts on the same data dir, so
/// systemd's Restart=on-failure recovers without an operator. Another data dir's daemon
/// refuses to touch it.
#[test]
fn restart_detaches_its_own_dead_mount() {
    let t = TestDir::new("dead-mount");
    let data = t.join("data");
    let mnt = t.join("mnt");
    let d = Daemon::start(&data, &mnt, &[]);
    let mut f = File::create(mnt.join("acked")).unwrap();
    f.write_all(b"before the crash").unwrap();
    f.sync_data().unwrap();
    drop(f);
    d.kill9();
    let e = std::fs::metadata(&mnt).unwrap_err();
    assert_eq!(
        errno(&e),
        libc::ENOTCONN,
        "the killed daemon's mount is dead: {e}"
    );

    let run = |data: &std::path::Path| {
        common::mount::no_inherited_files(&mut std::process::Command::new(common::mount::bin()))
            .arg("mount")
            .arg(data)
            .arg(&mnt)
            .arg("--background")
            .output()
            .expect("run seguro-fs")
    };
    std::fs::create_dir_all(t.join("other-data")).unwrap();
    let other = run(&t.join("other-data"));
    let msg = String::from_utf8_lossy(&other.stderr);
    assert!(
        !other.status.success(),
        "another data dir must not take over"
    );
    assert!(
        msg.contains("dead FUSE mount") && msg.contains("not this data dir's mount"),
        "{msg}"
    );
    assert_eq!(errno(&std::fs::metadata(&mnt).unwrap_err()), libc::ENOTCONN);

    let again = run(&data);
    assert!(
        again.status.success(),
        "restart over its own dead mount: {}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(
        std::fs::read(mnt.join("acked")).unwrap(),
        b"before the crash"
    );
    // --background runs the preflight checks before it forks: the parent says it.
    let said = String::from_utf8_lossy(&again.stderr);
    assert!(said.contains("detached the dead mount"), "{said}");
    // umount ends the background daemon; the TestDir detaches anything left on failure.
    let st = std::process::Command::new("umount")
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(st.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while common::mount::data_dir_in_use(&data) {
        assert!(
            std::time::Instant::now() < deadline,
            "daemon did not exit after umount"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(
        std::fs::read(data.join("tree/acked")).unwrap(),
        b"before the crash"
    );
}
