//! Command-line flags (clap) and their translation into a validated [`MountConfig`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{Limits, MountConfig, RangeError};

#[derive(Debug, Parser)]
#[command(
    name = "seguro-fs",
    version,
    about = "A FUSE file system that turns every write under an Urbit pier's .urb/log into a \
             Raft log entry and answers fsync only once the log holds it durably."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Mount DATA_DIR's tree on MOUNTPOINT and serve it in the foreground until unmounted,
    /// SIGINT or SIGTERM.
    Mount(MountArgs),
    /// Show the running node's role, term, leader and log indexes.
    Status(StatusArgs),
    /// Change the cluster's voters (run on the leader's machine).
    #[command(subcommand)]
    Members(MembersCommand),
    /// Add a non-voting member, optionally an export that stops at an index.
    #[command(subcommand)]
    Learner(LearnerCommand),
    /// Hand leadership to another voter (stop urbit on this machine first: the mount
    /// turns read-only).
    TransferLeader(TransferArgs),
    /// Compare every member's tree digest at one log index.
    Verify(VerifyArgs),
    /// Copy the committed tree of a running member into a new directory (a usable
    /// .urb/log), verified with blake3.
    Restore(RestoreArgs),
}

#[derive(Debug, Subcommand)]
pub enum MembersCommand {
    /// Add node ID (started with --join) as a learner, wait until it has caught up, then
    /// make it a voter.
    Add(MemberAddArgs),
    /// Remove node ID (voter or learner) from the cluster.
    Remove(MemberRemoveArgs),
}

#[derive(Debug, Subcommand)]
pub enum LearnerCommand {
    /// Add node ID (started with --join) as a learner.
    Add(LearnerAddArgs),
}

#[derive(Debug, Args)]
pub struct MemberAddArgs {
    /// The data dir of the leader's running `seguro-fs mount`.
    pub data_dir: PathBuf,
    pub id: u64,
    /// The new member's peer address, HOST:PORT.
    pub addr: String,
    /// Print the daemon's JSON answer.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct MemberRemoveArgs {
    /// The data dir of the leader's running `seguro-fs mount`.
    pub data_dir: PathBuf,
    pub id: u64,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct LearnerAddArgs {
    /// The data dir of the leader's running `seguro-fs mount`.
    pub data_dir: PathBuf,
    pub id: u64,
    /// The learner's peer address, HOST:PORT.
    pub addr: String,
    /// Make it an export: its tree stops at this log index (for offline analysis or a
    /// hand-over) and it never leads.
    #[arg(long)]
    pub until_index: Option<u64>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct TransferArgs {
    /// The data dir of the leader's running `seguro-fs mount`.
    pub data_dir: PathBuf,
    /// The voter to hand over to (default: the most caught-up one).
    #[arg(long)]
    pub to: Option<u64>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The data dir of the leader's running `seguro-fs mount`.
    pub data_dir: PathBuf,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// A running member's peer address, HOST:PORT (prefer a follower: building the
    /// image pauses applies on the member for the tree walk).
    #[arg(long)]
    pub from: String,
    /// The cluster's key file.
    #[arg(long)]
    pub cluster_key_file: PathBuf,
    /// A directory that does not exist yet or is empty.
    pub dest: PathBuf,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The data dir of a running `seguro-fs mount`.
    pub data_dir: PathBuf,
    /// One line of JSON (for scripts) instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct MountArgs {
    /// The node's data directory (created if missing): raft/ log, tree/, local/.
    pub data_dir: PathBuf,
    /// An existing, empty directory (e.g. a pier's .urb/log).
    pub mountpoint: PathBuf,
    /// This node's id in its cluster. A data dir remembers the id it was created with.
    #[arg(long, default_value_t = 1)]
    pub node_id: u64,
    /// Every member's advertised address: ID=HOST:PORT,ID=HOST:PORT,… (this node
    /// included). Without it the node is a standalone one-voter cluster.
    #[arg(long, value_delimiter = ',')]
    pub peers: Vec<String>,
    /// Address to accept peer links on (default: this node's entry in --peers).
    #[arg(long)]
    pub listen: Option<String>,
    /// File holding the cluster's shared secret (at least 16 bytes); required with --peers.
    #[arg(long)]
    pub cluster_key_file: Option<PathBuf>,
    /// Other replicas that must hold data durably before fsync returns
    /// (default: majority − 1).
    #[arg(long)]
    pub acks: Option<u64>,
    /// Comma-separated file names kept per host in DATA_DIR/local and never replicated.
    #[arg(long, value_delimiter = ',', default_value = "lock.mdb")]
    pub local_names: Vec<String>,
    /// Allow other users to access the mount (needs user_allow_other in /etc/fuse.conf
    /// unless running as root).
    #[arg(long)]
    pub allow_other: bool,
    /// Largest Raft entry (group-commit batch) in bytes.
    #[arg(long, default_value_t = Limits::default().entry_bytes_max)]
    pub entry_bytes_max: usize,
    /// Written-but-unapplied bytes before WRITE blocks (backpressure).
    #[arg(long, default_value_t = Limits::default().inflight_bytes_max)]
    pub inflight_bytes_max: usize,
    /// Batches proposed but not yet flushed to the log.
    #[arg(long, default_value_t = Limits::default().proposals_inflight_max)]
    pub proposals_inflight_max: usize,
    /// How long an fsync waits for durability before failing with EIO.
    #[arg(long, default_value_t = Limits::default().ack_timeout_ms)]
    pub ack_timeout_ms: u64,
    /// Entries between checkpoints (tree synced, log purged).
    #[arg(long, default_value_t = Limits::default().checkpoint_entries)]
    pub checkpoint_entries: u64,
    /// Size at which a log segment file is closed and a new one started.
    #[arg(long, default_value_t = Limits::default().log_segment_bytes_max)]
    pub log_segment_bytes_max: u64,
    /// FUSE worker threads.
    #[arg(long, default_value_t = Limits::default().fuse_threads)]
    pub fuse_threads: usize,
    /// How long to wait for the node to become writable before giving up.
    #[arg(long, default_value_t = Limits::default().ready_timeout_ms)]
    pub ready_timeout_ms: u64,
    /// Log entries kept below a checkpoint for members slightly behind.
    #[arg(long, default_value_t = Limits::default().log_keep_entries)]
    pub log_keep_entries: u64,
    /// Raft heartbeat interval.
    #[arg(long, default_value_t = Limits::default().heartbeat_ms)]
    pub heartbeat_ms: u64,
    /// Shortest election timeout (the longest is 1.25 times this).
    #[arg(long, default_value_t = Limits::default().election_timeout_min_ms)]
    pub election_timeout_min_ms: u64,
    /// Serve Prometheus metrics on http://IP:PORT/metrics (docs/METRICS.md).
    #[arg(long)]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Test hook: while this file exists the log's fdatasync fails with EIO.
    #[arg(long, hide = true)]
    pub fault_log_sync_file: Option<PathBuf>,
}

/// A flag value that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--{}", .0.to_string().replace('_', "-"))]
    Range(#[from] RangeError),
    #[error("--node-id must be at least 1")]
    NodeIdZero,
    #[error("--local-names: {0:?} is not a plain file name (no '/', not '.' or '..')")]
    LocalName(String),
    #[error("--peers: {0:?} is not ID=HOST:PORT (e.g. 2=10.0.0.2:7100)")]
    PeerSyntax(String),
    #[error("--peers: node id {0} appears twice")]
    PeerTwice(u64),
    #[error("--node-id {id} is not in --peers (members: {members})")]
    NotAMember { id: u64, members: String },
    #[error("--listen {0:?} is not an IP:PORT address")]
    Listen(String),
    #[error("--cluster-key-file is required with --peers (create one: head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n' > /etc/seguro-fs/cluster.key)")]
    NoKey,
    #[error("--cluster-key-file {path}: {why}")]
    Key { path: String, why: String },
    #[error("--acks {acks} is more than the {others} other members")]
    TooManyAcks { acks: u64, others: u64 },
    #[error("--{0} only makes sense with --peers")]
    NeedsPeers(&'static str),
}

fn parse_peers(raw: &[String]) -> Result<std::collections::BTreeMap<u64, String>, ConfigError> {
    let mut peers = std::collections::BTreeMap::new();
    for p in raw.iter().filter(|p| !p.is_empty()) {
        let (id, addr) = p
            .split_once('=')
            .ok_or_else(|| ConfigError::PeerSyntax(p.clone()))?;
        let id: u64 = id
            .trim()
            .parse()
            .map_err(|_| ConfigError::PeerSyntax(p.clone()))?;
        let addr = addr.trim();
        let port_ok = addr
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if id == 0 || !port_ok {
            return Err(ConfigError::PeerSyntax(p.clone()));
        }
        if peers.insert(id, addr.to_string()).is_some() {
            return Err(ConfigError::PeerTwice(id));
        }
    }
    Ok(peers)
}

pub fn read_key(
    path: &std::path::Path,
) -> Result<crate::replication::transport::ClusterKey, ConfigError> {
    let err = |why: String| ConfigError::Key {
        path: path.display().to_string(),
        why,
    };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let n = bytes.trim_ascii().len();
    if n < 16 {
        return Err(err(format!(
            "holds {n} bytes; a cluster key needs at least 16"
        )));
    }
    Ok(crate::replication::transport::ClusterKey::from_file_bytes(
        &bytes,
    ))
}

impl MountArgs {
    pub fn into_config(self) -> Result<MountConfig, ConfigError> {
        let limits = Limits {
            entry_bytes_max: self.entry_bytes_max,
            inflight_bytes_max: self.inflight_bytes_max,
            proposals_inflight_max: self.proposals_inflight_max,
            ack_timeout_ms: self.ack_timeout_ms,
            checkpoint_entries: self.checkpoint_entries,
            log_segment_bytes_max: self.log_segment_bytes_max,
            fuse_threads: self.fuse_threads,
            ready_timeout_ms: self.ready_timeout_ms,
            log_keep_entries: self.log_keep_entries,
            heartbeat_ms: self.heartbeat_ms,
            election_timeout_min_ms: self.election_timeout_min_ms,
            ..Limits::default()
        };
        limits.validate()?;
        if self.node_id == 0 {
            return Err(ConfigError::NodeIdZero);
        }
        let local_names: Vec<String> = self
            .local_names
            .into_iter()
            .filter(|n| !n.is_empty())
            .collect();
        if let Some(bad) = local_names
            .iter()
            .find(|n| n.contains('/') || *n == "." || *n == "..")
        {
            return Err(ConfigError::LocalName(bad.clone()));
        }
        let peers = parse_peers(&self.peers)?;
        let (cluster, acks) = if peers.is_empty() {
            if self.listen.is_some() {
                return Err(ConfigError::NeedsPeers("listen"));
            }
            if self.acks.is_some_and(|k| k > 0) {
                return Err(ConfigError::TooManyAcks {
                    acks: self.acks.unwrap_or(0),
                    others: 0,
                });
            }
            (None, 0)
        } else {
            let Some(own) = peers.get(&self.node_id) else {
                return Err(ConfigError::NotAMember {
                    id: self.node_id,
                    members: peers
                        .keys()
                        .map(u64::to_string)
                        .collect::<Vec<_>>()
                        .join(","),
                });
            };
            let listen_raw = self.listen.clone().unwrap_or_else(|| own.clone());
            let listen: std::net::SocketAddr = listen_raw
                .parse()
                .map_err(|_| ConfigError::Listen(listen_raw.clone()))?;
            let key = read_key(self.cluster_key_file.as_deref().ok_or(ConfigError::NoKey)?)?;
            let others = peers.len() as u64 - 1;
            let acks = self
                .acks
                .unwrap_or_else(|| crate::config::default_acks(peers.len() as u64));
            if acks > others {
                return Err(ConfigError::TooManyAcks { acks, others });
            }
            (
                Some(crate::config::ClusterConfig { peers, listen, key }),
                acks,
            )
        };
        Ok(MountConfig {
            data_dir: self.data_dir,
            mountpoint: self.mountpoint,
            node_id: self.node_id,
            local_names,
            allow_other: self.allow_other,
            limits,
            fault_log_sync_file: self.fault_log_sync_file,
            cluster,
            acks,
            metrics_addr: self.metrics_addr,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("seguro-fs").chain(args.iter().copied()))
    }

    fn mount(args: &[&str]) -> Result<MountConfig, ConfigError> {
        let mut all = vec!["mount", "/d", "/m"];
        all.extend_from_slice(args);
        match parse(&all).unwrap().command {
            Command::Mount(m) => m.into_config(),
            _ => unreachable!(),
        }
    }

    #[test]
    fn cluster_flags_are_validated() {
        let dir = std::env::temp_dir().join(format!("seguro-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("key");
        std::fs::write(&key, "0123456789abcdef0123456789abcdef\n").unwrap();
        let short = dir.join("short");
        std::fs::write(&short, "abc").unwrap();
        let k = key.to_str().unwrap();
        let peers = "1=127.0.0.1:7001,2=127.0.0.2:7001,3=127.0.0.3:7001";
        let c = mount(&["--node-id", "2", "--peers", peers, "--cluster-key-file", k]).unwrap();
        assert_eq!(c.acks, 1, "default K is majority - 1");
        assert_eq!(
            c.cluster.as_ref().unwrap().listen.to_string(),
            "127.0.0.2:7001"
        );
        let err = |args: &[&str]| mount(args).unwrap_err().to_string();
        assert!(
            err(&["--node-id", "4", "--peers", peers, "--cluster-key-file", k])
                .contains("not in --peers")
        );
        assert!(err(&["--peers", peers]).contains("--cluster-key-file is required"));
        assert!(err(&[
            "--peers",
            peers,
            "--cluster-key-file",
            short.to_str().unwrap()
        ])
        .contains("at least 16"));
        assert!(
            err(&["--peers", peers, "--cluster-key-file", k, "--acks", "3"])
                .contains("more than the 2 other members")
        );
        assert!(err(&["--peers", "1=nope", "--cluster-key-file", k]).contains("not ID=HOST:PORT"));
        assert!(err(&["--peers", "1=a:1,1=b:2", "--cluster-key-file", k]).contains("appears twice"));
        assert!(err(&["--acks", "1"]).contains("more than the 0 other members"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn mount_defaults() {
        let Command::Mount(m) = parse(&["mount", "/d", "/m"]).unwrap().command else {
            unreachable!()
        };
        let c = m.into_config().unwrap();
        assert_eq!(c.local_names, vec!["lock.mdb".to_string()]);
        assert_eq!(c.node_id, 1);
        assert_eq!(c.limits, Limits::default());
    }

    #[test]
    fn unknown_flag_is_an_error() {
        let e = parse(&["mount", "/d", "/m", "--bogus"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::UnknownArgument);
    }

    #[test]
    fn bad_values_name_the_flag() {
        let e = mount(&["--fuse-threads", "0"]).unwrap_err().to_string();
        assert!(e.starts_with("--fuse-threads = 0 is out of range"), "{e}");
        assert!(matches!(
            mount(&["--local-names", "a/b"]).unwrap_err(),
            ConfigError::LocalName(_)
        ));
    }
}
