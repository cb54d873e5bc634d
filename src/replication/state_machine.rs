//! The Raft state machine: committed entries applied, in order, to `tree/`.
//!
//! Replay after a crash starts at the checkpoint, so everything between the checkpoint and
//! the crash is applied again. Data ops (pwrite, ftruncate, chmod, utimes) converge when
//! replayed over any mix of their own partial effects. Namespace ops do not (a rename whose
//! effect persisted while earlier writes to the old name did not would lose those writes),
//! so before applying an entry that holds one, the state machine syncs the tree and
//! checkpoints the index before it: a replay then repeats at most that single namespace
//! op, whose second application is a harmless ENOENT/EEXIST.
//!
//! A checkpoint is also what openraft calls a snapshot here: `build_snapshot` syncs the tree
//! and records the applied id, after which openraft may purge the log below it.

use std::io::{self, Cursor};
use std::sync::{Arc, Mutex};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    AnyError, EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership,
};
use tokio::sync::watch;

use super::checkpoint::{Checkpoint, CheckpointFile};
use super::{Entry, TypeConfig};
use crate::fs::overlay::Overlay;
use crate::op::ApplyResult;
use crate::tree::TreeApplier;

type StorageResult<T> = Result<T, StorageError<u64>>;

fn sm_err(e: io::Error) -> StorageError<u64> {
    StorageIOError::write_state_machine(AnyError::new(&e)).into()
}

/// The overlay of the daemon run that proposes batches from `origin`.
#[derive(Clone)]
pub struct OverlayLink {
    pub origin: u64,
    pub overlay: Arc<Mutex<Overlay>>,
}

struct Inner {
    tree: TreeApplier,
    ckpt_file: CheckpointFile,
    applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, openraft::BasicNode>,
    /// The last checkpoint written (what `get_current_snapshot` reports).
    snapshot: Option<Checkpoint>,
    overlay: Option<OverlayLink>,
    applied_tx: watch::Sender<u64>,
}

impl Inner {
    fn checkpoint(&mut self) -> io::Result<Checkpoint> {
        self.tree.sync()?;
        let c = Checkpoint {
            applied: self.applied,
            membership: self.membership.clone(),
        };
        self.ckpt_file.write(&c)?;
        self.snapshot = Some(c.clone());
        Ok(c)
    }

    fn apply_one(&mut self, entry: Entry) -> io::Result<ApplyResult> {
        let mut result = ApplyResult::default();
        match entry.payload {
            EntryPayload::Blank => {}
            EntryPayload::Membership(m) => {
                self.membership = StoredMembership::new(Some(entry.log_id), m);
            }
            EntryPayload::Normal(batch) => {
                if batch.ops.iter().any(|op| op.is_namespace()) {
                    self.checkpoint()?;
                }
                // Hold the overlay lock across apply + drop so readers never see the bytes
                // in neither place (or twice with different values).
                let link = self.overlay.clone().filter(|l| l.origin == batch.origin);
                let mut guard = link
                    .as_ref()
                    .map(|l| l.overlay.lock().expect("overlay mutex poisoned"));
                for op in &batch.ops {
                    result.errnos.push(self.tree.apply(op)?);
                }
                if let Some(g) = guard.as_mut() {
                    g.drop_upto(batch.seq);
                }
            }
        }
        self.applied = Some(entry.log_id);
        self.applied_tx.send_replace(entry.log_id.index);
        Ok(result)
    }
}

/// Handle to the state machine; clones share it (the snapshot builder is a clone).
#[derive(Clone)]
pub struct StateMachine {
    inner: Arc<Mutex<Inner>>,
}

impl StateMachine {
    /// Open the state machine over `tree/` and the checkpoint file.
    pub fn open(
        tree_dir: std::path::PathBuf,
        checkpoint_path: &std::path::Path,
        open_files_max: usize,
        overlay: Option<OverlayLink>,
    ) -> io::Result<(StateMachine, watch::Receiver<u64>)> {
        let (ckpt_file, c) = CheckpointFile::open(checkpoint_path)?;
        let (applied_tx, applied_rx) = watch::channel(c.applied.map_or(0, |l| l.index));
        let snapshot = c.applied.map(|_| c.clone());
        Ok((
            StateMachine {
                inner: Arc::new(Mutex::new(Inner {
                    tree: TreeApplier::new(tree_dir, open_files_max),
                    ckpt_file,
                    applied: c.applied,
                    membership: c.membership,
                    snapshot,
                    overlay,
                    applied_tx,
                })),
            },
            applied_rx,
        ))
    }

    #[cfg(test)]
    pub fn for_test(dir: &std::path::Path) -> io::Result<StateMachine> {
        std::fs::create_dir_all(dir.join("tree"))?;
        Ok(Self::open(dir.join("tree"), &dir.join("applied"), 8, None)?.0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("state machine mutex poisoned")
    }

    /// Sync the tree and record the applied id (also done on clean shutdown).
    pub fn checkpoint_now(&self) -> io::Result<()> {
        self.lock().checkpoint().map(drop)
    }
}

fn to_snapshot(c: &Checkpoint) -> Snapshot<TypeConfig> {
    let index = c.applied.map_or(0, |l| l.index);
    Snapshot {
        meta: SnapshotMeta {
            last_log_id: c.applied,
            last_membership: c.membership.clone(),
            snapshot_id: format!("checkpoint-{index}"),
        },
        // The tree itself is the state; shipping it to another node is not part of the
        // single-node build, so the transferable data is empty (see install_snapshot).
        snapshot: Box::new(Cursor::new(Vec::new())),
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let c = self.lock().checkpoint().map_err(sm_err)?;
        Ok(to_snapshot(&c))
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(
        Option<LogId<u64>>,
        StoredMembership<u64, openraft::BasicNode>,
    )> {
        let g = self.lock();
        Ok((g.applied, g.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<ApplyResult>>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut g = self.lock();
        let mut out = Vec::new();
        for entry in entries {
            let id = entry.log_id;
            let r = g
                .apply_one(entry)
                .map_err(|e| StorageError::from(StorageIOError::apply(id, AnyError::new(&e))))?;
            out.push(r);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        _meta: &SnapshotMeta<u64, openraft::BasicNode>,
        _snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        Err(sm_err(io::Error::new(
            io::ErrorKind::Unsupported,
            "installing a tree snapshot from another node is not supported by this build \
             (single-node); copy the data dir instead",
        )))
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        Ok(self.lock().snapshot.as_ref().map(to_snapshot))
    }
}
