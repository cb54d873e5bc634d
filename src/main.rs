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
mod restore;
mod sync;
mod tree;

use clap::Parser;

/// Extra time an admin client waits beyond the daemon's own timeout for the operation, so
/// the daemon's error (not the client's) is what the operator sees.
const ADMIN_MARGIN_MS: u64 = 5_000;

fn print(out: String) {
    println!("{}", out.trim_end());
}

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
        cli::Command::Status(args) => admin::status(&args.data_dir, args.json).map(print),
        cli::Command::Members(cli::MembersCommand::Add(a)) => admin::operate(
            &a.data_dir,
            &format!("members-add {} {}", a.id, a.addr),
            config::Limits::default().member_catchup_timeout_ms + ADMIN_MARGIN_MS,
            a.json,
        )
        .map(print),
        cli::Command::Members(cli::MembersCommand::Remove(a)) => admin::operate(
            &a.data_dir,
            &format!("members-remove {}", a.id),
            config::Limits::default().ack_timeout_ms + ADMIN_MARGIN_MS,
            a.json,
        )
        .map(print),
        cli::Command::Learner(cli::LearnerCommand::Add(a)) => admin::operate(
            &a.data_dir,
            &format!(
                "learner-add {} {}{}",
                a.id,
                a.addr,
                a.until_index.map_or(String::new(), |u| format!(" {u}"))
            ),
            config::Limits::default().ack_timeout_ms + ADMIN_MARGIN_MS,
            a.json,
        )
        .map(print),
        cli::Command::TransferLeader(a) => admin::operate(
            &a.data_dir,
            &match a.to {
                Some(t) => format!("transfer-leader {t}"),
                None => "transfer-leader".into(),
            },
            config::Limits::default().transfer_timeout_ms * 2 + ADMIN_MARGIN_MS,
            a.json,
        )
        .map(print),
        cli::Command::Verify(a) => admin::verify(
            &a.data_dir,
            config::Limits::default().ack_timeout_ms * 3 + ADMIN_MARGIN_MS,
            a.json,
        )
        .map(print),
        cli::Command::Restore(a) => restore::run(&a.from, &a.cluster_key_file, &a.dest).map(print),
    };
    if let Err(msg) = result {
        eprintln!("seguro-fs: error: {msg}");
        std::process::exit(1);
    }
}
