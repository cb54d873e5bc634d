//! Group commit: accepted ops accumulate in an open batch until it is sealed, then travel
//! as one Raft entry. Pure bookkeeping, no IO, so it is unit-tested directly.
//!
//! Seq numbers are assigned here, one per batch, in the order batches will be proposed;
//! the proposer takes sealed batches strictly in that order, so log order = seq order.

use std::collections::VecDeque;
use std::time::Instant;

use tokio::sync::oneshot;

use crate::op::{Batch, Bytes, Op, Timespec};

/// Room reserved in an entry for the batch's own framing.
const BATCH_OVERHEAD_BYTES: usize = 256;

/// Whoever waits for a sealed batch to be applied gets openraft's response receiver.
pub type ResponseSender = oneshot::Sender<crate::replication::ResponseReceiver>;

pub struct Sealed {
    pub batch: Batch,
    /// Set for ops whose caller waits until the entry is applied (namespace, setattr).
    pub reply: Option<ResponseSender>,
}

/// See [`GroupCommit::shape`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    open: bool,
    sealed: usize,
}

pub struct GroupCommit {
    origin: u64,
    entry_bytes_max: usize,
    open: Vec<Op>,
    open_bytes: usize,
    /// Seq of the open batch (the next one to be sealed).
    open_seq: u64,
    /// When the open batch got its first op: its linger counts from here.
    opened_at: Option<Instant>,
    sealed: VecDeque<Sealed>,
    /// The proposer looks at the open batch within `batch_watch_us` without being woken
    /// (it is busy and checks on a timer), so a batch opening is no news to it.
    watched: bool,
}

/// Whether `op` is a stamp (see [`GroupCommit::push_data_stamped`]) of `path`.
fn is_stamp_of(op: &Op, path: &str) -> bool {
    matches!(
        op,
        Op::SetAttr { path: p, mode: None, uid: None, gid: None, atime: None, mtime: Some(_) }
            if p == path
    )
}

/// Split a write into ops that each fit an entry.
pub fn split_write(path: &str, offset: u64, data: &[u8], entry_bytes_max: usize) -> Vec<Op> {
    let probe = Op::Write {
        path: path.to_string(),
        offset,
        data: Bytes::from([]),
    };
    let chunk = entry_bytes_max
        .saturating_sub(probe.encoded_bytes_estimate() + BATCH_OVERHEAD_BYTES)
        .max(1);
    if data.is_empty() {
        return vec![probe];
    }
    data.chunks(chunk)
        .enumerate()
        .map(|(i, c)| Op::Write {
            path: path.to_string(),
            offset: offset + (i * chunk) as u64,
            data: Bytes::from(c),
        })
        .collect()
}

impl GroupCommit {
    pub fn new(origin: u64, entry_bytes_max: usize) -> GroupCommit {
        GroupCommit {
            origin,
            entry_bytes_max,
            open: Vec::new(),
            open_bytes: 0,
            open_seq: 1,
            opened_at: None,
            sealed: VecDeque::new(),
            watched: false,
        }
    }

    /// Add a data op to the open batch (sealing it first if the op would not fit);
    /// returns the seq of the batch the op travels in.
    pub fn push_data(&mut self, op: Op) -> u64 {
        // Namespace ops travel alone (`push_alone`): the state machine checkpoints before
        // applying one, and a full-disk retry may checkpoint again in the middle of a
        // batch, which is only safe if no other op shares its batch.
        debug_assert!(!op.is_namespace(), "namespace op {op:?} pushed as data");
        let bytes = op.encoded_bytes_estimate();
        if !self.open.is_empty()
            && self.open_bytes + bytes + BATCH_OVERHEAD_BYTES > self.entry_bytes_max
        {
            self.seal();
        }
        if self.open.is_empty() {
            self.opened_at = Some(Instant::now());
        }
        self.open.push(op);
        self.open_bytes += bytes;
        let seq = self.open_seq;
        if self.open_bytes + BATCH_OVERHEAD_BYTES >= self.entry_bytes_max {
            self.seal();
        }
        seq
    }

    /// Add a data op on one path, followed by the mtime its caller saw as a replicated
    /// utimensat (a *stamp*), so every member's file gets the time the leader showed at
    /// once rather than its own apply time. A stamp of the same path that ends the open
    /// batch moves behind this op: a run of writes to one file carries one stamp.
    pub fn push_data_stamped(&mut self, op: Op, mtime: Timespec) -> u64 {
        let path = match &op {
            Op::Write { path, .. } | Op::Truncate { path, .. } => path.clone(),
            other => unreachable!("only writes and truncates are stamped, not {other:?}"),
        };
        if self
            .open
            .last()
            .is_some_and(|last| is_stamp_of(last, &path))
        {
            let stamp = self.open.pop().expect("just looked at it");
            self.open_bytes -= stamp.encoded_bytes_estimate();
        }
        let seq = self.push_data(op);
        self.push_data(Op::SetAttr {
            path,
            mode: None,
            uid: None,
            gid: None,
            atime: None,
            mtime: Some(mtime),
        });
        seq
    }

    /// Close the open batch if it holds anything.
    pub fn seal(&mut self) {
        if self.open.is_empty() {
            return;
        }
        let ops = std::mem::take(&mut self.open);
        self.open_bytes = 0;
        self.opened_at = None;
        self.sealed.push_back(Sealed {
            batch: Batch {
                origin: self.origin,
                seq: self.open_seq,
                ops,
            },
            reply: None,
        });
        self.open_seq += 1;
    }

    /// Queue `op` in a batch of its own, after everything accepted so far.
    pub fn push_alone(&mut self, op: Op, reply: ResponseSender) -> u64 {
        self.seal();
        let seq = self.open_seq;
        self.sealed.push_back(Sealed {
            batch: Batch {
                origin: self.origin,
                seq,
                ops: vec![op],
            },
            reply: Some(reply),
        });
        self.open_seq += 1;
        seq
    }

    /// Seq of the newest batch holding any op (0 if none yet).
    pub fn last_seq(&self) -> u64 {
        if self.open.is_empty() {
            self.open_seq - 1
        } else {
            self.open_seq
        }
    }

    pub fn has_open(&self) -> bool {
        !self.open.is_empty()
    }

    /// When the open batch got its first op, if one is open.
    pub fn opened_at(&self) -> Option<Instant> {
        self.opened_at
    }

    /// The proposer says whether it will look at the open batch on its own timer
    /// ([`GroupCommit::is_news_since`]). Set under the same lock as the ops are added, so
    /// a batch opening after the proposer stopped watching always wakes it.
    pub fn set_watched(&mut self, watched: bool) {
        self.watched = watched;
    }

    /// What the proposer acts on: whether a batch is open, and how many are sealed.
    pub fn shape(&self) -> Shape {
        Shape {
            open: self.has_open(),
            sealed: self.sealed.len(),
        }
    }

    /// Whether ops added since the group had shape `before` are news to the proposer: a
    /// batch was sealed, or one opened while the proposer is not watching (its linger
    /// starts). Ops joining a batch that was open already are not: the proposer already
    /// lingers on it, or waits for the flush that lets it go, and takes them with it. Nor
    /// is a batch opening while the proposer watches: vere's commit is WRITEs then an
    /// FSYNC that seals them, and waking for the WRITE cost a runtime thread's wake-up
    /// per sync point.
    pub fn is_news_since(&self, before: Shape) -> bool {
        let now = self.shape();
        (now.open && !before.open && !self.watched) || now.sealed > before.sealed
    }

    pub fn take_sealed(&mut self) -> Option<Sealed> {
        self.sealed.pop_front()
    }

    /// Drop everything not yet proposed (the log failed: none of it can be acknowledged).
    pub fn clear(&mut self) {
        self.seal();
        self.sealed.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(offset: u64, len: usize) -> Op {
        Op::Write {
            path: "f".into(),
            offset,
            data: vec![1; len].into(),
        }
    }

    /// The proposer is woken when a batch opens (unless it watches) or is sealed, not for
    /// every op that joins an open batch (a commit of LMDB is several WRITEs before its
    /// FSYNC).
    #[test]
    fn only_a_new_or_sealed_batch_is_news_to_the_proposer() {
        let mut p = GroupCommit::new(1, 4096);
        let before = p.shape();
        p.push_data(write(0, 100));
        assert!(p.is_news_since(before), "a batch opened");
        let before = p.shape();
        p.push_data(write(100, 100));
        assert!(!p.is_news_since(before), "an op joined the open batch");
        let before = p.shape();
        p.push_data(write(200, 4000));
        assert!(
            p.is_news_since(before),
            "the open batch was sealed to make room"
        );
        p.seal();
        while p.take_sealed().is_some() {}
        let before = p.shape();
        assert!(!p.is_news_since(before), "nothing added");
        p.push_data(write(0, 4000));
        assert!(
            p.is_news_since(before),
            "opened and sealed at once by its size"
        );
        while p.take_sealed().is_some() {}

        // A proposer that watches is told of sealed batches only.
        p.set_watched(true);
        let before = p.shape();
        p.push_data(write(0, 100));
        assert!(!p.is_news_since(before), "a batch opened under watch");
        assert!(
            p.opened_at().is_some(),
            "the open batch's linger has a start"
        );
        let before = p.shape();
        p.seal();
        assert!(p.is_news_since(before), "a batch sealed under watch");
        assert!(p.opened_at().is_none(), "no batch is open");
        while p.take_sealed().is_some() {}
        let before = p.shape();
        p.push_data(write(0, 4000));
        assert!(p.is_news_since(before), "sealed by its size under watch");
        while p.take_sealed().is_some() {}
        p.set_watched(false);
        let before = p.shape();
        p.push_data(write(0, 100));
        assert!(
            p.is_news_since(before),
            "a batch opened after the watch ended"
        );
    }

    #[test]
    fn a_full_fuse_write_travels_in_one_entry_by_default() {
        let limits = crate::config::Limits::default();
        let data = vec![7u8; limits.fuse_write_bytes_max as usize];
        // The longest path a write can carry (PATH_MAX).
        let path = "d/".repeat(2047) + "f";
        let ops = split_write(&path, 0, &data, limits.entry_bytes_max);
        assert_eq!(ops.len(), 1, "a {}-byte write was split", data.len());
        let mut p = GroupCommit::new(1, limits.entry_bytes_max);
        let seq = p.push_data(ops.into_iter().next().unwrap());
        p.seal();
        let sealed = p.take_sealed().expect("one batch");
        assert_eq!((sealed.batch.seq, sealed.batch.ops.len()), (seq, 1));
        assert!(p.take_sealed().is_none());
    }

    fn w(len: usize) -> Op {
        Op::Write {
            path: "f".into(),
            offset: 0,
            data: vec![0; len].into(),
        }
    }

    #[test]
    fn split_covers_the_write_exactly_and_fits_entries() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| i as u8).collect();
        let ops = split_write("0i5/image.bin", 4096, &data, 1 << 20);
        assert_eq!(ops.len(), 3);
        let mut next = 4096;
        let mut joined = Vec::new();
        for op in &ops {
            let Op::Write {
                offset, data: d, ..
            } = op
            else {
                panic!()
            };
            assert_eq!(*offset, next);
            assert!(op.encoded_bytes_estimate() + BATCH_OVERHEAD_BYTES <= 1 << 20);
            next += d.len() as u64;
            joined.extend_from_slice(d);
        }
        assert_eq!(joined, data);
    }

    #[test]
    fn batches_group_small_ops_and_respect_the_cap() {
        let mut p = GroupCommit::new(9, 64 << 10);
        let s1 = p.push_data(w(100));
        let s2 = p.push_data(w(100));
        assert_eq!((s1, s2), (1, 1), "small ops share a batch");
        assert_eq!(p.last_seq(), 1);
        // An op that does not fit seals the open batch first.
        let s3 = p.push_data(w(65_200));
        let s4 = p.push_data(w(100));
        assert_eq!(s3, 2);
        assert_eq!(s4, 3);
        let b1 = p.take_sealed().unwrap().batch;
        assert_eq!((b1.origin, b1.seq, b1.ops.len()), (9, 1, 2));
        assert_eq!(p.take_sealed().unwrap().batch.seq, 2);
        assert!(p.take_sealed().is_none());
        assert!(p.has_open());
        p.seal();
        assert_eq!(p.take_sealed().unwrap().batch.seq, 3);
        assert_eq!(p.last_seq(), 3);
    }

    #[test]
    fn alone_ops_come_after_everything_accepted_before() {
        let mut p = GroupCommit::new(1, 1 << 20);
        p.push_data(w(10));
        let (tx, _rx) = oneshot::channel();
        let s = p.push_alone(
            Op::Mkdir {
                path: "d".into(),
                mode: 0o700,
            },
            tx,
        );
        assert_eq!(s, 2);
        assert_eq!(p.push_data(w(10)), 3);
        let order: Vec<u64> = std::iter::from_fn(|| p.take_sealed())
            .map(|s| s.batch.seq)
            .collect();
        assert_eq!(order, vec![1, 2]);
        assert_eq!(p.last_seq(), 3);
    }

    #[test]
    fn a_run_of_writes_to_one_file_carries_one_stamp_at_its_end() {
        let mut p = GroupCommit::new(1, 1 << 20);
        let t = |sec| Timespec { sec, nsec: 0 };
        let write = |path: &str| Op::Write {
            path: path.into(),
            offset: 0,
            data: vec![1; 10].into(),
        };
        p.push_data_stamped(write("a"), t(1));
        p.push_data_stamped(write("a"), t(2));
        p.push_data_stamped(write("b"), t(3));
        p.push_data_stamped(write("a"), t(4));
        p.seal();
        let ops = p.take_sealed().unwrap().batch.ops;
        let shown: Vec<String> = ops
            .iter()
            .map(|op| match op {
                Op::Write { path, .. } => format!("w{path}"),
                Op::SetAttr { path, mtime, .. } => format!("t{path}{}", mtime.unwrap().sec),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(shown, ["wa", "wa", "ta2", "wb", "tb3", "wa", "ta4"]);
    }
}
