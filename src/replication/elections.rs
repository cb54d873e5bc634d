//! When this node may start an election of its own: a pre-vote of our own, and the holds
//! and pauses that keep a member from campaigning at a bad moment.
//!
//! openraft 0.9 has no pre-vote: a member whose timer runs out campaigns with a higher term,
//! and even when the voters refuse it (the leader lease), its higher term reaches the leader
//! in the next AppendEntries answer and deposes it. With a ship supervised on the leader,
//! every such election is a ship restart. So openraft's own election timer is switched off
//! for good (`enable_elect: false` in its config, `replication/mod.rs`), and
//! [`Elections::run`] campaigns in its place, only when
//!
//! - this node has heard no leader for a randomized `[lease, lease + spread]` (the lease
//!   is openraft's leader lease, the longest election timeout), and
//! - a majority of every voter set, asked with a [`ControlRequest::PreVote`], has not heard
//!   a leader for a lease either and holds no newer log ([`Elections::answer_pre_vote`]),
//! - and nothing holds elections here: a *pause* while this node cannot hear its leader
//!   through no fault of the leader's (a snapshot install blocks the Raft core for the whole
//!   unpack; the pause ends a grace period after it), a *hold* asked for by a leader handing
//!   its leadership to another voter, or *forbidden*, for good, on an export learner.
//!
//! A member that restarts, was partitioned away or catches up therefore never deposes a
//! healthy leader: the others still hear it and refuse the pre-vote, and the member's term
//! does not move. The same lease also bounds how long a deposed leader can still believe it
//! leads (see `role.rs`, check-quorum), which is what lets a new leader's ship start safely.
//!
//! [`ControlRequest::PreVote`]: super::wire::ControlRequest::PreVote

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::{LogId, Raft, ServerState};

use super::net_config::NetConfig;
use super::quorum::{granted, voter_sets, Liveness};
use super::wire::{ControlRequest, ControlResponse};
use super::TypeConfig;

#[derive(Clone)]
pub struct Elections {
    raft: Raft<TypeConfig>,
    inner: Arc<Inner>,
}

/// The timing every member must share: openraft's lease and our campaign window.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// openraft's leader lease (the longest election timeout): how long a voter refuses to
    /// vote after hearing its leader, and how long this node waits before a pre-vote.
    pub lease_ms: u64,
    /// The campaign delay is drawn from `[lease_ms, lease_ms + spread_ms]`, so two
    /// members seldom campaign at once.
    pub spread_ms: u64,
    /// How often the campaign condition is checked.
    pub tick_ms: u64,
    /// The ship's stop grace: part of the failover freeze, so it must be the same on every
    /// member, like the lease (a pre-vote from a member whose values differ is refused).
    pub ship_stop_grace_ms: u64,
}

struct Inner {
    epoch: Instant,
    /// Deadline of the latest hold, in ms since `epoch`.
    hold_until_ms: AtomicU64,
    paused: AtomicUsize,
    forbidden: AtomicBool,
    /// How long elections stay off after a pause ends: long enough for the leader's next
    /// heartbeats to reset this node's clock.
    grace_ms: u64,
    liveness: Arc<Liveness>,
    timing: Timing,
}

/// Elections stay off while this lives; dropping it ends the pause after the grace period.
pub struct Pause(Elections);

impl Drop for Pause {
    fn drop(&mut self) {
        // The grace hold starts before the pause ends, so no check sees neither.
        self.0.hold(self.0.inner.grace_ms);
        self.0.inner.paused.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A random number for the campaign delay: std's per-process random hash keys, so no
/// dependency and no two members drawing the same sequence.
fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish()
}

impl Elections {
    pub fn new(
        raft: Raft<TypeConfig>,
        grace_ms: u64,
        liveness: Arc<Liveness>,
        timing: Timing,
    ) -> Elections {
        Elections {
            raft,
            inner: Arc::new(Inner {
                epoch: Instant::now(),
                hold_until_ms: AtomicU64::new(0),
                paused: AtomicUsize::new(0),
                forbidden: AtomicBool::new(false),
                grace_ms,
                liveness,
                timing,
            }),
        }
    }

    fn now_ms(&self) -> u64 {
        self.inner.epoch.elapsed().as_millis() as u64
    }

    /// Never campaign again (an export learner).
    pub fn forbid(&self) {
        self.inner.forbidden.store(true, Ordering::Release);
    }

    /// No election for `ms` from now (later holds extend earlier ones).
    pub fn hold(&self, ms: u64) {
        let until = self.now_ms() + ms;
        self.inner.hold_until_ms.fetch_max(until, Ordering::AcqRel);
    }

    /// No election until the returned guard is dropped, then for the grace period.
    pub fn pause(&self) -> Pause {
        self.inner.paused.fetch_add(1, Ordering::AcqRel);
        Pause(self.clone())
    }

    fn may_campaign(&self) -> bool {
        let i = &self.inner;
        i.paused.load(Ordering::Acquire) == 0
            && self.now_ms() >= i.hold_until_ms.load(Ordering::Acquire)
            && !i.forbidden.load(Ordering::Acquire)
    }

    /// Whether this node has evidence of a live leader within the lease: as a follower, it
    /// accepted a leader's traffic; as the leader, a majority acknowledged it.
    fn leader_is_fresh(&self) -> bool {
        let lease = Duration::from_millis(self.inner.timing.lease_ms);
        let m = self.raft.metrics().borrow().clone();
        if m.state == ServerState::Leader {
            let sets = voter_sets(&m.membership_config);
            return self
                .inner
                .liveness
                .quorum_acked_at(&sets, m.id, m.current_term)
                .is_some_and(|t| t.elapsed() < lease);
        }
        self.inner.liveness.last_heard_leader().elapsed() < lease
    }

    /// A peer asks whether it may campaign: yes if this node heard no leader for a lease
    /// and the candidate's log is at least as new as ours (the rule a real vote applies),
    /// and its timing is ours: the failover freeze is only safe when every member's lease
    /// and ship stop grace are the same.
    pub fn answer_pre_vote(
        &self,
        candidate_last: Option<LogId<u64>>,
        lease_ms: u64,
        ship_stop_grace_ms: u64,
    ) -> bool {
        let t = self.inner.timing;
        if (lease_ms, ship_stop_grace_ms) != (t.lease_ms, t.ship_stop_grace_ms) {
            tracing::warn!(
                candidate_lease_ms = lease_ms,
                candidate_ship_stop_grace_ms = ship_stop_grace_ms,
                lease_ms = t.lease_ms,
                ship_stop_grace_ms = t.ship_stop_grace_ms,
                "pre-vote refused: the candidate's election_timeout_min_ms or ship_stop_grace_ms \
                 differs from this node's; they must be the same on every member"
            );
            return false;
        }
        if self.leader_is_fresh() {
            return false;
        }
        let mine = self.raft.data_metrics().borrow().last_log;
        candidate_last >= mine
    }

    /// Campaign when the leader is gone and a majority agrees (see the module doc). Runs
    /// until Raft shuts down.
    pub async fn run(self, net: NetConfig) {
        let t = self.inner.timing;
        let delay = || {
            let spread = random_u64() % (t.spread_ms + 1);
            Duration::from_millis(t.lease_ms + spread)
        };
        let mut wait = delay();
        let mut last_attempt: Option<Instant> = None;
        let mut metrics = self.raft.metrics();
        loop {
            tokio::time::sleep(Duration::from_millis(t.tick_ms)).await;
            if metrics.has_changed().is_err() {
                return; // Raft shut down.
            }
            let m = metrics.borrow_and_update().clone();
            let voter = m
                .membership_config
                .membership()
                .voter_ids()
                .any(|v| v == m.id);
            if m.state == ServerState::Leader || !voter || m.running_state.is_err() {
                continue;
            }
            let since = self
                .inner
                .liveness
                .last_heard_leader()
                .max(last_attempt.unwrap_or(self.inner.epoch));
            if since.elapsed() < wait || !self.may_campaign() {
                continue;
            }
            last_attempt = Some(Instant::now());
            wait = delay();
            let last = self.raft.data_metrics().borrow().last_log;
            let sets = voter_sets(&m.membership_config);
            let mut asks = tokio::task::JoinSet::new();
            for id in sets
                .iter()
                .flatten()
                .copied()
                .collect::<std::collections::BTreeSet<_>>()
            {
                if id == m.id {
                    continue;
                }
                let Some(node) = m.membership_config.membership().get_node(&id) else {
                    continue;
                };
                let (net, addr) = (net.clone(), node.addr.clone());
                let req = ControlRequest::PreVote {
                    last: last.as_ref().map(super::wire::wl),
                    lease_ms: t.lease_ms,
                    ship_stop_grace_ms: t.ship_stop_grace_ms,
                };
                // Answered at once by a live peer; a dead one must not hold the round up
                // for longer than half a lease.
                let ttl = t.lease_ms / 2;
                asks.spawn(async move {
                    let r = tokio::time::timeout(
                        Duration::from_millis(ttl),
                        super::control_client::call(&net, &addr, req, ttl),
                    )
                    .await;
                    (
                        id,
                        matches!(r, Ok(Ok(ControlResponse::PreVote { granted: true }))),
                    )
                });
            }
            let mut yes = vec![m.id];
            while let Some(r) = asks.join_next().await {
                if let Ok((id, true)) = r {
                    yes.push(id);
                }
            }
            if !granted(&sets, &yes) {
                tracing::debug!(
                    ?yes,
                    "pre-vote lost: a leader is still heard, or our log is behind"
                );
                continue;
            }
            // Something may have changed during the round (a leader was heard).
            if self.inner.liveness.last_heard_leader().elapsed() < Duration::from_millis(t.lease_ms)
                || !self.may_campaign()
            {
                continue;
            }
            tracing::info!(
                term = m.current_term,
                ?yes,
                "no leader heard for a lease and the pre-vote won: campaigning"
            );
            if self.raft.trigger().elect().await.is_err() {
                return;
            }
        }
    }
}
