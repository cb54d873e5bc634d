//! LMDB commit rate of a vere-shaped writer on a seguro-fs mount vs. a plain directory on
//! the same disk, measured in one run and printed as ratios (absolute numbers drift on
//! shared machines; ratios much less).
//!
//! `cargo bench --bench commit_rate` (env `SEGURO_BENCH_SECONDS`, default 5 per case).

#[path = "../tests/common/mount.rs"]
mod mount;
#[path = "../tests/common/vere.rs"]
mod vere;

use std::path::Path;
use std::time::{Duration, Instant};

struct Rates {
    events_per_s: f64,
    commits_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn run_case(log: &Path, events_per_commit: u64, seconds: u64) -> Rates {
    vere::create_pier(log).unwrap();
    let epoch = vere::Epoch::open(&log.join("0i0")).unwrap();
    let mut next = 1u64;
    let mut lat = Vec::new();
    let start = Instant::now();
    let until = start + Duration::from_secs(seconds);
    while Instant::now() < until {
        let t = Instant::now();
        epoch.commit(next, events_per_commit).unwrap();
        lat.push(t.elapsed());
        next += events_per_commit;
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort();
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e3;
    epoch.close().unwrap();
    Rates {
        events_per_s: (next - 1) as f64 / secs,
        commits_per_s: lat.len() as f64 / secs,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
    }
}

fn main() {
    let seconds: u64 = std::env::var("SEGURO_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    // Same filesystem for both targets: the data dir and the native dir are siblings.
    let t = mount::TestDir::new("bench");
    println!("workload: vere-shaped LMDB commits (flags 0, 1 TiB map), {seconds} s per case");
    println!(
        "{:<10} {:>7} {:>12} {:>11} {:>9} {:>9} {:>8}",
        "target", "ev/txn", "events/s", "commits/s", "p50 ms", "p99 ms", "ratio"
    );
    for events in [1u64, 100] {
        let native = run_case(&t.join(&format!("native-{events}")), events, seconds);
        let data = t.join(&format!("data-{events}"));
        let mnt = t.join(&format!("mnt-{events}"));
        let d = mount::Daemon::start(&data, &mnt, &[]);
        let seguro = run_case(&mnt, events, seconds);
        d.stop();
        for (name, r) in [("native", &native), ("seguro-fs", &seguro)] {
            println!(
                "{:<10} {:>7} {:>12.0} {:>11.0} {:>9.2} {:>9.2} {:>8.2}",
                name,
                events,
                r.events_per_s,
                r.commits_per_s,
                r.p50_ms,
                r.p99_ms,
                r.events_per_s / native.events_per_s
            );
        }
    }
}
