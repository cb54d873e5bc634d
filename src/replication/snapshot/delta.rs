//! Incremental snapshots: what a member that is behind the purged log but still holds an
//! older tree receives instead of the whole tree image.
//!
//! The receiver describes what it holds in a **manifest**: per regular file its path,
//! size and the blake3 of every fixed `CHUNK_BYTES` chunk. Hashes are cached per file in
//! `DATA_DIR/snapshots/manifest.cache`, reused while the file's (inode, size, mtime,
//! ctime) are unchanged — every apply that touches a file moves its ctime — so a manifest
//! is not a rehash of the tree each time it is asked for.
//!
//! The leader translates the tree image it built (`snapshot.rs`) into a **delta**: the
//! same image bytes, except that each chunk of file content whose hash the manifest holds
//! (anywhere: a renamed epoch directory costs nothing) becomes a reference to the
//! receiver's own copy:
//!
//! ```text
//! "SEGDELT1"
//! op*  tag 1 literal: len u32 (<= LITERAL_BYTES_MAX), then len image bytes
//!      tag 2 copy:    path (as in the image), chunk index u64, len u32, blake3 [32]
//! tag 0  the image's digest [32] (the image's own last 32 bytes, repeated)
//! ```
//!
//! The receiver rebuilds the image stream from the delta and its current tree, checking
//! every copied chunk against its hash, and unpacks that stream with the ordinary image
//! unpacker into `tree.new/`: the image's digest is recomputed over the rebuilt bytes, so
//! the new tree is exactly the leader's image or the install fails. The old tree is only
//! read. `tree.new.ready` then records which image `tree.new/` holds, and the usual
//! crash-safe swap (`install.pending`) puts it in place. A chunk that no longer matches
//! (the tree moved since the manifest) fails with an error that says so; the manifest
//! cache is dropped and the leader retries with a fresh manifest.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::AsyncRead;

use super::{read_str, read_u32, read_u64, walk, BUF_BYTES, MAGIC, PATH_BYTES_MAX};
use crate::sync::{fsync_dir, write_file_durably};

/// Manifest chunk size: fixed, so that a manifest and a delta always agree on it.
pub const CHUNK_BYTES: u64 = 1 << 20;
pub const DELTA_MAGIC: &[u8; 8] = b"SEGDELT1";

/// Whether a snapshot chunk at `offset` holding `data` is the first of a delta.
pub fn opens_delta(offset: u64, data: &[u8]) -> bool {
    offset == 0 && data.starts_with(DELTA_MAGIC)
}
const MANIFEST_MAGIC: &[u8; 8] = b"SEGMANI1";
const CACHE_MAGIC: &[u8; 8] = b"SEGMCAC1";
/// Longest literal op: the receiver streams literals, this only bounds the sender's buffer.
const LITERAL_BYTES_MAX: usize = 1 << 20;

fn bad(why: impl Into<String>) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("incremental snapshot: {}", why.into()),
    )
}

fn put_str(w: &mut Vec<u8>, s: &[u8]) {
    w.extend_from_slice(&(s.len() as u32).to_le_bytes());
    w.extend_from_slice(s);
}

pub fn cache_path(data_dir: &Path) -> PathBuf {
    data_dir.join("snapshots/manifest.cache")
}

pub fn ready_path(data_dir: &Path) -> PathBuf {
    data_dir.join("tree.new.ready")
}

// ---------------------------------------------------------------- manifest (receiver)

/// What identifies a file's content without reading it: a write or truncate moves the
/// ctime (and the mtime and size), a replaced file has another inode.
type StatKey = (u64, u64, i64, i64);

fn stat_key(m: &fs::Metadata) -> StatKey {
    (
        m.ino(),
        m.len(),
        m.mtime() * 1_000_000_000 + m.mtime_nsec(),
        m.ctime() * 1_000_000_000 + m.ctime_nsec(),
    )
}

fn chunks_of(size: u64) -> u64 {
    size.div_ceil(CHUNK_BYTES)
}

fn load_cache(p: &Path, bytes_max: usize) -> HashMap<String, (StatKey, Vec<[u8; 32]>)> {
    let mut out = HashMap::new();
    let Ok(bytes) = fs::read(p) else {
        return out;
    };
    // A cache from a crash mid-write, or grown past what a manifest may hold, is ignored.
    if bytes.len() < 8 + 32 || bytes.len() > bytes_max * 2 || &bytes[..8] != CACHE_MAGIC {
        return out;
    }
    let (body, sum) = bytes.split_at(bytes.len() - 32);
    if blake3::hash(body).as_bytes() != sum {
        return out;
    }
    let mut r = &body[8..];
    let entry = |r: &mut &[u8]| -> io::Result<(String, StatKey, Vec<[u8; 32]>)> {
        let path = read_str(r)?;
        let key = (
            read_u64(r)?,
            read_u64(r)?,
            read_u64(r)? as i64,
            read_u64(r)? as i64,
        );
        let n = chunks_of(key.1);
        if n * 32 > r.len() as u64 {
            return Err(bad("short cache"));
        }
        let mut hashes = vec![[0u8; 32]; n as usize];
        for h in &mut hashes {
            r.read_exact(h)?;
        }
        Ok((path, key, hashes))
    };
    while !r.is_empty() {
        match entry(&mut r) {
            Ok((path, key, hashes)) => {
                out.insert(path, (key, hashes));
            }
            Err(_) => return HashMap::new(),
        }
    }
    out
}

fn hash_file(p: &Path, size: u64, buf: &mut [u8]) -> io::Result<Vec<[u8; 32]>> {
    let f = File::open(p)?;
    let mut hashes = Vec::with_capacity(chunks_of(size) as usize);
    for i in 0..chunks_of(size) {
        let n = (size - i * CHUNK_BYTES).min(CHUNK_BYTES) as usize;
        f.read_exact_at(&mut buf[..n], i * CHUNK_BYTES)?;
        hashes.push(*blake3::hash(&buf[..n]).as_bytes());
    }
    Ok(hashes)
}

/// The manifest of `tree` (at most `bytes_max` bytes: files past that are left out and
/// arrive whole), using and refreshing the hash cache at `cache`.
pub fn build_manifest(tree: &Path, cache: &Path, bytes_max: usize) -> io::Result<Vec<u8>> {
    let old = load_cache(cache, bytes_max);
    let mut manifest = Vec::from(&MANIFEST_MAGIC[..]);
    manifest.extend_from_slice(&(CHUNK_BYTES as u32).to_le_bytes());
    let mut new_cache = Vec::from(&CACHE_MAGIC[..]);
    let mut buf = vec![0u8; CHUNK_BYTES as usize];
    walk(tree, |rel, m| {
        if !m.is_file() {
            return Ok(());
        }
        let entry_bytes = 4 + rel.len() + 8 + 32 * chunks_of(m.len()) as usize;
        if manifest.len() + entry_bytes > bytes_max {
            return Ok(());
        }
        let key = stat_key(m);
        let hashes = match old.get(rel) {
            Some((k, h)) if *k == key => h.clone(),
            _ => {
                let h = hash_file(&tree.join(rel), m.len(), &mut buf)?;
                // Changed while it was read (a follower applying): not worth caching.
                if stat_key(&fs::symlink_metadata(tree.join(rel))?) != key {
                    return Ok(());
                }
                h
            }
        };
        put_str(&mut manifest, rel.as_bytes());
        manifest.extend_from_slice(&m.len().to_le_bytes());
        put_str(&mut new_cache, rel.as_bytes());
        for v in [key.0, key.1, key.2 as u64, key.3 as u64] {
            new_cache.extend_from_slice(&v.to_le_bytes());
        }
        for h in &hashes {
            manifest.extend_from_slice(h);
            new_cache.extend_from_slice(h);
        }
        Ok(())
    })?;
    let sum = *blake3::hash(&new_cache).as_bytes();
    new_cache.extend_from_slice(&sum);
    // A cache only: written whole then renamed (its checksum catches a torn one), not synced.
    let tmp = cache.with_extension("tmp");
    fs::write(&tmp, &new_cache)?;
    fs::rename(&tmp, cache)?;
    Ok(manifest)
}

/// A receiver's manifest as the leader uses it: where each chunk hash can be found.
pub struct Manifest {
    paths: Vec<String>,
    by_hash: HashMap<[u8; 32], (u32, u64)>,
}

impl Manifest {
    pub fn parse(bytes: &[u8]) -> io::Result<Manifest> {
        let mut r = bytes;
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic)?;
        if &magic != MANIFEST_MAGIC {
            return Err(bad("bad manifest magic"));
        }
        if read_u32(&mut r)? as u64 != CHUNK_BYTES {
            return Err(bad("manifest of another chunk size"));
        }
        let mut m = Manifest {
            paths: vec![],
            by_hash: HashMap::new(),
        };
        while !r.is_empty() {
            let path = read_str(&mut r)?;
            let n = chunks_of(read_u64(&mut r)?);
            if n.saturating_mul(32) > r.len() as u64 {
                return Err(bad("short manifest"));
            }
            let id = m.paths.len() as u32;
            for i in 0..n {
                let mut h = [0u8; 32];
                r.read_exact(&mut h)?;
                m.by_hash.entry(h).or_insert((id, i));
            }
            m.paths.push(path);
        }
        Ok(m)
    }

    /// True when the receiver holds no file: it gets the whole image.
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    fn find(&self, h: &[u8; 32]) -> Option<(&str, u64)> {
        self.by_hash
            .get(h)
            .map(|&(p, i)| (self.paths[p as usize].as_str(), i))
    }
}

// ---------------------------------------------------------------- encoder (leader)

/// Where the encoder's output goes: cut into `chunk_bytes` pieces for the snapshot RPCs.
pub enum Piece {
    Chunk(Vec<u8>),
    /// The delta's last piece (possibly empty).
    Last(Vec<u8>),
    Failed(String),
}

/// Bytes of the delta and how much of the image they carried as copies.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EncodeStats {
    pub image_bytes: u64,
    pub delta_bytes: u64,
    pub copied_bytes: u64,
}

struct Encoder<'a, R> {
    r: tokio::io::BufReader<R>,
    manifest: &'a Manifest,
    lit: Vec<u8>,
    cur: Vec<u8>,
    chunk_bytes: usize,
    tx: tokio::sync::mpsc::Sender<Piece>,
    stats: EncodeStats,
    /// Image bytes read so far, for progress reports while the delta travels.
    read: Arc<AtomicU64>,
}

impl<R: AsyncRead + Unpin> Encoder<'_, R> {
    async fn put(&mut self, mut b: &[u8]) -> io::Result<()> {
        self.stats.delta_bytes += b.len() as u64;
        while !b.is_empty() {
            let n = (self.chunk_bytes - self.cur.len()).min(b.len());
            self.cur.extend_from_slice(&b[..n]);
            b = &b[n..];
            if self.cur.len() == self.chunk_bytes {
                let full = std::mem::replace(&mut self.cur, Vec::with_capacity(self.chunk_bytes));
                self.tx
                    .send(Piece::Chunk(full))
                    .await
                    .map_err(|_| io::Error::other("the snapshot sender went away"))?;
            }
        }
        Ok(())
    }

    async fn flush_lit(&mut self) -> io::Result<()> {
        let lit = std::mem::take(&mut self.lit);
        for piece in lit.chunks(LITERAL_BYTES_MAX) {
            self.put(&[1]).await?;
            self.put(&(piece.len() as u32).to_le_bytes()).await?;
            self.put(piece).await?;
        }
        self.lit = lit;
        self.lit.clear();
        Ok(())
    }

    /// `n` image bytes taken as they are.
    async fn take(&mut self, n: usize) -> io::Result<&[u8]> {
        // Headers alone (a tree of many small or empty files) must not grow it unbounded.
        if self.lit.len() >= LITERAL_BYTES_MAX {
            self.flush_lit().await?;
        }
        let at = self.lit.len();
        self.lit.resize(at + n, 0);
        tokio::io::AsyncReadExt::read_exact(&mut self.r, &mut self.lit[at..]).await?;
        self.stats.image_bytes += n as u64;
        self.read.store(self.stats.image_bytes, Ordering::Relaxed);
        Ok(&self.lit[at..])
    }

    async fn take_u32(&mut self) -> io::Result<u32> {
        let b = self.take(4).await?;
        Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }

    async fn take_str(&mut self) -> io::Result<()> {
        let n = self.take_u32().await?;
        if n > PATH_BYTES_MAX {
            return Err(bad("image path too long"));
        }
        self.take(n as usize).await.map(|_| ())
    }

    async fn content(&mut self, size: u64, buf: &mut [u8]) -> io::Result<()> {
        for i in 0..chunks_of(size) {
            let n = (size - i * CHUNK_BYTES).min(CHUNK_BYTES) as usize;
            tokio::io::AsyncReadExt::read_exact(&mut self.r, &mut buf[..n]).await?;
            self.stats.image_bytes += n as u64;
            self.read.store(self.stats.image_bytes, Ordering::Relaxed);
            let h = *blake3::hash(&buf[..n]).as_bytes();
            match self.manifest.find(&h) {
                Some((path, index)) => {
                    self.flush_lit().await?;
                    let mut op = vec![2];
                    put_str(&mut op, path.as_bytes());
                    op.extend_from_slice(&index.to_le_bytes());
                    op.extend_from_slice(&(n as u32).to_le_bytes());
                    op.extend_from_slice(&h);
                    self.put(&op).await?;
                    self.stats.copied_bytes += n as u64;
                }
                None => {
                    self.lit.extend_from_slice(&buf[..n]);
                    if self.lit.len() >= LITERAL_BYTES_MAX {
                        self.flush_lit().await?;
                    }
                }
            }
        }
        Ok(())
    }

    async fn run(&mut self) -> io::Result<()> {
        self.put(DELTA_MAGIC).await?;
        if self.take(8).await? != MAGIC {
            return Err(bad("the image is not a SEGSNAP2 image"));
        }
        self.take(12).await?; // root mode and owner
        let mut buf = vec![0u8; CHUNK_BYTES as usize];
        loop {
            let tag = self.take(1).await?[0];
            match tag {
                0 => break,
                1 => {
                    self.take_str().await?;
                    self.take(4 + 8 + 12).await?;
                }
                2 => {
                    self.take_str().await?;
                    self.take(4 + 8 + 12).await?;
                    let b = self.take(8).await?;
                    let size = u64::from_le_bytes(b.try_into().expect("8 bytes"));
                    self.content(size, &mut buf).await?;
                }
                3 => {
                    self.take_str().await?;
                    self.take_str().await?;
                    self.take(8).await?;
                }
                4 => {
                    self.take_str().await?;
                    self.take(4 + 8 + 8 + 12).await?;
                }
                t => return Err(bad(format!("unknown image record tag {t}"))),
            }
        }
        let digest: [u8; 32] = self.take(32).await?.try_into().expect("32 bytes");
        self.flush_lit().await?;
        self.put(&[0]).await?;
        self.put(&digest).await?;
        let last = std::mem::take(&mut self.cur);
        self.tx
            .send(Piece::Last(last))
            .await
            .map_err(|_| io::Error::other("the snapshot sender went away"))
    }
}

/// Translate the image read from `image` into a delta against `manifest`, sent as pieces of
/// `chunk_bytes` through `tx` (a failure is sent as `Piece::Failed`); `read` follows the
/// image bytes read. Memory: one chunk of content, one literal and one piece, whatever
/// the image's size.
pub async fn encode<R: AsyncRead + Unpin>(
    image: R,
    manifest: &Manifest,
    chunk_bytes: usize,
    tx: tokio::sync::mpsc::Sender<Piece>,
    read: Arc<AtomicU64>,
) -> EncodeStats {
    let mut e = Encoder {
        r: tokio::io::BufReader::with_capacity(BUF_BYTES, image),
        manifest,
        lit: Vec::new(),
        cur: Vec::with_capacity(chunk_bytes),
        chunk_bytes,
        tx: tx.clone(),
        stats: EncodeStats::default(),
        read,
    };
    if let Err(err) = e.run().await {
        let _ = tx.send(Piece::Failed(err.to_string())).await;
    }
    e.stats
}

// ---------------------------------------------------------------- decoder (receiver)

/// Open the regular file `rel` under `root` without following a symlink anywhere on the
/// way: a copy op names a path, and nothing may be read from outside the tree.
fn open_beneath(root: &Path, rel: &str) -> io::Result<File> {
    let mut p = root.to_path_buf();
    let parts: Vec<&str> = rel.split('/').collect();
    for (i, c) in parts.iter().enumerate() {
        p.push(c);
        let m = fs::symlink_metadata(&p)?;
        let last = i + 1 == parts.len();
        if (last && !m.is_file()) || (!last && !m.is_dir()) {
            return Err(bad(format!("{rel} is not a regular file in this tree")));
        }
    }
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&p)
}

enum Segment {
    Literal(u64),
    Copy(Vec<u8>, usize),
    End([u8; 32]),
}

/// The image a delta describes, rebuilt as a byte stream from the delta and `tree`.
pub struct DeltaReader {
    delta: BufReader<File>,
    tree: PathBuf,
    seg: Segment,
    source: Option<(String, File)>,
}

impl DeltaReader {
    pub fn open(delta: &Path, tree: &Path) -> io::Result<DeltaReader> {
        let mut r = BufReader::with_capacity(BUF_BYTES, File::open(delta)?);
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic)?;
        if &magic != DELTA_MAGIC {
            return Err(bad("not a delta"));
        }
        Ok(DeltaReader {
            delta: r,
            tree: tree.to_path_buf(),
            seg: Segment::Literal(0),
            source: None,
        })
    }

    fn next_op(&mut self) -> io::Result<()> {
        let mut tag = [0u8; 1];
        self.delta.read_exact(&mut tag)?;
        self.seg = match tag[0] {
            0 => {
                let mut d = [0u8; 32];
                self.delta.read_exact(&mut d)?;
                Segment::End(d)
            }
            1 => Segment::Literal(read_u32(&mut self.delta)? as u64),
            2 => {
                let path = read_str(&mut self.delta)?;
                let index = read_u64(&mut self.delta)?;
                let len = read_u32(&mut self.delta)? as u64;
                let mut want = [0u8; 32];
                self.delta.read_exact(&mut want)?;
                if len == 0 || len > CHUNK_BYTES {
                    return Err(bad(format!("copy of {len} bytes")));
                }
                if self.source.as_ref().map(|(p, _)| p) != Some(&path) {
                    let f = open_beneath(&self.tree, &path).map_err(|e| {
                        bad(format!(
                            "{path}, named by the leader, is gone from this member's tree \
                             ({e}); it changed since its manifest, the leader will retry"
                        ))
                    })?;
                    self.source = Some((path.clone(), f));
                }
                let (_, f) = self.source.as_ref().expect("just opened");
                let mut buf = vec![0u8; len as usize];
                let read = index
                    .checked_mul(CHUNK_BYTES)
                    .ok_or_else(|| bad("chunk index out of range"))
                    .and_then(|at| f.read_exact_at(&mut buf, at));
                if read.is_err() || blake3::hash(&buf).as_bytes() != &want {
                    return Err(bad(format!(
                        "chunk {index} of {path} no longer matches this member's manifest \
                         (its tree changed since); the leader will retry"
                    )));
                }
                Segment::Copy(buf, 0)
            }
            t => return Err(bad(format!("unknown op {t}"))),
        };
        Ok(())
    }

    /// After the image was read whole: the delta must end here; its closing digest.
    pub fn finish(mut self) -> io::Result<[u8; 32]> {
        loop {
            match &self.seg {
                Segment::Literal(0) => self.next_op()?,
                Segment::Copy(b, at) if *at == b.len() => self.next_op()?,
                Segment::End(d) => return Ok(*d),
                _ => return Err(bad("the delta goes on past its image's end")),
            }
        }
    }
}

impl Read for DeltaReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            match &mut self.seg {
                Segment::Literal(left) if *left > 0 => {
                    let n = (*left).min(out.len() as u64) as usize;
                    let got = self.delta.read(&mut out[..n])?;
                    if got == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    *left -= got as u64;
                    return Ok(got);
                }
                Segment::Copy(b, at) if *at < b.len() => {
                    let n = (b.len() - *at).min(out.len());
                    out[..n].copy_from_slice(&b[*at..*at + n]);
                    *at += n;
                    return Ok(n);
                }
                Segment::End(_) => return Ok(0),
                _ => self.next_op()?,
            }
        }
    }
}

/// Is the received snapshot file a delta (else an image)?
pub fn is_delta(p: &Path) -> io::Result<bool> {
    let mut magic = [0u8; 8];
    match File::open(p)?.read_exact(&mut magic) {
        Ok(()) => Ok(&magic == DELTA_MAGIC),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// The image digest a delta closes with, read without rebuilding anything.
pub fn closing_digest(delta: &Path) -> io::Result<[u8; 32]> {
    let mut r = BufReader::with_capacity(BUF_BYTES, File::open(delta)?);
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)?;
    if &magic != DELTA_MAGIC {
        return Err(bad("not a delta"));
    }
    loop {
        let mut tag = [0u8; 1];
        r.read_exact(&mut tag)?;
        match tag[0] {
            0 => {
                let mut d = [0u8; 32];
                r.read_exact(&mut d)?;
                return Ok(d);
            }
            1 => {
                let n = read_u32(&mut r)?;
                r.seek_relative(n as i64)?;
            }
            2 => {
                read_str(&mut r)?;
                r.seek_relative(8 + 4 + 32)?;
            }
            t => return Err(bad(format!("unknown op {t}"))),
        }
    }
}

/// Does `tree.new/` hold, complete and synced, the image with this digest?
pub fn prepared(data_dir: &Path, digest: &[u8; 32]) -> bool {
    data_dir.join("tree.new").is_dir() && fs::read(ready_path(data_dir)).is_ok_and(|d| d == digest)
}

/// Unpack the image that `delta` describes against `old` into the empty directory `new`,
/// synced, verified against the image's digest (returned). `old` is only read.
pub fn rebuild(delta: &Path, old: &Path, new: &Path) -> io::Result<[u8; 32]> {
    let mut r = DeltaReader::open(delta, old)?;
    let digest = super::unpack_from(&mut r, new)?;
    if r.finish()? != digest {
        return Err(bad("the delta's closing digest is not its image's"));
    }
    Ok(digest)
}

/// Drop the record of what `tree.new/` holds, durably, before anything changes it.
pub fn forget_prepared(data_dir: &Path) -> io::Result<()> {
    match fs::remove_file(ready_path(data_dir)) {
        Ok(()) => fsync_dir(data_dir),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Rebuild `tree.new/` from the delta at `delta` and the current `tree/`, verified against
/// the leader's image digest and synced, and record it in `tree.new.ready`. `tree/` is
/// only read. On failure nothing but `tree.new` is left, and the manifest cache is dropped
/// (it may be what no longer matches).
pub fn prepare(data_dir: &Path, delta: &Path) -> io::Result<[u8; 32]> {
    let new = data_dir.join("tree.new");
    let result = (|| {
        forget_prepared(data_dir)?;
        let _ = fs::remove_dir_all(&new);
        fs::create_dir(&new)?;
        let digest = rebuild(delta, &data_dir.join("tree"), &new)?;
        write_file_durably(&ready_path(data_dir), &digest)?;
        Ok(digest)
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&new);
        let _ = fs::remove_file(cache_path(data_dir));
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::tests::TempDir;

    fn tree_with(root: &Path, files: &[(&str, Vec<u8>)]) {
        for (p, b) in files {
            let p = root.join(p);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, b).unwrap();
        }
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[1] ^ seed)
            .collect()
    }

    /// Encode the image of `src` against `dst`'s manifest; the delta file and its stats.
    fn delta_of(t: &Path, src: &Path, data_dir: &Path, chunk: usize) -> (PathBuf, EncodeStats) {
        let img = t.join("img");
        fs::create_dir_all(data_dir.join("snapshots")).unwrap();
        super::super::write_image(src, File::create(&img).unwrap(), &|| true).unwrap();
        let man = build_manifest(&data_dir.join("tree"), &cache_path(data_dir), 1 << 24).unwrap();
        let manifest = Manifest::parse(&man).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let delta = t.join("delta");
        let stats = rt.block_on(async {
            let (tx, mut rx) = tokio::sync::mpsc::channel(2);
            let f = tokio::fs::File::from_std(File::open(&img).unwrap());
            let read = Arc::new(AtomicU64::new(0));
            let enc = encode(f, &manifest, chunk, tx, read.clone());
            let mut out = Vec::new();
            let collect = async {
                loop {
                    match rx.recv().await.unwrap() {
                        Piece::Chunk(c) => {
                            assert_eq!(c.len(), chunk, "every piece but the last is whole");
                            out.extend(c)
                        }
                        Piece::Last(c) => {
                            out.extend(c);
                            break;
                        }
                        Piece::Failed(e) => panic!("{e}"),
                    }
                }
            };
            let (stats, ()) = tokio::join!(enc, collect);
            assert_eq!(read.load(Ordering::Relaxed), stats.image_bytes);
            fs::write(&delta, &out).unwrap();
            stats
        });
        (delta, stats)
    }

    #[test]
    fn delta_rebuilds_the_image_sending_only_what_changed() {
        let t = TempDir::new("delta");
        let src = t.path().join("src");
        let dd = t.path().join("dd");
        let big = pattern(5 * CHUNK_BYTES as usize + 777, 1);
        // The receiver's tree: an older state, epoch dir under another name.
        tree_with(
            &dd.join("tree"),
            &[
                ("0i5/image.bin", big.clone()),
                ("0i2/data.mdb", pattern(2 * CHUNK_BYTES as usize, 2)),
                ("gone.txt", b"old".to_vec()),
            ],
        );
        let mut changed = big.clone();
        changed[3 * CHUNK_BYTES as usize + 10] ^= 0xff;
        changed.truncate(4 * CHUNK_BYTES as usize + 5);
        tree_with(
            &src,
            &[
                ("0i9/image.bin", changed),
                ("0i9/new.bin", pattern(3000, 3)),
                ("epoc.txt", b"9".to_vec()),
            ],
        );
        std::os::unix::fs::symlink("0i9", src.join("cur")).unwrap();
        let (delta, stats) = delta_of(t.path(), &src, &dd, 64 << 10);
        assert_eq!(
            stats.copied_bytes,
            3 * CHUNK_BYTES,
            "chunks 0-2 are the receiver's"
        );
        assert!(
            stats.delta_bytes < 2 * CHUNK_BYTES + 10_000,
            "sent {} bytes",
            stats.delta_bytes
        );
        let d = prepare(&dd, &delta).unwrap();
        assert_eq!(closing_digest(&delta).unwrap(), d);
        assert!(prepared(&dd, &d));
        assert_eq!(
            super::super::tree_digest(&dd.join("tree.new")).unwrap(),
            super::super::tree_digest(&src).unwrap()
        );

        // A second manifest reuses the cache; after a write, that file is hashed again.
        let cached = build_manifest(&dd.join("tree"), &cache_path(&dd), 1 << 24).unwrap();
        let f = OpenOptions::new()
            .write(true)
            .open(dd.join("tree/0i5/image.bin"))
            .unwrap();
        f.write_all_at(b"X", 0).unwrap();
        let rehashed = build_manifest(&dd.join("tree"), &cache_path(&dd), 1 << 24).unwrap();
        assert_ne!(
            cached, rehashed,
            "a write invalidates the file's cached hashes"
        );
        let mut fresh = dd.join("tree");
        fresh.set_file_name("fresh.cache");
        assert_eq!(
            build_manifest(&dd.join("tree"), &fresh, 1 << 24).unwrap(),
            rehashed
        );

        // That write moved the tree under the delta: refused, tree.new discarded, the
        // cache dropped, the old tree untouched.
        let err = prepare(&dd, &delta).unwrap_err();
        assert!(err.to_string().contains("no longer matches"), "{err}");
        assert!(!dd.join("tree.new").exists());
        assert!(!cache_path(&dd).exists());
        assert!(!prepared(&dd, &d));
        assert_eq!(&fs::read(dd.join("tree/0i5/image.bin")).unwrap()[..1], b"X");
    }

    #[test]
    fn a_corrupt_or_escaping_delta_is_refused() {
        let t = TempDir::new("delta-bad");
        let dd = t.path().join("dd");
        let body = pattern(2 * CHUNK_BYTES as usize, 5);
        tree_with(&dd.join("tree"), &[("a/f", body.clone())]);
        fs::write(t.path().join("secret"), &body).unwrap();
        std::os::unix::fs::symlink(t.path(), dd.join("tree/out")).unwrap();
        let src = t.path().join("src");
        tree_with(&src, &[("b/f", body.clone())]);
        let (delta, stats) = delta_of(t.path(), &src, &dd, 1 << 20);
        assert_eq!(stats.copied_bytes, 2 * CHUNK_BYTES);
        let good = fs::read(&delta).unwrap();
        prepare(&dd, &delta).unwrap();

        // A flipped bit in a literal: the image digest fails.
        let mut b = good.clone();
        b[20] ^= 1;
        fs::write(&delta, &b).unwrap();
        assert!(prepare(&dd, &delta).is_err());
        assert!(!dd.join("tree.new").exists());

        // A copy op's hash altered: the copied chunk is refused.
        let at = good.windows(3).position(|w| w == b"a/f").unwrap();
        let mut b = good.clone();
        b[at + 3 + 8 + 4] ^= 1;
        fs::write(&delta, &b).unwrap();
        let e = prepare(&dd, &delta).unwrap_err();
        assert!(e.to_string().contains("no longer matches"), "{e}");

        // A copy through a symlink or up and out of the tree: refused.
        for evil in ["out/secret", "../secret"] {
            let mut b = good[..at - 4].to_vec();
            b.extend_from_slice(&(evil.len() as u32).to_le_bytes());
            b.extend_from_slice(evil.as_bytes());
            b.extend_from_slice(&good[at + 3..]);
            fs::write(&delta, &b).unwrap();
            assert!(prepare(&dd, &delta).is_err(), "{evil} accepted");
        }
        // A truncated delta.
        fs::write(&delta, &good[..good.len() - 10]).unwrap();
        assert!(prepare(&dd, &delta).is_err());
        assert!(dd.join("tree/a/f").exists());
    }
}
