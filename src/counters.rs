//! What the daemon counts: plain atomic counters bumped by the fsync path
//! (`replication/pipeline.rs` via `fs`), the FUSE adapter, the disk-full handling and the
//! peer network, and read by `status` (`admin.rs`) and `/metrics` (`metrics.rs`). A leaf:
//! it depends on nothing else of the daemon but the limits and the disk gauges.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::Limits;

/// Upper bounds of the fsync ack latency histogram's buckets, in nanoseconds: 100 µs (a
/// local NVMe fdatasync) to 10 s (the default `ack_timeout_ms`).
pub const FSYNC_BUCKETS_NS: [u64; 16] = [
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// How a durability wait (fsync, fdatasync, fsyncdir, an O_DSYNC write) ended: the
/// `result` label of `seguro_fsync_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncOutcome {
    /// Answered 0: durable here and on K other replicas.
    Ok,
    /// `ack_timeout_ms` passed.
    Timeout,
    /// The local log's fdatasync failed (sticky until restart).
    LogFailed,
    /// This node is not (or stopped being) the writable leader of the term.
    NotLeader,
    /// Raft is shutting down.
    Stopped,
}

impl FsyncOutcome {
    pub const ALL: [FsyncOutcome; 5] = [
        FsyncOutcome::Ok,
        FsyncOutcome::Timeout,
        FsyncOutcome::LogFailed,
        FsyncOutcome::NotLeader,
        FsyncOutcome::Stopped,
    ];

    pub fn label(self) -> &'static str {
        match self {
            FsyncOutcome::Ok => "ok",
            FsyncOutcome::Timeout => "timeout",
            FsyncOutcome::LogFailed => "log_failed",
            FsyncOutcome::NotLeader => "not_leader",
            FsyncOutcome::Stopped => "stopped",
        }
    }
}

/// Latency and outcome of every durability wait.
pub struct FsyncStats {
    /// Successful waits per bucket of [`FSYNC_BUCKETS_NS`] (not cumulative); the last slot
    /// holds those slower than every bound.
    pub(crate) buckets: [AtomicU64; FSYNC_BUCKETS_NS.len() + 1],
    pub(crate) sum_ns: AtomicU64,
    outcomes: [AtomicU64; FsyncOutcome::ALL.len()],
    /// The latest successful waits' latencies, a ring indexed by `recent_next`.
    recent_ns: Box<[AtomicU64]>,
    recent_next: AtomicU64,
}

/// Percentiles of the most recent successful fsyncs, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecentLatency {
    pub samples: u64,
    pub p50_us: u64,
    pub p99_us: u64,
}

impl FsyncStats {
    fn new(recent_max: usize) -> FsyncStats {
        FsyncStats {
            buckets: Default::default(),
            sum_ns: AtomicU64::new(0),
            outcomes: Default::default(),
            recent_ns: (0..recent_max).map(|_| AtomicU64::new(0)).collect(),
            recent_next: AtomicU64::new(0),
        }
    }

    /// Record one wait that ended with `outcome` after `elapsed`. Only successful waits
    /// enter the latency histogram: a timeout's latency is the timeout.
    pub fn record(&self, outcome: FsyncOutcome, elapsed: Duration) {
        let slot = FsyncOutcome::ALL
            .iter()
            .position(|o| *o == outcome)
            .expect("every outcome is in ALL");
        self.outcomes[slot].fetch_add(1, Ordering::Relaxed);
        if outcome != FsyncOutcome::Ok {
            return;
        }
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let bucket = FSYNC_BUCKETS_NS
            .iter()
            .position(|le| ns <= *le)
            .unwrap_or(FSYNC_BUCKETS_NS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
        let i = self.recent_next.fetch_add(1, Ordering::Relaxed);
        self.recent_ns[(i % self.recent_ns.len() as u64) as usize].store(ns, Ordering::Relaxed);
    }

    pub fn count(&self, outcome: FsyncOutcome) -> u64 {
        let slot = FsyncOutcome::ALL
            .iter()
            .position(|o| *o == outcome)
            .expect("every outcome is in ALL");
        self.outcomes[slot].load(Ordering::Relaxed)
    }

    /// Every wait that did not answer 0.
    pub fn failures(&self) -> u64 {
        FsyncOutcome::ALL
            .iter()
            .filter(|o| **o != FsyncOutcome::Ok)
            .map(|o| self.count(*o))
            .sum()
    }

    /// p50 and p99 (nearest rank) over the last `fsync_recent_samples_max` successful
    /// waits; None before the first.
    pub fn recent(&self) -> Option<RecentLatency> {
        let n = self
            .recent_next
            .load(Ordering::Relaxed)
            .min(self.recent_ns.len() as u64) as usize;
        if n == 0 {
            return None;
        }
        let mut v: Vec<u64> = self.recent_ns[..n]
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect();
        v.sort_unstable();
        let rank = |p: u64| v[((n as u64 * p).div_ceil(100) as usize).clamp(1, n) - 1] / 1_000;
        Some(RecentLatency {
            samples: n as u64,
            p50_us: rank(50),
            p99_us: rank(99),
        })
    }
}

/// Traffic with one other member, both directions.
#[derive(Default)]
pub struct PeerCounters {
    pub(crate) sent_entries: AtomicU64,
    pub(crate) sent_entry_bytes: AtomicU64,
    /// Of `sent_entries`, those sent early: while this leader's own fdatasync ran.
    pub(crate) sent_early_entries: AtomicU64,
    /// AppendEntries requests the peer answered (with entries or without, early or not).
    pub(crate) sent_requests: AtomicU64,
    pub(crate) received_entries: AtomicU64,
    pub(crate) received_entry_bytes: AtomicU64,
    pub(crate) snapshots_sent: AtomicU64,
    pub(crate) snapshot_sent_bytes: AtomicU64,
    pub(crate) snapshots_received: AtomicU64,
    pub(crate) snapshot_received_bytes: AtomicU64,
    /// The snapshot transfer under way with this peer, if any (for `status`).
    transfer: Mutex<Option<Transfer>>,
}

/// A snapshot transfer under way with one peer: how far it got and how fast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transfer {
    /// This node sends it (else receives it).
    pub sending: bool,
    pub started: Instant,
    /// When its last chunk travelled.
    pub last: Instant,
    /// Bytes that travelled so far (an incremental snapshot's: the delta's).
    pub bytes: u64,
    /// Bytes of the tree image still to go through on the sender (its length less what
    /// was read); None on the receiver, which learns the size only at the end.
    pub to_go_bytes: Option<u64>,
}

impl Transfer {
    pub fn rate_bytes_per_s(&self) -> u64 {
        let s = self.last.duration_since(self.started).as_secs_f64();
        if s > 0.0 {
            (self.bytes as f64 / s) as u64
        } else {
            0
        }
    }
}

impl PeerCounters {
    /// An AppendEntries the peer answered carried `entries` records of `bytes` in all.
    pub fn sent_entries(&self, entries: u64, bytes: u64) {
        self.sent_entries.fetch_add(entries, Ordering::Relaxed);
        self.sent_entry_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The peer answered one more AppendEntries request.
    pub fn sent_request(&self) {
        self.sent_requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Of the entries counted by `sent_entries`, `entries` went early (`replication/early.rs`).
    pub fn sent_early(&self, entries: u64) {
        self.sent_early_entries
            .fetch_add(entries, Ordering::Relaxed);
    }

    /// An AppendEntries from the peer carried `entries` records of `bytes` in all.
    pub fn received_entries(&self, entries: u64, bytes: u64) {
        self.received_entries.fetch_add(entries, Ordering::Relaxed);
        self.received_entry_bytes
            .fetch_add(bytes, Ordering::Relaxed);
    }

    /// A snapshot chunk of `bytes` the peer accepted; `done` if it was the last.
    pub fn sent_snapshot_chunk(&self, bytes: u64, done: bool) {
        self.snapshot_sent_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.snapshots_sent
            .fetch_add(u64::from(done), Ordering::Relaxed);
    }

    /// `bytes` more of a snapshot transfer travelled (starting one if none is under way);
    /// `to_go_bytes` as [`Transfer`] has it.
    pub fn transfer_progress(&self, sending: bool, bytes: u64, to_go_bytes: Option<u64>) {
        let now = Instant::now();
        let mut t = self.transfer.lock().expect("transfer mutex poisoned");
        // A record the other way round is one a failed transfer left behind.
        if t.is_some_and(|cur| cur.sending != sending) {
            *t = None;
        }
        let cur = t.get_or_insert(Transfer {
            sending,
            started: now,
            last: now,
            bytes: 0,
            to_go_bytes,
        });
        cur.bytes += bytes;
        cur.last = now;
        if to_go_bytes.is_some() || !sending {
            cur.to_go_bytes = to_go_bytes;
        }
    }

    /// The sender knows how much of the image is left to go through.
    pub fn transfer_to_go(&self, to_go_bytes: u64) {
        if let Some(t) = self
            .transfer
            .lock()
            .expect("transfer mutex poisoned")
            .as_mut()
        {
            t.to_go_bytes = Some(to_go_bytes);
        }
    }

    /// The transfer ended (done, given up, or started again from the beginning).
    pub fn transfer_ended(&self) {
        *self.transfer.lock().expect("transfer mutex poisoned") = None;
    }

    pub fn transfer(&self) -> Option<Transfer> {
        *self.transfer.lock().expect("transfer mutex poisoned")
    }

    /// A snapshot chunk of `bytes` from the peer was answered; `done` if it was the last.
    pub fn received_snapshot_chunk(&self, bytes: u64, done: bool) {
        self.snapshot_received_bytes
            .fetch_add(bytes, Ordering::Relaxed);
        self.snapshots_received
            .fetch_add(u64::from(done), Ordering::Relaxed);
    }
}

/// FUSE requests answered with an error, per operation (`fuse.rs` counts them).
#[derive(Default)]
pub struct FuseErrors {
    counts: [AtomicU64; FuseErrors::OPS.len()],
}

impl FuseErrors {
    /// Every operation the adapter answers with an errno (its `Filesystem` method's name).
    pub const OPS: [&'static str; 22] = [
        "lookup",
        "getattr",
        "setattr",
        "readlink",
        "mknod",
        "mkdir",
        "unlink",
        "rmdir",
        "symlink",
        "rename",
        "link",
        "open",
        "read",
        "write",
        "flush",
        "fsync",
        "opendir",
        "readdir",
        "fsyncdir",
        "statfs",
        "create",
        "fallocate",
    ];

    pub fn count(&self, op: &'static str) {
        let slot = Self::OPS.iter().position(|o| *o == op);
        debug_assert!(
            slot.is_some(),
            "FUSE operation {op} missing from FuseErrors::OPS"
        );
        if let Some(slot) = slot {
            self.counts[slot].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn get(&self, op: &str) -> u64 {
        Self::OPS
            .iter()
            .position(|o| *o == op)
            .map_or(0, |slot| self.counts[slot].load(Ordering::Relaxed))
    }
}

/// Everything the daemon counts, shared by the parts that count it.
pub struct Registry {
    pub fsync: FsyncStats,
    pub fuse_errors: Arc<FuseErrors>,
    /// Disk-full state, set by the log store, the state machine and the leader's
    /// free-space check.
    pub disk: Arc<crate::diskfull::DiskGauges>,
    /// Log records a follower wrote as its leader sent them (`replication/received.rs`).
    pub records_as_received: Arc<AtomicU64>,
    /// By node id. Members are known at start; one added later gets its counters on its
    /// first link.
    peers: Mutex<BTreeMap<u64, Arc<PeerCounters>>>,
}

impl Registry {
    pub fn new(limits: &Limits, others: impl IntoIterator<Item = u64>) -> Registry {
        Registry {
            fsync: FsyncStats::new(limits.fsync_recent_samples_max),
            fuse_errors: Arc::default(),
            disk: Arc::default(),
            records_as_received: Arc::default(),
            peers: Mutex::new(others.into_iter().map(|id| (id, Arc::default())).collect()),
        }
    }

    /// The counters of traffic with node `id`.
    pub fn peer(&self, id: u64) -> Arc<PeerCounters> {
        self.peers
            .lock()
            .expect("metrics peers mutex poisoned")
            .entry(id)
            .or_default()
            .clone()
    }

    /// Snapshot transfers under way, by peer, whose last chunk travelled within
    /// `stale_after` (a sender that gave up leaves its receiver's entry behind).
    pub fn transfers(&self, stale_after: Duration) -> Vec<(u64, Transfer)> {
        self.peer_list()
            .into_iter()
            .filter_map(|(id, c)| c.transfer().map(|t| (id, t)))
            .filter(|(_, t)| t.last.elapsed() <= stale_after)
            .collect()
    }

    pub fn peer_list(&self) -> Vec<(u64, Arc<PeerCounters>)> {
        self.peers
            .lock()
            .expect("metrics peers mutex poisoned")
            .iter()
            .map(|(id, c)| (*id, c.clone()))
            .collect()
    }
}
