//! seguro-fs benchmark: vere-shaped LMDB commits (1 and 100 events of 512 B per commit),
//! 4 KiB pwrite + fdatasync latency, a sequential write, failover time and the daemon's peak
//! RSS on a sparse file, each on a plain directory (native), bindfs, a GlusterFS replica-3
//! volume on this host, seguro-fs standalone and a 3-node seguro-fs cluster on loopback
//! with K = 0, 1, 2; one table, each figure with its ratio to native. The logic is in
//! `bench/suite.rs` (shared with `tests/bench_smoke.rs`).
//!
//! `bench/run` runs it in release and writes `docs/BENCHMARKS.md`; by hand:
//! `cargo bench --bench seguro_bench -- [--targets ..] [--workloads ..] [--seconds S]
//! [--reps N] [--smoke] [--out F.tsv] [--md F.md] [--svg F.svg]` (`-- --help`).

#[path = "../tests/common/cluster.rs"]
mod cluster;
#[path = "../tests/common/mount.rs"]
mod mount;
#[path = "../tests/common/proxy.rs"]
mod proxy;
#[path = "../bench/suite.rs"]
mod suite;
#[path = "../tests/common/tmpfs.rs"]
mod tmpfs;
#[path = "../tests/common/vere.rs"]
mod vere;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{}", suite::USAGE);
        return;
    }
    let cfg = match suite::Config::from_args(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let res = suite::run(&cfg);
    println!("{}", res.table_text());
    println!(
        "each cell: median of {} run(s) (ratio to native; RSS 2nd row: vs the smaller file)",
        cfg.reps
    );
    for n in &res.notes {
        println!("note: {n}");
    }
    if let Err(e) = res.write_outputs() {
        eprintln!("writing results: {e}");
        std::process::exit(1);
    }
    if !res.errors.is_empty() {
        eprintln!("{} case(s) failed:", res.errors.len());
        for e in &res.errors {
            eprintln!("  {}", e.lines().next().unwrap_or(""));
        }
        std::process::exit(1);
    }
}
