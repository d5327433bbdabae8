//! Container supervision through the real Docker Engine, driven by the real binary: the
//! container's environment, crash restarts with backoff, adoption after `kill -9`, and
//! rollouts under load with zero failed requests, and a restart of the Docker Engine itself
//! (on a private dockerd: the shared one is never stopped).

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use berth_tests::dockerd::PrivateDockerd;
use berth_tests::notify::NotifySocket;
use berth_tests::{berth_bin, config_toml, curl, env, load, ssm_put, wait_for, Berth, Ports, TestApp, TestDir};

fn health(ports: Ports) -> (u16, String) {
    curl(&[&format!("http://127.0.0.1:{}/_berth/health", ports.http)])
}

fn get(ports: Ports, path: &str) -> (u16, String) {
    curl(&["-k", &format!("https://127.0.0.1:{}{path}", ports.https)])
}

/// Config for one app (no routes: it takes every host, so clients can use 127.0.0.1),
/// secrets from `prefix` in moto refreshed every second.
fn app_config(dir: &TestDir, ports: Ports, app: &TestApp, prefix: &str, app_extra: &str) -> String {
    let rest = format!(
        r#"
[aws]
region = "us-east-1"
endpoint_url = "{moto}"

[secrets]
path = "{prefix}"
refresh_interval = "1s"

[apps.{name}]
image = "{image}"
port = 8080
pull = "never"
stop_timeout = "2s"
env = {{ GREETING = "hello", QUOTED = "a \"b\" = c" }}
{app_extra}
[apps.{name}.health]
path = "/health"
interval = "500ms"
timeout = "1s"
start_period = "3s"
[apps.{name}.restart]
initial_backoff = "500ms"
max_backoff = "8s"
"#,
        moto = env("BERTH_TEST_MOTO_URL"),
        name = app.name,
        image = env("BERTH_TEST_APP_IMAGE"),
    );
    config_toml(dir, ports, "0s", "5s", &rest)
}

fn spawn(cfg: &std::path::Path, dir: &TestDir) -> Berth {
    let mut cmd = Berth::command(cfg);
    cmd.env("BERTH_LOG", "info,berth=debug");
    Berth::spawn(cmd, dir)
}

fn wait_healthy(ports: Ports, berth: &Berth) {
    wait_for("the app to become healthy", Duration::from_secs(30), || {
        let (code, body) = health(ports);
        if code == 0 {
            return None;
        }
        (code == 200).then_some(()).or_else(|| {
            assert!(!body.contains("never became healthy"), "{body}\n{}", berth.logs());
            None
        })
    });
}

fn prefix(tag: &str) -> String {
    format!("/berth-test/{}/{tag}/", std::process::id())
}

#[test]
fn container_env_is_exactly_config_plus_secrets_and_nothing_reaches_disk() {
    let dir = TestDir::new();
    let ports = Ports::pick();
    let app = TestApp::new("env");
    let p = prefix("env");
    let tricky = [
        ("db/password", "p=ss\nword \"quoted\" 'single' ünïcødé ✓"),
        ("api-key", "sk_live_0123456789abcdef"),
        ("nested/deeper/token", "tok=en=with=equals"),
    ];
    for (k, v) in tricky {
        ssm_put(&format!("{p}{k}"), v);
    }
    let cfg = dir.write("berth.toml", &app_config(&dir, ports, &app, &p, ""));
    let berth = spawn(&cfg, &dir);
    wait_healthy(ports, &berth);

    let (code, body) = get(ports, "/env");
    assert_eq!(code, 200, "{body}");
    let got: BTreeMap<String, String> = serde_json::from_str(&body).unwrap();
    // What the image and Docker add on their own; everything else must come from berth.
    let from_image_and_docker = ["PATH", "HOSTNAME", "HOME", "VERSION"];
    let from_berth: BTreeMap<String, String> =
        got.into_iter().filter(|(k, _)| !from_image_and_docker.contains(&k.as_str())).collect();
    let expected: BTreeMap<String, String> = [
        ("GREETING", "hello"),
        ("QUOTED", "a \"b\" = c"),
        ("DB_PASSWORD", tricky[0].1),
        ("API_KEY", tricky[1].1),
        ("NESTED_DEEPER_TOKEN", tricky[2].1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(from_berth, expected);

    // The secret values live in the container's environment (Docker's own store) and in
    // berth's memory, nowhere in any file berth wrote.
    let state = dir.path().join("state");
    for entry in walk(&state) {
        let data = std::fs::read(&entry).unwrap();
        for (_, v) in tricky {
            assert!(!String::from_utf8_lossy(&data).contains(v), "{} contains a secret value", entry.display());
        }
    }
    let logs = berth.logs();
    for (_, v) in tricky {
        assert!(!logs.contains(v), "a secret value is in the log");
    }
    // Labels: the app and a config hash, never a value.
    let id = &app.containers(true)[0];
    let labels = TestApp::inspect(id, "{{json .Config.Labels}}");
    assert!(labels.contains(&format!("\"berth.app\":\"{}\"", app.name)), "{labels}");
    assert!(labels.contains("berth.config-hash"), "{labels}");
    assert_eq!(TestApp::inspect(id, "{{.HostConfig.Init}}"), "true");
    let bindings = TestApp::inspect(id, "{{json .HostConfig.PortBindings}}");
    assert!(bindings.contains("\"HostIp\":\"127.0.0.1\""), "published on loopback only: {bindings}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else if p.is_file() {
                // Regular files only: the admin socket lives here too.
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn crash_loop_is_restarted_with_growing_delays_and_berth_stays_up() {
    let dir = TestDir::new();
    let ports = Ports::pick();
    let app = TestApp::new("crash");
    let p = prefix("crash");
    ssm_put(&format!("{p}unused"), "x");
    // The app exits 1 at once, every time.
    let extra = "";
    let src = app_config(&dir, ports, &app, &p, extra)
        .replace("env = { GREETING = \"hello\", QUOTED = \"a \\\"b\\\" = c\" }", "env = { EXIT_AT_START = \"1\" }");
    assert!(src.contains("EXIT_AT_START"));
    let cfg = dir.write("berth.toml", &src);
    let mut berth = spawn(&cfg, &dir);

    // Collect container start times from Docker's own event stream.
    let since = chrono_now();
    let starts = wait_for("five container starts", Duration::from_secs(40), || {
        let s = docker_start_times(&app, &since);
        (s.len() >= 5).then_some(s)
    });
    let gaps: Vec<f64> = starts.windows(2).map(|w| w[1] - w[0]).collect();
    // Backoff 500ms → 8s, doubling, with equal jitter: the k-th wait is at least half of
    // 500ms·2^k (8s at most), and a gap between starts is that wait plus Docker's start
    // and the crash. (Not "never shrinks": under the parallel suite one docker start can
    // take a second longer than the next, which is Docker's latency, not our backoff.)
    for (k, gap) in gaps.iter().enumerate() {
        let lower_bound = (0.25 * f64::from(1u32 << k.min(8))).min(4.0);
        assert!(
            *gap >= lower_bound - 0.05,
            "restart {} came after {gap:.2}s, before its backoff ({lower_bound}s at least): {gaps:?}",
            k + 1
        );
    }
    assert!(gaps.last().unwrap() > &(gaps[0] + 0.4), "delays must grow: {gaps:?}");

    // Between crashes the app is briefly "starting" (just started, not yet probed), then
    // "restarting" for the whole backoff; the 503 must say so within one crash cycle.
    let (code, body) = wait_for("health to say restarting", Duration::from_secs(10), || {
        let (code, body) = health(ports);
        body.contains("restarting").then_some((code, body))
    });
    assert_eq!(code, 503, "{body}");
    assert!(berth.logs().contains("exit_code=1"), "the exit code is logged:\n{}", berth.logs());
    assert_eq!(app.containers(false).len(), 1, "restarted in place, not replaced");
    assert!(berth.child.try_wait().unwrap().is_none(), "berth must stay up");
    assert_eq!(get(ports, "/").0, 503, "an app that is down answers 503, not a hang");
}

fn chrono_now() -> String {
    let out = Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%S"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Start times (seconds, fractional) of this app's containers, from `docker events`.
fn docker_start_times(app: &TestApp, since: &str) -> Vec<f64> {
    let out = Command::new("docker")
        .args([
            "events",
            "--since",
            since,
            "--until",
            "0s",
            "--filter",
            &format!("label=berth.app={}", app.name),
            "--filter",
            "event=start",
            "--format",
            "{{.TimeNano}}",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse::<f64>().ok())
        .map(|ns| ns / 1e9)
        .collect()
}

#[test]
fn kill_9_then_a_new_berth_adopts_the_running_container() {
    let dir = TestDir::new();
    let ports = Ports::pick();
    let app = TestApp::new("adopt");
    let p = prefix("adopt");
    ssm_put(&format!("{p}token"), "adopt-me");
    let cfg = dir.write("berth.toml", &app_config(&dir, ports, &app, &p, ""));
    let mut first = spawn(&cfg, &dir);
    wait_healthy(ports, &first);
    let ids = app.containers(true);
    assert_eq!(ids.len(), 1);
    let id = ids[0].clone();
    let started_at = TestApp::inspect(&id, "{{.State.StartedAt}}");
    let published = TestApp::inspect(&id, "{{(index (index .NetworkSettings.Ports \"8080/tcp\") 0).HostPort}}");

    first.signal("KILL");
    first.wait_timeout(Duration::from_secs(5)).expect("killed");
    // With berth gone, the app itself keeps serving on its port.
    assert_eq!(curl(&[&format!("http://127.0.0.1:{published}/health")]).0, 200);

    let second = spawn(&cfg, &dir);
    wait_healthy(ports, &second);
    assert_eq!(app.containers(true), vec![id.clone()], "same container, no new one");
    assert_eq!(TestApp::inspect(&id, "{{.State.StartedAt}}"), started_at, "not restarted");
    assert!(second.logs().contains("adopting the running container"), "{}", second.logs());
    assert_eq!(get(ports, "/").0, 200);
}

#[test]
fn secrets_change_rolls_out_under_load_with_zero_failed_requests() {
    let dir = TestDir::new();
    let ports = Ports::pick();
    let app = TestApp::new("roll");
    let p = prefix("roll");
    ssm_put(&format!("{p}release"), "one");
    let cfg = dir.write("berth.toml", &app_config(&dir, ports, &app, &p, ""));
    let berth = spawn(&cfg, &dir);
    wait_healthy(ports, &berth);
    let before = app.containers(true);
    assert_eq!(before.len(), 1);

    const LOAD_SECS: u32 = 10;
    let url = format!("https://127.0.0.1:{}/", ports.https);
    let load_started = Instant::now();
    let run = load(&url, LOAD_SECS, 8);
    std::thread::sleep(Duration::from_secs(1));
    let changed_at = Instant::now();
    ssm_put(&format!("{p}release"), "two");
    let new_id = wait_for("the rollout", Duration::from_secs(20), || {
        let now = app.containers(true);
        (now.len() == 1 && now != before).then(|| now[0].clone())
    });
    let took = changed_at.elapsed();
    // Zero failures only mean something if the switch happened under the load.
    let done_after = load_started.elapsed();
    assert!(
        done_after < Duration::from_secs(u64::from(LOAD_SECS) - 1),
        "the rollout must finish while the load runs ({LOAD_SECS} s); it finished after {done_after:?}"
    );
    let result = run.join().unwrap();
    assert!(result.requests > 500, "the load must be real: {result:?}");
    assert_eq!(result.failures, 0, "zero failed requests during the rollout: {result:?}\n{}", berth.logs());
    let (_, env) = get(ports, "/env");
    assert!(env.contains("\"RELEASE\":\"two\""), "the new container has the new value: {env}");
    assert!(took < Duration::from_secs(15), "rollout took {took:?}");
    assert!(berth.logs().contains("rollout complete"), "{}", berth.logs());
    assert!(!new_id.is_empty());
}

#[test]
fn a_rollout_that_never_gets_healthy_keeps_the_old_container() {
    let dir = TestDir::new();
    let ports = Ports::pick();
    let app = TestApp::new("bad");
    let p = prefix("bad");
    // The test app fails its health check when HEALTH_FAIL=1: a bad secret value is a
    // realistic way to break a new release.
    ssm_put(&format!("{p}health_fail"), "0");
    let cfg = dir.write("berth.toml", &app_config(&dir, ports, &app, &p, ""));
    let berth = spawn(&cfg, &dir);
    wait_healthy(ports, &berth);
    let old = app.containers(true);

    const LOAD_SECS: u32 = 12;
    let load_started = Instant::now();
    let run = load(&format!("https://127.0.0.1:{}/", ports.https), LOAD_SECS, 8);
    std::thread::sleep(Duration::from_millis(500));
    ssm_put(&format!("{p}health_fail"), "1");
    wait_for("the failed rollout", Duration::from_secs(20), || {
        berth.logs().contains("never became healthy").then_some(())
    });
    let failed_after = load_started.elapsed();
    assert!(
        failed_after < Duration::from_secs(u64::from(LOAD_SECS) - 1),
        "the failed rollout must be over while the load runs ({LOAD_SECS} s); it ended after {failed_after:?}"
    );
    let result = run.join().unwrap();
    assert_eq!(result.failures, 0, "{result:?}\n{}", berth.logs());
    assert!(result.requests > 500, "{result:?}");
    wait_for("the failed container to be removed", Duration::from_secs(10), || {
        (app.containers(false) == old).then_some(())
    });
    assert_eq!(health(ports).0, 200, "the old container still serves");
}

#[test]
fn two_apps_are_routed_and_supervised_independently() {
    let dir = TestDir::new();
    let ports = Ports::pick();
    let web = TestApp::new("web");
    let api = TestApp::new("api");
    let image = env("BERTH_TEST_APP_IMAGE");
    let rest = format!(
        r#"
[apps.{web}]
image = "{image}"
port = 8080
pull = "never"
routes = ["example.test/"]
env = {{ VERSION = "web" }}
[apps.{web}.health]
path = "/health"
interval = "500ms"

[apps.{api}]
image = "{image}"
port = 8080
pull = "never"
routes = ["example.test/api/"]
env = {{ VERSION = "api" }}
[apps.{api}.health]
path = "/health"
interval = "500ms"
"#,
        web = web.name,
        api = api.name,
    );
    let cfg = dir.write("berth.toml", &config_toml(&dir, ports, "0s", "2s", &rest));
    let berth = spawn(&cfg, &dir);
    wait_healthy(ports, &berth);
    let resolve = format!("example.test:{}:127.0.0.1", ports.https);
    let at = |path: &str| curl(&["-k", "--resolve", &resolve, &format!("https://example.test:{}{path}", ports.https)]);
    assert!(at("/").1.starts_with("testapp web "), "{:?}", at("/"));
    assert!(at("/api/x").1.starts_with("testapp api "), "{:?}", at("/api/x"));
    // Unknown host: 421.
    assert_eq!(
        curl(&[
            "-k",
            "--resolve",
            &format!("other.test:{}:127.0.0.1", ports.https),
            &format!("https://other.test:{}/", ports.https)
        ])
        .0,
        421
    );

    // Kill the api container: web keeps serving, api comes back by itself.
    let api_id = api.containers(true)[0].clone();
    Command::new("docker").args(["kill", &api_id]).output().unwrap();
    assert!(at("/").1.starts_with("testapp web "));
    wait_for("api to be restarted", Duration::from_secs(20), || {
        at("/api/").1.starts_with("testapp api ").then_some(())
    });
    assert_eq!(api.containers(true), vec![api_id], "restarted in place");
}

#[test]
fn reload_rolls_out_a_new_image_and_rejects_an_invalid_config() {
    let dir = TestDir::new();
    let ports = Ports::pick();
    let app = TestApp::new("reload");
    let p = prefix("reload");
    ssm_put(&format!("{p}token"), "t");
    let v1 = app_config(&dir, ports, &app, &p, "");
    let cfg = dir.write("berth.toml", &v1);
    let berth = spawn(&cfg, &dir);
    wait_healthy(ports, &berth);
    let served = get(ports, "/");
    assert!(served.1.starts_with("testapp v1 "), "{served:?}\n{}", berth.logs());

    // A new image in the config: `systemctl reload` rolls it out.
    let v2 = v1.replace(&env("BERTH_TEST_APP_IMAGE"), "berth-testapp:v2");
    assert_ne!(v1, v2);
    dir.write("berth.toml", &v2);
    berth.signal("HUP");
    wait_for("the reloaded image to serve", Duration::from_secs(20), || {
        get(ports, "/").1.starts_with("testapp v2 ").then_some(())
    });
    // The route switches first; the old container is drained, then stopped and removed.
    wait_for("the old container to be removed", Duration::from_secs(15), || {
        (app.containers(false).len() == 1).then_some(())
    });

    // An invalid config is rejected and the running one stays.
    dir.write("berth.toml", &v2.replace("port = 8080", "port = 0"));
    berth.signal("HUP");
    wait_for("the rejection", Duration::from_secs(5), || berth.logs().contains("reload rejected").then_some(()));
    assert!(berth.logs().contains("apps.") && berth.logs().contains("between 1 and 65535"), "{}", berth.logs());
    let served = get(ports, "/");
    assert!(served.1.starts_with("testapp v2 "), "{served:?}\n{}", berth.logs());
    assert_eq!(health(ports).0, 200);
}

/// berth started with no apps (a launch template whose app is filled in later): a reload
/// that adds one connects to Docker, starts the app and routes to it, without a restart.
#[test]
fn reload_adds_an_app_to_a_berth_started_with_none() {
    let dir = TestDir::new();
    let ports = Ports::pick();
    let app = TestApp::new("fromnone");
    let p = prefix("fromnone");
    ssm_put(&format!("{p}token"), "t");
    let with_app = app_config(&dir, ports, &app, &p, "");
    let apps_start = with_app.find(&format!("[apps.{}]", app.name)).expect("app_config has the app section");
    let cfg = dir.write("berth.toml", &with_app[..apps_start]);
    let mut berth = spawn(&cfg, &dir);
    wait_for("berth to serve with no apps", Duration::from_secs(15), || berth.logs().contains("ready").then_some(()));
    assert!(app.containers(false).is_empty(), "no container before the reload");

    dir.write("berth.toml", &with_app);
    berth.signal("HUP");
    wait_for("the added app to serve", Duration::from_secs(30), || {
        get(ports, "/").1.starts_with("testapp v1 ").then_some(())
    });
    assert_eq!(health(ports).0, 200, "{}", berth.logs());
    assert_eq!(app.containers(false).len(), 1, "one container for the added app");
    assert!(berth.child.try_wait().unwrap().is_none(), "berth kept running:\n{}", berth.logs());
}

fn status_json(cfg: &std::path::Path) -> serde_json::Value {
    let out = Command::new(berth_bin()).args(["status", "--json", "-c"]).arg(cfg).output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// The Docker Engine restarts under a running berth (a docker.io upgrade, `systemctl restart
/// docker`). All real: a private dockerd (its own socket, roots, containerd and bridge; see
/// `berth_tests::dockerd`) that berth reaches through `DOCKER_HOST`, stopped with SIGTERM as
/// systemd stops it, the notify socket as systemd's.
///
/// First without live-restore: dockerd's shutdown stops the app container; berth must stay
/// up, say that it waits for Docker, and start the container again once Docker is back.
/// Then with `--live-restore`: the container runs through the restart and berth keeps it
/// (same ID, same StartedAt). Its published port does not answer while dockerd is down
/// (docker-proxy dies with dockerd; the container itself runs), so the test asserts serving
/// again afterwards, not during.
#[test]
fn docker_engine_restart_berth_stays_up_reports_it_and_serves_again() {
    let Some(mut dockerd) = PrivateDockerd::start(false) else { return };
    dockerd.load_image(&env("BERTH_TEST_APP_IMAGE"));
    let dir = TestDir::new();
    let ports = Ports::pick();
    let app = TestApp::new("dockerd");
    let rest = format!(
        r#"
[apps.{name}]
image = "{image}"
port = 8080
pull = "never"
stop_timeout = "2s"
[apps.{name}.health]
path = "/health"
interval = "300ms"
timeout = "1s"
start_period = "3s"
[apps.{name}.restart]
initial_backoff = "200ms"
max_backoff = "2s"
"#,
        name = app.name,
        image = env("BERTH_TEST_APP_IMAGE"),
    );
    let cfg = dir.write("berth.toml", &config_toml(&dir, ports, "0s", "2s", &rest));
    let mut notify = NotifySocket::bind(dir.path());
    let mut cmd = Berth::command(&cfg);
    cmd.env("BERTH_LOG", "info,berth=debug").env("DOCKER_HOST", &dockerd.host).env("NOTIFY_SOCKET", &notify.path);
    let mut berth = Berth::spawn(cmd, &dir);
    let serves = |what: &str, berth: &Berth| {
        wait_for(what, Duration::from_secs(40), || (get(ports, "/health").0 == 200).then_some(()));
        assert_eq!(health(ports).0, 200, "{}", berth.logs());
    };
    serves("the app to serve through berth", &berth);
    let containers = |d: &PrivateDockerd| -> Vec<String> {
        let out = d.run(&["ps", "-aq", "--no-trunc", "--filter", &format!("label=berth.app={}", app.name)]);
        out.lines().map(str::to_owned).collect()
    };
    let ids = containers(&dockerd);
    assert_eq!(ids.len(), 1, "{ids:?}");
    let id = ids[0].clone();
    let started_1 = dockerd.inspect(&id, "{{.State.StartedAt}}");

    // `app_stopped`: Docker's shutdown took the container with it (no live-restore).
    let docker_down_reported = |notify: &mut NotifySocket, berth: &mut Berth, app_stopped: bool| {
        let waiting = wait_for("status to say berth waits for Docker", Duration::from_secs(20), || {
            status_json(&cfg)["waiting_for"].as_str().filter(|w| w.contains("Docker")).map(str::to_owned)
        });
        assert!(waiting.contains("unreachable"), "{waiting}");
        assert!(
            notify.wait_for("STATUS=waiting for Docker", Duration::from_secs(10)),
            "the systemd status line says it: {:?}",
            notify.received
        );
        assert!(berth.child.try_wait().unwrap().is_none(), "berth must stay up:\n{}", berth.logs());
        if app_stopped {
            // berth itself still answers; the app does not, so its health goes 503.
            wait_for("the health path to answer 503", Duration::from_secs(10), || {
                (health(ports).0 == 503).then_some(())
            });
        } else {
            // The container runs on, reached at its own address (not through docker-proxy,
            // which died with dockerd): requests keep being served during the outage.
            for _ in 0..10 {
                assert_eq!(get(ports, "/health").0, 200, "served while Docker is down:\n{}", berth.logs());
                assert_eq!(health(ports).0, 200, "healthy while Docker is down:\n{}", berth.logs());
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    let docker_back_reported = |cfg: &std::path::Path| {
        wait_for("status to stop waiting for Docker", Duration::from_secs(20), || {
            status_json(cfg)["waiting_for"].is_null().then_some(())
        });
    };

    // 1. No live-restore: Docker's shutdown stops the container.
    dockerd.stop();
    docker_down_reported(&mut notify, &mut berth, true);
    dockerd.restart(true);
    serves("the app to serve again after Docker came back", &berth);
    docker_back_reported(&cfg);
    assert_eq!(containers(&dockerd), vec![id.clone()], "the same container, started again");
    let started_2 = dockerd.inspect(&id, "{{.State.StartedAt}}");
    assert_ne!(started_2, started_1, "it was stopped with Docker, so it was started again");
    assert!(berth.logs().contains("the Docker restart stopped the container; starting it again"), "{}", berth.logs());
    let restarts = status_json(&cfg)["apps"][&app.name]["restarts"].as_u64().unwrap();
    assert!(restarts >= 1, "counted as a restart: {restarts}");

    // 2. live-restore: the container runs on, and berth keeps it.
    notify.received.clear();
    dockerd.stop();
    assert!(dockerd.shim_running(&id), "live-restore: the container runs without dockerd");
    docker_down_reported(&mut notify, &mut berth, false);
    dockerd.restart(true);
    serves("the app to serve again after the live-restore restart", &berth);
    docker_back_reported(&cfg);
    assert_eq!(containers(&dockerd), vec![id.clone()]);
    assert_eq!(dockerd.inspect(&id, "{{.State.StartedAt}}"), started_2, "not restarted: live-restore kept it running");
    assert!(berth.logs().contains("the container kept running through the Docker restart"), "{}", berth.logs());
    assert!(berth.child.try_wait().unwrap().is_none(), "berth must stay up");
}

/// `systemctl reload` with another `secrets.path`: the refresh loop switches to it and
/// fetches at once, and the changed set rolls the app out (`on_change = "redeploy"`) with
/// the new values in the container's environment. No value reaches berth's log.
#[test]
fn reload_to_another_secrets_path_redeploys_with_its_values() {
    let dir = TestDir::new();
    let ports = Ports::pick();
    let app = TestApp::new("secrets-reload");
    let (a, b) = (prefix("secrets-reload-a"), prefix("secrets-reload-b"));
    let stamp = std::process::id();
    let (va, vb) = (format!("from-a-{stamp}-x9q"), format!("from-b-{stamp}-k7w"));
    ssm_put(&format!("{a}api/token"), &va);
    ssm_put(&format!("{b}api/token"), &vb);
    ssm_put(&format!("{b}only/in/b"), &vb);
    // refresh_interval 1h: only the reload can make berth read /b.
    let v1 = app_config(&dir, ports, &app, &a, "").replace("refresh_interval = \"1s\"", "refresh_interval = \"1h\"");
    let cfg = dir.write("berth.toml", &v1);
    let mut berth = spawn(&cfg, &dir);
    wait_healthy(ports, &berth);
    let env_of = |id: &str| TestApp::inspect(id, "{{json .Config.Env}}");
    let first = app.containers(true);
    assert_eq!(first.len(), 1);
    assert!(env_of(&first[0]).contains(&format!("API_TOKEN={va}")), "{}", env_of(&first[0]));

    dir.write("berth.toml", &v1.replace(&a, &b));
    berth.signal("HUP");
    let now = wait_for("a container with /b's values", Duration::from_secs(30), || {
        let ids = app.containers(true);
        (ids.len() == 1 && ids != first && env_of(&ids[0]).contains(&format!("API_TOKEN={vb}"))).then_some(ids)
    });
    let env = env_of(&now[0]);
    assert!(env.contains(&format!("ONLY_IN_B={vb}")) && !env.contains(&va), "{env}");
    let (code, body) = get(ports, "/env");
    assert_eq!(code, 200, "the new container serves");
    assert!(body.contains(&vb), "{body}");
    assert!(berth.child.try_wait().unwrap().is_none(), "reload must not stop berth");
    let logs = berth.logs();
    assert!(logs.contains("secrets source reloaded"), "{logs}");
    assert!(!logs.contains(&va) && !logs.contains(&vb), "a secret value is in the log:\n{logs}");
}
