//! Early replication: a leader sends each entry it appends to its followers while its own
//! fdatasync of that entry runs, not after it (Raft thesis §10.2.1; what DRBD protocol C
//! and TigerBeetle do).
//!
//! openraft 0.9 hands an entry to its replication streams only once the leader's log
//! reported it flushed, so a replicated fsync paid the leader's fdatasync and then the
//! follower's, in a row. Here the log store offers each append's records (already encoded)
//! before it writes them; one task per follower sends them on a link of its own, as an
//! ordinary AppendEntries of the leader's vote, and records the follower's answer in
//! [`Matched`], which is what an fsync counts. Nothing about durability moves:
//!
//! - the fsync still waits for the leader's own fdatasync (`FlushState`) and for K
//!   followers' answers, and a follower answers an AppendEntries only after its own
//!   fdatasync, whichever link brought it;
//! - openraft's commit index and replication progress still come from its own streams'
//!   answers (to requests that may leave out, or be answered from, what was acknowledged
//!   here, below); check-quorum's evidence (`Liveness`) is timed from the send that
//!   carried it, early or not.
//!
//! The thesis's argument assumes a leader never leads its old term again after a restart.
//! openraft 0.9 does re-establish a restarted leader in its own term, and its log may then
//! lack entries its followers received early (a crash, or a failed fdatasync rolled back):
//! its next entries would reuse those log ids for other contents, which followers take as
//! matching. So a cluster member reads a committed vote of its own back uncommitted and
//! leads again only in a new term (`LogOptions::own_vote_uncommitted`).
//!
//! An early AppendEntries is a message the leader could have sent itself: its vote, the
//! log id before the first entry (the log's end before the append), entries of the
//! leader's own term, and the newest commit index openraft's stream asked it to carry
//! (below), if any. A follower that does not hold that log id answers "conflict" like to
//! any probe; everything it acknowledged is then forgotten ([`EarlyAppend::forget`], also
//! called on a conflict of openraft's stream: a member wiped and started empty must not
//! be counted, nor its stream answered, from what its lost log held), and the chain to
//! that follower stops until openraft's stream has caught it up (its answers feed
//! [`Matched`] too).
//!
//! So that the bytes do not travel twice, openraft's stream leaves out of its next
//! AppendEntries the entries the follower already acknowledged here (`network.rs`, via
//! [`EarlyAppend::held_through`] and [`already_held`]). The follower's answer to the
//! shortened request is an answer to the whole one: it holds the shortened request's
//! previous log id, so by log matching it holds everything before it too. A request left
//! with nothing to carry but a commit index the follower already has is answered locally;
//! one with a new commit index waits up to `early_commit_wait_us` for the follower's next
//! early send to carry it ([`EarlyAppend::carry_commit`]), and that send's success is its
//! answer. So a sync point costs one message per follower, not three. openraft times its
//! leader lease from its own request, a little later than the early send that answered
//! it; this build does not rely on that lease (reads go through `ensure_linearizable`,
//! which always travels, and fencing counts `Liveness`, timed from the real send).

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use openraft::metrics::RaftServerMetrics;
use openraft::{BasicNode, LogId, ServerState, Vote};
use tokio::sync::{watch, Notify};

use super::net_config::NetConfig;
use super::quorum::Matched;
use super::transport::Link;
use super::wire::{self, AppendKind, Response};
use crate::config::Limits;

/// One record the log store encoded for an append, shared with the sender tasks.
#[derive(Clone)]
pub struct Record {
    pub log_id: LogId<u64>,
    pub bytes: Arc<Vec<u8>>,
}

/// Early replication on this node: offered every append by the log store, sending only
/// while this node leads.
pub struct EarlyAppend {
    my_id: u64,
    /// What each follower answered last (either path): where a broken chain may start again.
    matched: Arc<Matched>,
    /// Record bytes queued for one follower, at most, while a request to it is under way.
    /// With the request's copy into its frame, about twice this plus `request_bytes_max`
    /// is in memory for a follower at most (queued records are shared by all followers).
    /// 0 turns early replication off.
    bytes_max: u64,
    /// Record bytes one request carries, at most (at least one record).
    request_bytes_max: u64,
    /// How long an append waits for room in a follower's full queue.
    room_wait: Duration,
    /// Signalled when a sender takes records off its queue.
    room: Condvar,
    /// How long a follower that could not be reached is left out of early sends.
    pause: Duration,
    /// How long a commit index waits for an early send to carry it.
    commit_wait: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The term this node leads in, or 0.
    term: u64,
    peers: BTreeMap<u64, Peer>,
    /// An append waits on `EarlyAppend::room`: a sender that takes records signals it
    /// (otherwise it saves the futex call, once per request).
    room_awaited: bool,
}

struct Peer {
    addr: String,
    /// Index after the last entry queued or sent to this follower in `term`, while every
    /// early send since the chain began succeeded (or is still under way).
    next: Option<u64>,
    /// The log id before the first queued record.
    prev: Option<LogId<u64>>,
    queue: VecDeque<Record>,
    queued_bytes: u64,
    /// The last log id this follower acknowledged to an early send in `term`.
    acked: Option<LogId<u64>>,
    /// The newest commit index openraft's stream asked the early sends to carry in `term`.
    commit: Option<LogId<u64>>,
    /// The newest commit index an early send carried and the follower answered success to.
    commit_delivered: Option<LogId<u64>>,
    /// Left out of early sends until then (its link failed to connect).
    paused_until: Option<Instant>,
    /// Wakes this follower's sender task (new records, or the task should stop).
    wake: Arc<Notify>,
    /// Wakes openraft's stream waiting in `held_through` (an answer or a broken chain).
    changed: Arc<Notify>,
}

impl Peer {
    fn new(addr: String) -> Peer {
        Peer {
            addr,
            next: None,
            prev: None,
            queue: VecDeque::new(),
            queued_bytes: 0,
            acked: None,
            commit: None,
            commit_delivered: None,
            paused_until: None,
            wake: Arc::new(Notify::new()),
            changed: Arc::new(Notify::new()),
        }
    }

    /// The queued records the next request carries: as many as fit `bytes_max` (at least
    /// one); the rest wait for the one after.
    fn take(&mut self, bytes_max: u64) -> Vec<Record> {
        let mut bytes = 0;
        let n = self
            .queue
            .iter()
            .take_while(|r| {
                bytes += r.bytes.len() as u64;
                bytes <= bytes_max
            })
            .count()
            .max(1);
        let records: Vec<Record> = self.queue.drain(..n).collect();
        self.queued_bytes -= records.iter().map(|r| r.bytes.len() as u64).sum::<u64>();
        self.prev = records.last().map(|r| r.log_id);
        records
    }

    /// The chain to this follower is broken: nothing queued goes, and the next early send
    /// waits until the follower is known to hold the entry before it.
    fn break_chain(&mut self) {
        self.next = None;
        self.prev = None;
        self.queue.clear();
        self.queued_bytes = 0;
        self.changed.notify_waiters();
    }
}

/// Whether entries starting at index `first` may be sent early to a follower: it must hold
/// the entry before them, either because the early sends so far reach exactly there
/// (`next`, sent or under way) or because it answered an AppendEntries of this `term`
/// through it (`matched`: (term, index) of its last success, from either path).
pub fn continues(next: Option<u64>, matched: Option<(u64, u64)>, term: u64, first: u64) -> bool {
    next == Some(first) || matched.is_some_and(|(t, i)| t == term && i + 1 >= first)
}

/// How many leading entries (their log ids, in order) of an AppendEntries of the term a
/// follower acknowledged `acked` in need not travel again: those at or below it. The
/// follower answered an early send through `acked` after its own fdatasync, and by log
/// matching holds everything of this leader's log before it too.
pub fn already_held(entries: &[LogId<u64>], acked: Option<LogId<u64>>) -> usize {
    let Some(acked) = acked else { return 0 };
    let n = entries
        .iter()
        .take_while(|l| l.index <= acked.index)
        .count();
    // The acknowledged entry, if it is among these, is this very entry (same term, same
    // leader): anything else would mean the two logs are not what we think. Send it all.
    match entries.get(n.wrapping_sub(1)) {
        Some(l) if l.index == acked.index && *l != acked => 0,
        _ => n,
    }
}

impl std::fmt::Debug for EarlyAppend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EarlyAppend")
            .field("my_id", &self.my_id)
            .field("bytes_max", &self.bytes_max)
            .finish_non_exhaustive()
    }
}

impl EarlyAppend {
    pub fn new(my_id: u64, limits: &Limits, matched: Arc<Matched>) -> Arc<EarlyAppend> {
        Arc::new(EarlyAppend {
            my_id,
            matched,
            bytes_max: limits.early_append_bytes_max,
            request_bytes_max: limits.early_request_bytes_max,
            room_wait: Duration::from_millis(limits.early_append_wait_ms),
            room: Condvar::new(),
            pause: Duration::from_millis(limits.early_append_pause_ms),
            commit_wait: Duration::from_micros(limits.early_commit_wait_us),
            state: Mutex::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The log store is about to write `records`, which follow `prev` in its log. Queue
    /// them for every follower the chain reaches; never blocks on the network, but waits
    /// up to `early_append_wait_ms` for room in a follower's queue.
    pub fn offer(&self, prev: Option<LogId<u64>>, records: &[Record]) {
        let (Some(first), Some(last)) = (records.first(), records.last()) else {
            return;
        };
        let bytes: u64 = records.iter().map(|r| r.bytes.len() as u64).sum();
        let mut st = self.lock();
        let term = st.term;
        // Only this node's own new entries, appended as the leader of the term it leads.
        if term == 0
            || first.log_id.leader_id.term != term
            || first.log_id.leader_id.node_id != self.my_id
            || prev.map_or(0, |p| p.index + 1) != first.log_id.index
        {
            return;
        }
        let now = Instant::now();
        let deadline = now + self.room_wait;
        let ids: Vec<u64> = st.peers.keys().copied().collect();
        for id in ids {
            loop {
                if st.term != term {
                    // Deposed while waiting: nothing more goes early in that term.
                    return;
                }
                let Some(peer) = st.peers.get_mut(&id) else {
                    break;
                };
                if peer.paused_until.is_some_and(|t| t > now)
                    || !continues(peer.next, self.matched.get(id), term, first.log_id.index)
                {
                    break;
                }
                if peer.queued_bytes + bytes <= self.bytes_max {
                    if peer.queue.is_empty() {
                        peer.prev = prev;
                    }
                    peer.queue.extend(records.iter().cloned());
                    peer.queued_bytes += bytes;
                    peer.next = Some(last.log_id.index + 1);
                    peer.wake.notify_one();
                    break;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if peer.queue.is_empty() || left.is_zero() {
                    // The follower is slower than the log: openraft's stream carries it.
                    peer.break_chain();
                    break;
                }
                // Its sender makes room when it takes the next request.
                st.room_awaited = true;
                st = self
                    .room
                    .wait_timeout(st, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                st.room_awaited = false;
            }
        }
    }

    /// The last log id `target` acknowledged to an early send of `term`, once the early
    /// sends under way through `upto` have been answered (waiting at most `wait`): what
    /// openraft's stream may leave out of an AppendEntries ending at `upto`.
    pub async fn held_through(
        &self,
        target: u64,
        term: u64,
        upto: u64,
        wait: Duration,
    ) -> Option<LogId<u64>> {
        let deadline = tokio::time::Instant::now() + wait;
        match self
            .wait_for(deadline, || self.settled(target, term, upto))
            .await
        {
            Some(acked) => acked,
            None => {
                // The early link is slower than the stream (a follower that stalls, a link
                // that drops): let the stream carry this follower, unwaited, until it has
                // caught it up and the chain starts again.
                let mut st = self.lock();
                let same_term = st.term == term;
                let peer = st.peers.get_mut(&target).filter(|_| same_term)?;
                peer.break_chain();
                peer.acked.filter(|a| a.leader_id.term == term)
            }
        }
    }

    /// Have the next early send to `target` carry `commit` (openraft's commit index in
    /// `term`) and wait, at most `early_commit_wait_us`, for the follower's success: true
    /// if it was delivered so. False at once without a live early chain to that follower
    /// (nothing would carry it), or when the wait ends: the caller sends it itself.
    pub async fn carry_commit(&self, target: u64, term: u64, commit: LogId<u64>) -> bool {
        let deadline = tokio::time::Instant::now() + self.commit_wait;
        self.wait_for(deadline, || self.carried(target, term, commit))
            .await
            .unwrap_or(false)
    }

    /// Wait until `check` answers (`Ok`) or `deadline` passes (`None`). Until it answers,
    /// `check` names what wakes when its answer may have changed; it is asked again once
    /// the waiter is registered, so a wake-up in between is not missed (nor a follower's
    /// state replaced meanwhile, with a Notify of its own).
    async fn wait_for<T>(
        &self,
        deadline: tokio::time::Instant,
        check: impl Fn() -> Result<T, Arc<Notify>>,
    ) -> Option<T> {
        loop {
            let changed = match check() {
                Ok(answer) => return Some(answer),
                Err(changed) => changed,
            };
            let notified = changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match check() {
                Ok(answer) => return Some(answer),
                Err(again) if Arc::ptr_eq(&again, &changed) => {}
                Err(_) => continue,
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }

    /// What `target` acknowledged early in `term`, or, while early sends that may reach
    /// `upto` are still unanswered, what wakes when one is.
    fn settled(
        &self,
        target: u64,
        term: u64,
        upto: u64,
    ) -> Result<Option<LogId<u64>>, Arc<Notify>> {
        let st = self.lock();
        let Some(peer) = st.peers.get(&target).filter(|_| st.term == term) else {
            return Ok(None);
        };
        let acked = peer.acked.filter(|a| a.leader_id.term == term);
        let acked_next = acked.map_or(0, |a| a.index + 1);
        let unanswered = peer.next.is_some_and(|n| n > acked_next);
        if acked_next > upto || !unanswered {
            Ok(acked)
        } else {
            Err(peer.changed.clone())
        }
    }

    /// Whether an answered early send of `term` carried `commit` to `target` (true), or
    /// none will (false: no live chain); else the next early send is asked to carry it,
    /// and what wakes when one is answered is returned.
    fn carried(&self, target: u64, term: u64, commit: LogId<u64>) -> Result<bool, Arc<Notify>> {
        let mut st = self.lock();
        let same_term = st.term == term;
        let Some(peer) = st.peers.get_mut(&target).filter(|_| same_term) else {
            return Ok(false);
        };
        if peer.commit_delivered >= Some(commit) {
            return Ok(true);
        }
        if peer.next.is_none() {
            return Ok(false);
        }
        if peer.commit < Some(commit) {
            peer.commit = Some(commit);
        }
        Err(peer.changed.clone())
    }

    /// `target` answered openraft's stream with anything but success: what was
    /// acknowledged early is no longer taken for granted, and the chain starts again
    /// from what the stream establishes.
    pub fn forget(&self, target: u64) {
        self.matched.forget(target);
        if let Some(peer) = self.lock().peers.get_mut(&target) {
            peer.acked = None;
            peer.commit_delivered = None;
            peer.break_chain();
        }
    }

    /// Follow this node's role and membership: lead in a term (voters other than this
    /// node get a sender task each) or not at all. Runs until Raft shuts down.
    async fn run(
        self: Arc<Self>,
        mut metrics: watch::Receiver<RaftServerMetrics<u64, BasicNode>>,
        net: NetConfig,
    ) {
        loop {
            let (term, voters) = {
                let m = metrics.borrow_and_update();
                if m.state == ServerState::Leader {
                    let mem = m.membership_config.membership();
                    let voters: BTreeMap<u64, String> = mem
                        .voter_ids()
                        .filter(|id| *id != self.my_id)
                        .filter_map(|id| mem.get_node(&id).map(|n| (id, n.addr.clone())))
                        .collect();
                    (m.vote.leader_id.term, voters)
                } else {
                    (0, BTreeMap::new())
                }
            };
            let mut started = Vec::new();
            {
                let mut st = self.lock();
                if st.term != term {
                    st.term = term;
                    for p in st.peers.values_mut() {
                        p.acked = None;
                        p.commit = None;
                        p.commit_delivered = None;
                        p.paused_until = None;
                        p.break_chain();
                    }
                }
                // Members that left stop; new ones start.
                st.peers.retain(|id, p| {
                    let keep = voters.get(id) == Some(&p.addr);
                    if !keep {
                        p.break_chain();
                        p.wake.notify_one();
                    }
                    keep
                });
                for (id, addr) in &voters {
                    if !st.peers.contains_key(id) {
                        let p = Peer::new(addr.clone());
                        started.push((*id, p.wake.clone()));
                        st.peers.insert(*id, p);
                    }
                }
            }
            for (id, wake) in started {
                tokio::spawn(self.clone().send_loop(id, wake, net.clone()));
            }
            if metrics.changed().await.is_err() {
                let mut st = self.lock();
                st.term = 0;
                for p in st.peers.values_mut() {
                    p.break_chain();
                    p.wake.notify_one();
                }
                st.peers.clear();
                return;
            }
        }
    }

    /// One follower's sender: take everything queued, send it as one AppendEntries, wait
    /// for the answer, repeat. Stops when the follower leaves the membership.
    async fn send_loop(self: Arc<Self>, target: u64, wake: Arc<Notify>, net: NetConfig) {
        let mut link: Option<Link> = None;
        let counters = net.registry.peer(target);
        loop {
            wake.notified().await;
            loop {
                let job = {
                    let mut st = self.lock();
                    let term = st.term;
                    let Some(peer) = st.peers.get_mut(&target) else {
                        return;
                    };
                    if !Arc::ptr_eq(&peer.wake, &wake) {
                        // This member left and came back: a newer task serves it.
                        return;
                    }
                    if peer.queue.is_empty() {
                        break;
                    }
                    let prev = peer.prev;
                    let records = peer.take(self.request_bytes_max);
                    let job = (term, prev, records, peer.commit, peer.addr.clone());
                    if st.room_awaited {
                        self.room.notify_all();
                    }
                    job
                };
                let (term, prev, records, commit, addr) = job;
                let last = records.last().expect("queue was not empty").log_id;
                let vote = Vote::new_committed(term, self.my_id);
                let bytes: u64 = records.iter().map(|r| r.bytes.len() as u64).sum();
                let entries: Vec<Arc<Vec<u8>>> = records.iter().map(|r| r.bytes.clone()).collect();
                drop(records);
                let n = entries.len() as u64;
                let req = wire::encode_request(&wire::append_records(
                    &vote,
                    prev.as_ref(),
                    commit.as_ref(),
                    entries,
                ));
                let sent = Instant::now();
                let answer = send(&mut link, &net, target, &addr, &req).await;
                drop(req);
                if answer.is_ok() {
                    counters.sent_request();
                }
                let success = matches!(
                    answer,
                    Ok(Response::Append {
                        kind: AppendKind::Success,
                        ..
                    })
                );
                if success {
                    // Evidence whatever happened meanwhile: the follower holds this
                    // leader's log of `term` through `last`, durably.
                    self.matched.record(target, term, last.index);
                    // And it answered a request of this leader's term sent at `sent`: the
                    // evidence check-quorum counts (openraft's own requests travel less).
                    net.liveness.acked(target, term, sent);
                    counters.sent_entries(n, bytes);
                    counters.sent_early(n);
                }
                let mut st = self.lock();
                let same_term = st.term == term;
                let Some(peer) = st.peers.get_mut(&target) else {
                    return;
                };
                if !Arc::ptr_eq(&peer.wake, &wake) {
                    // The member left and came back while this was under way: its chain
                    // is a newer task's.
                    return;
                }
                if !same_term {
                    // The term's chains were reset when it changed; this answer is of an
                    // earlier term and says nothing about the new one.
                    continue;
                }
                match answer {
                    Ok(_) if success => {
                        peer.acked = Some(last);
                        if peer.commit_delivered < commit {
                            peer.commit_delivered = commit;
                        }
                        peer.changed.notify_waiters();
                    }
                    Ok(_) => {
                        // A conflict: the follower lacks the entry before these, which the
                        // chain took for held. Whatever it acknowledged may be gone too (a
                        // wiped member): its acknowledgements count again from its next
                        // success, so openraft's stream is not answered from them.
                        drop(st);
                        self.forget(target);
                    }
                    Err(unreachable) => {
                        link = None;
                        if unreachable {
                            peer.paused_until = Some(Instant::now() + self.pause);
                        }
                        peer.break_chain();
                    }
                }
            }
        }
    }
}

/// Run early replication on a thread and runtime of its own, until Raft shuts down.
///
/// The log store offers records from openraft's core, on a runtime worker that then blocks
/// in the log's fdatasync. A sender task of that runtime, woken from there, waits in that
/// worker's queue (tokio's last-woken slot, which other workers do not steal from) until
/// the fdatasync returns, so the overlap this module exists for did not happen: a
/// scheduler trace of 4 KiB fsyncs showed the early sends leaving after the leader's
/// fdatasync. Woken across runtimes, the senders run at once on the other core.
///
/// The runtime is built on the thread itself (a runtime may not be dropped in async code,
/// which a failed spawn would do to one built here); its outcome comes back before this
/// returns.
pub fn spawn_thread(
    early: Arc<EarlyAppend>,
    metrics: watch::Receiver<RaftServerMetrics<u64, BasicNode>>,
    net: NetConfig,
) -> std::io::Result<()> {
    let (built_tx, built_rx) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("seguro-early".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = built_tx.send(Err(e));
                    return;
                }
            };
            let _ = built_tx.send(Ok(()));
            rt.block_on(early.run(metrics, net));
        })?;
    built_rx
        .recv()
        .map_err(|_| std::io::Error::other("the thread ended before building its runtime"))?
}

/// Send one encoded request on `link` (connecting first if needed) and decode the answer.
/// Err(true): the follower could not be reached; Err(false): the link failed mid-way.
async fn send(
    link: &mut Option<Link>,
    net: &NetConfig,
    target: u64,
    addr: &str,
    req: &[u8],
) -> Result<Response, bool> {
    if link.is_none() {
        let key = net.key.as_ref().ok_or(true)?;
        let sock: SocketAddr = tokio::net::lookup_host(addr)
            .await
            .ok()
            .and_then(|mut a| a.next())
            .ok_or(true)?;
        let l = Link::connect(sock, net.bind_ip, key, net.my_id, net.limits)
            .await
            .map_err(|_| true)?;
        if l.peer_id != target {
            return Err(true);
        }
        *link = Some(l);
    }
    let l = link.as_mut().expect("just connected");
    l.send(req).await.map_err(|_| false)?;
    let answer = l.recv(net.limits.io_timeout_ms).await.map_err(|_| false)?;
    wire::decode_response(&answer).map_err(|_| false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    use crate::replication::test_log_id as id;

    /// Early sends continue a chain, or start where the follower is known to be.
    #[test]
    fn an_early_send_starts_only_where_the_follower_holds_the_entry_before() {
        // (next, matched, term, first) → may send
        let table = [
            ((Some(10), None, 3, 10), true),
            ((Some(10), None, 3, 11), false),
            ((Some(9), Some((3, 9)), 3, 10), true),
            ((None, Some((3, 9)), 3, 10), true),
            ((None, Some((3, 8)), 3, 10), false),
            // An answer to another term says nothing about this term's log.
            ((None, Some((2, 9)), 3, 10), false),
            ((None, None, 3, 1), false),
            ((None, None, 3, 10), false),
        ];
        for ((next, matched, term, first), want) in table {
            assert_eq!(
                continues(next, matched, term, first),
                want,
                "next {next:?}, matched {matched:?}, term {term}, first {first}"
            );
        }
    }

    fn record(term: u64, index: u64, bytes: usize) -> Record {
        Record {
            log_id: id(term, index),
            bytes: Arc::new(vec![0; bytes]),
        }
    }

    /// A leader of term 3 with one follower, 2, that answered through index 9.
    fn leading() -> Arc<EarlyAppend> {
        let limits = Limits {
            early_append_bytes_max: 1000,
            ..Limits::default()
        };
        let e = EarlyAppend::new(1, &limits, Arc::new(Matched::default()));
        {
            let mut st = e.lock();
            st.term = 3;
            st.peers.insert(2, Peer::new("127.0.0.2:1".into()));
        }
        e.matched.record(2, 3, 9);
        e
    }

    fn next(e: &EarlyAppend) -> Option<u64> {
        e.lock().peers[&2].next
    }

    /// Only this leader's own new entries are queued, contiguously and within the bound.
    #[test]
    fn offers_queue_only_this_leaders_contiguous_entries_within_the_bound() {
        let e = leading();
        // Another node's entries, or a gap after the log's end: nothing.
        e.offer(
            Some(id(3, 9)),
            &[Record {
                log_id: LogId::new(CommittedLeaderId::new(3, 2), 10),
                bytes: Arc::new(vec![]),
            }],
        );
        e.offer(Some(id(3, 8)), &[record(3, 10, 10)]);
        assert_eq!(next(&e), None);
        // From where the follower answered, then continuing the chain.
        e.offer(Some(id(3, 9)), &[record(3, 10, 100)]);
        e.offer(Some(id(3, 10)), &[record(3, 11, 100), record(3, 12, 100)]);
        assert_eq!(next(&e), Some(13));
        assert_eq!(e.lock().peers[&2].queue.len(), 3);
        // Past the bound the chain breaks: the stream carries the follower from here.
        e.offer(Some(id(3, 12)), &[record(3, 13, 800)]);
        assert_eq!(next(&e), None);
        assert!(e.lock().peers[&2].queue.is_empty());
        e.offer(Some(id(3, 13)), &[record(3, 14, 10)]);
        assert_eq!(next(&e), None, "the follower answered only through 9");
        // Not leading: nothing.
        e.lock().term = 0;
        e.offer(Some(id(3, 9)), &[record(3, 10, 10)]);
        assert_eq!(next(&e), None);
    }

    /// A request takes the queued records that fit its bound, at least one, and leaves
    /// the rest to follow the last one it took.
    #[test]
    fn a_request_takes_what_fits_its_bound() {
        let e = leading();
        e.offer(Some(id(3, 9)), &[record(3, 10, 400), record(3, 11, 400)]);
        e.offer(Some(id(3, 11)), &[record(3, 12, 150)]);
        let mut st = e.lock();
        let p = st.peers.get_mut(&2).unwrap();
        let ids = |r: &[Record]| r.iter().map(|r| r.log_id.index).collect::<Vec<_>>();
        assert_eq!(
            ids(&p.take(100)),
            [10],
            "a record past the bound goes alone"
        );
        assert_eq!((p.prev, p.queued_bytes), (Some(id(3, 10)), 550));
        assert_eq!(ids(&p.take(1000)), [11, 12]);
        assert_eq!((p.prev, p.queued_bytes), (Some(id(3, 12)), 0));
        assert!(p.queue.is_empty());
    }

    /// An append that does not fit a follower's queue waits for its sender to take the
    /// next request, and the chain goes on; if the sender takes nothing within
    /// `early_append_wait_ms`, the chain breaks.
    #[test]
    fn an_append_waits_for_room_then_the_chain_goes_on() {
        let e = leading();
        e.offer(Some(id(3, 9)), &[record(3, 10, 600)]);
        let sender = {
            let e = e.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                let taken = e.lock().peers.get_mut(&2).unwrap().take(1000);
                e.room.notify_all();
                taken.len()
            })
        };
        e.offer(Some(id(3, 10)), &[record(3, 11, 600)]);
        assert_eq!(sender.join().unwrap(), 1);
        assert_eq!(next(&e), Some(12), "queued after the sender made room");
        assert_eq!(e.lock().peers[&2].queue.len(), 1);
        let waited = Instant::now();
        e.offer(Some(id(3, 11)), &[record(3, 12, 600)]);
        assert!(waited.elapsed() >= e.room_wait, "gave the sender its time");
        assert_eq!(next(&e), None, "nothing taken in time: left to the stream");
    }

    /// The stream waits for an early send under way, once: if it is not answered in
    /// time the follower is left to the stream, which then waits no more.
    #[tokio::test]
    async fn a_slow_early_send_is_waited_for_once_then_left_to_the_stream() {
        let e = leading();
        e.offer(Some(id(3, 9)), &[record(3, 10, 10)]);
        assert_eq!(next(&e), Some(11));
        let wait = Duration::from_millis(20);
        assert_eq!(e.held_through(2, 3, 10, wait).await, None);
        assert_eq!(next(&e), None, "an unanswered early send breaks the chain");
        // An answer arriving meanwhile is what the stream may leave out, at once.
        e.offer(Some(id(3, 10)), &[record(3, 11, 10)]);
        assert_eq!(next(&e), None, "the follower answered only through 9");
        e.matched.record(2, 3, 10);
        e.offer(Some(id(3, 10)), &[record(3, 11, 10)]);
        assert_eq!(next(&e), Some(12));
        let waiter = {
            let e = e.clone();
            tokio::spawn(async move { e.held_through(2, 3, 11, Duration::from_secs(60)).await })
        };
        tokio::task::yield_now().await;
        {
            let mut st = e.lock();
            let p = st.peers.get_mut(&2).unwrap();
            p.acked = Some(id(3, 11));
            p.changed.notify_waiters();
        }
        assert_eq!(waiter.await.unwrap(), Some(id(3, 11)));
        // Another term's stream asks about nothing of this one.
        assert_eq!(e.held_through(2, 4, 11, wait).await, None);
    }

    /// A commit index waits for an early send to carry it only while a chain is live, and
    /// counts as delivered only once such a send was answered.
    #[tokio::test]
    async fn a_commit_index_is_carried_only_by_an_answered_early_send() {
        let e = leading();
        // No chain to the follower: nothing would carry it.
        assert!(!e.carry_commit(2, 3, id(3, 9)).await);
        e.offer(Some(id(3, 9)), &[record(3, 10, 10)]);
        assert_eq!(next(&e), Some(11));
        // A live chain but no answer within the wait: the caller sends it itself. The
        // next early send is asked to carry it meanwhile.
        assert!(!e.carry_commit(2, 3, id(3, 9)).await);
        assert_eq!(e.lock().peers[&2].commit, Some(id(3, 9)));
        // Another term's commit index: nothing of this term carries it.
        assert!(!e.carry_commit(2, 4, id(4, 9)).await);
        let waiter = {
            let e = e.clone();
            tokio::spawn(async move { e.carry_commit(2, 3, id(3, 10)).await })
        };
        tokio::task::yield_now().await;
        {
            // What the sender does when the follower answers a send that carried it.
            let mut st = e.lock();
            let p = st.peers.get_mut(&2).unwrap();
            assert_eq!(
                p.commit,
                Some(id(3, 10)),
                "the newest index is the one to carry"
            );
            p.commit_delivered = p.commit;
            p.changed.notify_waiters();
        }
        assert!(waiter.await.unwrap());
        // Older indexes are delivered with it, at once.
        assert!(e.carry_commit(2, 3, id(3, 8)).await);
    }

    /// openraft's stream leaves out only what the follower acknowledged early.
    #[test]
    fn a_stream_request_leaves_out_only_acknowledged_entries() {
        let entries = [id(3, 5), id(3, 6), id(3, 7)];
        // (acked) → entries left out
        let table = [
            (None, 0),
            (Some(id(3, 4)), 0),
            (Some(id(3, 5)), 1),
            (Some(id(3, 6)), 2),
            (Some(id(3, 7)), 3),
            (Some(id(3, 9)), 3),
            // The same index under another leader id: not this log; nothing left out.
            (Some(id(2, 6)), 0),
        ];
        for (acked, want) in table {
            assert_eq!(already_held(&entries, acked), want, "acked {acked:?}");
        }
        assert_eq!(already_held(&[], Some(id(3, 9))), 0);
    }
}
