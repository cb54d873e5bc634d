//! Plain-directory tests of the vere IO reproduction in `tests/common/vere.rs` (no FUSE).
//!
//! Owns the proof that the support code itself is right before it is pointed at a mount:
//! the scripted workload round-trips, the verifiers catch corruption, `epochs()` honours
//! d_type, and the recording writer survives SIGKILL in a separate process with every
//! recorded event intact.

mod common;

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::mount::TestDir as TempDir;
use common::vere;

/// A pier-shaped path: `<tmp>/pier/.urb/log`, created by `create_pier` (mkdir -p).
fn log_dir(tmp: &TempDir) -> PathBuf {
    tmp.path().join("pier/.urb/log")
}

#[test]
fn event_values_are_deterministic_and_sized_like_vere() {
    let mut small = 0;
    let mut medium = 0;
    let mut big = 0;
    for n in 1..=2000u64 {
        let v = vere::event_value(n);
        let len = v.len() - 4;
        match len {
            100..=2000 => small += 1,
            65_536..=262_144 => medium += 1,
            1_153_434..=1_572_864 => big += 1,
            _ => panic!("event {n}: payload of {len} bytes is outside every size class"),
        }
    }
    assert_eq!(vere::event_value(1234), vere::event_value(1234));
    assert_ne!(vere::event_value(1234), vere::event_value(1235));
    // The workload range must really contain overflow-page-sized values.
    assert!(big >= 1, "no >1 MiB event in 1..=2000");
    assert!((10..=80).contains(&medium), "{medium} medium events");
    assert!(small > 1800, "{small} small events");
}

#[test]
fn workload_round_trips_on_a_plain_directory() {
    let tmp = TempDir::new("workload");
    let log = log_dir(&tmp);
    let image_src = tmp.path().join("image-src.bin"); // outside the log, like .urb/chk
    let image_bytes = 8 << 20;
    let t = Instant::now();
    let summary = vere::run_workload(&log, 0x5eed, 2000, &image_src, image_bytes).unwrap();
    let wrote = t.elapsed();
    assert_eq!(summary.last_event, 2000);
    assert_eq!(summary.epochs, vec![(1000, 1001, 1500), (1500, 1501, 2000)]);
    assert!(!log.join("0i0").exists(), "chop must delete 0i0");
    let t = Instant::now();
    vere::verify_workload(&log, &summary, image_bytes).unwrap();
    eprintln!(
        "workload: wrote in {wrote:?}, verified in {:?}",
        t.elapsed()
    );
    // The same seed gives the same log layout.
    let tmp2 = TempDir::new("workload-again");
    let summary2 = vere::run_workload(
        &log_dir(&tmp2),
        0x5eed,
        2000,
        &tmp2.path().join("image-src.bin"),
        4096,
    )
    .unwrap();
    assert_eq!(summary, summary2);
}

#[test]
fn verify_detects_corrupt_and_missing_events() {
    let tmp = TempDir::new("corrupt");
    let log = log_dir(&tmp);
    vere::create_pier(&log).unwrap();
    let epoch = vere::Epoch::open(&log.join("0i0")).unwrap();
    epoch.commit(1, 1).unwrap();
    epoch.commit(2, 49).unwrap();
    assert_eq!(epoch.range().unwrap(), Some((1, 50)));
    epoch.verify(1, 50).unwrap();

    // NO_OVERWRITE: re-committing an existing event fails the whole transaction.
    match epoch.commit(50, 2) {
        Err(heed::Error::Mdb(heed::MdbError::KeyExist)) => {}
        other => panic!("expected KeyExist, got {other:?}"),
    }
    assert_eq!(epoch.range().unwrap(), Some((1, 50)));

    // One flipped payload byte.
    let good = vere::event_value(17);
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0x01;
    epoch.put_raw(17, &bad).unwrap();
    let err = epoch.verify(1, 50).unwrap_err();
    assert!(err.contains("event 17 differs"), "{err}");

    // A missing event.
    epoch.put_raw(17, &good).unwrap();
    epoch.verify(1, 50).unwrap();
    assert!(epoch.delete_raw(23).unwrap());
    let err = epoch.verify(1, 50).unwrap_err();
    assert!(err.contains("event 23 missing"), "{err}");
    epoch.close().unwrap();
    let err = vere::verify_through(&log, 50).unwrap_err();
    assert!(err.contains("event 23 missing"), "{err}");
}

#[test]
fn events_db_orders_keys_as_integers() {
    // MDB_INTEGERKEY on little-endian u64 keys: 256 (00 01 00..) sorts after 250 (fa 00..).
    // Without the flag LMDB would compare bytes and report 256 as the first key.
    let tmp = TempDir::new("intkey");
    let log = log_dir(&tmp);
    vere::create_pier(&log).unwrap();
    let epoch = vere::Epoch::open(&log.join("0i0")).unwrap();
    epoch.commit(250, 11).unwrap();
    assert_eq!(epoch.range().unwrap(), Some((250, 260)));
    epoch.commit(65_530, 10).unwrap();
    assert_eq!(epoch.range().unwrap(), Some((250, 65_539)));
    epoch.close().unwrap();
    // Reopening (a fresh dbi open against the stored flags) still works.
    let epoch = vere::Epoch::open(&log.join("0i0")).unwrap();
    assert_eq!(epoch.len().unwrap(), 21);
    epoch.verify(250, 260).unwrap();
    epoch.close().unwrap();
}

#[test]
fn verify_workload_detects_corruption() {
    let tmp = TempDir::new("corrupt-workload");
    let log = log_dir(&tmp);
    let image_src = tmp.path().join("image-src.bin");
    let image_bytes = 100_000; // not a multiple of the 16 KiB copy page
    let summary = vere::run_workload(&log, 3, 400, &image_src, image_bytes).unwrap();
    vere::verify_workload(&log, &summary, image_bytes).unwrap();

    // Corrupt one event in the newest epoch.
    let (n, first, _) = *summary.epochs.last().unwrap();
    let dir = log.join(format!("0i{n}"));
    let epoch = vere::Epoch::open(&dir).unwrap();
    epoch.put_raw(first + 3, b"\0\0\0\0garbage").unwrap();
    epoch.close().unwrap();
    let err = vere::verify_workload(&log, &summary, image_bytes).unwrap_err();
    assert!(
        err.contains(&format!("event {} differs", first + 3)),
        "{err}"
    );
    let epoch = vere::Epoch::open(&dir).unwrap();
    epoch
        .put_raw(first + 3, &vere::event_value(first + 3))
        .unwrap();
    epoch.close().unwrap();
    vere::verify_workload(&log, &summary, image_bytes).unwrap();

    // Corrupt one byte of a rolled image.
    let image = dir.join("image.bin");
    let mut bytes = fs::read(&image).unwrap();
    bytes[70_000] ^= 0x80;
    fs::write(&image, &bytes).unwrap();
    let err = vere::verify_workload(&log, &summary, image_bytes).unwrap_err();
    assert!(err.contains("byte 70000 differs"), "{err}");
}

#[test]
fn epochs_lists_only_directories_named_like_epochs() {
    let tmp = TempDir::new("epochs");
    let log = log_dir(&tmp);
    vere::create_pier(&log).unwrap();
    vere::create_epoch(&log, 10, None).unwrap();
    vere::create_epoch(&log, 9, None).unwrap();
    File::create(log.join("0i99")).unwrap(); // regular file: not an epoch
    fs::create_dir(log.join("0ix")).unwrap(); // bad name
    fs::create_dir(log.join("1i5")).unwrap(); // bad name
    std::os::unix::fs::symlink("0i10", log.join("0i77")).unwrap(); // DT_LNK: ignored
    let found: Vec<u64> = vere::epochs(&log)
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(found, vec![0, 9, 10]);

    // chop keeps the two newest and unlinks everything (lock.mdb included) in the rest.
    assert!(log.join("0i0/lock.mdb").exists());
    vere::chop(&log).unwrap();
    let found: Vec<u64> = vere::epochs(&log)
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(found, vec![9, 10]);
    assert!(!log.join("0i0").exists());
}

#[test]
fn last_recorded_ignores_a_torn_line() {
    let tmp = TempDir::new("record");
    let rec = tmp.path().join("record");
    assert_eq!(vere::last_recorded(&rec).unwrap(), None);
    fs::write(&rec, "").unwrap();
    assert_eq!(vere::last_recorded(&rec).unwrap(), None);
    fs::write(&rec, "12").unwrap();
    assert_eq!(vere::last_recorded(&rec).unwrap(), None);
    fs::write(&rec, "5\n17\n2").unwrap();
    assert_eq!(vere::last_recorded(&rec).unwrap(), Some(17));
    fs::write(&rec, "5\nx\n").unwrap();
    assert!(vere::last_recorded(&rec).is_err());
}

// --- recording writer in a child process --------------------------------------------------

const CHILD_LOG: &str = "SEGURO_VERE_CHILD_LOG";
const CHILD_RECORD: &str = "SEGURO_VERE_CHILD_RECORD";
const CHILD_SEED: &str = "SEGURO_VERE_CHILD_SEED";
const CHILD_ROLL: &str = "SEGURO_VERE_CHILD_ROLL";
const CHILD_TEST: &str = "recording_writer_child";

/// The child side: only does work when the parent set the env vars, so a plain
/// `cargo test -- --ignored` run passes through it harmlessly.
#[test]
#[ignore = "child process of recording_writer_survives_sigkill"]
fn recording_writer_child() {
    let Some(log) = std::env::var_os(CHILD_LOG) else {
        return;
    };
    let record = std::env::var_os(CHILD_RECORD).expect(CHILD_RECORD);
    let seed: u64 = std::env::var(CHILD_SEED).unwrap().parse().unwrap();
    let roll: u64 = std::env::var(CHILD_ROLL).unwrap().parse().unwrap();
    if let Err(e) = vere::run_recording_writer(Path::new(&log), Path::new(&record), seed, roll) {
        // vere exits on a failed commit; a distinct code tells the parent why.
        eprintln!("recording writer failed: {e}");
        std::process::exit(3);
    }
}

/// Re-exec this test binary running only the child test.
fn spawn_writer(log: &Path, record: &Path, seed: u64, roll: u64, out: &Path) -> Child {
    let exe = std::env::current_exe().unwrap();
    let out_file = File::create(out).unwrap();
    Command::new(exe)
        .args(["--exact", CHILD_TEST, "--ignored", "--nocapture"])
        .env(CHILD_LOG, log)
        .env(CHILD_RECORD, record)
        .env(CHILD_SEED, seed.to_string())
        .env(CHILD_ROLL, roll.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::from(out_file.try_clone().unwrap()))
        .stderr(Stdio::from(out_file))
        .spawn()
        .unwrap()
}

/// Let the child write for at least `run_for` and until `min_last` is recorded (bounded by a
/// deadline), then SIGKILL it by pid. Returns the last recorded event.
fn run_then_kill(
    child: &mut Child,
    record: &Path,
    out: &Path,
    run_for: Duration,
    min_last: u64,
) -> u64 {
    let start = Instant::now();
    let deadline = start + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "writer exited early ({status}):\n{}",
                fs::read_to_string(out).unwrap_or_default()
            );
        }
        let last = vere::last_recorded(record).unwrap().unwrap_or(0);
        if start.elapsed() >= run_for && last >= min_last {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "writer recorded only {last} events in 60 s:\n{}",
            fs::read_to_string(out).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = child.id() as libc::pid_t;
    // SAFETY: plain kill(2) on our own child, which has not been reaped yet.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let status = child.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL),
        "child was not killed by SIGKILL: {status}"
    );
    vere::last_recorded(record).unwrap().unwrap_or(0)
}

#[test]
fn recording_writer_survives_sigkill() {
    let tmp = TempDir::new("sigkill");
    let log = log_dir(&tmp);
    let record = tmp.path().join("record.txt");
    let out = tmp.path().join("child-output.txt");
    let roll_every = 400;

    // First run: fresh pier; wait for at least two rolls.
    let mut child = spawn_writer(&log, &record, 11, roll_every, &out);
    let first = run_then_kill(
        &mut child,
        &record,
        &out,
        Duration::from_secs(1),
        2 * roll_every + 1,
    );
    vere::verify_through(&log, first).unwrap();
    assert!(vere::epochs(&log).unwrap().len() >= 3);

    // Second run: restart on the killed log, continue from the last event present.
    let mut child = spawn_writer(&log, &record, 12, roll_every, &out);
    let second = run_then_kill(
        &mut child,
        &record,
        &out,
        Duration::from_millis(500),
        first + 1,
    );
    assert!(second > first);
    vere::verify_through(&log, second).unwrap();
    eprintln!(
        "recording writer: {first} events before the first kill, {second} after the second, \
         {} epochs",
        vere::epochs(&log).unwrap().len()
    );
}

/// The chopping writer's checker: a chop cut short leaves the oldest epoch partly deleted,
/// which `verify_surviving` skips (without opening it, which would create a data.mdb) only
/// while two newer epochs exist; a damaged epoch among the two newest is an error.
#[test]
fn verify_surviving_skips_only_a_partly_chopped_oldest_epoch() {
    let tmp = TempDir::new("partial-chop");
    let log = log_dir(&tmp);
    vere::create_pier(&log).unwrap();
    let image = tmp.path().join("image-src");
    let mut dirs = vec![log.join("0i0")];
    for (k, n) in [0u64, 100, 200].into_iter().enumerate() {
        let e = vere::Epoch::open(&dirs[k]).unwrap();
        e.commit(n + 1, 100).unwrap();
        e.close().unwrap();
        if n < 200 {
            vere::write_image_source(&image, n + 100, 4096).unwrap();
            dirs.push(vere::create_epoch(&log, n + 100, Some(&image)).unwrap());
        }
    }
    vere::verify_surviving(&log, 300).unwrap();

    // The chop of 0i0 got as far as data.mdb: skipped, and not recreated.
    fs::remove_file(dirs[0].join("data.mdb")).unwrap();
    vere::verify_surviving(&log, 300).unwrap();
    assert!(
        !dirs[0].join("data.mdb").exists(),
        "the checker opened a leftover epoch"
    );
    // ... or as far as epoc.txt.
    fs::remove_file(dirs[0].join("epoc.txt")).unwrap();
    vere::verify_surviving(&log, 300).unwrap();
    // The non-chopping check still wants 0i0 whole.
    assert!(vere::verify_through(&log, 300).is_err());

    // An epoch among the two newest is never a chop's leftover.
    fs::remove_file(dirs[1].join("epoc.txt")).unwrap();
    let e = vere::verify_surviving(&log, 300).unwrap_err();
    assert!(e.contains("epoc.txt"), "{e}");
}
