//! The file system over a fake [`Pipeline`]: what `Fs` decides by itself (errnos, the
//! overlay, what it hands to replication), without openraft, a runtime or a FUSE mount.

use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::*;
use crate::replication::group_commit::GroupCommit;
use crate::replication::pipeline::ProposeError;
use crate::sync::tests::TempDir;
use crate::tree::TreeApplier;

/// One node that never replicates: ops proposed alone are applied to the tree at once,
/// data ops stay in the group commit for the test to inspect, and fsync answers whatever
/// the test set.
struct Fake {
    group: Mutex<GroupCommit>,
    tree: Mutex<TreeApplier>,
    writable: AtomicBool,
    durable: Mutex<FsyncOutcome>,
    alone: Mutex<Vec<Op>>,
    /// Ops proposed alone time out unapplied (a full disk held them up).
    stall: AtomicBool,
}

impl Pipeline for Fake {
    fn writable(&self) -> bool {
        self.writable.load(Ordering::SeqCst)
    }
    fn failed(&self) -> bool {
        false
    }
    fn accept(&self, add: &mut dyn FnMut(&mut GroupCommit)) {
        add(&mut self.group.lock().unwrap());
    }
    fn propose_alone(&self, op: Op) -> Result<i32, ProposeError> {
        self.alone.lock().unwrap().push(op.clone());
        if self.stall.load(Ordering::SeqCst) {
            return Err(ProposeError::Timeout);
        }
        Ok(self.tree.lock().unwrap().apply(&op).unwrap())
    }
    fn durable(&self) -> FsyncOutcome {
        *self.durable.lock().unwrap()
    }
    fn wait_until(&self, ready: &dyn Fn() -> bool) -> bool {
        ready()
    }
    fn drop_unproposed(&self) {
        self.group.lock().unwrap().clear();
    }
}

struct Setup {
    fs: Fs,
    fake: Arc<Fake>,
    registry: Arc<Registry>,
    _dir: TempDir,
}

fn setup() -> Setup {
    let dir = TempDir::new("fs");
    let tree = dir.path().join("tree");
    let local = dir.path().join("local");
    fs::create_dir_all(&tree).unwrap();
    fs::create_dir_all(&local).unwrap();
    let limits = Limits::default();
    let fake = Arc::new(Fake {
        group: Mutex::new(GroupCommit::new(1, limits.entry_bytes_max)),
        tree: Mutex::new(TreeApplier::new(
            tree.clone(),
            crate::tree::TreeLimits {
                open_files_max: 8,
                direct_bytes_min: 256 << 10,
            },
        )),
        writable: AtomicBool::new(true),
        durable: Mutex::new(FsyncOutcome::Ok),
        alone: Mutex::default(),
        stall: AtomicBool::new(false),
    });
    let registry = Arc::new(Registry::new(&limits, []));
    let fs = Fs::new(FsParts {
        data_dir: dir.path().to_path_buf(),
        tree_root: tree,
        local_root: local,
        local_names: vec!["lock.mdb".into()],
        limits,
        overlay: Arc::default(),
        pipeline: fake.clone(),
        registry: registry.clone(),
    })
    .unwrap();
    Setup {
        fs,
        fake,
        registry,
        _dir: dir,
    }
}

const ME: Owner = Owner { uid: 0, gid: 0 };

/// Create `name` in the root: its inode number and file handle.
fn create(s: &Setup, name: &str) -> (u64, u64) {
    let (attr, fh) =
        s.fs.create(ROOT_INO, OsStr::new(name), 0o600, 0, ME)
            .unwrap();
    (attr.ino.into(), fh)
}

/// Every op the group commit holds, in order, sealing the open batch.
fn accepted(fake: &Fake) -> Vec<Op> {
    let mut g = fake.group.lock().unwrap();
    g.seal();
    std::iter::from_fn(|| g.take_sealed())
        .flat_map(|s| s.batch.ops)
        .collect()
}

#[test]
fn a_write_reads_back_at_once_and_waits_in_the_open_batch() {
    let s = setup();
    let (ino, fh) = create(&s, "data.mdb");
    assert_eq!(s.fs.write(ino, fh, 4096, b"page").unwrap(), 4);
    // Not applied anywhere: the overlay answers reads and the size.
    assert_eq!(s.fs.read(ino, fh, 4096, 8).unwrap(), b"page");
    assert_eq!(s.fs.getattr(ino).unwrap().size, 4100);
    let ops = accepted(&s.fake);
    assert!(
        matches!(&ops[..], [Op::Write { path, offset: 4096, data }, Op::SetAttr { mtime: Some(_), .. }]
            if path == "data.mdb" && data[..] == b"page"[..]),
        "{ops:?}"
    );
}

/// An op answered EIO because it did not apply in time may still apply (a full disk held
/// it up): the leader's kernel kept its cache as if the op failed, so when it applies it
/// is invalidated like another node's op, once; an own op that was answered is not.
#[test]
fn an_op_answered_eio_that_applies_after_all_is_treated_as_foreign() {
    use crate::replication::state_machine::ApplyObserver;
    let s = setup();
    let (ino, fh) = create(&s, "data.mdb");
    s.fs.release(fh);
    let known = |path: &str| s.fs.inodes.lock().unwrap().find(Area::Tree, path).is_some();
    assert!(known("data.mdb"));

    s.fake.stall.store(true, Ordering::SeqCst);
    assert_eq!(
        s.fs.unlink(ROOT_INO, OsStr::new("data.mdb")),
        Err(Errno(libc::EIO))
    );
    assert!(
        known("data.mdb"),
        "answered EIO: the name stays as the kernel sees it"
    );

    // Later the unlink applies after all, as this leader's own op.
    let op = Op::Unlink {
        path: "data.mdb".into(),
    };
    assert_eq!(s.fake.tree.lock().unwrap().apply(&op).unwrap(), 0);
    s.fs.applied(&op, true);
    assert!(!known("data.mdb"), "applied after all: the name is dropped");
    assert_eq!(
        s.fs.getattr(ino).map(|_| ()),
        Err(Errno(libc::ENOENT)),
        "and the file is gone from the mount"
    );

    // An own op that was answered is the kernel's already; an abandoned op counts once.
    s.fake.stall.store(false, Ordering::SeqCst);
    create(&s, "data.mdb");
    s.fs.applied(&op, true);
    assert!(
        known("data.mdb"),
        "nothing abandoned any more: own ops are skipped"
    );
}

#[test]
fn fsync_answers_what_the_pipeline_proved_and_counts_it() {
    let s = setup();
    assert_eq!(s.fs.wait_durable(), Ok(()));
    *s.fake.durable.lock().unwrap() = FsyncOutcome::NotLeader;
    assert_eq!(s.fs.wait_durable(), Err(Errno(libc::EIO)));
    *s.fake.durable.lock().unwrap() = FsyncOutcome::Timeout;
    assert_eq!(s.fs.wait_durable(), Err(Errno(libc::EIO)));
    assert_eq!(s.registry.fsync.count(FsyncOutcome::Ok), 1);
    assert_eq!(s.registry.fsync.count(FsyncOutcome::NotLeader), 1);
    assert_eq!(s.registry.fsync.count(FsyncOutcome::Timeout), 1);
}

#[test]
fn a_namespace_op_answers_the_trees_errno() {
    let s = setup();
    s.fs.mkdir(ROOT_INO, OsStr::new("chk"), 0o700, ME).unwrap();
    assert_eq!(
        s.fs.mkdir(ROOT_INO, OsStr::new("chk"), 0o700, ME),
        Err(Errno(libc::EEXIST))
    );
    assert_eq!(s.fake.alone.lock().unwrap().len(), 2);
    assert!(accepted(&s.fake).is_empty(), "a namespace op travels alone");
}

#[test]
fn nothing_is_accepted_while_not_writable() {
    let s = setup();
    let (ino, fh) = create(&s, "f");
    s.fake.writable.store(false, Ordering::SeqCst);
    assert_eq!(s.fs.write(ino, fh, 0, b"x"), Err(Errno(libc::EROFS)));
    assert_eq!(
        s.fs.mkdir(ROOT_INO, OsStr::new("d"), 0o700, ME),
        Err(Errno(libc::EROFS))
    );
    assert!(accepted(&s.fake).is_empty());
    assert_eq!(s.fake.alone.lock().unwrap().len(), 1, "only the create");
}

#[test]
fn fallocate_proposes_a_truncate_only_to_grow() {
    let s = setup();
    let (ino, fh) = create(&s, "image.bin");
    s.fs.write(ino, fh, 0, &[1u8; 100]).unwrap();
    accepted(&s.fake);
    // Within what the overlay already holds: nothing to replicate.
    s.fs.fallocate(ino, fh, 0, 50, 0).unwrap();
    assert!(accepted(&s.fake).is_empty());
    s.fs.fallocate(ino, fh, 0, 4096, 0).unwrap();
    let ops = accepted(&s.fake);
    assert!(
        matches!(
            &ops[..],
            [Op::Truncate { size: 4096, .. }, Op::SetAttr { .. }]
        ),
        "{ops:?}"
    );
    assert_eq!(s.fs.getattr(ino).unwrap().size, 4096);
}
