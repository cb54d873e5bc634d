//! Helpers of the fuzz targets, over the daemon's library: the targets call exactly the
//! decoders the daemon runs (`seguro_fs::op`, `seguro_fs::replication::{record, wire}`),
//! re-exported here under the names the targets use.

pub use seguro_fs::{op, replication};

use rkyv::util::AlignedVec;

/// `bytes` copied into a 16-byte aligned buffer, as the transport and the log store hand
/// payloads to the decoders (rkyv validates in place and refuses misaligned archives).
pub fn aligned(bytes: &[u8]) -> AlignedVec<16> {
    let mut out = AlignedVec::<16>::with_capacity(bytes.len());
    out.extend_from_slice(bytes);
    out
}

/// Recompute the checksum of the record at the start of `record` (layout in
/// src/replication/record.rs) when its header parses and its body is all there. A fuzzer
/// cannot forge a blake3 hash, so without this no mutated body would ever reach the
/// payload decoders. Returns whether the record was sealed.
pub fn seal_record(record: &mut [u8]) -> bool {
    use replication::record::{decode_header, HEADER_BYTES};
    let Some(hb) = record.get(..HEADER_BYTES) else {
        return false;
    };
    let Some(h) = decode_header(hb.try_into().expect("HEADER_BYTES long")) else {
        return false;
    };
    let end = HEADER_BYTES + h.body_bytes as usize;
    if record.len() < end {
        return false;
    }
    let mut hasher = blake3::Hasher::new();
    hasher.update(&record[..40]);
    hasher.update(&record[HEADER_BYTES..end]);
    let hash = hasher.finalize();
    record[40..HEADER_BYTES].copy_from_slice(&hash.as_bytes()[..16]);
    true
}

/// A record of `kind` (0 blank, 1 batch, 2 membership; others are invalid) around `body`,
/// with a correct checksum.
pub fn make_record(kind: u8, index: u64, term: u64, leader: u64, body: &[u8]) -> Vec<u8> {
    use replication::record::HEADER_BYTES;
    let mut out = Vec::with_capacity(HEADER_BYTES + body.len());
    out.extend_from_slice(b"SEG1");
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&index.to_le_bytes());
    out.extend_from_slice(&term.to_le_bytes());
    out.extend_from_slice(&leader.to_le_bytes());
    out.push(kind);
    out.extend_from_slice(&[0u8; 7 + 16]);
    out.extend_from_slice(body);
    seal_record(&mut out);
    out
}
