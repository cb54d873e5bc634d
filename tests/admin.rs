//! The operator commands on real three- and four-process clusters: `members add|remove`,
//! `learner add --until-index`, `transfer-leader`, `verify` (and that it catches a tampered
//! byte), `restore` into an empty directory, and `rekey` (rotating the cluster key).

mod common;

use std::fs::{self, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::cluster::{dir_digest, Cluster, Status};
use common::mount::{bin, write_fsync};
use common::vere;

const ELECTION: Duration = Duration::from_secs(20);
const CONVERGE: Duration = Duration::from_secs(90);
/// Longest any one admin command may run in these tests.
const COMMAND: Duration = Duration::from_secs(120);
const IMAGE_BYTES: u64 = 1 << 20;

/// One cluster test at a time in this process.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a finished `seguro-fs` command printed.
struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Run `seguro-fs ARGS`, killing it if it outlives [`COMMAND`].
fn seguro(args: &[&str]) -> Out {
    let mut child = Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn seguro-fs");
    let deadline = Instant::now() + COMMAND;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("seguro-fs {args:?} did not finish within {COMMAND:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    eprintln!(
        "$ seguro-fs {} -> {status}\n{stdout}{stderr}",
        args.join(" ")
    );
    Out {
        ok: status.success(),
        stdout,
        stderr,
    }
}

fn data(c: &Cluster, i: usize) -> String {
    c.data_dir(i).display().to_string()
}

fn status(c: &Cluster, i: usize) -> Status {
    c.status(i)
        .unwrap_or_else(|| c.fail(&format!("node {i} does not answer status")))
}

/// `seguro-fs restore` from the member at `from` into `dest`.
fn restore(from: &str, key: &str, dest: &std::path::Path) -> Out {
    seguro(&[
        "restore",
        "--from",
        from,
        "--cluster-key-file",
        key,
        dest.to_str().unwrap(),
    ])
}

/// `seguro-fs restore --update` from the member at `from` into `dest`.
fn restore_update(from: &str, key: &str, dest: &std::path::Path) -> Out {
    seguro(&[
        "restore",
        "--update",
        "--from",
        from,
        "--cluster-key-file",
        key,
        dest.to_str().unwrap(),
    ])
}

/// The byte count in `restore`'s summary ("…: N {what} bytes, …").
fn restored_bytes(stdout: &str, what: &str) -> u64 {
    let end = stdout
        .find(&format!(" {what} bytes"))
        .unwrap_or_else(|| panic!("no '{what} bytes' in {stdout}"));
    stdout[..end]
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no byte count in {stdout}"))
}

/// `seguro-fs members remove` of node `id`, asked of node `via`.
fn remove(c: &Cluster, via: usize, id: usize) -> Out {
    seguro(&["members", "remove", &data(c, via), &id.to_string()])
}

fn learners(st: &Status) -> Vec<u64> {
    let raw = &st.raw;
    let Some(start) = raw.find("\"learners\":[") else {
        return vec![];
    };
    let rest = &raw[start + 12..];
    rest[..rest.find(']').unwrap_or(0)]
        .split(',')
        .filter_map(|x| x.trim().parse().ok())
        .collect()
}

// -------------------------------------------------------------------------------------------
// Membership changes and leadership transfer
// -------------------------------------------------------------------------------------------

#[test]
fn members_add_remove_and_transfer_leader() {
    let _serial = serial();
    let mut c = Cluster::start_with_spares(4, 3, Some(1), &[]);
    let leader = c.wait_leader(ELECTION);
    let follower = (1..=3).find(|&i| i != leader).unwrap();
    write_fsync(&c.mountpoint(leader).join("before"), b"written by 3 voters").unwrap();

    phase("a follower refuses membership commands and names the leader");
    let addr4 = c.peer_addr(4);
    let o = seguro(&["members", "add", &data(&c, follower), "4", &addr4]);
    assert!(!o.ok, "members add on a follower must fail");
    assert!(
        o.stderr.contains("not the leader") && o.stderr.contains(&format!("node {leader}")),
        "{}",
        o.stderr
    );

    phase("start node 4 empty and add it as a voter");
    c.restart(4);
    let o = seguro(&["members", "add", &data(&c, leader), "4", &addr4]);
    assert!(o.ok, "members add failed: {}", o.stderr);
    c.wait_for("node 4 listed as a voter", ELECTION, || {
        (status(&c, leader).members == vec![1, 2, 3, 4]).then_some(())
    });
    write_fsync(&c.mountpoint(leader).join("after"), b"written by 4 voters").unwrap();
    let digest = c.wait_converged(CONVERGE);
    assert_eq!(c.tree_digest(4), digest);
    assert_eq!(
        fs::read(c.mountpoint(4).join("before")).unwrap(),
        b"written by 3 voters",
        "the new member's mount shows what was written before it joined"
    );
    let o = seguro(&["members", "add", &data(&c, leader), "4", &addr4]);
    assert!(
        !o.ok && o.stderr.contains("already a voter"),
        "{}",
        o.stderr
    );

    phase("hand leadership to a chosen follower");
    let target = (1..=4).find(|&i| i != leader).unwrap();
    let o = seguro(&[
        "transfer-leader",
        &data(&c, leader),
        "--to",
        &target.to_string(),
    ]);
    assert!(o.ok, "transfer-leader failed: {}", o.stderr);
    let new_leader = c.wait_leader(ELECTION);
    assert_eq!(new_leader, target, "leadership went elsewhere");
    let old = status(&c, leader);
    assert!(!old.writable && old.role != "leader", "{}", old.raw);
    let e = fs::write(c.mountpoint(leader).join("late"), b"x").unwrap_err();
    assert_eq!(
        e.raw_os_error(),
        Some(libc::EROFS),
        "old leader's mount: {e}"
    );
    write_fsync(&c.mountpoint(target).join("by-new-leader"), b"ok").unwrap();
    assert_eq!(
        fs::read(c.mountpoint(target).join("after")).unwrap(),
        b"written by 4 voters"
    );

    phase("remove node 4, then refuse a removal that would starve --acks 1");
    let o = remove(&c, target, 4);
    assert!(o.ok, "members remove failed: {}", o.stderr);
    c.wait_for("node 4 gone from the membership", ELECTION, || {
        (status(&c, target).members == vec![1, 2, 3]).then_some(())
    });
    c.stop(4);
    let others: Vec<usize> = (1..=3).filter(|&i| i != target).collect();
    let o = remove(&c, target, others[0]);
    assert!(
        o.ok,
        "removing a second voter (3 -> 2) failed: {}",
        o.stderr
    );
    c.wait_for("two voters left", ELECTION, || {
        (status(&c, target).members.len() == 2).then_some(())
    });
    c.stop(others[0]);
    let o = remove(&c, target, others[1]);
    assert!(
        !o.ok,
        "removing down to one voter with --acks 1 must be refused"
    );
    assert!(o.stderr.contains("lower --acks"), "{}", o.stderr);
    write_fsync(&c.mountpoint(target).join("two-voters"), b"still acked").unwrap();
}

/// Phase markers in the test output (the cluster tests narrate the same way).
fn phase(what: &str) {
    eprintln!("--- {what}");
}

// -------------------------------------------------------------------------------------------
// Export learner
// -------------------------------------------------------------------------------------------

#[test]
fn learner_until_index_is_an_export_frozen_there() {
    let _serial = serial();
    let mut c = Cluster::start_with_spares(4, 3, Some(1), &[]);
    let leader = c.wait_leader(ELECTION);
    let mnt = c.mountpoint(leader);
    write_fsync(&mnt.join("a"), b"version one").unwrap();
    c.wait_converged(CONVERGE);
    let until = status(&c, leader).applied_index;

    phase(&format!(
        "add node 4 as an export learner until index {until}"
    ));
    c.restart(4);
    let o = seguro(&[
        "learner",
        "add",
        &data(&c, leader),
        "4",
        &c.peer_addr(4),
        "--until-index",
        &until.to_string(),
    ]);
    assert!(o.ok, "learner add failed: {}", o.stderr);
    let st = status(&c, leader);
    assert_eq!(st.members, vec![1, 2, 3], "{}", st.raw);
    assert_eq!(learners(&st), vec![4], "{}", st.raw);

    phase("write past the export index");
    write_fsync(&mnt.join("a"), b"version two, longer").unwrap();
    write_fsync(&mnt.join("b"), b"after the export").unwrap();
    let last = status(&c, leader).last_index;
    c.wait_for("node 4 holds the whole log", ELECTION, || {
        let st = status(&c, 4);
        (st.last_index >= last && st.applied_index >= last).then_some(())
    });
    let st4 = status(&c, 4);
    assert!(
        st4.raw.contains(&format!("\"export_until\":{until}")),
        "{}",
        st4.raw
    );
    let tree4 = c.data_dir(4).join("tree");
    assert_eq!(fs::read(tree4.join("a")).unwrap(), b"version one");
    assert!(
        !tree4.join("b").exists(),
        "b was written after the export index"
    );
    assert_eq!(
        fs::read(c.mountpoint(4).join("a")).unwrap(),
        b"version one",
        "the export's read-only mount shows the frozen state"
    );

    phase("verify leaves the export out; the voters agree");
    let o = seguro(&["verify", &data(&c, leader), "--json"]);
    assert!(o.ok, "verify: {}{}", o.stdout, o.stderr);
    assert!(
        o.stdout
            .contains("\"id\":4,\"digest\":null,\"export\":true"),
        "{}",
        o.stdout
    );

    phase("the export survives a restart still frozen, and never campaigns");
    c.stop(4);
    c.restart(4);
    c.wait_for("node 4 answers again", ELECTION, || c.status(4));
    assert_eq!(fs::read(tree4.join("a")).unwrap(), b"version one");
    let o = seguro(&["transfer-leader", &data(&c, leader), "--to", "4"]);
    assert!(!o.ok, "an export learner is not a voter: {}", o.stdout);
    let o = seguro(&["members", "add", &data(&c, leader), "4", &c.peer_addr(4)]);
    assert!(
        !o.ok && o.stderr.contains("export learner frozen"),
        "an export must not be promoted: {}",
        o.stderr
    );

    phase("remove the export learner");
    let o = remove(&c, leader, 4);
    assert!(o.ok, "removing the learner: {}", o.stderr);
    c.wait_for("node 4 gone", ELECTION, || {
        learners(&status(&c, leader)).is_empty().then_some(())
    });

    phase("a voter cannot be turned into an export");
    let f = (1..=3).find(|&i| i != leader).unwrap();
    let o = seguro(&[
        "learner",
        "add",
        &data(&c, leader),
        &f.to_string(),
        &c.peer_addr(f),
        "--until-index",
        "1",
    ]);
    assert!(
        !o.ok && o.stderr.contains("already a member"),
        "{}",
        o.stderr
    );
}

// -------------------------------------------------------------------------------------------
// verify and restore
// -------------------------------------------------------------------------------------------

#[test]
fn verify_catches_a_tampered_byte_and_restore_copies_the_tree() {
    let _serial = serial();
    let c = Cluster::start(3, Some(1), &[]);
    let leader = c.wait_leader(ELECTION);
    let image = c.dir().join("image.src");
    let summary = vere::run_workload(&c.mountpoint(leader), 0x5e_c0_de, 300, &image, IMAGE_BYTES)
        .unwrap_or_else(|e| c.fail(&format!("workload: {e}")));
    let digest = c.wait_converged(CONVERGE);

    phase("verify on identical replicas");
    let o = seguro(&["verify", &data(&c, leader)]);
    assert!(o.ok, "verify: {}{}", o.stdout, o.stderr);
    assert!(
        o.stdout.contains("all members hold identical trees"),
        "{}",
        o.stdout
    );
    let o = seguro(&["verify", &data(&c, leader), "--json"]);
    let digests: Vec<&str> = o
        .stdout
        .split("\"digest\":\"")
        .skip(1)
        .map(|s| &s[..64])
        .collect();
    assert_eq!(digests.len(), 3, "{}", o.stdout);
    assert!(digests.iter().all(|d| *d == digests[0]), "{}", o.stdout);
    // The table names every member with its digest.
    let table = seguro(&["verify", &data(&c, leader)]).stdout;
    assert_eq!(table.matches(digests[0]).count(), 3, "{table}");

    phase("restore from a follower into an empty directory");
    let follower = (1..=3).find(|&i| i != leader).unwrap();
    let dest = c.dir().join("restored/.urb/log");
    let key = c.key_file.display().to_string();
    let from = c.peer_addr(follower);
    let o = restore(&from, &key, &dest);
    assert!(o.ok, "restore: {}", o.stderr);
    assert!(
        o.stdout.contains(&format!("tree digest {}", digests[0])),
        "{}",
        o.stdout
    );
    assert_eq!(
        dir_digest(&dest).unwrap(),
        digest,
        "the restored directory is byte-identical to the replicas' trees"
    );
    vere::verify_workload(&dest, &summary, IMAGE_BYTES)
        .unwrap_or_else(|e| panic!("the restored copy is not a usable .urb/log: {e}"));
    let leftovers: Vec<_> = fs::read_dir(dest.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "no image left behind: {leftovers:?}");

    let image_bytes = restored_bytes(&o.stdout, "image");

    phase("restore refuses a non-empty destination and a wrong key");
    let o = restore(&from, &key, &dest);
    assert!(!o.ok && o.stderr.contains("not empty"), "{}", o.stderr);

    phase("restore --update brings a damaged copy back, fetching only what it lacks");
    let mut files = vec![];
    let mut dirs = vec![dest.clone()];
    while let Some(d) = dirs.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                dirs.push(e.path());
            } else if m.is_file() {
                files.push((m.len(), e.path()));
            }
        }
    }
    files.sort();
    let (len, biggest) = files.pop().expect("a file in the restored tree");
    let mut bytes = fs::read(&biggest).unwrap();
    bytes[(len / 2) as usize] ^= 0x20;
    fs::write(&biggest, &bytes).unwrap();
    if let Some((_, small)) = files.first() {
        fs::remove_file(small).unwrap();
    }
    let o = restore_update(&from, &key, &dest);
    assert!(o.ok, "restore --update: {}", o.stderr);
    assert_eq!(dir_digest(&dest).unwrap(), digest, "{}", o.stdout);
    let delta_bytes = restored_bytes(&o.stdout, "incremental snapshot");
    assert!(
        delta_bytes < image_bytes,
        "{delta_bytes} bytes fetched for an image of {image_bytes}"
    );
    let leftovers: Vec<_> = fs::read_dir(dest.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "nothing left behind: {leftovers:?}");
    let bad_key = c.dir().join("other.key");
    common::cluster::write_key_file(&bad_key);
    let dest2 = c.dir().join("restored2");
    let o = restore(&from, bad_key.to_str().unwrap(), &dest2);
    assert!(!o.ok, "a wrong key must not restore anything");
    assert!(
        fs::read_dir(&dest2).map_or(true, |mut d| d.next().is_none()),
        "nothing written with a wrong key"
    );

    phase("flip one byte in a follower's tree: verify names it");
    let victim = (1..=3).find(|&i| i != leader && i != follower).unwrap();
    let tree = c.data_dir(victim).join("tree");
    let mdb = fs::read_dir(&tree)
        .unwrap()
        .map(|e| e.unwrap().path().join("data.mdb"))
        .find(|p| p.metadata().is_ok_and(|m| m.len() > 8192))
        .unwrap_or_else(|| panic!("no epoch data.mdb in {}", tree.display()));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&mdb)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 5000).unwrap();
    f.write_all_at(&[b[0] ^ 0x01], 5000).unwrap();
    drop(f);
    let o = seguro(&["verify", &data(&c, leader), "--json"]);
    assert!(
        !o.ok,
        "verify must fail on a tampered replica: {}",
        o.stdout
    );
    let line = o
        .stderr
        .lines()
        .find(|l| l.contains("\"members\""))
        .unwrap_or("");
    let victim_digest = line
        .split(&format!("{{\"id\":{victim},\"digest\":\""))
        .nth(1)
        .map(|s| &s[..64])
        .unwrap_or_else(|| panic!("no digest for node {victim}: {}", o.stderr));
    let honest: Vec<&str> = (1..=3)
        .filter(|&i| i != victim)
        .map(|i| {
            line.split(&format!("{{\"id\":{i},\"digest\":\""))
                .nth(1)
                .map(|s| &s[..64])
                .unwrap()
        })
        .collect();
    assert_ne!(victim_digest, honest[0], "the tampered replica differs");
    assert_eq!(honest[0], honest[1], "the untouched replicas still agree");
    assert_eq!(honest[0], digests[0], "and still hold the digest they had");
}

// -------------------------------------------------------------------------------------------
// Rotating the cluster key
// -------------------------------------------------------------------------------------------

#[test]
fn rekey_rotates_the_cluster_key_keeping_every_data_dir() {
    let _serial = serial();
    let mut c = Cluster::start(3, None, &[]);
    let leader = c.wait_leader(ELECTION);
    write_fsync(
        &c.mountpoint(leader).join("before"),
        b"written under the old key",
    )
    .unwrap();
    let digest = c.wait_converged(CONVERGE);

    phase("rekey refuses a running node's data dir");
    let new_key = c.dir().join("new.key");
    common::cluster::write_key_file(&new_key);
    let new = new_key.display().to_string();
    let o = seguro(&["rekey", &data(&c, 1), "--cluster-key-file", &new]);
    assert!(!o.ok && o.stderr.contains("in use"), "{}", o.stderr);

    phase("stop every member; with the new key file alone a data dir is refused");
    for i in 1..=3 {
        c.stop(i);
        c.set_arg(i, "--cluster-key-file", &new);
    }
    let refused = c
        .start_expecting_refusal(1, COMMAND)
        .unwrap_or_else(|| c.fail("node 1 started on its old data dir with a new key"));
    assert!(refused.contains("seguro-fs rekey"), "{refused}");

    phase("rekey every data dir, start all: same log and tree, links under the new key");
    for i in 1..=3 {
        let o = seguro(&["rekey", &data(&c, i), "--cluster-key-file", &new]);
        assert!(
            o.ok && o.stdout.contains("replaced by key-"),
            "{}",
            o.stderr
        );
    }
    for i in 1..=3 {
        c.restart(i);
    }
    let leader = c.wait_leader(ELECTION);
    assert_eq!(
        c.wait_converged(CONVERGE),
        digest,
        "the trees survived the rotation"
    );
    assert_eq!(
        fs::read(c.mountpoint(leader).join("before")).unwrap(),
        b"written under the old key"
    );
    // An fsync that returns needs a follower's durable ack over a new-key link.
    write_fsync(
        &c.mountpoint(leader).join("after"),
        b"written under the new key",
    )
    .unwrap_or_else(|e| c.fail(&format!("fsync under the new key: {e}")));
    c.wait_converged(CONVERGE);

    phase("the old key no longer opens a link");
    let old = c.key_file.display().to_string();
    let follower = (1..=3).find(|&i| i != leader).unwrap();
    let o = seguro(&[
        "restore",
        "--from",
        &c.peer_addr(follower),
        "--cluster-key-file",
        &old,
        c.dir().join("restored-old").to_str().unwrap(),
    ]);
    assert!(!o.ok, "a link with the old key must be refused");
}
