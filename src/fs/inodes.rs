//! Inode numbers handed to the kernel, and the path each one stands for.
//!
//! The tree is addressed by path, the kernel by inode number. A FUSE inode is allocated
//! the first time a file is looked up and keyed by the backing file's `st_ino`, so hard
//! links share one FUSE inode (which then knows each of its names). Numbers are never reused within a daemon run (generation
//! stays 0). Renames rewrite paths (a directory's whole subtree); unlink detaches the path
//! while open handles keep working on their file descriptor.

use std::collections::HashMap;

pub const ROOT_INO: u64 = 1;

/// Where a file lives: the replicated tree or the host-local directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Area {
    Tree,
    Local,
}

#[derive(Debug, Clone)]
pub struct Node {
    /// Path relative to the area root; `None` once its last name is unlinked.
    pub path: Option<String>,
    /// Further names of a hard-linked file.
    links: Vec<String>,
    pub area: Area,
    pub is_dir: bool,
    nlookup: u64,
    key: (Area, u64),
}

impl Node {
    fn has_name(&self, path: &str) -> bool {
        self.path.as_deref() == Some(path) || self.links.iter().any(|l| l == path)
    }
}

#[derive(Debug)]
pub struct Inodes {
    nodes: HashMap<u64, Node>,
    by_key: HashMap<(Area, u64), u64>,
    next: u64,
}

/// Join a directory path and a name ("" is the root).
pub fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

impl Inodes {
    pub fn new(root_st_ino: u64) -> Inodes {
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT_INO,
            Node {
                path: Some(String::new()),
                links: Vec::new(),
                area: Area::Tree,
                is_dir: true,
                nlookup: 1,
                key: (Area::Tree, root_st_ino),
            },
        );
        Inodes {
            nodes,
            by_key: HashMap::from([((Area::Tree, root_st_ino), ROOT_INO)]),
            next: ROOT_INO + 1,
        }
    }

    pub fn get(&self, ino: u64) -> Option<&Node> {
        self.nodes.get(&ino)
    }

    /// The inode for a file found at `path` (one more kernel reference to it).
    pub fn lookup(&mut self, path: &str, area: Area, st_ino: u64, is_dir: bool) -> u64 {
        let key = (area, st_ino);
        if let Some(&ino) = self.by_key.get(&key) {
            let n = self.nodes.get_mut(&ino).expect("by_key and nodes agree");
            n.nlookup += 1;
            match &n.path {
                None => n.path = Some(path.to_string()),
                Some(p) if p != path && !n.links.iter().any(|l| l == path) => {
                    n.links.push(path.to_string());
                }
                Some(_) => {}
            }
            return ino;
        }
        let ino = self.next;
        self.next += 1;
        self.nodes.insert(
            ino,
            Node {
                path: Some(path.to_string()),
                links: Vec::new(),
                area,
                is_dir,
                nlookup: 1,
                key,
            },
        );
        self.by_key.insert(key, ino);
        ino
    }

    /// The inode number already given to a file, without taking a reference (readdir).
    pub fn peek(&self, area: Area, st_ino: u64) -> Option<u64> {
        self.by_key.get(&(area, st_ino)).copied()
    }

    /// The inode currently standing for `path`, if the kernel knows one.
    pub fn find(&self, area: Area, path: &str) -> Option<u64> {
        self.nodes
            .iter()
            .find(|(_, n)| n.area == area && n.has_name(path))
            .map(|(i, _)| *i)
    }

    /// Every inode with a path (for invalidating the kernel's caches wholesale).
    pub fn all_paths(&self) -> Vec<(u64, Area, String)> {
        self.nodes
            .iter()
            .filter_map(|(i, n)| Some((*i, n.area, n.path.clone()?)))
            .collect()
    }

    /// The kernel dropped `n` references.
    pub fn forget(&mut self, ino: u64, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.nlookup = node.nlookup.saturating_sub(n);
            if node.nlookup == 0 {
                let key = node.key;
                self.nodes.remove(&ino);
                if self.by_key.get(&key) == Some(&ino) {
                    self.by_key.remove(&key);
                }
            }
        }
    }

    /// `path` in `area` no longer names anything. A file keeps its inode (and any other
    /// names) until its last name goes.
    pub fn detach(&mut self, area: Area, path: &str) {
        let hit: Vec<u64> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.area == area && n.has_name(path))
            .map(|(i, _)| *i)
            .collect();
        for ino in hit {
            let node = self.nodes.get_mut(&ino).expect("just found");
            node.links.retain(|l| l != path);
            if node.path.as_deref() == Some(path) {
                node.path = node.links.pop();
            }
            if node.path.is_none() {
                // A new file may get the same st_ino; it must get a new FUSE inode.
                let key = node.key;
                if self.by_key.get(&key) == Some(&ino) {
                    self.by_key.remove(&key);
                }
            }
        }
    }

    /// `from` was renamed to `to` in `area`: rewrite it and, for a directory, everything
    /// under it.
    pub fn rename(&mut self, area: Area, from: &str, to: &str) {
        let prefix = format!("{from}/");
        let moved = |p: &str| {
            if p == from {
                Some(to.to_string())
            } else {
                p.strip_prefix(&prefix).map(|rest| join(to, rest))
            }
        };
        for node in self.nodes.values_mut().filter(|n| n.area == area) {
            if let Some(new) = node.path.as_deref().and_then(moved) {
                node.path = Some(new);
            }
            for l in &mut node.links {
                if let Some(new) = moved(l) {
                    *l = new;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_forget_rename_detach() {
        let mut t = Inodes::new(2);
        let d = t.lookup("d", Area::Tree, 10, true);
        let f = t.lookup("d/f", Area::Tree, 11, false);
        assert_eq!(
            t.lookup("d/f", Area::Tree, 11, false),
            f,
            "same file, same inode"
        );
        let l = t.lookup("d/lock.mdb", Area::Local, 11, false);
        assert_ne!(l, f, "areas are separate even if st_ino collides");
        t.rename(Area::Tree, "d", "e");
        assert_eq!(t.get(f).unwrap().path.as_deref(), Some("e/f"));
        assert_eq!(t.get(d).unwrap().path.as_deref(), Some("e"));
        assert_eq!(t.get(l).unwrap().path.as_deref(), Some("d/lock.mdb"));
        t.detach(Area::Tree, "e/f");
        assert_eq!(t.get(f).unwrap().path, None);
        let f2 = t.lookup("e/f", Area::Tree, 11, false);
        assert_ne!(f2, f, "a reused st_ino after unlink is a new inode");
        t.forget(f, 1);
        assert!(t.get(f).is_some(), "still one reference");
        t.forget(f, 1);
        assert!(t.get(f).is_none());
        t.forget(ROOT_INO, 100);
        assert!(t.get(ROOT_INO).is_some());
    }

    #[test]
    fn a_hard_link_keeps_the_file_alive_until_its_last_name_goes() {
        let mut t = Inodes::new(2);
        let a = t.lookup("a", Area::Tree, 20, false);
        assert_eq!(t.lookup("d/b", Area::Tree, 20, false), a);
        t.detach(Area::Tree, "d/b");
        assert_eq!(t.get(a).unwrap().path.as_deref(), Some("a"));
        assert_eq!(t.find(Area::Tree, "a"), Some(a));
        t.lookup("d/b", Area::Tree, 20, false);
        t.detach(Area::Tree, "a");
        assert_eq!(t.get(a).unwrap().path.as_deref(), Some("d/b"));
        t.rename(Area::Tree, "d", "e");
        assert_eq!(t.get(a).unwrap().path.as_deref(), Some("e/b"));
        t.detach(Area::Tree, "e/b");
        assert_eq!(t.get(a).unwrap().path, None);
    }
}
