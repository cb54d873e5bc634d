//! When this node may start an election of its own.
//!
//! openraft 0.9 has no pre-vote: a member that missed heartbeats campaigns as soon as its
//! timer runs out, and with an up-to-date log it can depose a healthy leader (whose ship
//! then loses its commits). Three things here hold elections back:
//!
//! - a *pause* while this node cannot hear its leader through no fault of the leader's:
//!   installing a snapshot blocks its Raft core for as long as the unpack takes (seconds
//!   for a large tree); the pause ends a grace period after the install;
//! - a *hold* asked for by a leader handing its leadership to another voter;
//! - *forbidden*, for good, on an export learner, whose tree is frozen.
//!
//! Elections come back only when no pause is active, every hold has run out, and the
//! node is not an export.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::Raft;

use super::TypeConfig;

#[derive(Clone)]
pub struct Elections {
    raft: Raft<TypeConfig>,
    inner: Arc<Inner>,
}

struct Inner {
    /// Each decision and its `elect()` call happen under this lock, so a release cannot
    /// read "no pause" just before a pause begins and switch elections back on after it.
    gate: Mutex<()>,
    epoch: Instant,
    /// Deadline of the latest hold, in ms since `epoch`.
    hold_until_ms: AtomicU64,
    paused: AtomicUsize,
    forbidden: AtomicBool,
    /// How long elections stay off after a pause ends: long enough for the leader's next
    /// heartbeats to reset this node's election timer.
    grace_ms: u64,
}

/// Elections stay off while this lives; dropping it ends the pause after the grace period.
pub struct Pause(Elections);

impl Drop for Pause {
    fn drop(&mut self) {
        // The grace hold starts before the pause ends, so no release sees neither.
        self.0.hold(self.0.inner.grace_ms);
        self.0.inner.paused.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Elections {
    pub fn new(raft: Raft<TypeConfig>, grace_ms: u64) -> Elections {
        Elections {
            raft,
            inner: Arc::new(Inner {
                gate: Mutex::new(()),
                epoch: Instant::now(),
                hold_until_ms: AtomicU64::new(0),
                paused: AtomicUsize::new(0),
                forbidden: AtomicBool::new(false),
                grace_ms,
            }),
        }
    }

    fn now_ms(&self) -> u64 {
        self.inner.epoch.elapsed().as_millis() as u64
    }

    /// Never campaign again (an export learner).
    pub fn forbid(&self) {
        let _g = self.gate();
        self.inner.forbidden.store(true, Ordering::Release);
        self.raft.runtime_config().elect(false);
    }

    /// No election for `ms` from now (later holds extend earlier ones).
    pub fn hold(&self, ms: u64) {
        {
            let _g = self.gate();
            let until = self.now_ms() + ms;
            self.inner.hold_until_ms.fetch_max(until, Ordering::AcqRel);
            self.raft.runtime_config().elect(false);
        }
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            this.release_if_due();
        });
    }

    /// No election until the returned guard is dropped, then for the grace period.
    pub fn pause(&self) -> Pause {
        let _g = self.gate();
        self.inner.paused.fetch_add(1, Ordering::AcqRel);
        self.raft.runtime_config().elect(false);
        Pause(self.clone())
    }

    fn gate(&self) -> std::sync::MutexGuard<'_, ()> {
        self.inner.gate.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn release_if_due(&self) {
        let _g = self.gate();
        let i = &self.inner;
        if i.paused.load(Ordering::Acquire) == 0
            && self.now_ms() >= i.hold_until_ms.load(Ordering::Acquire)
            && !i.forbidden.load(Ordering::Acquire)
        {
            self.raft.runtime_config().elect(true);
        }
    }
}
