//! `mount.seguro-fs`: the helper mount(8) runs for fstab type `seguro-fs`, as
//! `/sbin/mount.seguro-fs SPEC DIR [-sfnv] [-N NS] [-o OPTIONS] [-t TYPE]`. It interprets
//! no option itself: it runs `seguro-fs mount --background SPEC DIR -o OPTIONS`, so every
//! option is parsed in one place (the seguro-fs binary), and it turns the outcome into
//! mount(8)'s exit codes.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

/// mount(8)'s exit codes (man 8 mount, EXIT STATUS), which a helper's caller passes on.
const EXIT_USAGE: i32 = 1;
const EXIT_SYSTEM: i32 = 2;
const EXIT_MOUNT_FAILURE: i32 = 32;

const USAGE: &str = "usage: mount.seguro-fs DATA_DIR MOUNTPOINT [-sfnv] [-o OPTIONS] [-t TYPE]
  Mounts seguro-fs (what mount(8) runs for fstab type seguro-fs) by running
  seguro-fs mount --background DATA_DIR MOUNTPOINT -o OPTIONS.
  -o OPTIONS  seguro-fs mount options (node_id=2,peers=1=H:P,2=H:P,config=FILE,...)
  -s          ignore unknown mount options
  -f          only check the options; mount nothing
  -n, -v      accepted (-v prints the command run)
  -t TYPE     accepted and ignored
  SEGURO_FS_BIN=PATH picks the seguro-fs binary (default: next to this helper,
  then /usr/bin/seguro-fs, then PATH).";

/// What mount(8) asked for.
#[derive(Debug, Default, PartialEq, Eq)]
struct Invocation {
    spec: OsString,
    dir: OsString,
    options: Vec<String>,
    fake: bool,
    sloppy: bool,
    verbose: bool,
}

fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Invocation, String> {
    let mut inv = Invocation::default();
    let mut positional = Vec::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let Some(text) = arg.to_str().filter(|t| t.starts_with('-') && t.len() > 1) else {
            positional.push(arg);
            continue;
        };
        let mut value = |flag: &str, attached: &str| -> Result<String, String> {
            if !attached.is_empty() {
                return Ok(attached.to_string());
            }
            let v = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
            v.into_string()
                .map_err(|v| format!("{flag} {v:?} is not valid UTF-8"))
        };
        match text.as_bytes()[1] {
            b'o' => inv.options.push(value("-o", &text[2..])?),
            b't' => {
                // mount(8) passes the type for subtypes; there is only one here.
                let _type = value("-t", &text[2..])?;
            }
            b'N' => {
                return Err("-N (mount in another namespace) is not supported by \
                            mount.seguro-fs; run mount inside that namespace instead"
                    .into())
            }
            _ => {
                for c in text[1..].chars() {
                    match c {
                        's' => inv.sloppy = true,
                        'f' => inv.fake = true,
                        'v' => inv.verbose = true,
                        'n' => {}
                        other => return Err(format!("unknown option -{other}")),
                    }
                }
            }
        }
    }
    let mut positional = positional.into_iter();
    match (positional.next(), positional.next(), positional.next()) {
        (Some(spec), Some(dir), None) => {
            inv.spec = spec;
            inv.dir = dir;
            Ok(inv)
        }
        (_, _, Some(extra)) => Err(format!("unexpected argument {extra:?}")),
        _ => Err("DATA_DIR and MOUNTPOINT are required".into()),
    }
}

/// The seguro-fs binary: `SEGURO_FS_BIN`, else next to this executable, else
/// /usr/bin/seguro-fs, else the first on PATH.
fn find_seguro_fs() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("SEGURO_FS_BIN").filter(|p| !p.is_empty()) {
        return Ok(p.into());
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("seguro-fs")));
    let on_path: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("seguro-fs"))
                .collect()
        })
        .unwrap_or_default();
    beside
        .into_iter()
        .chain([PathBuf::from("/usr/bin/seguro-fs")])
        .chain(on_path)
        .find(|p| p.is_file())
        .ok_or_else(|| {
            "cannot find the seguro-fs binary (next to mount.seguro-fs, in /usr/bin or on \
             PATH): install seguro-fs, or set SEGURO_FS_BIN"
                .to_string()
        })
}

fn command(bin: &Path, inv: &Invocation) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("mount")
        .arg(if inv.fake { "--check" } else { "--background" })
        .arg(&inv.spec)
        .arg(&inv.dir);
    if !inv.options.is_empty() {
        cmd.arg("-o").arg(inv.options.join(","));
    }
    if inv.sloppy {
        cmd.arg("--sloppy");
    }
    cmd
}

fn main() {
    let inv = match parse(std::env::args_os().skip(1)) {
        Ok(inv) => inv,
        Err(e) => {
            eprintln!("mount.seguro-fs: {e}\n{USAGE}");
            std::process::exit(EXIT_USAGE);
        }
    };
    let bin = find_seguro_fs().unwrap_or_else(|e| {
        eprintln!("mount.seguro-fs: {e}");
        std::process::exit(EXIT_SYSTEM);
    });
    let mut cmd = command(&bin, &inv);
    if inv.verbose {
        eprintln!("mount.seguro-fs: running {cmd:?}");
    }
    // seguro-fs prints its own error; the exit code is mount(8)'s.
    match cmd.status() {
        Ok(s) if s.success() => {}
        Ok(_) => std::process::exit(EXIT_MOUNT_FAILURE),
        Err(e) => {
            eprintln!("mount.seguro-fs: running {}: {e}", bin.display());
            std::process::exit(EXIT_SYSTEM);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    #[test]
    fn parses_what_mount_passes() {
        let inv = parse(args(&[
            "/d",
            "/m",
            "-s",
            "-n",
            "-v",
            "-o",
            "rw,node_id=2",
            "-t",
            "seguro-fs",
        ]))
        .unwrap();
        assert_eq!(
            inv,
            Invocation {
                spec: "/d".into(),
                dir: "/m".into(),
                options: vec!["rw,node_id=2".into()],
                fake: false,
                sloppy: true,
                verbose: true,
            }
        );
        let inv = parse(args(&["/d", "/m", "-sfnv", "-orw"])).unwrap();
        assert!(inv.fake && inv.sloppy && inv.verbose);
        assert_eq!(inv.options, ["rw"]);
    }

    #[test]
    fn bad_usage_is_refused() {
        assert!(parse(args(&["/d"])).is_err());
        assert!(parse(args(&["/d", "/m", "/x"])).is_err());
        assert!(parse(args(&["/d", "/m", "-o"])).is_err());
        assert!(parse(args(&["/d", "/m", "-x"])).is_err());
        assert!(parse(args(&["/d", "/m", "-N", "1"]))
            .unwrap_err()
            .contains("not supported"));
    }

    #[test]
    fn runs_seguro_fs_mount_in_the_background() {
        let inv = parse(args(&["/d", "/m", "-o", "rw", "-o", "node_id=2", "-s"])).unwrap();
        let cmd = command(Path::new("/bin/seguro-fs"), &inv);
        let argv: Vec<_> = cmd.get_args().collect();
        assert_eq!(
            argv,
            [
                "mount",
                "--background",
                "/d",
                "/m",
                "-o",
                "rw,node_id=2",
                "--sloppy"
            ]
        );
        let inv = parse(args(&["/d", "/m", "-f"])).unwrap();
        let cmd = command(Path::new("/bin/seguro-fs"), &inv);
        assert_eq!(cmd.get_args().nth(1).unwrap(), "--check");
    }
}
