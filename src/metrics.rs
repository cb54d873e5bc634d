//! Operator metrics: a minimal HTTP/1.1 server that renders the counters (`counters.rs`),
//! with the node's Raft state, in Prometheus's text exposition format (version 0.0.4) on
//! `GET /metrics`. docs/METRICS.md lists every metric.
//!
//! The server is deliberately tiny (no HTTP library): one request per connection
//! (`Connection: close`), a bounded request head, a bounded number of connections and a
//! timeout on every read and write, so a slow or hostile client costs at most a few
//! kilobytes and one task for a few seconds.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::admin::{self, Status};
use crate::config::Limits;
use crate::counters::{FsyncOutcome, FuseErrors, PeerCounters, Registry, FSYNC_BUCKETS_NS};
use crate::replication::control::Control;

// ---------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------

/// Appends metric families in the text format: `# HELP`, `# TYPE`, then samples.
struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    /// One sample; label values here are ids and fixed words, never needing escapes.
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{v}\"");
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    fn gauge(&mut self, name: &str, help: &str, value: u64) {
        self.family(name, "gauge", help);
        self.sample(name, &[], value);
    }

    /// A per-member counter family.
    fn per_peer(
        &mut self,
        name: &str,
        help: &str,
        peers: &[(u64, Arc<PeerCounters>)],
        get: fn(&PeerCounters) -> &AtomicU64,
    ) {
        self.family(name, "counter", help);
        for (id, c) in peers {
            let id = id.to_string();
            self.sample(name, &[("member", &id)], get(c).load(Ordering::Relaxed));
        }
    }
}

/// Seconds from nanoseconds, as Prometheus floats.
fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// The per-member counters, in the order they are rendered: (name, help, field).
type PeerCounter = (&'static str, &'static str, fn(&PeerCounters) -> &AtomicU64);
const PEER_COUNTERS: &[PeerCounter] = &[
    (
        "seguro_replication_sent_entries_total",
        "Log entries sent to each member in AppendEntries it answered.",
        |c| &c.sent_entries,
    ),
    (
        "seguro_replication_sent_bytes_total",
        "Bytes of log entries (record form) sent to each member in AppendEntries it answered.",
        |c| &c.sent_entry_bytes,
    ),
    (
        "seguro_replication_sent_early_entries_total",
        "Of the entries sent to each member, those sent while this leader's own log flush of them ran.",
        |c| &c.sent_early_entries,
    ),
    (
        "seguro_replication_sent_requests_total",
        "AppendEntries requests each member answered (with or without entries, early or not).",
        |c| &c.sent_requests,
    ),
    (
        "seguro_replication_received_entries_total",
        "Log entries received from each member in AppendEntries.",
        |c| &c.received_entries,
    ),
    (
        "seguro_replication_received_bytes_total",
        "Bytes of log entries (record form) received from each member in AppendEntries.",
        |c| &c.received_entry_bytes,
    ),
    (
        "seguro_snapshot_sent_total",
        "Tree snapshots sent completely to each member.",
        |c| &c.snapshots_sent,
    ),
    (
        "seguro_snapshot_sent_bytes_total",
        "Bytes of tree snapshot chunks each member accepted.",
        |c| &c.snapshot_sent_bytes,
    ),
    (
        "seguro_snapshot_received_total",
        "Tree snapshots received completely from each member (last chunk answered).",
        |c| &c.snapshots_received,
    ),
    (
        "seguro_snapshot_received_bytes_total",
        "Bytes of tree snapshot chunks received from each member.",
        |c| &c.snapshot_received_bytes,
    ),
];
/// The whole `/metrics` body for this node's state `st` and counters `reg`.
pub fn render(st: &Status, reg: &Registry) -> String {
    let mut o = Out(String::new());
    o.family(
        "seguro_role",
        "gauge",
        "Raft role of this node: 1 for the current role, 0 for the others.",
    );
    for r in admin::ROLE_NAMES {
        o.sample("seguro_role", &[("role", r)], u64::from(st.role == r));
    }
    o.gauge(
        "seguro_writable",
        "1 while this node's mount accepts writes (the leader, caught up in its term).",
        u64::from(st.writable),
    );
    o.gauge(
        "seguro_disk_refusing_writes",
        "1 while new writes answer ENOSPC: free space on the data dir is below disk_reserve_bytes.",
        u64::from(st.disk_refusing_writes),
    );
    o.gauge(
        "seguro_disk_full_waiting",
        "Log appends, vote saves and tree applies waiting for space on a full data dir.",
        st.disk_waiting,
    );
    o.family(
        "seguro_ship_state",
        "gauge",
        "The supervised ship's state: 1 for the current one, 0 for the others.",
    );
    for state in crate::ship::State::ALL {
        o.sample(
            "seguro_ship_state",
            &[("state", state.name())],
            u64::from(st.ship.state == state),
        );
    }
    o.family(
        "seguro_ship_starts_total",
        "counter",
        "Times this daemon started the ship.",
    );
    o.sample("seguro_ship_starts_total", &[], st.ship.starts);
    o.gauge(
        "seguro_ship_last_failover_downtime_ms",
        "At the latest leadership's first ship start: ms since this node last heard the previous leader (or since the daemon started).",
        st.ship.last_failover_downtime_ms.unwrap_or(0),
    );
    o.gauge("seguro_term", "Current Raft term.", st.term);
    o.gauge(
        "seguro_last_log_index",
        "Index of the last entry in this node's log.",
        st.last_index,
    );
    o.gauge(
        "seguro_log_first_index",
        "Oldest entry this node's log still holds: a member behind it gets a tree snapshot.",
        st.log_first_index,
    );
    o.gauge(
        "seguro_log_bytes",
        "Bytes of this node's log segment files.",
        st.log_bytes,
    );
    o.gauge(
        "seguro_committed_index",
        "Index of the last entry known committed.",
        st.committed_index,
    );
    o.gauge(
        "seguro_applied_index",
        "Index of the last entry applied to this node's tree.",
        st.applied_index,
    );
    o.gauge(
        "seguro_acks_required",
        "Other replicas that must hold data durably before fsync returns (K).",
        st.acks,
    );
    o.family(
        "seguro_member_matched_index",
        "gauge",
        "Leader only: last log index each other member is known to hold durably.",
    );
    for (id, m) in &st.matched {
        if let Some(m) = m {
            o.sample(
                "seguro_member_matched_index",
                &[("member", &id.to_string())],
                m,
            );
        }
    }
    o.family(
        "seguro_member_lag_entries",
        "gauge",
        "Leader only: entries of the leader's log each other member is not known to hold.",
    );
    for (id, lag) in &st.lag {
        o.sample(
            "seguro_member_lag_entries",
            &[("member", &id.to_string())],
            lag,
        );
    }

    let f = &reg.fsync;
    let name = "seguro_fsync_ack_seconds";
    o.family(
        name,
        "histogram",
        "Time from a durability wait (fsync, fdatasync, fsyncdir, O_DSYNC write) starting \
         to it answering 0.",
    );
    // The count is the sum of the buckets as read here, so +Inf always equals _count
    // even while fsyncs complete during the scrape.
    let mut cumulative = 0;
    for (i, b) in f.buckets.iter().enumerate() {
        cumulative += b.load(Ordering::Relaxed);
        let le = FSYNC_BUCKETS_NS
            .get(i)
            .map_or("+Inf".to_string(), |ns| seconds(*ns).to_string());
        o.sample(&format!("{name}_bucket"), &[("le", &le)], cumulative);
    }
    o.sample(
        &format!("{name}_sum"),
        &[],
        seconds(f.sum_ns.load(Ordering::Relaxed)),
    );
    o.sample(&format!("{name}_count"), &[], cumulative);
    o.family(
        "seguro_fsync_total",
        "counter",
        "Durability waits by outcome: ok, timeout, log_failed, not_leader, stopped.",
    );
    for outcome in FsyncOutcome::ALL {
        o.sample(
            "seguro_fsync_total",
            &[("result", outcome.label())],
            f.count(outcome),
        );
    }

    o.family(
        "seguro_log_records_as_received_total",
        "counter",
        "Log records this node wrote as its leader sent them, without encoding the entry again.",
    );
    o.sample(
        "seguro_log_records_as_received_total",
        &[],
        reg.records_as_received
            .load(std::sync::atomic::Ordering::Relaxed),
    );

    o.family(
        "seguro_fuse_errors_total",
        "counter",
        "FUSE requests answered with an error, by operation (ENOENT on lookup is routine).",
    );
    for op in FuseErrors::OPS {
        o.sample(
            "seguro_fuse_errors_total",
            &[("op", op)],
            reg.fuse_errors.get(op),
        );
    }

    let peers = reg.peer_list();
    for (name, help, get) in PEER_COUNTERS {
        o.per_peer(name, help, &peers, *get);
    }
    o.0
}

// ---------------------------------------------------------------------------------------
// HTTP server
// ---------------------------------------------------------------------------------------

/// The metrics address could not be listened on.
#[derive(Debug, thiserror::Error)]
#[error(
    "--metrics-addr {addr}: cannot listen there ({source}); give an IP:PORT this host owns \
     and nothing else listens on, or leave --metrics-addr out"
)]
pub struct BindError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    NotFound,
    MethodNotAllowed,
    BadRequest,
}

/// Route a complete request head (request line and headers, ending in an empty line).
fn route(head: &[u8]) -> Route {
    let line_end = head
        .windows(2)
        .position(|w| w == b"\r\n")
        .unwrap_or(head.len());
    let Ok(line) = std::str::from_utf8(&head[..line_end]) else {
        return Route::BadRequest;
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    if method.is_empty() || !target.starts_with('/') || !version.starts_with("HTTP/1.") {
        return Route::BadRequest;
    }
    if method != "GET" {
        return Route::MethodNotAllowed;
    }
    // Scrapers may add query parameters; they select nothing here.
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    if path == "/metrics" {
        Route::Metrics
    } else {
        Route::NotFound
    }
}

/// Read until the end of the request head. None: the client closed early or the head
/// exceeds `max` bytes.
async fn read_head(stream: &mut TcpStream, max: usize) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::with_capacity(max.min(1024));
    let mut chunk = [0u8; 1024];
    loop {
        let room = max - head.len();
        if room == 0 {
            return Ok(None);
        }
        let want = room.min(chunk.len());
        let n = stream.read(&mut chunk[..want]).await?;
        if n == 0 {
            return Ok(None);
        }
        // The terminator may straddle reads: search from just before the new bytes.
        let from = head.len().saturating_sub(3);
        head.extend_from_slice(&chunk[..n]);
        if head[from..].windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(Some(head));
        }
    }
}

fn response(status: &str, extra_headers: &str, content_type: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         {extra_headers}Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn plain(status: &str, extra_headers: &str, body: &str) -> Vec<u8> {
    response(
        status,
        extra_headers,
        "text/plain; charset=utf-8",
        &format!("{body}\n"),
    )
}

async fn answer(mut stream: TcpStream, node: &Control, head_max: usize, io_timeout: Duration) {
    let head = match tokio::time::timeout(io_timeout, read_head(&mut stream, head_max)).await {
        Ok(Ok(Some(h))) => Some(h),
        Ok(Ok(None)) => None,
        // Timed out or failed: nothing useful can be said to this client.
        Ok(Err(_)) | Err(_) => return,
    };
    let reply = match head.as_deref().map(route) {
        // Closed early or too long: if the client is still there it sent too much.
        None => plain(
            "431 Request Header Fields Too Large",
            "",
            &format!("request head over {head_max} bytes"),
        ),
        Some(Route::BadRequest) => plain("400 Bad Request", "", "not an HTTP/1.x request"),
        Some(Route::MethodNotAllowed) => {
            plain("405 Method Not Allowed", "Allow: GET\r\n", "only GET")
        }
        Some(Route::NotFound) => plain("404 Not Found", "", "metrics are at /metrics"),
        Some(Route::Metrics) => {
            let st = admin::collect(node).await;
            response(
                "200 OK",
                "",
                "text/plain; version=0.0.4; charset=utf-8",
                &render(&st, &node.net.registry),
            )
        }
    };
    let _ = tokio::time::timeout(io_timeout, async {
        stream.write_all(&reply).await?;
        stream.shutdown().await
    })
    .await;
}

/// Listen on `addr` and serve `/metrics` for `node` until the runtime stops. Must run
/// inside the runtime; fails at once if the address cannot be bound.
pub async fn serve(addr: SocketAddr, limits: &Limits, node: Arc<Control>) -> Result<(), BindError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })?;
    let slots = Arc::new(Semaphore::new(limits.metrics_connections_max));
    let head_max = limits.metrics_request_head_bytes_max;
    let io_timeout = Duration::from_millis(limits.metrics_io_timeout_ms);
    tracing::info!(%addr, "serving metrics on /metrics");
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                // One non-blocking attempt: a full server must not wait on this client.
                let _ = stream.try_write(&plain(
                    "503 Service Unavailable",
                    "",
                    "too many metrics connections",
                ));
                tracing::debug!(%peer, "too many metrics connections; refusing");
                continue;
            };
            let node = node.clone();
            tokio::spawn(async move {
                answer(stream, &node, head_max, io_timeout).await;
                drop(permit);
            });
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Route::Metrics
        );
        assert_eq!(route(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Route::Metrics);
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route(b"GET /metricsx HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(
            route(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Route::MethodNotAllowed
        );
        assert_eq!(
            route(b"HEAD /metrics HTTP/1.1\r\n\r\n"),
            Route::MethodNotAllowed
        );
        assert_eq!(route(b"GET /metrics\r\n\r\n"), Route::BadRequest);
        assert_eq!(route(b"GET /metrics SPDY/3\r\n\r\n"), Route::BadRequest);
        assert_eq!(route(b"GET  /metrics HTTP/1.1\r\n\r\n"), Route::BadRequest);
        assert_eq!(route(b"\xff /metrics HTTP/1.1\r\n\r\n"), Route::BadRequest);
    }

    fn limits(recent: usize) -> Limits {
        Limits {
            fsync_recent_samples_max: recent,
            ..Limits::default()
        }
    }

    #[test]
    fn recent_percentiles_cover_only_the_window() {
        let reg = Registry::new(&limits(16), []);
        assert_eq!(reg.fsync.recent(), None);
        // 1..=100 ms: the ring keeps the last 16 (85..=100 ms).
        for ms in 1..=100 {
            reg.fsync
                .record(FsyncOutcome::Ok, Duration::from_millis(ms));
        }
        let r = reg.fsync.recent().unwrap();
        assert_eq!(r.samples, 16);
        assert_eq!(r.p50_us, 92_000);
        assert_eq!(r.p99_us, 100_000);
        reg.fsync
            .record(FsyncOutcome::Timeout, Duration::from_secs(10));
        assert_eq!(reg.fsync.count(FsyncOutcome::Ok), 100);
        assert_eq!(reg.fsync.failures(), 1);
        // A failure does not enter the latencies.
        assert_eq!(reg.fsync.recent().unwrap().p99_us, 100_000);
    }

    #[test]
    fn render_is_cumulative_and_labelled() {
        let reg = Registry::new(&limits(16), [1, 3]);
        for us in [50, 300, 300, 20_000_000] {
            reg.fsync
                .record(FsyncOutcome::Ok, Duration::from_micros(us));
        }
        reg.fsync.record(FsyncOutcome::NotLeader, Duration::ZERO);
        reg.peer(3).sent_entries(2, 5000);
        let st = Status {
            node_id: 2,
            role: "leader",
            term: 7,
            leader_id: Some(2),
            last_index: 40,
            log_first_index: 12,
            log_bytes: 4096,
            committed_index: 39,
            applied_index: 39,
            acks: 1,
            writable: true,
            disk_refusing_writes: true,
            disk_waiting: 2,
            members: vec![1, 2, 3],
            learners: vec![],
            export_until: None,
            matched: vec![(1, Some(40)), (3, None)],
            lag: vec![(1, 0), (3, 41)],
            catch_up: vec![],
            fsync_acks: 4,
            fsync_failures: 1,
            fsync_recent: None,
            ship: crate::ship::Status {
                state: crate::ship::State::Backoff,
                pid: None,
                starts: 7,
                last_exit: None,
                last_failover_downtime_ms: Some(2100),
                gave_up: None,
            },
        };
        let text = render(&st, &reg);
        for line in [
            "seguro_role{role=\"leader\"} 1",
            "seguro_role{role=\"follower\"} 0",
            "seguro_writable 1",
            "seguro_disk_refusing_writes 1",
            "seguro_disk_full_waiting 2",
            "seguro_ship_state{state=\"backoff\"} 1",
            "seguro_ship_state{state=\"running\"} 0",
            "seguro_ship_starts_total 7",
            "seguro_ship_last_failover_downtime_ms 2100",
            "seguro_log_first_index 12",
            "seguro_log_bytes 4096",
            "seguro_member_matched_index{member=\"1\"} 40",
            "seguro_member_lag_entries{member=\"3\"} 41",
            "seguro_fsync_ack_seconds_bucket{le=\"0.0001\"} 1",
            "seguro_fsync_ack_seconds_bucket{le=\"0.0005\"} 3",
            "seguro_fsync_ack_seconds_bucket{le=\"10\"} 3",
            "seguro_fsync_ack_seconds_bucket{le=\"+Inf\"} 4",
            "seguro_fsync_ack_seconds_count 4",
            "seguro_fsync_total{result=\"ok\"} 4",
            "seguro_fsync_total{result=\"not_leader\"} 1",
            "seguro_replication_sent_bytes_total{member=\"3\"} 5000",
            "seguro_replication_sent_bytes_total{member=\"1\"} 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(!text.contains("seguro_member_matched_index{member=\"3\"}"));
        // Every family has HELP and TYPE before its samples.
        assert!(text.starts_with("# HELP seguro_role "));
    }
}
