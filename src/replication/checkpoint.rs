//! The applied-index checkpoint: which log id the synced tree reflects, and the membership
//! as of then. Restart replays the log from here.
//!
//! The file has two 4 KiB slots written alternately (like LMDB's two meta pages): a write is
//! one pwrite + fdatasync, and a torn write can only damage the slot being written, never
//! the previous checkpoint. Each slot carries a counter and a blake3 checksum; load picks the
//! valid slot with the higher counter.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use openraft::{BasicNode, LogId, StoredMembership};

use super::record::{membership_from_record, membership_to_record};
use crate::sync::fdatasync;

const SLOT_BYTES: usize = 4096;
const MAGIC: &[u8; 8] = b"SEGCKPT1";
// magic 8 + counter 8 + payload length 4, then payload, then a 16-byte checksum.
const FIXED_BYTES: usize = 8 + 8 + 4 + 16;

/// What a checkpoint records.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Checkpoint {
    pub applied: Option<LogId<u64>>,
    pub membership: StoredMembership<u64, BasicNode>,
}

pub struct CheckpointFile {
    file: File,
    counter: u64,
}

fn put_log_id(out: &mut Vec<u8>, id: &Option<LogId<u64>>) {
    match id {
        None => out.push(0),
        Some(id) => {
            out.push(1);
            out.extend_from_slice(&id.leader_id.term.to_le_bytes());
            out.extend_from_slice(&id.leader_id.node_id.to_le_bytes());
            out.extend_from_slice(&id.index.to_le_bytes());
        }
    }
}

fn get_log_id(b: &[u8]) -> Option<(Option<LogId<u64>>, &[u8])> {
    match b.first()? {
        0 => Some((None, &b[1..])),
        1 => {
            let n = |o: usize| Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?));
            let id = LogId::new(openraft::CommittedLeaderId::new(n(1)?, n(9)?), n(17)?);
            Some((Some(id), &b[25..]))
        }
        _ => None,
    }
}

fn encode(c: &Checkpoint, counter: u64) -> io::Result<Vec<u8>> {
    let mut payload = Vec::new();
    put_log_id(&mut payload, &c.applied);
    put_log_id(&mut payload, c.membership.log_id());
    payload.extend_from_slice(&membership_to_record(c.membership.membership()));
    if payload.len() + FIXED_BYTES > SLOT_BYTES {
        return Err(io::Error::other(
            "cluster membership is too large for the checkpoint slot",
        ));
    }
    let mut slot = Vec::with_capacity(SLOT_BYTES);
    slot.extend_from_slice(MAGIC);
    slot.extend_from_slice(&counter.to_le_bytes());
    slot.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    slot.extend_from_slice(&payload);
    let hash = blake3::hash(&slot);
    slot.extend_from_slice(&hash.as_bytes()[..16]);
    slot.resize(SLOT_BYTES, 0);
    Ok(slot)
}

fn decode(slot: &[u8]) -> Option<(u64, Checkpoint)> {
    if slot.get(..8)? != MAGIC {
        return None;
    }
    let counter = u64::from_le_bytes(slot.get(8..16)?.try_into().ok()?);
    let len = u32::from_le_bytes(slot.get(16..20)?.try_into().ok()?) as usize;
    let end = 20 + len;
    if slot.get(end..end + 16)? != &blake3::hash(&slot[..end]).as_bytes()[..16] {
        return None;
    }
    let (applied, rest) = get_log_id(&slot[20..end])?;
    let (m_id, rest) = get_log_id(rest)?;
    let membership = membership_from_record(rest).ok()?;
    Some((
        counter,
        Checkpoint {
            applied,
            membership: StoredMembership::new(m_id, membership),
        },
    ))
}

impl CheckpointFile {
    /// Open or create; returns the newest valid checkpoint (default when none was written).
    pub fn open(path: &Path) -> io::Result<(CheckpointFile, Checkpoint)> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let mut best: Option<(u64, Checkpoint)> = None;
        for slot in 0..2u64 {
            let mut buf = vec![0u8; SLOT_BYTES];
            let n = file.read_at(&mut buf, slot * SLOT_BYTES as u64)?;
            if let Some((counter, c)) = decode(&buf[..n]) {
                if best.as_ref().is_none_or(|(b, _)| counter > *b) {
                    best = Some((counter, c));
                }
            }
        }
        let (counter, c) = best.unwrap_or_default();
        Ok((CheckpointFile { file, counter }, c))
    }

    /// Durably record `c`, overwriting the older slot.
    pub fn write(&mut self, c: &Checkpoint) -> io::Result<()> {
        let counter = self.counter + 1;
        let slot = encode(c, counter)?;
        self.file
            .write_all_at(&slot, (counter % 2) * SLOT_BYTES as u64)?;
        fdatasync(&self.file)?;
        self.counter = counter;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::tests::TempDir;
    use std::collections::{BTreeMap, BTreeSet};

    fn ck(index: u64) -> Checkpoint {
        let id = LogId::new(openraft::CommittedLeaderId::new(2, 1), index);
        let nodes = BTreeMap::from([(1, BasicNode::new("127.0.0.1:1"))]);
        Checkpoint {
            applied: Some(id),
            membership: StoredMembership::new(
                Some(id),
                openraft::Membership::new(vec![BTreeSet::from([1])], nodes),
            ),
        }
    }

    #[test]
    fn newest_valid_slot_wins_and_torn_slot_falls_back() {
        let t = TempDir::new("ckpt");
        let p = t.path().join("applied");
        let (mut f, c0) = CheckpointFile::open(&p).unwrap();
        assert_eq!(c0, Checkpoint::default());
        f.write(&ck(5)).unwrap();
        f.write(&ck(9)).unwrap();
        drop(f);
        assert_eq!(CheckpointFile::open(&p).unwrap().1, ck(9));
        // Tear the newest slot (counter 2 lives in slot 0): the older one must be used.
        let raw = OpenOptions::new().write(true).open(&p).unwrap();
        raw.write_all_at(&[0xff; 64], 100).unwrap();
        assert_eq!(CheckpointFile::open(&p).unwrap().1, ck(5));
    }
}
