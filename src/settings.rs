//! Configuration sources and their precedence. `seguro-fs mount` takes its settings from
//! flags, from a `-o` option string (fstab) and from a TOML config file, which share one
//! set of keys ([`KEYS`]: flag `--ack-timeout-ms` is key `ack_timeout_ms`). Each source
//! fills a [`Layer`] that remembers where every value came from; the command line (flags
//! and `-o`, which may not both give a key) wins over the config file, the file over the
//! built-in defaults. `config_file::resolve` merges the sources and [`finish`] validates
//! the result into a [`MountConfig`], and every
//! error names the key the way its source spells it, with the allowed range.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::config::{default_acks, ClusterConfig, Limits, MountConfig, RangeError, LIMITS};
use crate::datadir::LOG_FILE_NAME;

/// What a key's value is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A non-negative integer.
    Int,
    Bool,
    /// Text checked later (addresses).
    Text,
    Path,
    /// A list of plain file names.
    Names,
    /// Cluster members, each `ID=HOST:PORT`.
    Peers,
}

impl Kind {
    /// The type a value must have, as errors say it.
    pub fn expected(self) -> &'static str {
        match self {
            Kind::Int => "a non-negative integer",
            Kind::Bool => "a boolean (true or false)",
            Kind::Text | Kind::Path => "a string",
            Kind::Names => "an array of file names",
            Kind::Peers => {
                "a table of ID = \"HOST:PORT\" entries (or an array of \"ID=HOST:PORT\" strings)"
            }
        }
    }
}

/// A setting that flags, `-o` and the config file share.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    pub name: &'static str,
    pub kind: Kind,
}

const fn key(name: &'static str, kind: Kind) -> Key {
    Key { name, kind }
}

/// Every shared key but the limits (those are the settable rows of
/// [`crate::config::LIMITS`]: see [`keys`]). `config` (which file to read) is a
/// command-line key only.
pub const KEYS: &[Key] = &[
    key("data_dir", Kind::Path),
    key("mountpoint", Kind::Path),
    key("node_id", Kind::Int),
    key("peers", Kind::Peers),
    key("listen", Kind::Text),
    key("cluster_key_file", Kind::Path),
    key("acks", Kind::Int),
    key("join", Kind::Bool),
    key("local_names", Kind::Names),
    key("allow_other", Kind::Bool),
    key("metrics_addr", Kind::Text),
    key("log_file", Kind::Path),
    key("ship_command", Kind::Text),
    key("ship_user", Kind::Text),
];

/// The key naming the config file (`--config`, `-o config=`).
pub const CONFIG_KEY: &str = "config";

/// Every shared key: [`KEYS`], then the settable limits.
pub fn keys() -> impl Iterator<Item = Key> {
    KEYS.iter().copied().chain(
        crate::config::LIMITS
            .iter()
            .filter(|l| l.settable)
            .map(|l| key(l.name, Kind::Int)),
    )
}

pub fn find_key(name: &str) -> Option<Key> {
    keys().find(|k| k.name == name)
}

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Flag,
    MountOption,
    File(PathBuf),
}

impl Origin {
    /// The key as this source spells it inside a message (after [`Origin::prefix`]).
    fn spell(&self, key: &str) -> String {
        match self {
            Origin::Flag => format!("--{}", key.replace('_', "-")),
            Origin::MountOption | Origin::File(_) => key.to_string(),
        }
    }

    /// What a message about this source starts with.
    fn prefix(&self) -> String {
        match self {
            Origin::Flag => String::new(),
            Origin::MountOption => "-o ".into(),
            Origin::File(p) => format!("config {}: ", p.display()),
        }
    }

    /// The key and its source, standing alone.
    fn describe(&self, key: &str) -> String {
        match self {
            Origin::Flag => self.spell(key),
            Origin::MountOption => format!("-o {key}"),
            Origin::File(p) => format!("{key} in {}", p.display()),
        }
    }
}

/// One setting's value, already of its key's [`Kind`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Int(u64),
    Bool(bool),
    Text(String),
    Path(PathBuf),
    /// Names, or peers as `ID=HOST:PORT` items.
    List(Vec<String>),
}

/// The settings of one precedence level, each with its origin.
#[derive(Debug, Default)]
pub struct Layer {
    values: BTreeMap<&'static str, (Value, Origin)>,
}

impl Layer {
    /// Set `key`, refusing a second value for it at this level.
    pub fn set(
        &mut self,
        key: &'static str,
        value: Value,
        origin: Origin,
    ) -> Result<(), ConfigError> {
        if let Some((_, first)) = self.values.get(key) {
            return Err(ConfigError::new(
                origin,
                Problem::Twice {
                    key,
                    first: first.clone(),
                },
            ));
        }
        self.values.insert(key, (value, origin));
        Ok(())
    }

    /// This layer, with `lower`'s values for the keys it does not set.
    pub fn over(mut self, lower: Layer) -> Layer {
        for (k, v) in lower.values {
            self.values.entry(k).or_insert(v);
        }
        self
    }

    fn origin(&self, key: &str) -> Origin {
        self.values
            .get(key)
            .map_or(Origin::Flag, |(_, o)| o.clone())
    }

    fn value(&self, key: &str) -> Option<&Value> {
        self.values.get(key).map(|(v, _)| v)
    }

    fn int(&self, key: &str) -> Option<u64> {
        match self.value(key) {
            Some(Value::Int(v)) => Some(*v),
            _ => None,
        }
    }

    fn bool(&self, key: &str) -> bool {
        matches!(self.value(key), Some(Value::Bool(true)))
    }

    fn text(&self, key: &str) -> Option<String> {
        match self.value(key) {
            Some(Value::Text(v)) => Some(v.clone()),
            _ => None,
        }
    }

    pub fn path(&self, key: &str) -> Option<PathBuf> {
        match self.value(key) {
            Some(Value::Path(v)) => Some(v.clone()),
            _ => None,
        }
    }

    fn list(&self, key: &str) -> Option<Vec<String>> {
        match self.value(key) {
            Some(Value::List(v)) => Some(v.clone()),
            _ => None,
        }
    }
}

/// What is wrong with a setting.
#[derive(Debug)]
pub enum Problem {
    Range(RangeError),
    NodeIdZero,
    LocalName(String),
    PeerSyntax(String),
    PeerTwice(u64),
    NotAMember {
        id: u64,
        members: String,
    },
    Address {
        key: &'static str,
        value: String,
    },
    NoKey,
    Key {
        path: String,
        why: String,
    },
    TooManyAcks {
        acks: u64,
        others: u64,
    },
    NeedsPeers(&'static str),
    Missing(&'static str),
    Twice {
        key: &'static str,
        first: Origin,
    },
    // The `-o` string.
    UnknownOption(String),
    ReadOnly,
    BadValue {
        key: &'static str,
        value: String,
        expected: &'static str,
    },
    NoValue(&'static str),
    LoosePeer(String),
    // The config file.
    Read(String),
    Syntax(String),
    UnknownKey(String),
    WrongType {
        key: String,
        expected: &'static str,
        found: String,
    },
}

/// A setting that cannot be used, and where it came from.
#[derive(Debug)]
pub struct ConfigError {
    origin: Origin,
    problem: Problem,
}

impl ConfigError {
    pub fn new(origin: Origin, problem: Problem) -> ConfigError {
        ConfigError { origin, problem }
    }
}

impl std::error::Error for ConfigError {}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.origin;
        let n = |k: &str| o.spell(k);
        let pre = o.prefix();
        match &self.problem {
            Problem::Range(e) => write!(
                f,
                "{pre}{} = {} is out of range: allowed {}..={}",
                n(e.name),
                e.value,
                e.min,
                e.max
            ),
            Problem::NodeIdZero => write!(f, "{pre}{} must be at least 1", n("node_id")),
            Problem::LocalName(name) => write!(
                f,
                "{pre}{}: {name:?} is not a plain file name (no '/', not '.' or '..')",
                n("local_names")
            ),
            Problem::PeerSyntax(p) => write!(
                f,
                "{pre}{}: {p:?} is not ID=HOST:PORT (e.g. 2=10.0.0.2:7100)",
                n("peers")
            ),
            Problem::PeerTwice(id) => {
                write!(f, "{pre}{}: node id {id} appears twice", n("peers"))
            }
            Problem::NotAMember { id, members } => write!(
                f,
                "{pre}{} {id} is not in {} (members: {members})",
                n("node_id"),
                n("peers")
            ),
            Problem::Address { key, value } => {
                write!(f, "{pre}{} {value:?} is not an IP:PORT address", n(key))
            }
            Problem::NoKey => write!(
                f,
                "{pre}{} is required with {} (create one: head -c 32 /dev/urandom | od -An -tx1 \
                 | tr -d ' \\n' > /etc/seguro-fs/cluster.key)",
                n("cluster_key_file"),
                n("peers")
            ),
            Problem::Key { path, why } => {
                write!(f, "{pre}{} {path}: {why}", n("cluster_key_file"))
            }
            Problem::TooManyAcks { acks, others } => write!(
                f,
                "{pre}{} {acks} is more than the {others} other members",
                n("acks")
            ),
            Problem::NeedsPeers(k) => {
                write!(f, "{pre}{} only makes sense with {}", n(k), n("peers"))
            }
            Problem::Missing(k) => write!(
                f,
                "no {}: give it on the command line (seguro-fs mount DATA_DIR MOUNTPOINT) or \
                 as {k} in the config file (--config FILE)",
                k.replace('_', " ")
            ),
            Problem::Twice { key, first } => write!(
                f,
                "{key} is given twice on the command line ({} and {}); keep one",
                first.describe(key),
                o.describe(key)
            ),
            Problem::UnknownOption(opt) => write!(
                f,
                "unknown mount option {opt:?}: seguro-fs takes {}, {CONFIG_KEY}, and the generic \
                 mount options listed in docs/CONFIGURATION.md (mount -s ignores unknown ones)",
                keys().map(|k| k.name).collect::<Vec<_>>().join(", ")
            ),
            Problem::ReadOnly => write!(
                f,
                "mount option \"ro\" is not supported: a seguro-fs mount is writable on the \
                 leader by design (a follower answers writes with EROFS until it leads); \
                 remove ro"
            ),
            Problem::BadValue {
                key,
                value,
                expected,
            } => write!(f, "{pre}{key}={value}: expected {expected}"),
            Problem::NoValue(key) => write!(f, "{pre}{key} needs a value ({key}=...)"),
            Problem::LoosePeer(item) => write!(
                f,
                "mount option {item:?} looks like a member of a peers list, but no peers=... \
                 comes right before it (write peers=1=HOST:PORT,2=HOST:PORT,...)"
            ),
            Problem::Read(why) => write!(f, "{pre}cannot read the config file: {why}"),
            Problem::Syntax(why) => write!(f, "{pre}not valid TOML: {why}"),
            Problem::UnknownKey(k) => write!(
                f,
                "{pre}unknown key {k:?}: the keys are {}",
                keys().map(|k| k.name).collect::<Vec<_>>().join(", ")
            ),
            Problem::WrongType {
                key,
                expected,
                found,
            } => write!(
                f,
                "{pre}{key} has the wrong type: expected {expected}, found {found}"
            ),
        }
    }
}

/// Validate merged settings (the command line over the config file, `config_file::resolve`)
/// over the built-in defaults.
pub fn finish(merged: Layer) -> Result<MountConfig, ConfigError> {
    validate(&merged.over(built_in_defaults()))
}

/// Defaults that depend on the host rather than being constants: a root daemon serves
/// every local user (`allow_other`), as bindfs does; the kernel then checks modes and
/// owners (`default_permissions`), which are the callers' own. (The origin is never shown:
/// a boolean has no range to violate.)
fn built_in_defaults() -> Layer {
    let mut d = Layer::default();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    d.values
        .insert("allow_other", (Value::Bool(root), Origin::Flag));
    d
}

fn parse_peers(
    raw: &[String],
    err: &dyn Fn(Problem) -> ConfigError,
) -> Result<BTreeMap<u64, String>, ConfigError> {
    let mut peers = BTreeMap::new();
    for p in raw.iter().filter(|p| !p.is_empty()) {
        let syntax = || err(Problem::PeerSyntax(p.clone()));
        let (id, addr) = p.split_once('=').ok_or_else(syntax)?;
        let id: u64 = id.trim().parse().map_err(|_| syntax())?;
        let addr = addr.trim();
        let port_ok = addr
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if id == 0 || !port_ok {
            return Err(syntax());
        }
        if peers.insert(id, addr.to_string()).is_some() {
            return Err(err(Problem::PeerTwice(id)));
        }
    }
    Ok(peers)
}

pub fn read_key(path: &Path) -> Result<crate::replication::transport::ClusterKey, Problem> {
    let err = |why: String| Problem::Key {
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

/// The key of a `--cluster-key-file` flag outside `mount` (`restore`, `rekey`), with
/// the flag's error message.
pub fn key_flag(path: &Path) -> Result<crate::replication::transport::ClusterKey, String> {
    read_key(path).map_err(|p| match p {
        Problem::Key { path, why } => format!("--cluster-key-file {path}: {why}"),
        other => format!("--cluster-key-file: {other:?}"),
    })
}

fn validate(m: &Layer) -> Result<MountConfig, ConfigError> {
    let err = |key: &str, problem: Problem| ConfigError::new(m.origin(key), problem);
    let int = |key: &str, default: u64| m.int(key).unwrap_or(default);
    let mut limits = Limits::default();
    for spec in LIMITS.iter().filter(|l| l.settable) {
        if let Some(v) = m.int(spec.name) {
            limits
                .set(spec.name, v)
                .map_err(|e| err(e.name, Problem::Range(e)))?;
        }
    }
    limits
        .validate()
        .map_err(|e| err(e.name, Problem::Range(e)))?;

    let data_dir = m
        .path("data_dir")
        .ok_or_else(|| err("data_dir", Problem::Missing("data_dir")))?;
    let mountpoint = m
        .path("mountpoint")
        .ok_or_else(|| err("mountpoint", Problem::Missing("mountpoint")))?;
    let node_id = int("node_id", 1);
    if node_id == 0 {
        return Err(err("node_id", Problem::NodeIdZero));
    }
    let local_names: Vec<String> = m
        .list("local_names")
        .unwrap_or_else(|| vec!["lock.mdb".into()])
        .into_iter()
        .filter(|n| !n.is_empty())
        .collect();
    if let Some(bad) = local_names
        .iter()
        .find(|n| n.contains('/') || *n == "." || *n == "..")
    {
        return Err(err("local_names", Problem::LocalName(bad.clone())));
    }
    let metrics_addr = match m.text("metrics_addr") {
        None => None,
        Some(raw) => Some(raw.parse().map_err(|_| {
            err(
                "metrics_addr",
                Problem::Address {
                    key: "metrics_addr",
                    value: raw.clone(),
                },
            )
        })?),
    };
    let peers = parse_peers(&m.list("peers").unwrap_or_default(), &|p| err("peers", p))?;
    let join = m.bool("join");
    let acks_given = m.int("acks");
    let (cluster, acks) = if peers.is_empty() {
        if m.text("listen").is_some() {
            return Err(err("listen", Problem::NeedsPeers("listen")));
        }
        if join {
            // Without peers there is no listener, so no cluster could ever add this node.
            return Err(err("join", Problem::NeedsPeers("join")));
        }
        if let Some(acks) = acks_given.filter(|k| *k > 0) {
            return Err(err("acks", Problem::TooManyAcks { acks, others: 0 }));
        }
        (None, 0)
    } else {
        let Some(own) = peers.get(&node_id) else {
            return Err(err(
                "node_id",
                Problem::NotAMember {
                    id: node_id,
                    members: peers
                        .keys()
                        .map(u64::to_string)
                        .collect::<Vec<_>>()
                        .join(","),
                },
            ));
        };
        let listen_raw = m.text("listen").unwrap_or_else(|| own.clone());
        let listen: std::net::SocketAddr = listen_raw.parse().map_err(|_| {
            err(
                "listen",
                Problem::Address {
                    key: "listen",
                    value: listen_raw.clone(),
                },
            )
        })?;
        let key_file = m
            .path("cluster_key_file")
            .ok_or_else(|| err("peers", Problem::NoKey))?;
        let key = read_key(&key_file).map_err(|p| err("cluster_key_file", p))?;
        let others = peers.len() as u64 - 1;
        let acks = acks_given.unwrap_or_else(|| default_acks(peers.len() as u64));
        if acks > others {
            return Err(err("acks", Problem::TooManyAcks { acks, others }));
        }
        (Some(ClusterConfig { peers, listen, key }), acks)
    };
    let log_file = m
        .path("log_file")
        .unwrap_or_else(|| data_dir.join(LOG_FILE_NAME));
    Ok(MountConfig {
        data_dir,
        mountpoint,
        node_id,
        local_names,
        allow_other: m.bool("allow_other"),
        ship_command: m.text("ship_command").filter(|c| !c.trim().is_empty()),
        ship_user: m.text("ship_user").filter(|u| !u.is_empty()),
        limits,
        fault_log_sync_file: m.path("fault_log_sync_file"),
        cluster,
        acks,
        join,
        metrics_addr,
        log_file,
    })
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A valid standalone config for `data_dir` and `mountpoint`.
    pub fn standalone(data_dir: &Path, mountpoint: &Path) -> MountConfig {
        let mut l = Layer::default();
        l.set("data_dir", Value::Path(data_dir.into()), Origin::Flag)
            .unwrap();
        l.set("mountpoint", Value::Path(mountpoint.into()), Origin::Flag)
            .unwrap();
        finish(l).unwrap()
    }
}
