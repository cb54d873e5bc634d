//! openraft's network: one authenticated link per (this node → target) client, reconnected
//! on failure, and the listener that serves peers' RPCs into the local Raft.
//!
//! A client carries one RPC at a time (openraft drives each replication stream
//! sequentially), so the bytes in flight per client are bounded by `frame_bytes_max`; the
//! early sender (`early.rs`) adds up to `early_request_bytes_max` on a link of its own.
//!
//! Entry and snapshot bytes are counted here, per peer and direction (`metrics.rs`), as
//! they travel: for an incremental snapshot, the delta's bytes.
//!
//! Snapshots: a member that already holds a tree is asked for its manifest and sent a
//! delta against it (`snapshot/delta.rs`) instead of the tree image openraft hands over;
//! an empty member (or one that cannot answer) gets the image, in openraft's chunks. On
//! the receiving side the server rebuilds the tree from a delta when its last chunk
//! arrives, before telling openraft the transfer is done, so that a delta that no longer
//! fits the tree fails the transfer (retried with a fresh manifest), not the install.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, RPCError, RaftError, ReplicationClosed,
    StreamingError, Unreachable,
};
use openraft::network::snapshot_transport::{Chunked, SnapshotTransport};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::storage::Snapshot;
use openraft::{BasicNode, LogId, OptionalSend, Raft, Vote};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::control::{ControlServer, OpenImage};
use super::early;
use super::net_config::NetConfig;
use super::quorum::Liveness;
use super::record;
use super::snapshot;
use super::snapshot::delta::{self, Manifest, Piece};
use super::transport::{Link, LinkError};
use super::wire::{self, ControlRequest, ControlResponse, RaftRequest, Request, Response};
use super::TypeConfig;
use crate::counters::PeerCounters;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct NetErr(String);

/// Creates [`PeerClient`]s.
pub struct Network {
    pub cfg: NetConfig,
    /// Early replication, whose acknowledgements openraft's streams need not send again.
    pub early: Option<Arc<early::EarlyAppend>>,
}

pub struct PeerClient {
    target: u64,
    addr: String,
    cfg: NetConfig,
    early: Option<Arc<early::EarlyAppend>>,
    link: Option<Link>,
    counters: Arc<PeerCounters>,
    /// The length of the whole image being sent in openraft's chunks, for progress.
    image_len: Option<u64>,
    /// The last attempt to connect failed (the member is down or cut off).
    unreachable: bool,
    /// The highest commit index this client's AppendEntries delivered (the target answered
    /// success), with the leader term it was sent in: a request left out entirely for
    /// early acknowledgements must not be the one that would have carried a newer one.
    commit_delivered: Option<(u64, LogId<u64>)>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;
    async fn new_client(&mut self, target: u64, node: &BasicNode) -> PeerClient {
        PeerClient {
            target,
            addr: node.addr.clone(),
            cfg: self.cfg.clone(),
            early: self.early.clone(),
            link: None,
            counters: self.cfg.registry.peer(target),
            image_len: None,
            unreachable: false,
            commit_delivered: None,
        }
    }
}

type CallError = RPCError<u64, BasicNode, RaftError<u64>>;

impl PeerClient {
    async fn link(&mut self) -> Result<&mut Link, Unreachable> {
        if self.link.is_none() {
            let link = self.connect().await;
            self.unreachable = link.is_err();
            self.link = Some(link?);
        }
        Ok(self.link.as_mut().expect("just set"))
    }

    /// A new authenticated link to the target.
    async fn connect(&self) -> Result<Link, Unreachable> {
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
        Ok(link)
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
        ttl: Duration,
        convert: fn(Response) -> Result<T, String>,
    ) -> Result<T, RPCError<u64, BasicNode, E>> {
        self.link().await.map_err(RPCError::Unreachable)?;
        let resp = self.call(req, ttl).await.map_err(RPCError::Network)?;
        convert(resp).map_err(|msg| RPCError::Network(NetworkError::new(&NetErr(msg))))
    }
}

impl PeerClient {
    /// Leave out of `rpc` the entries the target already acknowledged to this leader's
    /// early sends (`early.rs`), waiting up to `wait` for early sends under way: they carry
    /// the same bytes and make the same fdatasync. True if anything was left out.
    async fn leave_out_early(
        &self,
        rpc: &mut AppendEntriesRequest<TypeConfig>,
        wait: Duration,
    ) -> bool {
        let (Some(early), Some(last)) = (&self.early, rpc.entries.last()) else {
            return false;
        };
        let leader = rpc.vote.leader_id();
        if leader.node_id != self.cfg.my_id || !rpc.vote.is_committed() {
            return false;
        }
        let upto = last.log_id.index;
        let acked = early
            .held_through(self.target, leader.term, upto, wait)
            .await;
        let ids: Vec<_> = rpc.entries.iter().map(|e| e.log_id).collect();
        let n = early::already_held(&ids, acked);
        if n == 0 {
            return false;
        }
        rpc.prev_log_id = Some(ids[n - 1]);
        rpc.entries.drain(..n);
        true
    }
}

/// A request of leader `term` carrying `commit` tells the follower nothing new about the
/// commit index when `delivered` (term, commit index) was already answered with success.
fn commit_known(
    term: u64,
    commit: Option<LogId<u64>>,
    delivered: Option<(u64, LogId<u64>)>,
) -> bool {
    match (commit, delivered) {
        (None, _) => true,
        (Some(c), Some((t, d))) => t == term && c <= d,
        (Some(_), None) => false,
    }
}

impl PeerClient {
    /// `vote` is this node's own committed vote: a request it sends as leader.
    fn owns(&self, vote: &Vote<u64>) -> bool {
        vote.leader_id().node_id == self.cfg.my_id && vote.is_committed()
    }

    fn delivered(&self, term: u64, commit: Option<LogId<u64>>) -> bool {
        commit_known(term, commit, self.commit_delivered)
    }

    fn commit_was_delivered(&mut self, term: u64, commit: Option<LogId<u64>>) {
        if let Some(c) = commit {
            if !self.delivered(term, Some(c)) {
                self.commit_delivered = Some((term, c));
            }
        }
    }
}

/// Consecutive failures of one snapshot chunk before the transfer is given up (openraft
/// starts it again later, with a fresh manifest), and the wait after the first.
const SNAPSHOT_CHUNK_TRIES: u32 = 5;
const SNAPSHOT_RETRY_MS: u64 = 20;

type SnapshotResult = Result<SnapshotResponse<u64>, StreamingError<TypeConfig, Fatal<u64>>>;

impl PeerClient {
    /// The target's manifest, or None when it should get the whole image: it holds no
    /// file, or could not answer (an older release closes the link on a request it does
    /// not know; that costs bytes, never correctness). A target that cannot be reached is
    /// an error: openraft backs off and tries again, rather than send a whole tree to a
    /// member that is only restarting.
    async fn manifest(&mut self) -> Result<Option<Manifest>, Unreachable> {
        let ttl = Duration::from_millis(self.cfg.snapshot_install_timeout_ms);
        let req = Request::Control(ControlRequest::Manifest);
        self.link().await?;
        let mut answer = self.call(req.clone(), ttl).await;
        if answer.is_err() {
            // The link may be one the member dropped while it was away: once more on a
            // fresh one (the failed call dropped it).
            self.link().await?;
            answer = self.call(req, ttl).await;
        }
        let why = match answer {
            Ok(Response::Control(ControlResponse::Manifest { data })) => {
                match Manifest::parse(&data) {
                    Ok(m) if m.is_empty() => return Ok(None),
                    Ok(m) => {
                        tracing::info!(
                            target = self.target,
                            bytes = data.len(),
                            "received a manifest"
                        );
                        return Ok(Some(m));
                    }
                    Err(e) => e.to_string(),
                }
            }
            Ok(Response::Error { message }) => message,
            Ok(other) => format!("unexpected answer {other:?}"),
            Err(e) => e.to_string(),
        };
        tracing::warn!(
            target = self.target,
            why,
            "no manifest from the member; sending it the whole tree image"
        );
        Ok(None)
    }

    /// Stream `snapshot` to the target as a delta against `manifest`, in pieces of
    /// openraft's chunk size, each resent as it is after a failure (but the last).
    async fn send_delta(
        &mut self,
        vote: Vote<u64>,
        snapshot: Snapshot<TypeConfig>,
        manifest: Manifest,
        cancel: impl std::future::Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> SnapshotResult {
        use tokio::io::AsyncSeekExt;
        let chunk_bytes = option.snapshot_chunk_size().unwrap_or(4 << 20);
        let Snapshot {
            meta,
            snapshot: mut image,
        } = snapshot;
        let image_len = image
            .seek(std::io::SeekFrom::End(0))
            .await
            .map_err(|e| net_error(format!("reading the tree image: {e}")))?;
        image
            .seek(std::io::SeekFrom::Start(0))
            .await
            .map_err(|e| net_error(format!("reading the tree image: {e}")))?;
        let read = Arc::new(std::sync::atomic::AtomicU64::new(0));
        // Two pieces ahead at most: the encoder reads the image while a piece travels.
        let (tx, mut rx) = tokio::sync::mpsc::channel(2);
        let reading = read.clone();
        let encoder =
            tokio::spawn(
                async move { delta::encode(image, &manifest, chunk_bytes, tx, reading).await },
            );
        let last_ttl = RPCOption::new(Duration::from_millis(self.cfg.snapshot_install_timeout_ms));
        let started = Instant::now();
        let mut cancel = std::pin::pin!(cancel);
        let mut offset = 0u64;
        loop {
            let (data, done) = match rx.recv().await {
                Some(Piece::Chunk(c)) => (c, false),
                Some(Piece::Last(c)) => (c, true),
                Some(Piece::Failed(e)) => {
                    return Err(net_error(format!("building the delta: {e}")))
                }
                None => return Err(net_error("the delta encoder stopped".into())),
            };
            let len = data.len() as u64;
            let req = InstallSnapshotRequest {
                vote,
                meta: meta.clone(),
                offset,
                data,
                done,
            };
            let opt = if done {
                last_ttl.clone()
            } else {
                option.clone()
            };
            let mut tries = 0;
            let resp = loop {
                let sent = tokio::select! {
                    biased;
                    closed = &mut cancel => return Err(closed.into()),
                    r = self.install_snapshot(req.clone(), opt.clone()) => r,
                };
                match sent {
                    Ok(r) => break r,
                    Err(e) => {
                        tries += 1;
                        tracing::warn!(target = self.target, offset, error = %e, "sending an incremental snapshot chunk failed");
                        // The last chunk is answered after the member rebuilt its tree: a
                        // failure there is most likely its refusal (the tree moved), which
                        // the same delta would meet again. Start over with a new manifest.
                        if done || tries >= SNAPSHOT_CHUNK_TRIES {
                            return Err(match e {
                                RPCError::Unreachable(u) => u.into(),
                                e => net_error(e.to_string()),
                            });
                        }
                        tokio::time::sleep(Duration::from_millis(SNAPSHOT_RETRY_MS << tries)).await;
                    }
                }
            };
            self.counters.transfer_to_go(
                image_len.saturating_sub(read.load(std::sync::atomic::Ordering::Relaxed)),
            );
            if resp.vote > vote || done {
                if done {
                    let stats = encoder.await.unwrap_or_default();
                    tracing::info!(
                        target = self.target,
                        image_bytes = stats.image_bytes,
                        sent_bytes = stats.delta_bytes,
                        copied_bytes = stats.copied_bytes,
                        ms = started.elapsed().as_millis() as u64,
                        "sent an incremental snapshot"
                    );
                }
                return Ok(SnapshotResponse::new(resp.vote));
            }
            offset += len;
        }
    }
}

fn net_error(why: String) -> StreamingError<TypeConfig, Fatal<u64>> {
    NetworkError::new(&NetErr(why)).into()
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn full_snapshot(
        &mut self,
        vote: Vote<u64>,
        snapshot: Snapshot<TypeConfig>,
        cancel: impl std::future::Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> SnapshotResult {
        if self.unreachable && self.link.is_none() {
            // The member was down at the last try, and openraft asks again every 500 ms
            // while it stays down. Give the image up before connecting, so its build (which
            // pauses applies) stops within a MiB instead of walking the tree for the time a
            // connect takes to fail; if the member is back, the next try builds afresh.
            drop(snapshot);
            self.link().await?;
            return Err(net_error(format!(
                "node {} is reachable again: the next try sends a fresh image",
                self.target
            )));
        }
        let sent = match self.manifest().await? {
            Some(m) => self.send_delta(vote, snapshot, m, cancel, option).await,
            None => {
                use tokio::io::AsyncSeekExt;
                let mut snapshot = snapshot;
                self.image_len = snapshot.snapshot.seek(std::io::SeekFrom::End(0)).await.ok();
                let sent = Chunked::send_snapshot(self, vote, snapshot, cancel, option).await;
                self.image_len = None;
                sent
            }
        };
        self.counters.transfer_ended();
        sent
    }

    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, CallError> {
        let term = rpc.vote.leader_id().term;
        // How far the follower's log matches ours once it answers success (it answers
        // after its fdatasync): the end of openraft's request, however much of it travels.
        let last = rpc.entries.last().map(|e| e.log_id).or(rpc.prev_log_id);
        // openraft times the whole call out after `hard_ttl`: a wait for early answers
        // takes at most half of it, and the request travels within what is left.
        let started = Instant::now();
        let trimmed = self.leave_out_early(&mut rpc, option.hard_ttl() / 2).await;
        if trimmed && rpc.entries.is_empty() && self.delivered(term, rpc.leader_commit) {
            // The follower acknowledged every entry of this request to the early sends, as
            // a follower of this term and after its fdatasync (early.rs already recorded
            // that in `Matched`), and the commit index the request carries was delivered
            // before: the early answer is the answer, and nothing need travel. That is one
            // message fewer per follower per sync point. No send time goes to `liveness`:
            // nothing was sent now (the early send recorded its own).
            return Ok(AppendEntriesResponse::Success);
        }
        if rpc.entries.is_empty() && (trimmed || self.commit_delivered.is_some()) {
            // A request of this stream (a client that delivered before: openraft's
            // leadership checks use a fresh client each, and always travel) that would
            // carry only a new commit index. The follower's next early send carries it, if
            // one comes soon; the follower's success to that send is then this request's
            // answer too (it held `prev` already and only learns the commit).
            if let (Some(early), Some(commit)) = (&self.early, rpc.leader_commit) {
                if self.owns(&rpc.vote)
                    && !self.delivered(term, Some(commit))
                    && early.carry_commit(self.target, term, commit).await
                {
                    self.commit_was_delivered(term, Some(commit));
                    return Ok(AppendEntriesResponse::Success);
                }
            }
        }
        let ttl = option.hard_ttl().saturating_sub(started.elapsed());
        let req = wire::append_request(&rpc);
        let (entries, bytes) = entry_bytes(&req);
        let sent = Instant::now();
        let resp = self.rpc(req, ttl, wire::to_append_response).await;
        if matches!(
            resp,
            Ok(AppendEntriesResponse::Conflict) | Ok(AppendEntriesResponse::HigherVote(_))
        ) {
            // The follower may not hold what it acknowledged (its log was lost or replaced:
            // a member wiped and started empty answers a heartbeat so). That is no longer
            // taken for granted: the retry carries everything, and no request of this
            // stream is answered from those acknowledgements, nor the commit index taken
            // as delivered.
            if let Some(early) = &self.early {
                early.forget(self.target);
            } else {
                self.cfg.matched.forget(self.target);
            }
            self.commit_delivered = None;
        }
        if let Ok(r) = &resp {
            self.counters.sent_entries(entries, bytes);
            self.counters.sent_request();
            match r {
                AppendEntriesResponse::Success => {
                    if let Some(last) = last {
                        self.cfg.matched.record(self.target, term, last.index);
                    }
                    self.commit_was_delivered(term, rpc.leader_commit);
                }
                AppendEntriesResponse::PartialSuccess(Some(upto)) => {
                    self.cfg.matched.record(self.target, term, upto.index);
                    self.commit_was_delivered(term, rpc.leader_commit);
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
                option.hard_ttl(),
                wire::to_snapshot_response,
            )
            .await;
        if resp.is_ok() {
            let len = rpc.data.len() as u64;
            self.counters.sent_snapshot_chunk(len, rpc.done);
            let to_go = self.image_len.map(|l| l.saturating_sub(rpc.offset + len));
            self.counters.transfer_progress(true, len, to_go);
        }
        resp
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, CallError> {
        self.rpc(
            wire::vote_request(&rpc),
            option.hard_ttl(),
            wire::to_vote_response,
        )
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
        RaftRequest::Snapshot(mut r) => {
            let sender = r.vote;
            let is_delta = |r: &InstallSnapshotRequest<TypeConfig>| {
                if r.offset == 0 {
                    delta::opens_delta(r.offset, &r.data)
                } else {
                    control.state_machine.receiving_delta().unwrap_or(false)
                }
            };
            if r.done && is_delta(&r) {
                // Hand openraft the last bytes without finishing, rebuild the tree from the
                // delta, and only then finish with an empty last chunk.
                let end = r.offset + r.data.len() as u64;
                let meta = r.meta.clone();
                r.done = false;
                match raft.install_snapshot(r).await {
                    Ok(resp) if resp.vote > sender => return wire::snapshot_response(&resp),
                    Ok(_) => {}
                    Err(e) => {
                        return Response::Error {
                            message: e.to_string(),
                        }
                    }
                }
                if let Err(e) = control.state_machine.prepare_delta().await {
                    tracing::warn!(error = %e, "refused an incremental snapshot");
                    return Response::Error {
                        message: e.to_string(),
                    };
                }
                r = InstallSnapshotRequest {
                    vote: sender,
                    meta,
                    offset: end,
                    data: vec![],
                    done: true,
                };
            }
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
    /// A snapshot chunk: where it goes, its length, whether it is the last, the length
    /// of the whole image its id names (if it does), and whether it opens a delta.
    Chunk {
        offset: u64,
        bytes: u64,
        done: bool,
        image_bytes: Option<u64>,
        opens_delta: bool,
    },
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
                Request::Snapshot {
                    offset,
                    data,
                    done,
                    meta,
                    ..
                } => Counted::Chunk {
                    offset: *offset,
                    bytes: data.len() as u64,
                    done: *done,
                    image_bytes: snapshot::image_len_of_id(meta.id()),
                    opens_delta: delta::opens_delta(*offset, data),
                },
                Request::Append { .. } => Counted::Entries(entry_bytes(&r)),
                _ => Counted::Nothing,
            };
            let records = match &r {
                Request::Append { entries, .. } => entries.clone(),
                _ => Vec::new(),
            };
            // Decodes and checks every record, or fails the request.
            let req = wire::to_raft_request(r)?;
            // The log store writes them as they are while openraft handles this request,
            // each under the log id its own header names.
            let held = (!records.is_empty()).then(|| {
                cfg.received.hold(
                    records
                        .into_iter()
                        .filter_map(|b| Some((record::log_id(&b)?, b))),
                )
            });
            Ok((req, counted, held))
        });
        let (req, counted, _held) = match decoded {
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
            Counted::Chunk {
                offset,
                bytes,
                done,
                image_bytes,
                opens_delta,
            } => {
                if matches!(resp, Response::Snapshot { .. }) {
                    let c = peer_counters();
                    c.received_snapshot_chunk(bytes, done);
                    if offset == 0 {
                        c.transfer_ended();
                    }
                    // A whole image's length is in its id; a delta's own length is known
                    // only once it ends (its bytes are fewer than the image's). Its first
                    // chunk says which it is; later ones follow the transfer's record.
                    let whole = if offset == 0 {
                        !opens_delta
                    } else {
                        c.transfer().is_some_and(|t| t.to_go_bytes.is_some())
                    };
                    let to_go = image_bytes
                        .filter(|_| whole)
                        .map(|len| len.saturating_sub(offset + bytes));
                    c.transfer_progress(false, bytes, to_go);
                    if done {
                        c.transfer_ended();
                    }
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

#[cfg(test)]
mod tests {
    use super::*;

    use crate::replication::test_log_id as id;

    #[test]
    fn a_request_is_left_out_only_if_its_commit_index_was_delivered() {
        // (leader term, the request's commit, delivered so far, nothing new)
        type Row = (u64, Option<LogId<u64>>, Option<(u64, LogId<u64>)>, bool);
        let table: &[Row] = &[
            // No commit index to carry.
            (3, None, None, true),
            (3, None, Some((3, id(3, 7))), true),
            // Never delivered one.
            (3, Some(id(3, 7)), None, false),
            // Older or equal: known.
            (3, Some(id(3, 6)), Some((3, id(3, 7))), true),
            (3, Some(id(3, 7)), Some((3, id(3, 7))), true),
            // Newer: must travel.
            (3, Some(id(3, 8)), Some((3, id(3, 7))), false),
            // Delivered in another term: says nothing about this one.
            (4, Some(id(3, 7)), Some((3, id(3, 7))), false),
        ];
        for (term, commit, delivered, known) in table {
            assert_eq!(
                commit_known(*term, *commit, *delivered),
                *known,
                "term {term}, commit {commit:?}, delivered {delivered:?}"
            );
        }
    }
}
