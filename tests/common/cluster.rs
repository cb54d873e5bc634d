//! A multi-node seguro-fs cluster of real daemons (separate processes) on 127.0.0.x, with a
//! fault-injecting proxy in front of every node, for replication tests.
//!
//! Node `i` listens on `127.0.0.i:PORT`; its peers know it as `127.0.0.(100+i):PORT`, where
//! its [`Proxy`] forwards to the real address, so the test can cut links between nodes
//! ([`Cluster::partition`], [`Cluster::heal`]). Data dir `node{i}/data`, mountpoint
//! `node{i}/log`. Node ids are 1-based everywhere in this API. [`Cluster::start_on_tmpfs`]
//! puts every data dir on a tmpfs of its own, so a test can fill one node's disk
//! ([`Cluster::fill_disk`]); the `TestDir` unmounts them when it is dropped.
//!
//! Every wait is bounded and panics with the cluster's state: each node's `status --json`,
//! the tail of each daemon's log, and the proxy counters.
#![allow(dead_code)]

use std::fs;
use std::io::{self, Read};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::mount::{bin, force_unmount, is_mounted, no_inherited_files, signal, Daemon, TestDir};
use super::proxy::{advertised_ip, real_ip, Links, Proxy};
use super::tmpfs::Tmpfs;

/// How long one `seguro-fs status` call may take before it counts as no answer.
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);
/// Poll interval of the waits.
const POLL: Duration = Duration::from_millis(50);
/// Lines of each daemon log shown in a failure message.
const LOG_TAIL_LINES: usize = 40;

/// One node's `seguro-fs status DATA_DIR --json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub node_id: u64,
    pub role: String,
    pub term: u64,
    pub leader_id: Option<u64>,
    pub last_index: u64,
    pub committed_index: u64,
    pub applied_index: u64,
    pub acks: Option<u64>,
    pub writable: bool,
    pub members: Vec<u64>,
    /// The supervised ship's state ("disabled", "running", …) and how often it started.
    pub ship_state: String,
    pub ship_starts: u64,
    /// The line as printed, for messages.
    pub raw: String,
}

impl Status {
    /// Parse the one-line JSON; `None` if it is not JSON or a required field is missing.
    pub fn parse(line: &str) -> Option<Status> {
        let line = line.trim();
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        let u64_of = |key: &str| v.get(key).and_then(serde_json::Value::as_u64);
        Some(Status {
            node_id: u64_of("node_id")?,
            role: v.get("role")?.as_str()?.to_string(),
            term: u64_of("term")?,
            // null (no known leader) parses as None.
            leader_id: u64_of("leader_id"),
            last_index: u64_of("last_index").unwrap_or(0),
            committed_index: u64_of("committed_index").unwrap_or(0),
            applied_index: u64_of("applied_index").unwrap_or(0),
            acks: u64_of("acks"),
            writable: v.get("writable")?.as_bool()?,
            members: v
                .get("members")
                .and_then(serde_json::Value::as_array)
                .map(|m| m.iter().filter_map(serde_json::Value::as_u64).collect())
                .unwrap_or_default(),
            ship_state: v["ship"]["state"].as_str().unwrap_or("").to_string(),
            ship_starts: v["ship"]["starts"].as_u64().unwrap_or(0),
            raw: line.to_string(),
        })
    }

    pub fn is_writable_leader(&self) -> bool {
        self.role == "leader" && self.writable
    }
}

/// Run `seguro-fs status DATA_DIR --json`, bounded by [`STATUS_TIMEOUT`]. Ok(stdout) on exit
/// 0, Err(description) otherwise.
pub fn status_of(data_dir: &Path) -> Result<String, String> {
    let mut child = Command::new(bin())
        .arg("status")
        .arg(data_dir)
        .arg("--json")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn seguro-fs status: {e}"))?;
    let deadline = Instant::now() + STATUS_TIMEOUT;
    let st = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("status did not answer within {STATUS_TIMEOUT:?}"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(format!("wait for status: {e}")),
        }
    };
    // The output is one short line: it fits the pipe buffer, so reading after exit is safe.
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    if st.success() {
        Ok(out)
    } else {
        Err(format!("status exited with {st}: {}", err.trim()))
    }
}

/// Peak resident set size (VmHWM) of a process, in KiB.
pub fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Whether a (not yet reaped) child is alive: present and not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// blake3 over a directory tree walked in sorted order: relative path, file type,
/// mode & 0o7777, and for regular files size and content, for symlinks the target.
/// Directory sizes and times are not hashed (they differ between equal trees).
pub fn dir_digest(root: &Path) -> io::Result<[u8; 32]> {
    let mut h = blake3::Hasher::new();
    let md = fs::symlink_metadata(root)?;
    h.update(b"root");
    h.update(&(md.permissions().mode() & 0o7777).to_le_bytes());
    digest_dir(root, Path::new(""), &mut h, 0)?;
    Ok(*h.finalize().as_bytes())
}

fn digest_dir(root: &Path, rel: &Path, h: &mut blake3::Hasher, depth: usize) -> io::Result<()> {
    if depth > 64 {
        return Err(io::Error::other(format!(
            "{}: deeper than 64 levels",
            root.join(rel).display()
        )));
    }
    let mut names = Vec::new();
    for e in fs::read_dir(root.join(rel))? {
        names.push(e?.file_name());
    }
    names.sort();
    for name in names {
        let relp = rel.join(&name);
        let path = root.join(&relp);
        let md = fs::symlink_metadata(&path)?;
        let ft = md.file_type();
        h.update(relp.as_os_str().as_bytes());
        h.update(&[0]);
        h.update(&(md.permissions().mode() & 0o7777).to_le_bytes());
        if ft.is_dir() {
            h.update(b"d");
            digest_dir(root, &relp, h, depth + 1)?;
            h.update(b"end-of-dir\0");
        } else if ft.is_file() {
            h.update(b"f");
            h.update(&md.len().to_le_bytes());
            let mut f = fs::File::open(&path)?;
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0u64;
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                total += n as u64;
                h.update(&buf[..n]);
            }
            h.update(&total.to_le_bytes());
        } else if ft.is_symlink() {
            h.update(b"l");
            h.update(fs::read_link(&path)?.as_os_str().as_bytes());
        } else {
            h.update(b"o");
        }
    }
    Ok(())
}

pub fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// A port free on every address the cluster uses, chosen below the kernel's ephemeral
/// range (`ip_local_port_range`). The port is bound later by a daemon, proxy or server;
/// one taken from the ephemeral range (as `bind(:0)` gives) could meanwhile become the
/// source port of some outgoing connection, and the later bind then failed with
/// EADDRINUSE (seen in the suite). Below the range only another test's pick can collide,
/// and the candidates are spread by the process id and a counter.
pub fn pick_port(ips: &[std::net::Ipv4Addr]) -> u16 {
    pick_port_bound(ips).0
}

/// [`pick_port`], returning the listeners it bound (one per address, in the order of
/// `ips`) so a caller in this process can keep them instead of binding again. Binding
/// again is racy: a process another test thread is spawning holds copies of every open
/// descriptor between its fork and its exec, so a listener closed here can stay bound for
/// that moment and the rebind fails with EADDRINUSE (a proxy's bind failed so in CI).
pub fn pick_port_bound(ips: &[std::net::Ipv4Addr]) -> (u16, Vec<TcpListener>) {
    use std::sync::atomic::{AtomicU32, Ordering};
    static PICKS: AtomicU32 = AtomicU32::new(0);
    const LOWEST: u32 = 10_000;
    let ephemeral_low: u32 = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .filter(|&low: &u32| low > LOWEST + 1_000)
        .unwrap_or(32_768);
    let span = ephemeral_low - LOWEST;
    let seed = std::process::id().wrapping_mul(2_654_435_761);
    for _ in 0..200 {
        let k = PICKS.fetch_add(1, Ordering::Relaxed).wrapping_mul(7_919);
        let port = (LOWEST + seed.wrapping_add(k) % span) as u16;
        let held: Result<Vec<TcpListener>, _> = ips
            .iter()
            .map(|ip| TcpListener::bind(SocketAddr::from((*ip, port))))
            .collect();
        if let Ok(listeners) = held {
            return (port, listeners);
        }
    }
    panic!("no port free on all of {ips:?} after 200 tries");
}

/// The file [`Cluster::fill_disk`] takes a disk's space with.
const FILLER_NAME: &str = "test-disk-filler";

/// 32 random bytes as 64 hex digits and a newline.
pub fn write_key_file(path: &Path) {
    let mut b = [0u8; 32];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("read /dev/urandom");
    fs::write(path, format!("{}\n", hex(&b))).expect("write key file");
}

/// A running cluster. Dropping it kills every daemon (by PID, unmounting), then stops the
/// proxies, then removes the directory.
pub struct Cluster {
    /// `daemons[i - 1]` is node `i`; `None` while stopped.
    daemons: Vec<Option<Daemon>>,
    /// Log files of each node's runs, oldest first, kept across stops for messages.
    logs: Vec<Vec<PathBuf>>,
    /// Arguments after `mount DATA_DIR MOUNTPOINT`, per node.
    args: Vec<Vec<String>>,
    proxies: Vec<Proxy>,
    pub links: Arc<Links>,
    /// Started by [`Cluster::start_direct`]: no proxies.
    direct: bool,
    pub port: u16,
    pub key_file: PathBuf,
    /// The data dirs' tmpfs mounts ([`Cluster::start_on_tmpfs`]), by node; unmounted after
    /// the daemons stop (field order).
    disks: Vec<Tmpfs>,
    dir: TestDir,
}

impl Cluster {
    /// Start `n` nodes with the same `--peers`; `acks` is passed as `--acks` if given, and
    /// `extra` is appended to every node's arguments.
    pub fn start(n: usize, acks: Option<u64>, extra: &[&str]) -> Cluster {
        Self::start_with_spares(n, n, acks, extra)
    }

    /// Like [`Cluster::start`] with `initial` members started; nodes `initial+1..=n` get a
    /// proxy and arguments (their `--peers` lists all `n`, so, not having the lowest id,
    /// they wait to be added) but are started only by [`Cluster::restart`].
    pub fn start_with_spares(
        n: usize,
        initial: usize,
        acks: Option<u64>,
        extra: &[&str],
    ) -> Cluster {
        Self::start_with(n, initial, acks, extra, &|_| Vec::new())
    }

    /// [`Cluster::start_with_spares`], with `per_node(i)` appended to node `i`'s arguments
    /// (for options that differ between nodes, such as an address of their own).
    pub fn start_with(
        n: usize,
        initial: usize,
        acks: Option<u64>,
        extra: &[&str],
        per_node: &dyn Fn(usize) -> Vec<String>,
    ) -> Cluster {
        Self::start_full(n, initial, acks, extra, per_node, None, false)
    }

    /// [`Cluster::start`] with each node's data dir on a tmpfs of `disk_bytes`.
    pub fn start_on_tmpfs(n: usize, acks: Option<u64>, extra: &[&str], disk_bytes: u64) -> Cluster {
        Self::start_full(n, n, acks, extra, &|_| Vec::new(), Some(disk_bytes), false)
    }

    /// [`Cluster::start`] with the nodes talking to each other directly, as in production:
    /// no proxies, so no partitions (for the benchmark).
    pub fn start_direct(n: usize, acks: Option<u64>, extra: &[&str]) -> Cluster {
        Self::start_full(n, n, acks, extra, &|_| Vec::new(), None, true)
    }

    fn start_full(
        n: usize,
        initial: usize,
        acks: Option<u64>,
        extra: &[&str],
        per_node: &dyn Fn(usize) -> Vec<String>,
        disk_bytes: Option<u64>,
        direct: bool,
    ) -> Cluster {
        assert!((1..=9).contains(&n), "1..=9 nodes");
        assert!((1..=n).contains(&initial), "1..=n initial members");
        let dir = TestDir::new("cluster");
        let key_file = dir.join("cluster.key");
        write_key_file(&key_file);
        let mut ips: Vec<_> = (1..=n).map(real_ip).collect();
        ips.extend((1..=n).map(advertised_ip));
        let (port, mut bound) = pick_port_bound(&ips);
        // The proxies keep the listeners picked on the advertised addresses; the daemons
        // bind the real ones themselves, so those are closed here.
        let advertised = bound.split_off(n);
        drop(bound);
        let links = Links::new(n);
        let proxies: Vec<Proxy> = advertised
            .into_iter()
            .zip(1..=n)
            .filter(|_| !direct)
            .map(|(listener, i)| {
                Proxy::start(
                    i,
                    listener,
                    SocketAddr::from((real_ip(i), port)),
                    links.clone(),
                )
            })
            .collect();
        let known_as = |i: usize| if direct { real_ip(i) } else { advertised_ip(i) };
        let peer_list = |upto: usize| {
            (1..=upto)
                .map(|i| format!("{i}={}:{port}", known_as(i)))
                .collect::<Vec<_>>()
                .join(",")
        };
        let peers = peer_list(initial);
        let args: Vec<Vec<String>> = (1..=n)
            .map(|i| {
                let mut a: Vec<String> = vec![
                    "--node-id".into(),
                    i.to_string(),
                    "--peers".into(),
                    if i <= initial {
                        peers.clone()
                    } else {
                        peer_list(n)
                    },
                    "--listen".into(),
                    format!("{}:{port}", real_ip(i)),
                    "--cluster-key-file".into(),
                    key_file.display().to_string(),
                ];
                if let Some(k) = acks {
                    a.push("--acks".into());
                    a.push(k.to_string());
                }
                a.extend(extra.iter().map(|s| s.to_string()));
                a.extend(per_node(i));
                a
            })
            .collect();
        let mut disks = Vec::new();
        for i in 1..=n {
            fs::create_dir_all(dir.join(&format!("node{i}"))).unwrap();
            if let Some(bytes) = disk_bytes {
                disks.push(Tmpfs::mount(
                    &dir.join(&format!("node{i}/data")),
                    &bytes.to_string(),
                ));
            }
        }
        let mut c = Cluster {
            daemons: (0..n).map(|_| None).collect(),
            logs: vec![Vec::new(); n],
            args,
            proxies,
            links,
            direct,
            port,
            key_file,
            disks,
            dir,
        };
        eprintln!(
            "--- cluster of {n} at {} (port {port}, peers {peers})",
            c.dir.path().display()
        );
        for i in 1..=initial {
            c.restart(i);
        }
        c
    }

    /// The address node `i`'s peers know it by (through its proxy).
    pub fn peer_addr(&self, i: usize) -> String {
        let ip = if self.direct {
            real_ip(i)
        } else {
            advertised_ip(i)
        };
        format!("{ip}:{}", self.port)
    }

    pub fn len(&self) -> usize {
        self.daemons.len()
    }

    pub fn nodes(&self) -> std::ops::RangeInclusive<usize> {
        1..=self.len()
    }

    /// The cluster's scratch directory (for record files, images, other keys).
    pub fn dir(&self) -> &TestDir {
        &self.dir
    }

    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.join(&format!("node{i}/data"))
    }

    pub fn mountpoint(&self, i: usize) -> PathBuf {
        self.dir.join(&format!("node{i}/log"))
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.daemons[i - 1].is_some()
    }

    /// Nodes whose daemon runs.
    pub fn live(&self) -> Vec<usize> {
        self.nodes().filter(|&i| self.is_running(i)).collect()
    }

    pub fn daemon(&self, i: usize) -> &Daemon {
        self.daemons[i - 1]
            .as_ref()
            .unwrap_or_else(|| panic!("node {i} is not running"))
    }

    pub fn pid(&self, i: usize) -> u32 {
        self.daemon(i).pid()
    }

    pub fn args(&self, i: usize) -> &[String] {
        &self.args[i - 1]
    }

    /// Replace the value after `flag` in node `i`'s arguments (or append `flag value`); takes
    /// effect at the next [`Cluster::restart`].
    pub fn set_arg(&mut self, i: usize, flag: &str, value: &str) {
        let a = &mut self.args[i - 1];
        match a.iter().position(|x| x == flag) {
            Some(p) if p + 1 < a.len() => a[p + 1] = value.to_string(),
            _ => {
                a.push(flag.to_string());
                a.push(value.to_string());
            }
        }
    }

    /// Start node `i` (again) with its arguments and wait for its mount.
    pub fn restart(&mut self, i: usize) {
        assert!(!self.is_running(i), "node {i} is already running");
        let args: Vec<&str> = self.args[i - 1].iter().map(String::as_str).collect();
        let d = Daemon::start(&self.data_dir(i), &self.mountpoint(i), &args);
        self.logs[i - 1].push(d.log.clone());
        self.daemons[i - 1] = Some(d);
    }

    /// Start node `i` with its arguments expecting the daemon to refuse to run: returns its
    /// log if it exits with a failure before mounting; `None` if it mounted (it is then killed
    /// and its mount detached, and the node stays stopped) or exited 0.
    pub fn start_expecting_refusal(&self, i: usize, timeout: Duration) -> Option<String> {
        assert!(!self.is_running(i), "node {i} is already running");
        let mnt = self.mountpoint(i);
        fs::create_dir_all(&mnt).unwrap();
        let log = self.dir.join(&format!("node{i}/refused.log"));
        let mut child = no_inherited_files(&mut Command::new(bin()))
            .arg("mount")
            .arg(self.data_dir(i))
            .arg(&mnt)
            .args(&self.args[i - 1])
            .env("SEGURO_LOG", "info,openraft=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn seguro-fs");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                let text = fs::read_to_string(&log).unwrap_or_default();
                return (!st.success()).then_some(text);
            }
            if is_mounted(&mnt) || Instant::now() > deadline {
                signal(child.id(), libc::SIGKILL);
                let _ = child.wait();
                force_unmount(&mnt);
                if is_mounted(&mnt) {
                    self.fail(&format!("node {i}: mount still there after kill"));
                }
                return None;
            }
            std::thread::sleep(POLL);
        }
    }

    /// SIGKILL node `i` (the dead mount is detached).
    pub fn kill9(&mut self, i: usize) {
        let d = self.daemons[i - 1]
            .take()
            .unwrap_or_else(|| panic!("kill9: node {i} is not running"));
        d.kill9();
    }

    /// SIGTERM node `i` and wait for a clean exit; returns its log.
    pub fn stop(&mut self, i: usize) -> String {
        let d = self.daemons[i - 1]
            .take()
            .unwrap_or_else(|| panic!("stop: node {i} is not running"));
        d.stop()
    }

    /// Every daemon log of node `i`, oldest run first.
    pub fn logs(&self, i: usize) -> &[PathBuf] {
        &self.logs[i - 1]
    }

    /// Fill node `i`'s data dir tmpfs (see [`Cluster::start_on_tmpfs`]) to the last byte
    /// with a filler file; returns the bytes taken.
    pub fn fill_disk(&self, i: usize) -> u64 {
        let disk = self
            .disks
            .get(i - 1)
            .unwrap_or_else(|| self.fail(&format!("node {i} has no tmpfs to fill")));
        let filler = disk.fill(FILLER_NAME);
        fs::metadata(&filler)
            .unwrap_or_else(|e| self.fail(&format!("{}: {e}", filler.display())))
            .len()
    }

    /// Fill node `i`'s disk but for `bytes`.
    pub fn leave_free(&self, i: usize, bytes: u64) {
        let len = self.fill_disk(i);
        let filler = self.data_dir(i).join(FILLER_NAME);
        fs::OpenOptions::new()
            .write(true)
            .open(&filler)
            .and_then(|f| f.set_len(len.saturating_sub(bytes)))
            .unwrap_or_else(|e| self.fail(&format!("{}: {e}", filler.display())));
    }

    /// Give node `i`'s disk its space back.
    pub fn free_disk(&self, i: usize) {
        match fs::remove_file(self.data_dir(i).join(FILLER_NAME)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => self.fail(&format!("free node {i}'s disk: {e}")),
        }
    }

    /// Delete node `i`'s data dir (the node must be stopped): it comes back empty.
    pub fn wipe(&mut self, i: usize) {
        assert!(!self.is_running(i), "wipe: stop node {i} first");
        let d = self.data_dir(i);
        fs::remove_dir_all(&d).unwrap_or_else(|e| panic!("wipe {}: {e}", d.display()));
    }

    /// Isolate `nodes` from the rest (both directions).
    pub fn partition(&self, nodes: &[usize]) {
        assert!(
            !self.direct,
            "a cluster started direct has no proxies to partition"
        );
        eprintln!("--- partition {nodes:?} from the rest");
        self.links.partition(nodes);
    }

    pub fn heal(&self) {
        eprintln!("--- heal all links");
        self.links.heal();
    }

    /// Node `i`'s status line, if it runs and answers.
    pub fn status(&self, i: usize) -> Option<Status> {
        if !self.is_running(i) {
            return None;
        }
        status_of(&self.data_dir(i))
            .ok()
            .and_then(|s| Status::parse(&s))
    }

    /// Raw status output or the reason there is none.
    pub fn status_raw(&self, i: usize) -> Result<String, String> {
        if !self.is_running(i) {
            return Err("not running".into());
        }
        status_of(&self.data_dir(i))
    }

    /// The daemon log of node `i`'s latest run.
    pub fn log_text(&self, i: usize) -> String {
        self.logs[i - 1]
            .last()
            .and_then(|p| fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// Each node's status and log tail, and the proxy counters: the body of every panic.
    pub fn diag(&self) -> String {
        let mut s = String::new();
        for i in self.nodes() {
            let st = match self.status_raw(i) {
                Ok(line) => line.trim().to_string(),
                Err(e) => format!("<{e}>"),
            };
            s.push_str(&format!("node {i} status: {st}\n"));
        }
        s.push_str(&self.links.describe());
        s.push('\n');
        for i in self.nodes() {
            let text = self.log_text(i);
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(LOG_TAIL_LINES);
            s.push_str(&format!(
                "--- node {i} log tail ({}{}):\n{}\n",
                self.logs[i - 1]
                    .last()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                if self.is_running(i) { "" } else { ", stopped" },
                lines[from..].join("\n")
            ));
        }
        s
    }

    /// Panic with `msg` and the cluster's state.
    pub fn fail(&self, msg: &str) -> ! {
        panic!("{msg}\n{}", self.diag())
    }

    /// Poll until `f` returns Some, or panic after `timeout` with `what` and the state.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut() -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(x) = f() {
                return x;
            }
            if Instant::now() > deadline {
                self.fail(&format!("timed out after {timeout:?} waiting for {what}"));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Statuses of the running nodes (None for a running node that does not answer).
    pub fn statuses(&self) -> Vec<(usize, Option<Status>)> {
        self.live()
            .into_iter()
            .map(|i| (i, self.status(i)))
            .collect()
    }

    /// A writable leader that a majority of the running nodes name as leader, if any.
    pub fn current_leader(&self) -> Option<usize> {
        self.current_leader_except(&[])
    }

    fn current_leader_except(&self, exclude: &[usize]) -> Option<usize> {
        let sts = self.statuses();
        let live = sts.len();
        sts.iter()
            .filter_map(|(i, s)| s.as_ref().map(|s| (*i, s)))
            .filter(|(i, s)| s.is_writable_leader() && !exclude.contains(i))
            .map(|(i, _)| i)
            .find(|&cand| {
                let agree = sts
                    .iter()
                    .filter(|(_, s)| s.as_ref().is_some_and(|s| s.leader_id == Some(cand as u64)))
                    .count();
                agree * 2 > live
            })
    }

    /// Wait for a writable leader agreed on by a majority of the running nodes.
    pub fn wait_leader(&self, timeout: Duration) -> usize {
        self.wait_for("a writable leader agreed by a majority", timeout, || {
            self.current_leader()
        })
    }

    /// Wait for a writable, majority-agreed leader that is not one of `exclude`.
    pub fn wait_leader_except(&self, exclude: &[usize], timeout: Duration) -> usize {
        self.wait_for(
            &format!("a writable leader other than {exclude:?}"),
            timeout,
            || self.current_leader_except(exclude),
        )
    }

    /// Digest of node `i`'s `DATA_DIR/tree`.
    pub fn try_tree_digest(&self, i: usize) -> io::Result<[u8; 32]> {
        dir_digest(&self.data_dir(i).join("tree"))
    }

    pub fn tree_digest(&self, i: usize) -> [u8; 32] {
        self.try_tree_digest(i)
            .unwrap_or_else(|e| self.fail(&format!("tree digest of node {i}: {e}")))
    }

    /// Wait until every running node has applied the leader's last index and all their
    /// trees have the same digest; returns that digest.
    pub fn wait_converged(&self, timeout: Duration) -> [u8; 32] {
        let started = Instant::now();
        let deadline = started + timeout;
        loop {
            let why = match self.converged_now() {
                Ok(d) => {
                    eprintln!(
                        "--- converged in {:?}: nodes {:?} at digest {}",
                        started.elapsed(),
                        self.live(),
                        &hex(&d)[..16]
                    );
                    return d;
                }
                Err(why) => why,
            };
            if Instant::now() > deadline {
                self.fail(&format!("nodes did not converge within {timeout:?}: {why}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn converged_now(&self) -> Result<[u8; 32], String> {
        let sts = self.statuses();
        let mut got = Vec::new();
        for (i, s) in &sts {
            match s {
                Some(s) => got.push((*i, s.clone())),
                None => return Err(format!("node {i} does not answer status")),
            }
        }
        let leader = got
            .iter()
            .filter(|(_, s)| s.role == "leader")
            .max_by_key(|(_, s)| s.term)
            .ok_or_else(|| "no leader".to_string())?;
        let target = leader.1.last_index;
        if leader.1.committed_index != target {
            return Err(format!(
                "leader {} committed {} of {target}",
                leader.0, leader.1.committed_index
            ));
        }
        if let Some((i, s)) = got.iter().find(|(_, s)| s.applied_index != target) {
            return Err(format!(
                "node {i} applied {} of the leader's {target}",
                s.applied_index
            ));
        }
        let mut digests = Vec::new();
        for (i, _) in &got {
            let d = self
                .try_tree_digest(*i)
                .map_err(|e| format!("digest of node {i}: {e}"))?;
            digests.push((*i, d));
        }
        if digests.iter().any(|(_, d)| *d != digests[0].1) {
            let shown: Vec<String> = digests
                .iter()
                .map(|(i, d)| format!("node {i} {}", &hex(d)[..16]))
                .collect();
            return Err(format!(
                "trees differ at index {target}: {}",
                shown.join(", ")
            ));
        }
        Ok(digests[0].1)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The statuses are only available while the daemons run. Logs can be large
            // (hundreds of MB when a daemon spins), so print tails and keep the files.
            for i in self.nodes() {
                if let Ok(s) = self.status_raw(i) {
                    eprintln!("node {i} status at failure: {}", s.trim());
                }
            }
            eprintln!("{}", self.links.describe());
            self.keep_logs();
        }
        // Daemons first (killed by PID, mounts detached; killing through Daemon::kill9 keeps
        // its guard from dumping whole logs), then proxies; the directory goes last (field
        // order).
        for d in self.daemons.iter_mut() {
            if let Some(d) = d.take() {
                d.kill9();
            }
        }
        self.proxies.clear();
    }
}

impl Cluster {
    /// Copy every daemon log of this cluster out of its directory (which is removed on
    /// drop) and print where, with the last lines of each node's latest run.
    fn keep_logs(&self) {
        const TAIL: usize = 200;
        let base = std::env::var_os("SEGURO_TEST_TMP")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let name = self
            .dir
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let keep = base.join(format!("{name}-logs"));
        let _ = fs::create_dir_all(&keep);
        for i in self.nodes() {
            for (run, p) in self.logs[i - 1].iter().enumerate() {
                let _ = fs::copy(p, keep.join(format!("node{i}-run{run}.log")));
            }
            let text = self.log_text(i);
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(TAIL);
            eprintln!(
                "--- node {i}: last {} of {} log lines:\n{}",
                lines.len() - from,
                lines.len(),
                lines[from..].join("\n")
            );
        }
        eprintln!("--- full daemon logs kept in {}", keep.display());
    }
}
