//! The validated configuration: every limit and timeout of the daemon lives here, with its
//! default and its allowed range, so there is one place to read and tune them.

use std::path::PathBuf;

/// Numeric limits. Names carry their unit last (`_bytes_max`, `_ms`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Cap on one Raft entry's encoded ops (group-commit batch). Larger writes are split.
    pub entry_bytes_max: usize,
    /// Bytes written but not yet applied to the tree (the overlay). WRITE blocks above it:
    /// this is the backpressure that bounds memory while a multi-GB file streams through.
    pub inflight_bytes_max: usize,
    /// Batches proposed to Raft but not yet flushed to the log.
    pub proposals_inflight_max: usize,
    /// How long fsync (and a namespace op) waits for durability before answering EIO.
    pub ack_timeout_ms: u64,
    /// A checkpoint (tree synced, applied id recorded, log purged) after this many entries.
    pub checkpoint_entries: u64,
    /// A log segment file is closed and a new one started past this size.
    pub log_segment_bytes_max: u64,
    /// Open files the state machine keeps cached while applying.
    pub apply_open_files_max: usize,
    /// FUSE worker threads.
    pub fuse_threads: usize,
    /// Largest FUSE WRITE the kernel may send.
    pub fuse_write_bytes_max: u32,
    /// How long `mount` waits for the node to become a writable leader.
    pub ready_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            entry_bytes_max: 1 << 20,
            inflight_bytes_max: 64 << 20,
            proposals_inflight_max: 8,
            ack_timeout_ms: 10_000,
            checkpoint_entries: 2_000,
            log_segment_bytes_max: 64 << 20,
            apply_open_files_max: 64,
            fuse_threads: 4,
            fuse_write_bytes_max: 1 << 20,
            ready_timeout_ms: 30_000,
        }
    }
}

/// A limit outside its allowed range.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{name} = {value} is out of range: allowed {min}..={max}")]
pub struct RangeError {
    pub name: &'static str,
    pub value: u64,
    pub min: u64,
    pub max: u64,
}

fn check(name: &'static str, value: u64, min: u64, max: u64) -> Result<(), RangeError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(RangeError {
            name,
            value,
            min,
            max,
        })
    }
}

impl Limits {
    pub fn validate(&self) -> Result<(), RangeError> {
        check(
            "entry_bytes_max",
            self.entry_bytes_max as u64,
            64 << 10,
            16 << 20,
        )?;
        check(
            "inflight_bytes_max",
            self.inflight_bytes_max as u64,
            self.entry_bytes_max as u64 * 2,
            16 << 30,
        )?;
        check(
            "proposals_inflight_max",
            self.proposals_inflight_max as u64,
            1,
            1024,
        )?;
        check("ack_timeout_ms", self.ack_timeout_ms, 10, 3_600_000)?;
        check("checkpoint_entries", self.checkpoint_entries, 16, 1 << 30)?;
        check(
            "log_segment_bytes_max",
            self.log_segment_bytes_max,
            4 << 20,
            4 << 30,
        )?;
        check(
            "apply_open_files_max",
            self.apply_open_files_max as u64,
            4,
            4096,
        )?;
        check("fuse_threads", self.fuse_threads as u64, 1, 64)?;
        check(
            "fuse_write_bytes_max",
            self.fuse_write_bytes_max as u64,
            4096,
            16 << 20,
        )?;
        check("ready_timeout_ms", self.ready_timeout_ms, 100, 3_600_000)?;
        Ok(())
    }
}

/// Everything `seguro-fs mount` needs, validated.
#[derive(Debug, Clone)]
pub struct MountConfig {
    pub data_dir: PathBuf,
    pub mountpoint: PathBuf,
    pub node_id: u64,
    /// File names (not paths) kept in `DATA_DIR/local/`, never replicated.
    pub local_names: Vec<String>,
    /// Let users other than the mounting one use the mount (FUSE `allow_other`).
    pub allow_other: bool,
    pub limits: Limits,
    /// Test hook: while this file exists, the log's fdatasync reports an IO error.
    pub fault_log_sync_file: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Limits::default().validate().unwrap();
    }

    #[test]
    fn out_of_range_names_the_key_and_range() {
        let l = Limits {
            fuse_threads: 0,
            ..Limits::default()
        };
        let e = l.validate().unwrap_err();
        assert_eq!(e.name, "fuse_threads");
        assert_eq!(
            e.to_string(),
            "fuse_threads = 0 is out of range: allowed 1..=64"
        );
        let l = Limits {
            inflight_bytes_max: 1 << 20,
            ..Limits::default()
        };
        assert_eq!(l.validate().unwrap_err().name, "inflight_bytes_max");
    }
}
