//! Who has heard whom, and when: the evidence behind pre-vote and check-quorum.
//!
//! Owns two clocks that openraft 0.9 does not expose in a form we can rely on:
//!
//! - on a follower, when it last *accepted* an AppendEntries (or snapshot chunk) from a
//!   leader, taken after openraft handled it, so it is never earlier than openraft's own
//!   vote-lease timestamp;
//! - on a leader, per peer, the *send* time of the latest AppendEntries that peer answered
//!   as a follower of this leader's term (success, partial success or conflict — anything
//!   but "higher vote"). A send time, not a receive time, so the quorum time computed from
//!   it is never later than the moment the followers really heard us.
//!
//! It also owns, on a leader, how far each peer's log durably matches this leader's
//! ([`Matched`]): the evidence behind an fsync's K acknowledgements, recorded the moment an
//! AppendEntries answer arrives, so the fsync waiter wakes from the answer itself rather
//! than after openraft's core has processed it and republished its metrics.
//!
//! The quorum arithmetic is pure ([`quorum_time`], [`granted`], [`acked_voters`]) and
//! table-tested, as raft-rs tests its majority code.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// Every voter set of the effective membership (two during a joint change).
pub fn voter_sets(m: &openraft::StoredMembership<u64, openraft::BasicNode>) -> Vec<Vec<u64>> {
    m.membership()
        .get_joint_config()
        .iter()
        .map(|s| s.iter().copied().collect())
        .collect()
}

/// The latest instant that a majority of every voter set holds (a joint configuration has
/// two sets; each needs its own majority). `heard(id)` is when voter `id` last acknowledged
/// us; `me` counts as `now`. None if some set has no majority that ever answered.
pub fn quorum_time(
    sets: &[Vec<u64>],
    me: u64,
    now: Instant,
    heard: impl Fn(u64) -> Option<Instant>,
) -> Option<Instant> {
    let mut result: Option<Instant> = None;
    for set in sets {
        if set.is_empty() {
            continue;
        }
        let mut times: Vec<Option<Instant>> = set
            .iter()
            .map(|id| if *id == me { Some(now) } else { heard(*id) })
            .collect();
        // Newest first; None (never heard) sorts last.
        times.sort_by(|a, b| b.cmp(a));
        let majority = set.len() / 2 + 1;
        let t = times[majority - 1]?;
        result = Some(result.map_or(t, |r| r.min(t)));
    }
    result
}

/// How many voters other than `me` hold this leader's log through `index`, durably:
/// `matched(id)` is the (leader term, index) peer `id` last answered success for. An answer
/// given to another term says nothing about this term's entries, so it does not count.
pub fn acked_voters(
    matched: impl Fn(u64) -> Option<(u64, u64)>,
    voters: &[u64],
    me: u64,
    term: u64,
    index: u64,
) -> u64 {
    voters
        .iter()
        .filter(|id| **id != me)
        .filter(|id| matched(**id).is_some_and(|(t, i)| t == term && i >= index))
        .count() as u64
}

/// Per peer, the newest (leader term, log index) it acknowledged as appended and
/// fdatasync'd; waiters are woken on every advance.
#[derive(Debug)]
pub struct Matched {
    by_peer: Mutex<BTreeMap<u64, (u64, u64)>>,
    advanced: watch::Sender<u64>,
}

impl Default for Matched {
    fn default() -> Self {
        Matched {
            by_peer: Mutex::default(),
            advanced: watch::channel(0).0,
        }
    }
}

impl Matched {
    /// Peer `id` answered an AppendEntries of `term` with success: its log matches ours
    /// through `index`, and it answers only after its own fdatasync.
    pub fn record(&self, id: u64, term: u64, index: u64) {
        let mut m = self.by_peer.lock().unwrap_or_else(|e| e.into_inner());
        let e = m.entry(id).or_insert((0, 0));
        if (term, index) > *e {
            *e = (term, index);
            drop(m);
            self.advanced.send_modify(|n| *n += 1);
        }
    }

    /// Peer `id` answered that it lacks an entry it acknowledged (its log was lost or
    /// replaced, a wiped member): nothing it answered before counts any more, and it counts
    /// again from its next success.
    pub fn forget(&self, id: u64) {
        let mut m = self.by_peer.lock().unwrap_or_else(|e| e.into_inner());
        m.remove(&id);
    }

    /// What peer `id` last answered success for: (leader term, index).
    pub fn get(&self, id: u64) -> Option<(u64, u64)> {
        let m = self.by_peer.lock().unwrap_or_else(|e| e.into_inner());
        m.get(&id).copied()
    }

    /// Wakes on every advance of any peer.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.advanced.subscribe()
    }

    /// [`acked_voters`] over what was recorded.
    pub fn acked_voters(&self, voters: &[u64], me: u64, term: u64, index: u64) -> u64 {
        let m = self.by_peer.lock().unwrap_or_else(|e| e.into_inner());
        acked_voters(|id| m.get(&id).copied(), voters, me, term, index)
    }
}

/// Whether the voters in `yes` (this node included by the caller if it votes for itself)
/// form a majority of every voter set.
pub fn granted(sets: &[Vec<u64>], yes: &[u64]) -> bool {
    sets.iter()
        .filter(|s| !s.is_empty())
        .all(|set| set.iter().filter(|id| yes.contains(id)).count() > set.len() / 2)
}

/// The two clocks, shared by the network (which feeds them) and elections and roles (which
/// read them).
#[derive(Debug)]
pub struct Liveness {
    /// When this node last accepted traffic from a leader (its start counts as that: a
    /// member that just started must wait a whole lease before it campaigns or votes).
    heard_leader: Mutex<Instant>,
    /// Per peer: (leader term of the request, its send time).
    acked: Mutex<BTreeMap<u64, (u64, Instant)>>,
    /// openraft's leader lease (the longest election timeout).
    lease: Duration,
}

impl Liveness {
    pub fn new(lease_ms: u64) -> Liveness {
        Liveness {
            heard_leader: Mutex::new(Instant::now()),
            acked: Mutex::default(),
            lease: Duration::from_millis(lease_ms),
        }
    }

    /// This node accepted a leader's traffic less than a lease ago (or started less than
    /// a lease ago). Such a node grants no vote: openraft keeps its own vote lease in
    /// memory only, so right after a restart it would grant one at once, and a voter that
    /// acknowledged the old leader a moment before its restart would let a new leader be
    /// elected inside the old one's lease (docs/SEMANTICS.md, "The supervised ship").
    pub fn leader_heard_within_lease(&self) -> bool {
        self.last_heard_leader().elapsed() < self.lease
    }

    pub fn heard_leader(&self) {
        *self.heard_leader.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    /// When this node last accepted traffic from a leader.
    pub fn last_heard_leader(&self) -> Instant {
        *self.heard_leader.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Peer `id` answered, as a follower of `term`, a request sent at `sent`.
    pub fn acked(&self, id: u64, term: u64, sent: Instant) {
        let mut m = self.acked.lock().unwrap_or_else(|e| e.into_inner());
        let e = m.entry(id).or_insert((term, sent));
        if (term, sent) > *e {
            *e = (term, sent);
        }
    }

    /// The latest instant a majority of `sets` acknowledged this node as leader of `term`.
    pub fn quorum_acked_at(&self, sets: &[Vec<u64>], me: u64, term: u64) -> Option<Instant> {
        let m = self.acked.lock().unwrap_or_else(|e| e.into_inner());
        quorum_time(sets, me, Instant::now(), |id| {
            m.get(&id).filter(|(t, _)| *t == term).map(|(_, at)| *at)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (voter sets, this node, ms ago each voter acked, the expected quorum time's age).
    type QuorumRow<'a> = (&'a [Vec<u64>], u64, &'a [Option<u64>], Option<u64>);
    /// (voter sets, the voters that said yes, granted).
    type GrantRow<'a> = (&'a [Vec<u64>], &'a [u64], bool);

    /// `ago[i]`: how many ms ago voter i+1 acked (None: never).
    fn qt(sets: &[Vec<u64>], me: u64, ago: &[Option<u64>]) -> Option<u64> {
        let now = Instant::now() + Duration::from_secs(100);
        quorum_time(sets, me, now, |id| {
            ago[(id - 1) as usize].map(|ms| now - Duration::from_millis(ms))
        })
        .map(|t| (now - t).as_millis() as u64)
    }

    #[test]
    fn quorum_time_is_the_majority_th_newest_ack() {
        let three = vec![vec![1, 2, 3]];
        let five = vec![vec![1, 2, 3, 4, 5]];
        // (sets, me, acks ms ago per voter, expected ms ago)
        let table: &[QuorumRow] = &[
            // Leader alone is not a majority of 3.
            (&three, 1, &[None, None, None], None),
            // One follower is enough with the leader.
            (&three, 1, &[None, Some(40), None], Some(40)),
            (&three, 1, &[None, Some(40), Some(10)], Some(10)),
            (&three, 1, &[None, Some(900), Some(700)], Some(700)),
            // Five: the leader plus the two newest followers.
            (
                &five,
                1,
                &[None, Some(5), Some(50), Some(500), None],
                Some(50),
            ),
            (&five, 1, &[None, Some(5), None, None, None], None),
            // A leader outside the voter set counts for nothing.
            (&three, 9, &[Some(30), Some(20), Some(10)], Some(20)),
            // Single voter: itself.
            (&[vec![1]], 1, &[None], Some(0)),
        ];
        for (sets, me, ago, want) in table {
            assert_eq!(
                qt(sets, *me, ago),
                *want,
                "sets {sets:?} me {me} acks {ago:?}"
            );
        }
    }

    #[test]
    fn a_joint_configuration_needs_both_majorities() {
        let joint = vec![vec![1, 2, 3], vec![1, 4, 5]];
        // Old set fresh (2 at 10 ms), new set only at 300 ms (4): the older one counts.
        assert_eq!(
            qt(&joint, 1, &[None, Some(10), None, Some(300), None]),
            Some(300)
        );
        assert_eq!(qt(&joint, 1, &[None, Some(10), None, None, None]), None);
    }

    #[test]
    fn granted_needs_a_majority_of_every_set() {
        let table: &[GrantRow] = &[
            (&[vec![1, 2, 3]], &[1], false),
            (&[vec![1, 2, 3]], &[1, 3], true),
            (&[vec![1, 2, 3, 4]], &[1, 3], false),
            (&[vec![1, 2, 3, 4]], &[1, 3, 4], true),
            (&[vec![1, 2, 3], vec![1, 4, 5]], &[1, 2], false),
            (&[vec![1, 2, 3], vec![1, 4, 5]], &[1, 2, 4], true),
            (&[vec![1]], &[1], true),
        ];
        for (sets, yes, want) in table {
            assert_eq!(granted(sets, yes), *want, "sets {sets:?} yes {yes:?}");
        }
    }

    /// (voters, this node, what each voter 1..=5 matched as (term, index), term, index,
    /// expected count).
    type AckRow<'a> = (&'a [u64], u64, &'a [Option<(u64, u64)>], u64, u64, u64);

    #[test]
    fn acked_voters_counts_other_voters_matched_in_this_term() {
        let table: &[AckRow] = &[
            // Nobody answered yet.
            (&[1, 2, 3], 1, &[None, None, None], 3, 10, 0),
            // The leader never counts itself.
            (&[1, 2, 3], 1, &[Some((3, 99)), None, None], 3, 10, 0),
            // At the index or past it counts; short of it does not.
            (
                &[1, 2, 3],
                1,
                &[None, Some((3, 10)), Some((3, 9))],
                3,
                10,
                1,
            ),
            (
                &[1, 2, 3],
                1,
                &[None, Some((3, 12)), Some((3, 10))],
                3,
                10,
                2,
            ),
            // An answer to an older or newer term says nothing about this term's entries.
            (
                &[1, 2, 3],
                1,
                &[None, Some((2, 50)), Some((4, 50))],
                3,
                10,
                0,
            ),
            // Only voters count: a learner (4) matching is no acknowledgement.
            (&[1, 2, 3], 1, &[None, None, None, Some((3, 10))], 3, 10, 0),
            // Five voters, three of them there.
            (
                &[1, 2, 3, 4, 5],
                2,
                &[Some((7, 5)), None, Some((7, 6)), Some((7, 4)), Some((7, 5))],
                7,
                5,
                3,
            ),
            // A leader outside the voter set (being removed) counts every voter.
            (&[2, 3], 1, &[None, Some((1, 1)), Some((1, 1))], 1, 1, 2),
        ];
        for (voters, me, matched, term, index, want) in table {
            let got = acked_voters(
                |id| matched.get((id - 1) as usize).copied().flatten(),
                voters,
                *me,
                *term,
                *index,
            );
            assert_eq!(
                got, *want,
                "voters {voters:?} me {me} matched {matched:?} term {term} index {index}"
            );
        }
    }

    #[test]
    fn matched_keeps_the_newest_answer_and_wakes_waiters() {
        let m = Matched::default();
        let mut rx = m.subscribe();
        m.record(2, 3, 10);
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        // A late answer to an earlier request moves nothing and wakes nobody.
        m.record(2, 3, 8);
        assert!(!rx.has_changed().unwrap());
        assert_eq!(m.acked_voters(&[1, 2, 3], 1, 3, 10), 1);
        // A newer term replaces the old one: its entries may differ.
        m.record(2, 4, 2);
        assert_eq!(m.acked_voters(&[1, 2, 3], 1, 3, 10), 0);
        assert_eq!(m.acked_voters(&[1, 2, 3], 1, 4, 2), 1);
        // A member that lost its log counts again only from its next answer, even a lower one.
        m.forget(2);
        assert_eq!(m.get(2), None);
        assert_eq!(m.acked_voters(&[1, 2, 3], 1, 4, 2), 0);
        m.record(2, 4, 1);
        assert_eq!(m.get(2), Some((4, 1)));
    }

    #[test]
    fn acks_of_another_term_do_not_count() {
        let l = Liveness::new(625);
        let sets = vec![vec![1, 2, 3]];
        l.acked(2, 4, Instant::now());
        assert!(l.quorum_acked_at(&sets, 1, 5).is_none());
        assert!(l.quorum_acked_at(&sets, 1, 4).is_some());
        // A later term replaces the earlier one.
        l.acked(2, 5, Instant::now());
        assert!(l.quorum_acked_at(&sets, 1, 5).is_some());
        assert!(l.quorum_acked_at(&sets, 1, 4).is_none());
    }
}
