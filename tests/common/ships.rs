//! The stand-in ship of the supervised-ship tests (`tests/ship.rs`, the supervised chaos
//! runs in `tests/chaos.rs`): a vere-shaped LMDB writer that seguro-fs starts as its
//! `ship_command`, and [`Ships`], which watches every ship a test's cluster started.
//!
//! The ship ([`ship_main`], run by a test binary re-executed through [`ship_command`])
//! boots as vere does — opens the LMDB event log on the mount (flags 0, 1 TiB map), finds
//! the last event, checks that every event any earlier ship recorded as acknowledged is
//! there, and continues committing — and exits non-zero when a commit fails. Each ship
//! records its acknowledged events in a file of its own outside the mount
//! (`ships/START-NODE-PID.rec`, START in ns so names sort by start), and registers its pid
//! so a sampler thread can count the ships alive at any moment.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::vere;

pub const SHIP_DIR_ENV: &str = "SEGURO_TEST_SHIP_DIR";
/// Pause between a ship's commits, in ms.
pub const SHIP_GAP_ENV: &str = "SEGURO_TEST_SHIP_GAP_MS";
/// Exit code of a ship that found an acknowledged event missing at boot.
pub const LOST_EXIT: i32 = 42;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

pub fn unix_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// The stand-in ship's body: returns at once unless this process was started as a ship
/// (by [`ship_command`]); never returns otherwise.
pub fn ship_main() {
    let Ok(dir) = std::env::var(SHIP_DIR_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let log = PathBuf::from(std::env::var("SEGURO_MOUNTPOINT").expect("SEGURO_MOUNTPOINT"));
    let node: u64 = env_u64("SEGURO_NODE_ID").expect("SEGURO_NODE_ID");
    let term: u64 = env_u64("SEGURO_TERM").expect("SEGURO_TERM");
    let start = unix_ns();
    let name = format!("{start:024}-{node}-{}", std::process::id());
    fs::write(dir.join("ships").join(&name), term.to_string()).unwrap();
    // Boot as vere does: every event an earlier ship saw acknowledged must be here.
    let acked = Ships::at(&dir).last_acknowledged();
    if acked > 0 {
        if let Err(e) = vere::verify_surviving(&log, acked) {
            fs::write(
                dir.join("LOST"),
                format!("ship {name} booted without acknowledged event {acked}: {e}"),
            )
            .unwrap();
            std::process::exit(LOST_EXIT);
        }
    }
    let opts = vere::WriterOptions {
        roll_every: 300,
        batch_events_max: 20,
        commit_gap: Duration::from_millis(env_u64(SHIP_GAP_ENV).unwrap_or(5)),
        chop: true,
    };
    let record = dir.join("ships").join(format!("{name}.rec"));
    let r = vere::run_recording_writer_with(&log, &record, start as u64, &opts);
    eprintln!("ship {name} stopped: {r:?}");
    std::process::exit(1);
}

/// The ships' shared directory, and a sampler of how many run at once.
pub struct Ships {
    pub dir: PathBuf,
    stop: Arc<AtomicBool>,
    /// Most ships seen alive at once, and for how long (ms, summed) two or more were.
    max_alive: Arc<AtomicU64>,
    pub overlap_ms: Arc<AtomicU64>,
    sampler: Option<std::thread::JoinHandle<()>>,
}

/// Whether `pid` runs (a zombie has exited; only its parent has not reaped it yet).
pub fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, r)| !r.starts_with('Z')))
        .unwrap_or(false)
}

impl Ships {
    /// Read-only view (for the ship itself).
    pub fn at(dir: &Path) -> Ships {
        Ships {
            dir: dir.to_path_buf(),
            stop: Arc::default(),
            max_alive: Arc::default(),
            overlap_ms: Arc::default(),
            sampler: None,
        }
    }

    pub fn new(dir: &Path) -> Ships {
        fs::create_dir_all(dir.join("ships")).unwrap();
        let mut s = Ships::at(dir);
        let (d, stop, max, overlap) = (
            dir.to_path_buf(),
            s.stop.clone(),
            s.max_alive.clone(),
            s.overlap_ms.clone(),
        );
        s.sampler = Some(std::thread::spawn(move || {
            let view = Ships::at(&d);
            let mut last = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let n = view.alive().len() as u64;
                max.fetch_max(n, Ordering::Relaxed);
                if n >= 2 {
                    overlap.fetch_add(last.elapsed().as_millis() as u64, Ordering::Relaxed);
                }
                last = Instant::now();
                std::thread::sleep(Duration::from_millis(3));
            }
        }));
        s
    }

    /// Every ship that ever started, oldest first: (name, node, pid).
    pub fn started(&self) -> Vec<(String, u64, u32)> {
        let mut v: Vec<(String, u64, u32)> = fs::read_dir(self.dir.join("ships"))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.ends_with(".rec"))
                    .filter_map(|n| {
                        let mut it = n.split('-');
                        let _start = it.next()?;
                        let node = it.next()?.parse().ok()?;
                        let pid = it.next()?.parse().ok()?;
                        Some((n.clone(), node, pid))
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// The leadership (node, term) each ship started in, in start order.
    pub fn leaderships(&self) -> Vec<(u64, u64)> {
        self.started()
            .into_iter()
            .filter_map(|(name, node, _)| {
                let term = fs::read_to_string(self.dir.join("ships").join(&name)).ok()?;
                Some((node, term.trim().parse().ok()?))
            })
            .collect()
    }

    /// Ships alive now: (node, pid).
    pub fn alive(&self) -> Vec<(u64, u32)> {
        self.started()
            .into_iter()
            .filter(|(_, _, pid)| alive(*pid))
            .map(|(_, node, pid)| (node, pid))
            .collect()
    }

    /// Every ship's acknowledged events, in start order.
    pub fn records(&self) -> Vec<(String, Vec<u64>)> {
        self.started()
            .into_iter()
            .map(|(name, _, _)| {
                let text = fs::read_to_string(self.dir.join("ships").join(format!("{name}.rec")))
                    .unwrap_or_default();
                // A torn last line (no newline) was never acknowledged.
                let complete = text.rfind('\n').map_or("", |i| &text[..i]);
                let events = complete.lines().filter_map(|l| l.parse().ok()).collect();
                (name, events)
            })
            .collect()
    }

    pub fn last_acknowledged(&self) -> u64 {
        self.records()
            .iter()
            .flat_map(|(_, e)| e.last().copied())
            .max()
            .unwrap_or(0)
    }

    /// No acknowledged event lost at any boot, and event numbers that only grow from one
    /// ship to the next: two ships committing at once would reuse numbers.
    pub fn check(&self) -> Result<(), String> {
        if let Ok(lost) = fs::read_to_string(self.dir.join("LOST")) {
            return Err(lost);
        }
        let mut prev = 0;
        for (name, events) in self.records() {
            for e in events {
                if e <= prev {
                    return Err(format!(
                        "ship {name} acknowledged event {e} after event {prev} was acknowledged: \
                         two ships committed"
                    ));
                }
                prev = e;
            }
        }
        Ok(())
    }

    pub fn max_alive(&self) -> u64 {
        self.max_alive.load(Ordering::Relaxed)
    }
}

impl Drop for Ships {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.sampler.take() {
            let _ = t.join();
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// The ship command every member gets: it re-executes this test binary's `test_name`
/// (an `#[ignore]`d test that calls [`ship_main`]), pausing `gap_ms` between commits.
/// `fail-NODE` in the ship dir makes that node's ship exit at once with code 3 (a host
/// that cannot run the ship).
pub fn ship_command(dir: &Path, test_name: &str, gap_ms: u64) -> String {
    let exe = std::env::current_exe().unwrap();
    format!(
        "[ -e {d}/fail-$SEGURO_NODE_ID ] && exit 3; \
         exec env {SHIP_DIR_ENV}={d} {SHIP_GAP_ENV}={gap_ms} {exe} {test_name} --exact --ignored \
         --nocapture --test-threads=1",
        d = dir.display(),
        exe = exe.display()
    )
}

/// A directory for the ships, outside every mount (removed when its [`Ships`] drops).
pub fn tempdir() -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let d = std::env::temp_dir().join(format!(
        "seguro-test-ships-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}
