//! Records a follower received from its leader, held by log id until its log store appends
//! them, so that it writes the leader's bytes as they are instead of encoding the entry
//! again.
//!
//! openraft hands the log store decoded entries; the records they came from are already in
//! the follower's log format (`record.rs`), checked against their checksum by the decode.
//! Encoding such an entry again cost a follower an rkyv archive, a copy and a BLAKE3 pass
//! of every replicated byte, on the path of every fsync (the follower answers after its
//! append). A record is looked up by its entry's log id, which names one entry: Raft's log
//! matching, which openraft relies on too when it skips entries a follower already holds
//! (a restarted leader leads again only in a new term, `LogOptions::own_vote_uncommitted`,
//! so a log id is never reused for other contents). Debug builds check every record
//! against the encoding it stands for.
//!
//! The decode checks a record's length (a header and its body, nothing after) as well as
//! its checksum, so what is written is one whole record that recovery reads back as such.
//! Each record is held under the log id its own header names.
//!
//! A request's records are held only while openraft handles that request ([`Held`]); by the
//! time it answers, the append that takes them has run (openraft 0.9 queues the append
//! before the response), and what is left (entries the follower already held, a refused
//! request) is dropped. So the records held are those of the requests under way, one per
//! peer link at most, for as long as each is handled (its append's fdatasync included).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use openraft::LogId;

/// (term, leader, index): a log id as a map key.
type Key = (u64, u64, u64);

fn key(id: &LogId<u64>) -> Key {
    (id.leader_id.term, id.leader_id.node_id, id.index)
}

/// The records of the AppendEntries requests under way on this node.
#[derive(Default)]
pub struct Received {
    records: Mutex<HashMap<Key, Arc<Vec<u8>>>>,
    /// Records taken for an append (`seguro_log_records_as_received_total`).
    taken: Arc<AtomicU64>,
}

impl std::fmt::Debug for Received {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Received").finish_non_exhaustive()
    }
}

impl Received {
    /// Counting the records taken into `taken`.
    pub fn counting(taken: Arc<AtomicU64>) -> Received {
        Received {
            records: Mutex::default(),
            taken,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Arc<Vec<u8>>>> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hold `records` (decoded and checked, each under its own log id) until the returned
    /// guard drops.
    pub fn hold(
        self: &Arc<Self>,
        records: impl IntoIterator<Item = (LogId<u64>, Arc<Vec<u8>>)>,
    ) -> Held {
        let mut held = self.lock();
        let records = records
            .into_iter()
            .map(|(id, bytes)| {
                let k = key(&id);
                held.insert(k, bytes.clone());
                (k, bytes)
            })
            .collect();
        Held {
            received: self.clone(),
            records,
        }
    }

    /// The record received for `log_id`, if one is held; it is held no longer.
    pub fn take(&self, log_id: &LogId<u64>) -> Option<Arc<Vec<u8>>> {
        let taken = self.lock().remove(&key(log_id));
        if taken.is_some() {
            self.taken.fetch_add(1, Ordering::Relaxed);
        }
        taken
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// One request's records: dropped from [`Received`] when this drops, if not taken.
pub struct Held {
    received: Arc<Received>,
    records: Vec<(Key, Arc<Vec<u8>>)>,
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.records.is_empty() {
            return;
        }
        let mut held = self.received.lock();
        for (k, bytes) in &self.records {
            // Only this request's own: another link may have brought the same entry since,
            // for a request still under way.
            if held.get(k).is_some_and(|h| Arc::ptr_eq(h, bytes)) {
                held.remove(k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::replication::test_log_id as id;

    #[test]
    fn records_are_held_by_log_id_until_taken_or_their_request_ends() {
        let r = Arc::new(Received::default());
        let held = r.hold([(id(2, 5), Arc::new(vec![5])), (id(2, 6), Arc::new(vec![6]))]);
        assert_eq!(r.take(&id(2, 5)).as_deref(), Some(&vec![5]));
        assert_eq!(r.take(&id(2, 5)), None, "taken once");
        assert_eq!(
            r.take(&id(3, 6)),
            None,
            "another term's entry 6 is another entry"
        );
        assert_eq!(r.taken.load(Ordering::Relaxed), 1, "one record taken");
        assert_eq!(r.len(), 1);
        drop(held);
        assert_eq!(
            r.len(),
            0,
            "what the append did not take leaves with its request"
        );
        assert_eq!(r.take(&id(2, 6)), None);
    }

    /// Two links may bring the same entry at once (an early send and openraft's stream):
    /// the request that ends first leaves the other's record in place.
    #[test]
    fn a_request_that_ends_drops_only_its_own_records() {
        let r = Arc::new(Received::default());
        let first = r.hold([(id(2, 7), Arc::new(vec![7]))]);
        let second = r.hold([(id(2, 7), Arc::new(vec![7]))]);
        drop(first);
        assert_eq!(r.len(), 1, "the second request's record stays");
        drop(second);
        assert_eq!(r.len(), 0);
    }
}
