//! Authenticated, encrypted framed TCP links between cluster members.
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
//! direction then has its own AEAD key, `H(k, label|"c2s"|"s2c"|nonce_c|nonce_s|ids)`,
//! fresh for every connection because both nonces are. The AEAD is AES-256-GCM (protocol
//! v3, `SEGURO03`; ring, ~6× ChaCha20-Poly1305's rate on AES-NI hardware, which matters
//! because every replicated byte is sealed once per follower) or ChaCha20-Poly1305 (v2,
//! `SEGURO02`, what the previous release speaks). Every frame is
//! `len u32 | ciphertext | tag[16]`: the payload is encrypted under the direction's key
//! with the direction's frame counter as the AEAD nonce (counted by each side itself,
//! never sent, never reused: a link refuses its 2^64−1st frame) and `len` as associated
//! data, so a changed length, an altered, replayed, reordered, dropped or foreign frame
//! fails to open. Any failure closes the link: a `Link` that failed (or whose send or
//! receive was cancelled half-way) refuses every later call, and its owner reconnects.
//! Frames larger than `frame_bytes_max` are refused before their payload is read.
//! Payloads are decrypted in place in 16-byte aligned buffers so rkyv can validate them
//! where they lie.
//!
//! MAGIC names the protocol version: v1 (`SEGURO01`) links were authenticated but not
//! encrypted, and a v1 peer is refused with an error that says so. A server answers a v2
//! or v3 hello in the same version; a client offers v3 and, when the server closes the
//! connection on it (a member of the previous release), connects again offering v2, so
//! the release that brought v3 can be rolled out one member at a time.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use chacha20poly1305::aead::inout::InOutBuf;
use chacha20poly1305::{AeadInOut, ChaCha20Poly1305, Key, KeyInit, Nonce, Tag};
use ring::aead::{Aad, LessSafeKey, UnboundKey, AES_256_GCM};
use rkyv::util::AlignedVec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The link protocol this release offers: v3, AES-256-GCM.
const MAGIC: &[u8; 8] = b"SEGURO03";
/// The previous release's protocol, ChaCha20-Poly1305, still spoken with its members.
const MAGIC_V2: &[u8; 8] = b"SEGURO02";
/// The part of MAGIC every version shares: a peer that sends it with another version is
/// a seguro-fs node of another release, not a stranger.
const MAGIC_FAMILY: &[u8; 6] = b"SEGURO";
const TAG_BYTES: usize = 16;
const LEN_BYTES: usize = 4;

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
    #[error(
        "peer speaks link protocol {found:?}, this node {MAGIC:?} (encrypted links); \
         run the same seguro-fs release on every member (stop them all, upgrade, start)"
    )]
    Version { found: String },
    #[error(
        "the peer closed the connection during the handshake: it is at \
         peer_connections_max, is not a seguro-fs node, or runs an older seguro-fs \
         (unencrypted link protocol SEGURO01) that this release no longer speaks"
    )]
    HandshakeClosed,
    #[error("frame of {0} bytes exceeds frame_bytes_max")]
    TooLarge(usize),
    #[error("frame authentication failed (corrupt, forged, replayed or reordered frame)")]
    BadFrame,
    #[error("link closed after an earlier failure; reconnect")]
    Closed,
    #[error("link sent 2^64-1 frames, its nonce space; reconnect")]
    Exhausted,
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

/// A link's AEAD, by protocol version.
enum Aead {
    /// v2.
    ChaCha(ChaCha20Poly1305),
    /// v3 (boxed: ring's key schedule is ~0.5 KiB).
    Aes(Box<LessSafeKey>),
}

/// One direction of a link: its AEAD key and the number of frames it carried so far.
struct Direction {
    aead: Aead,
    seq: u64,
}

impl Direction {
    /// `label` names the direction, so the two directions never share a key (and thus
    /// never a (key, nonce) pair) although both count from 0; the version is in the
    /// derivation too, so the two ciphers never share a key either.
    fn new(
        key: &ClusterKey,
        magic: &[u8; 8],
        label: &[u8],
        (nc, ns, ids): (&[u8; 32], &[u8; 32], &[u8]),
    ) -> Self {
        let aead = if magic == MAGIC_V2 {
            let k = key.tag(&[b"seguro-fs link v2 aead ", label, nc, ns, ids]);
            Aead::ChaCha(ChaCha20Poly1305::new(&Key::from(k)))
        } else {
            let k = key.tag(&[b"seguro-fs link v3 aead ", label, nc, ns, ids]);
            let k = UnboundKey::new(&AES_256_GCM, &k).expect("a 32-byte key");
            Aead::Aes(Box::new(LessSafeKey::new(k)))
        };
        Direction { aead, seq: 0 }
    }

    /// The AEAD nonce of the next frame: 4 zero bytes, then the frame counter.
    fn nonce(&self) -> [u8; 12] {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&self.seq.to_le_bytes());
        n
    }

    /// The whole frame carrying `payload`: length, ciphertext (written straight into the
    /// frame, no plaintext copy), tag.
    fn seal(&mut self, payload: &[u8]) -> Result<Vec<u8>, LinkError> {
        // The last counter value is never used, so no nonce repeats under this key.
        if self.seq == u64::MAX {
            return Err(LinkError::Exhausted);
        }
        let len = payload.len();
        let mut frame = vec![0u8; LEN_BYTES + len + TAG_BYTES];
        let (head, rest) = frame.split_at_mut(LEN_BYTES);
        let (body, tag_out) = rest.split_at_mut(len);
        head.copy_from_slice(&(len as u32).to_le_bytes());
        let nonce = self.nonce();
        match &self.aead {
            Aead::ChaCha(a) => {
                let buf = InOutBuf::new(payload, body).expect("body is payload-sized");
                let tag = a
                    .encrypt_inout_detached(&Nonce::from(nonce), head, buf)
                    .map_err(|_| LinkError::TooLarge(len))?;
                tag_out.copy_from_slice(&tag);
            }
            Aead::Aes(k) => {
                body.copy_from_slice(payload);
                let nonce = ring::aead::Nonce::assume_unique_for_key(nonce);
                let tag = k
                    .seal_in_place_separate_tag(nonce, Aad::from(&*head), body)
                    .map_err(|_| LinkError::TooLarge(len))?;
                tag_out.copy_from_slice(tag.as_ref());
            }
        }
        self.seq += 1;
        Ok(frame)
    }

    /// Decrypt `body` in place if it is this direction's next frame with length prefix
    /// `head`.
    fn open(
        &mut self,
        head: &[u8; LEN_BYTES],
        body: &mut [u8],
        tag: &[u8; TAG_BYTES],
    ) -> Result<(), LinkError> {
        let nonce = self.nonce();
        match &self.aead {
            Aead::ChaCha(a) => a
                .decrypt_inout_detached(&Nonce::from(nonce), head, body.into(), &Tag::from(*tag))
                .map_err(|_| LinkError::BadFrame)?,
            Aead::Aes(k) => {
                let nonce = ring::aead::Nonce::assume_unique_for_key(nonce);
                k.open_in_place_separate_tag(
                    nonce,
                    Aad::from(head),
                    ring::aead::Tag::from(*tag),
                    body,
                    0..,
                )
                .map_err(|_| LinkError::BadFrame)?;
            }
        }
        self.seq += 1;
        Ok(())
    }
}

/// An authenticated, encrypted link: send and receive whole frames.
pub struct Link {
    stream: TcpStream,
    send: Direction,
    recv: Direction,
    limits: LinkLimits,
    /// Set while a send or receive is under way and left set if it fails or is
    /// cancelled: the stream is then at an unknown place in a frame (or was tampered
    /// with) and the link must not be used again.
    broken: bool,
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

/// Check a peer's MAGIC, telling an older seguro-fs from a stranger: the version it
/// names, if this release speaks it.
fn check_magic(found: &[u8]) -> Result<&'static [u8; 8], LinkError> {
    if found == MAGIC {
        Ok(MAGIC)
    } else if found == MAGIC_V2 {
        Ok(MAGIC_V2)
    } else if found.starts_with(MAGIC_FAMILY) {
        Err(LinkError::Version {
            found: String::from_utf8_lossy(found).into_owned(),
        })
    } else {
        Err(LinkError::Auth("not a seguro-fs peer"))
    }
}

impl Link {
    fn new(
        stream: TcpStream,
        key: &ClusterKey,
        magic: &[u8; 8],
        nonces: (&[u8; 32], &[u8; 32], &[u8]),
        is_client: bool,
        limits: LinkLimits,
        peer_id: u64,
    ) -> Link {
        let c2s = Direction::new(key, magic, b"c2s", nonces);
        let s2c = Direction::new(key, magic, b"s2c", nonces);
        let (send, recv) = if is_client { (c2s, s2c) } else { (s2c, c2s) };
        Link {
            stream,
            send,
            recv,
            limits,
            broken: false,
            peer_id,
        }
    }

    /// Connect to `addr` from `bind_ip` and authenticate as `my_id`: in protocol v3, or in
    /// v2 if the server closes on a v3 hello (a member of the previous release).
    pub async fn connect(
        addr: SocketAddr,
        bind_ip: Option<IpAddr>,
        key: &ClusterKey,
        my_id: u64,
        limits: LinkLimits,
    ) -> Result<Link, LinkError> {
        match Self::connect_as(MAGIC, addr, bind_ip, key, my_id, limits).await {
            Err(LinkError::HandshakeClosed) => {
                match Self::connect_as(MAGIC_V2, addr, bind_ip, key, my_id, limits).await {
                    // The more telling error: a v2 server that refuses the key or the
                    // version; otherwise what the v3 attempt met.
                    Err(e @ (LinkError::Auth(_) | LinkError::Version { .. })) => Err(e),
                    Err(_) => Err(LinkError::HandshakeClosed),
                    ok => ok,
                }
            }
            other => other,
        }
    }

    /// [`Link::connect`] offering protocol `magic` only.
    async fn connect_as(
        magic: &'static [u8; 8],
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
            Self::client_handshake(stream, magic, key, my_id, limits),
        )
        .await
    }

    async fn client_handshake(
        mut stream: TcpStream,
        magic: &'static [u8; 8],
        key: &ClusterKey,
        my_id: u64,
        limits: LinkLimits,
    ) -> Result<Link, LinkError> {
        let nc = random_nonce()?;
        let mut hello = Vec::with_capacity(48);
        hello.extend_from_slice(magic);
        hello.extend_from_slice(&my_id.to_le_bytes());
        hello.extend_from_slice(&nc);
        stream.write_all(&hello).await?;
        let mut reply = [0u8; 8 + 8 + 32 + 32];
        // A server (of any version) that refuses our hello closes without a word.
        stream.read_exact(&mut reply).await.map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                LinkError::HandshakeClosed
            } else {
                LinkError::Io(e)
            }
        })?;
        if check_magic(&reply[..8])? != magic {
            return Err(LinkError::Auth(
                "server answered in another protocol version",
            ));
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
        Ok(Link::new(
            stream,
            key,
            magic,
            (&nc, &ns, &ids),
            true,
            limits,
            server_id,
        ))
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
            let magic = check_magic(&hello[..8])?;
            let client_id = u64::from_le_bytes(hello[8..16].try_into().expect("8 bytes"));
            let nc: [u8; 32] = hello[16..48].try_into().expect("32 bytes");
            let ns = random_nonce()?;
            let ids = [my_id.to_le_bytes(), client_id.to_le_bytes()].concat();
            let mut reply = Vec::with_capacity(80);
            reply.extend_from_slice(magic);
            reply.extend_from_slice(&my_id.to_le_bytes());
            reply.extend_from_slice(&ns);
            reply.extend_from_slice(&key.tag(&[b"srv", &nc, &ns, &ids]));
            stream.write_all(&reply).await?;
            let mut tag_c = [0u8; 32];
            stream.read_exact(&mut tag_c).await?;
            if tag_c != key.tag(&[b"cli", &ns, &nc, &ids]) {
                return Err(LinkError::Auth("client does not hold the cluster key"));
            }
            Ok(Link::new(
                stream,
                key,
                magic,
                (&nc, &ns, &ids),
                false,
                limits,
                client_id,
            ))
        })
        .await
    }

    /// Mark the link busy; it stays marked (refusing later calls) unless the call
    /// completes.
    fn begin(&mut self) -> Result<(), LinkError> {
        if self.broken {
            return Err(LinkError::Closed);
        }
        self.broken = true;
        Ok(())
    }

    pub async fn send(&mut self, payload: &[u8]) -> Result<(), LinkError> {
        // Refused before anything is written: the link stays usable.
        if payload.len() > self.limits.frame_bytes_max {
            return Err(LinkError::TooLarge(payload.len()));
        }
        self.begin()?;
        let frame = self.send.seal(payload)?;
        let io = self.limits.io_timeout_ms;
        let stream = &mut self.stream;
        timed(io, async move { Ok(stream.write_all(&frame).await?) }).await?;
        self.broken = false;
        Ok(())
    }

    /// Receive one frame. `idle_ms` bounds the wait for its first byte (a server waits
    /// longer for the next request than a client for its response).
    pub async fn recv(&mut self, idle_ms: u64) -> Result<AlignedVec<16>, LinkError> {
        self.begin()?;
        let mut head = [0u8; LEN_BYTES];
        timed(idle_ms, async {
            self.stream.read_exact(&mut head).await?;
            Ok(())
        })
        .await?;
        let len = u32::from_le_bytes(head) as usize;
        if len > self.limits.frame_bytes_max {
            return Err(LinkError::TooLarge(len));
        }
        // Ciphertext and tag in one read; the tag is cut off after decryption, leaving
        // the plaintext at the buffer's aligned start.
        let mut buf = AlignedVec::<16>::with_capacity(len + TAG_BYTES);
        buf.resize(len + TAG_BYTES, 0);
        let io = self.limits.io_timeout_ms;
        let stream = &mut self.stream;
        timed(io, async {
            stream.read_exact(&mut buf).await?;
            Ok(())
        })
        .await?;
        let (body, tag) = buf.as_mut_slice().split_at_mut(len);
        let tag: [u8; TAG_BYTES] = (&*tag).try_into().expect("TAG_BYTES");
        self.recv.open(&head, body, &tag)?;
        buf.resize(len, 0);
        self.broken = false;
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::net::TcpListener;

    const LIMITS: LinkLimits = LinkLimits {
        frame_bytes_max: 1 << 20,
        connect_timeout_ms: 2000,
        io_timeout_ms: 2000,
    };

    /// A server on a fresh loopback port that accepts one link as node 1.
    async fn accept_one(
        key: ClusterKey,
    ) -> (SocketAddr, tokio::task::JoinHandle<Result<Link, LinkError>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            Link::accept(s, &key, 1, LIMITS).await
        });
        (addr, server)
    }

    async fn pair(
        server_key: ClusterKey,
        client_key: ClusterKey,
    ) -> (Result<Link, LinkError>, Result<Link, LinkError>) {
        let (addr, server) = accept_one(server_key).await;
        let client = Link::connect(addr, None, &client_key, 2, LIMITS).await;
        (server.await.unwrap(), client)
    }

    /// A connected (server, client) pair under one key.
    async fn linked() -> (Link, Link) {
        let k = ClusterKey::from_file_bytes(b"secret\n");
        let (s, c) = pair(k.clone(), k).await;
        (s.unwrap(), c.unwrap())
    }

    /// `server` rejects what `c` wrote as a bad frame, then stays closed: the valid frame
    /// that follows is refused too.
    async fn rejected_then_closed(server: &mut Link, c: &mut Link) {
        assert!(matches!(server.recv(2000).await, Err(LinkError::BadFrame)));
        c.send(b"valid after the bad one").await.unwrap();
        assert!(matches!(server.recv(2000).await, Err(LinkError::Closed)));
    }

    #[tokio::test]
    async fn frames_flow_both_ways_with_the_right_key() {
        let (mut s, mut c) = linked().await;
        assert_eq!((s.peer_id, c.peer_id), (2, 1));
        c.send(b"hello").await.unwrap();
        assert_eq!(&s.recv(1000).await.unwrap()[..], b"hello");
        let big: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        s.send(&big).await.unwrap();
        let got = c.recv(1000).await.unwrap();
        assert_eq!(&got[..], &big[..]);
        assert_eq!(
            got.as_ptr() as usize % 16,
            0,
            "payload 16-byte aligned for rkyv"
        );
        // Many frames, both ways, interleaved: the counters stay in step.
        for i in 0..50u32 {
            c.send(&i.to_le_bytes()).await.unwrap();
            s.send(&(i + 1000).to_le_bytes()).await.unwrap();
            assert_eq!(&s.recv(1000).await.unwrap()[..], &i.to_le_bytes());
            assert_eq!(&c.recv(1000).await.unwrap()[..], &(i + 1000).to_le_bytes());
        }
        c.send(b"").await.unwrap();
        assert!(s.recv(1000).await.unwrap().is_empty());
        assert!(
            matches!(
                c.send(&vec![0u8; (1 << 20) + 1]).await,
                Err(LinkError::TooLarge(_))
            ),
            "oversized frame"
        );
        // Nothing was written for the refused frame: the link still works.
        c.send(b"after").await.unwrap();
        assert_eq!(&s.recv(1000).await.unwrap()[..], b"after");
    }

    #[tokio::test]
    async fn an_oversized_length_is_refused_before_the_payload_is_read() {
        let (mut s, mut c) = linked().await;
        // Only the length goes out: a receiver that waited for the payload would time out.
        c.stream
            .write_all(&((1u32 << 20) + 1).to_le_bytes())
            .await
            .unwrap();
        assert!(matches!(s.recv(2000).await, Err(LinkError::TooLarge(_))));
        assert!(matches!(s.recv(2000).await, Err(LinkError::Closed)));
    }

    #[tokio::test]
    async fn a_link_never_reuses_a_nonce() {
        let (_s, mut c) = linked().await;
        // The last counter value would be the first repeat after a wrap: refused, and
        // the link with it.
        c.send.seq = u64::MAX;
        assert!(matches!(c.send(b"x").await, Err(LinkError::Exhausted)));
        assert!(matches!(c.send(b"x").await, Err(LinkError::Closed)));
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
    async fn a_flipped_ciphertext_byte_is_rejected() {
        let (mut s, mut c) = linked().await;
        let mut frame = c.send.seal(b"good payload").unwrap();
        frame[LEN_BYTES + 3] ^= 0x01;
        c.stream.write_all(&frame).await.unwrap();
        rejected_then_closed(&mut s, &mut c).await;
    }

    #[tokio::test]
    async fn a_flipped_tag_byte_is_rejected() {
        let (mut s, mut c) = linked().await;
        let mut frame = c.send.seal(b"good payload").unwrap();
        *frame.last_mut().unwrap() ^= 0x80;
        c.stream.write_all(&frame).await.unwrap();
        rejected_then_closed(&mut s, &mut c).await;
    }

    #[tokio::test]
    async fn a_changed_length_prefix_is_rejected() {
        let (mut s, mut c) = linked().await;
        // One byte shorter: the receiver takes the payload's last byte as the tag's first.
        let mut frame = c.send.seal(b"good payload").unwrap();
        frame[..LEN_BYTES].copy_from_slice(&11u32.to_le_bytes());
        c.stream.write_all(&frame).await.unwrap();
        rejected_then_closed(&mut s, &mut c).await;
        // One byte longer (the receiver gets a byte more): the length is authenticated
        // as associated data, not only the bytes it delimits.
        let (mut s, mut c) = linked().await;
        let mut frame = c.send.seal(b"good payload").unwrap();
        frame[..LEN_BYTES].copy_from_slice(&13u32.to_le_bytes());
        frame.push(0);
        c.stream.write_all(&frame).await.unwrap();
        rejected_then_closed(&mut s, &mut c).await;
    }

    #[tokio::test]
    async fn a_replayed_frame_is_rejected() {
        let (mut s, mut c) = linked().await;
        let frame = c.send.seal(b"pay me once").unwrap();
        c.stream.write_all(&frame).await.unwrap();
        assert_eq!(&s.recv(2000).await.unwrap()[..], b"pay me once");
        c.stream.write_all(&frame).await.unwrap();
        rejected_then_closed(&mut s, &mut c).await;
    }

    #[tokio::test]
    async fn a_reordered_or_dropped_frame_is_rejected() {
        let (mut s, mut c) = linked().await;
        let first = c.send.seal(b"first").unwrap();
        let second = c.send.seal(b"second").unwrap();
        c.stream.write_all(&second).await.unwrap();
        c.stream.write_all(&first).await.unwrap();
        rejected_then_closed(&mut s, &mut c).await;
    }

    #[tokio::test]
    async fn a_frame_from_another_connection_is_rejected() {
        // Same key, same node ids, same direction and counter: only the nonces differ.
        let (mut s1, mut c1) = linked().await;
        let (_s2, mut c2) = linked().await;
        let foreign = c2.send.seal(b"meant for link 2").unwrap();
        c1.stream.write_all(&foreign).await.unwrap();
        rejected_then_closed(&mut s1, &mut c1).await;
    }

    #[tokio::test]
    async fn a_frame_reflected_back_to_its_sender_is_rejected() {
        let (mut s, mut c) = linked().await;
        // The server's own first frame, sent back to it as the client's first frame.
        let frame = s.send.seal(b"echo").unwrap();
        c.stream.write_all(&frame).await.unwrap();
        rejected_then_closed(&mut s, &mut c).await;
    }

    #[tokio::test]
    async fn a_truncated_frame_fails_and_closes_the_link() {
        let (mut s, mut c) = linked().await;
        let frame = c.send.seal(b"cut short").unwrap();
        c.stream.write_all(&frame[..frame.len() - 1]).await.unwrap();
        drop(c);
        assert!(matches!(s.recv(2000).await, Err(LinkError::Io(_))));
        assert!(matches!(s.recv(2000).await, Err(LinkError::Closed)));
    }

    #[tokio::test]
    async fn an_unencrypted_v1_peer_is_refused_with_a_clear_error() {
        let k = ClusterKey::from_file_bytes(b"k");
        // A v1 client reaching this server.
        let (addr, server) = accept_one(k.clone()).await;
        let mut old = TcpStream::connect(addr).await.unwrap();
        let mut hello = b"SEGURO01".to_vec();
        hello.extend_from_slice(&2u64.to_le_bytes());
        hello.extend_from_slice(&[9u8; 32]);
        old.write_all(&hello).await.unwrap();
        let err = server.await.unwrap().err().expect("v1 client refused");
        assert!(matches!(err, LinkError::Version { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("SEGURO01") && msg.contains("same seguro-fs release"),
            "{msg}"
        );
        // This client reaching a v1 server, which closes on the unknown MAGIC.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let old_server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut hello = [0u8; 48];
            s.read_exact(&mut hello).await.unwrap();
            assert_eq!(&hello[..8], MAGIC);
        });
        let err = Link::connect(addr, None, &k, 2, LIMITS)
            .await
            .err()
            .unwrap();
        old_server.await.unwrap();
        assert!(matches!(err, LinkError::HandshakeClosed), "{err}");
        assert!(err.to_string().contains("SEGURO01"), "{err}");
    }

    /// A member of the previous release (protocol v2, ChaCha20-Poly1305) and this one
    /// link in v2 both ways: this server answers a v2 hello in v2, and this client offers
    /// v3, then v2 when the server closes on v3. Between two members of this release the
    /// link is v3 (AES-256-GCM).
    #[tokio::test]
    async fn members_of_the_previous_release_link_in_its_protocol() {
        let k = ClusterKey::from_file_bytes(b"k");
        let is_v2 = |l: &Link| matches!(l.send.aead, Aead::ChaCha(_));
        let flows = |mut a: Link, mut b: Link| async move {
            a.send(b"ping").await.unwrap();
            assert_eq!(&b.recv(1000).await.unwrap()[..], b"ping");
            b.send(b"pong").await.unwrap();
            assert_eq!(&a.recv(1000).await.unwrap()[..], b"pong");
        };
        let (s, c) = linked().await;
        assert!(!is_v2(&s) && !is_v2(&c), "this release links in v3");

        // A v2 client reaching this server.
        let (addr, server) = accept_one(k.clone()).await;
        let c = Link::connect_as(MAGIC_V2, addr, None, &k, 2, LIMITS)
            .await
            .unwrap();
        let s = server.await.unwrap().unwrap();
        assert!(is_v2(&s) && is_v2(&c));
        flows(c, s).await;

        // This client reaching a v2 server, which closes on the v3 hello it does not know.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let k2 = k.clone();
        let server = tokio::spawn(async move {
            let (mut first, _) = l.accept().await.unwrap();
            let mut hello = [0u8; 48];
            first.read_exact(&mut hello).await.unwrap();
            assert_eq!(&hello[..8], MAGIC);
            drop(first);
            let (second, _) = l.accept().await.unwrap();
            Link::accept(second, &k2, 1, LIMITS).await
        });
        let c = Link::connect(addr, None, &k, 2, LIMITS).await.unwrap();
        let s = server.await.unwrap().unwrap();
        assert!(is_v2(&s) && is_v2(&c), "the client fell back to v2");
        flows(c, s).await;
    }

    /// A v3 frame does not open as v2 (nor the other way): the version is part of the key.
    #[tokio::test]
    async fn the_two_versions_never_share_a_key() {
        let k = ClusterKey::from_file_bytes(b"k");
        let nonces = (&[1u8; 32], &[2u8; 32], &[3u8; 16][..]);
        let mut v3 = Direction::new(&k, MAGIC, b"c2s", nonces);
        let mut v2 = Direction::new(&k, MAGIC_V2, b"c2s", nonces);
        let frame = v3.seal(b"payload").unwrap();
        let head: [u8; LEN_BYTES] = frame[..LEN_BYTES].try_into().unwrap();
        let mut body = frame[LEN_BYTES..frame.len() - TAG_BYTES].to_vec();
        let tag: [u8; TAG_BYTES] = frame[frame.len() - TAG_BYTES..].try_into().unwrap();
        assert!(matches!(
            v2.open(&head, &mut body, &tag),
            Err(LinkError::BadFrame)
        ));
        let mut same = Direction::new(&k, MAGIC, b"c2s", nonces);
        same.open(&head, &mut body, &tag).unwrap();
        assert_eq!(&body[..], b"payload");
    }

    /// Forward one connection from a listener to `to`, recording every byte both ways.
    async fn tap(l: TcpListener, to: SocketAddr, seen: Arc<Mutex<Vec<u8>>>) {
        let (a, _) = l.accept().await.unwrap();
        let b = TcpStream::connect(to).await.unwrap();
        let (ar, aw) = a.into_split();
        let (br, bw) = b.into_split();
        async fn pump(
            mut r: tokio::net::tcp::OwnedReadHalf,
            mut w: tokio::net::tcp::OwnedWriteHalf,
            seen: Arc<Mutex<Vec<u8>>>,
        ) {
            let mut buf = vec![0u8; 64 << 10];
            // Ends at EOF or error; every read moves at least one byte.
            while let Ok(n @ 1..) = r.read(&mut buf).await {
                seen.lock().unwrap().extend_from_slice(&buf[..n]);
                if w.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = w.shutdown().await;
        }
        tokio::join!(pump(ar, bw, seen.clone()), pump(br, aw, seen));
    }

    #[tokio::test]
    async fn the_wire_carries_no_plaintext() {
        let k = ClusterKey::from_file_bytes(b"secret");
        let server_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server_addr = server_l.local_addr().unwrap();
        let tap_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tap_addr = tap_l.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let tapping = tokio::spawn(tap(tap_l, server_addr, seen.clone()));
        // 1 KiB that cannot be mistaken for noise.
        let pattern: Vec<u8> = b"SEGURO-PLAINTEXT-MARKER-"
            .iter()
            .copied()
            .cycle()
            .take(1024)
            .collect();
        let k2 = k.clone();
        let p2 = pattern.clone();
        let server = tokio::spawn(async move {
            let (s, _) = server_l.accept().await.unwrap();
            let mut link = Link::accept(s, &k2, 1, LIMITS).await.unwrap();
            assert_eq!(&link.recv(2000).await.unwrap()[..], &p2[..]);
            link.send(&p2).await.unwrap();
        });
        let mut c = Link::connect(tap_addr, None, &k, 2, LIMITS).await.unwrap();
        c.send(&pattern).await.unwrap();
        assert_eq!(&c.recv(2000).await.unwrap()[..], &pattern[..]);
        server.await.unwrap();
        drop(c);
        tapping.await.unwrap();
        let seen = seen.lock().unwrap();
        // Handshakes and both frames went through the tap.
        assert!(seen.len() >= 2 * (1024 + LEN_BYTES + TAG_BYTES) + 48 + 80 + 32);
        // Not the pattern, nor any 24-byte piece of it (one period of the marker).
        for piece in pattern.windows(24).take(24) {
            assert!(
                !seen.windows(piece.len()).any(|w| w == piece),
                "plaintext on the wire"
            );
        }
    }

    /// Round-trips 1 MiB frames through seal and open (no socket) and prints the rate;
    /// asserts only correctness, never time (docs/TUNING.md quotes a run).
    #[test]
    fn a_1_mib_frame_seals_and_opens() {
        let k = ClusterKey::from_file_bytes(b"bench");
        let (nc, ns, ids) = ([1u8; 32], [2u8; 32], [0u8; 16]);
        for magic in [MAGIC, MAGIC_V2] {
            let mut tx = Direction::new(&k, magic, b"c2s", (&nc, &ns, &ids));
            let mut rx = Direction::new(&k, magic, b"c2s", (&nc, &ns, &ids));
            let payload: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7) as u8).collect();
            let rounds = 32;
            let start = std::time::Instant::now();
            for _ in 0..rounds {
                let mut frame = tx.seal(&payload).unwrap();
                assert_ne!(&frame[LEN_BYTES..LEN_BYTES + 64], &payload[..64]);
                let head: [u8; LEN_BYTES] = frame[..LEN_BYTES].try_into().unwrap();
                let (body, tag) = frame[LEN_BYTES..].split_at_mut(payload.len());
                let tag: [u8; TAG_BYTES] = (&*tag).try_into().unwrap();
                rx.open(&head, body, &tag).unwrap();
                assert!(body == &payload[..]);
            }
            let secs = start.elapsed().as_secs_f64();
            eprintln!(
                "{}: seal+open of {rounds} x 1 MiB frames: {:.0} MiB/s",
                String::from_utf8_lossy(magic),
                rounds as f64 / secs
            );
        }
    }
}
