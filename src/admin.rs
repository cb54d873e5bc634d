//! The local admin socket (`DATA_DIR/admin.sock`) and the commands that use it: `status`,
//! `members add|remove`, `learner add`, `transfer-leader`, `verify`.
//!
//! Protocol: the client writes one command line (`status`, `members-add 4 10.0.0.4:7100`,
//! …), the daemon answers one line of JSON and closes: `{"error":"…"}` on failure,
//! `{"ok":true,"message":"…"}` from the cluster operations (`replication/control.rs`). The
//! socket is created mode 0600 inside the (root-owned) data dir.

use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

use crate::counters::{FsyncOutcome, RecentLatency};
use crate::replication::control::Control;
use serde_json::{json, Value};

/// A request line longer than this is refused.
const REQUEST_BYTES_MAX: usize = 256;
/// How long the daemon waits for a client's request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.sock")
}

/// A node's state, as `status` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub node_id: u64,
    pub role: &'static str,
    pub term: u64,
    pub leader_id: Option<u64>,
    pub last_index: u64,
    /// How far back this node's log reaches: the oldest entry it can still send a lagging
    /// member (one behind it gets a tree snapshot), and the bytes of its segment files.
    pub log_first_index: u64,
    pub log_bytes: u64,
    pub committed_index: u64,
    pub applied_index: u64,
    pub acks: u64,
    pub writable: bool,
    /// New writes answer ENOSPC: the data dir's free space is below `disk_reserve_bytes`.
    pub disk_refusing_writes: bool,
    /// Log appends, vote saves or tree applies waiting for space on a full data dir.
    pub disk_waiting: u64,
    pub members: Vec<u64>,
    /// Non-voting members.
    pub learners: Vec<u64>,
    /// Set on an export learner: the index its tree stops at.
    pub export_until: Option<u64>,
    /// Per other member: the last log index it is known to hold (leader only).
    pub matched: Vec<(u64, Option<u64>)>,
    /// Per other member: entries of this log it is not known to hold (leader only).
    pub lag: Vec<(u64, u64)>,
    /// Per other member: the snapshot transfer under way with it (a catch-up).
    pub catch_up: Vec<(u64, crate::counters::Transfer)>,
    /// Durability waits answered 0, and those that failed (EIO).
    pub fsync_acks: u64,
    pub fsync_failures: u64,
    /// Ack latency percentiles over the most recent successful waits.
    pub fsync_recent: Option<RecentLatency>,
    /// The supervised ship (`ship.rs`).
    pub ship: crate::ship::Status,
}

/// Entries up to `last_index` a member that holds up to `matched` lacks; one not known to
/// hold anything lacks them all (the log starts at index 0).
pub fn lag_entries(last_index: u64, matched: Option<u64>) -> u64 {
    matched.map_or(last_index + 1, |m| last_index.saturating_sub(m))
}

impl Status {
    pub fn to_json(&self) -> String {
        // Per-member figures are objects keyed by the member's id.
        let by_member = |pairs: &mut dyn Iterator<Item = (u64, Value)>| {
            Value::Object(pairs.map(|(id, v)| (id.to_string(), v)).collect())
        };
        let recent = self.fsync_recent;
        let sh = &self.ship;
        json!({
            "node_id": self.node_id,
            "role": self.role,
            "term": self.term,
            "leader_id": self.leader_id,
            "last_index": self.last_index,
            "log_first_index": self.log_first_index,
            "log_bytes": self.log_bytes,
            "committed_index": self.committed_index,
            "applied_index": self.applied_index,
            "acks": self.acks,
            "writable": self.writable,
            "disk_refusing_writes": self.disk_refusing_writes,
            "disk_waiting": self.disk_waiting,
            "members": self.members,
            "learners": self.learners,
            "export_until": self.export_until,
            "matched": by_member(&mut self.matched.iter().map(|(id, m)| (*id, json!(m)))),
            "lag": by_member(&mut self.lag.iter().map(|(id, l)| (*id, json!(l)))),
            "catch_up": by_member(&mut self.catch_up.iter().map(|(id, t)| {
                (
                    *id,
                    json!({
                        "direction": if t.sending { "sending" } else { "receiving" },
                        "bytes": t.bytes,
                        "to_go_bytes": t.to_go_bytes,
                        "rate_bytes_per_s": t.rate_bytes_per_s(),
                        "seconds": t.last.duration_since(t.started).as_secs(),
                    }),
                )
            })),
            "fsync_acks": self.fsync_acks,
            "fsync_failures": self.fsync_failures,
            "fsync_samples": recent.map_or(0, |r| r.samples),
            "fsync_p50_us": recent.map(|r| r.p50_us),
            "fsync_p99_us": recent.map(|r| r.p99_us),
            "ship": {
                "state": sh.state.name(),
                "pid": sh.pid,
                "starts": sh.starts,
                "last_exit": sh.last_exit,
                "last_failover_downtime_ms": sh.last_failover_downtime_ms,
                "gave_up": sh.gave_up,
            },
        })
        .to_string()
    }
}

/// Every name [`role_name`] gives.
pub const ROLE_NAMES: [&str; 5] = ["leader", "follower", "candidate", "learner", "shutdown"];

fn role_name(s: ServerState) -> &'static str {
    match s {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

pub async fn collect(control: &Control) -> Status {
    let (raft, role, acks) = (&control.raft, &control.role, control.acks);
    // The network's counters hold the node's fsync figures too (`metrics.rs`).
    let fsync = &control.net.registry.fsync;
    let disk = &control.net.registry.disk;
    let m = raft.metrics().borrow().clone();
    let applied_index = m.last_applied.map_or(0, |l| l.index);
    // The committed index lives in the Raft core, which is busy for as long as a log
    // append waits for space on a full disk: status must answer anyway, so past a short
    // wait it reports the applied index, which committed is never below.
    let committed = tokio::time::timeout(
        Duration::from_millis(control.limits.status_raft_wait_ms),
        raft.with_raft_state(|st| st.committed.map_or(0, |l| l.index)),
    )
    .await
    .map_or(applied_index, |r| r.unwrap_or(0));
    let members: Vec<u64> = m.membership_config.membership().voter_ids().collect();
    let learners: Vec<u64> = m.membership_config.membership().learner_ids().collect();
    let matched: Vec<(u64, Option<u64>)> = m
        .replication
        .as_ref()
        .map(|r| {
            r.iter()
                .filter(|(id, _)| **id != m.id)
                .map(|(id, l)| (*id, l.map(|l| l.index)))
                .collect()
        })
        .unwrap_or_default();
    let last_index = m.last_log_index.unwrap_or(0);
    // Sizing the segments is an fstat each; if one fails, report an empty reach rather
    // than no status at all.
    let layout = control.log.layout().unwrap_or_default();
    let lag = matched
        .iter()
        .map(|(id, mi)| (*id, lag_entries(last_index, *mi)))
        .collect();
    Status {
        node_id: m.id,
        role: role_name(m.state),
        term: m.current_term,
        leader_id: m.current_leader,
        last_index,
        log_first_index: layout.first_index,
        log_bytes: layout.bytes(),
        committed_index: committed,
        applied_index,
        acks,
        writable: role.writable(),
        disk_refusing_writes: disk.refusing.load(Ordering::Relaxed),
        disk_waiting: disk.waiting.load(Ordering::Relaxed),
        members,
        learners,
        export_until: control.state_machine.export_until(),
        matched,
        lag,
        catch_up: control.net.registry.transfers(Duration::from_millis(
            control.limits.snapshot_install_timeout_ms,
        )),
        fsync_acks: fsync.count(FsyncOutcome::Ok),
        fsync_failures: fsync.failures(),
        fsync_recent: fsync.recent(),
        ship: control.ship.status(),
    }
}

/// Run one admin command line against the running node; the JSON answer line.
async fn dispatch(control: &Control, line: &str) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    let id = |w: &str| {
        w.parse::<u64>()
            .ok()
            .filter(|i| *i > 0)
            .ok_or_else(|| format!("{w:?} is not a node id (a number from 1)"))
    };
    let done = |r: Result<String, String>| match r {
        Ok(msg) => json!({ "ok": true, "message": msg }).to_string(),
        Err(e) => json!({ "error": e }).to_string(),
    };
    match words.as_slice() {
        ["status"] => collect(control).await.to_json(),
        ["members-add", i, addr] => match id(i) {
            Ok(i) => done(control.add_member(i, addr).await),
            Err(e) => done(Err(e)),
        },
        ["members-remove", i] => match id(i) {
            Ok(i) => done(control.remove_member(i).await),
            Err(e) => done(Err(e)),
        },
        ["learner-add", i, addr, rest @ ..] if rest.len() <= 1 => {
            let until = rest
                .first()
                .map(|u| {
                    u.parse::<u64>()
                        .map_err(|_| format!("{u:?} is not an index"))
                })
                .transpose();
            match (id(i), until) {
                (Ok(i), Ok(until)) => done(control.add_learner(i, addr, until).await),
                (Err(e), _) | (_, Err(e)) => done(Err(e)),
            }
        }
        ["transfer-leader", rest @ ..] if rest.len() <= 1 => {
            match rest.first().map(|t| id(t)).transpose() {
                Ok(to) => done(control.transfer_leader(to).await),
                Err(e) => done(Err(e)),
            }
        }
        ["verify"] => match control.verify().await {
            Ok(v) => v.to_json(),
            Err(e) => done(Err(e)),
        },
        _ => done(Err(format!("unknown command {line:?}"))),
    }
}

/// Serve the admin socket until the runtime stops.
pub fn serve(data_dir: &Path, control: Arc<Control>) -> io::Result<()> {
    let path = socket_path(data_dir);
    // A socket left by a crashed daemon: the data dir lock proves nobody else owns it.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let control = control.clone();
            tokio::spawn(async move {
                let (rd, mut wr) = stream.into_split();
                let mut line = String::new();
                let mut rd = tokio::io::BufReader::new(rd.take(REQUEST_BYTES_MAX as u64));
                let read = tokio::time::timeout(REQUEST_TIMEOUT, rd.read_line(&mut line)).await;
                if !matches!(read, Ok(Ok(_))) {
                    return;
                }
                let reply = dispatch(&control, line.trim()).await;
                let _ = wr.write_all(format!("{reply}\n").as_bytes()).await;
            });
        }
    });
    Ok(())
}

/// Send `command` to the daemon of `data_dir` and return its answer line; an
/// `{"error":…}` answer becomes the error.
pub fn request(data_dir: &Path, command: &str, timeout: Duration) -> Result<String, String> {
    let path = socket_path(data_dir);
    let mut s = UnixStream::connect(&path).map_err(|e| {
        format!(
            "no seguro-fs daemon answers on {} ({e}); is the data dir mounted?",
            path.display()
        )
    })?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("{command}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).map_err(|e| {
        format!(
            "no answer from the daemon within {} s: {e}",
            timeout.as_secs()
        )
    })?;
    let line = line.trim().to_string();
    if let Some(msg) = json_field(&line, "error") {
        return Err(msg);
    }
    Ok(line)
}

/// The string value of `key` in a one-line JSON object written by this module.
pub fn json_field(line: &str, key: &str) -> Option<String> {
    let v: Value = serde_json::from_str(line).ok()?;
    v.get(key)?.as_str().map(str::to_string)
}

/// `seguro-fs status DATA_DIR`: ask the running daemon.
pub fn status(data_dir: &Path, json: bool) -> Result<String, String> {
    let line = request(data_dir, "status", STATUS_TIMEOUT)?;
    if json {
        return Ok(line);
    }
    Ok(table_from_json(&line))
}

const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// Run a cluster operation through the daemon; its message (or the JSON line).
pub fn operate(
    data_dir: &Path,
    command: &str,
    timeout_ms: u64,
    json: bool,
) -> Result<String, String> {
    let line = request(data_dir, command, Duration::from_millis(timeout_ms))?;
    if json {
        return Ok(line);
    }
    Ok(json_field(&line, "message").unwrap_or(line))
}

/// `seguro-fs verify DATA_DIR`: every member's digest at one index, as a table. Fails
/// (after printing it) unless they all agree.
pub fn verify(data_dir: &Path, timeout_ms: u64, json: bool) -> Result<String, String> {
    let line = request(data_dir, "verify", Duration::from_millis(timeout_ms))?;
    let agree = line.contains("\"agree\":true");
    let out = if json {
        line.clone()
    } else {
        let mut t = String::new();
        let v: Value = serde_json::from_str(&line).unwrap_or_default();
        let index = v["index"].as_u64().map_or("?".into(), |i| i.to_string());
        let _ = writeln!(t, "digests at index {index}:");
        for m in v["members"].as_array().into_iter().flatten() {
            let id = m["id"].as_u64().map_or("?".into(), |i| i.to_string());
            let digest = m["digest"].as_str().unwrap_or("-");
            let note = m["note"].as_str().unwrap_or_default();
            let _ = writeln!(t, "  node {id:<4} {digest:<64}  {note}");
        }
        let _ = write!(
            t,
            "{}",
            if agree {
                "all members hold identical trees"
            } else {
                "MISMATCH or unverified members: the trees are not known to be identical"
            }
        );
        t
    };
    if agree {
        Ok(out)
    } else {
        Err(out)
    }
}

/// Render the daemon's JSON as `key value` lines (the daemon owns the field list): a
/// string bare, anything else as compact JSON.
fn table_from_json(line: &str) -> String {
    let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(line) else {
        return line.to_string();
    };
    let mut out = String::new();
    for (k, v) in fields {
        let v = match v {
            Value::String(s) => s,
            other => other.to_string(),
        };
        // Keys longer than the column still get a separating space.
        let _ = writeln!(out, "{k:<15} {v}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_table_forms() {
        let s = Status {
            node_id: 2,
            role: "leader",
            term: 7,
            leader_id: Some(2),
            last_index: 40,
            log_first_index: 5,
            log_bytes: 8192,
            committed_index: 39,
            applied_index: 39,
            acks: 1,
            writable: true,
            disk_refusing_writes: false,
            disk_waiting: 0,
            members: vec![1, 2, 3],
            learners: vec![4],
            export_until: None,
            matched: vec![(1, Some(38)), (3, None)],
            lag: vec![(1, lag_entries(40, Some(38))), (3, lag_entries(40, None))],
            catch_up: {
                let started = std::time::Instant::now();
                vec![(
                    3,
                    crate::counters::Transfer {
                        sending: true,
                        started,
                        last: started + std::time::Duration::from_secs(2),
                        bytes: 8 << 20,
                        to_go_bytes: Some(1 << 30),
                    },
                )]
            },
            fsync_acks: 12,
            fsync_failures: 1,
            fsync_recent: Some(RecentLatency {
                samples: 12,
                p50_us: 850,
                p99_us: 2100,
            }),
            ship: crate::ship::Status {
                state: crate::ship::State::Running,
                pid: Some(4242),
                starts: 3,
                last_exit: Some("exit code 1".into()),
                last_failover_downtime_ms: Some(1800),
                gave_up: None,
            },
        };
        let j = s.to_json();
        assert_eq!(
            j,
            "{\"node_id\":2,\"role\":\"leader\",\"term\":7,\"leader_id\":2,\"last_index\":40,\
             \"log_first_index\":5,\"log_bytes\":8192,\"committed_index\":39,\"applied_index\":39,\"acks\":1,\"writable\":true,\
             \"disk_refusing_writes\":false,\"disk_waiting\":0,\"members\":[1,2,3],\"learners\":[4],\"export_until\":null,\
             \"matched\":{\"1\":38,\"3\":null},\"lag\":{\"1\":2,\"3\":41},\
             \"catch_up\":{\"3\":{\"direction\":\"sending\",\"bytes\":8388608,\
             \"to_go_bytes\":1073741824,\"rate_bytes_per_s\":4194304,\"seconds\":2}},\
             \"fsync_acks\":12,\"fsync_failures\":1,\"fsync_samples\":12,\
             \"fsync_p50_us\":850,\"fsync_p99_us\":2100,\"ship\":{\"state\":\"running\",\"pid\":4242,\
             \"starts\":3,\"last_exit\":\"exit code 1\",\"last_failover_downtime_ms\":1800,\"gave_up\":null}}"
        );
        assert!(!j.contains('\n'), "one line");
        let t = table_from_json(&j);
        assert!(t.contains("role            leader"), "{t}");
        assert!(t.contains("members         [1,2,3]"), "{t}");
        assert!(t.contains("committed_index 39"), "{t}");
        assert!(t.contains("lag             {\"1\":2,\"3\":41}"), "{t}");
        assert!(t.contains("fsync_p99_us    2100"), "{t}");
        let none = Status {
            fsync_recent: None,
            ..s
        };
        assert!(none
            .to_json()
            .contains("\"fsync_samples\":0,\"fsync_p50_us\":null,\"fsync_p99_us\":null,"));
    }
}
