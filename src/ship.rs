//! The ship's supervisor: runs `ship_command` while, and only while, this node is the
//! writable leader, the way Patroni runs PostgreSQL on whichever node holds the lock.
//!
//! Owns the ship's process and its life cycle:
//!
//! - **start** once the mount is writable *and* the failover freeze has passed
//!   (`liveness_check_ms + ship_stop_grace_ms + SHIP_FREEZE_MARGIN_MS`): by then a deposed
//!   leader has stepped down by check-quorum and killed its ship (docs/SEMANTICS.md, "The
//!   supervised ship", has the timing argument), so two ships never run at once;
//! - **stop** (SIGTERM, SIGKILL after `ship_stop_grace_ms`) as soon as the mount stops
//!   being writable — leadership lost, quorum lost, a transfer begun — and on shutdown;
//! - **restart** a ship that exits by itself with a doubling backoff, and after
//!   `ship_failures_max` failures inside `ship_failures_window_ms` hand leadership to
//!   another member, so a host that cannot run the ship does not keep it down.
//!
//! The ship runs under a *guard*: this same binary re-executed as `seguro-fs ship-guard`,
//! leader of the ship's process group. The guard asks the kernel for SIGTERM when the
//! daemon dies (PR_SET_PDEATHSIG), forwards it to the group and SIGKILLs the group after
//! the grace, so a ship never outlives its daemon, even after `kill -9`; the dead mount
//! fails whatever the ship still tries meanwhile.

use std::collections::VecDeque;
use std::ffi::CString;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

use crate::config::{Limits, SHIP_FREEZE_MARGIN_MS};
use crate::replication::quorum::Liveness;
use crate::replication::role::Role;

/// Environment variables that carry the guard's orders (it is our own binary).
const GUARD_PARENT_ENV: &str = "SEGURO_SHIP_GUARD_PARENT";
const GUARD_GRACE_ENV: &str = "SEGURO_SHIP_GUARD_GRACE_MS";
const GUARD_COMMAND_ENV: &str = "SEGURO_SHIP_GUARD_COMMAND";
const GUARD_USER_ENV: &str = "SEGURO_SHIP_GUARD_USER";
/// How often the guard looks at its child and its signals.
const GUARD_POLL_MS: i64 = 50;
/// Extra wait after the grace for the guard itself to be gone.
const STOP_MARGIN_MS: u64 = 500;

/// Where the ship is in its life cycle (`status`'s `ship.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// No `ship_command`.
    Disabled,
    /// Not the writable leader.
    Stopped,
    /// Leader: waiting out the freeze, then starting.
    Starting,
    Running,
    Stopping,
    /// Exited by itself; restarting after a delay (or handed over).
    Backoff,
}

impl State {
    pub const ALL: [State; 6] = [
        State::Disabled,
        State::Stopped,
        State::Starting,
        State::Running,
        State::Stopping,
        State::Backoff,
    ];

    pub fn name(self) -> &'static str {
        match self {
            State::Disabled => "disabled",
            State::Stopped => "stopped",
            State::Starting => "starting",
            State::Running => "running",
            State::Stopping => "stopping",
            State::Backoff => "backoff",
        }
    }
}

/// What `status` and /metrics show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub state: State,
    pub pid: Option<u32>,
    pub starts: u64,
    pub last_exit: Option<String>,
    /// From this node last hearing the previous leader (or from this daemon's start) to
    /// its ship starting, at the first start of its latest leadership.
    pub last_failover_downtime_ms: Option<u64>,
    /// Why this node handed the ship away, if it did.
    pub gave_up: Option<String>,
}

/// Who takes leadership (and so the ship) away from this node after too many ship
/// failures: the cluster's leadership transfer (`Control`, in `replication/control.rs`).
pub trait Handover: Send + Sync {
    /// Hand leadership to the most caught-up other voter; a message saying what happened.
    fn hand_over(&self) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send + '_>>;
}

/// The ship's command and how to run it.
#[derive(Debug, Clone)]
pub struct ShipConfig {
    pub command: String,
    pub user: Option<String>,
    pub mountpoint: PathBuf,
    pub node_id: u64,
    pub grace_ms: u64,
    pub backoff_ms: u64,
    pub backoff_max_ms: u64,
    pub failures_max: u64,
    pub failures_window_ms: u64,
    pub freeze_ms: u64,
}

impl ShipConfig {
    pub fn new(
        command: String,
        user: Option<String>,
        mountpoint: PathBuf,
        node_id: u64,
        l: &Limits,
    ) -> ShipConfig {
        ShipConfig {
            command,
            user,
            mountpoint,
            node_id,
            grace_ms: l.ship_stop_grace_ms,
            backoff_ms: l.ship_restart_backoff_ms,
            backoff_max_ms: l.ship_restart_backoff_max_ms,
            failures_max: l.ship_failures_max,
            failures_window_ms: l.ship_failures_window_ms,
            freeze_ms: l.liveness_check_ms + l.ship_stop_grace_ms + SHIP_FREEZE_MARGIN_MS,
        }
    }
}

/// The supervisor's shared state: what it reports, and the switch that ends it.
pub struct Ship {
    cfg: Option<ShipConfig>,
    status: watch::Sender<Status>,
    shutdown: Notify,
    shutting_down: std::sync::atomic::AtomicBool,
}

/// A user's ids and supplementary groups, resolved before any fork.
#[derive(Debug, Clone)]
struct Account {
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
    home: String,
    name: String,
}

/// Look `name` up in the passwd and group databases.
fn account(name: &str) -> Result<Account, String> {
    let c = CString::new(name).map_err(|_| format!("ship_user {name:?} holds a NUL byte"))?;
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: valid pointers and buffer length; `out` is checked before use.
    let rc =
        unsafe { libc::getpwnam_r(c.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut out) };
    if rc != 0 || out.is_null() {
        return Err(format!(
            "ship_user {name:?} is not a user on this host (getent passwd {name})"
        ));
    }
    // SAFETY: getpwnam_r filled `pw` with pointers into `buf`.
    let home = unsafe { std::ffi::CStr::from_ptr(pw.pw_dir) }
        .to_string_lossy()
        .into_owned();
    let mut groups = vec![0 as libc::gid_t; 256];
    let mut n = groups.len() as libc::c_int;
    // SAFETY: `groups` holds `n` entries; getgrouplist writes at most that many.
    if unsafe { libc::getgrouplist(c.as_ptr(), pw.pw_gid, groups.as_mut_ptr(), &mut n) } < 0 {
        return Err(format!("ship_user {name:?} is in more than 256 groups"));
    }
    groups.truncate(n.max(0) as usize);
    Ok(Account {
        uid: pw.pw_uid,
        gid: pw.pw_gid,
        groups,
        home,
        name: name.to_string(),
    })
}

/// Check `ship_user` at startup, so a typo is a mount error rather than a ship that
/// never starts.
pub fn check_user(name: &str) -> Result<(), String> {
    account(name).map(|_| ())
}

fn kill_group(pgid: u32, sig: libc::c_int) {
    // SAFETY: kill has no memory preconditions; ESRCH (already gone) is fine.
    unsafe { libc::kill(-(pgid as libc::pid_t), sig) };
}

impl Ship {
    pub fn new(cfg: Option<ShipConfig>) -> Arc<Ship> {
        let state = if cfg.is_some() {
            State::Stopped
        } else {
            State::Disabled
        };
        Arc::new(Ship {
            cfg,
            status: watch::channel(Status {
                state,
                pid: None,
                starts: 0,
                last_exit: None,
                last_failover_downtime_ms: None,
                gave_up: None,
            })
            .0,
            shutdown: Notify::new(),
            shutting_down: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn enabled(&self) -> bool {
        self.cfg.is_some()
    }

    pub fn grace_ms(&self) -> u64 {
        self.cfg.as_ref().map_or(0, |c| c.grace_ms)
    }

    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Status> {
        self.status.subscribe()
    }

    fn set(&self, f: impl FnOnce(&mut Status)) {
        self.status.send_modify(f);
    }

    /// Wait until the ship is not running (or `ms` passed); true if it is not.
    pub async fn wait_not_running(&self, ms: u64) -> bool {
        let mut rx = self.subscribe();
        let down = |s: &Status| s.pid.is_none() && s.state != State::Stopping;
        tokio::time::timeout(Duration::from_millis(ms), rx.wait_for(down))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Stop the ship for good (daemon shutdown) and wait for it to be gone.
    pub async fn shutdown(&self) {
        self.shutting_down
            .store(true, std::sync::atomic::Ordering::Release);
        self.shutdown.notify_waiters();
        self.shutdown.notify_one();
        if self.enabled() {
            let _ = self
                .wait_not_running(self.grace_ms() + STOP_MARGIN_MS * 2)
                .await;
        }
    }

    fn shutting_down(&self) -> bool {
        self.shutting_down
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Supervise until shutdown. `handover` hands leadership away after too many failures.
    pub async fn supervise(
        self: Arc<Self>,
        role: Arc<Role>,
        liveness: Arc<Liveness>,
        handover: Arc<dyn Handover>,
    ) {
        let Some(cfg) = self.cfg.clone() else {
            return;
        };
        let mut changes = role.subscribe();
        let mut failures: VecDeque<Instant> = VecDeque::new();
        while !self.shutting_down() {
            if !role.writable() {
                self.set(|s| s.state = State::Stopped);
                tokio::select! {
                    _ = changes.changed() => {}
                    _ = self.shutdown.notified() => {}
                    // Bounded wait: re-check even if a wake-up was missed.
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
            let generation = role.generation();
            let term = role.term();
            let leads = || role.writable() && role.generation() == generation;
            self.set(|s| s.state = State::Starting);
            tracing::info!(
                freeze_ms = cfg.freeze_ms,
                "this node leads: the ship starts once a deposed leader's ship must be gone"
            );
            if !self.wait_while(&leads, cfg.freeze_ms).await {
                continue;
            }
            let mut backoff_ms = cfg.backoff_ms;
            let mut first = true;
            while leads() && !self.shutting_down() {
                let child = match spawn_guard(&cfg, term) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::error!(error = %e, "could not start the ship");
                        self.set(|s| s.last_exit = Some(format!("could not start: {e}")));
                        failures.push_back(Instant::now());
                        if !self
                            .after_failure(&cfg, &mut failures, &mut backoff_ms, &leads, &handover)
                            .await
                        {
                            break;
                        }
                        continue;
                    }
                };
                let pid = child.id().unwrap_or(0);
                let downtime =
                    first.then(|| liveness.last_heard_leader().elapsed().as_millis() as u64);
                first = false;
                self.set(|s| {
                    s.state = State::Running;
                    s.pid = Some(pid);
                    s.starts += 1;
                    if downtime.is_some() {
                        s.last_failover_downtime_ms = downtime;
                    }
                });
                tracing::info!(pid, term, command = %cfg.command, "ship started");
                let ran = Instant::now();
                match self.run_until_exit_or_stop(child, pid, &cfg, &leads).await {
                    Outcome::Stopped(how) => {
                        tracing::info!(pid, how, "ship stopped");
                        self.set(|s| {
                            s.pid = None;
                            s.state = State::Stopped;
                            s.last_exit = Some(format!("stopped by seguro-fs ({how})"));
                        });
                        break;
                    }
                    Outcome::Exited(how) => {
                        tracing::warn!(pid, how = %how, "the ship exited by itself while this node leads");
                        // A ship that ran well for a while starts its next backoff afresh.
                        if ran.elapsed() > Duration::from_millis(cfg.backoff_max_ms) {
                            backoff_ms = cfg.backoff_ms;
                        }
                        self.set(|s| {
                            s.pid = None;
                            s.last_exit = Some(how);
                        });
                        failures.push_back(Instant::now());
                        if !self
                            .after_failure(&cfg, &mut failures, &mut backoff_ms, &leads, &handover)
                            .await
                        {
                            break;
                        }
                    }
                }
            }
        }
        self.set(|s| s.state = State::Stopped);
    }

    /// Sleep `ms` unless leadership changes or shutdown begins; true if still leading.
    async fn wait_while(&self, leads: &impl Fn() -> bool, ms: u64) -> bool {
        let deadline = Instant::now() + Duration::from_millis(ms);
        while Instant::now() < deadline {
            if !leads() || self.shutting_down() {
                return false;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(20).min(deadline - Instant::now())) => {}
                _ = self.shutdown.notified() => {}
            }
        }
        leads() && !self.shutting_down()
    }

    /// After a failure: back off, or hand leadership away past `failures_max`. False when
    /// this leadership is over for the ship (handed over, lost, or shutting down).
    async fn after_failure(
        &self,
        cfg: &ShipConfig,
        failures: &mut VecDeque<Instant>,
        backoff_ms: &mut u64,
        leads: &impl Fn() -> bool,
        handover: &Arc<dyn Handover>,
    ) -> bool {
        let window = Duration::from_millis(cfg.failures_window_ms);
        while failures.front().is_some_and(|t| t.elapsed() > window) {
            failures.pop_front();
        }
        self.set(|s| s.state = State::Backoff);
        if failures.len() as u64 > cfg.failures_max {
            let why = format!(
                "the ship failed {} times within {} ms on this node",
                failures.len(),
                cfg.failures_window_ms
            );
            tracing::error!(reason = %why, "handing leadership (and the ship) to another member");
            self.set(|s| s.gave_up = Some(why));
            failures.clear();
            match handover.hand_over().await {
                Ok(r) => {
                    tracing::info!(result = %r, "leadership handed over after ship failures");
                    return false;
                }
                Err(e) => {
                    tracing::error!(error = %e, "could not hand leadership over; the ship keeps restarting here")
                }
            }
        }
        let wait = *backoff_ms;
        *backoff_ms = (*backoff_ms * 2).min(cfg.backoff_max_ms);
        tracing::info!(wait_ms = wait, "restarting the ship after a delay");
        self.wait_while(leads, wait).await
    }

    async fn run_until_exit_or_stop(
        &self,
        mut child: tokio::process::Child,
        pid: u32,
        cfg: &ShipConfig,
        leads: &impl Fn() -> bool,
    ) -> Outcome {
        let exited = loop {
            tokio::select! {
                st = child.wait() => break st,
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                _ = self.shutdown.notified() => {}
            }
            if !leads() || self.shutting_down() {
                let how = if self.shutting_down() {
                    "shutdown"
                } else {
                    "this node stopped leading"
                };
                self.set(|s| s.state = State::Stopping);
                stop(&mut child, pid, cfg.grace_ms).await;
                return Outcome::Stopped(how);
            }
        };
        // The guard returns only once nothing of the ship is left (it is a subreaper).
        if !leads() || self.shutting_down() {
            // Its commits failed because this node stopped leading: not the ship's fault.
            return Outcome::Stopped("exited after this node stopped leading");
        }
        Outcome::Exited(match exited {
            Ok(st) => describe(st),
            Err(e) => format!("wait failed: {e}"),
        })
    }
}

enum Outcome {
    Stopped(&'static str),
    Exited(String),
}

fn describe(st: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (_, Some(s)) => format!("killed by signal {s}"),
        _ => "unknown".into(),
    }
}

/// SIGTERM to the guard (which forwards it to the ship's group); SIGKILL to the whole
/// group if the guard is not gone after the grace. The group is signalled only while the
/// guard, whose pid is the group's id, is not reaped yet, so the id cannot have been
/// reused by then.
async fn stop(child: &mut tokio::process::Child, pid: u32, grace_ms: u64) {
    // SAFETY: signalling our own, unreaped child.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    let deadline = Duration::from_millis(grace_ms + STOP_MARGIN_MS);
    if tokio::time::timeout(deadline, child.wait()).await.is_err() {
        kill_group(pid, libc::SIGKILL);
        let _ = child.wait().await;
    }
}

/// Start the guard, which starts the ship (`guard_main`).
fn spawn_guard(cfg: &ShipConfig, term: u64) -> std::io::Result<tokio::process::Child> {
    let mut cmd = tokio::process::Command::new("/proc/self/exe");
    cmd.arg("ship-guard")
        .current_dir(&cfg.mountpoint)
        .env(GUARD_PARENT_ENV, std::process::id().to_string())
        .env(GUARD_GRACE_ENV, cfg.grace_ms.to_string())
        .env(GUARD_COMMAND_ENV, &cfg.command)
        .env("SEGURO_MOUNTPOINT", &cfg.mountpoint)
        .env("SEGURO_NODE_ID", cfg.node_id.to_string())
        .env("SEGURO_TERM", term.to_string())
        .stdin(std::process::Stdio::null())
        // The ship's output goes where the daemon's goes (journald, or the log file).
        .stdout(std::process::Stdio::inherit())
        .stderr(std::process::Stdio::inherit())
        // The guard leads the ship's process group; the group's id is the guard's pid.
        .process_group(0)
        .kill_on_drop(false);
    if let Some(user) = &cfg.user {
        // Resolved by the guard at each start: a user deleted since the daemon started is
        // then a failed start (retried, then handed over), not a ship that silently never
        // runs.
        cmd.env(GUARD_USER_ENV, user);
    }
    cmd.spawn()
}

/// `seguro-fs ship-guard`: run the ship in this process group, forward SIGTERM to the
/// group, and SIGKILL the group after the grace; SIGTERM also comes from the kernel when
/// the daemon dies (PR_SET_PDEATHSIG). As a child subreaper it reaps every descendant the
/// ship leaves behind and returns only once none is left, so nothing of the ship survives
/// it. Returns the exit code (the ship's, or 128 + its signal).
pub fn guard_main() -> i32 {
    let env = |k: &str| std::env::var(k).ok();
    let (Some(parent), Some(grace), Some(command)) = (
        env(GUARD_PARENT_ENV),
        env(GUARD_GRACE_ENV),
        env(GUARD_COMMAND_ENV),
    ) else {
        eprintln!("seguro-fs ship-guard is started by seguro-fs mount, not by hand");
        return 2;
    };
    let grace_ms: u64 = grace.parse().unwrap_or(0);
    // SAFETY: prctl and getppid have no memory preconditions.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong);
        // The daemon may have died before the line above: then nobody would tell us.
        if libc::getppid().to_string() != parent {
            return 1;
        }
        // Orphans of the ship (a daemonised helper, a worker) become our children, so
        // they are waited for and killed with the rest.
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong);
    }
    let account = match env(GUARD_USER_ENV).map(|u| account(&u)).transpose() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("seguro-fs ship-guard: {e}");
            return 1;
        }
    };
    // Signals are taken synchronously (sigtimedwait), so block them first.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: a valid sigset_t; this process has one thread.
    unsafe {
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGCHLD] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.arg("-c").arg(&command);
    for k in [
        GUARD_PARENT_ENV,
        GUARD_GRACE_ENV,
        GUARD_COMMAND_ENV,
        GUARD_USER_ENV,
    ] {
        cmd.env_remove(k);
    }
    if let Some(a) = &account {
        cmd.env("HOME", &a.home)
            .env("USER", &a.name)
            .env("LOGNAME", &a.name);
    }
    let ids = account.map(|a| (a.uid, a.gid, a.groups));
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            // The packaged unit shields the daemon from the OOM killer; under memory
            // pressure the ship, not the daemon serving its mount, is the one to go.
            let fd = libc::open(c"/proc/self/oom_score_adj".as_ptr(), libc::O_WRONLY);
            if fd >= 0 {
                libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
            }
            if let Some((uid, gid, groups)) = &ids {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(*gid) != 0
                    || libc::setuid(*uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("seguro-fs ship-guard: starting /bin/sh -c {command:?}: {e}");
            return 127;
        }
    };
    let ship = child.id() as libc::pid_t;
    // SAFETY: getpgrp has no preconditions.
    let group = unsafe { libc::getpgrp() } as u32;
    let grace = Duration::from_millis(grace_ms);
    let mut code: Option<i32> = None;
    let mut kill_at: Option<Instant> = None;
    loop {
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: GUARD_POLL_MS * 1_000_000,
        };
        // SAFETY: valid set and timespec; a null siginfo is allowed.
        let sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) };
        if matches!(sig, libc::SIGTERM | libc::SIGINT | libc::SIGHUP) && kill_at.is_none() {
            // To the whole group (this guard too, but it has SIGTERM blocked).
            kill_group(group, libc::SIGTERM);
            kill_at = Some(Instant::now() + grace);
        }
        // Reap every child: the ship and whatever it left to us.
        loop {
            let mut status = 0;
            // SAFETY: reaping our own children.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid == ship {
                code = Some(if libc::WIFEXITED(status) {
                    libc::WEXITSTATUS(status)
                } else {
                    128 + libc::WTERMSIG(status)
                });
                if kill_at.is_none() {
                    // The ship exited by itself: what it left behind goes too, gently first.
                    kill_group(group, libc::SIGTERM);
                    kill_at = Some(Instant::now() + grace);
                }
            } else if pid < 0 {
                // ECHILD: nothing of the ship is left.
                return code.unwrap_or(1);
            } else if pid == 0 {
                break;
            }
        }
        if kill_at.is_some_and(|t| Instant::now() >= t) {
            if let Some(c) = code {
                eprintln!(
                    "seguro-fs ship-guard: the ship exited ({c}); killing what it left running"
                );
            }
            // Ends this guard too.
            kill_group(group, libc::SIGKILL);
        }
    }
}
