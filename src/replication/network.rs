//! openraft's network: one authenticated link per (this node → target) client, reconnected
//! on failure, and the listener that serves peers' RPCs into the local Raft.
//!
//! A client carries one RPC at a time (openraft drives each replication stream
//! sequentially), so the bytes in flight per peer are bounded by `frame_bytes_max`.
//!
//! Entry and snapshot bytes are counted here, per peer and direction (`metrics.rs`).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Raft};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::control::{ControlServer, OpenImage};
use super::quorum::{Liveness, Matched};
use super::transport::{ClusterKey, Link, LinkError, LinkLimits};
use super::wire::{self, RaftRequest, Request, Response};
use super::TypeConfig;
use crate::metrics::{PeerCounters, Registry};

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
    pub connections_max: usize,
    pub registry: Arc<Registry>,
    /// Fed here (acks as leader, leader traffic as follower), read by pre-vote and
    /// check-quorum.
    pub liveness: Arc<Liveness>,
    /// Fed here on a leader (how far each follower's log durably matches), read by fsync.
    pub matched: Arc<Matched>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct NetErr(String);

/// Creates [`PeerClient`]s.
pub struct Network {
    pub cfg: NetConfig,
}

pub struct PeerClient {
    target: u64,
    addr: String,
    cfg: NetConfig,
    link: Option<Link>,
    counters: Arc<PeerCounters>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;
    async fn new_client(&mut self, target: u64, node: &BasicNode) -> PeerClient {
        PeerClient {
            target,
            addr: node.addr.clone(),
            cfg: self.cfg.clone(),
            link: None,
            counters: self.cfg.registry.peer(target),
        }
    }
}

type CallError = RPCError<u64, BasicNode, RaftError<u64>>;

impl PeerClient {
    async fn link(&mut self) -> Result<&mut Link, Unreachable> {
        if self.link.is_none() {
            let unreachable = |why: String| Unreachable::new(&NetErr(why));
            let key = self
                .cfg
                .key
                .as_ref()
                .ok_or_else(|| unreachable("this node has no cluster key".into()))?;
            let addr: SocketAddr = tokio::net::lookup_host(&self.addr)
                .await
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| unreachable(format!("cannot resolve {}", self.addr)))?;
            let link = Link::connect(addr, self.cfg.bind_ip, key, self.cfg.my_id, self.cfg.limits)
                .await
                .map_err(|e| {
                    if matches!(e, LinkError::Auth(_)) {
                        tracing::warn!(target = self.target, addr = %self.addr, error = %e, "peer link refused");
                    }
                    unreachable(format!("node {} at {}: {e}", self.target, self.addr))
                })?;
            if link.peer_id != self.target {
                return Err(unreachable(format!(
                    "{} answered as node {}, expected node {}",
                    self.addr, link.peer_id, self.target
                )));
            }
            self.link = Some(link);
        }
        Ok(self.link.as_mut().expect("just set"))
    }

    /// Send one request and wait (bounded by `ttl`) for its response. Any failure drops
    /// the link; the next call reconnects.
    async fn call(&mut self, req: Request, ttl: Duration) -> Result<Response, NetworkError> {
        let bytes = wire::encode_request(&req);
        // The link is out of `self` while a request is in flight: openraft may drop this
        // future at its timeout between send and receive, and a link left behind would then
        // hand the late response to the next request. Put back only after a whole answer.
        let mut link = self.link.take().expect("`rpc` connects before calling");
        let result = async {
            link.send(&bytes).await?;
            link.recv(ttl.as_millis() as u64).await
        }
        .await;
        match result
            .map_err(|e| e.to_string())
            .and_then(|b| wire::decode_response(&b).map_err(|e| e.to_string()))
        {
            Ok(resp) => {
                self.link = Some(link);
                Ok(resp)
            }
            Err(e) => Err(NetworkError::new(&NetErr(format!(
                "node {} at {}: {e}",
                self.target, self.addr
            )))),
        }
    }
}

impl PeerClient {
    /// Connect if needed, send `req`, convert the response. A failure to connect is
    /// Unreachable (openraft backs off); a failed call is a network error (retried).
    async fn rpc<T, E: std::error::Error>(
        &mut self,
        req: Request,
        option: RPCOption,
        convert: fn(Response) -> Result<T, String>,
    ) -> Result<T, RPCError<u64, BasicNode, E>> {
        self.link().await.map_err(RPCError::Unreachable)?;
        let resp = self
            .call(req, option.hard_ttl())
            .await
            .map_err(RPCError::Network)?;
        convert(resp).map_err(|msg| RPCError::Network(NetworkError::new(&NetErr(msg))))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, CallError> {
        let req = wire::append_request(&rpc);
        let (entries, bytes) = entry_bytes(&req);
        let sent = Instant::now();
        let resp = self.rpc(req, option, wire::to_append_response).await;
        if let Ok(r) = &resp {
            self.counters.sent_entries(entries, bytes);
            let term = rpc.vote.leader_id().term;
            // How far the follower's log now matches ours (it answers after its fdatasync).
            let last = rpc.entries.last().map(|e| e.log_id).or(rpc.prev_log_id);
            match r {
                AppendEntriesResponse::Success => {
                    if let Some(last) = last {
                        self.cfg.matched.record(self.target, term, last.index);
                    }
                }
                AppendEntriesResponse::PartialSuccess(Some(upto)) => {
                    self.cfg.matched.record(self.target, term, upto.index);
                }
                _ => {}
            }
            if !matches!(r, AppendEntriesResponse::HigherVote(_)) {
                self.cfg.liveness.acked(self.target, term, sent);
            }
        }
        resp
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        let resp = self
            .rpc(
                wire::snapshot_request(&rpc),
                option,
                wire::to_snapshot_response,
            )
            .await;
        if resp.is_ok() {
            self.counters
                .sent_snapshot_chunk(rpc.data.len() as u64, rpc.done);
        }
        resp
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, CallError> {
        self.rpc(wire::vote_request(&rpc), option, wire::to_vote_response)
            .await
    }
}

/// Entries in an AppendEntries request and their bytes in record form (0 for others).
fn entry_bytes(req: &Request) -> (u64, u64) {
    match req {
        Request::Append { entries, .. } => (
            entries.len() as u64,
            entries.iter().map(|e| e.len() as u64).sum(),
        ),
        _ => (0, 0),
    }
}

async fn handle(
    raft: &Raft<TypeConfig>,
    control: &ControlServer,
    liveness: &Liveness,
    image: &mut Option<OpenImage>,
    req: RaftRequest,
) -> Response {
    match req {
        RaftRequest::Control(c) => control.handle(c, image).await,
        RaftRequest::Append(r) => match raft.append_entries(r).await {
            Ok(resp) => {
                // Anything but "higher vote" means openraft took the sender as its leader.
                if !matches!(resp, AppendEntriesResponse::HigherVote(_)) {
                    liveness.heard_leader();
                }
                wire::append_response(&resp)
            }
            Err(e) => Response::Error {
                message: e.to_string(),
            },
        },
        // Our lease on real votes too: see `Liveness::leader_heard_within_lease`.
        RaftRequest::Vote(r) if liveness.leader_heard_within_lease() => {
            let m = raft.metrics().borrow().clone();
            let last = raft.data_metrics().borrow().last_log;
            tracing::debug!(candidate = ?r.vote, "vote refused: a leader was heard within the lease");
            wire::vote_response(&VoteResponse::new(m.vote, last, false))
        }
        RaftRequest::Vote(r) => match raft.vote(r).await {
            Ok(resp) => wire::vote_response(&resp),
            Err(e) => Response::Error {
                message: e.to_string(),
            },
        },
        RaftRequest::Snapshot(r) => {
            let sender = r.vote;
            match raft.install_snapshot(r).await {
                Ok(resp) => {
                    if resp.vote.leader_id() == sender.leader_id() {
                        liveness.heard_leader();
                    }
                    wire::snapshot_response(&resp)
                }
                Err(e) => Response::Error {
                    message: e.to_string(),
                },
            }
        }
    }
}

/// What an inbound request adds to the peer's counters.
enum Counted {
    /// Votes and control requests (which tools send too: they get no counters).
    Nothing,
    Entries((u64, u64)),
    /// A snapshot chunk's bytes and whether it is the last.
    Chunk(u64, bool),
}

/// One accepted connection: authenticate, then answer requests until the peer goes away
/// or misbehaves (anything that fails to authenticate or decode closes the link).
async fn serve_link(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    raft: Raft<TypeConfig>,
    cfg: NetConfig,
    control: ControlServer,
) {
    let Some(key) = cfg.key.as_ref() else {
        return;
    };
    let mut link = match Link::accept(stream, key, cfg.my_id, cfg.limits).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "peer link refused (authentication failed or not a peer)");
            return;
        }
    };
    // Fetched on the first Raft traffic, so a tool's link adds no member to the metrics.
    let mut counters = None;
    // A `restore` reading an image through this link.
    let mut image = None;
    loop {
        let bytes = match link.recv(cfg.idle_ms).await {
            Ok(b) => b,
            Err(LinkError::Io(_)) | Err(LinkError::Timeout) => return,
            Err(e) => {
                tracing::warn!(%peer, node = link.peer_id, error = %e, "closing peer link");
                return;
            }
        };
        let decoded = wire::decode_request(&bytes).and_then(|r| {
            let counted = match &r {
                Request::Snapshot { data, done, .. } => Counted::Chunk(data.len() as u64, *done),
                Request::Append { .. } => Counted::Entries(entry_bytes(&r)),
                _ => Counted::Nothing,
            };
            Ok((wire::to_raft_request(r)?, counted))
        });
        let (req, counted) = match decoded {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(%peer, node = link.peer_id, error = %e, "undecodable request; closing peer link");
                return;
            }
        };
        let resp = handle(&raft, &control, &cfg.liveness, &mut image, req).await;
        let mut peer_counters = || {
            counters
                .get_or_insert_with(|| cfg.registry.peer(link.peer_id))
                .clone()
        };
        match counted {
            Counted::Nothing => {}
            Counted::Entries((entries, bytes)) => {
                peer_counters().received_entries(entries, bytes);
            }
            // An error answer (a chunk Raft could not take) counts nothing.
            Counted::Chunk(bytes, done) => {
                if matches!(resp, Response::Snapshot { .. }) {
                    peer_counters().received_snapshot_chunk(bytes, done);
                }
            }
        }
        if link.send(&wire::encode_response(&resp)).await.is_err() {
            return;
        }
    }
}

/// Accept peer connections until the runtime shuts down.
pub async fn serve(
    listener: TcpListener,
    raft: Raft<TypeConfig>,
    cfg: NetConfig,
    control: ControlServer,
) {
    let slots = Arc::new(Semaphore::new(cfg.connections_max));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "too many peer connections; refusing");
            continue;
        };
        let (raft, cfg, control) = (raft.clone(), cfg.clone(), control.clone());
        tokio::spawn(async move {
            serve_link(stream, peer, raft, cfg, control).await;
            drop(permit);
        });
    }
}
