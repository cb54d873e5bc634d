//! The replicated operations: what a mutating FUSE request becomes in the Raft log.
//!
//! Ops are addressed by path relative to the tree root, because the tree on every replica is
//! a plain directory that mirrors the mount (a replica's `tree/` is itself a usable
//! `.urb/log`). A [`Batch`] is the payload of one Raft entry (group commit): the leader packs
//! many data ops into one batch, while a namespace op always travels alone so the state
//! machine can put a durability barrier around it (see `tree.rs`).
//!
//! Encoding is rkyv; decoding always validates (`rkyv::from_bytes` checks the archive) because
//! the bytes come from disk or from a peer.

use std::ops::Deref;
use std::sync::Arc;

use rkyv::rancor::Fallible;
use rkyv::ser::{Allocator, Writer};
use rkyv::vec::{ArchivedVec, VecResolver};
use rkyv::with::{ArchiveWith, DeserializeWith, SerializeWith};
use rkyv::{Archive, Deserialize, Place, Serialize};

/// A write's bytes, shared: on the node that accepted the write, the op in its batch, the
/// overlay piece that serves reads until it is applied, and every clone openraft makes of
/// the entry while it is in the log's cache (the apply's and each replication stream's
/// reads) hold one buffer instead of a copy each. An entry decoded from disk or from a
/// peer gets a buffer of its own.
pub type Bytes = Arc<[u8]>;

/// Archives a shared byte buffer ([`Bytes`], or an early send's `Arc<Vec<u8>>` record)
/// exactly as a `Vec<u8>`, so the log and wire formats are those of earlier releases
/// (`op::tests::a_batch_archived_by_the_previous_release_decodes`) and serialising reads
/// the shared bytes where they are.
pub struct AsVec;

impl<F, T> ArchiveWith<F> for AsVec
where
    F: Deref<Target = T>,
    T: AsRef<[u8]> + ?Sized,
{
    type Archived = ArchivedVec<u8>;
    type Resolver = VecResolver;

    fn resolve_with(field: &F, resolver: VecResolver, out: Place<ArchivedVec<u8>>) {
        ArchivedVec::resolve_from_len(field.deref().as_ref().len(), resolver, out);
    }
}

impl<F, T, S> SerializeWith<F, S> for AsVec
where
    F: Deref<Target = T>,
    T: AsRef<[u8]> + ?Sized,
    S: Fallible + Allocator + Writer + ?Sized,
{
    fn serialize_with(field: &F, serializer: &mut S) -> Result<VecResolver, S::Error> {
        ArchivedVec::<u8>::serialize_from_slice(field.deref().as_ref(), serializer)
    }
}

impl<D: Fallible + ?Sized> DeserializeWith<ArchivedVec<u8>, Bytes, D> for AsVec {
    fn deserialize_with(field: &ArchivedVec<u8>, _: &mut D) -> Result<Bytes, D::Error> {
        Ok(Arc::from(field.as_slice()))
    }
}

impl<D: Fallible + ?Sized> DeserializeWith<ArchivedVec<u8>, Arc<Vec<u8>>, D> for AsVec {
    fn deserialize_with(field: &ArchivedVec<u8>, _: &mut D) -> Result<Arc<Vec<u8>>, D::Error> {
        Ok(Arc::new(field.as_slice().to_vec()))
    }
}

/// Seconds and nanoseconds since the Unix epoch, as `utimensat` takes them.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timespec {
    pub sec: i64,
    pub nsec: u32,
}

/// Who a new file belongs to: the caller's uid and gid as the kernel gave them (FUSE
/// sends the caller's fsuid/fsgid), applied with the same ids on every member.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// What an [`Op::Make`] creates.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum NodeKind {
    /// open(O_CREAT [| O_EXCL]) of a regular file; `mode` holds permission bits only.
    File {
        mode: u32,
        excl: bool,
    },
    Dir {
        mode: u32,
    },
    Symlink {
        target: String,
    },
    /// mknod of a FIFO, socket or device node: `mode` holds the type bits too. Only the
    /// node is replicated, never what passes through it.
    Special {
        mode: u32,
        rdev: u64,
    },
}

/// One replicated file-system operation.
///
/// Variants are only ever appended: an archived enum keeps its earlier discriminants and
/// layout when a variant no larger than the largest (`SetAttr`) is added, so a log written
/// by an earlier release still decodes (`op::tests::a_batch_archived_by_the_previous_release_decodes`).
#[derive(Archive, Serialize, Deserialize, Clone, PartialEq, Eq)]
pub enum Op {
    /// pwrite of `data` at `offset` (data ops are idempotent: replay converges).
    Write {
        path: String,
        offset: u64,
        #[rkyv(with = AsVec)]
        data: Bytes,
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
    /// open(O_CREAT [| O_EXCL]) of a regular file, owned by the applying daemon: what
    /// releases before [`Op::Make`] proposed. Still applied when found in a log.
    Create {
        path: String,
        mode: u32,
        excl: bool,
    },
    /// mkdir owned by the applying daemon (releases before [`Op::Make`]).
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
    /// symlink owned by the applying daemon (releases before [`Op::Make`]).
    Symlink {
        target: String,
        path: String,
    },
    /// No change to the tree: a barrier at which every replica records the digest of its
    /// tree (`seguro-fs verify` compares them at one index). Travels alone in its batch.
    Digest,
    /// A new name of any kind, owned by its creator, with exactly the mode it asked for.
    Make {
        path: String,
        kind: NodeKind,
        owner: Owner,
    },
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
                | Op::Make { .. }
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
            Op::Make { path, kind, .. } => match kind {
                NodeKind::Symlink { target } => path.len() + target.len(),
                _ => path.len(),
            },
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
            Op::Make { path, kind, owner } => {
                write!(f, "Make({path}, {kind:?}, {}:{})", owner.uid, owner.gid)
            }
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
                    data: vec![0xab; 5000].into(),
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

    /// A batch archived by the release before `Op::Make` (bytes taken from it): the log of
    /// an upgraded node must still decode, with every op as it was.
    #[test]
    fn a_batch_archived_by_the_previous_release_decodes() {
        const OLD: &str = "3069302f646174612e6d646261626300030000008c000000ecffffffb401000001000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000004000000306935ffffffffffed0100000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000900000074ffffffffffffff6cffffffffffffff00000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000200000078ffffffffffffff010000008001000001000000050000000000000000000000000000000000000000000000000000000000000000000000000000000100000000000000070000000000000008000000000000000000000066ffffffffffffff00000000040000000000000084feffff0300000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000300000000000000090000000000000038feffff05000000";
        let mut bytes = rkyv::util::AlignedVec::<16>::new();
        for i in (0..OLD.len()).step_by(2) {
            bytes.push(u8::from_str_radix(&OLD[i..i + 2], 16).unwrap());
        }
        let want = Batch {
            origin: 3,
            seq: 9,
            ops: vec![
                Op::Create {
                    path: "0i0/data.mdb".into(),
                    mode: 0o664,
                    excl: true,
                },
                Op::Mkdir {
                    path: "0i5".into(),
                    mode: 0o755,
                },
                Op::Symlink {
                    target: "t".into(),
                    path: "l".into(),
                },
                Op::SetAttr {
                    path: "x".into(),
                    mode: Some(0o600),
                    uid: Some(5),
                    gid: None,
                    atime: None,
                    mtime: Some(Timespec { sec: 7, nsec: 8 }),
                },
                Op::Write {
                    path: "f".into(),
                    offset: 4,
                    data: b"abc".to_vec().into(),
                },
            ],
        };
        assert_eq!(Batch::decode(&bytes).unwrap(), want);
        // And this release archives it to the very same bytes (a write's data is `Bytes`
        // now, archived through `AsVec` as the `Vec<u8>` it was).
        assert_eq!(want.encode().as_slice(), bytes.as_slice());
        // The archived op's size (the stride of the op vector) is what it was.
        assert_eq!(std::mem::size_of::<ArchivedOp>(), 88);
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
