//! What operators see and do without SSH gymnastics: `/metrics` (parsed with a Prometheus
//! text parser), `berth status`, and `berth deploy`, against the real binary and Docker.

use std::process::Command;
use std::time::Duration;

use berth_tests::{berth_bin, config_toml, curl, env, free_port, log_field, wait_for, Berth, Ports, TestApp, TestDir};
use prometheus_parse::{Scrape, Value};

fn scrape(port: u16) -> Scrape {
    let (code, body) = curl(&[&format!("http://127.0.0.1:{port}/metrics")]);
    assert_eq!(code, 200, "{body}");
    Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("valid Prometheus text format")
}

/// The value of `metric` whose labels include all of `labels`.
fn value(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples.iter().find(|x| x.metric == metric && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v))).map(|x| {
        match &x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(h) => h.iter().map(|b| b.count).fold(0.0, f64::max),
            Value::Summary(_) => f64::NAN,
        }
    })
}

/// The test app as `[apps.NAME]`, health-checked every 300 ms, with `keys` added to its
/// table and `tables` (its sub-tables) after it.
fn app_toml(name: &str, keys: &str, tables: &str) -> String {
    format!(
        "\n[apps.{name}]\nimage = \"{image}\"\nport = 8080\npull = \"never\"\n{keys}[apps.{name}.health]\npath = \"/health\"\ninterval = \"300ms\"\n{tables}",
        image = env("BERTH_TEST_APP_IMAGE"),
    )
}

/// `src` with `/metrics` served on `port`.
fn with_metrics(src: String, port: u16) -> String {
    src.replace("metrics_listen = \"\"", &format!("metrics_listen = \"127.0.0.1:{port}\""))
}

fn berth_cmd(args: &[&str], cfg: &std::path::Path) -> (i32, String, String) {
    let out = Command::new(berth_bin()).args(args).arg("-c").arg(cfg).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn metrics_status_and_deploy() {
    let dir = TestDir::new();
    let ports = Ports::pick();
    let metrics_port = free_port();
    let app = TestApp::new("obs");
    let restart = format!("[apps.{}.restart]\ninitial_backoff = \"200ms\"\nmax_backoff = \"1s\"\n", app.name);
    let rest = app_toml(&app.name, "", &restart);
    let src = with_metrics(config_toml(&dir, ports, "0s", "2s", &rest), metrics_port)
        .replace("[http]\n", "[http]\naccess_log = \"all\"\n");
    let cfg = dir.write("berth.toml", &src);
    let berth = Berth::spawn(Berth::command(&cfg), &dir);
    wait_for("healthy", Duration::from_secs(30), || {
        (curl(&[&format!("http://127.0.0.1:{}/_berth/health", ports.http)]).0 == 200).then_some(())
    });

    // Traffic: exactly seven requests, and the counter moves by exactly seven.
    let s0 = scrape(metrics_port);
    let before = value(&s0, "berth_http_requests_total", &[("app", &app.name), ("code", "200")]).unwrap_or(0.0);
    for _ in 0..7 {
        assert_eq!(curl(&["-k", &format!("https://127.0.0.1:{}/", ports.https)]).0, 200);
    }
    let s1 = scrape(metrics_port);
    // access_log = "all": one event per request, with the fields an operator filters on.
    let logs = berth.logs();
    let events: Vec<&str> =
        logs.lines().filter(|l| l.contains(" request ") && log_field(l, "app", &app.name)).collect();
    assert!(events.len() >= 7, "7 access events expected:\n{logs}");
    for (key, value) in [
        ("method", "GET"),
        ("path", "/"),
        ("status", "200"),
        ("duration_us", ""),
        ("bytes", ""),
        ("peer", "127.0.0.1"),
        ("host", "127.0.0.1:"),
    ] {
        assert!(
            events.iter().all(|l| log_field(l, key, value)),
            "access events lack {key}={value}:\n{}",
            events.join("\n")
        );
    }
    // The container's address as berth reached it.
    for l in &events {
        let upstream = l.split(" upstream=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or_default();
        assert!(upstream.parse::<std::net::SocketAddr>().is_ok(), "upstream is not ip:port in {l}");
    }
    assert_eq!(value(&s1, "berth_http_requests_total", &[("app", &app.name), ("code", "200")]), Some(before + 7.0));
    assert!(value(&s1, "berth_http_request_duration_seconds_count", &[("app", &app.name)]).unwrap_or(0.0) >= 7.0);
    assert_eq!(value(&s1, "berth_app_healthy", &[("app", &app.name)]), Some(1.0));
    assert_eq!(value(&s1, "berth_container_restarts_total", &[("app", &app.name)]), Some(0.0));
    assert_eq!(value(&s1, "berth_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), Some(1.0));

    // A crash: the restart counter moves and health comes back.
    let id = app.containers(true)[0].clone();
    Command::new("docker").args(["kill", &id]).output().unwrap();
    wait_for("the restart to be counted", Duration::from_secs(20), || {
        (value(&scrape(metrics_port), "berth_container_restarts_total", &[("app", &app.name)]) == Some(1.0))
            .then_some(())
    });
    wait_for("healthy again", Duration::from_secs(20), || {
        (value(&scrape(metrics_port), "berth_app_healthy", &[("app", &app.name)]) == Some(1.0)).then_some(())
    });

    // berth status: the app, its health, container and restarts.
    let (code, out, err) = berth_cmd(&["status"], &cfg);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&app.name) && out.contains("healthy"), "{out}");
    assert!(out.contains(&id[..12]), "status names the container: {out}");
    let (code, json, _) = berth_cmd(&["status", "--json"], &cfg);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["apps"][&app.name]["restarts"], 1, "{json}");
    assert_eq!(v["apps"][&app.name]["healthy"], true, "{json}");
    // Requests go to the container's own address, as Docker reports it.
    let ip = std::process::Command::new("docker")
        .args(["inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", &id])
        .output()
        .unwrap();
    let upstream = format!("{}:8080", String::from_utf8_lossy(&ip.stdout).trim());
    assert_eq!(v["apps"][&app.name]["upstream"], upstream.as_str(), "{json}");
    assert!(out.contains(&format!("requests go to {upstream}")), "{out}");

    // berth deploy: a new image rolls out and the command waits for it.
    let (code, out, err) = berth_cmd(&["deploy", &app.name, "--image", "berth-testapp:v2"], &cfg);
    assert_eq!(code, 0, "{out}{err}\n{}", berth.logs());
    assert!(out.contains("now serving container"), "{out}");
    let served = curl(&["-k", &format!("https://127.0.0.1:{}/", ports.https)]);
    assert!(served.1.starts_with("testapp v2 "), "{served:?}\n{}", berth.logs());
    // A deploy that cannot work: exit 1, and the current container keeps serving.
    let (code, _, err) = berth_cmd(&["deploy", &app.name, "--image", "berth-testapp:does-not-exist"], &cfg);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("rollout failed"), "{err}");
    let served = curl(&["-k", &format!("https://127.0.0.1:{}/", ports.https)]);
    assert!(served.1.starts_with("testapp v2 "), "{served:?}\n{}", berth.logs());
    let (code, _, err) = berth_cmd(&["deploy", "no-such-app"], &cfg);
    assert_eq!(code, 1);
    assert!(err.contains("no app named no-such-app"), "{err}");
}

/// `max_connections` as an operator meets it: a burst past the cap waits in berth (the
/// container never sees more connections than the cap), `/metrics` shows the waiting
/// requests and the open connections, the journal says once that the app is at its cap, and
/// a reload that raises the cap lets the next burst through in one wave.
#[test]
fn a_burst_past_max_connections_waits_shows_in_metrics_and_a_reload_raises_the_cap() {
    const SLEEP_MS: u64 = 1500;
    let dir = TestDir::new();
    let ports = Ports::pick();
    let metrics_port = free_port();
    let app = TestApp::new("cap");
    let rest = app_toml(&app.name, "max_connections = 2\n", "");
    let src = with_metrics(config_toml(&dir, ports, "0s", "2s", &rest), metrics_port);
    let cfg = dir.write("berth.toml", &src);
    let berth = Berth::spawn(Berth::command(&cfg), &dir);
    wait_for("healthy", Duration::from_secs(30), || {
        (curl(&["-k", &format!("https://127.0.0.1:{}/", ports.https)]).0 == 200).then_some(())
    });
    let labels = [("app", app.name.as_str())];
    assert_eq!(value(&scrape(metrics_port), "berth_app_max_connections", &labels), Some(2.0));

    // Six slow requests at once; each curl is its own client connection.
    let burst = |n: usize| -> Vec<std::thread::JoinHandle<u16>> {
        (0..n)
            .map(|_| {
                let url = format!("https://127.0.0.1:{}/sleep?ms={SLEEP_MS}", ports.https);
                std::thread::spawn(move || curl(&["-k", &url]).0)
            })
            .collect()
    };
    let started = std::time::Instant::now();
    let requests = burst(6);
    let during = wait_for("requests waiting at the cap", Duration::from_secs(5), || {
        let s = scrape(metrics_port);
        (value(&s, "berth_app_requests_waiting", &labels) == Some(4.0)).then_some(s)
    });
    assert_eq!(value(&during, "berth_app_connections", &[("app", app.name.as_str()), ("state", "open")]), Some(2.0));
    assert_eq!(
        value(&during, "berth_app_requests_in_flight", &labels),
        Some(6.0),
        "waiting requests count as in flight"
    );
    // `berth status` says the same, for an operator on the instance.
    let (code, json, err) = berth_cmd(&["status", "--json"], &cfg);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let conns = &v["apps"][&app.name]["connections"];
    assert_eq!(conns["max"], 2, "{json}");
    assert_eq!(conns["open"], 2, "{json}");
    assert!(conns["waiting"].as_u64().is_some_and(|w| w >= 1), "requests still wait a wave later: {json}");
    let (_, out, _) = berth_cmd(&["status"], &cfg);
    assert!(out.contains("of max 2") && out.contains("at max_connections"), "{out}");
    for r in requests {
        assert_eq!(r.join().unwrap(), 200, "every request past the cap is served, late");
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(3 * SLEEP_MS - 200),
        "6 requests over 2 connections take 3 waves; took {took:?}"
    );
    let s = scrape(metrics_port);
    assert_eq!(value(&s, "berth_app_requests_waiting", &labels), Some(0.0));
    assert_eq!(value(&s, "berth_app_requests_in_flight", &labels), Some(0.0));
    let logs = berth.logs();
    let warnings = logs.lines().filter(|l| l.contains("every connection to the app is busy")).count();
    assert_eq!(warnings, 1, "the journal hears once about a burst at the cap:\n{logs}");
    assert!(
        logs.lines().any(|l| l.contains("every connection to the app is busy") && log_field(l, "max_connections", "2")),
        "the warning names the cap:\n{logs}"
    );

    // Raise the cap in place: the same container, the next burst in one wave.
    let container = app.containers(true);
    dir.write("berth.toml", &src.replace("max_connections = 2", "max_connections = 6"));
    berth.signal("HUP");
    wait_for("the new cap", Duration::from_secs(10), || {
        (value(&scrape(metrics_port), "berth_app_max_connections", &labels) == Some(6.0)).then_some(())
    });
    let started = std::time::Instant::now();
    for r in burst(6) {
        assert_eq!(r.join().unwrap(), 200);
    }
    let took = started.elapsed();
    assert!(took < Duration::from_millis(2 * SLEEP_MS), "6 requests under a cap of 6 run at once; took {took:?}");
    assert_eq!(app.containers(true), container, "a new cap does not restart the app");
}
