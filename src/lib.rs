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

    /// The lowercase identifier `s` starts with, and what follows it.
    fn ident(s: &str) -> (&str, &str) {
        let n = s
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(s.len());
        s.split_at(n)
    }

    /// The items of the brace group `s` starts with (split at its top-level commas).
    fn group(s: &str) -> Vec<&str> {
        let mut items = Vec::new();
        let (mut depth, mut from) = (0, 1);
        for (i, c) in s.char_indices() {
            match c {
                '{' => depth += 1,
                '}' | ',' if depth == 1 => {
                    items.push(s[from..i].trim());
                    from = i + 1;
                    if c == '}' {
                        break;
                    }
                }
                '}' => depth -= 1,
                _ => {}
            }
        }
        items
    }

    /// The modules a path after `crate::` or `super::` names, each with the modules it
    /// names one level down: `a::…` is `a`; a group `{a, b::c, d::{e, f}}` names each item.
    fn heads(rest: &str) -> Vec<(String, Vec<String>)> {
        if rest.starts_with('{') {
            return group(rest).into_iter().flat_map(heads).collect();
        }
        let (name, after) = ident(rest);
        if name.is_empty() {
            return Vec::new();
        }
        let subs = match after.strip_prefix("::") {
            Some(down) => heads(down).into_iter().map(|(n, _)| n).collect(),
            None => Vec::new(),
        };
        vec![(name.to_string(), subs)]
    }

    fn references(text: &str, module: &str) -> BTreeSet<String> {
        let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or(text);
        let mut out = BTreeSet::new();
        for (prefix, parent) in [("crate::", ""), ("super::", "replication::")] {
            if prefix == "super::" && !module.starts_with("replication::") {
                continue;
            }
            for (i, _) in code.match_indices(prefix) {
                for (name, subs) in heads(&code[i + prefix.len()..]) {
                    let targets = if parent.is_empty() && name == "replication" && !subs.is_empty()
                    {
                        subs.iter().map(|s| format!("replication::{s}")).collect()
                    } else {
                        vec![format!("{parent}{name}")]
                    };
                    out.extend(targets.into_iter().filter(|t| t != module));
                }
            }
        }
        out
    }

    /// Grouped imports count like single ones.
    #[test]
    fn grouped_imports_are_read() {
        let text = "use crate::{fs, replication::{early, quorum::Matched}, op::Op};\n\
                    use super::{wire::{self, Request}, transport};\n";
        let got = references(text, "replication::network");
        let want: BTreeSet<String> = [
            "fs",
            "op",
            "replication::early",
            "replication::quorum",
            "replication::wire",
            "replication::transport",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        assert_eq!(got, want);
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
