//! A fault-injecting TCP proxy for multi-node tests, controlled by the test.
//!
//! Node `j` advertises `127.0.0.(100+j):PORT` to its peers; a [`Proxy`] listens there and
//! forwards to `j`'s real listen address `127.0.0.j:PORT`. The daemon binds its outgoing peer
//! connections to its own listen IP, so the proxy knows the source node of every accepted
//! connection from the peer address (`127.0.0.i` → node `i`). A shared [`Links`] object
//! decides which pairs of nodes may talk: blocking a pair closes the forwarded connections
//! between them at once (both directions: from `i` into proxy `j` and from `j` into proxy `i`)
//! and refuses new ones (accept, then close). Two softer faults act on the bytes instead:
//! [`Links::drop_flow`] discards everything node `a` sends to node `b` (whichever side opened
//! the connection) while `b`'s bytes to `a` still flow — a one-way loss; and
//! [`Links::set_latency_ms`] delays every forwarded chunk.
//!
//! std threads and std::net only: one accept thread per proxy and two copy threads per
//! forwarded connection. Every loop is stoppable: copy threads read with a timeout and check a
//! stop flag; the accept thread is woken by a connection the proxy makes to itself on drop;
//! every socket has a `try_clone` handle kept in [`Links`] so it can be `shutdown(Both)`,
//! which also wakes a thread blocked in `write`.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often a copy thread wakes up to look at the stop flag.
const READ_POLL: Duration = Duration::from_millis(200);
/// Connecting to the real listen address of the target node.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Copy buffer per direction.
const COPY_BUF_BYTES: usize = 64 * 1024;

/// The real listen address of node `i` (`127.0.0.i`).
pub fn real_ip(i: usize) -> Ipv4Addr {
    assert!((1..100).contains(&i), "node ids 1..=99 only, got {i}");
    Ipv4Addr::new(127, 0, 0, i as u8)
}

/// The advertised address of node `i` (`127.0.0.(100+i)`), where its proxy listens.
pub fn advertised_ip(i: usize) -> Ipv4Addr {
    assert!((1..100).contains(&i), "node ids 1..=99 only, got {i}");
    Ipv4Addr::new(127, 0, 0, 100 + i as u8)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking copy thread must not wedge the test's control of the links.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Unordered pair key.
fn pair(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

/// One forwarded connection: `from` is the source node (0 if the peer IP is not a node's),
/// `to` the node whose proxy accepted it.
struct Conn {
    from: usize,
    to: usize,
    client: TcpStream,
    upstream: TcpStream,
    /// Copy threads still running; the last one out removes the entry.
    running: Arc<AtomicUsize>,
    /// Bytes were discarded by a one-way drop: the stream is out of frame from there on, so
    /// [`Links::heal`] cuts it.
    tainted: Arc<AtomicBool>,
}

impl Conn {
    fn kill(&self) {
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.upstream.shutdown(Shutdown::Both);
    }
}

/// Connection counters, for diagnostics.
#[derive(Debug, Default, Clone)]
pub struct LinkStats {
    /// (from, to) → connections forwarded.
    pub forwarded: BTreeMap<(usize, usize), u64>,
    /// (from, to) → connections refused because the pair was blocked.
    pub refused: BTreeMap<(usize, usize), u64>,
    /// (from, to) → connections closed by a partition while open.
    pub cut: BTreeMap<(usize, usize), u64>,
    /// (from, to) → bytes discarded by a one-way drop of the flow from → to.
    pub dropped_bytes: BTreeMap<(usize, usize), u64>,
    /// Connections whose target node was not reachable.
    pub upstream_failed: u64,
    /// Connections whose source IP was the target's own or no node's: the daemon does not
    /// bind its outgoing connections to its listen IP, so partitions cannot be told apart.
    pub unidentified: u64,
}

/// Which node pairs may talk, and the open forwarded connections. Shared by all proxies of a
/// cluster.
pub struct Links {
    nodes: usize,
    blocked: Mutex<BTreeSet<(usize, usize)>>,
    /// Directed flows (from, to) whose bytes are discarded.
    dropped: Mutex<BTreeSet<(usize, usize)>>,
    /// Delay before each forwarded chunk, in both directions of every link.
    latency_ms: AtomicU64,
    conns: Mutex<BTreeMap<u64, Conn>>,
    next_id: AtomicU64,
    stats: Mutex<LinkStats>,
}

impl Links {
    pub fn new(nodes: usize) -> Arc<Links> {
        Arc::new(Links {
            nodes,
            blocked: Mutex::new(BTreeSet::new()),
            dropped: Mutex::new(BTreeSet::new()),
            latency_ms: AtomicU64::new(0),
            conns: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(0),
            stats: Mutex::new(LinkStats::default()),
        })
    }

    /// Node id of a peer IP: `127.0.0.i` with `1 <= i <= nodes`, else 0.
    pub fn node_of(&self, ip: IpAddr) -> usize {
        match ip {
            IpAddr::V4(v4) => {
                let o = v4.octets();
                let i = o[3] as usize;
                if o[..3] == [127, 0, 0] && (1..=self.nodes).contains(&i) {
                    i
                } else {
                    0
                }
            }
            IpAddr::V6(_) => 0,
        }
    }

    pub fn is_blocked(&self, a: usize, b: usize) -> bool {
        lock(&self.blocked).contains(&pair(a, b))
    }

    /// Block the pair (a, b) in both directions and cut its open connections.
    pub fn block(&self, a: usize, b: usize) {
        assert_ne!(a, b, "a node cannot be cut from itself");
        lock(&self.blocked).insert(pair(a, b));
        self.cut_blocked();
    }

    /// Isolate the set `nodes` from every node outside it (both directions); links inside
    /// the set stay up. `partition(&[i])` isolates node `i` from everyone.
    pub fn partition(&self, nodes: &[usize]) {
        {
            let mut blocked = lock(&self.blocked);
            for &a in nodes {
                assert!((1..=self.nodes).contains(&a), "no node {a}");
                for b in 1..=self.nodes {
                    if !nodes.contains(&b) {
                        blocked.insert(pair(a, b));
                    }
                }
            }
        }
        self.cut_blocked();
    }

    /// Discard every byte node `from` sends to node `to` from now on (over connections
    /// either of them opened); `to`'s bytes to `from` still flow.
    pub fn drop_flow(&self, from: usize, to: usize) {
        assert_ne!(from, to, "a node cannot drop its own traffic");
        assert!((1..=self.nodes).contains(&from) && (1..=self.nodes).contains(&to));
        lock(&self.dropped).insert((from, to));
    }

    fn is_dropped(&self, from: usize, to: usize) -> bool {
        lock(&self.dropped).contains(&(from, to))
    }

    /// Delay every forwarded chunk by `ms` (0: none).
    pub fn set_latency_ms(&self, ms: u64) {
        self.latency_ms.store(ms, Ordering::Relaxed);
    }

    /// Unblock every pair, stop every one-way drop (cutting the connections that lost bytes
    /// to one) and remove the latency.
    pub fn heal(&self) {
        lock(&self.blocked).clear();
        lock(&self.dropped).clear();
        self.set_latency_ms(0);
        for c in lock(&self.conns).values() {
            if c.tainted.load(Ordering::SeqCst) {
                c.kill();
            }
        }
    }

    /// Blocked pairs, for messages.
    pub fn blocked_pairs(&self) -> Vec<(usize, usize)> {
        lock(&self.blocked).iter().copied().collect()
    }

    pub fn stats(&self) -> LinkStats {
        lock(&self.stats).clone()
    }

    /// Open forwarded connections as (from, to) pairs.
    pub fn open_conns(&self) -> Vec<(usize, usize)> {
        lock(&self.conns).values().map(|c| (c.from, c.to)).collect()
    }

    /// One line per kind of counter, for panic messages.
    pub fn describe(&self) -> String {
        let s = self.stats();
        format!(
            "links: blocked {:?}; dropped flows {:?}; latency {} ms; open {:?}; forwarded \
             {:?}; refused {:?}; cut {:?}; dropped bytes {:?}; upstream failed {}; \
             unidentified sources {}",
            self.blocked_pairs(),
            lock(&self.dropped).iter().collect::<Vec<_>>(),
            self.latency_ms.load(Ordering::Relaxed),
            self.open_conns(),
            s.forwarded,
            s.refused,
            s.cut,
            s.dropped_bytes,
            s.upstream_failed,
            s.unidentified
        )
    }

    fn cut_blocked(&self) {
        let blocked = lock(&self.blocked).clone();
        let conns = lock(&self.conns);
        let mut stats = lock(&self.stats);
        for c in conns.values() {
            if c.from != 0 && blocked.contains(&pair(c.from, c.to)) {
                c.kill();
                *stats.cut.entry((c.from, c.to)).or_default() += 1;
            }
        }
    }

    /// Shut down every connection into node `to`'s proxy (the proxy is stopping).
    fn kill_into(&self, to: usize) {
        for c in lock(&self.conns).values().filter(|c| c.to == to) {
            c.kill();
        }
    }
}

/// One proxy: listens on node `node`'s advertised address, forwards to its real address.
/// Dropping it stops the accept thread and every connection it forwarded, and joins all of
/// its threads.
pub struct Proxy {
    node: usize,
    listen: SocketAddr,
    links: Arc<Links>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    copiers: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    /// Accept on `listener` (bound by the caller, see `pick_port_bound`) and forward to
    /// `target`.
    pub fn start(
        node: usize,
        listener: TcpListener,
        target: SocketAddr,
        links: Arc<Links>,
    ) -> Proxy {
        let listen = listener.local_addr().expect("proxy listener address");
        assert!(
            matches!(listen.ip(), IpAddr::V4(v4) if v4.octets()[0] == 127),
            "proxies listen on loopback only, not {listen}"
        );
        let stop = Arc::new(AtomicBool::new(false));
        let copiers = Arc::new(Mutex::new(Vec::new()));
        let accept = {
            let (links, stop, copiers) = (links.clone(), stop.clone(), copiers.clone());
            std::thread::Builder::new()
                .name(format!("proxy-{node}-accept"))
                .spawn(move || accept_loop(node, listener, target, links, stop, copiers))
                .expect("spawn proxy accept thread")
        };
        Proxy {
            node,
            listen,
            links,
            stop,
            accept: Some(accept),
            copiers,
        }
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept; it sees the stop flag and returns.
        let _ = TcpStream::connect_timeout(&self.listen, Duration::from_secs(1));
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        self.links.kill_into(self.node);
        // Copy threads exit within READ_POLL of the stop flag or at once after the shutdown.
        let handles: Vec<JoinHandle<()>> = std::mem::take(&mut *lock(&self.copiers));
        for h in handles {
            let _ = h.join();
        }
    }
}

fn accept_loop(
    node: usize,
    listener: TcpListener,
    target: SocketAddr,
    links: Arc<Links>,
    stop: Arc<AtomicBool>,
    copiers: Arc<Mutex<Vec<JoinHandle<()>>>>,
) {
    // Bounded by the stop flag: Proxy::drop sets it and then connects once to wake us.
    loop {
        let accepted = listener.accept();
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let (client, peer) = match accepted {
            Ok(x) => x,
            Err(_) => {
                // EMFILE and friends: back off instead of spinning.
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        let from = links.node_of(peer.ip());
        if from == 0 || from == node {
            lock(&links.stats).unidentified += 1;
        }
        if from != 0 && from != node && links.is_blocked(from, node) {
            *lock(&links.stats).refused.entry((from, node)).or_default() += 1;
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        let upstream = match TcpStream::connect_timeout(&target, UPSTREAM_CONNECT_TIMEOUT) {
            Ok(s) => s,
            Err(_) => {
                // The node is down: the peer sees its connection closed, like a refusal.
                lock(&links.stats).upstream_failed += 1;
                let _ = client.shutdown(Shutdown::Both);
                continue;
            }
        };
        if let Err(e) = forward(node, from, client, upstream, &links, &stop, &copiers) {
            eprintln!("proxy {node}: cannot forward a connection from node {from}: {e}");
        }
        // Forget finished copy threads so the list stays bounded by open connections.
        lock(&copiers).retain(|h| !h.is_finished());
    }
}

fn forward(
    node: usize,
    from: usize,
    client: TcpStream,
    upstream: TcpStream,
    links: &Arc<Links>,
    stop: &Arc<AtomicBool>,
    copiers: &Arc<Mutex<Vec<JoinHandle<()>>>>,
) -> io::Result<()> {
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    client.set_read_timeout(Some(READ_POLL))?;
    upstream.set_read_timeout(Some(READ_POLL))?;
    let id = links.next_id.fetch_add(1, Ordering::Relaxed);
    let running = Arc::new(AtomicUsize::new(2));
    let tainted = Arc::new(AtomicBool::new(false));
    let conn = Conn {
        from,
        to: node,
        client: client.try_clone()?,
        upstream: upstream.try_clone()?,
        running: running.clone(),
        tainted: tainted.clone(),
    };
    {
        // Register under the conns lock, then re-check the block: a partition that raced
        // with this accept either sees the entry (and cuts it) or is seen here.
        let mut conns = lock(&links.conns);
        conns.insert(id, conn);
        if from != 0 && from != node && links.is_blocked(from, node) {
            if let Some(c) = conns.remove(&id) {
                c.kill();
            }
            *lock(&links.stats).refused.entry((from, node)).or_default() += 1;
            return Ok(());
        }
    }
    *lock(&links.stats)
        .forwarded
        .entry((from, node))
        .or_default() += 1;
    // (source, destination, node whose bytes these are, node they go to, name)
    let dirs = [
        (client.try_clone()?, upstream.try_clone()?, from, node, "in"),
        (upstream, client, node, from, "out"),
    ];
    for (src, dst, sender, receiver, dir) in dirs {
        let (links, stop, running) = (links.clone(), stop.clone(), running.clone());
        let flow = Flow {
            links: links.clone(),
            sender,
            receiver,
            tainted: tainted.clone(),
        };
        let h = std::thread::Builder::new()
            .name(format!("proxy-{from}-{node}-{dir}"))
            .spawn(move || {
                copy(src, dst, &stop, &flow);
                if running.fetch_sub(1, Ordering::SeqCst) == 1 {
                    lock(&links.conns).remove(&id);
                }
            })?;
        lock(copiers).push(h);
    }
    Ok(())
}

/// One direction of a forwarded connection, for the byte-level faults.
struct Flow {
    links: Arc<Links>,
    /// Node whose bytes these are (0: not a node).
    sender: usize,
    receiver: usize,
    tainted: Arc<AtomicBool>,
}

impl Flow {
    /// Apply the latency, then say whether this chunk is to be discarded.
    fn discard(&self, n: usize) -> bool {
        let ms = self.links.latency_ms.load(Ordering::Relaxed);
        if ms > 0 {
            std::thread::sleep(Duration::from_millis(ms));
        }
        if self.sender == 0
            || self.receiver == 0
            || !self.links.is_dropped(self.sender, self.receiver)
        {
            return false;
        }
        self.tainted.store(true, Ordering::SeqCst);
        *lock(&self.links.stats)
            .dropped_bytes
            .entry((self.sender, self.receiver))
            .or_default() += n as u64;
        true
    }
}

/// Copy `src` → `dst` until EOF (then half-close `dst`), an error (then shut both down) or
/// the stop flag; `flow` may delay or discard each chunk.
fn copy(mut src: TcpStream, mut dst: TcpStream, stop: &AtomicBool, flow: &Flow) {
    let mut buf = vec![0u8; COPY_BUF_BYTES];
    loop {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        match src.read(&mut buf) {
            Ok(0) => {
                let _ = dst.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                if !flow.discard(n) && dst.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => break,
        }
    }
    let _ = src.shutdown(Shutdown::Both);
    let _ = dst.shutdown(Shutdown::Both);
}
