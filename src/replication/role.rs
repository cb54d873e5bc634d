//! Leadership as the file system sees it: whether this node's mount is writable, in which
//! term, and the hooks that run when that changes.
//!
//! Writable means: this node is the leader of the current term *and* has applied every
//! entry up to the one that established the term (openraft's `ensure_linearizable`), so its
//! tree shows everything acknowledged under earlier leaders. Losing leadership (a higher
//! term seen, or shutdown) makes the mount read-only at once and bumps `generation`, which
//! fails every fsync that started before.
//!
//! Check-quorum: a leader that has not been acknowledged by a majority for a whole lease
//! (openraft's leader lease, the longest election timeout) stops being writable by itself,
//! exactly as if it had lost leadership, even though openraft 0.9 still calls it leader
//! until it hears a higher term. By then the majority may have elected someone else (see
//! `elections.rs`): this is what bounds how long a deposed leader — and its ship — can
//! believe it leads (docs/SEMANTICS.md, "The supervised ship").

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openraft::{Raft, ServerState};
use tokio::sync::watch;

use super::quorum::{voter_sets, Liveness};
use super::TypeConfig;

#[derive(Debug)]
pub struct Role {
    writable: AtomicBool,
    /// A leadership transfer is under way: the leader accepts no new writes meanwhile.
    transferring: AtomicBool,
    term: AtomicU64,
    generation: AtomicU64,
    /// Bumped on every change of `writable()`, for those who wait on it (the ship).
    changes: watch::Sender<u64>,
}

impl Default for Role {
    fn default() -> Self {
        Role {
            writable: AtomicBool::new(false),
            transferring: AtomicBool::new(false),
            term: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            changes: watch::channel(0).0,
        }
    }
}

impl Role {
    /// Wakes on every change of `writable()`.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    pub fn writable(&self) -> bool {
        self.writable.load(Ordering::Acquire) && !self.transferring.load(Ordering::Acquire)
    }

    /// Stop accepting writes for a leadership transfer; fsyncs in flight fail (their
    /// generation is gone), as they would once leadership moves.
    pub fn begin_transfer(&self) {
        self.transferring.store(true, Ordering::Release);
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.changed();
    }

    pub fn transferring(&self) -> bool {
        self.transferring.load(Ordering::Acquire)
    }

    /// The transfer is over (done or abandoned): if this node still leads, it is
    /// writable again.
    pub fn end_transfer(&self) {
        self.transferring.store(false, Ordering::Release);
        self.changed();
    }
    pub fn term(&self) -> u64 {
        self.term.load(Ordering::Acquire)
    }
    /// Changes every time the node stops being writable.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

/// What the file system does when writability changes.
pub trait LeadershipHooks: Send + Sync {
    /// The node is no longer writable: drop what was never acknowledged.
    fn lost(&self);
    /// The node just became writable.
    fn gained(&self);
}

/// How `watch` decides that a leader still holds its quorum, and how long it waits to
/// become writable.
#[derive(Debug, Clone, Copy)]
pub struct QuorumCheck {
    /// A leader unacknowledged by a majority for this long steps down (openraft's lease).
    pub lease_ms: u64,
    /// How often the check runs when nothing else wakes the watcher.
    pub tick_ms: u64,
    /// `linearizable_timeout_ms`: one wait for the term's first entry to be applied.
    pub linearizable_timeout_ms: u64,
}

/// Follow openraft's metrics (and the quorum's acknowledgements) and keep `role` up to
/// date. Runs until Raft shuts down.
pub async fn watch(
    raft: Raft<TypeConfig>,
    me: u64,
    role: Arc<Role>,
    hooks: Arc<dyn LeadershipHooks>,
    liveness: Arc<Liveness>,
    check: QuorumCheck,
) {
    let lease = Duration::from_millis(check.lease_ms);
    // The server metrics (vote, state, leader, membership) change only with the role, not
    // with every append and apply as openraft's whole metrics do: a wake-up per fsync less.
    let mut metrics = raft.server_metrics();
    loop {
        let (leads, term, quorum) = {
            let m = metrics.borrow_and_update();
            let term = m.vote.leader_id().term;
            let leads = m.state == ServerState::Leader && m.current_leader == Some(me);
            let quorum = leads
                && liveness
                    .quorum_acked_at(&voter_sets(&m.membership_config), me, term)
                    .is_some_and(|t| t.elapsed() < lease);
            (leads, term, quorum)
        };
        // The raw flag: a paused (transferring) leader still has leadership to lose.
        let writable = role.writable.load(Ordering::Acquire);
        if writable && (!leads || term != role.term() || !quorum) {
            role.writable.store(false, Ordering::Release);
            role.generation.fetch_add(1, Ordering::AcqRel);
            role.changed();
            if leads && role.transferring() {
                tracing::info!(
                    term,
                    "leadership transfer: this node no longer sends heartbeats and stops leading"
                );
            } else if leads && term == role.term() {
                tracing::warn!(
                    term,
                    lease_ms = check.lease_ms,
                    "no majority acknowledged this leader for a lease: stepping down (the \
                     mount is read-only, the ship is stopped; unacknowledged writes are dropped)"
                );
            } else {
                tracing::warn!(
                    term,
                    "leadership lost: the mount is read-only; unacknowledged writes are dropped"
                );
            }
            hooks.lost();
        }
        if !writable && leads && quorum {
            // Writable only once everything of earlier terms is applied here.
            let ready = tokio::time::timeout(
                Duration::from_millis(check.linearizable_timeout_ms),
                raft.ensure_linearizable(),
            )
            .await;
            let still = {
                let m = raft.server_metrics().borrow().clone();
                m.state == ServerState::Leader && m.vote.leader_id().term == term
            };
            if matches!(ready, Ok(Ok(_))) && still {
                role.term.store(term, Ordering::Release);
                role.writable.store(true, Ordering::Release);
                role.changed();
                tracing::info!(term, "this node leads: the mount is writable");
                hooks.gained();
            } else {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            // Re-check right away: the state may have moved while we waited.
            continue;
        }
        tokio::select! {
            r = metrics.changed() => {
                if r.is_err() {
                    if role.writable.load(Ordering::Acquire) {
                        role.writable.store(false, Ordering::Release);
                        role.generation.fetch_add(1, Ordering::AcqRel);
                        role.changed();
                        hooks.lost();
                    }
                    return;
                }
            }
            // Acknowledgements arrive without a metrics change; so does their absence.
            _ = tokio::time::sleep(Duration::from_millis(check.tick_ms)) => {}
        }
    }
}
