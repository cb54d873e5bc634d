//! Test support that reproduces vere's event-log IO on `.urb/log` with real LMDB (heed).
//!
//! Owns: the deterministic event and image content, pier/epoch creation, batch commits,
//! rolls, `chop`, a scripted workload with its verifier, and the crash-test recording writer
//! with its verifier. No vere binary can be installed on the test machines, so this module is
//! the stand-in; see `/work/shared/vere-io.md` (and vere's `pkg/vere/disk.c`) for the pattern
//! being copied. Only std, heed and libc are used so every test binary can include it.
//!
//! heed keeps a process-global registry of open environments keyed by canonical path and
//! refuses a second open of the same path (`Error::EnvAlreadyOpened`). An [`Epoch`] is the
//! only owner of its `Env` (no clones are handed out), so dropping it closes the environment
//! synchronously (`mdb_env_close` runs in heed's `Drop`); [`Epoch::close`] additionally waits
//! on heed's closing event, bounded. Every function here opens at most one epoch at a time
//! and closes it before opening the next or reopening the same one, which is also what vere
//! does on a roll (close the old env, open the new one).
#![allow(dead_code)]

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use heed::byteorder::LittleEndian;
use heed::types::{Bytes, Str, U64};
use heed::{Database, Env, EnvOpenOptions, IntegerComparator, PutFlags};

/// LMDB map size: 1 TiB, vere's default (`--lmdb-map-size`). Only address space; the file
/// grows as pages are written.
pub const MAP_SIZE: usize = 1 << 40;

/// Value of the META `version` key, stored as a u64 little-endian.
pub const META_VERSION: u64 = 3;
/// Contents of every `epoc.txt` (epoch format 2, vere 4.x).
pub const EPOC_TXT: &str = "2";
/// Contents of every `vere.txt`.
pub const VERE_TXT: &str = "4.5-test";
/// vere copies `image.bin` in 16 KiB pages.
pub const IMAGE_PAGE: usize = 16 * 1024;
/// Image size the recording writer uses for its rolls ("a few hundred KiB").
pub const WRITER_IMAGE_BYTES: u64 = 384 * 1024;
/// Safety net for [`run_recording_writer`]: the parent normally SIGKILLs it after about a
/// second, but a forgotten child must not run forever.
pub const WRITER_MAX_RUNTIME: Duration = Duration::from_secs(600);
/// Upper bound on directory entries read by one listing, so a broken readdir (a FUSE bug
/// that repeats offsets) fails the test instead of looping.
const MAX_DIR_ENTRIES: usize = 1_000_000;

/// The EVENTS database: u64 LE keys with `MDB_INTEGERKEY` (heed sets the flag when the key
/// comparator is `IntegerComparator`), raw byte values.
type EventsDb = Database<U64<LittleEndian>, Bytes, IntegerComparator>;
/// The META database: string keys, raw byte values.
type MetaDb = Database<Str, Bytes>;

// INTEGERKEY compares keys as native integers; vere stores them little-endian, which is only
// the same thing on little-endian hosts (all of ours).
const _: () = assert!(cfg!(target_endian = "little"));

// ---------------------------------------------------------------------------------------------
// Deterministic content
// ---------------------------------------------------------------------------------------------

/// splitmix64's output function: a stateless 64-bit mixer, so any word of any event or image
/// can be computed independently (random access for verification).
pub fn mix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Tiny splitmix64 PRNG for seeded choices (batch sizes); no `rand` dependency.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        let out = mix64(self.0);
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        out
    }

    /// Uniform-ish in `lo..=hi` (modulo bias is irrelevant for tests).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}

const MUG_SALT: u64 = 0x6d75_6700_0000_0001;
const SIZE_SALT: u64 = 0x7369_7a65_0000_0002;
const BODY_SALT: u64 = 0x626f_6479_0000_0003;
const IMAGE_SALT: u64 = 0x696d_6167_0000_0004;

/// Payload length of event `n` (without the 4-byte mug): mostly 100..=2000 bytes, about 1 in
/// 50 events 64..=256 KiB, about 1 in 400 events 1.1..=1.5 MiB (code updates in real piers;
/// values this large go to LMDB overflow pages).
pub fn event_payload_len(n: u64) -> usize {
    let r = mix64(n ^ SIZE_SALT);
    let pick = r >> 24;
    if r % 400 == 0 {
        let lo = 1_153_434; // 1.1 MiB, rounded up
        let hi = 1_572_864; // 1.5 MiB
        lo + (pick % (hi - lo + 1) as u64) as usize
    } else if (r >> 32) % 50 == 0 {
        let lo = 64 * 1024;
        let hi = 256 * 1024;
        lo + (pick % (hi - lo + 1) as u64) as usize
    } else {
        100 + (pick % 1901) as usize
    }
}

/// Fill `out` with the keyed byte stream `key`, starting at byte `offset` of the stream.
/// Word `i` of the stream is `mix64(key + i)` little-endian.
fn fill_stream(key: u64, offset: u64, out: &mut [u8]) {
    let mut pos = offset;
    let mut i = 0;
    while i < out.len() {
        let word = mix64(key.wrapping_add(pos / 8)).to_le_bytes();
        let skip = (pos % 8) as usize;
        let take = (8 - skip).min(out.len() - i);
        out[i..i + take].copy_from_slice(&word[skip..skip + take]);
        i += take;
        pos += take as u64;
    }
}

/// Deterministic event value for event number `n`: 4-byte little-endian mug followed by a
/// payload derived from `n` (see [`event_payload_len`]), like vere's `u3_disk_etch` layout.
pub fn event_value(n: u64) -> Vec<u8> {
    let len = event_payload_len(n);
    let mut v = vec![0u8; 4 + len];
    v[..4].copy_from_slice(&(mix64(n ^ MUG_SALT) as u32).to_le_bytes());
    fill_stream(mix64(n ^ BODY_SALT), 0, &mut v[4..]);
    v
}

/// Deterministic image bytes for the roll into epoch `epoch`, at byte `offset`. The content
/// depends on the epoch so a mixed-up image.bin between epochs is detected.
pub fn image_bytes_at(epoch: u64, offset: u64, out: &mut [u8]) {
    fill_stream(mix64(epoch ^ IMAGE_SALT), offset, out);
}

/// Write the deterministic image for `epoch` (`len` bytes) to `path` and fdatasync it; this
/// plays the role of `.urb/chk/image.bin` before a roll.
pub fn write_image_source(path: &Path, epoch: u64, len: u64) -> io::Result<()> {
    let mut f = File::create(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < len {
        let n = ((len - off) as usize).min(buf.len());
        image_bytes_at(epoch, off, &mut buf[..n]);
        f.write_all(&buf[..n])?;
        off += n as u64;
    }
    fdatasync(&f)
}

/// Compare `path` against the deterministic image for `epoch` of `len` bytes.
pub fn check_image(path: &Path, epoch: u64, len: u64) -> Result<(), String> {
    let mut f = File::open(path).map_err(|e| format!("{}: open: {e}", path.display()))?;
    let size = f
        .metadata()
        .map_err(|e| format!("{}: stat: {e}", path.display()))?
        .len();
    if size != len {
        return Err(format!("{}: size {size}, expected {len}", path.display()));
    }
    let mut got = vec![0u8; 1 << 20];
    let mut want = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < len {
        let n = ((len - off) as usize).min(got.len());
        f.read_exact(&mut got[..n])
            .map_err(|e| format!("{}: read at {off}: {e}", path.display()))?;
        image_bytes_at(epoch, off, &mut want[..n]);
        if got[..n] != want[..n] {
            let i = (0..n).find(|&i| got[i] != want[i]).unwrap_or(0);
            return Err(format!(
                "{}: byte {} differs from the image of epoch {epoch}",
                path.display(),
                off + i as u64
            ));
        }
        off += n as u64;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Syscall helpers
// ---------------------------------------------------------------------------------------------

/// fdatasync(2) on an open file; over FUSE this arrives as FSYNC(datasync) (FSYNCDIR for a
/// directory), which is exactly what the daemon must honour.
pub fn fdatasync(f: &File) -> io::Result<()> {
    // SAFETY: the fd is valid for the lifetime of `f`.
    if unsafe { libc::fdatasync(f.as_raw_fd()) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Open a directory read-only (for fdatasync on it, as vere does around epoch creation).
fn open_dir(dir: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(dir)
}

/// fdatasync a directory by path.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    fdatasync(&open_dir(dir)?)
}

/// mkdir with mode 0700, tolerating EEXIST like vere's `c3_mkdir` callers do.
fn mkdir_0700(dir: &Path) -> io::Result<()> {
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        r => r,
    }
}

/// Write `name` in `dir` crash-safely: `name.tmp`, write, fdatasync, rename.
fn write_txt(dir: &Path, name: &str, content: &str) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = File::create(&tmp)?;
    f.write_all(content.as_bytes())?;
    fdatasync(&f)?;
    drop(f);
    fs::rename(&tmp, dir.join(name))
}

/// Copy `src` to `dst` the way vere copies `image.bin` into a new epoch: open O_RDWR|O_CREAT,
/// ftruncate to the source length first (so the FUSE side sees a SETATTR size before any
/// data), then pread/pwrite in 16 KiB pages, then fdatasync.
pub fn copy_image_like_vere(src: &Path, dst: &Path) -> io::Result<()> {
    let s = File::open(src)?;
    let len = s.metadata()?.len();
    let d = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(dst)?;
    d.set_len(len)?;
    let mut page = vec![0u8; IMAGE_PAGE];
    let mut off = 0u64;
    while off < len {
        let n = ((len - off) as usize).min(IMAGE_PAGE);
        s.read_exact_at(&mut page[..n], off)?;
        d.write_all_at(&page[..n], off)?;
        off += n as u64;
    }
    fdatasync(&d)
}

/// Directory entries of `dir` with their raw `d_type`, read with libc readdir. std's
/// `DirEntry::file_type` silently falls back to lstat when d_type is `DT_UNKNOWN`; vere does
/// not (it drops such entries), so the raw value is what the FUSE fs must get right.
pub fn read_dir_types(dir: &Path) -> io::Result<Vec<(String, u8)>> {
    let c = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
    // SAFETY: valid C string; the DIR* is closed below on every path.
    let d = unsafe { libc::opendir(c.as_ptr()) };
    if d.is_null() {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let result = loop {
        if out.len() > MAX_DIR_ENTRIES {
            break Err(io::Error::other(format!(
                "{}: more than {MAX_DIR_ENTRIES} entries, readdir is looping?",
                dir.display()
            )));
        }
        // readdir signals errors only through errno, so clear it first.
        // SAFETY: errno is thread-local; `d` is a live DIR*.
        unsafe { *libc::__errno_location() = 0 };
        let ent = unsafe { libc::readdir(d) };
        if ent.is_null() {
            let err = io::Error::last_os_error();
            break if err.raw_os_error() == Some(0) {
                Ok(())
            } else {
                Err(err)
            };
        }
        // SAFETY: `ent` points to a valid dirent until the next readdir on `d`.
        let (name, ty) = unsafe {
            let e = &*ent;
            let name = std::ffi::CStr::from_ptr(e.d_name.as_ptr());
            (name.to_string_lossy().into_owned(), e.d_type)
        };
        if name != "." && name != ".." {
            out.push((name, ty));
        }
    };
    // SAFETY: `d` came from opendir and is closed exactly once.
    unsafe { libc::closedir(d) };
    result.map(|()| out)
}

/// Parse an epoch directory name `0i<decimal>` strictly.
pub fn parse_epoch_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("0i")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// Environments
// ---------------------------------------------------------------------------------------------

/// Open an LMDB env the way vere does: flags 0 (no NOSYNC/WRITEMAP/NOMETASYNC/NOLOCK),
/// `maxdbs` 2, map size 1 TiB. (heed creates files with mode 0600 where vere passes 0664;
/// not adjustable through heed and irrelevant to the IO pattern.)
pub fn open_env(dir: &Path) -> heed::Result<Env> {
    // SAFETY: these envs are only touched through heed by this module, one Env per path per
    // process (see the module docs), and never with NO_LOCK.
    unsafe {
        EnvOpenOptions::new()
            .map_size(MAP_SIZE)
            .max_dbs(2)
            .open(dir)
    }
}

/// Close an env and wait (bounded) until LMDB really closed it, so the same path can be
/// reopened in this process.
pub fn close_env(env: Env) -> io::Result<()> {
    let closing = env.prepare_for_closing();
    if closing.wait_timeout(Duration::from_secs(30)) {
        Ok(())
    } else {
        Err(io::Error::other(
            "LMDB env still referenced 30 s after close",
        ))
    }
}

fn heed_io(e: heed::Error) -> io::Error {
    match e {
        heed::Error::Io(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

/// Open META (creating it if missing) in `env`.
fn meta_db(env: &Env) -> heed::Result<MetaDb> {
    let rtxn = env.read_txn()?;
    let found = env
        .database_options()
        .types::<Str, Bytes>()
        .name("META")
        .open(&rtxn)?;
    // Committing the read txn publishes the dbi handle to the env (heed's advice).
    rtxn.commit()?;
    if let Some(db) = found {
        return Ok(db);
    }
    let mut wtxn = env.write_txn()?;
    let db = env
        .database_options()
        .types::<Str, Bytes>()
        .name("META")
        .create(&mut wtxn)?;
    wtxn.commit()?;
    Ok(db)
}

/// The fixed identity stored in META `who` (16 bytes, like a ship's @p as two u64 chubs).
pub const WHO: [u8; 16] = *b"~sampel-palnet\0\0";

/// Write vere's META keys, each in its own write transaction (as `u3_disk_save_meta` does).
fn write_meta(env: &Env, db: MetaDb) -> heed::Result<()> {
    let entries: [(&str, &[u8]); 4] = [
        ("version", &META_VERSION.to_le_bytes()),
        ("who", &WHO),
        // vere stores loobeans: c3n (no, not a fake ship) is 1.
        ("fake", &[1u8]),
        ("life", &1u32.to_le_bytes()),
    ];
    for (k, v) in entries {
        let mut wtxn = env.write_txn()?;
        db.put(&mut wtxn, k, v)?;
        wtxn.commit()?;
    }
    Ok(())
}

/// Read META `version` from an env.
fn read_meta_version(env: &Env, db: MetaDb) -> Result<Option<u64>, String> {
    let rtxn = env.read_txn().map_err(|e| e.to_string())?;
    match db.get(&rtxn, "version").map_err(|e| e.to_string())? {
        None => Ok(None),
        Some(v) if v.len() == 8 => Ok(Some(u64::from_le_bytes(v.try_into().unwrap()))),
        Some(v) => Err(format!("META version has {} bytes, expected 8", v.len())),
    }
}

/// META `version` of the top-level env at `log` (opened and closed here).
pub fn top_meta_version(log: &Path) -> Result<Option<u64>, String> {
    let env = open_env(log).map_err(|e| format!("{}: open top-level env: {e}", log.display()))?;
    let r = meta_db(&env)
        .map_err(|e| e.to_string())
        .and_then(|db| read_meta_version(&env, db));
    close_env(env).map_err(|e| e.to_string())?;
    r
}

/// Create a pier log: `mkdir -p log` (0700), top-level env with META only, then epoch `0i0`.
pub fn create_pier(log: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(log)?;
    {
        let env = open_env(log).map_err(heed_io)?;
        let db = meta_db(&env).map_err(heed_io)?;
        write_meta(&env, db).map_err(heed_io)?;
        close_env(env)?;
    }
    create_epoch(log, 0, None)?;
    Ok(())
}

/// Create (or complete) epoch directory `0i{n}` following vere's `_disk_epoc_roll` order:
/// mkdir 0700; copy the image if any (so a crash mid-copy leaves an epoch without
/// `epoc.txt`, which vere deletes at boot); fdatasync the epoch dir; write `epoc.txt` and
/// `vere.txt` via `*.tmp` + fdatasync + rename; fdatasync the dir again; open the env, create
/// EVENTS and META and write META (each key its own txn); fdatasync the dir a last time.
pub fn create_epoch(log: &Path, n: u64, image: Option<&Path>) -> io::Result<PathBuf> {
    let dir = log.join(format!("0i{n}"));
    mkdir_0700(&dir)?;
    if let Some(src) = image {
        copy_image_like_vere(src, &dir.join("image.bin"))?;
    }
    let dfd = open_dir(&dir)?;
    fdatasync(&dfd)?;
    write_txt(&dir, "epoc.txt", EPOC_TXT)?;
    write_txt(&dir, "vere.txt", VERE_TXT)?;
    fdatasync(&dfd)?;
    let epoch = Epoch::open(&dir).map_err(heed_io)?;
    epoch.write_meta().map_err(heed_io)?;
    epoch.close()?;
    fdatasync(&dfd)?;
    Ok(dir)
}

/// One open epoch env. The sole owner of its heed `Env` (see the module docs).
pub struct Epoch {
    env: Env,
    events: EventsDb,
    meta: MetaDb,
    dir: PathBuf,
}

impl Epoch {
    /// Open the env in `dir` (which must exist) and its EVENTS and META databases. The dbs are
    /// looked up in a read txn first and only created (one write txn) when missing, so opening
    /// an existing epoch for verification writes nothing.
    pub fn open(dir: &Path) -> heed::Result<Epoch> {
        let env = open_env(dir)?;
        let rtxn = env.read_txn()?;
        let events = env
            .database_options()
            .types::<U64<LittleEndian>, Bytes>()
            .key_comparator::<IntegerComparator>()
            .name("EVENTS")
            .open(&rtxn)?;
        rtxn.commit()?;
        let events = match events {
            Some(db) => db,
            None => {
                let mut wtxn = env.write_txn()?;
                let db = env
                    .database_options()
                    .types::<U64<LittleEndian>, Bytes>()
                    .key_comparator::<IntegerComparator>()
                    .name("EVENTS")
                    .create(&mut wtxn)?;
                wtxn.commit()?;
                db
            }
        };
        let meta = meta_db(&env)?;
        Ok(Epoch {
            env,
            events,
            meta,
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Close the env and wait (bounded) for LMDB to release it.
    pub fn close(self) -> io::Result<()> {
        close_env(self.env)
    }

    /// Write META (version, who, fake, life), each key in its own transaction.
    pub fn write_meta(&self) -> heed::Result<()> {
        write_meta(&self.env, self.meta)
    }

    /// META `version`, if present.
    pub fn meta_version(&self) -> Result<Option<u64>, String> {
        read_meta_version(&self.env, self.meta)
    }

    /// One write transaction committing events `first..first + count` with NO_OVERWRITE,
    /// like vere's batch commit (`u3_lmdb_save`). A key that already exists fails the whole
    /// transaction with `MdbError::KeyExist`.
    pub fn commit(&self, first: u64, count: u64) -> heed::Result<()> {
        let mut wtxn = self.env.write_txn()?;
        for n in first..first + count {
            self.events
                .put_with_flags(&mut wtxn, PutFlags::NO_OVERWRITE, &n, &event_value(n))?;
        }
        wtxn.commit()
    }

    /// (first, last) event numbers present, `None` if EVENTS is empty.
    pub fn range(&self) -> heed::Result<Option<(u64, u64)>> {
        let rtxn = self.env.read_txn()?;
        let first = self.events.first(&rtxn)?.map(|(k, _)| k);
        let last = self.events.last(&rtxn)?.map(|(k, _)| k);
        Ok(first.zip(last))
    }

    /// Number of events stored.
    pub fn len(&self) -> heed::Result<u64> {
        let rtxn = self.env.read_txn()?;
        self.events.len(&rtxn)
    }

    /// Check every event in `first..=last` is present and equals `event_value(n)`; describes
    /// the first missing or differing event. (Keys are integers, so nothing else can sit in
    /// between; keys outside the range are the caller's business, see [`Epoch::range`].)
    pub fn verify(&self, first: u64, last: u64) -> Result<(), String> {
        let where_ = self.dir.display();
        if first > last.saturating_add(1) {
            return Err(format!("{where_}: bad range {first}..={last}"));
        }
        let rtxn = self
            .env
            .read_txn()
            .map_err(|e| format!("{where_}: read txn: {e}"))?;
        for n in first..=last {
            let got = self
                .events
                .get(&rtxn, &n)
                .map_err(|e| format!("{where_}: event {n}: get: {e}"))?
                .ok_or_else(|| format!("{where_}: event {n} missing"))?;
            let want = event_value(n);
            if got != want.as_slice() {
                let at = got
                    .iter()
                    .zip(&want)
                    .position(|(a, b)| a != b)
                    .unwrap_or(got.len().min(want.len()));
                return Err(format!(
                    "{where_}: event {n} differs: {} bytes, expected {}, first difference at \
                     byte {at}",
                    got.len(),
                    want.len()
                ));
            }
        }
        Ok(())
    }

    /// Overwrite (or insert) event `n` with arbitrary bytes; for corruption tests only.
    pub fn put_raw(&self, n: u64, value: &[u8]) -> heed::Result<()> {
        let mut wtxn = self.env.write_txn()?;
        self.events.put(&mut wtxn, &n, value)?;
        wtxn.commit()
    }

    /// Delete event `n`; for corruption tests only.
    pub fn delete_raw(&self, n: u64) -> heed::Result<bool> {
        let mut wtxn = self.env.write_txn()?;
        let found = self.events.delete(&mut wtxn, &n)?;
        wtxn.commit()?;
        Ok(found)
    }
}

// ---------------------------------------------------------------------------------------------
// Epoch directories
// ---------------------------------------------------------------------------------------------

/// Epoch directories (`0i<decimal>`) in `log`, sorted by number. Uses the raw readdir
/// `d_type` and ignores any entry whose type is not `DT_DIR` (including `DT_UNKNOWN`), as
/// vere's listing does — a FUSE fs that reports wrong types makes epochs vanish here.
pub fn epochs(log: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out: Vec<(u64, PathBuf)> = read_dir_types(log)?
        .into_iter()
        .filter(|(_, ty)| *ty == libc::DT_DIR)
        .filter_map(|(name, _)| parse_epoch_name(&name).map(|n| (n, log.join(name))))
        .collect();
    out.sort_by_key(|(n, _)| *n);
    Ok(out)
}

/// Delete one epoch directory like vere's `_disk_epoc_kill`: unlink every regular file
/// (data.mdb, lock.mdb, image.bin, the txt files), then rmdir. Any other entry type is left
/// and makes the rmdir fail, which the caller sees.
pub fn kill_epoch(dir: &Path) -> io::Result<()> {
    for (name, ty) in read_dir_types(dir)? {
        if ty == libc::DT_REG {
            fs::remove_file(dir.join(&name))?;
        }
    }
    fs::remove_dir(dir)
}

/// vere's chop: keep the two newest epochs, delete every older one. The caller must have
/// closed the envs of the epochs being deleted.
pub fn chop(log: &Path) -> io::Result<()> {
    let all = epochs(log)?;
    let keep_from = all.len().saturating_sub(2);
    for (_, dir) in &all[..keep_from] {
        kill_epoch(dir)?;
    }
    Ok(())
}

fn read_trimmed(path: &Path) -> Result<String, String> {
    fs::read_to_string(path)
        .map(|s| s.trim_end().to_string())
        .map_err(|e| format!("{}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// Scripted workload
// ---------------------------------------------------------------------------------------------

/// What [`run_workload`] left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub last_event: u64,
    /// Surviving epochs after the chop: (epoch n, first event, last event), sorted.
    pub epochs: Vec<(u64, u64, u64)>,
}

/// Scripted vere-like run, deterministic from `seed`: create the pier; commit batches of
/// 1..=100 events (the first two batches are exactly 1 and 100, the rest seeded) in epoch
/// 0i0; at event `events_total / 2` roll (write `image_src` with `image_bytes` bytes, create
/// the next epoch from it); at `3 * events_total / 4` roll again and chop, which deletes 0i0;
/// continue to `events_total`. Batches are clipped at those milestones so every epoch gets
/// events. Requires `events_total >= 4`.
pub fn run_workload(
    log: &Path,
    seed: u64,
    events_total: u64,
    image_src: &Path,
    image_bytes: u64,
) -> io::Result<Summary> {
    if events_total < 4 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "run_workload needs at least 4 events (three epochs)",
        ));
    }
    create_pier(log)?;
    let roll_at = [events_total / 2, 3 * events_total / 4];
    let mut rng = SplitMix64::new(seed);
    let mut epoch = Epoch::open(&log.join("0i0")).map_err(heed_io)?;
    let mut epoch_n = 0u64;
    let mut ranges: Vec<(u64, u64, u64)> = Vec::new();
    let mut last = 0u64;
    let mut batch_no = 0u64;
    // Bounded: each iteration commits at least one event.
    while last < events_total {
        let want = match batch_no {
            0 => 1,
            1 => 100,
            _ => rng.range(1, 100),
        };
        batch_no += 1;
        let next_stop = roll_at
            .iter()
            .copied()
            .find(|&m| m > last)
            .unwrap_or(events_total);
        let count = want.min(next_stop - last);
        epoch.commit(last + 1, count).map_err(heed_io)?;
        last += count;

        if roll_at.contains(&last) {
            ranges.push((epoch_n, epoch_n + 1, last));
            // vere closes the old env before opening the new epoch's.
            epoch.close()?;
            write_image_source(image_src, last, image_bytes)?;
            let dir = create_epoch(log, last, Some(image_src))?;
            epoch_n = last;
            epoch = Epoch::open(&dir).map_err(heed_io)?;
            if last == roll_at[1] {
                chop(log)?;
                ranges.remove(0);
            }
        }
    }
    ranges.push((epoch_n, epoch_n + 1, last));
    epoch.close()?;
    Ok(Summary {
        last_event: last,
        epochs: ranges,
    })
}

/// Check one epoch directory's text files.
fn check_epoch_txt(dir: &Path) -> Result<(), String> {
    let epoc = read_trimmed(&dir.join("epoc.txt"))?;
    if epoc != EPOC_TXT {
        return Err(format!("{}: epoc.txt is {epoc:?}", dir.display()));
    }
    let vere = read_trimmed(&dir.join("vere.txt"))?;
    if vere != VERE_TXT {
        return Err(format!("{}: vere.txt is {vere:?}", dir.display()));
    }
    Ok(())
}

/// Open an epoch, run `f`, close it; errors become strings naming the directory.
fn with_epoch<T>(dir: &Path, f: impl FnOnce(&Epoch) -> Result<T, String>) -> Result<T, String> {
    let epoch = Epoch::open(dir).map_err(|e| format!("{}: open env: {e}", dir.display()))?;
    let r = f(&epoch);
    epoch
        .close()
        .map_err(|e| format!("{}: close: {e}", dir.display()))?;
    r
}

/// Verify a finished [`run_workload`]: top-level META version 3; exactly the summary's
/// epochs exist; each opens cleanly, has `epoc.txt` == "2", META version 3, exactly the
/// summary's event range with every value correct, and (if rolled, n > 0) an `image.bin`
/// equal to the deterministic image; ranges are contiguous, each epoch starts right after
/// its number, and the last one ends at `summary.last_event`.
pub fn verify_workload(log: &Path, summary: &Summary, image_bytes: u64) -> Result<(), String> {
    match top_meta_version(log)? {
        Some(META_VERSION) => {}
        other => return Err(format!("top-level META version is {other:?}")),
    }
    let found = epochs(log).map_err(|e| format!("{}: list epochs: {e}", log.display()))?;
    let found_n: Vec<u64> = found.iter().map(|(n, _)| *n).collect();
    let want_n: Vec<u64> = summary.epochs.iter().map(|(n, _, _)| *n).collect();
    if found_n != want_n {
        return Err(format!("epochs on disk {found_n:?}, expected {want_n:?}"));
    }
    let mut prev_last: Option<u64> = None;
    for ((_, dir), &(n, first, last)) in found.iter().zip(&summary.epochs) {
        if first != n + 1 {
            return Err(format!("epoch {n} starts at {first}, expected {}", n + 1));
        }
        if let Some(p) = prev_last {
            if first != p + 1 {
                return Err(format!(
                    "gap/overlap: previous epoch ends at {p}, 0i{n} starts at {first}"
                ));
            }
        }
        prev_last = Some(last);
        check_epoch_txt(dir)?;
        with_epoch(dir, |e| {
            match e.meta_version()? {
                Some(META_VERSION) => {}
                other => return Err(format!("{}: META version {other:?}", dir.display())),
            }
            let range = e
                .range()
                .map_err(|err| format!("{}: range: {err}", dir.display()))?;
            if range != Some((first, last)) {
                return Err(format!(
                    "{}: events {range:?}, expected {:?}",
                    dir.display(),
                    (first, last)
                ));
            }
            e.verify(first, last)
        })?;
        if n > 0 {
            check_image(&dir.join("image.bin"), n, image_bytes)?;
        }
    }
    if prev_last != Some(summary.last_event) {
        return Err(format!(
            "log ends at {prev_last:?}, expected {}",
            summary.last_event
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Crash testing
// ---------------------------------------------------------------------------------------------

/// Find where to continue after a (possibly crashed) previous writer, the way vere boots:
/// the newest epoch wins, but one without `epoc.txt`, or empty and without META, is an
/// interrupted roll — delete it and fall back to the previous epoch (at most once per
/// interrupted epoch; bounded by the number of epochs). Returns (epoch n, dir, last event).
fn resume_point(log: &Path) -> io::Result<(u64, PathBuf, u64)> {
    let mut all = epochs(log)?;
    while let Some((n, dir)) = all.pop() {
        let complete = dir.join("epoc.txt").exists() && {
            let e = Epoch::open(&dir).map_err(heed_io)?;
            let r = (|| -> io::Result<bool> {
                let range = e.range().map_err(heed_io)?;
                let meta = e.meta_version().map_err(io::Error::other)?;
                Ok(range.is_some() || meta == Some(META_VERSION))
            })();
            e.close()?;
            r?
        };
        if !complete && n != 0 {
            kill_epoch(&dir)?;
            continue;
        }
        if !complete {
            // Epoch 0 interrupted during pier creation: finish creating it.
            create_epoch(log, 0, None)?;
        }
        let e = Epoch::open(&dir).map_err(heed_io)?;
        let last = e.range().map_err(heed_io)?.map_or(n, |(_, l)| l);
        e.close()?;
        return Ok((n, dir, last));
    }
    Err(io::Error::other("no usable epoch in the log"))
}

/// Crash-test writer (meant for a child process that gets SIGKILLed): create the pier if it
/// is absent or was interrupted, otherwise resume after the last event present; then commit
/// seeded batches of 1..=100 events in the newest epoch, and after EACH commit returns append
/// the last event number as a decimal line to `record` (outside the log) and fdatasync it — so
/// every recorded number was acknowledged by LMDB. Rolls to a new epoch (with a
/// [`WRITER_IMAGE_BYTES`] image written next to `record`) once the current epoch holds
/// `roll_every` events. Never chops, so events 1.. stay verifiable (see
/// [`run_recording_writer_with`] for a writer that does). Returns Err on the first
/// LMDB error (vere exits on a failed commit); returns Ok only after
/// [`WRITER_MAX_RUNTIME`] as a safety net.
pub fn run_recording_writer(
    log: &Path,
    record: &Path,
    seed: u64,
    roll_every: u64,
) -> io::Result<()> {
    let opts = WriterOptions {
        roll_every,
        ..WriterOptions::default()
    };
    run_recording_writer_with(log, record, seed, &opts)
}

/// How [`run_recording_writer_with`] paces and shapes its run.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// Roll to a new epoch once the current one holds this many events.
    pub roll_every: u64,
    /// Events per commit are drawn from 1..=batch_events_max.
    pub batch_events_max: u64,
    /// Pause after each recorded commit (a ship between events).
    pub commit_gap: Duration,
    /// Chop (keep the two newest epochs) after each roll, as vere does, so a long run's
    /// log stays small; check such a log with [`verify_surviving`].
    pub chop: bool,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            roll_every: 500,
            batch_events_max: 100,
            commit_gap: Duration::ZERO,
            chop: false,
        }
    }
}

/// [`run_recording_writer`] with the pacing, batch sizes and chopping of `opts`.
pub fn run_recording_writer_with(
    log: &Path,
    record: &Path,
    seed: u64,
    opts: &WriterOptions,
) -> io::Result<()> {
    let roll_every = opts.roll_every.max(1);
    // Absent or interrupted during creation → (re)create; an env that fails to open is a
    // real error and must not be papered over by recreating the pier.
    let pier_ok = log.join("data.mdb").exists()
        && top_meta_version(log).map_err(io::Error::other)? == Some(META_VERSION)
        && !epochs(log)?.is_empty();
    if !pier_ok {
        create_pier(log)?;
    }
    let (mut epoch_n, dir, mut last) = resume_point(log)?;
    let mut epoch = Epoch::open(&dir).map_err(heed_io)?;
    let mut rec = OpenOptions::new().create(true).append(true).open(record)?;
    let image_src = {
        let mut s = record.as_os_str().to_owned();
        s.push(".image-src");
        PathBuf::from(s)
    };
    // Different batch sizes after each restart, still reproducible from (seed, last).
    let mut rng = SplitMix64::new(seed ^ mix64(last));
    let started = Instant::now();
    while started.elapsed() < WRITER_MAX_RUNTIME {
        let count = rng.range(1, opts.batch_events_max.max(1));
        epoch.commit(last + 1, count).map_err(|e| {
            io::Error::other(format!("commit {}..={}: {e}", last + 1, last + count))
        })?;
        last += count;
        rec.write_all(format!("{last}\n").as_bytes())?;
        fdatasync(&rec)?;
        if last - epoch_n >= roll_every {
            epoch.close()?;
            write_image_source(&image_src, last, WRITER_IMAGE_BYTES)?;
            let dir = create_epoch(log, last, Some(&image_src))?;
            epoch_n = last;
            epoch = Epoch::open(&dir).map_err(heed_io)?;
            if opts.chop {
                chop(log)?;
            }
        }
        if !opts.commit_gap.is_zero() {
            std::thread::sleep(opts.commit_gap);
        }
    }
    epoch.close()
}

/// The highest event number in `record` whose line is complete (newline-terminated); a torn
/// last line is ignored. `None` if the file is missing or has no complete line. A complete
/// line that is not a decimal number is an error (the record itself got corrupted).
pub fn last_recorded(record: &Path) -> io::Result<Option<u64>> {
    let data = match fs::read(record) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let complete = match data.iter().rposition(|&b| b == b'\n') {
        Some(i) => &data[..i],
        None => return Ok(None),
    };
    let mut best: Option<u64> = None;
    for line in complete.split(|&b| b == b'\n') {
        let n = std::str::from_utf8(line)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{}: bad record line {:?}",
                        record.display(),
                        String::from_utf8_lossy(line)
                    ),
                )
            })?;
        best = Some(best.map_or(n, |b| b.max(n)));
    }
    Ok(best)
}

/// Verify after a crash: every event `1..=n` is present in some epoch and equals
/// `event_value`; every epoch env opens cleanly and holds a contiguous range starting right
/// after its number (events past `n` — committed but not yet recorded — are checked too).
/// The newest epoch may be an interrupted roll: until its `data.mdb` exists (create_epoch
/// writes the image and txt files first) it cannot hold events, so only its name is checked
/// and it is not opened (opening would create data.mdb); vere would delete it at boot.
pub fn verify_through(log: &Path, n: u64) -> Result<(), String> {
    verify_log(log, n, false)
}

/// [`verify_through`] for a log a chopping writer made: the checks start at the oldest
/// surviving epoch instead of 0i0 (the events below it were deleted by the writer itself,
/// and an acknowledged event `<= n` that should still be there must be); a partly
/// deleted oldest epoch (a chop cut short by kill -9) is skipped when two newer ones exist.
pub fn verify_surviving(log: &Path, n: u64) -> Result<(), String> {
    verify_log(log, n, true)
}

/// Whether an epoch dir still has everything a chop deletes.
fn epoch_files_complete(dir: &Path) -> bool {
    ["epoc.txt", "vere.txt", "data.mdb"]
        .iter()
        .all(|f| dir.join(f).exists())
}

fn verify_log(log: &Path, n: u64, chopped: bool) -> Result<(), String> {
    if n == 0 && !log.join("data.mdb").exists() {
        // Killed before the pier existed and before anything was recorded.
        return Ok(());
    }
    match top_meta_version(log)? {
        Some(META_VERSION) => {}
        // Killed during pier creation before anything was recorded: nothing to check.
        _ if n == 0 => return Ok(()),
        other => return Err(format!("top-level META version is {other:?}")),
    }
    let mut all = epochs(log).map_err(|e| format!("{}: list epochs: {e}", log.display()))?;
    if chopped {
        // A chop deletes the epochs below the two newest, oldest first, file by file: one
        // cut short leaves the oldest epoch partly deleted. Only an epoch with two newer
        // ones can be such a leftover (never opened: that would create data.mdb again).
        while all.len() > 2 && !epoch_files_complete(&all[0].1) {
            all.remove(0);
        }
    }
    let mut next = match all.first() {
        Some((first, _)) if chopped => first + 1,
        _ => 1,
    };
    for (i, (epoch_n, dir)) in all.iter().enumerate() {
        if *epoch_n + 1 != next {
            return Err(format!(
                "epoch 0i{epoch_n} follows events through {}, expected 0i{}",
                next - 1,
                next - 1
            ));
        }
        let newest = i + 1 == all.len();
        if newest && !dir.join("data.mdb").exists() {
            continue;
        }
        check_epoch_txt(dir).map_err(|e| {
            let names: Vec<String> = all.iter().map(|(n, _)| format!("0i{n}")).collect();
            format!("{e} (epochs: {})", names.join(" "))
        })?;
        let range = with_epoch(dir, |e| {
            let range = e
                .range()
                .map_err(|err| format!("{}: range: {err}", dir.display()))?;
            if let Some((f, l)) = range {
                e.verify(f, l)?;
            }
            Ok(range)
        })?;
        if let Some((f, l)) = range {
            if f != next {
                return Err(format!(
                    "{}: starts at event {f}, expected {next}",
                    dir.display()
                ));
            }
            next = l + 1;
        }
    }
    if next <= n {
        return Err(format!(
            "events {next}..={n} were acknowledged (recorded) but are not in the log"
        ));
    }
    Ok(())
}
