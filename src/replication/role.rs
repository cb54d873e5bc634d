//! Leadership as the file system sees it: whether this node's mount is writable, in which
//! term, and the hooks that run when that changes.
//!
//! Writable means: this node is the leader of the current term *and* has applied every
//! entry up to the one that established the term (openraft's `ensure_linearizable`), so its
//! tree shows everything acknowledged under earlier leaders. Losing leadership (a higher
//! term seen, or shutdown) makes the mount read-only at once and bumps `generation`, which
//! fails every fsync that started before.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openraft::{Raft, ServerState};

use super::TypeConfig;

#[derive(Debug, Default)]
pub struct Role {
    writable: AtomicBool,
    /// A leadership transfer is under way: the leader accepts no new writes meanwhile.
    transferring: AtomicBool,
    term: AtomicU64,
    generation: AtomicU64,
}

impl Role {
    pub fn writable(&self) -> bool {
        self.writable.load(Ordering::Acquire) && !self.transferring.load(Ordering::Acquire)
    }

    /// Stop accepting writes for a leadership transfer; fsyncs in flight fail (their
    /// generation is gone), as they would once leadership moves.
    pub fn begin_transfer(&self) {
        self.transferring.store(true, Ordering::Release);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    pub fn transferring(&self) -> bool {
        self.transferring.load(Ordering::Acquire)
    }

    /// The transfer is over (done or abandoned): if this node still leads, it is
    /// writable again.
    pub fn end_transfer(&self) {
        self.transferring.store(false, Ordering::Release);
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

/// Follow openraft's metrics and keep `role` up to date. Runs until Raft shuts down.
pub async fn watch(
    raft: Raft<TypeConfig>,
    me: u64,
    role: Arc<Role>,
    hooks: Arc<dyn LeadershipHooks>,
) {
    let mut metrics = raft.metrics();
    loop {
        let (leads, term) = {
            let m = metrics.borrow_and_update();
            (
                m.state == ServerState::Leader && m.current_leader == Some(me),
                m.current_term,
            )
        };
        // The raw flag: a paused (transferring) leader still has leadership to lose.
        let writable = role.writable.load(Ordering::Acquire);
        if writable && (!leads || term != role.term()) {
            role.writable.store(false, Ordering::Release);
            role.generation.fetch_add(1, Ordering::AcqRel);
            tracing::warn!(
                term,
                "leadership lost: the mount is read-only; unacknowledged writes are dropped"
            );
            hooks.lost();
        }
        if !writable && leads {
            // Writable only once everything of earlier terms is applied here.
            let ready =
                tokio::time::timeout(Duration::from_secs(30), raft.ensure_linearizable()).await;
            let still = {
                let m = raft.metrics().borrow().clone();
                m.state == ServerState::Leader && m.current_term == term
            };
            if matches!(ready, Ok(Ok(_))) && still {
                role.term.store(term, Ordering::Release);
                role.writable.store(true, Ordering::Release);
                tracing::info!(term, "this node leads: the mount is writable");
                hooks.gained();
            } else {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            // Re-check right away: the state may have moved while we waited.
            continue;
        }
        if metrics.changed().await.is_err() {
            if role.writable.load(Ordering::Acquire) {
                role.writable.store(false, Ordering::Release);
                role.generation.fetch_add(1, Ordering::AcqRel);
                hooks.lost();
            }
            return;
        }
    }
}
