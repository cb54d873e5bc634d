//! The `seguro-fs` binary: parse the command line, run the command, map the outcome to an
//! exit code. Everything else is the library (`lib.rs`).

use clap::{ArgMatches, CommandFactory, FromArgMatches};
use seguro_fs::{
    admin, assets, background, cli, config, daemon, datadir, import, ready, restore, settings, ship,
};

/// Extra time an admin client waits beyond the daemon's own timeout for the operation, so
/// the daemon's error (not the client's) is what the operator sees.
const ADMIN_MARGIN_MS: u64 = 5_000;

fn print(out: String) {
    println!("{}", out.trim_end());
}

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
        cli::Command::Restore(a) => {
            restore::run(&a.from, &a.cluster_key_file, &a.dest, a.update).map(print)
        }
        cli::Command::Rekey(a) => rekey(&a),
        cli::Command::Import(a) => {
            let source = a.pier_log_dir.clone();
            a.into_config()
                .map_err(|e| e.to_string())
                .and_then(|cfg| import::run(&source, &cfg))
                .map(print)
        }
        cli::Command::GenerateAssets(args) => assets::generate(&args.out).map(|_| ()),
        cli::Command::ShipGuard => std::process::exit(ship::guard_main()),
    };
    if let Err(msg) = result {
        eprintln!("seguro-fs: error: {msg}");
        std::process::exit(1);
    }
}

/// `seguro-fs rekey`: point a stopped data dir at the cluster's new key.
fn rekey(a: &cli::RekeyArgs) -> Result<(), String> {
    let key = settings::key_flag(&a.cluster_key_file)?;
    let new = format!("key-{}", key.fingerprint());
    let old = datadir::DataDir::rekey(&a.data_dir, &new).map_err(|e| e.to_string())?;
    if old == new {
        print(format!(
            "data dir {}: already made for this key ({new}); nothing changed",
            a.data_dir.display()
        ));
    } else {
        print(format!(
            "data dir {}: cluster key {old} replaced by {new}; start this node with the new \
             key file once every member is rekeyed",
            a.data_dir.display()
        ));
    }
    Ok(())
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
