//! The proposer task: hands sealed batches to openraft, in seq order, and decides when an
//! open batch is closed (group commit).
//!
//! openraft 0.9 appends and flushes proposals one at a time on the leader, so throughput
//! comes from batching: while an append is being flushed, new ops pile up in the open
//! batch; when the flush lands, everything that piled up becomes the next entry. A batch
//! is also closed early when it reaches `entry_bytes_max` (group_commit.rs) or when an fsync
//! needs it. At most `proposals_inflight_max` proposals wait for their flush at once.
//!
//! While the log is idle a small open batch lingers up to `batch_linger_us` before it is
//! closed: the FSYNC that follows a commit's WRITEs closes it sooner, so a sync point
//! costs one log flush (and one replication round) instead of two in a row.
//!
//! While batches keep being proposed this task *watches* the group: it looks at it every
//! `batch_watch_us` on a timer instead of being woken by each batch that opens (vere's
//! WRITEs), so a sync point wakes it once, for its FSYNC. A period with nothing proposed
//! ends the watch, and the next batch to open wakes it again. An unsynced WRITE reaches
//! the log within `batch_watch_us` + `batch_linger_us` (12 ms by default) once the flushes
//! in flight have landed. The watch's period is not the linger's: a 2 ms watch timer fired
//! every three LMDB commits and cost what it saved.
//!
//! A data batch's outcome (applied, or not committed) is looked at whenever this task runs
//! ([`Outcomes`]), not by a task of its own: that task's wake-up and poll were one more per
//! sync point on the leader.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::Raft;
use tokio::sync::{oneshot, watch, Notify};
use tokio::time::Instant;

use super::group_commit::GroupCommit;
use super::log_store::FlushState;
use super::role::Role;
use super::TypeConfig;

pub struct Proposer {
    pub raft: Raft<TypeConfig>,
    pub group: Arc<Mutex<GroupCommit>>,
    pub wake: Arc<Notify>,
    pub flush_rx: watch::Receiver<FlushState>,
    pub proposals_inflight_max: u64,
    pub linger: Duration,
    /// The watch's period (`batch_watch_us`).
    pub watch: Duration,
    pub role: Arc<Role>,
}

/// Data batches' outcomes from openraft, oldest first: nobody waits for them, but one that
/// was not committed is logged. Checked each time the proposer runs; they complete in log
/// order, so the check stops at the first still pending.
struct Outcomes<T, E> {
    pending: VecDeque<oneshot::Receiver<Result<T, E>>>,
}

/// Outcomes kept unchecked at most; older ones are handed to a task of their own (a
/// proposer that stays idle after a burst checks nothing until it next runs). Above the
/// batches a sustained write keeps in flight (the 64 MiB overlay window of 1 MiB entries).
const OUTCOMES_PENDING_MAX: usize = 256;

impl<T: Send + 'static, E: std::fmt::Display + Send + 'static> Outcomes<T, E> {
    fn new() -> Self {
        Outcomes {
            pending: VecDeque::new(),
        }
    }

    fn push(&mut self, rx: oneshot::Receiver<Result<T, E>>) {
        self.pending.push_back(rx);
        while self.pending.len() > OUTCOMES_PENDING_MAX {
            let rx = self.pending.pop_front().expect("longer than the bound");
            tokio::spawn(async move { report(rx.await.ok()) });
        }
    }

    /// Report the outcomes that arrived.
    fn check(&mut self) {
        while let Some(rx) = self.pending.front_mut() {
            let outcome = match rx.try_recv() {
                Err(oneshot::error::TryRecvError::Empty) => return,
                Ok(r) => Some(r),
                Err(oneshot::error::TryRecvError::Closed) => None,
            };
            self.pending.pop_front();
            report(outcome);
        }
    }
}

impl<T, E> Drop for Outcomes<T, E> {
    /// The proposer stops (Raft stopped, the log failed): say how many outcomes were never
    /// learned, rather than drop them silently.
    fn drop(&mut self) {
        if !self.pending.is_empty() {
            tracing::warn!(
                batches = self.pending.len(),
                "the proposer stopped before learning whether these data batches were committed"
            );
        }
    }
}

/// Log a data batch that was not committed (its fsyncs fail on their own).
fn report<T, E: std::fmt::Display>(outcome: Option<Result<T, E>>) {
    match outcome {
        Some(Ok(_)) => {}
        Some(Err(e)) => tracing::warn!(error = %e, "a data batch was not committed"),
        None => tracing::warn!("raft dropped a data batch without answering"),
    }
}

/// The proposer's watch over the group while it is busy: until `until` it looks at the
/// group on its own timer, so a batch opening need not wake it (`GroupCommit::set_watched`).
/// Renewed while batches keep being proposed; it ends after a whole period without any.
#[derive(Debug, Default, PartialEq)]
struct Watch {
    until: Option<Instant>,
    proposed: bool,
}

impl Watch {
    /// At `now`: a watch that ran out is renewed if something was proposed during it and
    /// ends otherwise. Some(false): it ended, and the group must be told.
    fn tick(&mut self, now: Instant, period: Duration) -> Option<bool> {
        if self.until.is_none_or(|w| w > now) {
            return None;
        }
        let renewed = std::mem::take(&mut self.proposed);
        if renewed {
            self.until = Some(now + period);
            None
        } else {
            self.until = None;
            Some(false)
        }
    }

    /// A batch is being proposed at `now`. Some(true): a watch starts, and the group must
    /// be told. With no linger there is nothing to watch for: every batch goes at once.
    fn proposing(&mut self, now: Instant, period: Duration, linger: Duration) -> Option<bool> {
        self.proposed = true;
        if self.until.is_some() || linger.is_zero() {
            return None;
        }
        self.until = Some(now + period);
        Some(true)
    }
}

impl Proposer {
    /// Run until Raft shuts down or the log fails.
    pub async fn run(mut self) {
        let mut proposed_seq = 0u64;
        let mut generation = self.role.generation();
        let mut watch = Watch::default();
        let mut outcomes = Outcomes::new();
        loop {
            outcomes.check();
            let flushed = *self.flush_rx.borrow_and_update();
            if self.role.generation() != generation {
                // Leadership was lost: proposals of the old term will never be flushed by
                // this leader, so stop counting them as in flight.
                generation = self.role.generation();
                proposed_seq = flushed.flushed_seq;
            }
            if flushed.failed {
                // Nothing can become durable any more; unproposed ops are dropped
                // (their fsyncs fail with EIO through the flush state).
                self.group
                    .lock()
                    .expect("group commit mutex poisoned")
                    .clear();
                return;
            }
            let inflight = proposed_seq.saturating_sub(flushed.flushed_seq);
            let now = Instant::now();
            let mut linger_until = None;
            // Whether a flush landing would let something be proposed: sealed batches held
            // back by the in-flight limit, or ops piling up behind an append. Otherwise
            // flushes do not wake this task (one wake-up less per fsync); the next op's
            // `wake` or the watch does, and the flush state is read afresh then.
            let mut flush_matters = inflight >= self.proposals_inflight_max;
            let next = {
                let mut p = self.group.lock().expect("group commit mutex poisoned");
                if watch.tick(now, self.watch) == Some(false) {
                    // Quiet for a whole period: the next batch to open wakes this task.
                    p.set_watched(false);
                }
                let next = if flush_matters {
                    None
                } else {
                    flush_matters = p.has_open() && inflight > 0;
                    match (p.take_sealed(), p.opened_at()) {
                        (Some(s), _) => Some(s),
                        // The log is idle: close the batch once it has lingered, rather
                        // than wait for more.
                        (None, Some(opened)) if inflight == 0 => {
                            let until = Instant::from_std(opened) + self.linger;
                            if until <= now {
                                p.seal();
                                p.take_sealed()
                            } else {
                                linger_until = Some(until);
                                None
                            }
                        }
                        (None, _) => None,
                    }
                };
                if next.is_some() && watch.proposing(now, self.watch, self.linger) == Some(true) {
                    p.set_watched(true);
                }
                next
            };
            let Some(sealed) = next else {
                let deadline = match (linger_until, watch.until) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                let timer = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = self.wake.notified() => {}
                    r = self.flush_rx.changed(), if flush_matters => if r.is_err() { return },
                    _ = timer => {}
                }
                continue;
            };
            // Log order is seq order: the group commit seals in seq order and only this
            // task takes sealed batches.
            debug_assert!(
                sealed.batch.seq > proposed_seq,
                "batch seq {} proposed after {proposed_seq}",
                sealed.batch.seq
            );
            proposed_seq = sealed.batch.seq;
            match self.raft.client_write_ff(sealed.batch).await {
                Ok(rx) => match sealed.reply {
                    Some(tx) => {
                        // The waiter may have timed out and gone; then nobody needs it.
                        let _ = tx.send(rx);
                    }
                    None => outcomes.push(rx),
                },
                Err(fatal) => {
                    tracing::error!(error = %fatal, "raft stopped; no more proposals");
                    self.group
                        .lock()
                        .expect("group commit mutex poisoned")
                        .clear();
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Outcomes leave in log order as they arrive (answered or dropped); one still
    /// pending holds back those behind it; past the bound the oldest go to a task of their
    /// own.
    #[tokio::test]
    async fn data_batch_outcomes_are_checked_in_order_and_bounded() {
        let mut o: Outcomes<(), String> = Outcomes::new();
        let (tx1, rx1) = oneshot::channel();
        let (tx2, rx2) = oneshot::channel();
        let (tx3, rx3) = oneshot::channel::<Result<(), String>>();
        o.push(rx1);
        o.push(rx2);
        o.push(rx3);
        o.check();
        assert_eq!(o.pending.len(), 3, "nothing arrived");
        tx2.send(Err("not leader".into())).unwrap();
        o.check();
        assert_eq!(
            o.pending.len(),
            3,
            "the first still pending holds the rest back"
        );
        tx1.send(Ok(())).unwrap();
        o.check();
        assert_eq!(
            o.pending.len(),
            1,
            "the first two arrived; the third is pending"
        );
        drop(tx3);
        o.check();
        assert!(o.pending.is_empty(), "a dropped one leaves too");

        let senders: Vec<_> = (0..OUTCOMES_PENDING_MAX + 5)
            .map(|_| {
                let (tx, rx) = oneshot::channel::<Result<(), String>>();
                o.push(rx);
                tx
            })
            .collect();
        assert_eq!(o.pending.len(), OUTCOMES_PENDING_MAX);
        drop(senders);
        o.check();
        assert!(o.pending.is_empty());
    }

    const PERIOD: Duration = Duration::from_millis(10);
    const LINGER: Duration = Duration::from_millis(2);

    /// The watch starts with a proposal, is renewed by a period with proposals, and ends
    /// after a quiet one (then the next batch to open wakes the proposer again); no linger,
    /// no watch.
    #[test]
    fn the_watch_lasts_while_batches_are_proposed() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);

        let mut w = Watch::default();
        assert_eq!(w.tick(ms(0), PERIOD), None, "no watch, nothing to end");
        assert_eq!(w.proposing(ms(0), PERIOD, LINGER), Some(true), "starts");
        assert_eq!(w.until, Some(ms(10)));
        assert_eq!(w.proposing(ms(3), PERIOD, LINGER), None, "already watching");
        assert_eq!(w.tick(ms(5), PERIOD), None, "not run out yet");
        assert_eq!(w.until, Some(ms(10)));
        assert_eq!(
            w.tick(ms(10), PERIOD),
            None,
            "run out after proposals: renewed"
        );
        assert_eq!(w.until, Some(ms(20)));
        assert_eq!(
            w.tick(ms(21), PERIOD),
            Some(false),
            "a quiet period ends it"
        );
        assert_eq!(w, Watch::default());
        assert_eq!(w.tick(ms(40), PERIOD), None, "ended stays ended");
        assert_eq!(
            w.proposing(ms(41), PERIOD, LINGER),
            Some(true),
            "starts again"
        );

        let mut w = Watch::default();
        assert_eq!(
            w.proposing(ms(0), PERIOD, Duration::ZERO),
            None,
            "no linger"
        );
        assert_eq!(w.until, None);
        assert_eq!(w.tick(ms(100), PERIOD), None);
    }
}
