//! The command line: what an operator types on an instance.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Exit codes from sysexits(3), which systemd units and scripts can match on.
pub mod exit {
    /// Invalid configuration. The unit sets `RestartPreventExitStatus=78`: retrying a bad
    /// config in a loop helps no one.
    pub const CONFIG: u8 = 78;
    /// `status`/`deploy`/`renew` found no running daemon on the admin socket.
    pub const UNAVAILABLE: u8 = 69;
}

#[derive(Debug, Parser)]
#[command(
    name = "berth",
    version = crate::VERSION_LINE,
    about = "Runs an app container on an EC2 instance: secrets from SSM, ACME certificates, a TLS reverse proxy, zero-downtime rollouts",
    long_about = None,
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args, Clone)]
pub struct ConfigArg {
    /// Configuration file.
    #[arg(short = 'c', long = "config", env = "BERTH_CONFIG", default_value = crate::config::DEFAULT_PATH)]
    pub path: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (what berth.service starts). Exits 0 on a clean stop, 78 on an
    /// invalid config, 1 on a fatal runtime error; transient faults are retried, never fatal.
    Run {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Validate the config and print the resolved plan. Exits 78 naming the key and line
    /// of every problem.
    Check {
        #[command(flatten)]
        config: ConfigArg,
        /// Also check SSM access, the Docker daemon and the ACME directory.
        #[arg(long)]
        online: bool,
    },
    /// Ask the running daemon for apps, containers, image digests, health, connections to
    /// each app, certificate expiry and next renewal, and the last secrets refresh. Exits 69
    /// if no daemon answers.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Zero-downtime rollout of a new (or re-pulled) image. Exits 0 once the new container
    /// serves, 1 if it never got healthy (the old one keeps serving).
    Deploy {
        #[command(flatten)]
        config: ConfigArg,
        /// App to deploy (default: every app).
        app: Option<String>,
        /// Image reference to roll out instead of the configured one.
        #[arg(long)]
        image: Option<String>,
    },
    /// Renew certificates now. Exits 0 once the new certificate is installed.
    Renew {
        #[command(flatten)]
        config: ConfigArg,
        /// Only this domain's certificate.
        domain: Option<String>,
    },
}
