//! Command-line flags (clap), the mount.fuse3 calling form, and the translation of the
//! `mount` flags into the command-line layer of settings (see `settings.rs`).

use std::ffi::OsString;
use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, Parser, Subcommand};

use crate::config::{MountConfig, LIMITS};
use crate::settings::{ConfigError, Layer, Origin, Value, CONFIG_KEY};

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
    /// Mount DATA_DIR's tree on MOUNTPOINT and serve it until unmounted, SIGINT or SIGTERM
    /// (in the foreground unless --background).
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
    /// After the cluster key file was replaced: make the stopped node's data dir accept
    /// the new key, keeping its log and tree (run on every member, all stopped).
    Rekey(RekeyArgs),
    /// Copy an existing pier's .urb/log (urbit stopped) into a new data dir as its first
    /// committed state, verified with blake3; the source is left as it was. In a cluster,
    /// import on one member only: the others start empty and catch up.
    Import(ImportArgs),
    /// Write man pages and shell completions (used by packaging/build).
    #[command(hide = true)]
    GenerateAssets(GenerateAssetsArgs),
    /// Internal: the process between the daemon and its ship (see src/ship.rs).
    #[command(hide = true)]
    ShipGuard,
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
    /// A directory that does not exist yet or is empty (or, with --update, holds an older
    /// copy of the tree).
    pub dest: PathBuf,
    /// Bring a non-empty DEST, an older copy of the tree, up to date: only the 1 MiB
    /// chunks it lacks are fetched, the new tree is built beside it and renamed over it.
    #[arg(long)]
    pub update: bool,
}

#[derive(Debug, Args)]
pub struct RekeyArgs {
    /// The data dir of a stopped node.
    pub data_dir: PathBuf,
    /// The cluster's new key file.
    #[arg(long)]
    pub cluster_key_file: PathBuf,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The pier's event log directory (PIER/.urb/log), with urbit stopped.
    pub pier_log_dir: PathBuf,
    /// A new (or empty) data dir for this node.
    pub data_dir: PathBuf,
    /// This node's id, as it will be mounted.
    #[arg(long, default_value_t = 1)]
    pub node_id: u64,
    /// The cluster's members, ID=HOST:PORT, as every member will be started (none:
    /// standalone).
    #[arg(long, value_delimiter = ',')]
    pub peers: Vec<String>,
    /// The cluster's key file (required with --peers).
    #[arg(long)]
    pub cluster_key_file: Option<PathBuf>,
    /// Host-local names left out of the copy (LMDB makes them again).
    #[arg(long, value_delimiter = ',', default_value = "lock.mdb")]
    pub local_names: Vec<String>,
}

impl ImportArgs {
    /// The node this data dir is for, validated as `mount` validates it (the pier log dir
    /// stands in for the mountpoint, which an import does not use).
    pub fn into_config(self) -> Result<MountConfig, ConfigError> {
        let mut layer = Layer::default();
        let flag = Origin::Flag;
        layer.set("data_dir", Value::Path(self.data_dir), flag.clone())?;
        layer.set("mountpoint", Value::Path(self.pier_log_dir), flag.clone())?;
        layer.set("node_id", Value::Int(self.node_id), flag.clone())?;
        layer.set("local_names", Value::List(self.local_names), flag.clone())?;
        if !self.peers.is_empty() {
            layer.set("peers", Value::List(self.peers), flag.clone())?;
        }
        if let Some(k) = self.cluster_key_file {
            layer.set("cluster_key_file", Value::Path(k), flag)?;
        }
        crate::config_file::resolve(layer)
    }
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
    /// The node's data directory (created if missing): raft/ log, tree/, local/. Or
    /// data_dir in the config file.
    pub data_dir: Option<PathBuf>,
    /// An existing, empty directory (e.g. a pier's .urb/log). Or mountpoint in the config
    /// file.
    pub mountpoint: Option<PathBuf>,
    /// TOML file with the same keys as these flags (node_id, [peers], ack_timeout_ms, …);
    /// flags and -o override it. See docs/CONFIGURATION.md.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Mount options as in fstab: KEY=VALUE,… with the config file's keys
    /// (peers=1=H:P,2=H:P continues across commas), config=FILE, and generic mount options
    /// (rw, _netdev, noatime, x-*, …), which are ignored.
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Ignore unknown -o options instead of refusing them (mount -s).
    #[arg(long)]
    pub sloppy: bool,
    /// Detach once mounted: the command returns 0 when the file system is up, or prints
    /// the daemon's error and returns 1; the daemon logs to --log-file.
    #[arg(long)]
    pub background: bool,
    /// Validate the configuration and exit without mounting (mount -f).
    #[arg(long)]
    pub check: bool,
    /// Where a --background daemon appends its output (default: DATA_DIR/seguro-fs.log).
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
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
    /// Never initialise a new cluster, even as the lowest id: a new node waits to be added
    /// by `seguro-fs members add`.
    #[arg(long)]
    pub join: bool,
    /// Comma-separated file names kept per host in DATA_DIR/local and never replicated.
    #[arg(long, value_delimiter = ',', default_value = "lock.mdb")]
    pub local_names: Vec<String>,
    /// Allow other users to access the mount (needs user_allow_other in /etc/fuse.conf
    /// unless running as root). Default: true when running as root, false otherwise;
    /// `--allow-other=false` turns it off.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub allow_other: Option<bool>,
    /// Address (IP:PORT) of the metrics endpoint (default: none).
    #[arg(long, value_name = "IP:PORT")]
    pub metrics_addr: Option<String>,
    /// Run the ship on this node while it is the writable leader: a command for
    /// /bin/sh -c (e.g. "urbit -t /srv/zod"), started in the mountpoint with
    /// SEGURO_MOUNTPOINT, SEGURO_NODE_ID and SEGURO_TERM set. See docs/OPERATIONS.md.
    #[arg(long, value_name = "CMD")]
    pub ship_command: Option<String>,
    /// Run the ship as this user and its groups (default: the daemon's user).
    #[arg(long, value_name = "USER")]
    pub ship_user: Option<String>,
    /// Every settable limit of the table in config.rs, as `--NAME-WITH-DASHES N`.
    #[command(flatten)]
    pub limits: LimitFlags,
    /// Test hook: while this file exists the log's fdatasync fails with EIO (ENOSPC if
    /// the file starts with `ENOSPC`), after `delay-ms=N` milliseconds if it says so.
    #[arg(long, hide = true)]
    pub fault_log_sync_file: Option<PathBuf>,
}

/// `seguro-fs generate-assets` (`assets.rs` writes them).
#[derive(Debug, Args)]
pub struct GenerateAssetsArgs {
    /// Directory to write man/ and completions/ into (created if missing).
    #[arg(long)]
    pub out: PathBuf,
}

/// The `mount` flags of the settable limits, made from [`LIMITS`]: `--entry-bytes-max`
/// for `entry_bytes_max`, with the row's doc as help and its default shown. Only values
/// given on the command line are kept (the others come from the config file or defaults).
#[derive(Debug, Clone, Default)]
pub struct LimitFlags {
    pub given: Vec<(&'static str, u64)>,
}

impl clap::FromArgMatches for LimitFlags {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let mut flags = LimitFlags::default();
        flags.update_from_arg_matches(m)?;
        Ok(flags)
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        for spec in LIMITS.iter().filter(|l| l.settable) {
            if m.value_source(spec.name) == Some(ValueSource::CommandLine) {
                if let Some(v) = m.get_one::<u64>(spec.name) {
                    self.given.push((spec.name, *v));
                }
            }
        }
        Ok(())
    }
}

impl Args for LimitFlags {
    fn augment_args(mut cmd: clap::Command) -> clap::Command {
        for spec in LIMITS.iter().filter(|l| l.settable) {
            let doc = spec.doc.split_whitespace().collect::<Vec<_>>().join(" ");
            let short = doc.split(". ").next().unwrap_or(&doc).trim_end_matches('.');
            cmd = cmd.arg(
                clap::Arg::new(spec.name)
                    .long(spec.name.replace('_', "-"))
                    .value_name("N")
                    .value_parser(clap::value_parser!(u64))
                    .default_value(spec.default.to_string())
                    .help(format!("{short}."))
                    .long_help(doc),
            );
        }
        cmd
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

/// `seguro-fs SOURCE MOUNTPOINT -o OPTIONS`, as mount.fuse3 runs it for fstab type
/// `fuse.seguro-fs`, becomes `seguro-fs mount --background SOURCE MOUNTPOINT -o OPTIONS`.
/// SOURCE must contain a '/' (fstab sources are absolute paths), so a mistyped subcommand
/// is still reported as one.
pub fn mount_fuse3_form(mut args: Vec<OsString>) -> Vec<OsString> {
    let Some(first) = args.get(1).and_then(|a| a.to_str()) else {
        return args;
    };
    let subcommand = Cli::command()
        .get_subcommands()
        .any(|s| s.get_name() == first || s.get_all_aliases().any(|a| a == first));
    if first.contains('/') && !first.starts_with('-') && !subcommand {
        args.splice(1..1, ["mount".into(), "--background".into()]);
    }
    args
}

impl MountArgs {
    /// Validate the flags, the `-o` strings and the config file they name into one config.
    /// `matches` (this subcommand's) tells which flags were given rather than defaulted.
    pub fn into_config(self, matches: &ArgMatches) -> Result<MountConfig, ConfigError> {
        let given = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
        let mut layer = Layer::default();
        let mut put = |key: &'static str, value: Value| match given(key) {
            true => layer.set(key, value, Origin::Flag),
            false => Ok(()),
        };
        let path = |p: Option<PathBuf>| Value::Path(p.unwrap_or_default());
        put("data_dir", path(self.data_dir))?;
        put("mountpoint", path(self.mountpoint))?;
        put(CONFIG_KEY, path(self.config))?;
        put("log_file", path(self.log_file))?;
        put("node_id", Value::Int(self.node_id))?;
        put("peers", Value::List(self.peers))?;
        put("listen", Value::Text(self.listen.unwrap_or_default()))?;
        put("cluster_key_file", path(self.cluster_key_file))?;
        put("acks", Value::Int(self.acks.unwrap_or_default()))?;
        put("join", Value::Bool(self.join))?;
        put("local_names", Value::List(self.local_names))?;
        put("allow_other", Value::Bool(self.allow_other.unwrap_or(true)))?;
        put(
            "metrics_addr",
            Value::Text(self.metrics_addr.unwrap_or_default()),
        )?;
        put(
            "ship_command",
            Value::Text(self.ship_command.unwrap_or_default()),
        )?;
        put("ship_user", Value::Text(self.ship_user.unwrap_or_default()))?;
        put("fault_log_sync_file", path(self.fault_log_sync_file))?;
        for (name, value) in self.limits.given {
            layer.set(name, Value::Int(value), Origin::Flag)?;
        }
        for opts in &self.options {
            crate::mount_options::parse(opts, self.sloppy, &mut layer)?;
        }
        crate::config_file::resolve(layer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::FromArgMatches;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("seguro-fs").chain(args.iter().copied()))
    }

    /// `seguro-fs mount ARGS…` (no positionals added) as main.rs runs it.
    fn mount_raw(args: &[&str]) -> Result<MountConfig, String> {
        let all = ["seguro-fs", "mount"].iter().chain(args).copied();
        let matches = Cli::command().try_get_matches_from(all).unwrap();
        let Command::Mount(m) = Cli::from_arg_matches(&matches).unwrap().command else {
            unreachable!()
        };
        m.into_config(matches.subcommand_matches("mount").unwrap())
            .map_err(|e| e.to_string())
    }

    fn mount(args: &[&str]) -> Result<MountConfig, String> {
        let mut all = vec!["/d", "/m"];
        all.extend_from_slice(args);
        mount_raw(&all)
    }

    #[test]
    fn cluster_flags_are_validated() {
        let dir = crate::sync::tests::TempDir::new("cli");
        let key = dir.path().join("key");
        std::fs::write(&key, "0123456789abcdef0123456789abcdef\n").unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, "abc").unwrap();
        let k = key.to_str().unwrap();
        let peers = "1=127.0.0.1:7001,2=127.0.0.2:7001,3=127.0.0.3:7001";
        let c = mount(&["--node-id", "2", "--peers", peers, "--cluster-key-file", k]).unwrap();
        assert_eq!(c.acks, 1, "default K is majority - 1");
        assert!(!c.join);
        assert_eq!(
            c.cluster.as_ref().unwrap().listen.to_string(),
            "127.0.0.2:7001"
        );
        let c = mount(&["--peers", peers, "--cluster-key-file", k, "--join"]).unwrap();
        assert!(c.join);
        let err = |args: &[&str]| mount(args).unwrap_err();
        assert_eq!(
            err(&["--node-id", "4", "--peers", peers, "--cluster-key-file", k]),
            "--node-id 4 is not in --peers (members: 1,2,3)"
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
        assert_eq!(err(&["--join"]), "--join only makes sense with --peers");
    }

    #[test]
    fn mount_defaults() {
        let c = mount(&[]).unwrap();
        assert_eq!(c.local_names, vec!["lock.mdb".to_string()]);
        assert_eq!(c.node_id, 1);
        assert_eq!(c.limits, crate::config::Limits::default());
        assert!(!c.join);
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            c.allow_other,
            unsafe { libc::geteuid() } == 0,
            "on for root only"
        );
        assert!(mount(&["--allow-other"]).unwrap().allow_other);
        assert!(!mount(&["--allow-other=false"]).unwrap().allow_other);
        assert_eq!(c.metrics_addr, None);
        assert_eq!(c.log_file, std::path::Path::new("/d/seguro-fs.log"));
    }

    #[test]
    fn metrics_addr_is_parsed_standalone() {
        let c = mount(&["--metrics-addr", "127.0.0.1:9100"]).unwrap();
        assert_eq!(c.metrics_addr, Some("127.0.0.1:9100".parse().unwrap()));
        assert_eq!(
            mount(&["--metrics-addr", "127.0.0.1"]).unwrap_err(),
            "--metrics-addr \"127.0.0.1\" is not an IP:PORT address"
        );
    }

    #[test]
    fn unknown_flag_is_an_error() {
        let e = parse(&["mount", "/d", "/m", "--bogus"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::UnknownArgument);
    }

    #[test]
    fn bad_values_name_the_flag() {
        let e = mount(&["--fuse-threads", "0"]).unwrap_err();
        assert!(e.starts_with("--fuse-threads = 0 is out of range"), "{e}");
        assert!(mount(&["--local-names", "a/b"])
            .unwrap_err()
            .contains("is not a plain file name"));
    }

    #[test]
    fn options_and_flags_combine_but_may_not_repeat() {
        let c = mount(&["-o", "rw,fuse_threads=3,_netdev", "--ack-timeout-ms", "500"]).unwrap();
        assert_eq!(c.limits.fuse_threads, 3);
        assert_eq!(c.limits.ack_timeout_ms, 500);
        assert_eq!(
            mount(&["-o", "fuse_threads=3", "--fuse-threads", "2"]).unwrap_err(),
            "fuse_threads is given twice on the command line (--fuse-threads and -o \
             fuse_threads); keep one"
        );
        assert!(mount(&["-o", "data_dir=/x"])
            .unwrap_err()
            .starts_with("data_dir is given twice"));
        assert!(mount(&["-o", "bogus"])
            .unwrap_err()
            .starts_with("unknown mount option \"bogus\""));
        assert!(mount_raw(&["/d"])
            .unwrap_err()
            .starts_with("no mountpoint: "));
    }

    #[test]
    fn flags_override_the_config_file() {
        let dir = crate::sync::tests::TempDir::new("cli");
        let f = dir.path().join("c.toml");
        std::fs::write(
            &f,
            "data_dir = \"/from-file\"\nmountpoint = \"/mp\"\nfuse_threads = 7\nheartbeat_ms = 100\n",
        )
        .unwrap();
        let file = f.to_str().unwrap();
        let c = mount_raw(&["--config", file, "--fuse-threads", "2"]).unwrap();
        assert_eq!(c.data_dir, std::path::Path::new("/from-file"));
        assert_eq!(c.limits.fuse_threads, 2);
        assert_eq!(c.limits.heartbeat_ms, 100);
        let c = mount_raw(&[
            "/d",
            "-o",
            &format!("config={file},heartbeat_ms=50,election_timeout_min_ms=200"),
        ])
        .unwrap();
        assert_eq!(c.data_dir, std::path::Path::new("/d"));
        assert_eq!(c.limits.heartbeat_ms, 50);
        assert_eq!(c.limits.fuse_threads, 7);
        assert!(
            mount_raw(&["--config", file, "-o", &format!("config={file}")])
                .unwrap_err()
                .starts_with("config is given twice")
        );
    }

    #[test]
    fn mount_fuse3_form_means_background_mount() {
        let os = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            mount_fuse3_form(os(&["seguro-fs", "/data", "/mp", "-o", "rw"])),
            os(&[
                "seguro-fs",
                "mount",
                "--background",
                "/data",
                "/mp",
                "-o",
                "rw"
            ])
        );
        for unchanged in [
            &["seguro-fs", "mount", "/d", "/m"][..],
            &["seguro-fs", "status", "/d"],
            &["seguro-fs", "--help"],
            &["seguro-fs", "mnt", "/d"],
            &["seguro-fs"],
        ] {
            assert_eq!(mount_fuse3_form(os(unchanged)), os(unchanged));
        }
    }

    /// docs/CONFIGURATION.md documents every limit, every mount flag and every key, so the
    /// reference cannot fall behind the code: each limit's row names its key (and flag,
    /// if settable) and states the table's default and maximum.
    #[test]
    fn configuration_doc_covers_every_option() {
        let doc = include_str!("../docs/CONFIGURATION.md");
        let mut missing: Vec<String> = Vec::new();
        for spec in LIMITS {
            // A limit's row has its key in the second column.
            let key = format!("`{}`", spec.name);
            let Some(row) = doc.lines().find(|l| {
                l.split('|')
                    .nth(2)
                    .is_some_and(|c| c.trim().starts_with(&key))
            }) else {
                missing.push(format!("a row for {}", spec.name));
                continue;
            };
            let flag = format!("`--{}`", spec.name.replace('_', "-"));
            if spec.settable != row.contains(&flag) {
                missing.push(format!(
                    "{}: flag {flag} shown iff settable: {row}",
                    spec.name
                ));
            }
            for (what, n) in [("default", spec.default), ("maximum", spec.max)] {
                if !row.contains(&n.to_string()) {
                    missing.push(format!("{}: its {what} {n}: {row}", spec.name));
                }
            }
        }
        let cmd = Cli::command();
        let mount = cmd.find_subcommand("mount").unwrap();
        for arg in mount.get_arguments().filter(|a| !a.is_hide_set()) {
            let flag = match (arg.get_long(), arg.get_short()) {
                (Some(l), _) => format!("--{l}"),
                (None, Some(s)) => format!("-{s}"),
                (None, None) => arg.get_id().as_str().to_uppercase(),
            };
            if !doc.contains(&format!("`{flag}")) {
                missing.push(flag);
            }
        }
        for key in crate::settings::keys() {
            if !doc.contains(&format!("`{}`", key.name)) {
                missing.push(key.name.into());
            }
        }
        assert!(
            missing.is_empty(),
            "docs/CONFIGURATION.md lacks: {missing:#?}"
        );
    }
}
