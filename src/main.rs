//! seguro-fs: parse the command line, run the command, map the outcome to an exit code.

mod admin;
mod cli;
mod config;
mod daemon;
mod datadir;
mod fs;
mod fuse;
mod metrics;
mod op;
mod replication;
mod sync;
mod tree;

use clap::Parser;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SEGURO_LOG")
                .unwrap_or_else(|_| "info,openraft=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = cli::Cli::parse();
    let result = match cli.command {
        cli::Command::Mount(args) => match args.into_config() {
            Ok(cfg) => daemon::run(cfg).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        },
        cli::Command::Status(args) => admin::status(&args.data_dir, args.json).map(|out| {
            println!("{}", out.trim_end());
        }),
    };
    if let Err(msg) = result {
        eprintln!("seguro-fs: error: {msg}");
        std::process::exit(1);
    }
}
