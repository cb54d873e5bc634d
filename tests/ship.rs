//! The supervised ship (`--ship-command`, src/ship.rs) on clusters of real daemons.
//!
//! The ship is a stand-in for vere ([`ship_child`], this test binary re-executed by each
//! daemon's ship command): it boots as vere does — opens the LMDB event log on the mount
//! (flags 0, 1 TiB map), finds the last event, checks that every event any earlier ship
//! recorded as acknowledged is there, and continues committing — and exits non-zero when
//! a commit fails. Each ship records its acknowledged events in a file of its own outside
//! the mount (`ships/START-NODE-PID.rec`, START in ns so names sort by start), so the test
//! can tell which ship committed what, and registers its pid so a sampler thread can count
//! the ships alive at any moment ([`Ships`]).
//!
//! What is checked: exactly one ship runs, on the writable leader; after kill -9 of the
//! leader, a partition of the leader, a crashing ship, follower restarts and a leadership
//! transfer, the ship comes back where it should with every acknowledged event, no two
//! ships ever run at once (sampled every few ms) and acknowledged event numbers only grow
//! from one ship to the next (no two ships committed). Downtimes are printed, not asserted.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::vere;

/// Ship-test clusters are heavy (three daemons and a ship on two cores): one at a time.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

const SHIP_DIR_ENV: &str = "SEGURO_TEST_SHIP_DIR";
/// Exit code of a ship that found an acknowledged event missing at boot.
const LOST_EXIT: i32 = 42;
/// Longest any one wait here may take before the test fails with the cluster's state.
const WAIT: Duration = Duration::from_secs(60);

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn unix_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// The stand-in ship, run by a daemon's ship command (never by the test runner itself).
#[test]
#[ignore = "the ship that seguro-fs supervises in these tests"]
fn ship_child() {
    let Ok(dir) = std::env::var(SHIP_DIR_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let log = PathBuf::from(std::env::var("SEGURO_MOUNTPOINT").expect("SEGURO_MOUNTPOINT"));
    let node: u64 = env_u64("SEGURO_NODE_ID").expect("SEGURO_NODE_ID");
    let term: u64 = env_u64("SEGURO_TERM").expect("SEGURO_TERM");
    let start = unix_ns();
    let name = format!("{start:024}-{node}-{}", std::process::id());
    fs::write(dir.join("ships").join(&name), term.to_string()).unwrap();
    // Boot as vere does: every event an earlier ship saw acknowledged must be here.
    let acked = Ships::at(&dir).last_acknowledged();
    if acked > 0 {
        if let Err(e) = vere::verify_surviving(&log, acked) {
            fs::write(
                dir.join("LOST"),
                format!("ship {name} booted without acknowledged event {acked}: {e}"),
            )
            .unwrap();
            std::process::exit(LOST_EXIT);
        }
    }
    let opts = vere::WriterOptions {
        roll_every: 300,
        batch_events_max: 20,
        commit_gap: Duration::from_millis(5),
        chop: true,
    };
    let record = dir.join("ships").join(format!("{name}.rec"));
    let r = vere::run_recording_writer_with(&log, &record, start as u64, &opts);
    eprintln!("ship {name} stopped: {r:?}");
    std::process::exit(1);
}

/// The ships' shared directory, and a sampler of how many run at once.
struct Ships {
    dir: PathBuf,
    stop: Arc<AtomicBool>,
    /// Most ships seen alive at once, and for how long (ms, summed) two or more were.
    max_alive: Arc<AtomicU64>,
    overlap_ms: Arc<AtomicU64>,
    sampler: Option<std::thread::JoinHandle<()>>,
}

fn alive(pid: u32) -> bool {
    // A zombie has exited; only its parent has not reaped it yet.
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, r)| !r.starts_with('Z')))
        .unwrap_or(false)
}

impl Ships {
    /// Read-only view (for the ship itself).
    fn at(dir: &Path) -> Ships {
        Ships {
            dir: dir.to_path_buf(),
            stop: Arc::default(),
            max_alive: Arc::default(),
            overlap_ms: Arc::default(),
            sampler: None,
        }
    }

    fn new(dir: &Path) -> Ships {
        fs::create_dir_all(dir.join("ships")).unwrap();
        let mut s = Ships::at(dir);
        let (d, stop, max, overlap) = (
            dir.to_path_buf(),
            s.stop.clone(),
            s.max_alive.clone(),
            s.overlap_ms.clone(),
        );
        s.sampler = Some(std::thread::spawn(move || {
            let view = Ships::at(&d);
            let mut last = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let n = view.alive().len() as u64;
                max.fetch_max(n, Ordering::Relaxed);
                if n >= 2 {
                    overlap.fetch_add(last.elapsed().as_millis() as u64, Ordering::Relaxed);
                }
                last = Instant::now();
                std::thread::sleep(Duration::from_millis(3));
            }
        }));
        s
    }

    /// Every ship that ever started, oldest first: (name, node, pid).
    fn started(&self) -> Vec<(String, u64, u32)> {
        let mut v: Vec<(String, u64, u32)> = fs::read_dir(self.dir.join("ships"))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.ends_with(".rec"))
                    .filter_map(|n| {
                        let mut it = n.split('-');
                        let _start = it.next()?;
                        let node = it.next()?.parse().ok()?;
                        let pid = it.next()?.parse().ok()?;
                        Some((n.clone(), node, pid))
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Ships alive now: (node, pid).
    fn alive(&self) -> Vec<(u64, u32)> {
        self.started()
            .into_iter()
            .filter(|(_, _, pid)| alive(*pid))
            .map(|(_, node, pid)| (node, pid))
            .collect()
    }

    /// Every ship's acknowledged events, in start order.
    fn records(&self) -> Vec<(String, Vec<u64>)> {
        self.started()
            .into_iter()
            .map(|(name, _, _)| {
                let text = fs::read_to_string(self.dir.join("ships").join(format!("{name}.rec")))
                    .unwrap_or_default();
                // A torn last line (no newline) was never acknowledged.
                let complete = text.rfind('\n').map_or("", |i| &text[..i]);
                let events = complete.lines().filter_map(|l| l.parse().ok()).collect();
                (name, events)
            })
            .collect()
    }

    fn last_acknowledged(&self) -> u64 {
        self.records()
            .iter()
            .flat_map(|(_, e)| e.last().copied())
            .max()
            .unwrap_or(0)
    }

    /// No acknowledged event lost at any boot, and event numbers that only grow from one
    /// ship to the next: two ships committing at once would reuse numbers.
    fn check(&self) -> Result<(), String> {
        if let Ok(lost) = fs::read_to_string(self.dir.join("LOST")) {
            return Err(lost);
        }
        let mut prev = 0;
        for (name, events) in self.records() {
            for e in events {
                if e <= prev {
                    return Err(format!(
                        "ship {name} acknowledged event {e} after event {prev} was acknowledged: \
                         two ships committed"
                    ));
                }
                prev = e;
            }
        }
        Ok(())
    }

    fn max_alive(&self) -> u64 {
        self.max_alive.load(Ordering::Relaxed)
    }
}

impl Drop for Ships {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.sampler.take() {
            let _ = t.join();
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// The ship command every member gets: `fail-NODE` in the ship dir makes that node's ship
/// exit at once with code 3 (a host that cannot run the ship).
fn ship_command(dir: &Path) -> String {
    let exe = std::env::current_exe().unwrap();
    format!(
        "[ -e {d}/fail-$SEGURO_NODE_ID ] && exit 3; \
         exec env {SHIP_DIR_ENV}={d} {exe} ship_child --exact --ignored --nocapture --test-threads=1",
        d = dir.display(),
        exe = exe.display()
    )
}

fn start(n: usize, extra: &[&str]) -> (Cluster, Ships) {
    let dir = tempdir();
    let ships = Ships::new(&dir);
    let cmd = ship_command(&dir);
    let mut args = vec!["--ship-command", cmd.as_str()];
    args.extend_from_slice(extra);
    let c = Cluster::start(n, Some(1), &args);
    (c, ships)
}

/// A directory for the ships, outside every mount (removed when its [`Ships`] drops).
fn tempdir() -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let d = std::env::temp_dir().join(format!(
        "seguro-test-ships-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

/// Wait until exactly one ship is alive, on the node that is the writable leader, whose
/// status says running, and which has acknowledged an event past `after`; its node.
fn wait_one_ship(c: &Cluster, ships: &Ships, after: u64) -> usize {
    c.wait_for(
        "one ship running on the writable leader and committing",
        WAIT,
        || {
            let alive = ships.alive();
            let [(node, _)] = alive[..] else {
                return None;
            };
            let node = node as usize;
            let st = c.status(node)?;
            (st.is_writable_leader()
                && st.ship_state == "running"
                && ships.last_acknowledged() > after)
                .then_some(node)
        },
    )
}

fn check(c: &Cluster, ships: &Ships) {
    if let Err(e) = ships.check() {
        c.fail(&e);
    }
    if ships.max_alive() > 1 {
        c.fail(&format!(
            "{} ships ran at once (for about {} ms)",
            ships.max_alive(),
            ships.overlap_ms.load(Ordering::Relaxed)
        ));
    }
}

fn median(v: &mut [u64]) -> u64 {
    v.sort();
    v[v.len() / 2]
}

#[test]
fn one_ship_runs_on_the_leader_and_comes_back_after_kill9_of_the_leader() {
    let _g = serial();
    let (mut c, ships) = start(3, &[]);
    let leader = wait_one_ship(&c, &ships, 0);
    for i in c.nodes().filter(|i| *i != leader) {
        let st = c.status(i).unwrap();
        assert_eq!(st.ship_state, "stopped", "node {i}: {}", st.raw);
    }
    let iters = env_u64("SEGURO_SHIP_ITERS").unwrap_or(3);
    let mut rng = vere::SplitMix64::new(env_u64("SEGURO_SHIP_SEED").unwrap_or(15));
    let mut downtimes = Vec::new();
    let mut leader = leader;
    for it in 0..iters {
        // Let the ship commit for a moment first: the kill lands mid-commit.
        std::thread::sleep(Duration::from_millis(rng.range(100, 600)));
        eprintln!("--- iteration {it}: kill -9 the leader, node {leader}");
        let killed_at = Instant::now();
        let killed_ns = unix_ns();
        c.kill9(leader);
        // Down until the first event acknowledged by a ship started after the kill
        // (polled every few ms: this is the figure the issue asks for).
        let new_leader = loop {
            let back = ships
                .records()
                .into_iter()
                .zip(ships.started())
                .find(|((name, events), _)| {
                    name.split('-').next().and_then(|t| t.parse::<u128>().ok()) > Some(killed_ns)
                        && !events.is_empty()
                })
                .map(|(_, (_, node, _))| node as usize);
            if let Some(n) = back {
                break n;
            }
            if killed_at.elapsed() > WAIT {
                c.fail("no ship started after the kill acknowledged an event");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        assert_ne!(new_leader, leader, "a ship ran on the killed node");
        let down = killed_at.elapsed().as_millis() as u64;
        downtimes.push(down);
        eprintln!("--- ship back on node {new_leader} after {down} ms");
        // The old node restarts as a follower and runs no ship.
        c.restart(leader);
        let before = c.status(new_leader).unwrap().term;
        c.wait_for("the restarted node following", WAIT, || {
            let st = c.status(leader)?;
            (st.role == "follower" && st.leader_id == Some(new_leader as u64)).then_some(())
        });
        let st = c.status(leader).unwrap();
        assert_eq!(st.ship_state, "stopped", "restarted node: {}", st.raw);
        assert_eq!(
            c.status(new_leader).unwrap().term,
            before,
            "the restart deposed the leader"
        );
        leader = wait_one_ship(&c, &ships, ships.last_acknowledged());
        check(&c, &ships);
    }
    let worst = *downtimes.iter().max().unwrap();
    eprintln!(
        "ship downtime after kill -9 of the leader, {iters} runs: median {} ms, worst {worst} ms, all {downtimes:?}",
        median(&mut downtimes.clone())
    );
    check(&c, &ships);
}

#[test]
fn a_partitioned_leader_stops_its_ship_and_one_ship_remains_after_the_heal() {
    let _g = serial();
    let (c, ships) = start(3, &[]);
    let leader = wait_one_ship(&c, &ships, 0);
    std::thread::sleep(Duration::from_millis(300));
    c.partition(&[leader]);
    let acked = ships.last_acknowledged();
    let new_leader = c.wait_for("the majority's leader running the ship", WAIT, || {
        let alive = ships.alive();
        let [(node, _)] = alive[..] else {
            return None;
        };
        (node as usize != leader && ships.last_acknowledged() > acked).then_some(node as usize)
    });
    // The old leader stepped down by itself (check-quorum), partition still in place.
    let st = c.status(leader).unwrap();
    assert!(
        !st.writable,
        "isolated old leader still writable: {}",
        st.raw
    );
    assert_ne!(st.ship_state, "running", "isolated old leader: {}", st.raw);
    c.heal();
    std::thread::sleep(Duration::from_secs(2));
    let after = wait_one_ship(&c, &ships, ships.last_acknowledged());
    assert_eq!(after, new_leader, "the heal moved the ship");
    check(&c, &ships);
}

#[test]
fn a_crashing_ship_is_restarted_with_backoff_then_handed_to_another_member() {
    let _g = serial();
    let (c, ships) = start(
        3,
        &[
            "--ship-restart-backoff-ms",
            "100",
            "--ship-failures-max",
            "2",
        ],
    );
    let leader = wait_one_ship(&c, &ships, 0);
    // This host can no longer run the ship: its next starts exit at once.
    fs::write(ships.dir.join(format!("fail-{leader}")), "").unwrap();
    let [(_, pid)] = ships.alive()[..] else {
        c.fail("not one ship");
    };
    common::mount::signal(pid, libc::SIGKILL);
    let acked = ships.last_acknowledged();
    let new_leader = c.wait_for("the ship handed to another member", WAIT, || {
        let alive = ships.alive();
        let [(node, _)] = alive[..] else {
            return None;
        };
        (node as usize != leader && ships.last_acknowledged() > acked).then_some(node as usize)
    });
    let st = c.status(leader).unwrap();
    assert!(
        st.raw.contains("\"gave_up\":\"the ship failed 3 times"),
        "old leader says why: {}",
        st.raw
    );
    // The kill, then two exits with code 3: three starts in all.
    assert_eq!(st.ship_starts, 3, "{}", st.raw);
    assert!(
        st.raw.contains("\"last_exit\":\"exit code 3\""),
        "{}",
        st.raw
    );
    assert_eq!(c.status(new_leader).unwrap().ship_state, "running");
    check(&c, &ships);
}

#[test]
fn follower_restarts_under_load_change_no_leader() {
    let _g = serial();
    let (mut c, ships) = start(3, &[]);
    let leader = wait_one_ship(&c, &ships, 0);
    let term = c.status(leader).unwrap().term;
    let follower = c.nodes().find(|i| *i != leader).unwrap();
    let restarts = env_u64("SEGURO_SHIP_RESTARTS").unwrap_or(10);
    for r in 0..restarts {
        eprintln!("--- restart {r} of follower {follower}");
        if r % 2 == 0 {
            c.kill9(follower);
        } else {
            c.stop(follower);
        }
        c.restart(follower);
        c.wait_for("the follower following again", WAIT, || {
            let st = c.status(follower)?;
            (st.leader_id == Some(leader as u64)).then_some(())
        });
    }
    let st = c.status(leader).unwrap();
    assert_eq!(st.term, term, "leader changes: {}", st.raw);
    assert!(st.is_writable_leader(), "{}", st.raw);
    assert_eq!(st.ship_starts, 1, "the ship restarted: {}", st.raw);
    wait_one_ship(&c, &ships, ships.last_acknowledged());
    check(&c, &ships);
}

#[test]
fn transfer_leader_moves_the_ship_and_reports_its_downtime() {
    let _g = serial();
    let (c, ships) = start(3, &[]);
    let leader = wait_one_ship(&c, &ships, 0);
    let to = c.nodes().find(|i| *i != leader).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let out = std::process::Command::new(common::mount::bin())
        .arg("transfer-leader")
        .arg(c.data_dir(leader))
        .args(["--to", &to.to_string(), "--json"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "transfer-leader: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let downtime: u64 = text
        .split("ship_downtime_ms\\\":")
        .nth(1)
        .and_then(|r| r.split(['}', ',', '\\']).next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| c.fail(&format!("no ship downtime in {text}")));
    eprintln!("ship downtime of a transfer: {downtime} ms ({text})");
    let now = wait_one_ship(&c, &ships, ships.last_acknowledged());
    assert_eq!(now, to);
    assert_eq!(c.status(leader).unwrap().ship_state, "stopped");
    check(&c, &ships);
}

#[test]
fn ship_user_runs_the_ship_as_that_user() {
    let _g = serial();
    let dir = tempdir();
    // 0777 so the unprivileged ship can leave its answer.
    fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let cmd = format!(
        "id -u > {d}/uid; id -G > {d}/groups; exec sleep 600",
        d = dir.display()
    );
    let m = common::mount::Daemon::start(
        &dir.join("data"),
        &{
            let mp = dir.join("mnt");
            fs::create_dir_all(&mp).unwrap();
            mp
        },
        &["--ship-command", &cmd, "--ship-user", "nobody"],
    );
    let deadline = Instant::now() + WAIT;
    while !dir.join("groups").exists() {
        assert!(
            Instant::now() < deadline,
            "the ship never ran: {}",
            m.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(100));
    let uid = fs::read_to_string(dir.join("uid")).unwrap();
    assert_eq!(uid.trim(), "65534", "the ship's uid");
    // A clean stop of the daemon stops the ship (sleep 600) too.
    let log = m.stop();
    assert!(log.contains("ship stopped"), "{log}");
    let _ = fs::remove_dir_all(&dir);
}
