//! The seguro-fs benchmark: every workload on every target in one run, reported as the
//! median of N repetitions and as a ratio to a plain directory on the same disk.
//!
//! Shared by `benches/seguro_bench.rs` (the full run; `bench/run` drives it and writes
//! `docs/BENCHMARKS.md`) and `tests/bench_smoke.rs` (a tiny run in the test suite, so this
//! code cannot rot). Both crates declare the test-support modules `mount`, `cluster`,
//! `proxy` and `vere` at their root; this file uses them through `crate::`.
//!
//! Targets: `native` (a plain directory), `bindfs` (a FUSE passthrough of a plain
//! directory), `glusterfs-3` (a GlusterFS replica-3 volume, three bricks on this host,
//! mounted with its FUSE client: a general-purpose replicated file system to compare
//! with), `seguro-1` (one standalone daemon) and `seguro-3-k0/k1/k2` (three daemons on
//! 127.0.0.x with `--acks K`, driven through the leader's mount). All of their directories
//! (bricks included) are under the same base (`SEGURO_TEST_TMP`, else the system temp dir),
//! so on one disk.
//!
//! Every loop is bounded by time and by count; every daemon, mount and GlusterFS volume is
//! stopped by a drop guard, also when a case panics (the panic is caught and reported as
//! that cell's error).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use heed::byteorder::LittleEndian;
use heed::types::{Bytes, U64};
use heed::{Database, EnvOpenOptions, IntegerComparator, PutFlags};

use crate::cluster::{vm_hwm_kib, Cluster};
use crate::mount::{force_unmount, is_mounted, run_bounded, signal, Daemon, TestDir};
use crate::vere;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
/// Page size of the 4 KiB-write cases and of the sparse LMDB-like file.
const PAGE: usize = 4096;
/// Write size of the sequential case.
const SEQ_CHUNK: usize = 1 << 20;
/// Data pages per LMDB-like transaction of the sparse-file case (then data fdatasync, meta
/// page, meta fdatasync, as LMDB does with flags 0).
const SPARSE_TXN_PAGES: u64 = 64;
/// Upper bound on iterations of any timed loop, whatever the clock says.
const MAX_ITERS: u64 = 10_000_000;
/// How long a cluster gets to elect a writable leader, and a failover to complete.
const LEADER_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a bindfs mount gets to appear, and to go away after umount.
const BINDFS_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a glusterd we started gets to answer the CLI, and to exit after SIGTERM.
const GLUSTERD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one `gluster` command (volume create, start, stop, delete) may take.
const GLUSTER_CLI_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the GlusterFS client gets to mount a volume and take a first write, and to
/// exit after umount.
const GLUSTER_MOUNT_TIMEOUT: Duration = Duration::from_secs(60);
/// The bricks' host. glusterd refuses `127.0.0.1` and `localhost` as a brick's host, but
/// takes any other loopback address as this machine, so all traffic stays on `lo`.
const GLUSTER_HOST: &str = "127.0.0.2";
/// Where glusterd has each brick process write its log (Debian's build), a file per brick
/// named after its path; `GlusterVolume::stop` removes its bricks' logs.
const GLUSTER_BRICK_LOGS: &str = "/var/log/glusterfs/bricks";
/// Prefix of this benchmark's volume names (then the bench's PID and the case's tag), so
/// volumes left by a run that was killed can be recognised and deleted.
const GLUSTER_VOLUME_PREFIX: &str = "seguro-bench-";

// ---------------------------------------------------------------------------------------------
// Targets, workloads, metrics
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    Native,
    Bindfs,
    /// GlusterFS, replica 3 on this host (declared here so its column comes before
    /// seguro-fs's: the table reads from plain to replicated).
    Gluster,
    Seguro1,
    Seguro3 {
        acks: u64,
    },
}

pub const ALL_TARGETS: [Target; 7] = [
    Target::Native,
    Target::Bindfs,
    Target::Gluster,
    Target::Seguro1,
    Target::Seguro3 { acks: 0 },
    Target::Seguro3 { acks: 1 },
    Target::Seguro3 { acks: 2 },
];

impl Target {
    /// Name on the command line and in the TSV.
    pub fn key(self) -> String {
        match self {
            Target::Native => "native".into(),
            Target::Bindfs => "bindfs".into(),
            Target::Gluster => "glusterfs-3".into(),
            Target::Seguro1 => "seguro-1".into(),
            Target::Seguro3 { acks } => format!("seguro-3-k{acks}"),
        }
    }

    /// Column heading.
    pub fn label(self) -> String {
        match self {
            Target::Native => "native".into(),
            Target::Bindfs => "bindfs".into(),
            Target::Gluster => "GlusterFS replica 3".into(),
            Target::Seguro1 => "seguro-fs 1 node".into(),
            Target::Seguro3 { acks } => format!("3 nodes K={acks}"),
        }
    }

    pub fn parse(s: &str) -> Option<Target> {
        ALL_TARGETS.into_iter().find(|t| t.key() == s)
    }

    fn color(self) -> &'static str {
        match self {
            Target::Native => "#444444",
            Target::Bindfs => "#999999",
            Target::Gluster => "#9467bd",
            Target::Seguro1 => "#1f77b4",
            Target::Seguro3 { acks: 0 } => "#2ca02c",
            Target::Seguro3 { acks: 1 } => "#ff7f0e",
            Target::Seguro3 { .. } => "#d62728",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Workload {
    /// vere-shaped LMDB, one 512-byte event per write transaction.
    Lmdb1,
    /// vere-shaped LMDB, 100 512-byte events per write transaction.
    Lmdb100,
    /// pwrite 4 KiB at increasing offsets + fdatasync, per-iteration latency.
    Pwrite,
    /// One big file in 1 MiB writes, then fdatasync.
    Seq,
    /// kill -9 of the leader until the new leader's mount takes an fsynced write.
    Failover,
    /// Peak RSS of the daemon while a sparse LMDB-like file of two sizes is written.
    Rss,
}

pub const ALL_WORKLOADS: [Workload; 6] = [
    Workload::Lmdb1,
    Workload::Lmdb100,
    Workload::Pwrite,
    Workload::Seq,
    Workload::Failover,
    Workload::Rss,
];

impl Workload {
    pub fn key(self) -> &'static str {
        match self {
            Workload::Lmdb1 => "lmdb1",
            Workload::Lmdb100 => "lmdb100",
            Workload::Pwrite => "pwrite",
            Workload::Seq => "seq",
            Workload::Failover => "failover",
            Workload::Rss => "rss",
        }
    }

    pub fn parse(s: &str) -> Option<Workload> {
        ALL_WORKLOADS.into_iter().find(|w| w.key() == s)
    }

    pub fn metrics(self) -> &'static [Metric] {
        match self {
            Workload::Lmdb1 => &[Metric::Lmdb1Events, Metric::Lmdb1P50, Metric::Lmdb1P99],
            Workload::Lmdb100 => &[
                Metric::Lmdb100Events,
                Metric::Lmdb100P50,
                Metric::Lmdb100P99,
            ],
            Workload::Pwrite => &[Metric::PwriteP50, Metric::PwriteP99],
            Workload::Seq => &[Metric::SeqMbs],
            Workload::Failover => &[Metric::FailoverMs],
            Workload::Rss => &[Metric::RssSmall, Metric::RssLarge],
        }
    }
}

/// One row of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Metric {
    Lmdb1Events,
    Lmdb1P50,
    Lmdb1P99,
    Lmdb100Events,
    Lmdb100P50,
    Lmdb100P99,
    PwriteP50,
    PwriteP99,
    SeqMbs,
    FailoverMs,
    RssSmall,
    RssLarge,
}

impl Metric {
    pub fn key(self) -> &'static str {
        match self {
            Metric::Lmdb1Events => "lmdb1_events_per_s",
            Metric::Lmdb1P50 => "lmdb1_commit_p50_ms",
            Metric::Lmdb1P99 => "lmdb1_commit_p99_ms",
            Metric::Lmdb100Events => "lmdb100_events_per_s",
            Metric::Lmdb100P50 => "lmdb100_commit_p50_ms",
            Metric::Lmdb100P99 => "lmdb100_commit_p99_ms",
            Metric::PwriteP50 => "pwrite4k_fdatasync_p50_ms",
            Metric::PwriteP99 => "pwrite4k_fdatasync_p99_ms",
            Metric::SeqMbs => "seq_write_mb_per_s",
            Metric::FailoverMs => "failover_ms",
            Metric::RssSmall => "rss_small_file_mib",
            Metric::RssLarge => "rss_large_file_mib",
        }
    }

    pub fn label(self, cfg: &Config) -> String {
        let [small, large] = cfg.rss_file_bytes;
        match self {
            Metric::Lmdb1Events => "LMDB, 1 event (512 B)/commit: events/s".into(),
            Metric::Lmdb1P50 => "LMDB, 1 event/commit: commit p50 (ms)".into(),
            Metric::Lmdb1P99 => "LMDB, 1 event/commit: commit p99 (ms)".into(),
            Metric::Lmdb100Events => "LMDB, 100 events (512 B)/commit: events/s".into(),
            Metric::Lmdb100P50 => "LMDB, 100 events/commit: commit p50 (ms)".into(),
            Metric::Lmdb100P99 => "LMDB, 100 events/commit: commit p99 (ms)".into(),
            Metric::PwriteP50 => "4 KiB pwrite + fdatasync: p50 (ms)".into(),
            Metric::PwriteP99 => "4 KiB pwrite + fdatasync: p99 (ms)".into(),
            Metric::SeqMbs => format!(
                "{} sequential, 1 MiB writes + fdatasync (MB/s)",
                fmt_bytes(cfg.seq_bytes)
            ),
            Metric::FailoverMs => "kill -9 leader → new leader writable (ms)".into(),
            Metric::RssSmall => format!(
                "daemon peak RSS, {} sparse LMDB-like file (MiB)",
                fmt_bytes(small)
            ),
            Metric::RssLarge => format!(
                "daemon peak RSS, {} sparse file (MiB; ratio: vs {})",
                fmt_bytes(large),
                fmt_bytes(small)
            ),
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Metric::Lmdb1Events | Metric::Lmdb100Events => "events/s",
            Metric::SeqMbs => "MB/s",
            Metric::RssSmall | Metric::RssLarge => "MiB",
            _ => "ms",
        }
    }

    pub fn higher_is_better(self) -> bool {
        matches!(
            self,
            Metric::Lmdb1Events | Metric::Lmdb100Events | Metric::SeqMbs
        )
    }

    /// Whether the row has a native value to compare with (and so a bar in the chart).
    pub fn vs_native(self) -> bool {
        !matches!(
            self,
            Metric::FailoverMs | Metric::RssSmall | Metric::RssLarge
        )
    }

    /// Whether `t` gets a value in this row.
    pub fn applies_to(self, t: Target) -> bool {
        match self {
            Metric::FailoverMs => t == Target::Seguro3 { acks: 1 },
            // A daemon's memory: bindfs (the reference passthrough) and the standalone daemon.
            Metric::RssSmall | Metric::RssLarge => matches!(t, Target::Bindfs | Target::Seguro1),
            _ => true,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct Config {
    pub targets: Vec<Target>,
    pub workloads: Vec<Workload>,
    /// Length of each timed case (LMDB, pwrite).
    pub case_time: Duration,
    /// Repetitions of every cell; the table shows the median.
    pub reps: usize,
    /// Size of the value of each LMDB event.
    pub event_bytes: usize,
    /// Size of the sequential file.
    pub seq_bytes: u64,
    /// Sizes of the sparse file of the RSS rows.
    pub rss_file_bytes: [u64; 2],
    /// 4 KiB pages written into the sparse file (the same number for both sizes).
    pub rss_pages: u64,
    pub smoke: bool,
    pub out_tsv: Option<PathBuf>,
    pub out_md: Option<PathBuf>,
    pub out_svg: Option<PathBuf>,
}

pub const USAGE: &str = "\
seguro_bench [--targets LIST] [--workloads LIST] [--seconds S] [--reps N] [--smoke]
             [--rss-sizes SMALL,LARGE]
             [--out RESULTS.tsv] [--md TABLE.md] [--svg CHART.svg]
  --targets    comma list of native,bindfs,glusterfs-3,seguro-1,seguro-3-k0,seguro-3-k1,
               seguro-3-k2 (default: all; bindfs and glusterfs-3 are skipped, with a note,
               when they cannot run here)
  --workloads  comma list of lmdb1,lmdb100,pwrite,seq,failover,rss (default: all)
  --seconds    length of each timed case (default 5, env SEGURO_BENCH_SECONDS)
  --reps       repetitions of every cell, median reported (default 3, env SEGURO_BENCH_REPS)
  --rss-sizes  the two sparse file sizes of the RSS rows (default 1G,10G)
  --smoke      tiny sizes, 1 repetition, 0.5 s cases (what tests/bench_smoke.rs runs,
               without glusterfs-3)
  --out/--md/--svg  write the results as TSV, a markdown section and an SVG chart
Directories go under SEGURO_TEST_TMP (default: the system temp dir).";

impl Config {
    /// The full benchmark as `bench/run` runs it.
    pub fn full() -> Config {
        Config {
            targets: ALL_TARGETS.to_vec(),
            workloads: ALL_WORKLOADS.to_vec(),
            case_time: Duration::from_secs(5),
            reps: 3,
            event_bytes: 512,
            seq_bytes: 256 * MIB,
            rss_file_bytes: [GIB, 10 * GIB],
            rss_pages: 16 * 1024,
            smoke: false,
            out_tsv: None,
            out_md: None,
            out_svg: None,
        }
    }

    /// A run of a few seconds per target that only shows that every cell can be produced.
    pub fn smoke() -> Config {
        Config {
            case_time: Duration::from_millis(500),
            reps: 1,
            seq_bytes: 8 * MIB,
            rss_file_bytes: [32 * MIB, 64 * MIB],
            rss_pages: 256,
            smoke: true,
            ..Config::full()
        }
    }

    /// Parse the bench binary's arguments (`cargo bench` appends `--bench`, ignored).
    pub fn from_args(args: &[String]) -> Result<Config, String> {
        let env_num = |k: &str| std::env::var(k).ok().filter(|s| !s.is_empty());
        let smoke = args.iter().any(|a| a == "--smoke");
        let mut cfg = if smoke {
            Config::smoke()
        } else {
            Config::full()
        };
        if let Some(s) = env_num("SEGURO_BENCH_SECONDS") {
            cfg.case_time = parse_seconds(&s)?;
        }
        if let Some(s) = env_num("SEGURO_BENCH_REPS") {
            cfg.reps = parse_reps(&s)?;
        }
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = |name: &str| {
                it.next()
                    .cloned()
                    .ok_or_else(|| format!("{name} needs a value"))
            };
            match a.as_str() {
                "--bench" | "--smoke" => {}
                "--targets" => {
                    cfg.targets = parse_list(&value(a)?, Target::parse, "target")?;
                }
                "--workloads" => {
                    cfg.workloads = parse_list(&value(a)?, Workload::parse, "workload")?;
                }
                "--seconds" => cfg.case_time = parse_seconds(&value(a)?)?,
                "--reps" => cfg.reps = parse_reps(&value(a)?)?,
                "--rss-sizes" => cfg.rss_file_bytes = parse_two_sizes(&value(a)?)?,
                "--out" => cfg.out_tsv = Some(PathBuf::from(value(a)?)),
                "--md" => cfg.out_md = Some(PathBuf::from(value(a)?)),
                "--svg" => cfg.out_svg = Some(PathBuf::from(value(a)?)),
                "-h" | "--help" => return Err(USAGE.to_string()),
                other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
            }
        }
        cfg.targets.sort();
        cfg.targets.dedup();
        cfg.workloads.sort();
        cfg.workloads.dedup();
        Ok(cfg)
    }

    /// Rows of the table, in order.
    pub fn metrics(&self) -> Vec<Metric> {
        self.workloads
            .iter()
            .flat_map(|w| w.metrics().iter().copied())
            .filter(|m| self.targets.iter().any(|t| m.applies_to(*t)))
            .collect()
    }

    /// Every cell that should get a value.
    pub fn expected_cells(&self) -> Vec<(Metric, Target)> {
        let mut v = Vec::new();
        for m in self.metrics() {
            for &t in &self.targets {
                if m.applies_to(t) {
                    v.push((m, t));
                }
            }
        }
        v
    }

    fn has(&self, w: Workload) -> bool {
        self.workloads.contains(&w)
    }
}

fn parse_list<T>(s: &str, f: impl Fn(&str) -> Option<T>, what: &str) -> Result<Vec<T>, String> {
    s.split(',')
        .filter(|x| !x.is_empty())
        .map(|x| f(x.trim()).ok_or_else(|| format!("unknown {what} {x:?}\n{USAGE}")))
        .collect()
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 3600.0 => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!("--seconds: {s:?} is not in (0, 3600]")),
    }
}

/// "1G,10G" (suffixes K, M, G, T; powers of 1024) as two sizes, the first smaller.
fn parse_two_sizes(s: &str) -> Result<[u64; 2], String> {
    let one = |x: &str| -> Option<u64> {
        let x = x.trim();
        let (num, mult) = match x.chars().last()? {
            'K' | 'k' => (&x[..x.len() - 1], KIB),
            'M' | 'm' => (&x[..x.len() - 1], MIB),
            'G' | 'g' => (&x[..x.len() - 1], GIB),
            'T' | 't' => (&x[..x.len() - 1], 1024 * GIB),
            _ => (x, 1),
        };
        num.parse::<u64>().ok()?.checked_mul(mult)
    };
    let v: Vec<Option<u64>> = s.split(',').map(one).collect();
    match v.as_slice() {
        [Some(a), Some(b)] if 16 * KIB <= *a && a < b && *b <= 16 * 1024 * GIB => Ok([*a, *b]),
        _ => Err(format!(
            "--rss-sizes: {s:?} is not two sizes like 1G,10G (small first, 16K..16T)"
        )),
    }
}

fn parse_reps(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(v) if (1..=100).contains(&v) => Ok(v),
        _ => Err(format!("--reps: {s:?} is not in 1..=100")),
    }
}

/// Whether the `bindfs` command is installed.
pub fn bindfs_available() -> bool {
    Command::new("bindfs")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

// ---------------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------------

pub struct Results {
    pub cfg: Config,
    /// Every sample, in run order.
    pub samples: BTreeMap<(Metric, Target), Vec<f64>>,
    /// One line per failed case (its panic message).
    pub errors: Vec<String>,
    /// The first line of each failure's message, by case (target and workload).
    pub failures: BTreeMap<String, Vec<String>>,
    /// Things the reader should know (a skipped target).
    pub notes: Vec<String>,
    pub elapsed: Duration,
}

impl Results {
    pub fn median(&self, m: Metric, t: Target) -> Option<f64> {
        let v = self.samples.get(&(m, t))?;
        if v.is_empty() {
            return None;
        }
        let mut v = v.clone();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        Some(if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        })
    }

    /// The figure this cell is compared with: native for most rows, the small file for the
    /// large-file RSS row.
    fn ratio(&self, m: Metric, t: Target) -> Option<f64> {
        let v = self.median(m, t)?;
        let base = match m {
            Metric::RssLarge => self.median(Metric::RssSmall, t)?,
            _ if m.vs_native() => self.median(m, Target::Native)?,
            _ => return None,
        };
        (base > 0.0).then(|| v / base)
    }

    fn cell(&self, m: Metric, t: Target) -> String {
        if !m.applies_to(t) {
            return "—".into();
        }
        let Some(v) = self.median(m, t) else {
            return "failed".into();
        };
        match self.ratio(m, t) {
            Some(r) => format!("{} ({})", fmt_num(v), fmt_ratio(r)),
            None => fmt_num(v),
        }
    }

    fn columns(&self) -> Vec<Target> {
        self.cfg.targets.clone()
    }

    /// The table as plain text for the terminal.
    pub fn table_text(&self) -> String {
        let cols = self.columns();
        let metrics = self.cfg.metrics();
        let mut rows: Vec<Vec<String>> = Vec::new();
        let mut head = vec!["workload".to_string()];
        head.extend(cols.iter().map(|t| t.label()));
        rows.push(head);
        for m in &metrics {
            let mut r = vec![format!(
                "{} {}",
                m.label(&self.cfg),
                if m.higher_is_better() { "↑" } else { "↓" }
            )];
            r.extend(cols.iter().map(|t| self.cell(*m, *t)));
            rows.push(r);
        }
        let ncol = cols.len() + 1;
        let width: Vec<usize> = (0..ncol)
            .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
            .collect();
        let mut s = String::new();
        for (i, r) in rows.iter().enumerate() {
            for (c, cell) in r.iter().enumerate() {
                let pad = width[c] - cell.chars().count();
                if c == 0 {
                    let _ = write!(s, "{cell}{}", " ".repeat(pad));
                } else {
                    let _ = write!(s, "  {}{cell}", " ".repeat(pad));
                }
            }
            s.push('\n');
            if i == 0 {
                s.push_str(&"-".repeat(width.iter().sum::<usize>() + 2 * (ncol - 1)));
                s.push('\n');
            }
        }
        s
    }

    fn params_line(&self) -> String {
        let c = &self.cfg;
        format!(
            "median of {} run(s) per cell; timed cases {:.1} s each; LMDB events {} B; \
             sequential file {}; sparse files {} and {} with {} pages of 4 KiB written; \
             total time {:.0} s{}",
            c.reps,
            c.case_time.as_secs_f64(),
            c.event_bytes,
            fmt_bytes(c.seq_bytes),
            fmt_bytes(c.rss_file_bytes[0]),
            fmt_bytes(c.rss_file_bytes[1]),
            c.rss_pages,
            self.elapsed.as_secs_f64(),
            if c.smoke { " (smoke mode)" } else { "" }
        )
    }

    /// A markdown section: the table, the parameters and notes.
    pub fn markdown(&self) -> String {
        let cols = self.columns();
        let mut s = String::new();
        let _ = write!(s, "| workload |");
        for t in &cols {
            let _ = write!(s, " {} |", t.label());
        }
        s.push_str("\n| --- |");
        for _ in &cols {
            s.push_str(" ---: |");
        }
        s.push('\n');
        for m in self.cfg.metrics() {
            let _ = write!(
                s,
                "| {} {} |",
                m.label(&self.cfg),
                if m.higher_is_better() { "↑" } else { "↓" }
            );
            for t in &cols {
                let _ = write!(s, " {} |", self.cell(m, *t));
            }
            s.push('\n');
        }
        let _ = writeln!(
            s,
            "\nEach cell: median (ratio to native). ↑ higher is better, ↓ lower is better. \
             — : not measured for that target.\n\n{}.",
            self.params_line()
        );
        if !self.notes.is_empty() || !self.errors.is_empty() {
            s.push('\n');
        }
        for n in &self.notes {
            let _ = writeln!(s, "- Note: {n}");
        }
        for (case, msgs) in &self.failures {
            let _ = writeln!(
                s,
                "- Failed: {case}, in {} of {} run(s); first error: {}",
                msgs.len(),
                self.cfg.reps,
                msgs[0]
            );
        }
        s
    }

    /// Machine-readable results: one line per cell with every sample.
    pub fn tsv(&self) -> String {
        let mut s = String::from("metric\ttarget\tunit\tmedian\tratio\tsamples\n");
        for (m, t) in self.cfg.expected_cells() {
            let med = self
                .median(m, t)
                .map(|v| format!("{v}"))
                .unwrap_or_default();
            let ratio = self.ratio(m, t).map(|v| format!("{v}")).unwrap_or_default();
            let samples = self
                .samples
                .get(&(m, t))
                .map(|v| {
                    v.iter()
                        .map(|x| format!("{x}"))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            let _ = writeln!(
                s,
                "{}\t{}\t{}\t{med}\t{ratio}\t{samples}",
                m.key(),
                t.key(),
                m.unit()
            );
        }
        s
    }

    /// Horizontal bar chart of the ratio to native (log scale, bars grow from 1×) of every
    /// row that has a native value, one bar per non-native target.
    pub fn svg(&self) -> String {
        let targets: Vec<Target> = self
            .columns()
            .into_iter()
            .filter(|t| *t != Target::Native)
            .collect();
        let rows: Vec<Metric> = self
            .cfg
            .metrics()
            .into_iter()
            .filter(|m| m.vs_native())
            .collect();
        let (mut lo, mut hi) = (1.0f64, 1.0f64);
        for m in &rows {
            for t in &targets {
                if let Some(r) = self.ratio(*m, *t) {
                    if r.is_finite() && r > 0.0 {
                        lo = lo.min(r);
                        hi = hi.max(r);
                    }
                }
            }
        }
        let dlo = (lo.log10() - 0.25).floor().min(-1.0);
        let dhi = (hi.log10() + 0.25).ceil().max(1.0);
        let (label_w, plot_w, right) = (330.0, 520.0, 30.0);
        let (top, bar_h, bar_gap, group_gap) = (92.0, 12.0, 2.0, 16.0);
        let group_h = targets.len().max(1) as f64 * (bar_h + bar_gap) + group_gap;
        let height = top + rows.len() as f64 * group_h + 40.0;
        let width = label_w + plot_w + right;
        let x = |r: f64| label_w + (r.log10() - dlo) / (dhi - dlo) * plot_w;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
             <svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" \
             viewBox=\"0 0 {width:.0} {height:.0}\" font-family=\"sans-serif\" font-size=\"11\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>"
        );
        let _ = writeln!(
            s,
            "<text x=\"10\" y=\"20\" font-size=\"15\" font-weight=\"bold\">seguro-fs: ratio to \
             native (plain directory, same disk)</text>\n\
             <text x=\"10\" y=\"38\" fill=\"#555\">{}; log scale, bars grow from 1×: right = \
             larger than native, left = smaller</text>",
            xml(&format!(
                "median of {} run(s), {:.1} s cases{}",
                self.cfg.reps,
                self.cfg.case_time.as_secs_f64(),
                if self.cfg.smoke { ", smoke mode" } else { "" }
            ))
        );
        let mut lx = 10.0;
        for t in &targets {
            let _ = writeln!(
                s,
                "<rect x=\"{lx:.0}\" y=\"50\" width=\"12\" height=\"12\" fill=\"{}\"/>\
                 <text x=\"{:.0}\" y=\"60\">{}</text>",
                t.color(),
                lx + 16.0,
                xml(&t.label())
            );
            lx += 30.0 + 7.0 * t.label().chars().count() as f64;
        }
        // Decade grid lines and axis labels.
        let bottom = top + rows.len() as f64 * group_h;
        let mut d = dlo;
        while d <= dhi + 1e-9 {
            let r = 10f64.powf(d);
            let gx = x(r);
            let (stroke, w) = if d.abs() < 1e-9 {
                ("#000", 1.5)
            } else {
                ("#ccc", 1.0)
            };
            let _ = writeln!(
                s,
                "<line x1=\"{gx:.1}\" y1=\"{:.0}\" x2=\"{gx:.1}\" y2=\"{bottom:.0}\" \
                 stroke=\"{stroke}\" stroke-width=\"{w}\"/>\n\
                 <text x=\"{gx:.1}\" y=\"{:.0}\" text-anchor=\"middle\" fill=\"#555\">{}</text>\n\
                 <text x=\"{gx:.1}\" y=\"{:.0}\" text-anchor=\"middle\" fill=\"#555\">{}</text>",
                top - 12.0,
                top - 2.0,
                axis_label(d),
                bottom + 14.0,
                axis_label(d)
            );
            d += 1.0;
        }
        for (gi, m) in rows.iter().enumerate() {
            let gy = top + gi as f64 * group_h;
            let mid = gy + (group_h - group_gap) / 2.0;
            let _ = writeln!(
                s,
                "<text x=\"{:.0}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n\
                 <text x=\"{:.0}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"#777\" \
                 font-size=\"10\">{}</text>",
                label_w - 8.0,
                mid - 1.0,
                xml(&m.label(&self.cfg)),
                label_w - 8.0,
                mid + 11.0,
                if m.higher_is_better() {
                    "higher is better"
                } else {
                    "lower is better"
                }
            );
            for (ti, t) in targets.iter().enumerate() {
                let by = gy + ti as f64 * (bar_h + bar_gap);
                match self.ratio(*m, *t).filter(|r| r.is_finite() && *r > 0.0) {
                    Some(r) => {
                        let (x0, x1) = (x(1.0), x(r));
                        let _ = writeln!(
                            s,
                            "<rect x=\"{:.1}\" y=\"{by:.1}\" width=\"{:.1}\" height=\"{bar_h}\" \
                             fill=\"{}\"><title>{}: {}</title></rect>",
                            x0.min(x1),
                            (x1 - x0).abs().max(1.0),
                            t.color(),
                            xml(&t.label()),
                            fmt_ratio(r)
                        );
                        let (tx, anchor) = if r >= 1.0 {
                            (x1.max(x0 + 1.0) + 3.0, "start")
                        } else {
                            (x1 - 3.0, "end")
                        };
                        let _ = writeln!(
                            s,
                            "<text x=\"{tx:.1}\" y=\"{:.1}\" text-anchor=\"{anchor}\" \
                             font-size=\"9\" fill=\"#333\">{}</text>",
                            by + bar_h - 2.0,
                            fmt_ratio(r)
                        );
                    }
                    None => {
                        let _ = writeln!(
                            s,
                            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"9\" fill=\"#a00\">{}: failed</text>",
                            x(1.0) + 3.0,
                            by + bar_h - 2.0,
                            xml(&t.label())
                        );
                    }
                }
            }
        }
        s.push_str("</svg>\n");
        s
    }

    /// Write the files named in the configuration.
    pub fn write_outputs(&self) -> std::io::Result<()> {
        let write = |p: &Option<PathBuf>, text: String| -> std::io::Result<()> {
            if let Some(p) = p {
                if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                    fs::create_dir_all(dir)?;
                }
                fs::write(p, text)?;
            }
            Ok(())
        };
        write(&self.cfg.out_tsv, self.tsv())?;
        write(&self.cfg.out_md, self.markdown())?;
        write(&self.cfg.out_svg, self.svg())
    }
}

pub fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

pub fn fmt_ratio(r: f64) -> String {
    if r >= 10.0 {
        format!("{r:.0}×")
    } else if r >= 0.095 {
        format!("{r:.2}×")
    } else {
        format!("{r:.3}×")
    }
}

pub fn fmt_bytes(b: u64) -> String {
    if b >= 1024 * GIB && b % (1024 * GIB) == 0 {
        format!("{} TiB", b / (1024 * GIB))
    } else if b >= GIB && b % GIB == 0 {
        format!("{} GiB", b / GIB)
    } else if b >= MIB && b % MIB == 0 {
        format!("{} MiB", b / MIB)
    } else {
        format!("{b} B")
    }
}

/// "0.01×", "1×", "100×" for the decade `10^d`.
fn axis_label(d: f64) -> String {
    let d = d.round() as i32;
    if d >= 0 {
        format!("{}×", 10u64.pow(d as u32))
    } else {
        format!("0.{}1×", "0".repeat((-d - 1) as usize))
    }
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

// ---------------------------------------------------------------------------------------------
// Running
// ---------------------------------------------------------------------------------------------

/// Run every (workload, target) cell `cfg.reps` times. Repetitions are the outer loop, so
/// slow drift of the machine spreads over all targets instead of favouring one.
pub fn run(cfg: &Config) -> Results {
    let started = Instant::now();
    let mut cfg = cfg.clone();
    let mut notes = Vec::new();
    if cfg.targets.contains(&Target::Bindfs) && !bindfs_available() {
        notes
            .push("bindfs is not installed (apt-get install bindfs): its column is skipped".into());
        cfg.targets.retain(|t| *t != Target::Bindfs);
    }
    // Native and bindfs directories and GlusterFS bricks; the daemons' and clusters'
    // directories are siblings.
    let base = TestDir::new("bench");
    // One glusterd serves every repetition's volumes. Declared after `base`, so it is
    // dropped (and stopped, if this run started it) before `base` is removed.
    let _glusterd = if cfg.targets.contains(&Target::Gluster) {
        match Glusterd::ensure(&base) {
            Ok(g) => Some(g),
            Err(e) => {
                notes.push(format!(
                    "GlusterFS cannot run here ({e}): its column is skipped"
                ));
                cfg.targets.retain(|t| *t != Target::Gluster);
                None
            }
        }
    } else {
        None
    };
    let mut res = Results {
        cfg: cfg.clone(),
        samples: BTreeMap::new(),
        errors: Vec::new(),
        failures: BTreeMap::new(),
        notes,
        elapsed: Duration::ZERO,
    };
    for n in &res.notes {
        eprintln!("note: {n}");
    }
    let main_workloads: Vec<Workload> = cfg
        .workloads
        .iter()
        .copied()
        .filter(|w| *w != Workload::Rss)
        .collect();
    for rep in 0..cfg.reps {
        for &t in &cfg.targets {
            let wanted: Vec<Workload> = main_workloads
                .iter()
                .copied()
                .filter(|w| w.metrics().iter().any(|m| m.applies_to(t)))
                .collect();
            if wanted.is_empty() {
                continue;
            }
            eprintln!(
                "--- rep {}/{}: {} ({})",
                rep + 1,
                cfg.reps,
                t.label(),
                wanted
                    .iter()
                    .map(|w| w.key())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            // One target instance serves the workloads in turn; a failed workload takes
            // its instance down (the guards stop it) and the next one gets a fresh one.
            let mut live: Option<Live> = None;
            for (wi, &w) in wanted.iter().enumerate() {
                let mut got = Vec::new();
                let r = catch(|| {
                    let l = live.get_or_insert_with(|| {
                        Live::start(t, &base, &format!("{}-r{rep}-{wi}", t.key()))
                    });
                    run_workload(&cfg, t, l, w, rep, &mut got);
                });
                let failed = r.is_err();
                let case = format!("{} {}", t.label(), w.key());
                record(&mut res, got, r, &case, rep);
                // After a failover the cluster has lost its leader: nothing else runs on it.
                if failed || w == Workload::Failover {
                    drop(live.take());
                }
            }
            if let Some(l) = live.take() {
                let r = catch(|| l.stop());
                record(&mut res, Vec::new(), r, &format!("{} stop", t.label()), rep);
            }
        }
        if cfg.has(Workload::Rss) {
            for &t in &cfg.targets {
                if !Metric::RssSmall.applies_to(t) {
                    continue;
                }
                for (i, m) in [Metric::RssSmall, Metric::RssLarge].into_iter().enumerate() {
                    let size = cfg.rss_file_bytes[i];
                    eprintln!(
                        "--- rep {}/{}: {} peak RSS, {} sparse file",
                        rep + 1,
                        cfg.reps,
                        t.label(),
                        fmt_bytes(size)
                    );
                    let tag = format!("{}-rss{i}-r{rep}", t.key());
                    let mut got = Vec::new();
                    let r = catch(|| {
                        let v = rss_case(t, &base, &tag, size, cfg.rss_pages);
                        got.push((m, t, v));
                    });
                    record(
                        &mut res,
                        got,
                        r,
                        &format!("{} RSS {}", t.label(), fmt_bytes(size)),
                        rep,
                    );
                }
            }
        }
    }
    res.elapsed = started.elapsed();
    res
}

fn record(
    res: &mut Results,
    got: Vec<(Metric, Target, f64)>,
    r: Result<(), String>,
    case: &str,
    rep: usize,
) {
    for (m, t, v) in got {
        res.samples.entry((m, t)).or_default().push(v);
    }
    if let Err(e) = r {
        eprintln!("!!! {case} rep {} failed: {e}", rep + 1);
        res.errors.push(format!("{case} rep {}: {e}", rep + 1));
        let first = e.lines().next().unwrap_or("").to_string();
        res.failures
            .entry(case.to_string())
            .or_default()
            .push(first);
    }
}

/// Run `f`, turning a panic into an error message. Drop guards (daemons, mounts, clusters)
/// run during the unwind, so nothing is left behind.
fn catch(f: impl FnOnce()) -> Result<(), String> {
    panic::catch_unwind(AssertUnwindSafe(f)).map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into())
    })
}

/// A started target: where to write, and the guard that stops it.
enum Live {
    Dir(PathBuf),
    /// The mount and its source directory.
    Bindfs(Bindfs, PathBuf),
    Gluster(GlusterVolume),
    Single(Daemon),
    Cluster {
        c: Cluster,
        leader: usize,
    },
}

impl Live {
    fn start(t: Target, base: &TestDir, tag: &str) -> Live {
        match t {
            Target::Native => {
                let d = base.join(&format!("{tag}-native"));
                fs::create_dir_all(&d).unwrap();
                Live::Dir(d)
            }
            Target::Bindfs => {
                let src = base.join(&format!("{tag}-src"));
                Live::Bindfs(Bindfs::start(&src, &base.join(&format!("{tag}-mnt"))), src)
            }
            Target::Gluster => Live::Gluster(GlusterVolume::start(base, tag)),
            Target::Seguro1 => Live::Single(Daemon::start(
                &base.join(&format!("{tag}-data")),
                &base.join(&format!("{tag}-mnt")),
                &[],
            )),
            Target::Seguro3 { acks } => {
                let c = Cluster::start_direct(3, Some(acks), &[]);
                let leader = c.wait_leader(LEADER_TIMEOUT);
                Live::Cluster { c, leader }
            }
        }
    }

    fn root(&self) -> PathBuf {
        match self {
            Live::Dir(d) => d.clone(),
            Live::Bindfs(b, _) => b.mnt.clone(),
            Live::Gluster(v) => v.mnt.clone(),
            Live::Single(d) => d.mountpoint.clone(),
            Live::Cluster { c, leader } => c.mountpoint(*leader),
        }
    }

    /// Clean stop (the daemon must exit 0; a GlusterFS volume is unmounted, stopped and
    /// deleted) and removal of the target's directories; a cluster is killed by its guard,
    /// which removes its directory.
    fn stop(self) {
        match self {
            Live::Dir(d) => {
                let _ = fs::remove_dir_all(d);
            }
            Live::Bindfs(b, src) => {
                b.stop();
                let _ = fs::remove_dir_all(src);
            }
            Live::Gluster(v) => v.stop(),
            Live::Single(d) => {
                let data = d.data_dir.clone();
                d.stop();
                let _ = fs::remove_dir_all(data);
            }
            Live::Cluster { c, .. } => drop(c),
        }
    }
}

/// Run one workload on a started target, pushing its figures to `got`.
fn run_workload(
    cfg: &Config,
    t: Target,
    live: &mut Live,
    w: Workload,
    rep: usize,
    got: &mut Vec<(Metric, Target, f64)>,
) {
    let dir = live.root().join(format!("{}-{rep}", w.key()));
    match w {
        Workload::Lmdb1 | Workload::Lmdb100 => {
            let per = if w == Workload::Lmdb1 { 1 } else { 100 };
            let ms = w.metrics();
            let r = lmdb_case(&dir, per, cfg.event_bytes, cfg.case_time);
            got.push((ms[0], t, r.events_per_s));
            got.push((ms[1], t, r.p50_ms));
            got.push((ms[2], t, r.p99_ms));
        }
        Workload::Pwrite => {
            let (p50, p99) = pwrite_case(&dir, cfg.case_time);
            got.push((Metric::PwriteP50, t, p50));
            got.push((Metric::PwriteP99, t, p99));
        }
        Workload::Seq => {
            got.push((Metric::SeqMbs, t, seq_case(&dir, cfg.seq_bytes)));
        }
        Workload::Failover => {
            if let Live::Cluster { c, leader } = live {
                let ms = failover_case(c, *leader, rep);
                got.push((Metric::FailoverMs, t, ms));
            }
            return;
        }
        Workload::Rss => return,
    }
    // Keep the disk from filling over repetitions (on a mount this is replicated too).
    fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("remove {}: {e}", dir.display()));
}

// ---------------------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------------------

pub struct LmdbRates {
    pub events_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3
}

/// Deterministic value of event `n`: a 4-byte mug, then mixed bytes (vere's layout).
fn event_value(n: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 8);
    let mut i = 0u64;
    while v.len() < len {
        v.extend_from_slice(
            &vere::mix64(n.wrapping_mul(0x1_0000_0001).wrapping_add(i)).to_le_bytes(),
        );
        i += 1;
    }
    v.truncate(len);
    v
}

type EventsDb = Database<U64<LittleEndian>, Bytes, IntegerComparator>;

/// vere-shaped LMDB commits: a pier (top-level env and epoch `0i0`, as vere makes it), then
/// write transactions of `per_commit` events of `event_bytes` each into the epoch's EVENTS
/// (integer keys, NO_OVERWRITE, flags 0, 1 TiB map) for `dur`.
pub fn lmdb_case(log: &Path, per_commit: u64, event_bytes: usize, dur: Duration) -> LmdbRates {
    vere::create_pier(log).unwrap_or_else(|e| panic!("create pier {}: {e}", log.display()));
    let dir = log.join("0i0");
    // SAFETY: one Env per path in this process (a fresh directory), closed below before the
    // directory is removed; never NO_LOCK.
    let env = unsafe {
        EnvOpenOptions::new()
            .map_size(vere::MAP_SIZE)
            .max_dbs(2)
            .open(&dir)
    }
    .unwrap_or_else(|e| panic!("open env {}: {e}", dir.display()));
    let rtxn = env.read_txn().unwrap();
    let db: EventsDb = env
        .database_options()
        .types::<U64<LittleEndian>, Bytes>()
        .key_comparator::<IntegerComparator>()
        .name("EVENTS")
        .open(&rtxn)
        .unwrap()
        .expect("EVENTS created by create_pier");
    rtxn.commit().unwrap();
    let values: Vec<Vec<u8>> = (0..per_commit.max(1) * 4)
        .map(|i| event_value(i, event_bytes))
        .collect();
    let mut lat = Vec::new();
    let mut next = 1u64;
    let start = Instant::now();
    while lat.is_empty() || (start.elapsed() < dur && (lat.len() as u64) < MAX_ITERS) {
        let t = Instant::now();
        let mut wtxn = env.write_txn().unwrap();
        for n in next..next + per_commit {
            let v = &values[(n % values.len() as u64) as usize];
            db.put_with_flags(&mut wtxn, PutFlags::NO_OVERWRITE, &n, v)
                .unwrap_or_else(|e| panic!("put event {n}: {e}"));
        }
        wtxn.commit()
            .unwrap_or_else(|e| panic!("commit at event {next}: {e}"));
        lat.push(t.elapsed());
        next += per_commit;
    }
    let secs = start.elapsed().as_secs_f64();
    let closing = env.prepare_for_closing();
    assert!(
        closing.wait_timeout(Duration::from_secs(30)),
        "LMDB env still open 30 s after close"
    );
    lat.sort();
    LmdbRates {
        events_per_s: (next - 1) as f64 / secs,
        p50_ms: percentile_ms(&lat, 0.5),
        p99_ms: percentile_ms(&lat, 0.99),
    }
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    event_value(seed, len)
}

/// 4 KiB pwrite at increasing offsets, each followed by fdatasync, for `dur`: (p50, p99) ms
/// of one pwrite + fdatasync.
pub fn pwrite_case(dir: &Path, dur: Duration) -> (f64, f64) {
    fs::create_dir_all(dir).unwrap();
    let f = open_rw(&dir.join("pwrite.bin"));
    let page = pattern(PAGE, 7);
    let mut lat = Vec::new();
    let start = Instant::now();
    let mut off = 0u64;
    while lat.is_empty() || (start.elapsed() < dur && (lat.len() as u64) < MAX_ITERS) {
        let t = Instant::now();
        f.write_all_at(&page, off)
            .unwrap_or_else(|e| panic!("pwrite at {off}: {e}"));
        vere::fdatasync(&f).unwrap_or_else(|e| panic!("fdatasync after {off}: {e}"));
        lat.push(t.elapsed());
        off += PAGE as u64;
    }
    lat.sort();
    (percentile_ms(&lat, 0.5), percentile_ms(&lat, 0.99))
}

/// `bytes` written in 1 MiB writes to a new file, then fdatasync: MB/s (10^6 bytes) over
/// the whole, fdatasync included.
pub fn seq_case(dir: &Path, bytes: u64) -> f64 {
    fs::create_dir_all(dir).unwrap();
    let path = dir.join("seq.bin");
    let mut f = File::create(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let buf = pattern(SEQ_CHUNK, 11);
    let n = bytes.div_ceil(SEQ_CHUNK as u64);
    let start = Instant::now();
    for i in 0..n {
        f.write_all(&buf)
            .unwrap_or_else(|e| panic!("write MiB {i}: {e}"));
    }
    vere::fdatasync(&f).unwrap_or_else(|e| panic!("fdatasync: {e}"));
    let secs = start.elapsed().as_secs_f64();
    (n * SEQ_CHUNK as u64) as f64 / 1e6 / secs
}

/// kill -9 of the leader, until a write on the new leader's mount is acknowledged by
/// fsync: milliseconds.
pub fn failover_case(c: &mut Cluster, leader: usize, rep: usize) -> f64 {
    let t0 = Instant::now();
    c.kill9(leader);
    let new = c.wait_leader_except(&[leader], LEADER_TIMEOUT);
    let path = c.mountpoint(new).join(format!("failover-{rep}"));
    let deadline = t0 + LEADER_TIMEOUT;
    loop {
        let r = File::create(&path).and_then(|mut f| {
            f.write_all(b"new leader")?;
            vere::fdatasync(&f)
        });
        match r {
            Ok(()) => break,
            Err(e) if Instant::now() > deadline => c.fail(&format!(
                "new leader {new}: no fsynced write within {LEADER_TIMEOUT:?}: {e}"
            )),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    t0.elapsed().as_secs_f64() * 1e3
}

fn open_rw(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Write `pages` 4 KiB pages into a sparse file of `file_bytes`, the way LMDB (flags 0)
/// commits: a transaction's data pages (here at pseudo-random places all over the file; the
/// first one is the file's last page, so the file has its full size from the start), then
/// fdatasync, then one of the two meta pages (page 0 or 1), then fdatasync.
pub fn sparse_lmdb_like_write(path: &Path, file_bytes: u64, pages: u64) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let f = open_rw(path);
    let file_pages = file_bytes / PAGE as u64;
    assert!(file_pages > 2, "sparse file too small");
    let data = pattern(PAGE, 13);
    let meta = pattern(PAGE, 17);
    let mut written = 0u64;
    let mut txn = 0u64;
    while written < pages {
        let n = SPARSE_TXN_PAGES.min(pages - written);
        for j in 0..n {
            let k = written + j;
            let pg = if k == 0 {
                file_pages - 1
            } else {
                2 + vere::mix64(k) % (file_pages - 2)
            };
            f.write_all_at(&data, pg * PAGE as u64)
                .unwrap_or_else(|e| panic!("pwrite page {pg}: {e}"));
        }
        vere::fdatasync(&f).unwrap_or_else(|e| panic!("fdatasync (data): {e}"));
        f.write_all_at(&meta, (txn % 2) * PAGE as u64)
            .unwrap_or_else(|e| panic!("pwrite meta: {e}"));
        vere::fdatasync(&f).unwrap_or_else(|e| panic!("fdatasync (meta): {e}"));
        written += n;
        txn += 1;
    }
    let len = f.metadata().unwrap().len();
    assert_eq!(len, file_bytes, "sparse file size");
}

/// Peak RSS (VmHWM, MiB) of a fresh daemon of target `t` that served the sparse write.
pub fn rss_case(t: Target, base: &TestDir, tag: &str, file_bytes: u64, pages: u64) -> f64 {
    let data = base.join(&format!("{tag}-data"));
    let mnt = base.join(&format!("{tag}-mnt"));
    let file = mnt.join("0i0").join("data.mdb");
    let kib = match t {
        Target::Bindfs => {
            let b = Bindfs::start(&data, &mnt);
            sparse_lmdb_like_write(&file, file_bytes, pages);
            let kib = vm_hwm_kib(b.pid()).expect("bindfs VmHWM");
            b.stop();
            kib
        }
        Target::Seguro1 => {
            let d = Daemon::start(&data, &mnt, &[]);
            sparse_lmdb_like_write(&file, file_bytes, pages);
            let kib = vm_hwm_kib(d.pid()).expect("seguro-fs VmHWM");
            d.stop();
            kib
        }
        other => panic!("no RSS case for {}", other.label()),
    };
    let _ = fs::remove_dir_all(&data);
    kib as f64 / 1024.0
}

// ---------------------------------------------------------------------------------------------
// bindfs
// ---------------------------------------------------------------------------------------------

/// `bindfs -f -o big_writes SRC MNT` as a child (so its PID is known), stopped by umount; the guard kills
/// it and detaches the mount if the run panics.
pub struct Bindfs {
    child: Option<Child>,
    pub mnt: PathBuf,
}

impl Bindfs {
    pub fn start(src: &Path, mnt: &Path) -> Bindfs {
        fs::create_dir_all(src).unwrap();
        fs::create_dir_all(mnt).unwrap();
        let log = src.with_extension("bindfs.log");
        // big_writes: without it libfuse 2 (Debian's bindfs) splits every write into 4 KiB
        // requests, which would make this baseline a strawman (about 10x slower
        // sequentially); with it, writes go in 128 KiB requests, libfuse 2's maximum.
        let child = Command::new("bindfs")
            .args(["-f", "-o", "big_writes"])
            .arg(src)
            .arg(mnt)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn bindfs: {e}"));
        let mut b = Bindfs {
            child: Some(child),
            mnt: mnt.to_path_buf(),
        };
        let deadline = Instant::now() + BINDFS_TIMEOUT;
        while !is_mounted(mnt) {
            let log_text = || fs::read_to_string(&log).unwrap_or_default();
            if let Some(st) = b.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("bindfs exited with {st} before mounting: {}", log_text());
            }
            if Instant::now() > deadline {
                panic!(
                    "bindfs did not mount within {BINDFS_TIMEOUT:?}: {}",
                    log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        b
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// umount, then wait (bounded) for bindfs to exit.
    pub fn stop(mut self) {
        let mut child = self.child.take().expect("running");
        let st = Command::new("umount").arg(&self.mnt).status();
        let deadline = Instant::now() + BINDFS_TIMEOUT;
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if Instant::now() > deadline {
                signal(child.id(), libc::SIGKILL);
                let _ = child.wait();
                force_unmount(&self.mnt);
                panic!("bindfs did not exit within {BINDFS_TIMEOUT:?} of umount ({st:?})");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            !is_mounted(&self.mnt),
            "bindfs mount still there after umount"
        );
    }
}

impl Drop for Bindfs {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), libc::SIGKILL);
            let _ = child.wait();
            force_unmount(&self.mnt);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// GlusterFS
// ---------------------------------------------------------------------------------------------

/// `gluster --mode=script ARGS` (script mode: no confirmation prompts), bounded by
/// `GLUSTER_CLI_TIMEOUT`: its standard output, or everything it said as the error.
fn gluster(args: &[&str]) -> Result<String, String> {
    let out = run_bounded(
        Command::new("gluster").arg("--mode=script").args(args),
        GLUSTER_CLI_TIMEOUT,
    )?;
    let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_string();
    if out.status.success() {
        Ok(text(&out.stdout))
    } else {
        Err(format!(
            "gluster {} failed ({}): {} {}",
            args.join(" "),
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        ))
    }
}

/// A GlusterFS log's first error lines (usually the cause; else its last lines), on one
/// line, for an error message or a note in the table.
fn log_errors(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let errors: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_once("] E ").map(|(_, e)| e.trim()))
        .take(3)
        .collect();
    if !errors.is_empty() {
        return errors.join(" | ");
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(3)..].join(" | ")
}

/// glusterd, GlusterFS's management daemon (it creates, starts and stops the bricks). One
/// that already runs (a system service) is used and left running; otherwise `ensure`
/// starts one in the foreground (`-N`: a child, so its PID is known; a container has no
/// systemd to start it) and the guard stops it by that PID.
pub struct Glusterd {
    child: Option<Child>,
}

impl Glusterd {
    /// A glusterd that answers the CLI, or why there is none: not installed, or it did not
    /// start.
    pub fn ensure(base: &TestDir) -> Result<Glusterd, String> {
        for tool in ["glusterd", "gluster", "glusterfs"] {
            let runs = run_bounded(Command::new(tool).arg("--version"), GLUSTER_CLI_TIMEOUT)
                .is_ok_and(|o| o.status.success());
            if !runs {
                return Err(format!(
                    "{tool} is not installed: apt-get install glusterfs-server glusterfs-client"
                ));
            }
        }
        let mut g = Glusterd { child: None };
        if gluster(&["volume", "list"]).is_err() {
            let log = base.join("glusterd.log");
            let child = Command::new("glusterd")
                .arg("-N")
                .arg("-l")
                .arg(&log)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("spawn glusterd: {e}"))?;
            let child = g.child.insert(child);
            let deadline = Instant::now() + GLUSTERD_TIMEOUT;
            while let Err(e) = gluster(&["volume", "list"]) {
                if let Some(st) = child.try_wait().map_err(|e| format!("glusterd: {e}"))? {
                    g.child = None;
                    return Err(format!("glusterd exited with {st}: {}", log_errors(&log)));
                }
                if Instant::now() > deadline {
                    // The guard kills it.
                    return Err(format!(
                        "glusterd did not answer within {GLUSTERD_TIMEOUT:?} ({e}): {}",
                        log_errors(&log)
                    ));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        delete_leftover_volumes();
        Ok(g)
    }
}

impl Drop for Glusterd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), libc::SIGTERM);
            let deadline = Instant::now() + GLUSTERD_TIMEOUT;
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    eprintln!(
                        "glusterd did not exit within {GLUSTERD_TIMEOUT:?} of SIGTERM: killed"
                    );
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Stop and delete the volumes of earlier benchmark runs that were killed before their
/// guards ran (the PID in the volume's name is gone), so they do not pile up in glusterd's
/// state (/var/lib/glusterd), which outlives the run.
fn delete_leftover_volumes() {
    let Ok(list) = gluster(&["volume", "list"]) else {
        return;
    };
    for name in list.lines().map(str::trim) {
        let Some(pid) = name
            .strip_prefix(GLUSTER_VOLUME_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("note: deleting GlusterFS volume {name}, left by an interrupted benchmark");
            let _ = gluster(&["volume", "stop", name, "force"]);
            let _ = gluster(&["volume", "delete", name]);
        }
    }
}

/// A GlusterFS replica-3 volume of three bricks under the bench's base directory, started,
/// and mounted by the GlusterFS FUSE client as a child (`glusterfs -N`, so its PID is
/// known). `stop` unmounts, stops and deletes it and removes the bricks; the guard does the
/// same, forcibly, when a case panics.
pub struct GlusterVolume {
    name: String,
    bricks: Vec<PathBuf>,
    client: Option<Child>,
    pub mnt: PathBuf,
    /// Whether glusterd may know the volume (so the guard must stop and delete it).
    in_glusterd: bool,
}

impl GlusterVolume {
    pub fn start(base: &TestDir, tag: &str) -> GlusterVolume {
        let bricks: Vec<PathBuf> = (1..=3)
            .map(|i| base.join(&format!("{tag}-brick{i}")))
            .collect();
        let mnt = base.join(&format!("{tag}-mnt"));
        for d in bricks.iter().chain([&mnt]) {
            fs::create_dir_all(d).unwrap();
        }
        let mut v = GlusterVolume {
            name: format!("{GLUSTER_VOLUME_PREFIX}{}-{tag}", std::process::id()),
            bricks,
            client: None,
            mnt,
            // Set before the command: a create that times out may still have happened.
            in_glusterd: true,
        };
        let brick_args: Vec<String> = v
            .bricks
            .iter()
            .map(|b| format!("{GLUSTER_HOST}:{}", b.display()))
            .collect();
        let mut create = vec![
            "volume",
            "create",
            &v.name,
            "replica",
            "3",
            "transport",
            "tcp",
        ];
        create.extend(brick_args.iter().map(String::as_str));
        // force: without it glusterd refuses bricks on the root partition, and the bricks
        // of one replica set on one host.
        create.push("force");
        gluster(&create).unwrap_or_else(|e| panic!("{e}"));
        gluster(&["volume", "start", &v.name]).unwrap_or_else(|e| panic!("{e}"));
        v.mount();
        v
    }

    /// Start the FUSE client and wait (bounded) until a file on the mount can be created
    /// and fdatasynced: the client mounts before it has reached the bricks, and a replica-3
    /// volume takes writes only once a quorum of them is connected.
    fn mount(&mut self) {
        let log = self.mnt.with_extension("glusterfs.log");
        let child = Command::new("glusterfs")
            .args(["-N", "--process-name", "fuse"])
            .arg(format!("--volfile-server={GLUSTER_HOST}"))
            .arg(format!("--volfile-id=/{}", self.name))
            .arg("-l")
            .arg(&log)
            .arg(&self.mnt)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn glusterfs: {e}"));
        let child = self.client.insert(child);
        let probe = self.mnt.join(".seguro-bench-probe");
        let writable = || {
            File::create(&probe).and_then(|mut f| {
                f.write_all(b"probe")?;
                vere::fdatasync(&f)
            })
        };
        let deadline = Instant::now() + GLUSTER_MOUNT_TIMEOUT;
        // is_mounted first: the probe must not land in the empty directory under the mount.
        while !(is_mounted(&self.mnt) && writable().is_ok()) {
            if let Some(st) = child.try_wait().unwrap() {
                self.client = None;
                panic!(
                    "glusterfs exited with {st} before mounting: {}",
                    log_errors(&log)
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "GlusterFS volume {} not writable within {GLUSTER_MOUNT_TIMEOUT:?}: {}",
                    self.name,
                    log_errors(&log)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        fs::remove_file(&probe).unwrap_or_else(|e| panic!("remove {}: {e}", probe.display()));
    }

    /// umount, then wait (bounded) for the client to exit; stop and delete the volume and
    /// remove its bricks and their logs. A failure panics, and the guard cleans up (leaving
    /// the brick logs, to see why).
    pub fn stop(mut self) {
        let mut client = self.client.take().expect("mounted");
        let st = Command::new("umount").arg(&self.mnt).status();
        let deadline = Instant::now() + GLUSTER_MOUNT_TIMEOUT;
        while client.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = client.kill();
                let _ = client.wait();
                panic!(
                    "glusterfs did not exit within {GLUSTER_MOUNT_TIMEOUT:?} of umount ({st:?})"
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            !is_mounted(&self.mnt),
            "GlusterFS mount still there after umount"
        );
        gluster(&["volume", "stop", &self.name]).unwrap_or_else(|e| panic!("{e}"));
        gluster(&["volume", "delete", &self.name]).unwrap_or_else(|e| panic!("{e}"));
        self.in_glusterd = false;
        for b in &self.bricks {
            fs::remove_dir_all(b).unwrap_or_else(|e| panic!("remove brick {}: {e}", b.display()));
            // "/var/tmp/x-brick1" logs to "var-tmp-x-brick1.log".
            let log = b
                .to_string_lossy()
                .trim_start_matches('/')
                .replace('/', "-");
            let _ = fs::remove_file(Path::new(GLUSTER_BRICK_LOGS).join(format!("{log}.log")));
        }
    }
}

impl Drop for GlusterVolume {
    fn drop(&mut self) {
        if let Some(mut child) = self.client.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Harmless when it is not mounted (after `stop`); detaches a dead mount otherwise.
        force_unmount(&self.mnt);
        if self.in_glusterd {
            let _ = gluster(&["volume", "stop", &self.name, "force"]);
            if let Err(e) = gluster(&["volume", "delete", &self.name]) {
                eprintln!("warning: GlusterFS volume {} not deleted: {e}", self.name);
            }
        }
        for b in &self.bricks {
            let _ = fs::remove_dir_all(b);
        }
    }
}
