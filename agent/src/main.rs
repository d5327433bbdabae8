//! `berth`: the thin binary. Parses the command line and hands off to one module per job;
//! the daemon's wiring reads top to bottom in [`daemon::run`].

mod access;
mod acme;
mod admin;
mod aws;
mod backoff;
mod cli;
mod config;
mod daemon;
mod ecr;
mod logging;
mod metrics;
mod plan;
mod reload;
mod secrets;
mod state;
mod status;
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
        Command::Status { config, json } => control(&config.path, admin::Request::Status, json),
        Command::Deploy { config, app, image } => control(&config.path, admin::Request::Deploy { app, image }, false),
        Command::Renew { config, domain } => control(&config.path, admin::Request::Renew { domain }, false),
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
        println!("\nonline checks");
        let mut results = vec![secrets::online_check(&cfg).await];
        results.extend(acme::online_check(&cfg).await);
        if !cfg.apps.is_empty() {
            results.push(supervisor::online_check().await);
        }
        let mut failures = 0;
        for result in results {
            match result {
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

/// `status`, `deploy` and `renew` talk to the daemon over its admin socket. Exit 69 when
/// no daemon answers, 1 when it answered "that did not work".
fn control(path: &std::path::Path, req: admin::Request, json: bool) -> ExitCode {
    // The socket path comes from the config; a broken config still lets us try the default.
    let socket = match Config::load(path) {
        Ok(c) => c.agent.admin_socket,
        Err(e) => {
            eprintln!("berth: {e}\nberth: trying the default admin socket");
            config::AgentConfig::default().admin_socket
        }
    };
    // Deploys wait for health checks and renewals for the CA: allow them time.
    let timeout = match req {
        admin::Request::Status => std::time::Duration::from_secs(10),
        _ => std::time::Duration::from_secs(900),
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("berth: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(admin::call(&socket, &req, timeout)) {
        Err(e) => {
            eprintln!("berth: {e}");
            ExitCode::from(exit::UNAVAILABLE)
        }
        Ok(resp) => {
            match (&resp.status, json) {
                (Some(report), true) => println!("{}", serde_json::to_string_pretty(report).unwrap_or_default()),
                (Some(report), false) => print!("{}", status::render(report)),
                (None, _) if resp.ok => println!("{}", resp.message),
                (None, _) => eprintln!("berth: {}", resp.message),
            }
            if resp.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
