//! The write path as the file system sees it, and the only way it reaches replication:
//! accept data ops into the open batch, propose one op alone and learn its result, wait
//! until everything accepted is durable here and on K others, wait for room.
//!
//! [`Pipeline`] is the seam; [`Replicated`] is the real one (group commit, the proposer
//! task, openraft). Every wait on the log, the acknowledgements and leadership lives here,
//! so `fs` holds no runtime, channel or openraft type and is unit-tested with a fake.
//!
//! An fsync's acknowledgements come from [`Matched`], fed the moment a follower's
//! AppendEntries answer arrives (openraft's streams in `network.rs`, early sends in
//! `early.rs`), and are counted with the pure
//! [`super::quorum::acked_voters`]; openraft's server metrics are read only for the term,
//! the state and the voter set (they change with those alone, not with every append).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::metrics::RaftServerMetrics;
use openraft::{BasicNode, Raft, ServerState};
use tokio::runtime::Handle;
use tokio::sync::{oneshot, watch, Notify};

use super::group_commit::GroupCommit;
use super::log_store::FlushState;
use super::proposer::Proposer;
use super::quorum::Matched;
use super::role::Role;
use super::TypeConfig;
use crate::counters::FsyncOutcome;
use crate::op::Op;

/// Why an op proposed alone has no result from the tree.
#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    #[error("not applied within ack_timeout_ms")]
    Timeout,
    #[error("not committed: {0}")]
    Failed(String),
}

/// What the file system needs from replication.
pub trait Pipeline: Send + Sync {
    /// This node may accept new writes: it leads, has caught up, and no transfer runs.
    fn writable(&self) -> bool;
    /// The local log failed for good: nothing new can become durable here.
    fn failed(&self) -> bool;
    /// Add ops to the open batch; `add` runs under the batch lock, so whatever it records
    /// with the seqs it gets (the overlay) is in place before the batch can be applied.
    fn accept(&self, add: &mut dyn FnMut(&mut GroupCommit));
    /// Propose `op` in a batch of its own after everything accepted, wait until it is
    /// applied, and return the tree's errno for it (0: done).
    fn propose_alone(&self, op: Op) -> Result<i32, ProposeError>;
    /// fsync: every op accepted before this call is durable in this node's log and in the
    /// logs of `acks` other voters, all within this node's current term.
    fn durable(&self) -> FsyncOutcome;
    /// Block until `ready()` holds, re-checking as batches are flushed and applied; false
    /// if the log failed or `ack_timeout_ms` passed first.
    fn wait_until(&self, ready: &dyn Fn() -> bool) -> bool;
    /// Leadership was lost: drop what was accepted but never proposed.
    fn drop_unproposed(&self);
}

/// The real pipeline: group commit in front of openraft.
pub struct Replicated {
    rt: Handle,
    group: Arc<Mutex<GroupCommit>>,
    /// Wakes the proposer.
    wake: Arc<Notify>,
    flush_rx: watch::Receiver<FlushState>,
    applied_rx: watch::Receiver<u64>,
    role: Arc<Role>,
    metrics: watch::Receiver<RaftServerMetrics<u64, BasicNode>>,
    matched: Arc<Matched>,
    my_id: u64,
    acks: u64,
    ack_timeout: Duration,
    /// Every batch up to this seq is durable on this node and `acks` others: an fsync
    /// proved it (the only thing a node that stopped leading may still answer 0 for).
    acked_seq: AtomicU64,
}

/// What [`Replicated::start`] wires together.
pub struct PipelineParts {
    pub rt: Handle,
    pub raft: Raft<TypeConfig>,
    pub flush_rx: watch::Receiver<FlushState>,
    pub applied_rx: watch::Receiver<u64>,
    pub role: Arc<Role>,
    pub matched: Arc<Matched>,
    /// Stamped into every batch (which node's mount accepted it).
    pub origin: u64,
    pub my_id: u64,
    pub acks: u64,
    pub limits: crate::config::Limits,
}

impl Replicated {
    /// Build the pipeline and spawn its proposer task on `p.rt`.
    pub fn start(p: PipelineParts) -> Arc<Replicated> {
        let group = Arc::new(Mutex::new(GroupCommit::new(
            p.origin,
            p.limits.entry_bytes_max,
        )));
        let wake = Arc::new(Notify::new());
        p.rt.spawn(
            Proposer {
                raft: p.raft.clone(),
                group: group.clone(),
                wake: wake.clone(),
                flush_rx: p.flush_rx.clone(),
                proposals_inflight_max: p.limits.proposals_inflight_max as u64,
                linger: Duration::from_micros(p.limits.batch_linger_us),
                watch: Duration::from_micros(p.limits.batch_watch_us),
                role: p.role.clone(),
            }
            .run(),
        );
        Arc::new(Replicated {
            rt: p.rt,
            group,
            wake,
            flush_rx: p.flush_rx,
            applied_rx: p.applied_rx,
            role: p.role,
            metrics: p.raft.server_metrics(),
            matched: p.matched,
            my_id: p.my_id,
            acks: p.acks,
            ack_timeout: Duration::from_millis(p.limits.ack_timeout_ms),
            acked_seq: AtomicU64::new(0),
        })
    }

    fn group(&self) -> std::sync::MutexGuard<'_, GroupCommit> {
        self.group.lock().expect("group commit mutex poisoned")
    }

    /// Wait (async) until the local log holds every batch up to `target` durably and
    /// `acks` other voters answered an AppendEntries of this term through it.
    ///
    /// The two arrive in either order; the waiter follows only the one still missing (the
    /// answers first, counted against the append's index, which the log publishes without
    /// a wake-up), so a normal fsync wakes once, on its K-th answer, not also on the
    /// leader's flush before it.
    async fn durable_within_term(&self, target: u64, generation: u64, term: u64) -> FsyncOutcome {
        let mut flush = self.flush_rx.clone();
        let mut role = self.role.subscribe();
        let mut metrics = self.metrics.clone();
        let mut acked = self.matched.subscribe();
        let deposed = || self.role.generation() != generation;
        // openraft stops when the log's fdatasync fails, which may be how a waiter that
        // was not following the flush learns of it.
        let stopped = || {
            if self.flush_rx.borrow().failed {
                FsyncOutcome::LogFailed
            } else {
                FsyncOutcome::Stopped
            }
        };
        loop {
            let (flushed, appended) = {
                let s = flush.borrow_and_update();
                if s.failed {
                    return FsyncOutcome::LogFailed;
                }
                (
                    s.flushed_seq >= target,
                    (s.appended_seq >= target).then_some(s.appended_index),
                )
            };
            if deposed() {
                return FsyncOutcome::NotLeader;
            }
            // `acks` other voters answered an AppendEntries of this term through the
            // append holding `target` (or a later one): they answer only after their own
            // fdatasync, so that means durable there.
            let answered = self.acks == 0 || {
                let m = metrics.borrow_and_update();
                if m.vote.leader_id().term != term || m.state != ServerState::Leader {
                    return FsyncOutcome::NotLeader;
                }
                let voters: Vec<u64> = m.membership_config.membership().voter_ids().collect();
                acked.borrow_and_update();
                appended.is_some_and(|index| {
                    self.matched.acked_voters(&voters, self.my_id, term, index) >= self.acks
                })
            };
            if flushed && answered {
                return FsyncOutcome::Ok;
            }
            // The metrics and the role wake this only for what they decide (term, state,
            // voters).
            tokio::select! {
                r = flush.changed(), if answered => if r.is_err() { return stopped() },
                r = acked.changed(), if !answered => if r.is_err() { return stopped() },
                r = role.changed() => if r.is_err() { return stopped() },
                r = metrics.changed() => if r.is_err() { return stopped() },
            }
        }
    }
}

/// An fsync covering every batch up to `target` on a node that can acknowledge nothing
/// any more (it stopped leading). It succeeds only if an earlier fsync already
/// acknowledged all of it (every batch up to `acked_seq`); anything else fails, even if
/// this node's log holds it: flushed here is not acknowledged by K others.
fn when_not_leading(target: u64, acked_seq: u64, log_failed: bool) -> FsyncOutcome {
    if target <= acked_seq {
        FsyncOutcome::Ok
    } else if log_failed {
        // A failed log fdatasync is what cost the leadership.
        FsyncOutcome::LogFailed
    } else {
        FsyncOutcome::NotLeader
    }
}

impl Pipeline for Replicated {
    fn writable(&self) -> bool {
        self.role.writable()
    }

    fn failed(&self) -> bool {
        self.flush_rx.borrow().failed
    }

    fn accept(&self, add: &mut dyn FnMut(&mut GroupCommit)) {
        let news = {
            let mut g = self.group();
            let before = g.shape();
            add(&mut g);
            g.is_news_since(before)
        };
        // Each wake-up is a runtime thread's; an LMDB commit is several WRITEs in a row.
        if news {
            self.wake.notify_one();
        }
    }

    fn propose_alone(&self, op: Op) -> Result<i32, ProposeError> {
        let (tx, rx) = oneshot::channel();
        self.group().push_alone(op, tx);
        self.wake.notify_one();
        let outcome = self.rt.block_on(async {
            tokio::time::timeout(self.ack_timeout, async {
                let resp_rx = rx
                    .await
                    .map_err(|_| ProposeError::Failed("proposal dropped".into()))?;
                let resp = resp_rx
                    .await
                    .map_err(|_| ProposeError::Failed("raft dropped the proposal".into()))?;
                resp.map_err(|e| ProposeError::Failed(e.to_string()))
            })
            .await
        });
        let resp = outcome.map_err(|_| ProposeError::Timeout)??;
        resp.data
            .errnos
            .first()
            .copied()
            .ok_or_else(|| ProposeError::Failed("the entry was applied without a result".into()))
    }

    fn durable(&self) -> FsyncOutcome {
        let generation = self.role.generation();
        let term = self.role.term();
        let target = {
            let mut g = self.group();
            g.seal();
            g.last_seq()
        };
        if self.role.transferring() {
            // Leadership is being handed over: batches accepted before are still being
            // proposed and flushed, but their acknowledgements are not awaited here, so
            // nothing may be acknowledged (vere should be stopped before a transfer).
            return FsyncOutcome::NotLeader;
        }
        if !self.role.writable() {
            return when_not_leading(
                target,
                self.acked_seq.load(Ordering::Acquire),
                self.flush_rx.borrow().failed,
            );
        }
        self.wake.notify_one();
        let outcome = self.rt.block_on(async {
            tokio::time::timeout(
                self.ack_timeout,
                self.durable_within_term(target, generation, term),
            )
            .await
            .unwrap_or(FsyncOutcome::Timeout)
        });
        if outcome == FsyncOutcome::Ok {
            self.acked_seq.fetch_max(target, Ordering::AcqRel);
        }
        outcome
    }

    fn wait_until(&self, ready: &dyn Fn() -> bool) -> bool {
        if ready() {
            return true;
        }
        let mut applied = self.applied_rx.clone();
        let mut flushed = self.flush_rx.clone();
        self.rt.block_on(async {
            tokio::time::timeout(self.ack_timeout, async {
                loop {
                    if ready() {
                        return true;
                    }
                    if flushed.borrow_and_update().failed {
                        return false;
                    }
                    tokio::select! {
                        r = applied.changed() => if r.is_err() { return false },
                        r = flushed.changed() => if r.is_err() { return false },
                    }
                }
            })
            .await
            .unwrap_or(false)
        })
    }

    fn drop_unproposed(&self) {
        self.group().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node that stopped leading answers 0 only for what an earlier fsync acknowledged.
    #[test]
    fn a_node_that_stopped_leading_acknowledges_only_what_was_acknowledged() {
        use FsyncOutcome::{LogFailed, NotLeader, Ok};
        // (target, acked_seq, log failed) → outcome
        let table = [
            ((0, 0, false), Ok),
            ((5, 5, false), Ok),
            ((4, 5, false), Ok),
            ((5, 5, true), Ok),
            ((6, 5, false), NotLeader),
            ((6, 0, false), NotLeader),
            ((6, 5, true), LogFailed),
        ];
        for ((target, acked, failed), want) in table {
            assert_eq!(
                when_not_leading(target, acked, failed),
                want,
                "target {target}, acked {acked}, log failed {failed}"
            );
        }
    }
}
