//! Running out of space on the data dir: which errors mean "full", how long the log and the
//! tree wait for space before giving up, and the free-space check that makes the writable
//! leader refuse new bytes (ENOSPC at once, like a native full disk) while space is short.
//!
//! A full disk is not a fault of the data: the log store and the state machine keep what
//! they were writing in memory, undo their in-memory bookkeeping of the failed attempt and
//! try again every `disk_full_retry_ms`, for at most `disk_full_wait_ms`; only then does it
//! become the fatal storage error it used to be at once. EIO and EROFS are not retried: they
//! say the device lost data, not that it lacks room.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::Limits;

/// Whether `e` means the file system has no room (for this user): worth waiting out.
pub fn is_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// What operators see of disk-full handling (`seguro_disk_*` metrics, `status`).
#[derive(Debug, Default)]
pub struct DiskGauges {
    /// Parts (log append, vote, tree apply, checkpoint) waiting for space right now.
    pub waiting: AtomicU64,
    /// The writable leader is refusing new writes: free space is below `disk_reserve_bytes`.
    pub refusing: AtomicBool,
}

/// How long a write that hit a full disk is retried.
#[derive(Debug, Clone)]
pub struct DiskFullPolicy {
    pub retry: Duration,
    pub wait: Duration,
    pub gauges: Arc<DiskGauges>,
}

impl DiskFullPolicy {
    pub fn new(limits: &Limits, gauges: Arc<DiskGauges>) -> DiskFullPolicy {
        DiskFullPolicy {
            retry: Duration::from_millis(limits.disk_full_retry_ms),
            wait: Duration::from_millis(limits.disk_full_wait_ms),
            gauges,
        }
    }

    /// One write's wait for space; `what` names it in the log. The waiter holds a copy
    /// of the policy (two durations and a shared gauge), so it can live in a struct that is
    /// polled (a snapshot file's `poll_write`).
    pub fn waiter(&self, what: &'static str) -> Waiter {
        Waiter {
            policy: self.clone(),
            what,
            since: None,
        }
    }
}

impl DiskFullPolicy {
    /// Run `attempt` until it does not fail with a full disk, sleeping `retry` between
    /// tries, for at most `wait`. `attempt` must redo its whole write each time, and must
    /// not hold a lock when it returns: nothing is held across the sleep.
    pub async fn retry<T>(
        &self,
        what: &'static str,
        mut attempt: impl FnMut() -> io::Result<T>,
    ) -> io::Result<T> {
        let mut wait = self.waiter(what);
        loop {
            match attempt() {
                Err(e) if is_full(&e) => match wait.full(&e) {
                    Some(d) => tokio::time::sleep(d).await,
                    None => return Err(e),
                },
                other => return other,
            }
        }
    }
}

#[cfg(test)]
impl DiskFullPolicy {
    /// Retry every 5 ms, for longer than any test runs.
    pub fn patient(gauges: &Arc<DiskGauges>) -> DiskFullPolicy {
        DiskFullPolicy {
            retry: Duration::from_millis(5),
            wait: Duration::from_secs(600),
            gauges: gauges.clone(),
        }
    }
}

impl Default for DiskFullPolicy {
    fn default() -> Self {
        DiskFullPolicy::new(&Limits::default(), Arc::default())
    }
}

/// Tracks one write's wait: a warning when it starts, one line when it ends, none per retry.
pub struct Waiter {
    policy: DiskFullPolicy,
    what: &'static str,
    since: Option<Instant>,
}

impl Waiter {
    /// The write failed with a full disk (`e`): how long to sleep before trying again, or
    /// None when `disk_full_wait_ms` has passed and the failure must be fatal.
    pub fn full(&mut self, e: &io::Error) -> Option<Duration> {
        let since = *self.since.get_or_insert_with(|| {
            tracing::warn!(what = self.what, error = %e, wait_ms = self.policy.wait.as_millis() as u64,
                "the data dir is full: nothing was lost, retrying until space is freed");
            self.policy.gauges.waiting.fetch_add(1, Ordering::Relaxed);
            Instant::now()
        });
        if since.elapsed() >= self.policy.wait {
            tracing::error!(what = self.what, error = %e, waited_ms = since.elapsed().as_millis() as u64,
                "the data dir stayed full for disk_full_wait_ms; giving up (this is now fatal)");
            return None;
        }
        Some(self.policy.retry)
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if let Some(since) = self.since {
            self.policy.gauges.waiting.fetch_sub(1, Ordering::Relaxed);
            if !std::thread::panicking() {
                tracing::info!(
                    what = self.what,
                    waited_ms = since.elapsed().as_millis() as u64,
                    "done waiting for space on the data dir"
                );
            }
        }
    }
}

/// Free bytes for unprivileged writers on the file system holding `dir`.
pub fn free_bytes(dir: &std::path::Path) -> io::Result<u64> {
    let c = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: statvfs fills the zeroed struct we pass for a valid NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// The leader's admission check: is there room for new replicated bytes? The answer is
/// cached for `disk_free_check_ms`, so a stream of small writes costs one statvfs per
/// interval, not one per write.
pub struct SpaceGate {
    dir: PathBuf,
    reserve_bytes: u64,
    interval: Duration,
    gauges: Arc<DiskGauges>,
    last: Mutex<Option<(Instant, bool)>>,
}

impl SpaceGate {
    pub fn new(dir: PathBuf, limits: &Limits, gauges: Arc<DiskGauges>) -> SpaceGate {
        SpaceGate {
            dir,
            reserve_bytes: limits.disk_reserve_bytes,
            interval: Duration::from_millis(limits.disk_free_check_ms),
            gauges,
            last: Mutex::new(None),
        }
    }

    /// Whether free space is at least `disk_reserve_bytes`. A failing statvfs does not
    /// refuse writes: the writes themselves will meet whatever is wrong.
    pub fn has_room(&self) -> bool {
        let mut last = self.last.lock().expect("space gate mutex poisoned");
        if let Some((at, room)) = *last {
            if at.elapsed() < self.interval {
                return room;
            }
        }
        let room = free_bytes(&self.dir).map_or(true, |free| free >= self.reserve_bytes);
        let was_refusing = self.gauges.refusing.swap(!room, Ordering::Relaxed);
        if was_refusing == room {
            if room {
                tracing::info!("free space on the data dir is back above disk_reserve_bytes; accepting writes again");
            } else {
                tracing::warn!(
                    reserve_bytes = self.reserve_bytes,
                    dir = %self.dir.display(),
                    "free space on the data dir is below disk_reserve_bytes: new writes answer ENOSPC"
                );
            }
        }
        *last = Some((Instant::now(), room));
        room
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_no_room_errors_are_waited_out() {
        for (errno, full) in [
            (libc::ENOSPC, true),
            (libc::EDQUOT, true),
            (libc::EIO, false),
            (libc::EROFS, false),
            (libc::ENOENT, false),
        ] {
            assert_eq!(
                is_full(&io::Error::from_raw_os_error(errno)),
                full,
                "{errno}"
            );
        }
        assert!(!is_full(&io::Error::other("no errno")));
    }

    #[test]
    fn waiter_gives_up_after_the_wait_and_counts_while_waiting() {
        let policy = DiskFullPolicy {
            retry: Duration::from_millis(1),
            wait: Duration::ZERO,
            gauges: Arc::default(),
        };
        let e = io::Error::from_raw_os_error(libc::ENOSPC);
        {
            let mut w = policy.waiter("test");
            assert_eq!(policy.gauges.waiting.load(Ordering::Relaxed), 0);
            assert_eq!(w.full(&e), None, "a zero wait gives up at once");
            assert_eq!(policy.gauges.waiting.load(Ordering::Relaxed), 1);
        }
        assert_eq!(policy.gauges.waiting.load(Ordering::Relaxed), 0);
        let policy = DiskFullPolicy {
            wait: Duration::from_secs(3600),
            ..policy
        };
        let mut w = policy.waiter("test");
        assert_eq!(w.full(&e), Some(Duration::from_millis(1)));
    }

    #[test]
    fn gate_refuses_below_the_reserve() {
        let t = crate::sync::tests::TempDir::new("gate");
        let gauges = Arc::new(DiskGauges::default());
        let limits = |reserve| Limits {
            disk_reserve_bytes: reserve,
            ..Limits::default()
        };
        let g = SpaceGate::new(t.path().into(), &limits(0), gauges.clone());
        assert!(g.has_room());
        assert!(!gauges.refusing.load(Ordering::Relaxed));
        let g = SpaceGate::new(t.path().into(), &limits(u64::MAX), gauges.clone());
        assert!(!g.has_room());
        assert!(gauges.refusing.load(Ordering::Relaxed));
    }
}
