//! How this node reaches and serves its peers: the settings and shared state that every
//! link (`network.rs`) and the admin tools' links (`control.rs`, `restore.rs`) use. Its
//! own module so that the network and the control requests, which use each other's
//! services, do not import each other.

use std::net::IpAddr;
use std::sync::Arc;

use super::quorum::{Liveness, Matched};
use super::received::Received;
use super::transport::{ClusterKey, LinkLimits};
use crate::counters::Registry;

/// How this node reaches and serves its peers.
#[derive(Clone)]
pub struct NetConfig {
    pub my_id: u64,
    /// Source address for outgoing links (the node's listen IP), so links leave from the
    /// address peers know this node by.
    pub bind_ip: Option<IpAddr>,
    pub key: Option<ClusterKey>,
    pub limits: LinkLimits,
    /// How long a server waits for the next request on an idle link.
    pub idle_ms: u64,
    /// How long a manifest, and the install after the last snapshot chunk, may take.
    pub snapshot_install_timeout_ms: u64,
    pub connections_max: usize,
    pub registry: Arc<Registry>,
    /// Fed by the network (acks as leader, leader traffic as follower), read by pre-vote and
    /// check-quorum.
    pub liveness: Arc<Liveness>,
    /// Fed on a leader by the network and by early sends (`early.rs`): how far each
    /// follower's log durably matches. Read by fsync.
    pub matched: Arc<Matched>,
    /// Fed by the server with the records of each AppendEntries while openraft handles it,
    /// taken by the log store's append (`received.rs`).
    pub received: Arc<Received>,
}
