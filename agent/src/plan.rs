//! `berth check`'s output: the config as berth will act on it, defaults filled in, so an
//! operator sees what will happen before it happens.

use std::fmt::Write;

use crate::config::{env_name_for_parameter, Config, RegistryAuth, SecretSelection, TlsMode};

pub fn render(config: &Config, path: &std::path::Path) -> String {
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(w, "config {} is valid", path.display());
    let _ = writeln!(w, "\nlisteners");
    let _ = writeln!(
        w,
        "  http    {} (ACME HTTP-01, health {}, redirect to https)",
        config.http.listen, config.http.health_path
    );
    let _ = writeln!(w, "  https   {}", config.https.listen);
    let metrics = if config.agent.metrics_listen.is_empty() { "off" } else { &config.agent.metrics_listen };
    let _ = writeln!(w, "  metrics {metrics}");
    let _ = writeln!(w, "  admin   {}", config.agent.admin_socket.display());
    let _ = writeln!(
        w,
        "  stop    health 503, wait {}, then drain up to {}",
        config.agent.drain_delay, config.agent.drain_timeout
    );

    let _ = writeln!(w, "\ntls");
    let domains = if config.tls.domains.is_empty() { "(none)".to_string() } else { config.tls.domains.join(", ") };
    match config.tls.mode {
        TlsMode::Acme => {
            let acme = config.acme();
            let _ = writeln!(w, "  mode    acme for {domains}");
            let _ = writeln!(w, "  ca      {}", acme.directory);
            match &acme.shared {
                Some(prefix) => {
                    let _ = writeln!(w, "  fleet   account, certificate and order lock shared in SSM under {prefix}");
                }
                None => {
                    let _ = writeln!(w, "  fleet   not shared (each instance orders its own certificate)");
                }
            }
            let _ = writeln!(w, "  until   issued, a self-signed certificate serves");
        }
        TlsMode::SelfSigned => {
            let _ =
                writeln!(w, "  mode    self-signed for {domains} (fine behind an ALB, which does not verify targets)");
        }
        TlsMode::Files => {
            let _ = writeln!(
                w,
                "  mode    files {} / {} (reloaded on change)",
                config.tls.cert_file.as_deref().unwrap_or(std::path::Path::new("?")).display(),
                config.tls.key_file.as_deref().unwrap_or(std::path::Path::new("?")).display()
            );
        }
    }

    let _ = writeln!(w, "\nsecrets");
    if !config.has_secrets() {
        let _ = writeln!(w, "  (none)");
    } else {
        if let Some(p) = &config.secrets.path {
            let _ =
                writeln!(w, "  path    {p} (recursive, decrypted; names mapped like {p}db/password -> DB_PASSWORD)");
        }
        for p in &config.secrets.parameters {
            let _ = writeln!(w, "  param   {p} -> {}", env_name_for_parameter(p));
        }
        let refresh = if config.secrets.refresh_interval.is_zero() {
            "fetched once".to_string()
        } else {
            format!("refreshed every {}", config.secrets.refresh_interval)
        };
        let _ = writeln!(
            w,
            "  refresh {refresh}, on change: {}",
            match config.secrets.on_change {
                crate::config::OnChange::Redeploy => "redeploy",
                crate::config::OnChange::Ignore => "ignore",
            }
        );
    }

    let _ = writeln!(w, "\napps");
    if config.apps.is_empty() {
        let _ = writeln!(w, "  (none)");
    }
    for (name, app) in &config.apps {
        let _ = writeln!(w, "  {name}");
        let _ = writeln!(w, "    image   {} (pull {})", app.image, app.pull);
        let auth = match &app.registry_auth {
            RegistryAuth::None => "none".to_string(),
            RegistryAuth::Ecr => "ecr".to_string(),
            RegistryAuth::Basic { username, password } => format!("basic, from SSM {username} / {password}"),
        };
        let _ = writeln!(w, "    auth    {auth}");
        let _ = writeln!(w, "    port    {} (published on 127.0.0.1 only)", app.port);
        let routes = if app.routes.is_empty() { "every request".to_string() } else { app.routes.join(", ") };
        let _ = writeln!(w, "    routes  {routes}");
        let secrets = match &app.secrets {
            SecretSelection::All if config.has_secrets() => "all".to_string(),
            SecretSelection::All => "none configured".to_string(),
            SecretSelection::Only(n) if n.is_empty() => "none".to_string(),
            SecretSelection::Only(n) => n.join(", "),
        };
        let _ = writeln!(w, "    secrets {secrets}");
        if !app.env.is_empty() {
            let keys: Vec<&str> = app.env.keys().map(String::as_str).collect();
            let _ = writeln!(w, "    env     {}", keys.join(", "));
        }
        let health = match &app.health.path {
            Some(p) => format!(
                "GET {p} every {} (timeout {}, healthy after {}, unhealthy after {}, grace {})",
                app.health.interval,
                app.health.timeout,
                app.health.healthy_threshold,
                app.health.unhealthy_threshold,
                app.health.start_period
            ),
            None => "running container counts as healthy".to_string(),
        };
        let _ = writeln!(w, "    health  {health}");
        let mut limits = Vec::new();
        if let Some(m) = &app.memory {
            limits.push(format!("memory {m}"));
        }
        if let Some(c) = app.cpus {
            limits.push(format!("cpus {c}"));
        }
        limits.push(format!("stop timeout {}", app.stop_timeout));
        limits.push(format!("at most {} connections to the app", app.max_connections));
        let _ = writeln!(w, "    limits  {}", limits.join(", "));
        let _ = writeln!(w, "    restart backoff {} .. {}", app.restart.initial_backoff, app.restart.max_backoff);
        if !app.watch_image.is_zero() {
            let _ = writeln!(w, "    watch   image digest every {}", app.watch_image);
        }
    }
    out
}
