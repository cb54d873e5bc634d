//! seguro-fs: parse the command line, run the command, map the outcome to an exit code.

mod admin;
mod assets;
mod background;
mod cli;
mod config;
mod config_file;
mod daemon;
mod datadir;
mod fs;
mod fuse;
mod mount_options;
mod op;
mod ready;
mod replication;
mod settings;
mod sync;
mod tree;

use clap::{ArgMatches, CommandFactory, FromArgMatches};

fn main() {
    let args = cli::mount_fuse3_form(std::env::args_os().collect());
    let matches = cli::Cli::command().get_matches_from(args);
    let cli = cli::Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // A background daemon's stderr becomes its log file, which gets no colour codes.
    let background = matches!(&cli.command, cli::Command::Mount(m) if m.background);
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SEGURO_LOG")
                .unwrap_or_else(|_| "info,openraft=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(!background && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        cli::Command::Mount(args) => mount(
            args,
            matches
                .subcommand_matches("mount")
                .expect("the mount subcommand's matches"),
        ),
        cli::Command::Status(args) => admin::status(&args.data_dir, args.json).map(|out| {
            println!("{}", out.trim_end());
        }),
        cli::Command::GenerateAssets(args) => assets::generate(&args.out).map(|_| ()),
    };
    if let Err(msg) = result {
        eprintln!("seguro-fs: error: {msg}");
        std::process::exit(1);
    }
}

/// `seguro-fs mount`: validate, then serve in the foreground, or fork a daemon and return
/// once it has mounted (`--background`).
fn mount(args: cli::MountArgs, matches: &ArgMatches) -> Result<(), String> {
    let (background, check) = (args.background, args.check);
    let cfg = args.into_config(matches).map_err(|e| e.to_string())?;
    if check {
        return Ok(());
    }
    if !background {
        return daemon::run(cfg, &mut ready::Ready::new(None)).map_err(|e| e.to_string());
    }
    match background::detach(cfg)? {
        background::Detached::Parent => Ok(()),
        background::Detached::Child(cfg, mut ready) => daemon::run(cfg, &mut ready).map_err(|e| {
            let msg = e.to_string();
            ready.failed(&msg);
            msg
        }),
    }
}
