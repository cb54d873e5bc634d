//! `Batch::decode` (op.rs) on an aligned copy of the input: the payload of every normal
//! log entry. Whatever decodes must re-encode to an equal batch, and every op's size
//! estimate and debug form must be computable.
#![no_main]

use libfuzzer_sys::fuzz_target;
use seguro_fs_fuzz::aligned;
use seguro_fs_fuzz::op::Batch;

fuzz_target!(|data: &[u8]| {
    let Ok(batch) = Batch::decode(&aligned(data)) else {
        return;
    };
    let again = Batch::decode(&batch.encode()).expect("a re-encoded batch decodes");
    assert_eq!(again, batch);
    for op in &batch.ops {
        let _ = op.encoded_bytes_estimate();
        let _ = op.is_namespace();
        let _ = format!("{op:?}");
    }
});
