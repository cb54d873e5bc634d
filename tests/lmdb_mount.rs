//! vere-shaped LMDB workloads on a real seguro-fs mount: the full scripted workload with
//! rolls and a chop, verified through the mount, after a remount, and in `DATA_DIR/tree/`
//! opened directly; and a second process reading the env while the writer commits.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::mount::{copy_tree, ChildTest, Daemon, TestDir};
use common::vere;

const IMAGE_BYTES: u64 = 8 << 20;

/// The tests of this file run one at a time: a child process spawned by one (the reader)
/// would otherwise inherit LMDB's descriptors of the other's mount (LMDB does not open them
/// close-on-exec) and keep that mount busy.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn vere_workload_survives_remount_and_tree_is_plain_lmdb() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
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
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
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
