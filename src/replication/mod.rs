//! Raft wiring: the openraft type configuration, and starting a node from a data dir
//! (log store, state machine, network) so `pipeline.rs` can propose batches and wait for
//! durability.

pub mod checkpoint;
pub mod control;
pub mod control_client;
pub mod direct_write;
pub mod early;
pub mod elections;
pub mod group_commit;
pub mod log_store;
pub mod net_config;
pub mod network;
pub mod overlay;
pub mod pipeline;
pub mod proposer;
pub mod quorum;
pub mod received;
pub mod record;
pub mod retention;
pub mod role;
pub mod snapshot;
pub mod state_machine;
pub mod transport;
pub mod wire;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use openraft::{BasicNode, Raft};
use tokio::sync::watch;

use crate::config::MountConfig;
use crate::datadir::DataDir;
use crate::diskfull::DiskFullPolicy;
use crate::op::{ApplyResult, Batch};
use log_store::{FlushState, LogOptions, LogStore};
use net_config::NetConfig;
use network::Network;
use overlay::Overlay;
use state_machine::{ObserverSlot, OverlayLink, StateMachine};
use transport::LinkLimits;

openraft::declare_raft_types!(
    /// seguro-fs's openraft types: entries carry a [`Batch`] of file ops.
    pub TypeConfig:
        D = Batch,
        R = ApplyResult,
        NodeId = u64,
        Node = BasicNode,
        SnapshotData = snapshot::SnapshotFile,
);

pub type Entry = openraft::Entry<TypeConfig>;

/// What a proposer of a batch receives once the entry is applied (or fails).
pub type ResponseReceiver =
    <openraft::impls::OneshotResponder<TypeConfig> as openraft::raft::responder::Responder<
        TypeConfig,
    >>::Receiver;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("opening the raft log in {path}: {source}")]
    Log {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("opening the state machine: {0}")]
    StateMachine(std::io::Error),
    #[error("starting raft: {0}")]
    Raft(String),
    #[error("cannot accept peer links on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// A running Raft node and the channels the file system watches.
pub struct Node {
    pub raft: Raft<TypeConfig>,
    pub state_machine: StateMachine,
    pub elections: elections::Elections,
    /// The log itself: `status` and /metrics read how far back it reaches.
    pub log: LogStore,
    /// How this node reaches its peers (admin commands reuse it).
    pub net: NetConfig,
    pub flush_rx: watch::Receiver<FlushState>,
    pub applied_rx: watch::Receiver<u64>,
    /// Who heard whom: pre-vote and check-quorum read it.
    pub liveness: Arc<quorum::Liveness>,
    /// How far each follower's log durably matches ours: fsync reads it.
    pub matched: Arc<quorum::Matched>,
}

/// The longest election timeout: openraft's leader lease too (see `start`).
pub fn election_timeout_max_ms(l: &crate::config::Limits) -> u64 {
    l.election_timeout_min_ms + l.election_timeout_min_ms / 4
}

/// Every member of the cluster `cfg` describes, as a pristine cluster is initialised with
/// them (by its lowest id, or by `import`).
pub fn members(cfg: &MountConfig) -> BTreeMap<u64, BasicNode> {
    match &cfg.cluster {
        None => BTreeMap::from([(cfg.node_id, BasicNode::new(""))]),
        Some(c) => c
            .peers
            .iter()
            .map(|(id, addr)| (*id, BasicNode::new(addr)))
            .collect(),
    }
}

/// Open the log and state machine in `dir` and start Raft (and, in a cluster, the peer
/// listener). A pristine standalone data dir is initialised as a one-voter cluster; in a
/// cluster the member with the lowest id initialises a pristine cluster with every member
/// of `--peers` as a voter. Everything else just restarts from disk.
pub async fn start(
    cfg: &MountConfig,
    dir: &DataDir,
    origin: u64,
    overlay: Arc<Mutex<Overlay>>,
    observer: ObserverSlot,
    registry: Arc<crate::counters::Registry>,
    ship: Arc<crate::ship::Ship>,
) -> Result<Node, StartError> {
    let liveness = Arc::new(quorum::Liveness::new(election_timeout_max_ms(&cfg.limits)));
    let matched = Arc::new(quorum::Matched::default());
    let early = early::EarlyAppend::new(cfg.node_id, &cfg.limits, matched.clone());
    let received = Arc::new(received::Received::counting(
        registry.records_as_received.clone(),
    ));
    let raft_dir = dir.raft_dir();
    let disk = DiskFullPolicy::new(&cfg.limits, registry.disk.clone());
    let (log, flush_rx) = LogStore::open(LogOptions {
        dir: raft_dir.clone(),
        segment_bytes_max: cfg.limits.log_segment_bytes_max,
        origin,
        fault_sync_file: cfg.fault_log_sync_file.clone(),
        disk: disk.clone(),
        cache_bytes_max: cfg.limits.log_cache_bytes,
        direct_bytes_min: cfg.limits.direct_write_bytes_min,
        early: cfg.cluster.is_some().then(|| early.clone()),
        received: cfg.cluster.is_some().then(|| received.clone()),
        own_vote_uncommitted: cfg.cluster.is_some().then_some(cfg.node_id),
    })
    .map_err(|source| StartError::Log {
        path: raft_dir,
        source,
    })?;
    let (state_machine, applied_rx) = StateMachine::open(
        dir.root.clone(),
        crate::tree::TreeLimits {
            open_files_max: cfg.limits.apply_open_files_max,
            direct_bytes_min: cfg.limits.direct_write_bytes_min,
        },
        Some(OverlayLink { origin, overlay }),
        observer,
        disk,
    )
    .map_err(StartError::StateMachine)?;

    let l = &cfg.limits;
    let raft_config = openraft::Config {
        cluster_name: "seguro-fs".into(),
        heartbeat_interval: l.heartbeat_ms,
        election_timeout_min: l.election_timeout_min_ms,
        // openraft makes the leader lease (how long a follower refuses to vote after
        // hearing from its leader) equal to the longest election timeout, so a narrow
        // window is what keeps failover short: a candidate that fires early is refused
        // until the lease ends and must wait a whole timeout again.
        election_timeout_max: election_timeout_max_ms(l),
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(l.checkpoint_entries),
        // Retention is ours (`retention.rs`): openraft's entry-count policy never purges.
        max_in_snapshot_log_to_keep: u64::MAX,
        max_payload_entries: l.append_entries_max,
        snapshot_max_chunk_size: l.snapshot_chunk_bytes,
        install_snapshot_timeout: l.peer_io_timeout_ms,
        // openraft's own election timer never campaigns, from its first tick: only our
        // pre-vote does (`elections.rs`).
        enable_elect: false,
        ..Default::default()
    }
    .validate()
    .map_err(|e| StartError::Raft(e.to_string()))?;

    let net = NetConfig {
        my_id: cfg.node_id,
        bind_ip: cfg.cluster.as_ref().map(|c| c.listen.ip()),
        key: cfg.cluster.as_ref().map(|c| c.key.clone()),
        limits: LinkLimits {
            frame_bytes_max: l.frame_bytes_max,
            connect_timeout_ms: l.connect_timeout_ms,
            io_timeout_ms: l.peer_io_timeout_ms,
        },
        idle_ms: l.peer_io_timeout_ms * 6,
        snapshot_install_timeout_ms: l.snapshot_install_timeout_ms,
        connections_max: l.peer_connections_max,
        registry,
        liveness: liveness.clone(),
        matched: matched.clone(),
        received,
    };
    let listener = match &cfg.cluster {
        Some(c) => Some(
            tokio::net::TcpListener::bind(c.listen)
                .await
                .map_err(|source| StartError::Listen {
                    addr: c.listen,
                    source,
                })?,
        ),
        None => None,
    };
    let raft = Raft::new(
        cfg.node_id,
        Arc::new(raft_config),
        Network {
            cfg: net.clone(),
            early: cfg.cluster.is_some().then(|| early.clone()),
        },
        log.clone(),
        state_machine.clone(),
    )
    .await
    .map_err(|e| StartError::Raft(e.to_string()))?;
    if cfg.cluster.is_some() && l.early_append_bytes_max > 0 {
        early::spawn_thread(early.clone(), raft.server_metrics(), net.clone())
            .map_err(|e| StartError::Raft(format!("cannot start the early-send thread: {e}")))?;
    }
    tokio::spawn(retention::run(
        raft.clone(),
        log.clone(),
        retention::Keep {
            entries: l.log_keep_entries,
            bytes: l.log_keep_bytes,
        },
        dir.raft_dir(),
        std::time::Duration::from_millis(l.retention_check_ms),
    ));
    // After a pause (a snapshot install, a transfer) elections stay off for two of the
    // longest election timeouts: the leader's heartbeats reset the timer meanwhile.
    let timing = elections::Timing {
        lease_ms: election_timeout_max_ms(l),
        spread_ms: election_timeout_max_ms(l) - l.election_timeout_min_ms,
        tick_ms: l.liveness_check_ms,
        ship_stop_grace_ms: l.ship_stop_grace_ms,
    };
    let elections = elections::Elections::new(
        raft.clone(),
        election_timeout_max_ms(l) * 2,
        liveness.clone(),
        timing,
    );
    state_machine.set_elections(elections.clone());
    let control = control::ControlServer::new(
        raft.clone(),
        state_machine.clone(),
        l,
        elections.clone(),
        ship,
    );
    if let Some(listener) = listener {
        tokio::spawn(network::serve(listener, raft.clone(), net.clone(), control));
    }
    // Standalone too: a lone voter whose vote was not committed when it stopped must be
    // able to elect itself (its pre-vote needs no one else).
    tokio::spawn(elections.clone().run(net.clone()));

    let initialized = raft
        .is_initialized()
        .await
        .map_err(|e| StartError::Raft(e.to_string()))?;
    let members = members(cfg);
    let lowest = *members.keys().next().expect("at least this node");
    if !initialized && cfg.node_id == lowest && !cfg.join {
        tracing::info!(node_id = cfg.node_id, members = ?members.keys().collect::<Vec<_>>(), "initialising a new cluster");
        raft.initialize(members)
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
    } else if !initialized {
        tracing::info!(
            node_id = cfg.node_id,
            "pristine member: waiting to be contacted by the cluster"
        );
    }
    Ok(Node {
        raft,
        state_machine,
        elections,
        log,
        net,
        flush_rx,
        applied_rx,
        liveness,
        matched,
    })
}

/// Log id `index` of term `term` led by node 1: what the replication modules' tests append.
#[cfg(test)]
pub(crate) fn test_log_id(term: u64, index: u64) -> openraft::LogId<u64> {
    openraft::LogId::new(openraft::CommittedLeaderId::new(term, 1), index)
}
