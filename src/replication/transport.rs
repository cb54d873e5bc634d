//! Authenticated framed TCP links between cluster members.
//!
//! Handshake (keyed blake3, key derived from the cluster key file):
//!
//! ```text
//! client → server  MAGIC | client id u64 | nonce_c[32]
//! server → client  MAGIC | server id u64 | nonce_s[32] | tag_s = H(k, "srv"|nonce_c|nonce_s|ids)
//! client → server  tag_c = H(k, "cli"|nonce_s|nonce_c|ids)
//! ```
//!
//! Both sides prove knowledge of the cluster key over fresh nonces before anything else is
//! read; a peer without the key is dropped before a single Raft message is decoded. Each
//! direction then has its own session key, and every frame is
//! `len u32 | payload | tag[16]` with `tag = H(session key, seq | len | payload)`; the
//! receiver counts `seq` itself, so a replayed, reordered or altered frame is rejected.
//! Frames larger than `frame_bytes_max` are refused before their payload is read. Payloads
//! land in 16-byte aligned buffers so rkyv can validate them in place.
//!
//! Links are authenticated, not encrypted (event data crosses the wire in clear); run
//! clusters on a private network until encryption lands.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use rkyv::util::AlignedVec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const MAGIC: &[u8; 8] = b"SEGURO01";
const TAG_BYTES: usize = 16;

/// The cluster secret, already stretched to a blake3 key.
#[derive(Clone)]
pub struct ClusterKey([u8; 32]);

impl ClusterKey {
    /// Derive the link key from the key file's bytes (surrounding whitespace ignored).
    pub fn from_file_bytes(bytes: &[u8]) -> ClusterKey {
        let trimmed = bytes.trim_ascii();
        ClusterKey(blake3::derive_key("seguro-fs cluster key v1", trimmed))
    }

    /// A short public fingerprint (it reveals nothing about the key): the data dir records
    /// it so a data dir cannot be joined to another cluster by mistake.
    pub fn fingerprint(&self) -> String {
        let h = blake3::keyed_hash(&self.0, b"fingerprint");
        h.to_hex()[..16].to_string()
    }

    fn tag(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        for p in parts {
            h.update(p);
        }
        *h.finalize().as_bytes()
    }
}

/// Why a link failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("peer authentication failed: {0}")]
    Auth(&'static str),
    #[error("frame of {0} bytes exceeds frame_bytes_max")]
    TooLarge(usize),
    #[error("frame authentication failed (corrupt or forged frame)")]
    BadFrame,
    #[error("timed out")]
    Timeout,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Limits of one link.
#[derive(Debug, Clone, Copy)]
pub struct LinkLimits {
    pub frame_bytes_max: usize,
    pub connect_timeout_ms: u64,
    pub io_timeout_ms: u64,
}

struct Direction {
    key: ClusterKey,
    seq: u64,
}

impl Direction {
    fn frame_tag(&self, payload: &[u8]) -> [u8; TAG_BYTES] {
        let t = self.key.tag(&[
            &self.seq.to_le_bytes(),
            &(payload.len() as u32).to_le_bytes(),
            payload,
        ]);
        let mut out = [0u8; TAG_BYTES];
        out.copy_from_slice(&t[..TAG_BYTES]);
        out
    }
}

/// An authenticated link: send and receive whole frames.
pub struct Link {
    stream: TcpStream,
    send: Direction,
    recv: Direction,
    limits: LinkLimits,
    /// The authenticated node id at the other end.
    pub peer_id: u64,
}

fn random_nonce() -> io::Result<[u8; 32]> {
    let mut b = [0u8; 32];
    // SAFETY: getrandom fills the buffer we own.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        return Err(io::Error::last_os_error());
    }
    Ok(b)
}

async fn timed<T>(
    ms: u64,
    f: impl std::future::Future<Output = Result<T, LinkError>>,
) -> Result<T, LinkError> {
    tokio::time::timeout(Duration::from_millis(ms), f)
        .await
        .map_err(|_| LinkError::Timeout)?
}

fn session(key: &ClusterKey, label: &[u8], nc: &[u8; 32], ns: &[u8; 32]) -> Direction {
    Direction {
        key: ClusterKey(key.tag(&[label, nc, ns])),
        seq: 0,
    }
}

impl Link {
    /// Connect to `addr` from `bind_ip` and authenticate as `my_id`.
    pub async fn connect(
        addr: SocketAddr,
        bind_ip: Option<IpAddr>,
        key: &ClusterKey,
        my_id: u64,
        limits: LinkLimits,
    ) -> Result<Link, LinkError> {
        let stream = timed(limits.connect_timeout_ms, async {
            let socket = if addr.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            if let Some(ip) = bind_ip {
                socket.bind(SocketAddr::new(ip, 0))?;
            }
            Ok(socket.connect(addr).await?)
        })
        .await?;
        stream.set_nodelay(true)?;
        timed(
            limits.io_timeout_ms,
            Self::client_handshake(stream, key, my_id, limits),
        )
        .await
    }

    async fn client_handshake(
        mut stream: TcpStream,
        key: &ClusterKey,
        my_id: u64,
        limits: LinkLimits,
    ) -> Result<Link, LinkError> {
        let nc = random_nonce()?;
        let mut hello = Vec::with_capacity(48);
        hello.extend_from_slice(MAGIC);
        hello.extend_from_slice(&my_id.to_le_bytes());
        hello.extend_from_slice(&nc);
        stream.write_all(&hello).await?;
        let mut reply = [0u8; 8 + 8 + 32 + 32];
        stream.read_exact(&mut reply).await?;
        if &reply[..8] != MAGIC {
            return Err(LinkError::Auth("not a seguro-fs peer"));
        }
        let server_id = u64::from_le_bytes(reply[8..16].try_into().expect("8 bytes"));
        let ns: [u8; 32] = reply[16..48].try_into().expect("32 bytes");
        let ids = [server_id.to_le_bytes(), my_id.to_le_bytes()].concat();
        let want = key.tag(&[b"srv", &nc, &ns, &ids]);
        if reply[48..80] != want {
            return Err(LinkError::Auth("server does not hold the cluster key"));
        }
        stream
            .write_all(&key.tag(&[b"cli", &ns, &nc, &ids]))
            .await?;
        Ok(Link {
            stream,
            send: session(key, b"c2s", &nc, &ns),
            recv: session(key, b"s2c", &nc, &ns),
            limits,
            peer_id: server_id,
        })
    }

    /// Authenticate an accepted connection as server `my_id`.
    pub async fn accept(
        mut stream: TcpStream,
        key: &ClusterKey,
        my_id: u64,
        limits: LinkLimits,
    ) -> Result<Link, LinkError> {
        stream.set_nodelay(true)?;
        timed(limits.io_timeout_ms, async move {
            let mut hello = [0u8; 48];
            stream.read_exact(&mut hello).await?;
            if &hello[..8] != MAGIC {
                return Err(LinkError::Auth("not a seguro-fs peer"));
            }
            let client_id = u64::from_le_bytes(hello[8..16].try_into().expect("8 bytes"));
            let nc: [u8; 32] = hello[16..48].try_into().expect("32 bytes");
            let ns = random_nonce()?;
            let ids = [my_id.to_le_bytes(), client_id.to_le_bytes()].concat();
            let mut reply = Vec::with_capacity(80);
            reply.extend_from_slice(MAGIC);
            reply.extend_from_slice(&my_id.to_le_bytes());
            reply.extend_from_slice(&ns);
            reply.extend_from_slice(&key.tag(&[b"srv", &nc, &ns, &ids]));
            stream.write_all(&reply).await?;
            let mut tag_c = [0u8; 32];
            stream.read_exact(&mut tag_c).await?;
            if tag_c != key.tag(&[b"cli", &ns, &nc, &ids]) {
                return Err(LinkError::Auth("client does not hold the cluster key"));
            }
            Ok(Link {
                stream,
                send: session(key, b"s2c", &nc, &ns),
                recv: session(key, b"c2s", &nc, &ns),
                limits,
                peer_id: client_id,
            })
        })
        .await
    }

    pub async fn send(&mut self, payload: &[u8]) -> Result<(), LinkError> {
        if payload.len() > self.limits.frame_bytes_max {
            return Err(LinkError::TooLarge(payload.len()));
        }
        let tag = self.send.frame_tag(payload);
        self.send.seq += 1;
        let io = self.limits.io_timeout_ms;
        let stream = &mut self.stream;
        timed(io, async move {
            stream
                .write_all(&(payload.len() as u32).to_le_bytes())
                .await?;
            stream.write_all(payload).await?;
            stream.write_all(&tag).await?;
            Ok(())
        })
        .await
    }

    /// Receive one frame. `idle_ms` bounds the wait for its first byte (a server waits
    /// longer for the next request than a client for its response).
    pub async fn recv(&mut self, idle_ms: u64) -> Result<AlignedVec<16>, LinkError> {
        let mut len = [0u8; 4];
        timed(idle_ms, async {
            self.stream.read_exact(&mut len).await?;
            Ok(())
        })
        .await?;
        let len = u32::from_le_bytes(len) as usize;
        if len > self.limits.frame_bytes_max {
            return Err(LinkError::TooLarge(len));
        }
        let mut payload = AlignedVec::<16>::with_capacity(len);
        payload.resize(len, 0);
        let mut tag = [0u8; TAG_BYTES];
        let io = self.limits.io_timeout_ms;
        let stream = &mut self.stream;
        timed(io, async {
            stream.read_exact(&mut payload).await?;
            stream.read_exact(&mut tag).await?;
            Ok(())
        })
        .await?;
        if tag != self.recv.frame_tag(&payload) {
            return Err(LinkError::BadFrame);
        }
        self.recv.seq += 1;
        Ok(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    const LIMITS: LinkLimits = LinkLimits {
        frame_bytes_max: 1 << 20,
        connect_timeout_ms: 2000,
        io_timeout_ms: 2000,
    };

    async fn pair(
        server_key: ClusterKey,
        client_key: ClusterKey,
    ) -> (Result<Link, LinkError>, Result<Link, LinkError>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            Link::accept(s, &server_key, 1, LIMITS).await
        });
        let client = Link::connect(addr, None, &client_key, 2, LIMITS).await;
        (server.await.unwrap(), client)
    }

    #[tokio::test]
    async fn frames_flow_both_ways_with_the_right_key() {
        let k = ClusterKey::from_file_bytes(b"secret\n");
        let (s, c) = pair(k.clone(), k).await;
        let (mut s, mut c) = (s.unwrap(), c.unwrap());
        assert_eq!((s.peer_id, c.peer_id), (2, 1));
        c.send(b"hello").await.unwrap();
        assert_eq!(&s.recv(1000).await.unwrap()[..], b"hello");
        s.send(&[7u8; 70_000]).await.unwrap();
        assert_eq!(c.recv(1000).await.unwrap().len(), 70_000);
        assert!(
            c.send(&vec![0u8; (1 << 20) + 1]).await.is_err(),
            "oversized frame"
        );
    }

    #[tokio::test]
    async fn a_wrong_key_is_refused_by_both_sides() {
        let (s, c) = pair(
            ClusterKey::from_file_bytes(b"right"),
            ClusterKey::from_file_bytes(b"wrong"),
        )
        .await;
        assert!(matches!(c, Err(LinkError::Auth(_))));
        assert!(s.is_err());
    }

    #[tokio::test]
    async fn a_tampered_frame_is_rejected() {
        let k = ClusterKey::from_file_bytes(b"k");
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let k2 = k.clone();
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut link = Link::accept(s, &k2, 1, LIMITS).await.unwrap();
            link.recv(2000).await
        });
        let mut c = Link::connect(addr, None, &k, 2, LIMITS).await.unwrap();
        // Write a frame whose tag belongs to other bytes.
        let tag = c.send.frame_tag(b"good");
        c.stream.write_all(&4u32.to_le_bytes()).await.unwrap();
        c.stream.write_all(b"evil").await.unwrap();
        c.stream.write_all(&tag).await.unwrap();
        assert!(matches!(server.await.unwrap(), Err(LinkError::BadFrame)));
    }
}
