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

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Mount DATA_DIR's tree on MOUNTPOINT and serve it in the foreground until unmounted,
    /// SIGINT or SIGTERM.
    Mount(MountArgs),
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
        Ok(MountConfig {
            data_dir: self.data_dir,
            mountpoint: self.mountpoint,
            node_id: self.node_id,
            local_names,
            allow_other: self.allow_other,
            limits,
            fault_log_sync_file: self.fault_log_sync_file,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("seguro-fs").chain(args.iter().copied()))
    }

    #[test]
    fn mount_defaults() {
        let Command::Mount(m) = parse(&["mount", "/d", "/m"]).unwrap().command;
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
        let Command::Mount(m) = parse(&["mount", "/d", "/m", "--fuse-threads", "0"])
            .unwrap()
            .command;
        let e = m.into_config().unwrap_err().to_string();
        assert!(e.starts_with("--fuse-threads = 0 is out of range"), "{e}");
        let Command::Mount(m) = parse(&["mount", "/d", "/m", "--local-names", "a/b"])
            .unwrap()
            .command;
        assert!(matches!(
            m.into_config().unwrap_err(),
            ConfigError::LocalName(_)
        ));
    }
}
