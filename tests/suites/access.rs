//! Access control through the real binary: allowed and denied networks, X-Forwarded-For
//! believed only from trusted proxies, API keys from SSM secrets, and proof from the app's
//! own request log that denied requests never reached it.

use std::process::Command;
use std::time::Duration;

use berth_tests::{config_toml, curl, env, log_field, ssm_put, wait_for, Berth, Ports, TestApp, TestDir};

#[test]
fn denied_requests_never_reach_the_app() {
    let dir = TestDir::new();
    let ports = Ports::pick();
    let (deny, keys, spoof) = (TestApp::new("deny"), TestApp::new("keys"), TestApp::new("spoof"));
    let prefix = format!("/berth-test/{}/access/", std::process::id());
    let key = format!("key-{}", std::process::id());
    ssm_put(&format!("{prefix}api_key"), &key);
    let image = env("BERTH_TEST_APP_IMAGE");
    let app = |a: &TestApp, host: &str, access: &str| {
        format!(
            "[apps.{n}]\nimage = \"{image}\"\nport = 8080\npull = \"never\"\nroutes = [\"{host}/\"]\n[apps.{n}.health]\npath = \"/health\"\ninterval = \"300ms\"\n[apps.{n}.access]\n{access}\n",
            n = a.name
        )
    };
    let rest = format!(
        "[aws]\nregion = \"us-east-1\"\nendpoint_url = \"{moto}\"\n[secrets]\npath = \"{prefix}\"\n\n{}\n{}\n{}",
        app(&deny, "deny.test", "allow = [\"10.0.0.0/8\"]"),
        app(
            &keys,
            "keys.test",
            "allow = [\"203.0.113.0/24\"]\ntrusted_proxies = [\"127.0.0.1\"]\napi_keys = [\"API_KEY\"]"
        ),
        app(&spoof, "spoof.test", "allow = [\"203.0.113.0/24\"]"),
        moto = env("BERTH_TEST_MOTO_URL"),
    );
    let cfg = dir.write("berth.toml", &config_toml(&dir, ports, "0s", "2s", &rest));
    let berth = Berth::spawn(Berth::command(&cfg), &dir);
    wait_for("all three apps healthy", Duration::from_secs(40), || {
        (curl(&[&format!("http://127.0.0.1:{}/_berth/health", ports.http)]).0 == 200).then_some(())
    });

    let req = |host: &str, path: &str, headers: &[&str]| -> u16 {
        let mut args = vec!["-k".to_string(), "--resolve".to_string(), format!("{host}:{}:127.0.0.1", ports.https)];
        for h in headers {
            args.push("-H".into());
            args.push(h.to_string());
        }
        args.push(format!("https://{host}:{}{path}", ports.https));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        curl(&refs).0
    };
    let good_key = format!("Authorization: Bearer {key}");

    // Network not allowed: 403.
    assert_eq!(req("deny.test", "/denied-1", &[]), 403);
    // From a trusted proxy, the forwarded client address counts; with the key: allowed.
    assert_eq!(req("keys.test", "/allowed-1", &["X-Forwarded-For: 203.0.113.9", &good_key]), 200);
    assert_eq!(req("keys.test", "/allowed-2", &["X-Forwarded-For: 203.0.113.9", &format!("X-Api-Key: {key}")]), 200);
    // Wrong or missing key: 401.
    assert_eq!(req("keys.test", "/denied-2", &["X-Forwarded-For: 203.0.113.9", "Authorization: Bearer nope"]), 401);
    assert_eq!(req("keys.test", "/denied-3", &["X-Forwarded-For: 203.0.113.9"]), 401);
    // The right-most untrusted hop is the client: a forged left part does not get in.
    assert_eq!(req("keys.test", "/denied-4", &["X-Forwarded-For: 203.0.113.9, 198.51.100.1", &good_key]), 403);
    // No forwarded address: the peer itself (127.0.0.1) is not in the allowlist.
    assert_eq!(req("keys.test", "/denied-5", &[&good_key]), 403);
    // From an untrusted peer, X-Forwarded-For is ignored entirely.
    assert_eq!(req("spoof.test", "/denied-6", &["X-Forwarded-For: 203.0.113.9"]), 403);

    // The apps' own request logs: every allowed request arrived, no denied one did.
    let logs: String = [&deny, &keys, &spoof]
        .iter()
        .flat_map(|a| a.containers(true))
        .map(|id| {
            let out = Command::new("docker").args(["logs", &id]).output().unwrap();
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
        })
        .collect();
    assert!(logs.contains("GET /allowed-1") && logs.contains("GET /allowed-2"), "{logs}");
    assert!(!logs.contains("/denied-"), "a denied request reached an app:\n{logs}");

    // berth's access log (as shipped: errors only) has each denial, and no allowed request.
    let ours = berth.logs();
    let event = |path: &str| {
        ours.lines().find(|l| l.contains(" request ") && log_field(l, "path", &format!("{path}\""))).map(str::to_owned)
    };
    let denied = event("/denied-1").unwrap_or_else(|| panic!("no access event for a 403:\n{ours}"));
    for (key, value) in [("app", deny.name.as_str()), ("status", "403"), ("method", "GET"), ("host", "deny.test:")] {
        assert!(log_field(&denied, key, value), "{key}={value} missing: {denied}");
    }
    assert!(event("/denied-2").is_some_and(|l| log_field(&l, "status", "401")), "{ours}");
    assert!(event("/allowed-1").is_none(), "a 200 was logged with access_log = \"errors\":\n{ours}");
    drop(berth);
}
