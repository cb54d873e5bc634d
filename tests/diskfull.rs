//! A full data dir on a real daemon: its data dir is a small tmpfs, a vere-shaped LMDB
//! writer commits through the mount, and a filler file takes the last free byte.
//!
//! Owns the proof that running out of space is neither fatal nor lossy: writes fail with an
//! error (never a false success), the daemon stays up, every acknowledged event stays
//! readable, writing resumes on the same mount once space is freed, and after a clean
//! restart LMDB opens clean with every acknowledged event.

mod common;

use std::fs;
use std::os::unix::ffi::OsStringExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::cluster::{pid_alive, Cluster};
use common::mount::{bin, copy_tree, write_fsync, Daemon, TestDir, PURGE_AT_EVERY_CHECKPOINT};
use common::tmpfs::Tmpfs;
use common::vere;

/// The daemon refuses new writes below this much free space.
const RESERVE_BYTES: &str = "8388608";

fn daemon_args() -> Vec<&'static str> {
    vec![
        "--disk-reserve-bytes",
        RESERVE_BYTES,
        "--disk-full-retry-ms",
        "20",
        // A write that got in just before the disk filled may wait for the log: fsync
        // answers EIO after this instead of the default 10 s.
        "--ack-timeout-ms",
        "2000",
        // Small segments: appends start new segment files while the disk is tight.
        "--log-segment-bytes-max",
        "4194304",
    ]
}

fn status_json(data: &Path) -> String {
    let out = Command::new(bin())
        .arg("status")
        .arg(data)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Commits events in batches of `batch`; `last` is the last acknowledged one (a commit
/// returned Ok, which makes every event before it durable too). On a failed commit the env
/// is closed and opened again, the way vere restarts after a failed commit, and, like
/// vere, it goes on after the last event the log holds: a failed commit may still have
/// taken effect (its fsync failed, not necessarily its writes; SEMANTICS.md, "Failure").
struct Writer {
    dir: std::path::PathBuf,
    epoch: Option<vere::Epoch>,
    last: u64,
}

impl Writer {
    /// Create the pier at `log` and commit 200 events in batches of 10, all acknowledged.
    fn on_new_pier(log: &Path) -> Writer {
        vere::create_pier(log).unwrap();
        let mut w = Writer {
            dir: log.join("0i0"),
            epoch: None,
            last: 0,
        };
        for _ in 0..20 {
            w.commit(10).unwrap();
        }
        w
    }

    fn open(&mut self) -> Result<&vere::Epoch, String> {
        if self.epoch.is_none() {
            let e = vere::Epoch::open(&self.dir).map_err(|e| e.to_string())?;
            let present = e.range().map_err(|e| e.to_string())?.map_or(0, |r| r.1);
            assert!(
                present >= self.last,
                "acknowledged events vanished: {present} < {}",
                self.last
            );
            self.last = present;
            self.epoch = Some(e);
        }
        Ok(self.epoch.as_ref().unwrap())
    }

    fn commit(&mut self, batch: u64) -> Result<(), String> {
        let first = self.last + 1;
        let epoch = self.open()?;
        match epoch.commit(first, batch) {
            Ok(()) => {
                self.last += batch;
                Ok(())
            }
            Err(e) => {
                let _ = self.epoch.take().unwrap().close();
                Err(e.to_string())
            }
        }
    }

    fn verify(&mut self) -> Result<(), String> {
        let last = self.last;
        self.open()?.verify(1, last)
    }

    fn close(mut self) -> u64 {
        if let Some(e) = self.epoch.take() {
            e.close().unwrap();
        }
        self.last
    }
}

#[test]
fn a_full_leader_disk_fails_writes_loses_nothing_and_resumes_when_space_returns() {
    let t = TestDir::new("diskfull");
    let data = t.join("data");
    let mnt = t.join("mnt");
    let disk = Tmpfs::mount(&data, "64m");
    let d = Daemon::start(&data, &mnt, &daemon_args());
    let log = mnt.join("pier/.urb/log");
    let mut w = Writer::on_new_pier(&log);
    let acked_before = w.last;

    // Take every free byte. The first writes after this may still succeed (the log keeps
    // pre-zeroed room ahead of its end, the free-space reading is cached briefly): they
    // count as acknowledged. Within a bounded number of commits one must fail.
    let filler = disk.fill("filler");
    let mut first_failure = None;
    for _ in 0..200 {
        if let Err(e) = w.commit(5) {
            first_failure = Some(e);
            break;
        }
    }
    let first_failure = first_failure.expect("commits kept succeeding on a full disk");
    // ENOSPC when the free-space check refused the write; EIO when a write got in first
    // and its fsync timed out waiting for the log.
    assert!(
        first_failure.contains("No space left on device")
            || first_failure.contains("Input/output error"),
        "{first_failure}"
    );
    eprintln!(
        "first failed commit after filling: {first_failure}; acked {acked_before} -> {}",
        w.last
    );
    // From now on every commit fails with an error, none succeeds.
    for i in 0..5 {
        let r = w.commit(5);
        assert!(r.is_err(), "commit {i} on a full disk succeeded");
    }
    // A plain write of new bytes is refused at once with ENOSPC, like a native full disk.
    let e = fs::write(mnt.join("new-file"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    assert!(pid_alive(d.pid()), "the daemon died on a full disk");
    let st = status_json(&data);
    assert!(st.contains("\"disk_refusing_writes\":true"), "{st}");
    assert!(st.contains("\"writable\":true"), "{st}");
    // Every acknowledged event is still there, read through the mount.
    w.verify().unwrap();

    // Space returns: the same mount accepts commits again, without a restart. The
    // free-space reading may be stale for a moment, so allow a bounded number of refusals.
    fs::remove_file(&filler).unwrap();
    let free = disk.free_bytes();
    eprintln!("free after removing the filler: {free} bytes");
    let mut refused = Vec::new();
    for _ in 0..500 {
        match w.commit(5) {
            Ok(()) => break,
            Err(e) => refused.push(e),
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        refused.len() < 500,
        "no commit succeeded after space was freed ({free} bytes free): {:?}",
        &refused[refused.len().saturating_sub(3)..]
    );
    for _ in 0..10 {
        w.commit(5).unwrap();
    }
    w.verify().unwrap();
    let st = status_json(&data);
    assert!(st.contains("\"disk_refusing_writes\":false"), "{st}");
    assert!(pid_alive(d.pid()));
    let acked = w.close();

    // A clean stop, a restart on the same data dir: LMDB opens clean, nothing acked lost.
    let text = d.stop();
    assert!(text.contains("new writes answer ENOSPC"), "{text}");
    eprintln!(
        "{}",
        text.lines()
            .filter(|l| l.contains("diskfull"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let d = Daemon::start(&data, &mnt, &daemon_args());
    vere::verify_through(&log, acked).unwrap();
    d.stop();
    drop(disk);
}

/// Free space below the reserve but not gone (the case the reserve is for): new bytes are
/// refused with ENOSPC at the first write, nothing waits in the log, and what frees space
/// (unlink, truncate) still goes through the mount; writing resumes once space is back.
#[test]
fn below_the_reserve_new_bytes_get_enospc_and_space_can_be_freed_through_the_mount() {
    let t = TestDir::new("diskreserve");
    let data = t.join("data");
    let mnt = t.join("mnt");
    let disk = Tmpfs::mount(&data, "64m");
    let mut args = daemon_args();
    // A fresh free-space reading for every write: the first write after the fill sees it.
    args.extend(["--disk-free-check-ms", "1"]);
    let d = Daemon::start(&data, &mnt, &args);
    let log = mnt.join("pier/.urb/log");
    let mut w = Writer::on_new_pier(&log);
    write_fsync(&mnt.join("spare-a"), &vec![1u8; 1 << 20]).unwrap();
    write_fsync(&mnt.join("spare-b"), &vec![2u8; 1 << 20]).unwrap();
    let acked_before = w.last;

    // Fill, then give 4 MiB back: free space is under the 8 MiB reserve, above zero.
    let filler = disk.fill("filler");
    let f = fs::OpenOptions::new().write(true).open(&filler).unwrap();
    f.set_len(f.metadata().unwrap().len() - (4 << 20)).unwrap();
    drop(f);
    assert!(disk.free_bytes() >= 4 << 20);
    // Longer than --disk-free-check-ms: the next write takes a new reading.
    std::thread::sleep(Duration::from_millis(2));

    let e = w.commit(5).unwrap_err();
    assert!(e.contains("No space left on device"), "{e}");
    assert_eq!(w.last, acked_before, "nothing more was acknowledged");
    let e = fs::write(mnt.join("new-file"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    let e = fs::create_dir(mnt.join("new-dir")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    // Every other op that adds names or bytes is refused the same way.
    let refused: [(&str, std::io::Result<()>); 5] = [
        (
            "rename",
            fs::rename(mnt.join("spare-a"), mnt.join("renamed")),
        ),
        (
            "link",
            fs::hard_link(mnt.join("spare-a"), mnt.join("linked")),
        ),
        (
            "symlink",
            std::os::unix::fs::symlink("spare-a", mnt.join("symlinked")),
        ),
        ("mknod", {
            let c = std::ffi::CString::new(mnt.join("node").into_os_string().into_vec()).unwrap();
            // SAFETY: mknod of a regular file at a valid NUL-terminated path.
            let r = unsafe { libc::mknod(c.as_ptr(), libc::S_IFREG | 0o644, 0) };
            if r == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        }),
        ("fallocate", {
            use std::os::fd::AsRawFd;
            let f = fs::OpenOptions::new()
                .write(true)
                .open(mnt.join("spare-a"))
                .unwrap();
            // SAFETY: fallocate on a file we opened.
            let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, 8 << 20) };
            if r == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        }),
    ];
    for (op, r) in refused {
        let e = r.expect_err(op);
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{op}: {e}");
    }
    // Freeing space through the mount works, and so does an fsync with nothing new.
    let b = fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("spare-b"))
        .unwrap();
    b.set_len(4096).unwrap();
    b.sync_all().unwrap();
    drop(b);
    fs::remove_file(mnt.join("spare-a")).unwrap();
    let st = status_json(&data);
    assert!(st.contains("\"disk_refusing_writes\":true"), "{st}");
    assert!(st.contains("\"disk_waiting\":0"), "{st}");
    w.verify().unwrap();

    fs::remove_file(&filler).unwrap();
    // As above: the next write sees the space that came back.
    std::thread::sleep(Duration::from_millis(2));
    for _ in 0..10 {
        w.commit(5).unwrap();
    }
    w.verify().unwrap();
    let acked = w.close();
    let text = d.stop();
    assert!(
        !text.contains("the data dir is full"),
        "nothing waited:\n{text}"
    );
    let d = Daemon::start(&data, &mnt, &args);
    vere::verify_through(&log, acked).unwrap();
    assert!(!mnt.join("spare-a").exists());
    assert_eq!(fs::metadata(mnt.join("spare-b")).unwrap().len(), 4096);
    d.stop();
    drop(disk);
}

/// A follower's data dir fills while the leader keeps acknowledging fsyncs (the other
/// follower is the ack). The full follower waits, still running and answering status,
/// and catches up by itself once space is freed: no restart, same tree as the others.
#[test]
fn a_full_follower_waits_and_catches_up_when_space_returns() {
    // Above the default 64 MiB disk_reserve_bytes, so the leader takes writes.
    let mut c = Cluster::start_on_tmpfs(3, None, &["--disk-full-retry-ms", "20"], 256 << 20);
    let leader = c.wait_leader(Duration::from_secs(30));
    let f = c.nodes().find(|i| *i != leader).unwrap();
    let pid = c.pid(f);
    let data = c.data_dir(f);

    c.fill_disk(f);
    let mnt = c.mountpoint(leader);
    let payload = |k: u32| vec![k as u8; 256 << 10];
    // 5 MiB: more than the follower's log has pre-zeroed, so its appends must wait.
    for k in 0..20 {
        write_fsync(&mnt.join(format!("f{k}")), &payload(k)).unwrap_or_else(|e| {
            c.fail(&format!("fsync on the leader with one full follower: {e}"))
        });
    }
    c.wait_for(
        "the full follower to wait for space",
        Duration::from_secs(30),
        || {
            c.status_raw(f)
                .ok()
                .filter(|s| !s.contains("\"disk_waiting\":0"))
        },
    );
    assert_eq!(c.pid(f), pid);
    assert!(c.status(f).is_some(), "the full follower answers status");

    c.free_disk(f);
    c.wait_converged(Duration::from_secs(60));
    assert_eq!(c.pid(f), pid, "the follower was not restarted");
    for k in 0..20 {
        assert_eq!(
            fs::read(data.join(format!("tree/f{k}"))).unwrap(),
            payload(k),
            "f{k} on the follower"
        );
    }
    let text = c.stop(f);
    assert!(text.contains("done waiting for space"), "{text}");
}

/// The leader of a 3-node cluster runs out of space under a vere-shaped writer: its
/// commits fail (never a false success), the acknowledged events stay, and once space is
/// freed the cluster takes writes again (on this node, or on the member that took over
/// while this one's log waited), with every acknowledged event, and all trees converge.
#[test]
fn a_full_leader_in_a_cluster_loses_nothing_and_the_cluster_writes_again() {
    let mut c = Cluster::start_on_tmpfs(3, None, &daemon_args(), 64 << 20);
    let first = c.wait_leader(Duration::from_secs(30));
    let l = c.nodes().find(|i| *i != first).unwrap();
    let st = Command::new(bin())
        .args(["transfer-leader"])
        .arg(c.data_dir(first))
        .args(["--to", &l.to_string()])
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "transfer-leader: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    let leader = c.wait_leader(Duration::from_secs(30));
    assert_eq!(leader, l, "leadership went elsewhere");

    let log = c.mountpoint(l).join("pier/.urb/log");
    let mut w = Writer::on_new_pier(&log);
    c.fill_disk(l);
    let mut failed = false;
    for _ in 0..200 {
        if w.commit(5).is_err() {
            failed = true;
            break;
        }
    }
    assert!(failed, "commits kept succeeding on the leader's full disk");
    for i in 0..3 {
        assert!(
            w.commit(5).is_err(),
            "commit {i} on a full leader succeeded"
        );
    }
    // The acknowledged events are read back through whichever member leads: LMDB opens
    // its file read-write, which a member that no longer leads refuses (EROFS). This one
    // may have stepped down already: its log append waits for space and holds up its
    // heartbeats, so a member with room takes over (the check below runs then).
    match w.verify() {
        Ok(()) => {}
        Err(e) if e.contains("os error 30") => {
            eprintln!("--- node {l} stepped down while its log waited: {e}")
        }
        Err(e) => panic!("reading the acknowledged events back on node {l}: {e}"),
    }
    let acked = w.close();
    assert!(c.status(l).is_some(), "the full leader answers status");

    c.free_disk(l);
    // Whoever leads now (this node, or one elected while its log waited) takes writes.
    let leader = c.wait_leader(Duration::from_secs(60));
    let log = c.mountpoint(leader).join("pier/.urb/log");
    let mut w = Writer {
        dir: log.join("0i0"),
        epoch: None,
        last: acked,
    };
    let mut resumed = false;
    for _ in 0..500 {
        if w.commit(5).is_ok() {
            resumed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        resumed,
        "no commit succeeded on node {leader} after space was freed"
    );
    for _ in 0..10 {
        w.commit(5).unwrap();
    }
    let acked = w.close();
    // Identical trees everywhere; the one that was full, copied (LMDB adds a lock file
    // where it opens), holds every acknowledged event and opens clean.
    c.wait_converged(Duration::from_secs(60));
    let copy = c.dir().join("verify-copy");
    copy_tree(&c.data_dir(l).join("tree"), &copy);
    vere::verify_through(&copy.join("pier/.urb/log"), acked)
        .unwrap_or_else(|e| c.fail(&format!("node {l}'s tree: {e}")));
    let text = c.stop(l);
    // Either its free-space check refused new writes, or its log met the full disk first
    // and it stepped down (no majority heard it while the append waited).
    assert!(
        text.contains("new writes answer ENOSPC") || text.contains("stepping down"),
        "{text}"
    );
    eprintln!(
        "node {l} filled up; node {leader} took the writes after; node {l}'s log waited: {}",
        text.contains("what=\"raft log append\"")
    );
}

/// A disk that stays full past `--disk-full-wait-ms` is a fatal storage error: the daemon
/// takes its mount down and exits non-zero (so systemd restarts it), and after space
/// returns a restart has every acknowledged byte.
#[test]
fn a_disk_full_past_the_wait_stops_the_daemon_with_an_error() {
    let t = TestDir::new("diskfull-giveup");
    let data = t.join("data");
    let mnt = t.join("mnt");
    let disk = Tmpfs::mount(&data, "32m");
    // No reserve: the write is admitted and the log meets the real end of the disk.
    let args = [
        "--disk-reserve-bytes",
        "0",
        "--disk-full-retry-ms",
        "20",
        "--disk-full-wait-ms",
        "1000",
        "--ack-timeout-ms",
        "5000",
    ];
    let d = Daemon::start(&data, &mnt, &args);
    write_fsync(&mnt.join("acked"), b"acknowledged before the disk filled").unwrap();
    let filler = disk.fill("filler");
    // Larger than the log's pre-zeroed room, so the append needs new blocks.
    let big = vec![0x42u8; 4 << 20];
    let r = write_fsync(&mnt.join("doomed"), &big);
    assert!(r.is_err(), "an fsync on a disk that stayed full succeeded");
    let (st, log) = d.wait_exit(Duration::from_secs(60));
    assert!(!st.success(), "exit status {st}:\n{log}");
    assert!(log.contains("stayed full"), "{log}");
    assert!(log.contains("replication stopped"), "{log}");
    assert!(
        !common::mount::is_mounted(&mnt),
        "mount outlived the daemon"
    );

    fs::remove_file(&filler).unwrap();
    let d = Daemon::start(&data, &mnt, &args);
    assert_eq!(
        fs::read(mnt.join("acked")).unwrap(),
        b"acknowledged before the disk filled"
    );
    d.stop();
}

/// A follower behind the purged log comes back to a disk with room for the incremental
/// snapshot it receives but not for the tree it rebuilds from it: the rebuild waits for
/// space (the follower keeps running, the old tree stays), and once space is freed the
/// install finishes and the trees converge.
#[test]
fn a_snapshot_install_on_a_full_disk_waits_and_converges() {
    // Room for the 24 MiB delta, not also for the 24 MiB tree rebuilt from it.
    snapshot_meets_a_full_disk(40 << 20, "rebuilding the tree from an incremental snapshot");
}

/// The same follower comes back to a disk without room even for the snapshot's chunks:
/// the chunk that meets the full disk waits for space (it used to fail the transfer, again
/// and again), and once space is freed the transfer goes on and the trees converge.
#[test]
fn snapshot_chunks_arriving_on_a_full_disk_wait_and_converge() {
    snapshot_meets_a_full_disk(8 << 20, "receiving a snapshot chunk");
}

/// A follower away while a 24 MiB file was rewritten comes back, behind the purged log,
/// with `free_bytes` left on its disk; `waiter` names the write that must wait for space.
fn snapshot_meets_a_full_disk(free_bytes: u64, waiter: &str) {
    const FILE_BYTES: usize = 24 << 20;
    let mut args = PURGE_AT_EVERY_CHECKPOINT.to_vec();
    args.extend(["--disk-full-retry-ms", "20"]);
    let mut c = Cluster::start_on_tmpfs(3, Some(1), &args, 256 << 20);
    let l = c.wait_leader(Duration::from_secs(30));
    let mnt = c.mountpoint(l);
    write_fsync(&mnt.join("image.bin"), &vec![1u8; FILE_BYTES])
        .unwrap_or_else(|e| c.fail(&format!("write image.bin: {e}")));
    c.wait_converged(Duration::from_secs(60));
    let f = c.nodes().find(|i| *i != l).unwrap();
    let f_last = c.status(f).map_or(0, |s| s.last_index);
    c.stop(f);
    // Every chunk changes: the delta carries the whole file.
    write_fsync(&mnt.join("image.bin"), &vec![2u8; FILE_BYTES])
        .unwrap_or_else(|e| c.fail(&format!("rewrite image.bin: {e}")));
    for k in 0..40 {
        write_fsync(&mnt.join(format!("small{k}")), b"x")
            .unwrap_or_else(|e| c.fail(&format!("write small{k}: {e}")));
    }
    c.wait_for(
        "the leader's log to be purged past the follower",
        Duration::from_secs(60),
        || {
            let s = c.status_raw(l).ok()?;
            let first: u64 = s
                .split("\"log_first_index\":")
                .nth(1)?
                .split(|ch: char| !ch.is_ascii_digit())
                .next()?
                .parse()
                .ok()?;
            (first > f_last + 1).then_some(())
        },
    );
    c.leave_free(f, free_bytes);
    c.restart(f);
    c.wait_for(
        "the install to wait for space",
        Duration::from_secs(60),
        || {
            c.status_raw(f)
                .ok()
                .filter(|s| !s.contains("\"disk_waiting\":0"))
        },
    );
    c.free_disk(f);
    c.wait_converged(Duration::from_secs(60));
    let text = c.stop(f);
    assert!(
        text.lines()
            .any(|l| l.contains("done waiting for space") && l.contains(waiter)),
        "{text}"
    );
}
