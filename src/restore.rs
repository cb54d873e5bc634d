//! `seguro-fs restore`: copy the committed tree of a running member into a new directory.
//!
//! The member builds a tree image of its applied state (the same image a lagging member
//! receives as a Raft snapshot) and this client reads it in bounded chunks over an
//! authenticated peer link, into a file beside the destination. Unpacking checks the
//! image's blake3 digest (a truncated or altered transfer is refused), and the restored
//! directory's tree digest is printed so it can be compared with `seguro-fs verify`.
//! The result is a plain directory: a usable `.urb/log` for a pier rebuilt on a new host.
//! With `--update`, a destination that holds an older copy sends the member its manifest
//! and receives only what it lacks (an incremental snapshot, `snapshot/delta.rs`).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::config::Limits;
use crate::replication::control_client::Session;
use crate::replication::net_config::NetConfig;
use crate::replication::snapshot::{self, delta, hex};
use crate::replication::transport::LinkLimits;
use crate::replication::wire::{ControlRequest, ControlResponse};
use crate::sync::{fdatasync, fsync_dir};

/// The node id a tool presents on a peer link (members have ids from 1).
const TOOL_NODE_ID: u64 = 0;
/// Progress lines when stderr is not a terminal: one per this share of the image.
const PROGRESS_LINES: u64 = 10;

fn image_path(dest: &Path) -> PathBuf {
    beside(dest, "img")
}

/// Whether `dest` holds anything (after making it if it does not exist); with `update`
/// unset, a non-empty `dest` is refused.
fn prepare(dest: &Path, update: bool) -> Result<bool, String> {
    match std::fs::read_dir(dest) {
        Ok(mut entries) => {
            let full = entries.next().is_some();
            if full && !update {
                return Err(format!(
                    "{} is not empty; restore into a new or empty directory, or pass \
                     --update to bring an older copy of the tree up to date",
                    dest.display()
                ));
            }
            Ok(full)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir_all(dest)
            .map(|()| false)
            .map_err(|e| format!("creating {}: {e}", dest.display())),
        Err(e) => Err(format!("{}: {e}", dest.display())),
    }
}

/// Beside `dest`, hidden: `.NAME.seguro-restore.SUFFIX`.
fn beside(dest: &Path, suffix: &str) -> PathBuf {
    let name = dest
        .file_name()
        .map_or("restore".into(), |n| n.to_string_lossy());
    dest.with_file_name(format!(".{name}.seguro-restore.{suffix}"))
}

/// Restore from the member at `from` into `dest`; the summary line. With `update`, a
/// `dest` that holds an older copy of the tree is brought up to date: only the chunks it
/// lacks travel (an incremental snapshot, `snapshot/delta.rs`), the new tree is built
/// beside it and then renamed over it.
pub fn run(from: &str, key_file: &Path, dest: &Path, update: bool) -> Result<String, String> {
    let key = crate::settings::key_flag(key_file)?;
    let incremental = prepare(dest, update)?;
    let limits = Limits::default();
    let net = NetConfig {
        my_id: TOOL_NODE_ID,
        bind_ip: None,
        key: Some(key),
        limits: LinkLimits {
            frame_bytes_max: limits.frame_bytes_max,
            connect_timeout_ms: limits.connect_timeout_ms,
            io_timeout_ms: limits.peer_io_timeout_ms,
        },
        idle_ms: limits.peer_io_timeout_ms,
        snapshot_install_timeout_ms: limits.snapshot_install_timeout_ms,
        connections_max: 1,
        // A tool's link counts into a registry nobody scrapes.
        registry: std::sync::Arc::new(crate::counters::Registry::new(&limits, [])),
        // A tool neither leads nor follows.
        liveness: std::sync::Arc::new(crate::replication::quorum::Liveness::new(0)),
        matched: std::sync::Arc::default(),
        received: std::sync::Arc::default(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let img = image_path(dest);
    let open = if incremental {
        let cache = beside(dest, "manifest");
        let manifest = delta::build_manifest(dest, &cache, limits.snapshot_manifest_bytes_max);
        let _ = std::fs::remove_file(&cache);
        let manifest = manifest.map_err(|e| format!("hashing {}: {e}", dest.display()))?;
        (
            ControlRequest::ImageOpenDelta { manifest },
            limits.snapshot_install_timeout_ms,
        )
    } else {
        (ControlRequest::ImageOpen, limits.peer_io_timeout_ms)
    };
    let result = rt.block_on(download(
        &net,
        from,
        &img,
        limits.snapshot_chunk_bytes,
        open,
    ));
    let (index, len) = match result {
        Ok(x) => x,
        Err(e) => {
            let _ = std::fs::remove_file(&img);
            return Err(e);
        }
    };
    let unpacked = if incremental {
        rebuild(&img, dest)
    } else {
        snapshot::unpack_image(&img, dest).map_err(|e| {
            format!(
                "{e}; {} is incomplete, remove it and try again",
                dest.display()
            )
        })
    };
    let _ = std::fs::remove_file(&img);
    unpacked?;
    if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
        fsync_dir(parent).map_err(|e| e.to_string())?;
    }
    let digest = snapshot::tree_digest(dest).map_err(|e| e.to_string())?;
    Ok(format!(
        "restored {} at log index {index} from {from}: {len} {} bytes, blake3 verified; \
         tree digest {}",
        dest.display(),
        if incremental {
            "incremental snapshot"
        } else {
            "image"
        },
        hex(&digest)
    ))
}

/// Build the tree the delta at `img` describes against `dest` beside it, then put it in
/// `dest`'s place. `dest` is only read until the swap; a failure before it leaves `dest`
/// as it was.
fn rebuild(img: &Path, dest: &Path) -> Result<(), String> {
    let new = beside(dest, "new");
    let old = beside(dest, "old");
    let _ = std::fs::remove_dir_all(&new);
    std::fs::create_dir(&new).map_err(|e| format!("{}: {e}", new.display()))?;
    if let Err(e) = delta::rebuild(img, dest, &new) {
        let _ = std::fs::remove_dir_all(&new);
        return Err(format!("{e}; {} is unchanged", dest.display()));
    }
    // `dest` was just read whole, so an `old` beside it is what an interrupted earlier
    // run left; it would make the first rename fail.
    let _ = std::fs::remove_dir_all(&old);
    if let Err(e) = std::fs::rename(dest, &old) {
        let _ = std::fs::remove_dir_all(&new);
        return Err(format!(
            "moving {} aside: {e}; it is unchanged",
            dest.display()
        ));
    }
    std::fs::rename(&new, dest).map_err(|e| {
        format!(
            "moving the new tree into place: {e}; the old one is {}, the new one {}",
            old.display(),
            new.display()
        )
    })?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// Fetch the member's image into `img`; (index, length).
async fn download(
    net: &NetConfig,
    from: &str,
    img: &Path,
    chunk_bytes: u64,
    (open, open_ttl): (ControlRequest, u64),
) -> Result<(u64, u64), String> {
    let ttl = net.limits.io_timeout_ms;
    // One link for the whole transfer: the member keeps the open image per link.
    let mut link = Session::open(net, from).await?;
    let (index, len) = match link.call(open, open_ttl).await? {
        ControlResponse::Image { index, len } => (index, len),
        other => return Err(format!("{from}: unexpected answer {other:?}")),
    };
    let mut out = std::fs::File::create(img).map_err(|e| format!("{}: {e}", img.display()))?;
    let started = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut offset = 0u64;
    let mut next_line = 0u64;
    while offset < len {
        let req = ControlRequest::ImageRead {
            offset,
            len: chunk_bytes,
        };
        let data = match link.call(req, ttl).await? {
            ControlResponse::ImageData { data } if !data.is_empty() => data,
            ControlResponse::ImageData { .. } => {
                return Err(format!(
                    "{from}: the image ended at {offset} of {len} bytes"
                ))
            }
            other => return Err(format!("{from}: unexpected answer {other:?}")),
        };
        out.write_all(&data)
            .map_err(|e| format!("{}: {e}", img.display()))?;
        offset += data.len() as u64;
        let pct = offset * 100 / len.max(1);
        if tty {
            let rate = offset as f64 / 1e6 / started.elapsed().as_secs_f64().max(1e-3);
            eprint!(
                "\rrestore: {:>4}% {:>8} / {} MiB  {rate:.0} MB/s ",
                pct,
                offset >> 20,
                len >> 20
            );
        } else if pct >= next_line {
            eprintln!("restore: {pct}% ({offset} of {len} bytes)");
            next_line = pct + 100 / PROGRESS_LINES;
        }
    }
    if tty {
        eprintln!();
    }
    fdatasync(&out).map_err(|e| e.to_string())?;
    Ok((index, len))
}
