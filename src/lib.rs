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
