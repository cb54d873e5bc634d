//! seguro-fs as a library: the daemon, its admin tools and the codecs, one module per
//! concern. `main.rs` is a thin binary over it; the integration tests, the benchmark and
//! the fuzz targets link it instead of copying modules.
//!
//! Layering, top to bottom: `cli`/`settings`/`config_file` → `daemon` (wires a node) →
//! `fuse` (the FUSE adapter) → `fs` (the file system core) → `replication` (Raft: the
//! pipeline, log, state machine, network) → `tree`/`op`/`sync` (the leaves).

pub mod admin;
pub mod assets;
pub mod background;
pub mod cli;
pub mod config;
pub mod config_file;
pub mod counters;
pub mod daemon;
pub mod datadir;
pub mod diskfull;
pub mod fs;
pub mod fuse;
pub mod import;
pub mod metrics;
pub mod mount_options;
pub mod op;
pub mod ready;
pub mod replication;
pub mod restore;
pub mod settings;
pub mod ship;
pub mod sync;
/// The integration tests' tmpfs guard, shared with the unit tests that need a file
/// system that really runs out of space.
#[cfg(test)]
#[path = "../tests/common/tmpfs.rs"]
mod test_tmpfs;
pub mod tree;

#[cfg(test)]
mod layering {
    //! The module graph has no cycles: each module's `crate::…` and (inside `replication`)
    //! `super::…` references, outside its tests, point one way only.

    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    /// Module name of a source file: `fs/*` is `fs`, `replication/snapshot/*` is
    /// `replication::snapshot`, `replication/x.rs` is `replication::x`.
    fn module_of(rel: &str) -> String {
        let rel = rel.trim_end_matches(".rs").trim_end_matches("/mod");
        let parts: Vec<&str> = rel.split('/').collect();
        match parts.as_slice() {
            ["replication", sub, ..] => format!("replication::{sub}"),
            [top, ..] => top.to_string(),
            [] => String::new(),
        }
    }

    fn references(text: &str, module: &str) -> BTreeSet<String> {
        let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or(text);
        let mut out = BTreeSet::new();
        for (prefix, parent) in [("crate::", ""), ("super::", "replication::")] {
            if prefix == "super::" && !module.starts_with("replication::") {
                continue;
            }
            for (i, _) in code.match_indices(prefix) {
                let rest = &code[i + prefix.len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                if name.is_empty() {
                    continue;
                }
                let after = &rest[name.len()..];
                let target = if parent.is_empty() && name == "replication" {
                    let sub: String = after
                        .trim_start_matches("::")
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                        .collect();
                    if after.starts_with("::") && !sub.is_empty() {
                        format!("replication::{sub}")
                    } else {
                        name
                    }
                } else {
                    format!("{parent}{name}")
                };
                if target != module {
                    out.insert(target);
                }
            }
        }
        out
    }

    fn walk(dir: &Path, root: &Path, graph: &mut BTreeMap<String, BTreeSet<String>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, root, graph);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let rel = p.strip_prefix(root).unwrap().to_str().unwrap().to_string();
                if rel == "lib.rs" || rel == "main.rs" {
                    continue;
                }
                let module = module_of(&rel);
                let refs = references(&std::fs::read_to_string(&p).unwrap(), &module);
                graph.entry(module).or_default().extend(refs);
            }
        }
    }

    #[test]
    fn the_module_graph_has_no_cycles() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut graph = BTreeMap::new();
        walk(&root, &root, &mut graph);
        assert!(graph.contains_key("replication::pipeline") && graph.contains_key("fs"));
        // Depth-first search for a back edge; the path to it is the cycle.
        fn visit(
            m: &str,
            graph: &BTreeMap<String, BTreeSet<String>>,
            path: &mut Vec<String>,
            done: &mut BTreeSet<String>,
        ) {
            if let Some(at) = path.iter().position(|p| p == m) {
                panic!("import cycle: {} -> {m}", path[at..].join(" -> "));
            }
            if !done.insert(m.to_string()) {
                return;
            }
            path.push(m.to_string());
            for next in graph.get(m).into_iter().flatten() {
                if graph.contains_key(next) {
                    visit(next, graph, path, done);
                }
            }
            path.pop();
        }
        let mut done = BTreeSet::new();
        for m in graph.keys() {
            visit(m, &graph, &mut Vec::new(), &mut done);
        }
    }
}
