//! Raft wiring: the openraft type configuration, and starting a node from a data dir
//! (log store, state machine, network, proposer) so the file system can propose batches
//! and wait for durability.

pub mod checkpoint;
pub mod log_store;
pub mod network;
pub mod proposer;
pub mod record;
pub mod state_machine;

use std::collections::BTreeMap;
use std::io::Cursor;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::{BasicNode, Raft};
use tokio::sync::watch;

use crate::config::MountConfig;
use crate::datadir::DataDir;
use crate::fs::overlay::Overlay;
use crate::op::{ApplyResult, Batch};
use log_store::{FlushState, LogOptions, LogStore};
use state_machine::{OverlayLink, StateMachine};

openraft::declare_raft_types!(
    /// seguro-fs's openraft types: entries carry a [`Batch`] of file ops.
    pub TypeConfig:
        D = Batch,
        R = ApplyResult,
        NodeId = u64,
        Node = BasicNode,
        SnapshotData = Cursor<Vec<u8>>,
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
}

/// A running Raft node and the channels the file system watches.
pub struct Node {
    pub raft: Raft<TypeConfig>,
    pub state_machine: StateMachine,
    pub flush_rx: watch::Receiver<FlushState>,
    pub applied_rx: watch::Receiver<u64>,
}

/// Open the log and state machine in `dir` and start Raft. A pristine single-node data
/// dir is initialised as a one-voter cluster; an existing one just restarts.
pub async fn start(
    cfg: &MountConfig,
    dir: &DataDir,
    origin: u64,
    overlay: Arc<Mutex<Overlay>>,
) -> Result<Node, StartError> {
    let raft_dir = dir.raft_dir();
    let (log, flush_rx) = LogStore::open(LogOptions {
        dir: raft_dir.clone(),
        segment_bytes_max: cfg.limits.log_segment_bytes_max,
        origin,
        fault_sync_file: cfg.fault_log_sync_file.clone(),
    })
    .map_err(|source| StartError::Log {
        path: raft_dir,
        source,
    })?;
    let (state_machine, applied_rx) = StateMachine::open(
        dir.tree_dir(),
        &dir.checkpoint_path(),
        cfg.limits.apply_open_files_max,
        Some(OverlayLink { origin, overlay }),
    )
    .map_err(StartError::StateMachine)?;

    let raft_config = openraft::Config {
        cluster_name: "seguro-fs".into(),
        heartbeat_interval: 50,
        election_timeout_min: 150,
        election_timeout_max: 300,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(cfg.limits.checkpoint_entries),
        max_in_snapshot_log_to_keep: 0,
        ..Default::default()
    }
    .validate()
    .map_err(|e| StartError::Raft(e.to_string()))?;

    let raft = Raft::new(
        cfg.node_id,
        Arc::new(raft_config),
        network::Network,
        log,
        state_machine.clone(),
    )
    .await
    .map_err(|e| StartError::Raft(e.to_string()))?;

    let initialized = raft
        .is_initialized()
        .await
        .map_err(|e| StartError::Raft(e.to_string()))?;
    if !initialized {
        let members: BTreeMap<u64, BasicNode> = BTreeMap::from([(cfg.node_id, BasicNode::new(""))]);
        tracing::info!(
            node_id = cfg.node_id,
            "initialising a new one-voter cluster"
        );
        raft.initialize(members)
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
    }
    Ok(Node {
        raft,
        state_machine,
        flush_rx,
        applied_rx,
    })
}

impl Node {
    /// Wait until this node leads and has applied every entry up to its term's first
    /// entry: only then does the tree show everything acknowledged before a restart.
    pub async fn wait_writable(&self, timeout: Duration) -> Result<(), String> {
        let wait = async {
            loop {
                match self.raft.ensure_linearizable().await {
                    Ok(_) => return Ok(()),
                    Err(openraft::error::RaftError::Fatal(f)) => return Err(f.to_string()),
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| format!("not writable after {} ms", timeout.as_millis()))?
    }
}
