//! The `-o` option string of `seguro-fs mount`, as fstab, mount(8) and mount.fuse3 pass it:
//! comma-separated `KEY=VALUE` items with the config file's keys, generic mount options
//! that mean nothing to seguro-fs (accepted and ignored), and a `peers=` list that goes on
//! across commas (`peers=1=10.0.0.1:7100,2=10.0.0.2:7100`).

use crate::settings::{find_key, ConfigError, Kind, Layer, Origin, Problem, Value, CONFIG_KEY};

/// Generic options that mount(8) or mount.fuse3 pass to (or leave in the options of) a
/// helper. A FUSE mount by seguro-fs is always `nodev,nosuid`; the access-time options do
/// not apply (the tree keeps the times the application sets); `user`, `_netdev`, `nofail`
/// and the like are for mount(8) and systemd, not for the file system.
const IGNORED: &[&str] = &[
    "defaults",
    "rw",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "owner",
    "group",
    "_netdev",
    "nofail",
    "dev",
    "nodev",
    "suid",
    "nosuid",
    "exec",
    "noexec",
    "atime",
    "noatime",
    "relatime",
    "norelatime",
    "strictatime",
    "nostrictatime",
    "diratime",
    "nodiratime",
    "lazytime",
    "nolazytime",
];

fn ignored(item: &str, key: &str) -> bool {
    IGNORED.contains(&item) || key.starts_with("x-") || key == "comment"
}

/// Add the settings of one `-o` string to `layer` (the command line's). With `sloppy`
/// (mount -s) an unknown option is skipped with a warning instead of refused.
pub fn parse(opts: &str, sloppy: bool, layer: &mut Layer) -> Result<(), ConfigError> {
    let err = |p: Problem| ConfigError::new(Origin::MountOption, p);
    // The peers list being collected: items like `2=10.0.0.2:7100` continue it.
    let mut peers: Option<Vec<String>> = None;
    for item in opts.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (key, value) = match item.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (item, None),
        };
        if !key.is_empty() && key.bytes().all(|b| b.is_ascii_digit()) {
            match peers.as_mut() {
                Some(list) => list.push(item.to_string()),
                None => return Err(err(Problem::LoosePeer(item.into()))),
            }
            continue;
        }
        if let Some(list) = peers.take() {
            layer.set("peers", Value::List(list), Origin::MountOption)?;
        }
        if ignored(item, key) {
            continue;
        }
        if item == "ro" {
            return Err(err(Problem::ReadOnly));
        }
        if key == CONFIG_KEY {
            let path = value.filter(|v| !v.is_empty());
            let path = path.ok_or_else(|| err(Problem::NoValue(CONFIG_KEY)))?;
            layer.set(CONFIG_KEY, Value::Path(path.into()), Origin::MountOption)?;
            continue;
        }
        let Some(k) = find_key(key) else {
            if sloppy {
                tracing::warn!(option = item, "ignoring an unknown mount option (sloppy)");
                continue;
            }
            return Err(err(Problem::UnknownOption(item.into())));
        };
        let bad = |v: &str| {
            err(Problem::BadValue {
                key: k.name,
                value: v.into(),
                expected: k.kind.expected(),
            })
        };
        let needed = || err(Problem::NoValue(k.name));
        let parsed = match (k.kind, value) {
            (Kind::Bool, None) => Value::Bool(true),
            (Kind::Bool, Some("true" | "yes" | "1")) => Value::Bool(true),
            (Kind::Bool, Some("false" | "no" | "0")) => Value::Bool(false),
            (Kind::Bool, Some(v)) => return Err(bad(v)),
            (_, None | Some("")) => return Err(needed()),
            (Kind::Int, Some(v)) => Value::Int(v.parse().map_err(|_| bad(v))?),
            (Kind::Text, Some(v)) => Value::Text(v.into()),
            (Kind::Path, Some(v)) => Value::Path(v.into()),
            // Commas separate options, so -o lists names with ':'.
            (Kind::Names, Some(v)) => Value::List(v.split(':').map(String::from).collect()),
            (Kind::Peers, Some(v)) => {
                peers = Some(vec![v.to_string()]);
                continue;
            }
        };
        layer.set(k.name, parsed, Origin::MountOption)?;
    }
    if let Some(list) = peers {
        layer.set("peers", Value::List(list), Origin::MountOption)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(opts: &str) -> Result<Layer, String> {
        let mut l = Layer::default();
        parse(opts, false, &mut l).map_err(|e| e.to_string())?;
        Ok(l)
    }

    fn config(opts: &str) -> Result<crate::config::MountConfig, String> {
        let l = layer(&format!("data_dir=/d,mountpoint=/m,{opts}"))?;
        crate::config_file::resolve(l).map_err(|e| e.to_string())
    }

    #[test]
    fn peers_continue_across_commas() {
        let dir = crate::sync::tests::TempDir::new("mount-options");
        let key = dir.path().join("key");
        std::fs::write(&key, "0123456789abcdef0123456789abcdef").unwrap();
        let c = config(&format!(
            "node_id=2,peers=1=127.0.0.1:7100,2=127.0.0.2:7100,3=127.0.0.3:7100,acks=2,\
             cluster_key_file={}",
            key.display()
        ))
        .unwrap();
        let cluster = c.cluster.unwrap();
        assert_eq!(cluster.peers.len(), 3);
        assert_eq!(cluster.peers[&3], "127.0.0.3:7100");
        assert_eq!(cluster.listen.to_string(), "127.0.0.2:7100");
        assert_eq!(c.acks, 2);
        assert_eq!(c.node_id, 2);
    }

    #[test]
    fn generic_options_are_ignored() {
        // What mount(8) and mount.fuse3 were seen to pass (see docs/CONFIGURATION.md).
        let c = config(
            "defaults,rw,noatime,nodev,noexec,nosuid,_netdev,nofail,user,users,owner,dev,\
             suid,exec,auto,noauto,nouser,atime,relatime,x-systemd.requires=network.target,\
             comment=zod,fuse_threads=3",
        )
        .unwrap();
        assert_eq!(c.limits.fuse_threads, 3);
    }

    #[test]
    fn names_values_and_bools() {
        let c = config(
            "local_names=lock.mdb:other.db,allow_other,join=false,metrics_addr=127.0.0.1:9100",
        )
        .unwrap();
        assert_eq!(c.local_names, ["lock.mdb", "other.db"]);
        assert!(c.allow_other);
        assert!(!c.join);
        assert_eq!(c.metrics_addr.unwrap().to_string(), "127.0.0.1:9100");
    }

    #[test]
    fn bad_options_are_named() {
        let e = layer("rw,foo").unwrap_err();
        assert!(e.starts_with("unknown mount option \"foo\""), "{e}");
        let e = layer("bar=1").unwrap_err();
        assert!(e.starts_with("unknown mount option \"bar=1\""), "{e}");
        assert!(layer("ro")
            .unwrap_err()
            .contains("writable on the leader by design"));
        let e = layer("ack_timeout_ms=soon").unwrap_err();
        assert_eq!(e, "-o ack_timeout_ms=soon: expected a non-negative integer");
        assert!(layer("node_id")
            .unwrap_err()
            .contains("node_id needs a value"));
        assert!(layer("allow_other=maybe")
            .unwrap_err()
            .contains("expected a boolean"));
        let e = layer("rw,2=10.0.0.2:7100").unwrap_err();
        assert!(e.contains("no peers=... comes right before it"), "{e}");
        let e = layer("node_id=1,node_id=2").unwrap_err();
        assert!(e.starts_with("node_id is given twice"), "{e}");
        let e = config("ack_timeout_ms=5").unwrap_err();
        assert_eq!(
            e,
            "-o ack_timeout_ms = 5 is out of range: allowed 10..=3600000"
        );
    }

    #[test]
    fn sloppy_skips_unknown_options_only() {
        let mut l = Layer::default();
        parse("foo,fuse_threads=2", true, &mut l).unwrap();
        let c = {
            parse("data_dir=/d,mountpoint=/m", false, &mut l).unwrap();
            crate::config_file::resolve(l).unwrap()
        };
        assert_eq!(c.limits.fuse_threads, 2);
        assert!(parse("ro", true, &mut Layer::default()).is_err());
        assert!(parse("fuse_threads=x", true, &mut Layer::default()).is_err());
    }
}
