//! `seguro-fs mount`: preflight checks, start the Raft node, mount, serve until unmounted or
//! signalled, then drain and checkpoint; or, if the Raft core stops on a fatal error, take
//! the mount down and exit with that error.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::admin;
use crate::config::MountConfig;
use crate::counters::Registry;
use crate::datadir::{DataDir, DataDirError};
use crate::fs::{Fs, FsParts};
use crate::fuse::FuseAdapter;
use crate::metrics;
use crate::ready::Ready;
use crate::replication::control::Control;
use crate::replication::overlay::Overlay;
use crate::replication::pipeline::{PipelineParts, Replicated};
use crate::replication::role::{self, Role};
use crate::replication::state_machine::ObserverSlot;
use crate::replication::{self, StartError};
use crate::ship::{Ship, ShipConfig};

/// The daemon's umask: files it makes for itself are 0600, directories 0700.
pub const PRIVATE_UMASK: libc::mode_t = 0o077;

/// Why `mount` failed; each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mountpoint {0} does not exist; create it first (mkdir -p {0})")]
    NoMountpoint(String),
    #[error("mountpoint {0} is not a directory")]
    NotADirectory(String),
    #[error(
        "mountpoint {0} is not empty; seguro-fs mounts over an empty directory (a new \
         pier's .urb/log). Move existing files away first"
    )]
    NotEmpty(String),
    #[error("mountpoint {0} is already a mount point; unmount it first (umount {0})")]
    AlreadyMounted(String),
    #[error(
        "mountpoint {path} is a dead FUSE mount (\"Transport endpoint is not connected\": \
         its daemon was killed) and {why}; unmount it once nothing uses it (umount -l {path})"
    )]
    DeadMount { path: String, why: String },
    #[error(
        "/dev/fuse is missing: load the fuse module (modprobe fuse), or in a container \
         pass the device (--device /dev/fuse)"
    )]
    NoDevFuse,
    #[error(
        "fusermount3 is not installed and is needed to mount as a non-root user: \
         install the fuse3 package (apt-get install fuse3)"
    )]
    NoFusermount,
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("the node did not become writable: {0}")]
    NotWritable(String),
    #[error("mounting {path}: {source}")]
    Mount {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "replication stopped on a storage or internal error ({0}); the mount was taken \
         down so the service manager restarts this node"
    )]
    RaftStopped(String),
    #[error("{0}")]
    ShipUser(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Why the daemon's main wait ended.
enum Stop {
    Signal,
    /// The file system was unmounted from outside (`umount`, `fusermount3 -u`).
    Unmounted,
    /// openraft's core stopped on a fatal error: this node can neither replicate nor
    /// acknowledge anything any more, so serving a mount that only fails would be a silent
    /// failure; exiting non-zero lets systemd restart it and recover from its log.
    RaftStopped(String),
}

/// Resolves when openraft's core has stopped, with its error.
async fn raft_stopped(raft: openraft::Raft<crate::replication::TypeConfig>) -> String {
    // The core drops its metrics senders when it ends, after it wrote its error into the
    // whole metrics. The server metrics change only with the role, so waiting on them
    // does not wake this task on every append and apply as the whole metrics would.
    let mut server = raft.server_metrics();
    // Bounded by the core's life: once it stops, the sender is dropped.
    loop {
        if let Err(e) = &raft.metrics().borrow().running_state {
            return e.to_string();
        }
        if server.changed().await.is_err() {
            return match &raft.metrics().borrow().running_state {
                Err(e) => e.to_string(),
                Ok(()) => "the Raft core exited".to_string(),
            };
        }
    }
}

fn is_mount_point(path: &Path) -> std::io::Result<bool> {
    let canon = path.canonicalize()?;
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    // Field 5 of each line is the mount point (octal-escaped spaces).
    Ok(info.lines().any(|l| {
        l.split(' ')
            .nth(4)
            .map(|m| m.replace("\\040", " "))
            .is_some_and(|m| Path::new(&m) == canon)
    }))
}

/// Unmount `path`: umount(2) as root, `fusermount3 -u` otherwise (as fuser mounted it).
fn unmount_path(path: &Path) -> std::io::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a valid NUL-terminated path.
        if unsafe { libc::umount(c.as_ptr()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        return Ok(());
    }
    let out = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg(path)
        .output()?;
    if out.status.success() {
        Ok(())
    } else if String::from_utf8_lossy(&out.stderr).contains("busy") {
        Err(std::io::Error::from_raw_os_error(libc::EBUSY))
    } else {
        Err(std::io::Error::other(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// A daemon killed with SIGKILL leaves its mount behind, dead: every access fails with
/// ENOTCONN, which also keeps a straggler from writing into the directory underneath. If
/// the dead mount is this data dir's own (its source names the data dir) and no daemon
/// holds the data dir, detach it, so that a restart (systemd's `Restart=on-failure`)
/// needs no operator. Any other dead mount is reported, not touched.
fn clear_dead_mount(cfg: &MountConfig) -> Result<(), MountError> {
    let mp = &cfg.mountpoint;
    match std::fs::metadata(mp) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {}
        _ => return Ok(()),
    }
    let shown = mp.display().to_string();
    let dead = |why: &str| MountError::DeadMount {
        path: shown.clone(),
        why: why.to_string(),
    };
    // The mount point itself cannot be resolved any more; its parent can.
    let target = match (mp.parent(), mp.file_name()) {
        (Some(parent), Some(name)) => {
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            parent.canonicalize()?.join(name)
        }
        _ => return Err(dead("it has no parent directory")),
    };
    let want = cfg
        .data_dir
        .canonicalize()
        .map(|d| format!("seguro-fs:{}", d.display()))
        .map_err(|_| dead("its data dir does not exist"))?;
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    // Fields: id parent dev root MOUNTPOINT options… - FSTYPE SOURCE superoptions.
    let ours = info.lines().any(|l| {
        let mut halves = l.splitn(2, " - ");
        let (pre, post) = (halves.next().unwrap_or(""), halves.next().unwrap_or(""));
        let point = pre.split(' ').nth(4).map(|m| m.replace("\\040", " "));
        let mut post = post.split(' ');
        let (fstype, source) = (post.next(), post.next().map(|s| s.replace("\\040", " ")));
        point.is_some_and(|m| Path::new(&m) == target)
            // A root mount has no subtype ("fuse"); one through fusermount3 has.
            && matches!(fstype, Some("fuse" | "fuse.seguro-fs"))
            && source.as_deref() == Some(want.as_str())
    });
    if !ours {
        return Err(dead("it is not this data dir's mount"));
    }
    if crate::datadir::in_use(&cfg.data_dir) {
        return Err(dead("the data dir is still in use by a seguro-fs process"));
    }
    // SAFETY: geteuid has no preconditions.
    let detached = if unsafe { libc::geteuid() } == 0 {
        let c = std::ffi::CString::new(target.as_os_str().as_encoded_bytes())
            .map_err(|_| dead("its path holds a NUL byte"))?;
        // SAFETY: a valid NUL-terminated path.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) == 0 }
    } else {
        std::process::Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg(&target)
            .status()
            .is_ok_and(|s| s.success())
    };
    if !detached {
        return Err(dead("detaching it failed"));
    }
    tracing::warn!(mountpoint = %shown, "detached the dead mount a killed daemon left behind");
    Ok(())
}

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(bin).is_file()))
}

/// The checks that need no data dir and no threads, so `--background` runs them before it
/// forks and reports a failure directly.
pub fn preflight(cfg: &MountConfig) -> Result<(), MountError> {
    let mp = &cfg.mountpoint;
    let shown = mp.display().to_string();
    clear_dead_mount(cfg)?;
    let meta = std::fs::metadata(mp).map_err(|_| MountError::NoMountpoint(shown.clone()))?;
    if !meta.is_dir() {
        return Err(MountError::NotADirectory(shown));
    }
    if is_mount_point(mp)? {
        return Err(MountError::AlreadyMounted(shown));
    }
    if std::fs::read_dir(mp)?.next().is_some() {
        return Err(MountError::NotEmpty(shown));
    }
    if !Path::new("/dev/fuse").exists() {
        return Err(MountError::NoDevFuse);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 && !on_path("fusermount3") {
        return Err(MountError::NoFusermount);
    }
    Ok(())
}

/// Run the daemon until the file system is unmounted or a signal arrives, telling `ready`
/// once it is mounted. Returns once the mount is gone and everything accepted is
/// checkpointed. The phases, in order: open, assemble, mount, serve, drain.
pub fn run(cfg: MountConfig, ready: &mut Ready) -> Result<(), MountError> {
    preflight(&cfg)?;
    let opened = open(&cfg)?;
    let node = assemble(&cfg, opened)?;
    let mounted = mount(&cfg, &node)?;
    tracing::info!(mountpoint = %cfg.mountpoint.display(), data_dir = %node.data_dir.root.display(), "mounted");
    ready.mounted();
    let Mounted {
        done_rx,
        signals,
        unmounter,
        fuse_thread,
        supervisor,
    } = mounted;
    let stop = serve(&node, done_rx, signals);
    // The ship goes first: it must not outlive the mount, nor see it fail under it.
    node.rt.block_on(node.ship.shutdown());
    supervisor.abort();
    take_down(&cfg, stop, unmounter, fuse_thread)?;
    drain(&cfg, node)
}

/// Before the daemon's threads start: at most `n` malloc arenas (`malloc_arenas_max`).
/// A fixed mmap threshold would hold even less memory, but it maps fresh pages for every
/// large buffer, which on the test VM cost ~45 % of a sequential write's rate (TUNING.md).
fn limit_malloc_arenas(n: usize) {
    #[cfg(target_env = "gnu")]
    {
        let n = libc::c_int::try_from(n).expect("malloc_arenas_max is at most 64");
        // SAFETY: mallopt only sets an allocator parameter; it returns 0 if it refuses.
        if unsafe { libc::mallopt(libc::M_ARENA_MAX, n) } == 0 {
            tracing::warn!(arenas = n, "glibc refused to limit its malloc arenas");
        }
    }
    #[cfg(not(target_env = "gnu"))]
    let _ = n;
}

/// Phase 1: the data dir, locked and private, and the runtime.
struct Opened {
    data_dir: DataDir,
    rt: tokio::runtime::Runtime,
}

fn open(cfg: &MountConfig) -> Result<Opened, MountError> {
    // Everything the daemon creates for itself (log, vote, checkpoints, snapshots) is
    // private to it. The tree's files get exactly the modes their callers asked for from
    // tree.rs, which sets them explicitly.
    // SAFETY: umask has no preconditions.
    unsafe { libc::umask(PRIVATE_UMASK) };
    limit_malloc_arenas(cfg.limits.malloc_arenas_max);
    let data_dir = DataDir::open(&cfg.data_dir, cfg.node_id, &cfg.cluster_label())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.limits.runtime_threads)
        .enable_all()
        .thread_name("seguro-rt")
        .build()?;
    Ok(Opened { data_dir, rt })
}

/// Phase 2: a running node and everything that serves it, not yet mounted.
struct Assembled {
    data_dir: DataDir,
    rt: tokio::runtime::Runtime,
    node: replication::Node,
    role: Arc<Role>,
    control: Arc<Control>,
    ship: Arc<Ship>,
    fs: Arc<Fs>,
    /// Failed FUSE requests, counted by the adapter `mount` builds.
    fuse_errors: Arc<crate::counters::FuseErrors>,
    role_watcher: tokio::task::JoinHandle<()>,
}

fn assemble(cfg: &MountConfig, opened: Opened) -> Result<Assembled, MountError> {
    let Opened { data_dir, rt } = opened;
    // A random id for this run's batches: only this run holds their overlay pieces.
    let origin = {
        let mut b = [0u8; 8];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))?;
        u64::from_le_bytes(b) | 1
    };
    let overlay = Arc::new(Mutex::new(Overlay::default()));
    let observer: ObserverSlot = Arc::default();
    let others = cfg.cluster.iter().flat_map(|c| c.peers.keys().copied());
    let registry = Arc::new(Registry::new(
        &cfg.limits,
        others.filter(|id| *id != cfg.node_id),
    ));
    if let Some(user) = &cfg.ship_user {
        crate::ship::check_user(user).map_err(MountError::ShipUser)?;
    }
    let ship = Ship::new(cfg.ship_command.clone().map(|command| {
        ShipConfig::new(
            command,
            cfg.ship_user.clone(),
            cfg.mountpoint.clone(),
            cfg.node_id,
            &cfg.limits,
        )
    }));
    let node = rt.block_on(replication::start(
        cfg,
        &data_dir,
        origin,
        overlay.clone(),
        observer.clone(),
        registry.clone(),
        ship.clone(),
    ))?;
    let role = Arc::new(Role::default());
    let control = Arc::new(Control {
        transfer: tokio::sync::Mutex::new(()),
        raft: node.raft.clone(),
        elections: node.elections.clone(),
        role: role.clone(),
        state_machine: node.state_machine.clone(),
        log: node.log.clone(),
        net: node.net.clone(),
        acks: cfg.acks,
        limits: cfg.limits.clone(),
        ship: ship.clone(),
    });
    rt.block_on(async { admin::serve(&data_dir.root, control.clone()) })
        .map_err(|e| MountError::Io(std::io::Error::other(format!("admin socket: {e}"))))?;
    if let Some(addr) = cfg.metrics_addr {
        rt.block_on(metrics::serve(addr, &cfg.limits, control.clone()))
            .map_err(|e| MountError::Io(std::io::Error::other(e.to_string())))?;
    }

    let pipeline = Replicated::start(PipelineParts {
        rt: rt.handle().clone(),
        raft: node.raft.clone(),
        flush_rx: node.flush_rx.clone(),
        applied_rx: node.applied_rx.clone(),
        role: role.clone(),
        matched: node.matched.clone(),
        origin,
        my_id: cfg.node_id,
        acks: cfg.acks,
        limits: cfg.limits.clone(),
    });
    let fs = Arc::new(Fs::new(FsParts {
        data_dir: data_dir.root.clone(),
        tree_root: data_dir.tree_dir(),
        local_root: data_dir.local_dir(),
        local_names: cfg.local_names.clone(),
        limits: cfg.limits.clone(),
        overlay,
        pipeline,
        registry: registry.clone(),
    })?);
    let _ = observer.set(fs.clone());
    let role_watcher = rt.spawn(role::watch(
        node.raft.clone(),
        cfg.node_id,
        role.clone(),
        fs.clone(),
        node.liveness.clone(),
        role::QuorumCheck {
            lease_ms: replication::election_timeout_max_ms(&cfg.limits),
            tick_ms: cfg.limits.liveness_check_ms,
            linearizable_timeout_ms: cfg.limits.linearizable_timeout_ms,
        },
    ));
    if cfg.cluster.is_none() {
        // Standalone: mounted means writable, as it has always been.
        let deadline =
            std::time::Instant::now() + Duration::from_millis(cfg.limits.ready_timeout_ms);
        while !role.writable() {
            if std::time::Instant::now() > deadline {
                return Err(MountError::NotWritable(format!(
                    "not the writable leader after {} ms",
                    cfg.limits.ready_timeout_ms
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(Assembled {
        data_dir,
        rt,
        node,
        role,
        control,
        ship,
        fs,
        fuse_errors: registry.fuse_errors.clone(),
        role_watcher,
    })
}

/// Phase 3: the FUSE session, running on its own thread, and the ship started on it.
struct Mounted {
    /// Resolves when the session ends (the file system was unmounted).
    done_rx: tokio::sync::oneshot::Receiver<()>,
    signals: Signals,
    unmounter: fuser::SessionUnmounter,
    fuse_thread: std::thread::JoinHandle<std::io::Result<()>>,
    supervisor: tokio::task::JoinHandle<()>,
}

/// SIGTERM and SIGINT, which unmount cleanly.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

fn mount(cfg: &MountConfig, a: &Assembled) -> Result<Mounted, MountError> {
    let mut fuse_cfg = fuser::Config::default();
    fuse_cfg.mount_options = vec![
        fuser::MountOption::FSName(format!("seguro-fs:{}", a.data_dir.root.display())),
        fuser::MountOption::Subtype("seguro-fs".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
    ];
    if cfg.allow_other {
        fuse_cfg.acl = fuser::SessionACL::All;
    }
    fuse_cfg.n_threads = Some(cfg.limits.fuse_threads);
    fuse_cfg.clone_fd = true;
    // From before the mount appears: a SIGTERM as soon as it is visible (or READY=1 is
    // sent) must unmount cleanly, not kill the process with the signal's default action.
    let signals = {
        use tokio::signal::unix::{signal, SignalKind};
        let _rt = a.rt.enter();
        Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        }
    };
    let adapter = FuseAdapter {
        fs: a.fs.clone(),
        write_bytes_max: cfg.limits.fuse_write_bytes_max,
        errors: a.fuse_errors.clone(),
    };
    let mut session =
        fuser::Session::new(adapter, &cfg.mountpoint, &fuse_cfg).map_err(|source| {
            MountError::Mount {
                path: cfg.mountpoint.display().to_string(),
                source,
            }
        })?;
    a.fs.set_notifier(session.notifier())?;
    let unmounter = session.unmount_callable();
    // Only now: the ship needs the mount.
    let supervisor = a.rt.spawn(a.ship.clone().supervise(
        a.role.clone(),
        a.node.liveness.clone(),
        a.control.clone(),
    ));
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let fuse_thread = std::thread::Builder::new()
        .name("fuse-session".into())
        .spawn(move || {
            let r = session.run();
            let _ = done_tx.send(());
            r
        })?;
    Ok(Mounted {
        done_rx,
        signals,
        unmounter,
        fuse_thread,
        supervisor,
    })
}

/// Phase 4: wait for a signal, an unmount from outside, or the Raft core's fatal stop.
fn serve(a: &Assembled, done_rx: tokio::sync::oneshot::Receiver<()>, mut signals: Signals) -> Stop {
    a.rt.block_on(async {
        tokio::select! {
            _ = signals.term.recv() => Stop::Signal,
            _ = signals.int.recv() => Stop::Signal,
            _ = done_rx => Stop::Unmounted,
            // On a runtime worker, not this thread: its wake-ups would each be a switch.
            why = a.rt.spawn(raft_stopped(a.node.raft.clone())) => Stop::RaftStopped(
                why.unwrap_or_else(|e| format!("the Raft watch task failed: {e}")),
            ),
        }
    })
}

/// Phase 5a: take the mount down (unless it already is) and wait for the FUSE session to
/// end; a Raft core that stopped is this node's error.
fn take_down(
    cfg: &MountConfig,
    stop: Stop,
    mut unmounter: fuser::SessionUnmounter,
    fuse_thread: std::thread::JoinHandle<std::io::Result<()>>,
) -> Result<(), MountError> {
    match &stop {
        Stop::Signal => tracing::info!("signal received: unmounting"),
        Stop::RaftStopped(why) => {
            tracing::error!(error = %why, "replication stopped: taking the mount down")
        }
        Stop::Unmounted => {}
    }
    if !matches!(stop, Stop::Unmounted) {
        // fuser's own unmount first: fuser then never tries again when the session ends,
        // which logged "Failed to umount filesystem: Invalid argument" on every clean stop.
        // Its error (EBUSY) is handled by the loop below.
        let _ = unmounter.unmount();
        // A file still open on the mount (an LMDB env being closed, a shell in it) makes
        // umount answer EBUSY; retry for a while rather than leave the mount behind.
        let deadline = std::time::Instant::now() + Duration::from_millis(cfg.limits.ack_timeout_ms);
        while is_mount_point(&cfg.mountpoint).unwrap_or(false) {
            match unmount_path(&cfg.mountpoint) {
                Ok(()) => break,
                Err(e)
                    if e.raw_os_error() == Some(libc::EBUSY)
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => {
                    tracing::error!(error = %e, "could not unmount; unmount {} once its users are gone", cfg.mountpoint.display());
                    break;
                }
            }
        }
    }
    if let Stop::RaftStopped(why) = stop {
        // Nothing more can become durable; the session thread ends with the mount, or
        // with the process if a user of the mount kept it busy.
        if !is_mount_point(&cfg.mountpoint).unwrap_or(false) {
            let _ = fuse_thread.join();
        }
        return Err(MountError::RaftStopped(why));
    }
    match fuse_thread.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "fuse session ended with an error"),
        Err(_) => tracing::error!("fuse session thread panicked"),
    }

    Ok(())
}

/// Phase 5b: everything accepted is made durable, applied and checkpointed, so a restart
/// replays nothing; then Raft shuts down.
fn drain(cfg: &MountConfig, a: Assembled) -> Result<(), MountError> {
    let drained = if a.fs.writable() {
        a.fs.wait_durable()
    } else {
        Ok(())
    };
    let apply_deadline =
        std::time::Instant::now() + Duration::from_millis(cfg.limits.ack_timeout_ms);
    while *a.node.applied_rx.borrow() < a.node.flush_rx.borrow().flushed_index
        && std::time::Instant::now() < apply_deadline
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let ckpt = a.node.state_machine.checkpoint_now();
    // The mount is gone and everything accepted is durable: the watcher would only report
    // the Raft shutdown as a lost leadership (a WARN on every clean stop).
    a.role_watcher.abort();
    let _ = a.rt.block_on(a.node.raft.shutdown());
    drained.map_err(|_| {
        MountError::Io(std::io::Error::other(
            "could not make the last writes durable before exiting",
        ))
    })?;
    ckpt?;
    tracing::info!("unmounted cleanly");
    Ok(())
}
