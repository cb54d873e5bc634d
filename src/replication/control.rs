//! Operator work that spans members: membership changes, export learners, leadership
//! transfer, digest verification, and serving tree images (whole, or as a delta against
//! a manifest) to `restore`.
//!
//! The leader-side operations run in the daemon that the admin socket (`admin.rs`) talks
//! to; what they need from other members travels as [`ControlRequest`]s over the same
//! authenticated peer links as Raft's RPCs (`network.rs` hands them to [`ControlServer`]).
//!
//! openraft 0.9 has no leadership transfer, so [`Control::transfer_leader`] builds one from
//! what it does have: the leader stops writes and heartbeats, the other voters hold their
//! elections, and the target campaigns once the old leader's lease has run out. Every step
//! is undone on the way out, whether the transfer worked or not.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::{BasicNode, ChangeMembers, Raft, ServerState};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::control_client::call;
use super::elections::Elections;
use super::net_config::NetConfig;
use super::role::Role;
use super::snapshot::delta::{self, Manifest, Piece};
use super::snapshot::hex;
use super::snapshot::SnapshotFile;
use super::state_machine::{DigestAnswer, StateMachine};
use super::wire::{self, ControlRequest, ControlResponse, Response};
use super::TypeConfig;
use crate::config::Limits;
use crate::op::{Batch, Op};
use crate::ship::{self, Ship};

/// The origin of batches proposed by admin commands (daemon runs use odd random ids).
const ADMIN_ORIGIN: u64 = 0;
/// Longest hold or campaign delay a member accepts from a peer.
const CONTROL_DELAY_MS_MAX: u64 = 60_000;

/// A tree image opened for `restore` on one link.
pub struct OpenImage {
    file: Box<SnapshotFile>,
    len: u64,
}

/// Answers control requests from peers and tools.
#[derive(Clone)]
pub struct ControlServer {
    pub raft: Raft<TypeConfig>,
    pub state_machine: StateMachine,
    pub chunk_bytes_max: u64,
    manifest_bytes_max: usize,
    elections: Elections,
    ship: Arc<Ship>,
}

impl ControlServer {
    pub fn new(
        raft: Raft<TypeConfig>,
        state_machine: StateMachine,
        limits: &Limits,
        elections: Elections,
        ship: Arc<Ship>,
    ) -> Self {
        if state_machine.export_until().is_some() {
            // An export's tree is frozen: it must never lead.
            elections.forbid();
        }
        ControlServer {
            raft,
            state_machine,
            chunk_bytes_max: limits.snapshot_chunk_bytes,
            manifest_bytes_max: limits.snapshot_manifest_bytes_max,
            elections,
            ship,
        }
    }

    pub async fn handle(&self, req: ControlRequest, image: &mut Option<OpenImage>) -> Response {
        match self.answer(req, image).await {
            Ok(r) => Response::Control(r),
            Err(message) => Response::Error { message },
        }
    }

    /// The image of the applied tree (built or reused), its length and the index it holds.
    async fn open_image(&self) -> Result<(Box<SnapshotFile>, u64, u64), String> {
        let sm = self.state_machine.clone();
        let snap = tokio::task::spawn_blocking(move || sm.current_image())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("building a tree image: {e}"))?;
        let mut file = snap.snapshot;
        let len = file
            .seek(std::io::SeekFrom::End(0))
            .await
            .map_err(|e| e.to_string())?;
        file.seek(std::io::SeekFrom::Start(0))
            .await
            .map_err(|e| e.to_string())?;
        let applied = snap.meta.last_log_id.map_or(0, |l| l.index);
        // An export's tree is the state at its frozen index, not at the applied one.
        let index = self
            .state_machine
            .export_until()
            .map_or(applied, |until| until.min(applied));
        Ok((file, len, index))
    }

    async fn answer(
        &self,
        req: ControlRequest,
        image: &mut Option<OpenImage>,
    ) -> Result<ControlResponse, String> {
        match req {
            ControlRequest::Digest { index, wait_ms } => {
                let mut applied = self.state_machine.applied_watch();
                let wait = Duration::from_millis(wait_ms.min(CONTROL_DELAY_MS_MAX));
                let _ = tokio::time::timeout(wait, applied.wait_for(|a| *a >= index)).await;
                let now = *applied.borrow();
                let export = self.state_machine.export_until().is_some();
                let (digest, note) = match self.state_machine.digest_at(index) {
                    DigestAnswer::Recorded(d) => (Some(d), String::new()),
                    DigestAnswer::Pending => (
                        None,
                        format!("has not applied index {index} yet (applied {now})"),
                    ),
                    DigestAnswer::Unknown(why) => (None, why),
                };
                Ok(ControlResponse::Digest {
                    applied: now,
                    digest,
                    export,
                    note,
                })
            }
            ControlRequest::HoldElections { ms } => {
                self.elections.hold(ms.min(CONTROL_DELAY_MS_MAX));
                Ok(ControlResponse::Done)
            }
            ControlRequest::Campaign { after_ms } => {
                if self.state_machine.export_until().is_some() {
                    return Err(
                        "this member is an export (its tree is frozen); it cannot lead".into(),
                    );
                }
                let raft = self.raft.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(after_ms.min(CONTROL_DELAY_MS_MAX)))
                        .await;
                    if let Err(e) = raft.trigger().elect().await {
                        tracing::warn!(error = %e, "could not start the election asked for");
                    }
                });
                Ok(ControlResponse::Done)
            }
            ControlRequest::ExportUntil { index } => {
                let m = self.raft.metrics().borrow().clone();
                if m.membership_config
                    .membership()
                    .voter_ids()
                    .any(|v| v == m.id)
                {
                    return Err(format!(
                        "node {} is a voter; only a new, empty member can become an export",
                        m.id
                    ));
                }
                let sm = self.state_machine.clone();
                tokio::task::spawn_blocking(move || sm.set_export_until(index))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                self.elections.forbid();
                Ok(ControlResponse::Done)
            }
            ControlRequest::Describe => Ok(ControlResponse::Described {
                export_until: self.state_machine.export_until(),
            }),
            ControlRequest::ImageOpen => {
                let (file, len, index) = self.open_image().await?;
                *image = Some(OpenImage { file, len });
                Ok(ControlResponse::Image { index, len })
            }
            ControlRequest::ImageOpenDelta { manifest } => {
                let manifest =
                    Manifest::parse(&manifest).map_err(|e| format!("the manifest sent: {e}"))?;
                let (file, _, index) = self.open_image().await?;
                // The delta is written whole into an unlinked scratch file, then read in
                // chunks like an image: a restore may read it at its own pace.
                let scratch = self
                    .state_machine
                    .scratch_file()
                    .map_err(|e| format!("a scratch file for the delta: {e}"))?;
                let mut out =
                    tokio::fs::File::from_std(scratch.try_clone().map_err(|e| e.to_string())?);
                let (tx, mut rx) = tokio::sync::mpsc::channel(2);
                let chunk = self.chunk_bytes_max as usize;
                let encoder = tokio::spawn(async move {
                    delta::encode(file, &manifest, chunk, tx, Arc::default()).await
                });
                loop {
                    let (piece, last) = match rx.recv().await {
                        Some(Piece::Chunk(c)) => (c, false),
                        Some(Piece::Last(c)) => (c, true),
                        Some(Piece::Failed(e)) => return Err(format!("building the delta: {e}")),
                        None => return Err("the delta encoder stopped".into()),
                    };
                    out.write_all(&piece)
                        .await
                        .map_err(|e| format!("writing the delta: {e}"))?;
                    if last {
                        break;
                    }
                }
                out.flush().await.map_err(|e| e.to_string())?;
                let len = encoder.await.map_err(|e| e.to_string())?.delta_bytes;
                *image = Some(OpenImage {
                    file: Box::new(SnapshotFile::complete(scratch)),
                    len,
                });
                Ok(ControlResponse::Image { index, len })
            }
            ControlRequest::PreVote {
                last,
                lease_ms,
                ship_stop_grace_ms,
            } => Ok(ControlResponse::PreVote {
                granted: self.elections.answer_pre_vote(
                    last.as_ref().map(wire::rl),
                    lease_ms,
                    ship_stop_grace_ms,
                ),
            }),
            ControlRequest::Manifest => {
                let sm = self.state_machine.clone();
                let max = self.manifest_bytes_max;
                let data = tokio::task::spawn_blocking(move || sm.manifest(max))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| format!("building the manifest: {e}"))?;
                Ok(ControlResponse::Manifest { data })
            }
            ControlRequest::ShipState => {
                let s = self.ship.status();
                Ok(ControlResponse::Ship {
                    state: s.state.name().to_string(),
                    starts: s.starts,
                })
            }
            ControlRequest::ImageRead { offset, len } => {
                let img = image.as_mut().ok_or("no image is open on this link")?;
                if offset > img.len {
                    return Err(format!("offset {offset} is past the image's end"));
                }
                let n = len.min(self.chunk_bytes_max).min(img.len - offset) as usize;
                let mut data = vec![0u8; n];
                img.file
                    .seek(std::io::SeekFrom::Start(offset))
                    .await
                    .map_err(|e| e.to_string())?;
                img.file
                    .read_exact(&mut data)
                    .await
                    .map_err(|e| format!("reading the tree image: {e}"))?;
                Ok(ControlResponse::ImageData { data })
            }
        }
    }
}

/// The leader-side admin operations of a running node.
pub struct Control {
    /// Held by a leadership transfer: a second one at the same time would undo the
    /// first one's switches when it ends.
    pub transfer: tokio::sync::Mutex<()>,
    pub raft: Raft<TypeConfig>,
    pub elections: Elections,
    pub role: Arc<Role>,
    pub state_machine: StateMachine,
    /// The log: `status` reports how far back it reaches.
    pub log: super::log_store::LogStore,
    pub net: NetConfig,
    pub acks: u64,
    pub limits: Limits,
    pub ship: Arc<Ship>,
}

/// One member's answer in a `verify`.
pub struct MemberDigest {
    pub id: u64,
    pub digest: Option<[u8; 32]>,
    /// An export learner (frozen tree): shown, not compared.
    pub export: bool,
    pub note: String,
}

pub struct Verification {
    pub index: u64,
    pub members: Vec<MemberDigest>,
}

impl Verification {
    /// Every member but the exports recorded a digest and they are all the same.
    pub fn agrees(&self) -> bool {
        let mut compared = self.members.iter().filter(|m| !m.export);
        let first = compared.next().and_then(|m| m.digest);
        first.is_some() && compared.all(|m| m.digest == first)
    }

    pub fn to_json(&self) -> String {
        let members: Vec<serde_json::Value> = self
            .members
            .iter()
            .map(|m| {
                serde_json::json!({
                    "id": m.id,
                    "digest": m.digest.map(|d| hex(&d)),
                    "export": m.export,
                    "note": m.note,
                })
            })
            .collect();
        serde_json::json!({
            "index": self.index,
            "agree": self.agrees(),
            "members": members,
        })
        .to_string()
    }
}

/// After too many ship failures the supervisor hands leadership away with a transfer.
impl ship::Handover for Control {
    fn hand_over(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>> + Send + '_>>
    {
        Box::pin(self.transfer_leader(None))
    }
}

impl Control {
    fn metrics(&self) -> openraft::RaftMetrics<u64, BasicNode> {
        self.raft.metrics().borrow().clone()
    }

    /// A membership change commits once a majority holds it; without one, give up after
    /// `ack_timeout_ms` rather than leave the admin command waiting.
    async fn bounded<T>(&self, f: impl std::future::Future<Output = T>) -> Result<T, String> {
        tokio::time::timeout(Duration::from_millis(self.limits.ack_timeout_ms), f)
            .await
            .map_err(|_| {
                format!(
                    "the change was not committed within {} ms: is a majority of voters up?",
                    self.limits.ack_timeout_ms
                )
            })
    }

    /// Fail unless this node leads, naming the leader to ask instead.
    fn ensure_leader(&self) -> Result<openraft::RaftMetrics<u64, BasicNode>, String> {
        let m = self.metrics();
        if m.state == ServerState::Leader {
            return Ok(m);
        }
        Err(match m.current_leader {
            Some(l) => {
                let addr = m
                    .membership_config
                    .membership()
                    .get_node(&l)
                    .map_or(String::new(), |n| format!(" at {}", n.addr));
                format!(
                    "this node ({}) is not the leader; run the command on node {l}{addr}",
                    m.id
                )
            }
            None => format!(
                "this node ({}) is not the leader and no leader is known",
                m.id
            ),
        })
    }

    fn voters(m: &openraft::RaftMetrics<u64, BasicNode>) -> BTreeSet<u64> {
        m.membership_config.membership().voter_ids().collect()
    }

    /// Add `id` at `addr` as a learner, wait until it has caught up, then make it a voter.
    pub async fn add_member(&self, id: u64, addr: &str) -> Result<String, String> {
        let m = self.ensure_leader()?;
        check_addr(addr)?;
        if Self::voters(&m).contains(&id) {
            return Err(format!("node {id} is already a voter"));
        }
        if let Some(known) = m.membership_config.membership().get_node(&id) {
            // Promoting a learner: an export's tree is frozen, it must never vote or lead.
            // Ask it where the cluster reaches it, whatever address was typed.
            let desc = call(
                &self.net,
                &known.addr,
                ControlRequest::Describe,
                self.limits.peer_io_timeout_ms,
            )
            .await
            .map_err(|e| format!("asking learner {id} what it is: {e}"))?;
            if let ControlResponse::Described {
                export_until: Some(until),
            } = desc
            {
                return Err(format!(
                    "node {id} is an export learner frozen at index {until}; it cannot \
                     become a voter (remove it, wipe its data dir, and add it again)"
                ));
            }
        }
        let timeout = Duration::from_millis(self.limits.member_catchup_timeout_ms);
        let node = BasicNode::new(addr);
        match tokio::time::timeout(timeout, self.raft.add_learner(id, node, true)).await {
            Err(_) => {
                return Err(format!(
                    "node {id} at {addr} did not catch up within {} ms; it stays a learner. \
                     Is it running with --join and the cluster's key? (remove it with \
                     `seguro-fs members remove DATA_DIR {id}`)",
                    self.limits.member_catchup_timeout_ms
                ))
            }
            Ok(Err(e)) => return Err(format!("adding node {id} as a learner: {e}")),
            Ok(Ok(_)) => {}
        }
        let r = self
            .bounded(
                self.raft
                    .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false),
            )
            .await?
            .map_err(|e| format!("making node {id} a voter: {e}"))?;
        Ok(format!(
            "{{\"added\":{id},\"index\":{},\"voters\":{}}}",
            r.log_id.index,
            id_list(
                &r.membership
                    .map(|m| m.voter_ids().collect())
                    .unwrap_or_default()
            )
        ))
    }

    /// Remove voter or learner `id`.
    pub async fn remove_member(&self, id: u64) -> Result<String, String> {
        let m = self.ensure_leader()?;
        let voters = Self::voters(&m);
        let is_learner = m
            .membership_config
            .membership()
            .learner_ids()
            .any(|l| l == id);
        let change = if voters.contains(&id) {
            let left = voters.len() as u64 - 1;
            if left == 0 {
                return Err(format!("node {id} is the last voter"));
            }
            if left - 1 < self.acks {
                return Err(format!(
                    "removing node {id} leaves {left} voters, so no fsync could get the {} \
                     acknowledgements from other voters that --acks asks for; lower --acks \
                     on every member first",
                    self.acks
                ));
            }
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else if is_learner {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        } else {
            return Err(format!("node {id} is not a member"));
        };
        let r = self
            .bounded(self.raft.change_membership(change, false))
            .await?
            .map_err(|e| format!("removing node {id}: {e}"))?;
        Ok(format!("{{\"removed\":{id},\"index\":{}}}", r.log_id.index))
    }

    /// Add `id` at `addr` as a learner; with `until`, first make it an export whose tree
    /// stops at that index.
    pub async fn add_learner(
        &self,
        id: u64,
        addr: &str,
        until: Option<u64>,
    ) -> Result<String, String> {
        let m = self.ensure_leader()?;
        check_addr(addr)?;
        let membership = m.membership_config.membership();
        if membership.get_node(&id).is_some() {
            return Err(format!("node {id} is already a member"));
        }
        if let Some(until) = until {
            let applied = m.last_applied.map_or(0, |l| l.index);
            if m.purged.is_some() && until < applied {
                return Err(format!(
                    "--until-index {until} is in the compacted part of the log: a new \
                     learner starts from an image of the current state (index {applied}), \
                     so the export can stop at {applied} or later"
                ));
            }
            call(
                &self.net,
                addr,
                ControlRequest::ExportUntil { index: until },
                self.limits.peer_io_timeout_ms,
            )
            .await
            .map_err(|e| format!("making node {id} an export: {e}"))?;
        }
        let r = self
            .bounded(self.raft.add_learner(id, BasicNode::new(addr), false))
            .await?
            .map_err(|e| format!("adding learner {id}: {e}"))?;
        Ok(format!(
            "{{\"learner\":{id},\"index\":{},\"until_index\":{}}}",
            r.log_id.index,
            until.map_or("null".into(), |u| u.to_string())
        ))
    }

    /// Hand leadership to `to` (or to the most caught-up other voter).
    pub async fn transfer_leader(&self, to: Option<u64>) -> Result<String, String> {
        let m = self.ensure_leader()?;
        let voters = Self::voters(&m);
        let others: Vec<u64> = voters.iter().copied().filter(|v| *v != m.id).collect();
        let matched = |m: &openraft::RaftMetrics<u64, BasicNode>, id: u64| {
            m.replication
                .as_ref()
                .and_then(|r| r.get(&id).copied().flatten())
                .map_or(0, |l| l.index)
        };
        let to = match to {
            Some(t) if t == m.id => return Err(format!("node {t} already leads")),
            Some(t) if !voters.contains(&t) => return Err(format!("node {t} is not a voter")),
            Some(t) => t,
            None => *others
                .iter()
                .max_by_key(|id| matched(&m, **id))
                .ok_or("there is no other voter to hand leadership to")?,
        };
        let addr = m
            .membership_config
            .membership()
            .get_node(&to)
            .map(|n| n.addr.clone())
            .ok_or_else(|| format!("node {to} has no address"))?;
        let _one = self
            .transfer
            .try_lock()
            .map_err(|_| "another leadership transfer is under way".to_string())?;
        let l = &self.limits;
        // The old leader's lease on the followers is the longest election timeout.
        let lease_ms = super::election_timeout_max_ms(l);
        let timeout_ms = l.transfer_timeout_ms;
        let started = Instant::now();

        // The ship stops first (its mount turns read-only now): the new leader's ship must
        // not start while this one runs.
        let ship_stop = Instant::now();
        self.role.begin_transfer();
        if self.ship.enabled()
            && !self
                .ship
                .wait_not_running(self.ship.grace_ms() + l.ack_timeout_ms)
                .await
        {
            tracing::warn!("the ship did not stop in time; transferring anyway (it was killed)");
        }
        self.raft.runtime_config().heartbeat(false);
        // Off until the transfer is over, then for a grace period: this node must not
        // campaign against the target it is handing over to.
        let pause = self.elections.pause();
        let result = async {
            // The target must hold everything this leader has before it campaigns, or
            // the voters would refuse it (and acknowledged writes could be at risk).
            // Against the live last index: batches accepted before the pause are still
            // being proposed.
            let mut metrics = self.raft.metrics();
            let caught_up = tokio::time::timeout(
                Duration::from_millis(timeout_ms),
                metrics.wait_for(|m| matched(m, to) >= m.last_log_index.unwrap_or(0)),
            )
            .await
            .is_ok_and(|r| r.is_ok());
            if !caught_up {
                return Err(format!(
                    "node {to} did not catch up with this leader's log within {timeout_ms} ms"
                ));
            }
            for other in others.iter().filter(|o| **o != to) {
                let Some(n) = m.membership_config.membership().get_node(other) else {
                    continue;
                };
                // Long enough for the target's campaign (after the lease) to finish;
                // short, so a failed transfer leaves no voter without elections for long.
                let hold = ControlRequest::HoldElections {
                    ms: lease_ms * 3 + l.heartbeat_ms,
                };
                if let Err(e) = call(&self.net, &n.addr, hold, l.peer_io_timeout_ms).await {
                    // Not fatal: that voter may campaign too, and either can win.
                    tracing::warn!(node = other, error = %e, "could not ask a voter to hold elections");
                }
            }
            let campaign = ControlRequest::Campaign {
                after_ms: lease_ms + l.heartbeat_ms,
            };
            call(&self.net, &addr, campaign, l.peer_io_timeout_ms)
                .await
                .map_err(|e| format!("asking node {to} to campaign: {e}"))?;
            let led = tokio::time::timeout(
                Duration::from_millis(timeout_ms),
                metrics.wait_for(|m| m.current_leader == Some(to)),
            )
            .await
            .is_ok_and(|r| r.is_ok());
            if led {
                Ok(())
            } else {
                Err(format!("node {to} did not take over within {timeout_ms} ms"))
            }
        }
        .await;
        self.raft.runtime_config().heartbeat(true);
        drop(pause);
        self.role.end_transfer();
        result?;
        let moved_ms = started.elapsed().as_millis();
        let downtime = match self.ship.enabled() {
            true => self.ship_downtime(&addr, ship_stop).await,
            false => None,
        };
        Ok(format!(
            "{{\"leader\":{to},\"ms\":{moved_ms},\"ship_downtime_ms\":{}}}",
            downtime.map_or("null".into(), |d| d.to_string())
        ))
    }

    /// Wait for the new leader's ship to run; ms since this node's ship began to stop.
    /// None if it does not run within `transfer_timeout_ms`.
    async fn ship_downtime(&self, addr: &str, stopped_at: Instant) -> Option<u64> {
        let deadline = Instant::now() + Duration::from_millis(self.limits.transfer_timeout_ms);
        while Instant::now() < deadline {
            let r = call(
                &self.net,
                addr,
                ControlRequest::ShipState,
                self.limits.peer_io_timeout_ms,
            )
            .await;
            if let Ok(ControlResponse::Ship { state, .. }) = r {
                if state == ship::State::Running.name() {
                    return Some(stopped_at.elapsed().as_millis() as u64);
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// Propose a digest barrier and collect every member's digest at its index.
    pub async fn verify(&self) -> Result<Verification, String> {
        let m = self.ensure_leader()?;
        let barrier = Batch {
            origin: ADMIN_ORIGIN,
            seq: 0,
            ops: vec![Op::Digest],
        };
        let r = tokio::time::timeout(
            Duration::from_millis(self.limits.ack_timeout_ms),
            self.raft.client_write(barrier),
        )
        .await
        .map_err(|_| "the digest barrier was not applied in time".to_string())?
        .map_err(|e| format!("proposing the digest barrier: {e}"))?;
        let index = r.log_id.index;
        let nodes: BTreeMap<u64, String> = m
            .membership_config
            .membership()
            .nodes()
            .map(|(id, n)| (*id, n.addr.clone()))
            .collect();
        let mut members = Vec::new();
        for (id, addr) in nodes {
            let answer = if id == m.id {
                // The leader answers client_write after applying, so the barrier is here.
                match self.state_machine.digest_at(index) {
                    DigestAnswer::Recorded(d) => Ok((Some(d), false, String::new())),
                    DigestAnswer::Pending => Ok((None, false, "not applied yet".into())),
                    DigestAnswer::Unknown(why) => Ok((None, false, why)),
                }
            } else {
                let req = ControlRequest::Digest {
                    index,
                    wait_ms: self.limits.ack_timeout_ms,
                };
                match call(&self.net, &addr, req, self.limits.ack_timeout_ms * 2).await {
                    Ok(ControlResponse::Digest {
                        digest,
                        export,
                        note,
                        ..
                    }) => Ok((digest, export, note)),
                    Ok(other) => Err(format!("unexpected answer {other:?}")),
                    Err(e) => Err(e),
                }
            };
            let (digest, export, note) =
                answer.unwrap_or_else(|e| (None, false, format!("unreachable: {e}")));
            members.push(MemberDigest {
                id,
                digest,
                export,
                note,
            });
        }
        Ok(Verification { index, members })
    }
}

fn check_addr(addr: &str) -> Result<(), String> {
    let ok = addr
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if ok {
        Ok(())
    } else {
        Err(format!("{addr:?} is not HOST:PORT"))
    }
}

fn id_list(ids: &BTreeSet<u64>) -> String {
    let v: Vec<String> = ids.iter().map(u64::to_string).collect();
    format!("[{}]", v.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verification_agrees_only_when_every_member_has_the_same_digest() {
        let md = |id, d: Option<u8>| MemberDigest {
            id,
            digest: d.map(|b| [b; 32]),
            export: false,
            note: String::new(),
        };
        let v = |members| Verification { index: 9, members };
        assert!(v(vec![md(1, Some(1)), md(2, Some(1))]).agrees());
        let frozen = MemberDigest {
            export: true,
            ..md(3, None)
        };
        assert!(v(vec![md(1, Some(1)), frozen, md(2, Some(1))]).agrees());
        assert!(!v(vec![md(1, Some(1)), md(2, Some(2))]).agrees());
        assert!(!v(vec![md(1, Some(1)), md(2, None)]).agrees());
        assert!(!v(vec![]).agrees());
        let j = v(vec![md(1, Some(0xab)), md(2, None)]).to_json();
        assert!(
            j.starts_with("{\"index\":9,\"agree\":false,\"members\":[{\"id\":1,\"digest\":\"abab"),
            "{j}"
        );
        assert!(
            j.ends_with("{\"id\":2,\"digest\":null,\"export\":false,\"note\":\"\"}]}"),
            "{j}"
        );
    }
}
