//! Log records as the log store's recovery scan and a follower's append see them: the
//! input is a segment file's bytes, scanned record by record the way `log_store.rs` does
//! (header, then a body of the length it claims, then checksum and payload); and the input
//! as a checksum-correct record body of each kind, so mutated batches and membership
//! records reach their decoders. Whatever decodes must re-encode to the same entry.
#![no_main]

use libfuzzer_sys::fuzz_target;
use seguro_fs_fuzz::replication::record::{self, HEADER_BYTES};
use seguro_fs_fuzz::{aligned, make_record};

/// A decoded entry re-encodes into a record that decodes to the same entry.
fn round_trips(entry: &seguro_fs_fuzz::replication::Entry) {
    let again = record::decode(&record::encode(entry)).expect("a re-encoded entry decodes");
    assert_eq!(&again, entry);
}

fuzz_target!(|data: &[u8]| {
    // The segment scan (Inner::open in log_store.rs, minus the file I/O).
    let mut offset = 0usize;
    while offset < data.len() {
        let Some(hb) = data.get(offset..offset + HEADER_BYTES) else {
            break;
        };
        let hb: &[u8; HEADER_BYTES] = hb.try_into().unwrap();
        let Some(h) = record::decode_header(hb) else {
            break;
        };
        let start = offset + HEADER_BYTES;
        let Some(body) = data.get(start..start + h.body_bytes as usize) else {
            break;
        };
        let Ok(entry) = record::decode_body(hb, &h, &aligned(body)) else {
            break;
        };
        assert_eq!(entry.log_id.index, h.index);
        // The peer path (one record in a slice) agrees with the scan.
        let whole = record::decode(&data[offset..]).expect("the scan decoded this record");
        assert_eq!(whole, entry);
        round_trips(&entry);
        offset += h.record_bytes() as usize;
    }

    // The input as the body of a sealed record of each kind.
    for kind in 0..=2u8 {
        let rec = make_record(kind, 7, 3, 1, data);
        match record::decode(&rec) {
            Ok(entry) => round_trips(&entry),
            Err(e) => {
                // A sealed record fails only in its payload, never on the checksum or
                // the header: that would mean make_record's layout is stale.
                assert_ne!(e.what, "log record", "kind {kind}: {e}");
            }
        }
    }

    // A membership record on its own (snapshot metadata carries one too).
    if let Ok(m) = record::membership_from_record(data) {
        let again = record::membership_from_record(&record::membership_to_record(&m))
            .expect("a re-encoded membership decodes");
        assert_eq!(again, m);
    }
});
