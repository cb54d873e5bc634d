//! The validated configuration: every limit and timeout of the daemon lives here, with its
//! default and its allowed range, so there is one place to read and tune them.

use std::path::PathBuf;

/// Numeric limits. Names carry their unit last (`_bytes_max`, `_ms`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Cap on one Raft entry's encoded ops (group-commit batch). Larger writes are split.
    /// The default leaves room for a whole `fuse_write_bytes_max` WRITE and its op header:
    /// at exactly 1 MiB every 1 MiB write became a full entry plus a ~100-byte one, which
    /// doubled the log flushes and replication round trips of sequential writes.
    pub entry_bytes_max: usize,
    /// Bytes written but not yet applied to the tree (the overlay). WRITE blocks above it:
    /// this is the backpressure that bounds memory while a multi-GB file streams through.
    pub inflight_bytes_max: usize,
    /// Batches proposed to Raft but not yet flushed to the log.
    pub proposals_inflight_max: usize,
    /// How long fsync (and a namespace op) waits for durability before answering EIO.
    pub ack_timeout_ms: u64,
    /// A checkpoint (tree synced, applied id recorded, log purged) after this many entries.
    pub checkpoint_entries: u64,
    /// A log segment file is closed and a new one started past this size.
    pub log_segment_bytes_max: u64,
    /// Open files the state machine keeps cached while applying.
    pub apply_open_files_max: usize,
    /// FUSE worker threads.
    pub fuse_threads: usize,
    /// Largest FUSE WRITE the kernel may send.
    pub fuse_write_bytes_max: u32,
    /// How long `mount` waits for the node to become a writable leader.
    pub ready_timeout_ms: u64,
    /// Log entries kept below a checkpoint for members that are slightly behind (at
    /// least; `log_keep_bytes` may keep more). One behind everything kept gets a tree
    /// snapshot.
    pub log_keep_entries: u64,
    /// Below a checkpoint, older log segments are kept as well while their bytes stay
    /// within this, so a member away for minutes replays the log instead of receiving
    /// the whole tree. Whichever of this and `log_keep_entries` keeps more wins
    /// (`replication/retention.rs`).
    pub log_keep_bytes: u64,
    /// Largest frame on a peer link (an AppendEntries with its entries, or a snapshot chunk).
    pub frame_bytes_max: usize,
    /// Entries per AppendEntries.
    pub append_entries_max: u64,
    /// Bytes of tree image (or of incremental snapshot) per snapshot chunk.
    pub snapshot_chunk_bytes: u64,
    /// Largest manifest a member sends a leader before an incremental snapshot (per
    /// file, 32 bytes per MiB of content: 16 MiB describes ~500 GiB). Files past it are
    /// left out of the manifest and arrive whole.
    pub snapshot_manifest_bytes_max: usize,
    /// How long a leader waits for a member's manifest, and for the member to rebuild
    /// and install its tree once the last snapshot chunk arrived.
    pub snapshot_install_timeout_ms: u64,
    /// Connecting (and authenticating) to a peer.
    pub connect_timeout_ms: u64,
    /// Writing or reading one frame once it has started.
    pub peer_io_timeout_ms: u64,
    /// Concurrent inbound peer connections.
    pub peer_connections_max: usize,
    /// Raft heartbeat. openraft also uses it as the timeout of one AppendEntries, so it
    /// must exceed the worst-case transfer of `append_entries_max` full entries plus the
    /// follower's fdatasync. The election timeout is drawn from
    /// [election_timeout_min_ms, 1.25×].
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    /// Largest HTTP request head (request line and headers) the metrics server reads.
    pub metrics_request_head_bytes_max: usize,
    /// Concurrent connections to the metrics server; more are answered 503 and closed.
    pub metrics_connections_max: usize,
    /// Reading a metrics request head, and writing its answer.
    pub metrics_io_timeout_ms: u64,
    /// The most recent fsync ack latencies kept for `status`'s p50 and p99.
    pub fsync_recent_samples_max: usize,
    /// `members add`: how long a new member may take to catch up before it is promoted.
    pub member_catchup_timeout_ms: u64,
    /// `transfer-leader`: each of its waits (target catching up, target taking over).
    pub transfer_timeout_ms: u64,
    /// The writable leader answers ENOSPC to new writes while the data dir's file system
    /// has less free space than this, so the log and the tree keep room to finish what was
    /// already accepted.
    pub disk_reserve_bytes: u64,
    /// How long a free-space reading (statvfs) is reused by that check.
    pub disk_free_check_ms: u64,
    /// A log append, vote or tree apply that met a full disk is retried this often.
    pub disk_full_retry_ms: u64,
    /// ...for at most this long; then the failure is fatal, as any other storage error.
    pub disk_full_wait_ms: u64,
    /// How long `status` (and a metrics scrape) waits for the Raft core's committed index
    /// before reporting the applied index instead (the core is busy while the log waits
    /// for space).
    pub status_raft_wait_ms: u64,
    /// How often pre-vote (a follower's campaign condition) and check-quorum (the
    /// leader's) are evaluated; part of the failover freeze.
    pub liveness_check_ms: u64,
    /// The supervised ship gets SIGTERM, then SIGKILL after this long. Every member must
    /// use the same value: a new leader's ship waits it out (the freeze) before starting.
    pub ship_stop_grace_ms: u64,
    /// The first wait before restarting a ship that exited while this node leads; doubled
    /// after each failure up to `ship_restart_backoff_max_ms`.
    pub ship_restart_backoff_ms: u64,
    pub ship_restart_backoff_max_ms: u64,
    /// More ship failures than this within `ship_failures_window_ms` and this node hands
    /// leadership (and the ship) to another member.
    pub ship_failures_max: u64,
    pub ship_failures_window_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            entry_bytes_max: (1 << 20) + (64 << 10),
            inflight_bytes_max: 64 << 20,
            proposals_inflight_max: 8,
            ack_timeout_ms: 10_000,
            checkpoint_entries: 2_000,
            log_segment_bytes_max: 64 << 20,
            apply_open_files_max: 64,
            fuse_threads: 4,
            fuse_write_bytes_max: 1 << 20,
            ready_timeout_ms: 30_000,
            log_keep_entries: 1_000,
            log_keep_bytes: 1 << 30,
            frame_bytes_max: 32 << 20,
            append_entries_max: 4,
            snapshot_chunk_bytes: 4 << 20,
            snapshot_manifest_bytes_max: 16 << 20,
            snapshot_install_timeout_ms: 600_000,
            connect_timeout_ms: 1_000,
            peer_io_timeout_ms: 10_000,
            peer_connections_max: 64,
            heartbeat_ms: 150,
            election_timeout_min_ms: 500,
            metrics_request_head_bytes_max: 8 << 10,
            metrics_connections_max: 16,
            metrics_io_timeout_ms: 5_000,
            fsync_recent_samples_max: 1_024,
            member_catchup_timeout_ms: 600_000,
            transfer_timeout_ms: 10_000,
            disk_reserve_bytes: 64 << 20,
            disk_free_check_ms: 100,
            disk_full_retry_ms: 200,
            disk_full_wait_ms: 600_000,
            status_raft_wait_ms: 500,
            liveness_check_ms: 25,
            ship_stop_grace_ms: 1_000,
            ship_restart_backoff_ms: 500,
            ship_restart_backoff_max_ms: 30_000,
            ship_failures_max: 5,
            ship_failures_window_ms: 60_000,
        }
    }
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

fn check(name: &'static str, value: u64, min: u64, max: u64) -> Result<(), RangeError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(RangeError {
            name,
            value,
            min,
            max,
        })
    }
}

impl Limits {
    pub fn validate(&self) -> Result<(), RangeError> {
        check(
            "entry_bytes_max",
            self.entry_bytes_max as u64,
            64 << 10,
            16 << 20,
        )?;
        check(
            "inflight_bytes_max",
            self.inflight_bytes_max as u64,
            self.entry_bytes_max as u64 * 2,
            16 << 30,
        )?;
        check(
            "proposals_inflight_max",
            self.proposals_inflight_max as u64,
            1,
            1024,
        )?;
        check("ack_timeout_ms", self.ack_timeout_ms, 10, 3_600_000)?;
        check("checkpoint_entries", self.checkpoint_entries, 16, 1 << 30)?;
        check(
            "log_segment_bytes_max",
            self.log_segment_bytes_max,
            4 << 20,
            4 << 30,
        )?;
        check(
            "apply_open_files_max",
            self.apply_open_files_max as u64,
            4,
            4096,
        )?;
        check("fuse_threads", self.fuse_threads as u64, 1, 64)?;
        check(
            "fuse_write_bytes_max",
            self.fuse_write_bytes_max as u64,
            4096,
            16 << 20,
        )?;
        check("ready_timeout_ms", self.ready_timeout_ms, 100, 3_600_000)?;
        check("log_keep_entries", self.log_keep_entries, 0, 1 << 30)?;
        check("log_keep_bytes", self.log_keep_bytes, 0, 1 << 40)?;
        // A full AppendEntries (entries at the cap plus framing) must fit one frame.
        let append_bytes = self.append_entries_max * (self.entry_bytes_max as u64 + 4096);
        check(
            "frame_bytes_max",
            self.frame_bytes_max as u64,
            append_bytes.max(self.snapshot_chunk_bytes + 4096),
            1 << 30,
        )?;
        check("append_entries_max", self.append_entries_max, 1, 1024)?;
        check(
            "snapshot_chunk_bytes",
            self.snapshot_chunk_bytes,
            64 << 10,
            64 << 20,
        )?;
        // A manifest travels in one frame.
        check(
            "snapshot_manifest_bytes_max",
            self.snapshot_manifest_bytes_max as u64,
            64 << 10,
            self.frame_bytes_max as u64 - 4096,
        )?;
        check(
            "snapshot_install_timeout_ms",
            self.snapshot_install_timeout_ms,
            1_000,
            86_400_000,
        )?;
        check("connect_timeout_ms", self.connect_timeout_ms, 10, 60_000)?;
        check("peer_io_timeout_ms", self.peer_io_timeout_ms, 100, 600_000)?;
        check(
            "peer_connections_max",
            self.peer_connections_max as u64,
            2,
            4096,
        )?;
        check("heartbeat_ms", self.heartbeat_ms, 10, 10_000)?;
        // Elections must not fire between heartbeats.
        check(
            "election_timeout_min_ms",
            self.election_timeout_min_ms,
            self.heartbeat_ms * 3,
            60_000,
        )?;
        check(
            "metrics_request_head_bytes_max",
            self.metrics_request_head_bytes_max as u64,
            1 << 10,
            64 << 10,
        )?;
        check(
            "metrics_connections_max",
            self.metrics_connections_max as u64,
            1,
            1024,
        )?;
        check(
            "metrics_io_timeout_ms",
            self.metrics_io_timeout_ms,
            100,
            600_000,
        )?;
        check(
            "fsync_recent_samples_max",
            self.fsync_recent_samples_max as u64,
            16,
            1 << 20,
        )?;
        check(
            "member_catchup_timeout_ms",
            self.member_catchup_timeout_ms,
            1_000,
            86_400_000,
        )?;
        check(
            "transfer_timeout_ms",
            self.transfer_timeout_ms,
            1_000,
            600_000,
        )?;
        check("disk_reserve_bytes", self.disk_reserve_bytes, 0, 1 << 40)?;
        check("disk_free_check_ms", self.disk_free_check_ms, 1, 60_000)?;
        check("disk_full_retry_ms", self.disk_full_retry_ms, 1, 60_000)?;
        check("disk_full_wait_ms", self.disk_full_wait_ms, 0, 86_400_000)?;
        check("status_raft_wait_ms", self.status_raft_wait_ms, 10, 60_000)?;
        check("liveness_check_ms", self.liveness_check_ms, 5, 1_000)?;
        check("ship_stop_grace_ms", self.ship_stop_grace_ms, 0, 600_000)?;
        check(
            "ship_restart_backoff_ms",
            self.ship_restart_backoff_ms,
            10,
            600_000,
        )?;
        check(
            "ship_restart_backoff_max_ms",
            self.ship_restart_backoff_max_ms,
            self.ship_restart_backoff_ms,
            3_600_000,
        )?;
        check("ship_failures_max", self.ship_failures_max, 0, 1_000)?;
        check(
            "ship_failures_window_ms",
            self.ship_failures_window_ms,
            1_000,
            86_400_000,
        )?;
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
    /// file starts with `ENOSPC`).
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
