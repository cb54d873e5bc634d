//! The TOML config file (`--config FILE`, `-o config=FILE`), and [`resolve`], which puts
//! the command line over it. Its keys are the flags' long names with `_`
//! ([`crate::settings::keys`]); `[peers]` is a table of `ID = "HOST:PORT"`.
//! It is read as a plain TOML table and checked key by key, so an unknown key, a wrong
//! type or a bad value is reported with the file and the key.

use std::path::Path;

use crate::config::MountConfig;
use crate::settings::{find_key, ConfigError, Kind, Layer, Origin, Problem, Value, CONFIG_KEY};

/// Merge the command line over the config file it names (if any) and validate.
pub fn resolve(command_line: Layer) -> Result<MountConfig, ConfigError> {
    let merged = match command_line.path(CONFIG_KEY) {
        Some(file) => {
            let file_layer = load(&file)?;
            command_line.over(file_layer)
        }
        None => command_line,
    };
    crate::settings::finish(merged)
}

/// Read `path` into a layer of settings.
pub fn load(path: &Path) -> Result<Layer, ConfigError> {
    let origin = Origin::File(path.to_path_buf());
    let err = |p: Problem| ConfigError::new(origin.clone(), p);
    let text = std::fs::read_to_string(path).map_err(|e| err(Problem::Read(e.to_string())))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| err(Problem::Syntax(e.to_string().trim_end().into())))?;
    let mut layer = Layer::default();
    for (name, value) in &table {
        let key = find_key(name).ok_or_else(|| err(Problem::UnknownKey(name.clone())))?;
        let value = convert(key.name, key.kind, value).map_err(err)?;
        layer.set(key.name, value, origin.clone())?;
    }
    Ok(layer)
}

fn a(type_str: &str) -> String {
    let article = if type_str.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    format!("{article} {type_str}")
}

fn wrong(key: &str, kind: Kind, found: &toml::Value) -> Problem {
    let found = match found {
        toml::Value::Integer(i) if *i < 0 => format!("the negative integer {i}"),
        v => a(v.type_str()),
    };
    Problem::WrongType {
        key: key.into(),
        expected: kind.expected(),
        found,
    }
}

fn convert(key: &str, kind: Kind, v: &toml::Value) -> Result<Value, Problem> {
    let strings = |items: &[toml::Value]| -> Result<Vec<String>, Problem> {
        items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(String::from)
                    .ok_or_else(|| wrong(key, kind, i))
            })
            .collect()
    };
    Ok(match (kind, v) {
        (Kind::Int, toml::Value::Integer(i)) => {
            Value::Int(u64::try_from(*i).map_err(|_| wrong(key, kind, v))?)
        }
        (Kind::Bool, toml::Value::Boolean(b)) => Value::Bool(*b),
        (Kind::Text, toml::Value::String(s)) => Value::Text(s.clone()),
        (Kind::Path, toml::Value::String(s)) => Value::Path(s.into()),
        (Kind::Names, toml::Value::Array(items)) => Value::List(strings(items)?),
        (Kind::Peers, toml::Value::Array(items)) => Value::List(strings(items)?),
        (Kind::Peers, toml::Value::Table(t)) => Value::List(
            t.iter()
                .map(|(id, addr)| {
                    let addr = addr.as_str().ok_or_else(|| Problem::WrongType {
                        key: format!("peers.{id}"),
                        expected: "a \"HOST:PORT\" string",
                        found: a(addr.type_str()),
                    })?;
                    // parse_peers checks the id and the address.
                    Ok(format!("{id}={addr}"))
                })
                .collect::<Result<_, Problem>>()?,
        ),
        _ => return Err(wrong(key, kind, v)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::tests::TempDir;

    fn write(dir: &TempDir, name: &str, text: &str) -> std::path::PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn resolve(
        file: &Path,
        cli: &[(&'static str, Value)],
    ) -> Result<crate::config::MountConfig, String> {
        let mut l = Layer::default();
        l.set("config", Value::Path(file.into()), Origin::Flag)
            .unwrap();
        for (k, v) in cli {
            l.set(k, v.clone(), Origin::Flag).unwrap();
        }
        super::resolve(l).map_err(|e| e.to_string())
    }

    #[test]
    fn values_are_applied_and_the_command_line_wins() {
        let t = TempDir::new("config-file");
        let key = write(&t, "zod.key", "0123456789abcdef0123456789abcdef\n");
        let f = write(
            &t,
            "zod.toml",
            &format!(
                "data_dir = \"/var/lib/seguro-fs/zod\"\nmountpoint = \"/srv/zod/.urb/log\"\n\
                 node_id = 3\ncluster_key_file = \"{}\"\nacks = 2\nlocal_names = [\"lock.mdb\", \"x.db\"]\n\
                 ack_timeout_ms = 2000\nfuse_threads = 2\njoin = true\nmetrics_addr = \"127.0.0.1:9100\"\n\
                 log_file = \"/var/log/zod.log\"\n\
                 [peers]\n1 = \"127.0.0.1:7100\"\n2 = \"127.0.0.2:7100\"\n3 = \"127.0.0.3:7100\"\n",
                key.display()
            ),
        );
        let c = resolve(&f, &[]).unwrap();
        assert_eq!(c.data_dir, Path::new("/var/lib/seguro-fs/zod"));
        assert_eq!(c.mountpoint, Path::new("/srv/zod/.urb/log"));
        assert_eq!(c.node_id, 3);
        assert_eq!(c.acks, 2);
        assert_eq!(c.local_names, ["lock.mdb", "x.db"]);
        assert_eq!(c.limits.ack_timeout_ms, 2000);
        assert_eq!(c.limits.fuse_threads, 2);
        assert!(c.join);
        assert_eq!(c.metrics_addr.unwrap().to_string(), "127.0.0.1:9100");
        assert_eq!(c.log_file, Path::new("/var/log/zod.log"));
        let cluster = c.cluster.unwrap();
        assert_eq!(cluster.listen.to_string(), "127.0.0.3:7100");
        assert_eq!(cluster.peers.len(), 3);

        let c = resolve(
            &f,
            &[
                ("data_dir", Value::Path("/d".into())),
                ("ack_timeout_ms", Value::Int(500)),
                ("acks", Value::Int(1)),
            ],
        )
        .unwrap();
        assert_eq!(c.data_dir, Path::new("/d"));
        assert_eq!(c.limits.ack_timeout_ms, 500);
        assert_eq!(c.acks, 1);
        assert_eq!(c.limits.fuse_threads, 2, "the file still applies");
        assert_eq!(c.limits.heartbeat_ms, 150, "the default still applies");
    }

    #[test]
    fn peers_as_an_array() {
        let t = TempDir::new("config-file");
        let key = write(&t, "k", "0123456789abcdef0123456789abcdef");
        let f = write(
            &t,
            "c.toml",
            &format!(
                "data_dir = \"/d\"\nmountpoint = \"/m\"\npeers = [\"1=127.0.0.1:1\", \"2=127.0.0.2:1\"]\n\
                 cluster_key_file = \"{}\"\n",
                key.display()
            ),
        );
        let c = resolve(&f, &[]).unwrap();
        assert_eq!(c.cluster.unwrap().peers.len(), 2);
        assert_eq!(c.acks, 1);
    }

    #[test]
    fn errors_name_the_file_the_key_and_the_range() {
        let t = TempDir::new("config-file");
        let check = |text: &str, want: &str| {
            let f = write(
                &t,
                "x.toml",
                &format!("data_dir = \"/d\"\nmountpoint = \"/m\"\n{text}"),
            );
            let e = resolve(&f, &[]).unwrap_err();
            let want = want.replace("FILE", &f.display().to_string());
            assert!(e.starts_with(&want), "{e}\n  does not start with\n{want}");
        };
        check(
            "ack_timeout_ms = 5",
            "config FILE: ack_timeout_ms = 5 is out of range: allowed 10..=3600000",
        );
        check(
            "bogus = 1",
            "config FILE: unknown key \"bogus\": the keys are data_dir,",
        );
        check("config = \"/x\"", "config FILE: unknown key \"config\"");
        check(
            "ack_timeout_ms = \"10s\"",
            "config FILE: ack_timeout_ms has the wrong type: expected a non-negative integer, found a string",
        );
        check(
            "fuse_threads = -1",
            "config FILE: fuse_threads has the wrong type: expected a non-negative integer, found the negative integer -1",
        );
        check(
            "allow_other = 1",
            "config FILE: allow_other has the wrong type: expected a boolean (true or false), found an integer",
        );
        check(
            "local_names = \"lock.mdb\"",
            "config FILE: local_names has the wrong type: expected an array",
        );
        check(
            "[peers]\n1 = 7100",
            "config FILE: peers.1 has the wrong type",
        );
        check(
            "[peers]\nx = \"a:1\"",
            "config FILE: peers: \"x=a:1\" is not ID=HOST:PORT",
        );
        check(
            "node_id = 4\n[peers]\n1 = \"127.0.0.1:1\"",
            "config FILE: node_id 4 is not in peers (members: 1)",
        );
        check(
            "join = true",
            "config FILE: join only makes sense with peers",
        );
        check(
            "metrics_addr = \"localhost\"",
            "config FILE: metrics_addr \"localhost\" is not an IP:PORT address",
        );
        check("node_id = ", "config FILE: not valid TOML: ");

        let missing = t.path().join("missing.toml");
        let e = resolve(&missing, &[]).unwrap_err();
        assert!(
            e.starts_with(&format!(
                "config {}: cannot read the config file: No such file",
                missing.display()
            )),
            "{e}"
        );
    }
}
