//! `seguro-fs import`: an existing pier's `.urb/log`, made by the vere-shaped LMDB
//! workload on a plain directory, becomes a node's first committed state. The ship then
//! continues on the mount with every event present; the source is left as it was; a pier
//! whose LMDB env is open in a live process and a used data dir are refused; and in a
//! cluster, a member that starts empty catches up to the imported tree's digest.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::mount::{bin, Daemon, TestDir};
use common::vere;

const IMAGE_BYTES: u64 = 4 << 20;
/// An import or a verify that takes longer than this has hung.
const COMMAND: Duration = Duration::from_secs(120);

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Run `seguro-fs ARGS` (bounded by [`COMMAND`]; killed by PID past it).
fn seguro(args: &[&str]) -> Out {
    let child = Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn seguro-fs");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(COMMAND) {
        Ok(out) => {
            let out = out.unwrap();
            Out {
                ok: out.status.success(),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            }
        }
        Err(_) => {
            common::mount::signal(pid, libc::SIGKILL);
            panic!("seguro-fs {args:?} did not finish within {COMMAND:?}");
        }
    }
}

/// blake3 of every file under `root` (and every symlink's target) by relative path.
fn contents(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                stack.push(p);
                out.insert(rel, "dir".into());
            } else if m.file_type().is_symlink() {
                out.insert(rel, std::fs::read_link(&p).unwrap().display().to_string());
            } else {
                let h = blake3::hash(&std::fs::read(&p).unwrap());
                out.insert(rel, h.to_hex().to_string());
            }
        }
    }
    out
}

#[test]
fn an_existing_pier_is_imported_mounted_and_continues() {
    let t = TestDir::new("import");
    let pier_log = t.join("pier/.urb/log");
    let data = t.join("data");
    let summary = vere::run_workload(&pier_log, 0x1e5, 1500, &t.join("image.src"), IMAGE_BYTES)
        .expect("the workload on a plain directory");
    let before = contents(&pier_log);
    assert!(before.keys().any(|k| k.ends_with("lock.mdb")), "{before:?}");

    let o = seguro(&[
        "import",
        &pier_log.display().to_string(),
        &data.display().to_string(),
    ]);
    assert!(o.ok, "import failed:\n{}\n{}", o.stdout, o.stderr);
    assert!(o.stdout.contains("tree digest"), "{}", o.stdout);
    // Not a terminal here: plain progress lines, ending at 100%.
    assert!(
        o.stderr.lines().any(|l| l
            == format!("import: 100% ({0} of {0} bytes)", {
                before
                    .keys()
                    .filter(|k| !k.ends_with("lock.mdb"))
                    .map(|k| std::fs::metadata(pier_log.join(k)).unwrap())
                    .filter(|m| m.is_file())
                    .map(|m| m.len())
                    .sum::<u64>()
            })),
        "{}",
        o.stderr
    );
    assert_eq!(
        contents(&pier_log),
        before,
        "the source must be left as it was"
    );
    // lock.mdb is host-local: never in the tree.
    for (k, _) in contents(&data.join("tree")) {
        assert!(!k.ends_with("lock.mdb"), "{k} was imported");
    }

    // The operator's procedure: move the old log aside, mount over an empty one.
    std::fs::rename(&pier_log, t.join("pier/.urb/log.imported")).unwrap();
    let d = Daemon::start(&data, &pier_log, &[]);
    vere::verify_workload(&pier_log, &summary, IMAGE_BYTES)
        .unwrap_or_else(|e| panic!("imported pier on the mount: {e}\n{}", d.log_text()));
    // The ship continues where it stopped.
    let (_, last_dir) = vere::epochs(&pier_log).unwrap().pop().unwrap();
    let epoch = vere::Epoch::open(&last_dir).unwrap();
    epoch.commit(summary.last_event + 1, 300).unwrap();
    epoch.close().unwrap();
    let log = d.stop();
    assert!(
        !log.contains("made them private"),
        "the import made the data dir's own files private already:\n{log}"
    );

    let d = Daemon::start(&data, &pier_log, &[]);
    let mut grown = summary.clone();
    grown.last_event += 300;
    grown.epochs.last_mut().unwrap().2 += 300;
    vere::verify_workload(&pier_log, &grown, IMAGE_BYTES)
        .unwrap_or_else(|e| panic!("after the ship continued and a remount: {e}"));
    d.stop();

    // A used data dir is refused, the source still untouched.
    let again = seguro(&[
        "import",
        &t.join("pier/.urb/log.imported").display().to_string(),
        &data.display().to_string(),
    ]);
    assert!(!again.ok);
    assert!(again.stderr.contains("is not empty"), "{}", again.stderr);
}

#[test]
fn a_pier_with_a_live_lmdb_writer_is_refused() {
    let t = TestDir::new("import-live");
    let pier_log = t.join("pier/.urb/log");
    let data = t.join("data");
    vere::create_pier(&pier_log).unwrap();
    // This process plays the running urbit: the epoch's env stays open (LMDB holds its
    // lock on lock.mdb) while another process tries the import.
    let epoch = vere::Epoch::open(&pier_log.join("0i0")).unwrap();
    epoch.commit(1, 10).unwrap();
    let o = seguro(&[
        "import",
        &pier_log.display().to_string(),
        &data.display().to_string(),
    ]);
    assert!(
        !o.ok,
        "an import under a live writer must fail:\n{}",
        o.stdout
    );
    assert!(
        o.stderr.contains("0i0/lock.mdb is locked by process")
            && o.stderr.contains(&std::process::id().to_string())
            && o.stderr.contains("Stop the ship"),
        "{}",
        o.stderr
    );
    assert!(!data.exists(), "nothing may be created on refusal");
    epoch.close().unwrap();
    // Stopped, the same pier imports.
    let o = seguro(&[
        "import",
        &pier_log.display().to_string(),
        &data.display().to_string(),
    ]);
    assert!(o.ok, "{}\n{}", o.stdout, o.stderr);
}

/// Import on one member of a two-node cluster; the other starts empty, gets the tree by
/// snapshot, and both hold the same digest; the ship then commits on the leader.
#[test]
fn an_empty_member_catches_up_to_an_imported_tree() {
    let mut c = Cluster::start(2, None, &[]);
    for i in c.nodes() {
        c.stop(i);
        c.wipe(i);
    }
    let pier = c.dir().join("old/.urb/log");
    let summary = vere::run_workload(&pier, 0x2e5, 600, &c.dir().join("image.src"), IMAGE_BYTES)
        .expect("the workload on a plain directory");
    let arg = |flag: &str| {
        let a = c.args(1);
        a[a.iter().position(|x| x == flag).unwrap() + 1].clone()
    };
    let o = seguro(&[
        "import",
        &pier.display().to_string(),
        &c.data_dir(1).display().to_string(),
        "--node-id",
        "1",
        "--peers",
        &arg("--peers"),
        "--cluster-key-file",
        &arg("--cluster-key-file"),
    ]);
    assert!(o.ok, "import failed:\n{}\n{}", o.stdout, o.stderr);
    let digest = o.stdout.split("tree digest ").nth(1).unwrap()[..64].to_string();
    for i in c.nodes() {
        c.restart(i);
    }
    let leader = c.wait_leader(Duration::from_secs(30));
    assert_eq!(leader, 1, "only the imported member can lead at first");
    c.wait_converged(Duration::from_secs(60));
    let o = seguro(&[
        "verify",
        &c.data_dir(leader).display().to_string(),
        "--json",
    ]);
    assert!(o.ok, "{}{}", o.stdout, o.stderr);
    assert_eq!(
        o.stdout
            .matches(&format!("\"digest\":\"{digest}\""))
            .count(),
        2,
        "both members hold the tree the import made: {}",
        o.stdout
    );
    // The leader's mount shows the imported pier; the follower's tree is the same pier
    // (read from a copy: LMDB opens read-write, and a follower's mount is read-only).
    vere::verify_workload(&c.mountpoint(leader), &summary, IMAGE_BYTES)
        .unwrap_or_else(|e| c.fail(&format!("node {leader}: {e}")));
    let copy = c.dir().join("node2-tree");
    common::mount::copy_tree(&c.data_dir(2).join("tree"), &copy);
    vere::verify_workload(&copy, &summary, IMAGE_BYTES)
        .unwrap_or_else(|e| c.fail(&format!("node 2's tree: {e}")));
    let started = Instant::now();
    let (_, last_dir) = vere::epochs(&c.mountpoint(leader)).unwrap().pop().unwrap();
    let epoch = vere::Epoch::open(&last_dir).unwrap();
    epoch.commit(summary.last_event + 1, 50).unwrap();
    epoch.close().unwrap();
    eprintln!(
        "--- 50 events committed on the leader in {:?}",
        started.elapsed()
    );
    c.wait_converged(Duration::from_secs(60));
    // The mtime the leader showed for the commit's writes is replicated with them.
    let rel = last_dir
        .strip_prefix(c.mountpoint(leader))
        .unwrap()
        .join("data.mdb");
    let mtime = |i: usize| {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(c.data_dir(i).join("tree").join(&rel)).unwrap();
        (m.mtime(), m.mtime_nsec())
    };
    assert_eq!(
        mtime(1),
        mtime(2),
        "{} has the same mtime on both members",
        rel.display()
    );
}
