//! Log retention: how much of the log stays below a checkpoint.
//!
//! A member that was away (a host reboot, minutes) can catch up by replaying the log only
//! if the leader still holds every entry after the member's last one; otherwise openraft
//! sends it the whole tree as a snapshot. openraft's own policy
//! (`max_in_snapshot_log_to_keep`) counts entries only, and entries range from a few bytes
//! to a MiB, so a count is either too small for small writes or unbounded on disk for large
//! ones. So openraft's policy is switched off (`mod.rs` sets it to `u64::MAX`) and after
//! each checkpoint [`run`] computes the purge point here, from the log store's segments,
//! and asks openraft to purge up to it (`Raft::trigger().purge_log`). openraft still
//! decides when: the leader postpones a purge while a replication stream is reading the
//! entries, exactly as for its own policy.
//!
//! The rule ([`purge_upto`]): at least `log_keep_entries` entries stay below the
//! checkpoint, and the segments holding entries at or below it stay as long as their bytes
//! fit `log_keep_bytes`; whichever keeps more wins. The log store deletes whole segments
//! only, so bytes are counted per segment, and the log's disk use is bounded by
//! `log_keep_bytes`, plus one segment (the checkpoint's own, when it alone is larger), plus
//! the segments after the checkpoint.
//!
//! The kept bytes also give way to the disk ([`budget`]): past the entries minimum, the
//! log keeps at most half of the data dir's free space, so on a small disk the default
//! 1 GiB cannot fill it (and turn writes away with ENOSPC) merely to serve a returning
//! member faster.

use openraft::Raft;

use super::log_store::{Layout, LogStore};
use super::TypeConfig;

/// How much to keep below a checkpoint (`log_keep_entries`, `log_keep_bytes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keep {
    pub entries: u64,
    pub bytes: u64,
}

/// The index to purge up to, inclusive, after a checkpoint at `checkpoint`; `None` when
/// nothing new may go. Only entries at or below the checkpoint may be purged. The
/// entries rule alone would purge up to `checkpoint - keep.entries`. The bytes rule alone
/// walks back from the segment holding the checkpoint, counting whole segments, and
/// purges from the first one that takes the kept bytes past `keep.bytes` (the
/// checkpoint's own segment only up to the checkpoint: the log store keeps its file for
/// the entries after it). The smaller purge point wins, since whichever keeps more wins;
/// so `keep.bytes` = 0 leaves the entries rule alone in charge.
pub fn purge_upto(layout: &Layout, checkpoint: u64, keep: Keep) -> Option<u64> {
    let by_entries = checkpoint.checked_sub(keep.entries)?;
    let mut kept = 0u64;
    let over = layout
        .segments
        .iter()
        .rev()
        .filter(|s| s.first <= checkpoint)
        .find(|s| {
            kept = kept.saturating_add(s.bytes);
            kept > keep.bytes
        })?;
    let upto = by_entries.min(over.last.min(checkpoint));
    match layout.purged {
        Some(p) if upto <= p => None,
        _ => Some(upto),
    }
}

/// The bytes the log may keep below a checkpoint: `keep_bytes`, but at most half of the
/// free space `free_bytes` (None: unknown, then `keep_bytes`).
pub fn budget(keep_bytes: u64, free_bytes: Option<u64>) -> u64 {
    free_bytes.map_or(keep_bytes, |free| keep_bytes.min(free / 2))
}

/// After each checkpoint (a new snapshot in openraft's metrics, looked at most once per
/// `check`), purge what [`purge_upto`] allows, with the bytes [`budget`] gives for the
/// free space under `dir`. Runs until the Raft node shuts down.
pub async fn run(
    raft: Raft<TypeConfig>,
    log: LogStore,
    keep: Keep,
    dir: std::path::PathBuf,
    check: std::time::Duration,
) {
    let mut metrics = raft.metrics();
    let mut done = None;
    loop {
        let checkpoint = metrics.borrow_and_update().snapshot.map(|s| s.index);
        if let Some(checkpoint) = checkpoint.filter(|c| done != Some(*c)) {
            done = Some(checkpoint);
            let keep = Keep {
                bytes: budget(keep.bytes, crate::diskfull::free_bytes(&dir).ok()),
                ..keep
            };
            match log.layout() {
                Ok(layout) => {
                    if let Some(upto) = purge_upto(&layout, checkpoint, keep) {
                        tracing::debug!(
                            checkpoint,
                            upto,
                            log_bytes = layout.bytes(),
                            "purging the log"
                        );
                        if raft.trigger().purge_log(upto).await.is_err() {
                            return;
                        }
                    }
                }
                // Only an fstat of an open segment can fail here; the next checkpoint
                // tries again, and the log merely stays longer meanwhile.
                Err(e) => {
                    tracing::warn!(error = %e, "could not size the log's segments; not purging at this checkpoint")
                }
            }
        }
        // openraft's metrics change with every append, flush and apply; following each
        // change woke this task several times per fsync on every member, for a checkpoint
        // that comes every `checkpoint_entries` at most. A change during the sleep is
        // still seen by `changed`.
        tokio::time::sleep(check).await;
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::log_store::SegmentSpan;

    fn seg(first: u64, last: u64, bytes: u64) -> SegmentSpan {
        SegmentSpan { first, last, bytes }
    }

    /// (why, purged, checkpoint, keep, expected purge point)
    type Case = (&'static str, Option<u64>, u64, Keep, Option<u64>);

    #[test]
    fn purge_point_keeps_whichever_rule_keeps_more() {
        // Four 10-byte segments of 10 entries each (0..=39), the last one active.
        let four = vec![
            seg(0, 9, 10),
            seg(10, 19, 10),
            seg(20, 29, 10),
            seg(30, 39, 10),
        ];
        let layout = |purged| Layout {
            segments: four.clone(),
            purged,
            first_index: purged.map_or(0, |p: u64| p + 1),
        };
        let keep = |entries, bytes| Keep { entries, bytes };
        #[rustfmt::skip]
        let table: &[Case] = &[
            ("bytes keep more: the checkpoint's segment and one more fit", None, 35, keep(0, 20), Some(19)),
            ("the entries rule keeps more", None, 35, keep(30, 20), Some(5)),
            ("everything fits the bytes", None, 35, keep(0, 1000), None),
            ("exactly at the budget is kept", None, 35, keep(0, 40), None),
            ("one byte short of all four", None, 35, keep(0, 39), Some(9)),
            ("bytes 0: the entries rule alone, as openraft's policy did", None, 35, keep(0, 0), Some(35)),
            ("bytes 0, entries keep 10", None, 35, keep(10, 0), Some(25)),
            ("bytes smaller than the checkpoint's segment", None, 35, keep(10, 5), Some(25)),
            ("fewer entries than kept", None, 35, keep(36, 0), None),
            ("keep nothing at the very first checkpoint", None, 0, keep(0, 0), Some(0)),
            ("segments after the checkpoint are not counted", None, 25, keep(0, 10), Some(19)),
            ("already purged that far", Some(19), 35, keep(0, 20), None),
            ("purged less far", Some(4), 35, keep(0, 20), Some(19)),
        ];
        for (why, purged, checkpoint, k, want) in table {
            assert_eq!(
                purge_upto(&layout(*purged), *checkpoint, *k),
                *want,
                "{why}"
            );
        }
        let single = Layout {
            segments: vec![seg(0, 39, 40)],
            purged: None,
            first_index: 0,
        };
        assert_eq!(
            purge_upto(&single, 39, keep(0, 0)),
            Some(39),
            "one segment, bytes 0"
        );
        assert_eq!(
            purge_upto(&single, 39, keep(0, 40)),
            None,
            "one segment that fits"
        );
        assert_eq!(
            purge_upto(&single, 30, keep(5, 39)),
            Some(25),
            "one segment too big"
        );
        assert_eq!(layout(None).bytes(), 40);
    }

    #[test]
    fn the_kept_bytes_give_way_to_a_small_disk() {
        let gib = 1 << 30;
        for (keep, free, want) in [
            (gib, Some(100 * gib), gib),
            (gib, Some(gib), gib / 2),
            (gib, Some(64 << 20), 32 << 20),
            (gib, Some(0), 0),
            (gib, None, gib),
            (0, Some(100 * gib), 0),
        ] {
            assert_eq!(budget(keep, free), want, "keep {keep} free {free:?}");
        }
    }
}
