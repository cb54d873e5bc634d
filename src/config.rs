//! The validated configuration: every limit and timeout of the daemon is declared here
//! once, as a row of the `limits!` table (type, default, range, whether it can be set, and
//! its doc, which is also its `--help`), so there is one place to read and tune them.

use std::path::PathBuf;

/// How a limit's smallest allowed value is given.
#[derive(Clone, Copy)]
pub enum Min {
    Const(u64),
    /// Depends on other limits (docs/CONFIGURATION.md says how, in words).
    Of(fn(&Limits) -> u64),
}

/// One row of the limits table: everything the flags, the config file, `-o`, validation
/// and docs/CONFIGURATION.md know about a limit.
pub struct LimitSpec {
    pub name: &'static str,
    /// Whether flags, `-o` and the config file may set it (the others are fixed here).
    pub settable: bool,
    pub default: u64,
    pub min: Min,
    pub max: u64,
    /// Its doc comment, which is also its `--help` text.
    pub doc: &'static str,
    get: fn(&Limits) -> u64,
    set: fn(&mut Limits, u64),
}

impl LimitSpec {
    /// The smallest allowed value, given the other limits.
    pub fn min(&self, l: &Limits) -> u64 {
        match self.min {
            Min::Const(m) => m,
            Min::Of(f) => f(l),
        }
    }
}

/// Declares every limit once, as a table row:
/// `/// doc` `name: type = default, settable|fixed, min M|min (fn, "text"), max N;`
/// and generates [`Limits`], its `Default`, and [`LIMITS`], from which validation, the
/// `mount` flags (`cli.rs`), the shared keys (`settings.rs`) and the docs check are made.
macro_rules! limits {
    ($(
        $(#[doc = $doc:literal])*
        $name:ident: $ty:ty = $default:expr, $settable:ident,
            min $min:expr, max $max:expr;
    )*) => {
        /// Numeric limits. Names carry their unit last (`_bytes_max`, `_ms`).
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub struct Limits {
            $( $(#[doc = $doc])* pub $name: $ty, )*
        }

        impl Default for Limits {
            fn default() -> Self {
                Limits { $( $name: $default, )* }
            }
        }

        /// Every limit, in declaration order.
        pub const LIMITS: &[LimitSpec] = &[ $(
            LimitSpec {
                name: stringify!($name),
                settable: limits!(@settable $settable),
                default: $default as u64,
                min: $min,
                max: $max,
                doc: concat!($($doc, "\n"),*),
                get: |l| l.$name as u64,
                // Only after a range check against `max`, which every row keeps within
                // its type (`limits::tests::maxima_fit_their_types`).
                set: |l, v| l.$name = v as $ty,
            },
        )* ];
    };
    (@settable settable) => { true };
    (@settable fixed) => { false };
}

limits! {
    /// Cap on one Raft entry's encoded ops (group-commit batch). Larger writes are split.
    /// The default leaves room for a whole `fuse_write_bytes_max` WRITE and its op header:
    /// at exactly 1 MiB every 1 MiB write became a full entry plus a ~100-byte one, which
    /// doubled the log flushes and replication round trips of sequential writes.
    entry_bytes_max: usize = (1 << 20) + (64 << 10), settable,
        min Min::Const(64 << 10), max 16 << 20;
    /// Bytes written but not yet applied to the tree (the overlay). WRITE blocks above it:
    /// this is the backpressure that bounds memory while a multi-GB file streams through.
    inflight_bytes_max: usize = 64 << 20, settable,
        min Min::Of(|l| l.entry_bytes_max as u64 * 2), max 16 << 30;
    /// Batches proposed to Raft but not yet flushed to the log.
    proposals_inflight_max: usize = 8, settable, min Min::Const(1), max 1024;
    /// How long a small open batch waits, while the log is idle, for the FSYNC that
    /// usually follows its WRITEs before it is proposed anyway. vere writes its pages then
    /// syncs at once: proposing the first WRITE alone made the FSYNC wait for two log
    /// flushes (and replication rounds) in a row. 0 proposes at once.
    batch_linger_us: u64 = 2_000, settable, min Min::Const(0), max 1_000_000;
    /// While batches keep being proposed, the proposer looks at the open batch on a timer
    /// of this period instead of being woken by each batch that opens (one runtime
    /// thread's wake-up per vere sync point); a WRITE no FSYNC follows then reaches the log
    /// within this plus `batch_linger_us` once the flushes in flight have landed. A period
    /// with nothing proposed ends the watch.
    batch_watch_us: u64 = 10_000, fixed, min Min::Const(1), max 1_000_000;
    /// A leader sends each entry to its followers while its own log fdatasync of it runs
    /// (`replication/early.rs`): at most this many record bytes are queued for one
    /// follower while an AppendEntries to it is under way. 0 sends entries only after the
    /// leader's flush, through openraft's replication streams.
    early_append_bytes_max: u64 = 8 << 20, settable, min Min::Const(0), max 16 << 20;
    /// One early AppendEntries carries at most this many record bytes (a larger record
    /// goes alone): its answer must come back well within openraft's wait for it (half of
    /// a heartbeat), or openraft's stream takes the follower over.
    early_request_bytes_max: u64 = 2 << 20, settable, min Min::Const(64 << 10), max 16 << 20;
    /// An append whose records do not fit a follower's early queue waits up to this long
    /// for the follower's sender to make room (the leader's log then goes at the
    /// follower's pace) before that follower is left to openraft's stream, which under
    /// sustained writes it does not leave again until they stop.
    early_append_wait_ms: u64 = 100, settable, min Min::Const(0), max 1_000;
    /// A follower that early replication could not reach is left out of it this long
    /// (openraft's stream carries it meanwhile).
    early_append_pause_ms: u64 = 1_000, fixed, min Min::Const(10), max 600_000;
    /// openraft's AppendEntries that would carry only a new commit index to a follower
    /// waits this long for the follower's next early send to carry it instead (one
    /// message per sync point instead of two); then, or with no early chain, it travels.
    early_commit_wait_us: u64 = 5_000, fixed, min Min::Const(0), max 1_000_000;
    /// Ops this leader proposed alone (namespace ops, attribute changes) and answered EIO
    /// because they were not applied within `ack_timeout_ms`, remembered so that if one
    /// applies after all, the kernel's cached names and attributes for it are dropped as
    /// for another node's op (the kernel kept them: the op failed as far as it knows). The
    /// oldest is forgotten past this many.
    abandoned_ops_max: usize = 64, fixed, min Min::Const(1), max 4096;
    /// How long fsync (and a namespace op) waits for durability before answering EIO.
    ack_timeout_ms: u64 = 10_000, settable, min Min::Const(10), max 3_600_000;
    /// A checkpoint (tree synced, applied id recorded, log purged) after this many entries.
    checkpoint_entries: u64 = 2_000, settable, min Min::Const(16), max 1 << 30;
    /// Log entries kept decoded in memory at most (record bytes), so the apply and the
    /// replication streams read what was appended without reading, checksumming and
    /// decoding it again. An entry leaves once the apply and every stream have read it, so
    /// this fills only while they trail the log: under a sustained write openraft's streams
    /// trail by up to `inflight_bytes_max`, hence the same default. 0 reads everything
    /// from the segment files.
    log_cache_bytes: u64 = 64 << 20, settable, min Min::Const(0), max 1 << 30;
    /// Log records and tree writes of at least this many bytes have their page-aligned
    /// middle written with O_DIRECT instead of through the page cache
    /// (`replication/direct_write.rs`); the log append's fdatasync, and the checkpoint's
    /// for the tree, cover both. 0 writes everything through the page cache.
    direct_write_bytes_min: u64 = 256 << 10, settable, min Min::Const(0), max 1 << 30;
    /// A log segment file is closed and a new one started past this size.
    log_segment_bytes_max: u64 = 64 << 20, settable, min Min::Const(4 << 20), max 4 << 30;
    /// Open files the state machine keeps cached while applying.
    apply_open_files_max: usize = 64, fixed, min Min::Const(4), max 4096;
    /// FUSE worker threads.
    fuse_threads: usize = 4, settable, min Min::Const(1), max 64;
    /// Worker threads of the runtime that runs openraft, the proposer and the peer links.
    /// Two, not more: the log's fdatasync and the apply block one each, and every idle
    /// worker more is one more woken to look for work each time a task is scheduled
    /// (TUNING.md: 4 → 2 took 3 context switches and a tenth of the CPU off an LMDB
    /// commit on a 3-node leader). Not fewer: with one, every fdatasync would stall the
    /// peer links and timers too (and it was slower).
    runtime_threads: usize = 2, settable, min Min::Const(2), max 64;
    /// glibc malloc arenas the daemon's threads share (glibc's default is eight per
    /// core): each arena keeps what it freed, so a dozen threads passing 1 MiB buffers
    /// around under a sustained write each held their own high-water mark.
    malloc_arenas_max: usize = 2, fixed, min Min::Const(1), max 64;
    /// Largest FUSE WRITE the kernel may send.
    fuse_write_bytes_max: u32 = 1 << 20, fixed, min Min::Const(4096), max 16 << 20;
    /// How long `mount` waits for the node to become a writable leader.
    ready_timeout_ms: u64 = 30_000, settable, min Min::Const(100), max 3_600_000;
    /// Log entries kept below a checkpoint for members that are slightly behind (at
    /// least; `log_keep_bytes` may keep more). One behind everything kept gets a tree
    /// snapshot.
    log_keep_entries: u64 = 1_000, settable, min Min::Const(0), max 1 << 30;
    /// Below a checkpoint, older log segments are kept as well while their bytes stay
    /// within this, so a member away for minutes replays the log instead of receiving
    /// the whole tree. Whichever of this and `log_keep_entries` keeps more wins
    /// (`replication/retention.rs`).
    log_keep_bytes: u64 = 1 << 30, settable, min Min::Const(0), max 1 << 40;
    /// The log's purge point is looked at after a checkpoint at most this often (openraft
    /// announces a checkpoint with every other change of its metrics: each append and
    /// apply); a purge comes at most this late.
    retention_check_ms: u64 = 1_000, fixed, min Min::Const(1), max 60_000;
    /// Largest frame on a peer link (an AppendEntries with its entries, or a snapshot chunk).
    /// A full AppendEntries (entries at the cap plus framing) must fit one frame.
    frame_bytes_max: usize = 32 << 20, fixed,
        min Min::Of(
            |l| (l.append_entries_max * (l.entry_bytes_max as u64 + 4096))
                .max(l.snapshot_chunk_bytes + 4096)
                .max(l.snapshot_manifest_bytes_max as u64 + 4096)
                // Room for the framing of many small records in one early send.
                .max(l.early_append_bytes_max * 2)
        ), max 1 << 30;
    /// Entries per AppendEntries of openraft's replication streams (an early send is
    /// bounded by `early_request_bytes_max` bytes instead).
    append_entries_max: u64 = 4, fixed, min Min::Const(1), max 1024;
    /// Bytes of tree image (or of incremental snapshot) per snapshot chunk.
    snapshot_chunk_bytes: u64 = 4 << 20, fixed, min Min::Const(64 << 10), max 64 << 20;
    /// Largest manifest a member sends a leader before an incremental snapshot (per
    /// file, 32 bytes per MiB of content: 16 MiB describes ~500 GiB). Files past it are
    /// left out of the manifest and arrive whole. A manifest travels in one frame.
    snapshot_manifest_bytes_max: usize = 16 << 20, fixed,
        min Min::Const(64 << 10), max (1 << 30) - 4096;
    /// How long a leader waits for a member's manifest, and for the member to rebuild
    /// and install its tree once the last snapshot chunk arrived.
    snapshot_install_timeout_ms: u64 = 600_000, fixed, min Min::Const(1_000), max 86_400_000;
    /// Connecting (and authenticating) to a peer.
    connect_timeout_ms: u64 = 1_000, fixed, min Min::Const(10), max 60_000;
    /// Writing or reading one frame once it has started.
    peer_io_timeout_ms: u64 = 10_000, fixed, min Min::Const(100), max 600_000;
    /// Concurrent inbound peer connections.
    peer_connections_max: usize = 64, fixed, min Min::Const(2), max 4096;
    /// Raft heartbeat. openraft also uses it as the timeout of one AppendEntries, so it
    /// must exceed the worst-case transfer of `append_entries_max` full entries plus the
    /// follower's fdatasync; up to half of it may first go to waiting for the early sends
    /// of the same entries (`replication/early.rs`), which then need not travel again.
    heartbeat_ms: u64 = 150, settable, min Min::Const(10), max 10_000;
    /// The shortest election timeout; the longest (and openraft's leader lease) is 1.25 ×
    /// this. Elections must not fire between heartbeats.
    election_timeout_min_ms: u64 = 500, settable,
        min Min::Of(|l| l.heartbeat_ms * 3), max 60_000;
    /// Largest HTTP request head (request line and headers) the metrics server reads.
    metrics_request_head_bytes_max: usize = 8 << 10, fixed, min Min::Const(1 << 10), max 64 << 10;
    /// Concurrent connections to the metrics server; more are answered 503 and closed.
    metrics_connections_max: usize = 16, fixed, min Min::Const(1), max 1024;
    /// Reading a metrics request head, and writing its answer.
    metrics_io_timeout_ms: u64 = 5_000, fixed, min Min::Const(100), max 600_000;
    /// The most recent fsync ack latencies kept for `status`'s p50 and p99.
    fsync_recent_samples_max: usize = 1_024, fixed, min Min::Const(16), max 1 << 20;
    /// `members add`: how long a new member may take to catch up before it is promoted.
    member_catchup_timeout_ms: u64 = 600_000, fixed, min Min::Const(1_000), max 86_400_000;
    /// `transfer-leader`: each of its waits (target catching up, target taking over).
    transfer_timeout_ms: u64 = 10_000, fixed, min Min::Const(1_000), max 600_000;
    /// The writable leader answers ENOSPC to new writes while the data dir's file system
    /// has less free space than this, so the log and the tree keep room to finish what was
    /// already accepted.
    disk_reserve_bytes: u64 = 64 << 20, settable, min Min::Const(0), max 1 << 40;
    /// How long a free-space reading (statvfs) is reused by that check.
    disk_free_check_ms: u64 = 100, settable, min Min::Const(1), max 60_000;
    /// A log append, vote or tree apply that met a full disk is retried this often.
    disk_full_retry_ms: u64 = 200, settable, min Min::Const(1), max 60_000;
    /// ...for at most this long; then the failure is fatal, as any other storage error.
    disk_full_wait_ms: u64 = 600_000, settable, min Min::Const(0), max 86_400_000;
    /// How long `status` (and a metrics scrape) waits for the Raft core's committed index
    /// before reporting the applied index instead (the core is busy while the log waits
    /// for space).
    status_raft_wait_ms: u64 = 500, fixed, min Min::Const(10), max 60_000;
    /// How long a node that just became leader waits for its term's first entry to be
    /// committed and applied (openraft's `ensure_linearizable`) before it gives up on
    /// becoming writable this time and tries again.
    linearizable_timeout_ms: u64 = 30_000, fixed, min Min::Const(100), max 600_000;
    /// How often pre-vote (a follower's campaign condition) and check-quorum (the
    /// leader's) are evaluated; part of the failover freeze.
    liveness_check_ms: u64 = 25, fixed, min Min::Const(5), max 1_000;
    /// The supervised ship gets SIGTERM, then SIGKILL after this long. Every member must
    /// use the same value: a new leader's ship waits it out (the freeze) before starting.
    ship_stop_grace_ms: u64 = 1_000, settable, min Min::Const(0), max 600_000;
    /// The first wait before restarting a ship that exited while this node leads; doubled
    /// after each failure up to `ship_restart_backoff_max_ms`.
    ship_restart_backoff_ms: u64 = 500, settable, min Min::Const(10), max 600_000;
    /// The longest wait between ship restarts.
    ship_restart_backoff_max_ms: u64 = 30_000, settable,
        min Min::Of(|l| l.ship_restart_backoff_ms), max 3_600_000;
    /// More ship failures than this within `ship_failures_window_ms` and this node hands
    /// leadership (and the ship) to another member.
    ship_failures_max: u64 = 5, settable, min Min::Const(0), max 1_000;
    /// The window of `ship_failures_max`.
    ship_failures_window_ms: u64 = 60_000, settable, min Min::Const(1_000), max 86_400_000;
}

/// A limit outside its allowed range.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{name} = {value} is out of range: allowed {min}..={max}")]
pub struct RangeError {
    pub name: &'static str,
    pub value: u64,
    pub min: u64,
    pub max: u64,
}

impl Limits {
    /// The row of limit `name`.
    pub fn spec(name: &str) -> Option<&'static LimitSpec> {
        LIMITS.iter().find(|s| s.name == name)
    }

    /// Set limit `name` (one of [`LIMITS`]) to `value`, refusing a value above its maximum
    /// (its minimum may depend on other limits: [`Limits::validate`] checks it).
    pub fn set(&mut self, name: &str, value: u64) -> Result<(), RangeError> {
        let spec = Limits::spec(name).expect("a limit of the table");
        if value > spec.max {
            return Err(RangeError {
                name: spec.name,
                value,
                min: spec.min(self),
                max: spec.max,
            });
        }
        (spec.set)(self, value);
        Ok(())
    }

    /// Every limit within its range, in table order.
    pub fn validate(&self) -> Result<(), RangeError> {
        for spec in LIMITS {
            let (value, min) = ((spec.get)(self), spec.min(self));
            if !(min..=spec.max).contains(&value) {
                return Err(RangeError {
                    name: spec.name,
                    value,
                    min,
                    max: spec.max,
                });
            }
        }
        Ok(())
    }
}

/// Added to the failover freeze for scheduling delays on a loaded host (a new leader's
/// ship starts `liveness_check_ms + ship_stop_grace_ms` plus this after it took over).
pub const SHIP_FREEZE_MARGIN_MS: u64 = 200;

/// A background daemon's log file (`--log-file`) larger than this when the daemon starts
/// is renamed to `LOG.1` (replacing an older one) and a new log is begun, so a node that is
/// remounted for years keeps at most twice this on disk.
pub const LOG_FILE_BYTES_MAX: u64 = 64 << 20;

/// How much longer than `ready_timeout_ms` the `--background` parent waits for the daemon
/// to report that it mounted: opening the data dir and replaying the log come first.
pub const BACKGROUND_READY_MARGIN_MS: u64 = 30_000;

/// The longest path from the mount's root a new name may have (ENAMETOOLONG beyond). Every
/// member applies ops with `DATA_DIR/tree/` + this path, which must stay under PATH_MAX
/// (4096) on all of them alike, or one member would apply an op that another refuses.
pub const TREE_PATH_BYTES_MAX: usize = 3072;

/// The longest canonical data dir path a node accepts: with `/tree/` and a path of
/// [`TREE_PATH_BYTES_MAX`], every path the daemon hands the kernel fits PATH_MAX.
pub const DATA_DIR_PATH_BYTES_MAX: usize = 960;

/// Bytes `seguro-fs import` reads and writes per step of a file copy (and per step of
/// reading the copy back to verify it): its whole buffer.
pub const IMPORT_COPY_CHUNK_BYTES: usize = 1 << 20;

/// Membership and link settings of a replicated node.
#[derive(Clone)]
pub struct ClusterConfig {
    /// Every member's advertised address, by node id (this node included).
    pub peers: std::collections::BTreeMap<u64, String>,
    /// Where this node accepts peer links.
    pub listen: std::net::SocketAddr,
    pub key: crate::replication::transport::ClusterKey,
}

impl std::fmt::Debug for ClusterConfig {
    // The key stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("peers", &self.peers)
            .field("listen", &self.listen)
            .field("key", &self.key.fingerprint())
            .finish()
    }
}

/// Everything `seguro-fs mount` needs, validated.
#[derive(Debug, Clone)]
pub struct MountConfig {
    pub data_dir: PathBuf,
    pub mountpoint: PathBuf,
    pub node_id: u64,
    /// File names (not paths) kept in `DATA_DIR/local/`, never replicated.
    pub local_names: Vec<String>,
    /// Let users other than the mounting one use the mount (FUSE `allow_other`).
    pub allow_other: bool,
    pub limits: Limits,
    /// Test hook: while this file exists, the log's fdatasync reports EIO (ENOSPC if the
    /// file starts with `ENOSPC`), after `delay-ms=N` milliseconds if it says so.
    pub fault_log_sync_file: Option<PathBuf>,
    /// None: a standalone one-voter node.
    pub cluster: Option<ClusterConfig>,
    /// Other replicas that must hold an entry durably before fsync returns (K).
    pub acks: u64,
    /// Never initialise a new cluster, even as the lowest id: a pristine node waits to be
    /// added by `seguro-fs members add`.
    pub join: bool,
    /// Where to serve Prometheus metrics (`GET /metrics`); None: not served.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Where a `--background` daemon appends its stdout and stderr.
    pub log_file: PathBuf,
    /// The command that runs the ship on the writable leader (`/bin/sh -c`); None: no
    /// ship is supervised.
    pub ship_command: Option<String>,
    /// The user the ship runs as (with its groups); None: the daemon's own user.
    pub ship_user: Option<String>,
}

impl MountConfig {
    /// What the data dir records about the cluster it belongs to.
    pub fn cluster_label(&self) -> String {
        match &self.cluster {
            None => "standalone".into(),
            Some(c) => format!("key-{}", c.key.fingerprint()),
        }
    }
}

/// The default K: the smallest that makes an acknowledged fsync Raft-committed
/// (majority − 1 other replicas), so it survives the loss of any minority.
pub fn default_acks(members: u64) -> u64 {
    members / 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_acks_is_majority_minus_one() {
        for (members, k) in [(1, 0), (2, 1), (3, 1), (4, 2), (5, 2), (7, 3)] {
            assert_eq!(default_acks(members), k, "{members} members");
            // K + the leader is a majority.
            assert!((k + 1) * 2 > members);
        }
    }

    #[test]
    fn defaults_are_valid() {
        Limits::default().validate().unwrap();
    }

    /// `set` checks a value against the row's maximum before converting it to the field's
    /// type, so every maximum must fit its type; and the table's default is the field's.
    #[test]
    fn maxima_fit_their_types_and_defaults_round_trip() {
        let d = Limits::default();
        for spec in LIMITS {
            let mut l = Limits::default();
            l.set(spec.name, spec.max).unwrap();
            assert_eq!(
                (spec.get)(&l),
                spec.max,
                "{} truncated its maximum",
                spec.name
            );
            assert_eq!((spec.get)(&d), spec.default, "{}", spec.name);
            assert!(!spec.doc.trim().is_empty(), "{} has no doc", spec.name);
        }
        let e = Limits::default().set("fuse_threads", 65).unwrap_err();
        assert_eq!(
            e.to_string(),
            "fuse_threads = 65 is out of range: allowed 1..=64"
        );
    }

    #[test]
    fn out_of_range_names_the_key_and_range() {
        let l = Limits {
            fuse_threads: 0,
            ..Limits::default()
        };
        let e = l.validate().unwrap_err();
        assert_eq!(e.name, "fuse_threads");
        assert_eq!(
            e.to_string(),
            "fuse_threads = 0 is out of range: allowed 1..=64"
        );
        let l = Limits {
            inflight_bytes_max: 1 << 20,
            ..Limits::default()
        };
        assert_eq!(l.validate().unwrap_err().name, "inflight_bytes_max");
    }
}
