//! The on-disk (and later on-wire) form of one Raft log entry.
//!
//! ```text
//! offset size
//!      0    4  magic "SEG1"
//!      4    4  body length (LE)
//!      8    8  index
//!     16    8  term
//!     24    8  leader node id
//!     32    1  kind: 0 blank, 1 normal (Batch), 2 membership
//!     33    7  zero
//!     40   16  blake3(bytes 0..40 ++ body), truncated
//!     56    …  body: rkyv archive of a Batch or a MembershipRecord
//! ```
//!
//! The checksum covers header and body, so a torn append at the tail of a segment (a crash
//! mid-write) is detected on recovery and cut off, and a flipped bit anywhere is an error
//! instead of a silently different entry.

use std::collections::{BTreeMap, BTreeSet};

use openraft::{BasicNode, EntryPayload, LogId, Membership};
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Serialize};

use super::{Entry, TypeConfig};
use crate::op::{Batch, DecodeError};

pub const HEADER_BYTES: usize = 56;
const MAGIC: &[u8; 4] = b"SEG1";
const KIND_BLANK: u8 = 0;
const KIND_NORMAL: u8 = 1;
const KIND_MEMBERSHIP: u8 = 2;

#[derive(Archive, Serialize, Deserialize, Debug, PartialEq, Eq)]
struct MembershipRecord {
    configs: Vec<Vec<u64>>,
    nodes: Vec<(u64, String)>,
}

/// The fields of a header, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub body_bytes: u32,
    pub index: u64,
    pub term: u64,
    pub leader: u64,
    pub kind: u8,
    pub hash: [u8; 16],
}

impl Header {
    pub fn log_id(&self) -> LogId<u64> {
        LogId::new(
            openraft::CommittedLeaderId::new(self.term, self.leader),
            self.index,
        )
    }

    pub fn record_bytes(&self) -> u64 {
        HEADER_BYTES as u64 + self.body_bytes as u64
    }
}

fn checksum(header40: &[u8], body: &[u8]) -> [u8; 16] {
    let mut h = blake3::Hasher::new();
    h.update(header40);
    h.update(body);
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize().as_bytes()[..16]);
    out
}

pub fn membership_to_record(m: &Membership<u64, BasicNode>) -> AlignedVec<16> {
    let rec = MembershipRecord {
        configs: m
            .get_joint_config()
            .iter()
            .map(|c| c.iter().copied().collect())
            .collect(),
        nodes: m.nodes().map(|(id, n)| (*id, n.addr.clone())).collect(),
    };
    rkyv::to_bytes::<rkyv::rancor::Error>(&rec).expect("archiving a membership is infallible")
}

pub fn membership_from_record(body: &[u8]) -> Result<Membership<u64, BasicNode>, DecodeError> {
    let mut aligned = AlignedVec::<16>::with_capacity(body.len());
    aligned.extend_from_slice(body);
    let rec = rkyv::from_bytes::<MembershipRecord, rkyv::rancor::Error>(&aligned).map_err(|e| {
        DecodeError {
            what: "membership",
            reason: e.to_string(),
        }
    })?;
    let configs: Vec<BTreeSet<u64>> = rec
        .configs
        .into_iter()
        .map(|c| c.into_iter().collect())
        .collect();
    let nodes: BTreeMap<u64, BasicNode> = rec
        .nodes
        .into_iter()
        .map(|(id, addr)| (id, BasicNode { addr }))
        .collect();
    Ok(Membership::new(configs, nodes))
}

/// Encode `entry` as one record.
pub fn encode(entry: &Entry) -> Vec<u8> {
    let archived;
    let (kind, body): (u8, &[u8]) = match &entry.payload {
        EntryPayload::Blank => (KIND_BLANK, &[]),
        EntryPayload::Normal(batch) => {
            archived = batch.encode();
            (KIND_NORMAL, &archived)
        }
        EntryPayload::Membership(m) => {
            archived = membership_to_record(m);
            (KIND_MEMBERSHIP, &archived)
        }
    };
    let mut out = Vec::with_capacity(HEADER_BYTES + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&entry.log_id.index.to_le_bytes());
    out.extend_from_slice(&entry.log_id.leader_id.term.to_le_bytes());
    out.extend_from_slice(&entry.log_id.leader_id.node_id.to_le_bytes());
    out.push(kind);
    out.extend_from_slice(&[0u8; 7]);
    let hash = checksum(&out[..40], body);
    out.extend_from_slice(&hash);
    out.extend_from_slice(body);
    out
}

/// Decode a header; `None` if it is not one (bad magic or kind): a torn or foreign tail.
pub fn decode_header(b: &[u8; HEADER_BYTES]) -> Option<Header> {
    if &b[0..4] != MAGIC || b[32] > KIND_MEMBERSHIP || b[33..40] != [0u8; 7] {
        return None;
    }
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let mut hash = [0u8; 16];
    hash.copy_from_slice(&b[40..56]);
    Some(Header {
        body_bytes: u32::from_le_bytes(b[4..8].try_into().unwrap()),
        index: u64_at(8),
        term: u64_at(16),
        leader: u64_at(24),
        kind: b[32],
        hash,
    })
}

/// Check the body against the header's checksum and decode the entry.
pub fn decode_body(
    header_bytes: &[u8; HEADER_BYTES],
    h: &Header,
    body: &AlignedVec<16>,
) -> Result<Entry, DecodeError> {
    if body.len() != h.body_bytes as usize || checksum(&header_bytes[..40], body) != h.hash {
        return Err(DecodeError {
            what: "log record",
            reason: format!("checksum mismatch at index {}", h.index),
        });
    }
    let payload = match h.kind {
        KIND_BLANK => EntryPayload::Blank,
        KIND_NORMAL => EntryPayload::Normal(Batch::decode(body)?),
        _ => EntryPayload::Membership(membership_from_record(body)?),
    };
    Ok(openraft::Entry::<TypeConfig> {
        log_id: h.log_id(),
        payload,
    })
}

/// The log id a record's header names, if it has a header.
pub fn log_id(bytes: &[u8]) -> Option<LogId<u64>> {
    Some(decode_header(bytes.get(..HEADER_BYTES)?.try_into().ok()?)?.log_id())
}

/// Decode one whole record from a byte slice (a record received from a peer): exactly a
/// header and its body, nothing after.
pub fn decode(bytes: &[u8]) -> Result<Entry, DecodeError> {
    let bad = |reason: &str| DecodeError {
        what: "log record",
        reason: reason.to_string(),
    };
    let hb: &[u8; HEADER_BYTES] = bytes
        .get(..HEADER_BYTES)
        .ok_or_else(|| bad("short header"))?
        .try_into()
        .unwrap();
    let h = decode_header(hb).ok_or_else(|| bad("bad header"))?;
    if bytes.len() as u64 != h.record_bytes() {
        // A follower writes a received record as it is (`received.rs`): anything after its
        // body would land in the log, where recovery would read it as the next header.
        return Err(bad(if (bytes.len() as u64) < h.record_bytes() {
            "short body"
        } else {
            "bytes after the body"
        }));
    }
    let body = &bytes[HEADER_BYTES..];
    let mut aligned = AlignedVec::<16>::with_capacity(body.len());
    aligned.extend_from_slice(body);
    decode_body(hb, &h, &aligned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::Op;

    fn entry(index: u64, payload: EntryPayload<TypeConfig>) -> Entry {
        openraft::Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(3, 1), index),
            payload,
        }
    }

    #[test]
    fn every_kind_round_trips() {
        let batch = Batch {
            origin: 1,
            seq: 2,
            ops: vec![Op::Write {
                path: "a".into(),
                offset: 1,
                data: vec![1, 2, 3].into(),
            }],
        };
        let mut nodes = BTreeMap::new();
        nodes.insert(1, BasicNode::new("127.0.0.1:7000"));
        nodes.insert(2, BasicNode::new("127.0.0.2:7000"));
        let m = Membership::new(vec![BTreeSet::from([1, 2])], nodes);
        for e in [
            entry(1, EntryPayload::Blank),
            entry(2, EntryPayload::Normal(batch)),
            entry(3, EntryPayload::Membership(m)),
        ] {
            let bytes = encode(&e);
            let back = decode(&bytes).unwrap();
            assert_eq!(back.log_id, e.log_id);
            assert_eq!(format!("{:?}", back.payload), format!("{:?}", e.payload));
        }
    }

    #[test]
    fn any_flipped_byte_or_truncation_is_detected() {
        let e = entry(
            9,
            EntryPayload::Normal(Batch {
                origin: 1,
                seq: 1,
                ops: vec![Op::Truncate {
                    path: "x".into(),
                    size: 7,
                }],
            }),
        );
        let bytes = encode(&e);
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(decode(&b).is_err(), "flip at {i} went unnoticed");
        }
        for n in 0..bytes.len() {
            assert!(
                decode(&bytes[..n]).is_err(),
                "truncation to {n} went unnoticed"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(
            decode(&longer).is_err(),
            "a byte after the body went unnoticed"
        );
        assert_eq!(log_id(&bytes), Some(e.log_id));
    }
}
