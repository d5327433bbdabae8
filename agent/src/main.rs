//! `berth`: the thin binary. Parses the command line and hands off to one module per job;
//! the daemon's wiring reads top to bottom in [`daemon::run`].

mod aws;
mod backoff;
mod cli;
mod config;
mod daemon;
mod logging;
mod plan;
mod secrets;
mod state;
mod supervisor;
mod systemd;

use std::process::ExitCode;

use clap::Parser;

use cli::{exit, Cli, Command};
use config::{Config, ConfigError};

/// `berth --version`: version, git revision, and what this build can do.
pub const VERSION_LINE: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("BERTH_GIT_REV"),
    ")\nfeatures: tls=rustls/aws-lc-rs http=hyper1(h1,h2,upgrades) systemd=notify,watchdog,socket-activation logs=journald"
);

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config, online } => check(&config.path, online),
        Command::Run { config } => {
            logging::init();
            match Config::load(&config.path) {
                Ok(cfg) => daemon::main(cfg, config.path),
                Err(e) => config_failure(&e),
            }
        }
        Command::Status { config, .. } | Command::Deploy { config, .. } | Command::Renew { config, .. } => {
            control_not_available(&config.path)
        }
    }
}

fn check(path: &std::path::Path, online: bool) -> ExitCode {
    let cfg = match Config::load(path) {
        Ok(cfg) => cfg,
        Err(e) => return config_failure(&e),
    };
    print!("{}", plan::render(&cfg, path));
    if !online {
        return ExitCode::SUCCESS;
    }
    // Online checks talk to what `run` will need, with the same credentials and endpoints,
    // and stop at the first answer: an operator wants "AccessDenied on X", not a retry loop.
    logging::init();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("berth: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let failures = rt.block_on(async {
        let mut failures = 0;
        println!("\nonline checks");
        match secrets::online_check(&cfg).await {
            Ok(line) => println!("  {line}"),
            Err(e) => {
                eprintln!("berth: {e:#}");
                failures += 1;
            }
        }
        if !cfg.apps.is_empty() {
            match supervisor::online_check().await {
                Ok(line) => println!("  {line}"),
                Err(e) => {
                    eprintln!("berth: {e:#}");
                    failures += 1;
                }
            }
        }
        failures
    });
    if failures == 0 {
        ExitCode::SUCCESS
    } else {
        eprintln!("berth: {failures} online check(s) failed");
        ExitCode::from(exit::UNAVAILABLE)
    }
}

fn config_failure(e: &ConfigError) -> ExitCode {
    eprintln!("berth: {e}");
    ExitCode::from(exit::CONFIG)
}

/// `status`, `deploy` and `renew` talk to the daemon's admin socket.
fn control_not_available(path: &std::path::Path) -> ExitCode {
    let socket = Config::load(path)
        .map(|c| c.agent.admin_socket)
        .unwrap_or_else(|_| config::AgentConfig::default().admin_socket);
    eprintln!(
        "berth: no berth daemon answers on {} (the admin socket is not available in this build yet)",
        socket.display()
    );
    ExitCode::from(exit::UNAVAILABLE)
}
