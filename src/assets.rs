//! `seguro-fs generate-assets --out DIR`: man pages and shell completions generated from the
//! clap definitions in [`crate::cli`], so the packaged documentation of every flag is the
//! one the binary parses. Owns the asset file names the packages install (see
//! `packaging/build` and the `[package.metadata.*]` tables in Cargo.toml).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::{Generator, Shell};

/// The shells completions are written for, each with the file name its package directory
/// expects (`seguro-fs.bash`, `_seguro-fs`, `seguro-fs.fish`).
const SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

/// Write `OUT/man/seguro-fs.1`, one `OUT/man/seguro-fs-SUBCOMMAND.1` per visible subcommand
/// and `OUT/completions/{seguro-fs.bash,_seguro-fs,seguro-fs.fish}`. Returns the files
/// written.
pub fn generate(out: &Path) -> Result<Vec<PathBuf>, String> {
    let mut cmd = documented_command();
    cmd.build();
    let mut written = Vec::new();

    let man_dir = out.join("man");
    create_dir(&man_dir)?;
    let pages =
        std::iter::once(cmd.clone()).chain(cmd.get_subcommands().cloned().collect::<Vec<_>>());
    for page in pages {
        // Subcommands carry no version of their own: name the package on every page.
        let man = clap_mangen::Man::new(page)
            .source(format!("{NAME} {}", env!("CARGO_PKG_VERSION")))
            .manual("seguro-fs");
        let path = man_dir.join(man.get_filename());
        let mut buf = Vec::new();
        man.render(&mut buf)
            .map_err(|e| format!("rendering {}: {e}", path.display()))?;
        write_file(&path, &buf)?;
        written.push(path);
    }

    let comp_dir = out.join("completions");
    create_dir(&comp_dir)?;
    for shell in SHELLS {
        let path = comp_dir.join(shell.file_name(NAME));
        let mut buf = Vec::new();
        shell
            .try_generate(&cmd, &mut buf)
            .map_err(|e| format!("generating {shell} completions: {e}"))?;
        write_file(&path, &buf)?;
        written.push(path);
    }
    Ok(written)
}

/// The command's name, as installed (`Command::new` wants a `'static` name).
const NAME: &str = "seguro-fs";

/// The documented CLI: [`crate::cli::Cli`] without its hidden subcommands (clap_complete,
/// unlike clap_mangen, would offer them) and without clap's `help` subcommand.
fn documented_command() -> clap::Command {
    let full = crate::cli::Cli::command();
    let mut cmd = clap::Command::new(NAME)
        .bin_name(NAME)
        .version(env!("CARGO_PKG_VERSION"))
        .subcommand_required(full.is_subcommand_required_set())
        .disable_help_subcommand(true)
        .args(full.get_arguments().cloned())
        .subcommands(full.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
    if let Some(about) = full.get_about() {
        cmd = cmd.about(about.clone());
    }
    if let Some(long) = full.get_long_about() {
        cmd = cmd.long_about(long.clone());
    }
    cmd
}

fn create_dir(dir: &Path) -> Result<(), String> {
    fs::create_dir_all(dir).map_err(|e| {
        format!(
            "--out: cannot create {}: {e} (pass a writable directory)",
            dir.display()
        )
    })
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), String> {
    fs::File::create(path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(|e| format!("--out: cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_and_completions_cover_every_visible_subcommand_and_flag() {
        let dir = std::env::temp_dir().join(format!("seguro-assets-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let written = generate(&dir).unwrap();
        let read =
            |rel: &str| fs::read_to_string(dir.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
        let cmd = crate::cli::Cli::command();
        assert_eq!(cmd.get_name(), NAME);
        assert_eq!(cmd.get_version(), Some(env!("CARGO_PKG_VERSION")));
        let visible: Vec<_> = cmd.get_subcommands().filter(|s| !s.is_hide_set()).collect();
        assert!(visible.iter().any(|s| s.get_name() == "mount"));
        assert!(visible.iter().any(|s| s.get_name() == "status"));
        assert_eq!(
            written.len(),
            1 + visible.len() + SHELLS.len(),
            "{written:?}"
        );
        let top = read("man/seguro-fs.1");
        assert!(top.contains(".TH seguro-fs 1"), "{top}");
        assert!(
            !top.contains("generate\\-assets"),
            "hidden subcommand documented"
        );
        let about = cmd
            .get_about()
            .expect("the CLI has an about text")
            .to_string();
        assert!(
            top.contains(&about[..20]),
            "seguro-fs.1 lacks the about text"
        );
        for sub in &visible {
            let page = read(&format!("man/seguro-fs-{}.1", sub.get_name()));
            assert!(page.contains(".TH seguro-fs-"), "{}", sub.get_name());
            // Every visible long flag of the subcommand is documented (roff escapes '-').
            for arg in sub.get_arguments().filter(|a| !a.is_hide_set()) {
                if let Some(long) = arg.get_long() {
                    let roff = format!("\\-\\-{}", long.replace('-', "\\-"));
                    assert!(page.contains(&roff), "{} lacks --{long}", sub.get_name());
                }
            }
            // Hidden test hooks stay out of the documentation.
            assert!(!page.contains("fault\\-log\\-sync\\-file"));
        }
        let bash = read("completions/seguro-fs.bash");
        assert!(bash.contains("--node-id") && bash.contains("--cluster-key-file"));
        for shell in ["seguro-fs.bash", "_seguro-fs", "seguro-fs.fish"] {
            let text = read(&format!("completions/{shell}"));
            assert!(
                !text.contains("generate-assets"),
                "{shell} completes a hidden subcommand"
            );
        }
        assert!(read("completions/_seguro-fs").starts_with("#compdef seguro-fs"));
        assert!(read("completions/seguro-fs.fish").contains("complete -c seguro-fs"));
        assert!(!dir.join("man/seguro-fs-generate-assets.1").exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unwritable_out_names_the_flag() {
        let err = generate(Path::new("/proc/seguro-no-such-dir")).unwrap_err();
        assert!(err.starts_with("--out: cannot create"), "{err}");
    }
}
