//! The subset of the daemon's `replication` module the decoders need: `record`, `wire`, and
//! `snapshot` + `checkpoint` (the snapshot file type is part of the type configuration).
//! `TypeConfig` and `Entry` repeat src/replication/mod.rs, which cannot be included: it
//! starts nodes and pulls in the whole daemon. Keep them identical.

use crate::op::{ApplyResult, Batch};
use openraft::BasicNode;

#[path = "../../src/replication/checkpoint.rs"]
pub mod checkpoint;
#[path = "../../src/replication/record.rs"]
pub mod record;
#[path = "../../src/replication/snapshot.rs"]
pub mod snapshot;
#[path = "../../src/replication/wire.rs"]
pub mod wire;

openraft::declare_raft_types!(
    pub TypeConfig:
        D = Batch,
        R = ApplyResult,
        NodeId = u64,
        Node = BasicNode,
        SnapshotData = snapshot::SnapshotFile,
);

pub type Entry = openraft::Entry<TypeConfig>;
