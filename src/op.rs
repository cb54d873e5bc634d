//! The replicated operations: what a mutating FUSE request becomes in the Raft log.
//!
//! Ops are addressed by path relative to the tree root, because the tree on every replica is
//! a plain directory that mirrors the mount (a replica's `tree/` is itself a usable
//! `.urb/log`). A [`Batch`] is the payload of one Raft entry (group commit): the leader packs
//! many data ops into one batch, while a namespace op always travels alone so the state
//! machine can put a durability barrier around it (see `tree.rs`).
//!
//! Encoding is rkyv; decoding always validates (`rkyv::from_bytes` checks the archive) because
//! the bytes come from disk or, later, from the network.

use rkyv::{Archive, Deserialize, Serialize};

/// Seconds and nanoseconds since the Unix epoch, as `utimensat` takes them.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timespec {
    pub sec: i64,
    pub nsec: u32,
}

/// One replicated file-system operation.
#[derive(Archive, Serialize, Deserialize, Clone, PartialEq, Eq)]
pub enum Op {
    /// pwrite of `data` at `offset` (data ops are idempotent: replay converges).
    Write {
        path: String,
        offset: u64,
        data: Vec<u8>,
    },
    /// ftruncate to `size` (also used for fallocate mode 0 that extends a file).
    Truncate {
        path: String,
        size: u64,
    },
    /// chmod / chown / utimensat; any field may be absent.
    SetAttr {
        path: String,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        atime: Option<Timespec>,
        mtime: Option<Timespec>,
    },
    /// open(O_CREAT [| O_EXCL]) of a regular file.
    Create {
        path: String,
        mode: u32,
        excl: bool,
    },
    Mkdir {
        path: String,
        mode: u32,
    },
    Unlink {
        path: String,
    },
    Rmdir {
        path: String,
    },
    /// renameat2 with `flags` (0 or RENAME_NOREPLACE).
    Rename {
        from: String,
        to: String,
        flags: u32,
    },
    Link {
        from: String,
        to: String,
    },
    Symlink {
        target: String,
        path: String,
    },
    /// No change to the tree: a barrier at which every replica records the digest of its
    /// tree (`seguro-fs verify` compares them at one index). Travels alone in its batch.
    Digest,
}

impl Op {
    /// Namespace ops change which names exist. They are not idempotent under replay from an
    /// arbitrary crash state, so the state machine checkpoints around each one.
    pub fn is_namespace(&self) -> bool {
        matches!(
            self,
            Op::Create { .. }
                | Op::Mkdir { .. }
                | Op::Unlink { .. }
                | Op::Rmdir { .. }
                | Op::Rename { .. }
                | Op::Link { .. }
                | Op::Symlink { .. }
        )
    }

    /// Ops that a full data dir refuses on the leader (ENOSPC before proposing): new names
    /// or a rename's new entry. Unlink, rmdir and attribute changes stay possible, since
    /// they are how space is freed; writes are checked where they are accepted.
    pub fn needs_room(&self) -> bool {
        self.is_namespace() && !matches!(self, Op::Unlink { .. } | Op::Rmdir { .. })
    }

    /// Bytes this op adds to an entry, for the entry size cap (payload plus a fixed
    /// allowance for the archive's framing).
    pub fn encoded_bytes_estimate(&self) -> usize {
        const OP_OVERHEAD_BYTES: usize = 64;
        let payload = match self {
            Op::Write { path, data, .. } => path.len() + data.len(),
            Op::Truncate { path, .. }
            | Op::SetAttr { path, .. }
            | Op::Create { path, .. }
            | Op::Mkdir { path, .. }
            | Op::Unlink { path }
            | Op::Rmdir { path } => path.len(),
            Op::Rename { from, to, .. } | Op::Link { from, to } => from.len() + to.len(),
            Op::Symlink { target, path } => target.len() + path.len(),
            Op::Digest => 0,
        };
        payload + OP_OVERHEAD_BYTES
    }
}

impl std::fmt::Debug for Op {
    // Data is elided: a debug log of a 1 MiB write must not print a megabyte.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::Write { path, offset, data } => {
                write!(f, "Write({path}@{offset}+{})", data.len())
            }
            Op::Truncate { path, size } => write!(f, "Truncate({path}, {size})"),
            Op::SetAttr { path, mode, .. } => write!(f, "SetAttr({path}, mode={mode:?})"),
            Op::Create { path, excl, .. } => write!(f, "Create({path}, excl={excl})"),
            Op::Mkdir { path, .. } => write!(f, "Mkdir({path})"),
            Op::Unlink { path } => write!(f, "Unlink({path})"),
            Op::Rmdir { path } => write!(f, "Rmdir({path})"),
            Op::Rename { from, to, flags } => write!(f, "Rename({from} -> {to}, {flags:#x})"),
            Op::Link { from, to } => write!(f, "Link({from} -> {to})"),
            Op::Symlink { target, path } => write!(f, "Symlink({path} -> {target})"),
            Op::Digest => write!(f, "Digest"),
        }
    }
}

/// The application payload of one Raft entry.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Random id of the daemon run that proposed it. Only that run holds overlay data for
    /// the batch, so only it drops overlay pieces when the batch is applied.
    pub origin: u64,
    /// Proposal sequence number within `origin`, increasing by one per batch.
    pub seq: u64,
    pub ops: Vec<Op>,
}

/// What applying a batch produced: one errno per op (0 = success). Replicas apply the same
/// ops to identical trees, so they compute the same results; only the proposer reads them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyResult {
    pub errnos: Vec<i32>,
}

/// Error decoding bytes that claim to be an archived value.
#[derive(Debug, thiserror::Error)]
#[error("invalid archived {what}: {reason}")]
pub struct DecodeError {
    pub what: &'static str,
    pub reason: String,
}

impl Batch {
    pub fn encode(&self) -> rkyv::util::AlignedVec {
        // Serialising plain owned data into a growable buffer cannot fail.
        rkyv::to_bytes::<rkyv::rancor::Error>(self).expect("archiving a Batch is infallible")
    }

    /// `bytes` must be 16-byte aligned (an `AlignedVec`); the archive is validated first.
    pub fn decode(bytes: &[u8]) -> Result<Batch, DecodeError> {
        rkyv::from_bytes::<Batch, rkyv::rancor::Error>(bytes).map_err(|e| DecodeError {
            what: "batch",
            reason: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Batch {
        Batch {
            origin: 7,
            seq: 42,
            ops: vec![
                Op::Write {
                    path: "0i0/data.mdb".into(),
                    offset: 4096,
                    data: vec![0xab; 5000],
                },
                Op::Truncate {
                    path: "0i0/data.mdb".into(),
                    size: 1 << 20,
                },
                Op::SetAttr {
                    path: "x".into(),
                    mode: Some(0o600),
                    uid: None,
                    gid: None,
                    atime: Some(Timespec { sec: 5, nsec: 6 }),
                    mtime: None,
                },
                Op::Rename {
                    from: "a.tmp".into(),
                    to: "a".into(),
                    flags: 1,
                },
            ],
        }
    }

    #[test]
    fn batch_round_trips() {
        let b = sample();
        let bytes = b.encode();
        assert_eq!(Batch::decode(&bytes).unwrap(), b);
    }

    #[test]
    fn corrupted_batch_is_rejected_not_misread() {
        let bytes = sample().encode();
        // Flip bytes in the root object area at the end of the archive: validation must
        // notice rather than hand back a different batch.
        let mut bad = rkyv::util::AlignedVec::<16>::new();
        bad.extend_from_slice(&bytes);
        let n = bad.len();
        for b in &mut bad[n - 16..] {
            *b = 0xff;
        }
        assert!(Batch::decode(&bad).is_err());
        assert!(Batch::decode(&bytes[..bytes.len() / 2]).is_err());
    }

    #[test]
    fn namespace_classification() {
        assert!(Op::Mkdir {
            path: "d".into(),
            mode: 0o700
        }
        .is_namespace());
        assert!(!Op::Truncate {
            path: "f".into(),
            size: 0
        }
        .is_namespace());
    }
}
