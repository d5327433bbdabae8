//! The daemon's life as systemd sees it, with the real binary: READY/STATUS/WATCHDOG/
//! STOPPING over a notify socket the test binds, the stop sequence on SIGTERM, and socket
//! activation through `systemd-socket-activate`.

use std::process::Command;
use std::time::{Duration, Instant};

use berth_tests::notify::NotifySocket;
use berth_tests::{config_toml, curl, free_port, wait_for, Berth, Ports, TestApp, TestDir};

fn health(port: u16) -> (u16, String) {
    curl(&[&format!("http://127.0.0.1:{port}/_berth/health")])
}

#[test]
fn notifies_systemd_and_stops_cleanly_on_sigterm() {
    let dir = TestDir::new();
    let ports = Ports::pick();
    let cfg = dir.write("berth.toml", &config_toml(&dir, ports, "1500ms", "2s", ""));
    let mut notify = NotifySocket::bind(dir.path());

    // systemd sets WATCHDOG_PID to the service's pid; `exec` keeps the shell's pid for berth.
    // 400 ms watchdog: berth must ping at half of it, i.e. about every 200 ms.
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("WATCHDOG_PID=$$ exec \"$0\" run -c \"$1\"")
        .arg(berth_tests::berth_bin())
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &notify.path)
        .env("WATCHDOG_USEC", "400000")
        .env_remove("LISTEN_FDS");
    let mut berth = Berth::spawn(cmd, &dir);

    assert!(
        notify.wait_for("READY=1", Duration::from_secs(10)),
        "no READY=1; got {:?}\n{}",
        notify.received,
        berth.logs()
    );
    // READY=1 and its STATUS= come in one datagram: the line `systemctl status berth` shows
    // from the moment the unit counts as started. No apps, no secrets: nothing to wait for.
    assert_eq!(
        status_after(&notify.received, "READY=1"),
        Some("serving: no apps configured"),
        "READY must say what berth serves: {:?}",
        notify.received
    );
    // READY means the listeners answer.
    assert_eq!(health(ports.http).0, 200, "no apps configured: healthy");

    // The watchdog: at least three pings within a second.
    let before = notify.received.iter().filter(|l| *l == "WATCHDOG=1").count();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(1) {
        notify.wait_for("\u{0}never", Duration::from_millis(100));
    }
    let pings = notify.received.iter().filter(|l| *l == "WATCHDOG=1").count() - before;
    assert!(pings >= 3, "expected WATCHDOG=1 about every 200 ms, got {pings} in 1 s");

    // SIGTERM: STOPPING=1, health turns 503 while the listener still answers (drain_delay),
    // then a clean exit 0 within drain_delay + drain_timeout.
    let stop_started = Instant::now();
    berth.signal("TERM");
    assert!(notify.wait_for("STOPPING=1", Duration::from_secs(5)), "no STOPPING=1: {:?}", notify.received);
    // The operator sees that berth is stopping and how long the listeners stay up.
    assert_eq!(
        status_after(&notify.received, "STOPPING=1"),
        Some("stopping: draining for 1s 500ms"),
        "STOPPING must say it drains, for drain_delay: {:?}",
        notify.received
    );
    let (code, body) = health(ports.http);
    assert_eq!(code, 503, "health must turn 503 as soon as the stop begins: {body}");
    assert!(body.contains("\"draining\":true"), "{body}");
    let status = berth.wait_timeout(Duration::from_millis(1500 + 2000 + 1500)).expect("berth did not exit in time");
    assert_eq!(status.code(), Some(0), "clean stop exits 0\n{}", berth.logs());
    assert!(stop_started.elapsed() >= Duration::from_millis(1500), "listeners must stay up for drain_delay");
    assert_eq!(health(ports.http).0, 0, "listener is closed after the stop");
    // Whatever berth said after STOPPING=1 (it may refresh the line while it drains), it
    // must never claim again to be serving.
    notify.wait_for("\u{0}never", Duration::from_millis(200));
    let stopping = notify.received.iter().position(|l| l == "STOPPING=1").unwrap();
    let later: Vec<&String> = notify.received[stopping..].iter().filter(|l| l.starts_with("STATUS=")).collect();
    assert!(later.iter().all(|l| l.starts_with("STATUS=stopping")), "status after STOPPING=1: {later:?}");
}

/// The `STATUS=` text sent in the same datagram as `state` (sd_notify puts each state on
/// its own line, in order, so it is the line right after the first `state`).
fn status_after<'a>(received: &'a [String], state: &str) -> Option<&'a str> {
    let at = received.iter().position(|l| l == state)?;
    received.get(at + 1)?.strip_prefix("STATUS=")
}

#[test]
fn health_is_503_until_apps_are_healthy_and_http_redirects_to_https() {
    let dir = TestDir::new();
    let ports = Ports::pick();
    // An app of its own, whose container is removed when the test ends: berth leaves app
    // containers running when it stops, and one labelled for a common name ("web") would be
    // adopted by the next berth configured with that name (scripts/demo's, for one).
    let app = TestApp::new("web");
    let apps = format!("\n[apps.{}]\nimage = \"berth-testapp:latest\"\nport = 8080\n", app.name);
    let cfg = dir.write("berth.toml", &config_toml(&dir, ports, "0s", "1s", &apps));
    let berth = Berth::spawn(Berth::command(&cfg), &dir);
    let (code, body) = wait_for("health to answer", Duration::from_secs(10), || {
        let r = health(ports.http);
        (r.0 != 0).then_some(r)
    });
    assert_eq!(code, 503, "{body}\n{}", berth.logs());
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(json["unhealthy"][&app.name].is_string(), "the body names the unhealthy app: {body}");

    // Everything that is not ACME or health goes to https, keeping path and query.
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}", "-H", "Host: api.example.com"])
        .arg(format!("http://127.0.0.1:{}/a/b?c=d", ports.http))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text, format!("308 https://api.example.com:{}/a/b?c=d", ports.https));

    // ACME path with a malformed token: 404, never a redirect.
    assert_eq!(curl(&[&format!("http://127.0.0.1:{}/.well-known/acme-challenge/..%2f..%2fetc", ports.http)]).0, 404);

    // :443 serves TLS right away (self-signed) and answers the health path too.
    let (code, _) = curl(&["-k", &format!("https://127.0.0.1:{}/_berth/health", ports.https)]);
    assert_eq!(code, 503);
    // Docker finishes a create berth asked for even if berth is killed meanwhile; wait for
    // it, so the TestApp cleanup sees (and removes) the container instead of racing it.
    wait_for("the app container to exist", Duration::from_secs(30), || {
        (!app.containers(false).is_empty()).then_some(())
    });
}

#[test]
fn serves_self_signed_tls_for_the_configured_domains() {
    let dir = TestDir::new();
    let ports = Ports::pick();
    let tls = "[tls]\nmode = \"self-signed\"\ndomains = [\"app.test\"]\n";
    let cfg = dir.write("berth.toml", &config_toml(&dir, ports, "0s", "1s", tls));
    let berth = Berth::spawn(Berth::command(&cfg), &dir);
    wait_for("https listener", Duration::from_secs(10), || (health(ports.http).0 != 0).then_some(()));
    let out = Command::new("curl")
        .args(["-s", "-k", "-v", "-o", "/dev/null", "--resolve"])
        .arg(format!("app.test:{}:127.0.0.1", ports.https))
        .arg(format!("https://app.test:{}/_berth/health", ports.https))
        .output()
        .unwrap();
    let verbose = String::from_utf8_lossy(&out.stderr);
    assert!(verbose.contains("subject: CN=berth self-signed app.test"), "{verbose}\n{}", berth.logs());
    assert!(verbose.contains("ALPN: server accepted h2"), "{verbose}");
}

#[test]
fn uses_socket_activated_listeners() {
    let dir = TestDir::new();
    // The config names other ports: berth must use the sockets it is given, not bind these.
    let configured = Ports::pick();
    let cfg = dir.write("berth.toml", &config_toml(&dir, configured, "0s", "1s", ""));
    let (http, https) = (free_port(), free_port());
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.arg("-l")
        .arg(format!("127.0.0.1:{http}"))
        .arg("-l")
        .arg(format!("127.0.0.1:{https}"))
        .arg("--fdname=http:https")
        .arg(berth_tests::berth_bin())
        .args(["run", "-c"])
        .arg(&cfg)
        .env_remove("NOTIFY_SOCKET");
    let mut berth = Berth::spawn(cmd, &dir);
    // systemd-socket-activate accepts on our behalf only when the first connection comes;
    // berth then receives both listening sockets.
    let (code, _) = wait_for("activated http socket", Duration::from_secs(10), || {
        let r = health(http);
        (r.0 != 0).then_some(r)
    });
    assert_eq!(code, 200, "{}", berth.logs());
    assert_eq!(curl(&["-k", &format!("https://127.0.0.1:{https}/_berth/health")]).0, 200);
    assert!(berth.logs().contains("using socket from systemd"), "{}", berth.logs());
    assert_eq!(health(configured.http).0, 0, "the configured address must not be bound");
    berth.signal("TERM");
    assert_eq!(berth.wait_timeout(Duration::from_secs(5)).and_then(|s| s.code()), Some(0));
}

#[test]
fn sighup_does_not_kill_the_daemon() {
    let dir = TestDir::new();
    let ports = Ports::pick();
    let cfg = dir.write("berth.toml", &config_toml(&dir, ports, "0s", "1s", ""));
    let mut berth = Berth::spawn(Berth::command(&cfg), &dir);
    wait_for("listener", Duration::from_secs(10), || (health(ports.http).0 == 200).then_some(()));
    berth.signal("HUP");
    std::thread::sleep(Duration::from_millis(300));
    assert!(berth.child.try_wait().unwrap().is_none(), "SIGHUP killed berth\n{}", berth.logs());
    assert_eq!(health(ports.http).0, 200);
}

#[test]
fn a_reload_names_what_only_a_restart_applies() {
    let dir = TestDir::new();
    let ports = Ports::pick();
    let original = config_toml(&dir, ports, "0s", "1s", "");
    let cfg = dir.write("berth.toml", &original);
    let mut berth = Berth::spawn(Berth::command(&cfg), &dir);
    wait_for("listener", Duration::from_secs(10), || (health(ports.http).0 == 200).then_some(()));

    let listen = format!("[http]\nlisten = \"127.0.0.1:{}\"\n", ports.http);
    assert!(original.contains(&listen), "{original}");
    let edited = original.replace(&listen, &format!("{listen}health_path = \"/healthz\"\naccess_log = \"all\"\n"));
    dir.write("berth.toml", &edited);
    berth.signal("HUP");
    let line = wait_for("the reload's log line", Duration::from_secs(10), || {
        berth.logs().lines().find(|l| l.contains("restart_needed_for")).map(str::to_owned)
    });
    assert!(line.contains("[http] health_path"), "{line}");
    assert!(line.contains("[http] access_log"), "{line}");
    assert!(!line.contains("listeners"), "the listen addresses did not change: {line}");
    // Not applied, as the log says: the old health path still answers.
    assert_eq!(health(ports.http).0, 200);
}
