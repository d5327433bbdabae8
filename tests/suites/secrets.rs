//! Secrets through the real binary against a real moto: `berth check --online` reports what
//! it fetched (counts and names) or the specific error, and neither it nor `berth run` at
//! TRACE ever prints a value. The exact mapped values are checked by the unit tests in
//! agent/src/secrets/tests.rs (and, through the container's environment, by the app tests).

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use berth_tests::faultproxy::{Fault, FaultProxy};
use berth_tests::moto::{aws_env, moto_url, random_token, seed, unique_prefix, Op, REGION};
use berth_tests::{berth_bin, config_toml, wait_for, Berth, Ports, TestDir};

fn secrets_toml(endpoint: &str, path: Option<&str>, parameters: &[&str], refresh: &str) -> String {
    let mut s = format!("[aws]\nregion = \"{REGION}\"\nendpoint_url = \"{endpoint}\"\n\n[secrets]\n");
    if let Some(p) = path {
        s.push_str(&format!("path = \"{p}\"\n"));
    }
    let list: Vec<String> = parameters.iter().map(|p| format!("\"{p}\"")).collect();
    s.push_str(&format!("parameters = [{}]\nrefresh_interval = \"{refresh}\"\n", list.join(", ")));
    s
}

struct Checked {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl Checked {
    fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// `berth check --online -c <config>` with moto's dummy credentials and `extra_env`.
fn check_online(dir: &TestDir, config: &str, extra_env: &[(&str, &str)]) -> Checked {
    let cfg = dir.write("berth.toml", config);
    let mut cmd = Command::new(berth_bin());
    aws_env(&mut cmd).args(["check", "--online", "-c"]).arg(&cfg);
    cmd.env_remove("BERTH_LOG").env_remove("LOG_SENSITIVE_BODIES").env_remove("JOURNAL_STREAM");
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let start = Instant::now();
    let Output { status, stdout, stderr } = cmd.output().expect("run berth check");
    Checked {
        code: status.code(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        took: start.elapsed(),
    }
}

/// An online check that failed: not 0, and not 78 (the config itself is fine).
fn assert_online_failure(c: &Checked) {
    assert!(c.code != Some(0) && c.code != Some(78), "expected an online-check failure, got {:?}\n{}", c.code, c.all());
}

#[test]
fn check_online_reports_counts_and_mapped_names() {
    let Some(moto) = moto_url() else { return };
    let p = unique_prefix("check");
    let shared = unique_prefix("check-shared");
    let value = random_token(32);
    let (a, b, c, d) = (
        format!("{p}/db/password"),
        format!("{p}/db/user"),
        format!("{p}/api-key.v2"),
        format!("{shared}/GITHUB_TOKEN"),
    );
    seed(
        &moto,
        &[
            Op::Put { name: &a, kind: "SecureString", value: &value },
            Op::Put { name: &b, kind: "String", value: "app" },
            Op::Put { name: &c, kind: "StringList", value: "x,y" },
            Op::Put { name: &d, kind: "SecureString", value: &value },
        ],
    );
    let dir = TestDir::new();
    let out = check_online(&dir, &secrets_toml(&moto, Some(&format!("{p}/")), &[&d], "5m"), &[]);
    assert_eq!(out.code, Some(0), "{}", out.all());
    let summary = format!("ssm: 4 secrets from {p}/ and 1 parameter in ");
    assert!(out.stdout.contains(&summary), "want {summary:?} in:\n{}", out.stdout);
    assert!(out.stdout.contains("names: API_KEY_V2, DB_PASSWORD, DB_USER, GITHUB_TOKEN\n"), "{}", out.stdout);
    assert!(!out.all().contains(&value), "a secret value was printed:\n{}", out.all());
}

#[test]
fn check_online_names_every_missing_parameter() {
    let Some(moto) = moto_url() else { return };
    let p = unique_prefix("check-missing");
    let (here, gone1, gone2) = (format!("{p}/HERE"), format!("{p}/GONE1"), format!("{p}/GONE2"));
    seed(&moto, &[Op::Put { name: &here, kind: "String", value: "v" }]);
    let dir = TestDir::new();
    let out = check_online(&dir, &secrets_toml(&moto, None, &[&here, &gone1, &gone2], "5m"), &[]);
    assert_online_failure(&out);
    assert!(
        out.stderr.contains("not found") && out.stderr.contains(&gone1) && out.stderr.contains(&gone2),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains(&format!("{here},")), "{}", out.stderr);
}

#[test]
fn check_online_names_both_colliding_parameters() {
    let Some(moto) = moto_url() else { return };
    let p = unique_prefix("check-collide");
    let (a, b) = (format!("{p}/db/password"), format!("{p}/db-password"));
    seed(
        &moto,
        &[
            Op::Put { name: &a, kind: "SecureString", value: "1" },
            Op::Put { name: &b, kind: "SecureString", value: "2" },
        ],
    );
    let dir = TestDir::new();
    let out = check_online(&dir, &secrets_toml(&moto, Some(&p), &[], "5m"), &[]);
    assert_online_failure(&out);
    for want in ["collision", "DB_PASSWORD", a.as_str(), b.as_str()] {
        assert!(out.stderr.contains(want), "missing {want}: {}", out.stderr);
    }
}

#[test]
fn check_online_says_which_grant_is_missing_on_access_denied() {
    let Some(moto) = moto_url() else { return };
    let p = unique_prefix("check-denied");
    seed(&moto, &[Op::Put { name: &format!("{p}/K"), kind: "String", value: "v" }]);
    let proxy = FaultProxy::start(&moto);
    let arn = format!("arn:aws:ssm:{REGION}:123456789012:parameter{p}");
    proxy.fail_always(Fault::access_denied("ssm:GetParametersByPath", &arn));
    let dir = TestDir::new();
    let out = check_online(&dir, &secrets_toml(&proxy.url(), Some(&format!("{p}/")), &[], "5m"), &[]);
    assert_online_failure(&out);
    assert!(out.stderr.contains(&format!("access denied: ssm:GetParametersByPath on {arn}")), "{}", out.stderr);
    assert!(
        out.stderr.contains(&format!("instance profile role needs ssm:GetParametersByPath on {arn}*")),
        "{}",
        out.stderr
    );
    assert_eq!(proxy.requests(), 1, "access denied is not retried");
}

#[test]
fn check_online_rides_out_throttling() {
    let Some(moto) = moto_url() else { return };
    let p = unique_prefix("check-throttle");
    seed(&moto, &[Op::Put { name: &format!("{p}/K"), kind: "String", value: "v" }]);
    let proxy = FaultProxy::start(&moto);
    // More than the SDK's 4 attempts: berth's own retry around the fetch takes over.
    proxy.fail_next(5, Fault::throttling());
    let dir = TestDir::new();
    let out = check_online(&dir, &secrets_toml(&proxy.url(), Some(&p), &[], "5m"), &[]);
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(out.stdout.contains("ssm: 1 secret from"), "{}", out.stdout);
    assert_eq!(proxy.faults(), 5);
    assert!(out.stderr.contains("throttled"), "the retry is logged: {}", out.stderr);
}

#[test]
fn check_online_explains_an_unreachable_endpoint() {
    let dir = TestDir::new();
    let port = berth_tests::free_port();
    let out = check_online(&dir, &secrets_toml(&format!("http://127.0.0.1:{port}"), Some("/x/"), &[], "5m"), &[]);
    assert_online_failure(&out);
    assert!(
        out.stderr.contains("cannot reach SSM") && out.stderr.contains("VPC interface endpoints"),
        "{}",
        out.stderr
    );
    assert!(out.took < Duration::from_secs(40), "took {:?}", out.took);
}

/// While the daemon waits at boot for its first secrets, `berth status` gives the advice
/// the log gives, not just the kind of error.
#[test]
fn status_while_waiting_for_ssm_says_what_to_fix() {
    let dir = TestDir::new();
    let ports = Ports::pick();
    let port = berth_tests::free_port();
    let cfg = dir.write(
        "berth.toml",
        &config_toml(
            &dir,
            ports,
            "0s",
            "1s",
            &secrets_toml(&format!("http://127.0.0.1:{port}"), Some("/x/"), &[], "5m"),
        ),
    );
    let mut cmd = Berth::command(&cfg);
    aws_env(&mut cmd);
    let mut berth = Berth::spawn(cmd, &dir);
    let waiting = wait_for("status to say berth waits for SSM", Duration::from_secs(40), || {
        let out = Command::new(berth_bin()).args(["status", "--json", "-c"]).arg(&cfg).output().ok()?;
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        status["waiting_for"].as_str().filter(|w| w.contains("SSM")).map(str::to_owned)
    });
    assert!(waiting.contains("VPC interface endpoints") && waiting.contains("NAT gateway"), "{waiting}");
    assert!(waiting.contains(&format!("127.0.0.1:{port}")), "{waiting}");
    berth.signal("TERM");
    berth.wait_timeout(Duration::from_secs(10)).expect("berth stops");
}

/// BERTH_LOG=trace, and LOG_SENSITIVE_BODIES=true, the AWS SDK's switch that makes it log
/// decrypted response bodies: neither may get a value into berth's output.
#[test]
fn check_online_at_trace_prints_no_value() {
    let Some(moto) = moto_url() else { return };
    let p = unique_prefix("check-trace");
    let values: Vec<String> = (0..3).map(|_| format!("zz{}", random_token(24))).collect();
    let names: Vec<String> = (0..3).map(|i| format!("{p}/S{i}")).collect();
    let ops: Vec<Op> =
        names.iter().zip(&values).map(|(name, value)| Op::Put { name, kind: "SecureString", value }).collect();
    seed(&moto, &ops);
    let dir = TestDir::new();
    for sensitive in ["false", "true"] {
        let out = check_online(
            &dir,
            &secrets_toml(&moto, Some(&p), &[], "5m"),
            &[("BERTH_LOG", "trace"), ("LOG_SENSITIVE_BODIES", sensitive)],
        );
        assert_eq!(out.code, Some(0), "{}", out.all());
        assert!(out.stderr.contains("GetParametersByPath page"), "TRACE logging is on: {}", out.stderr);
        for v in &values {
            assert!(
                !out.all().contains(v.as_str()),
                "value leaked with LOG_SENSITIVE_BODIES={sensitive}:\n{}",
                out.all()
            );
        }
    }
}

/// The daemon fetches, refreshes and notices a change, all at TRACE: no value in its logs.
#[test]
fn run_at_trace_logs_the_refresh_but_no_value() {
    let Some(moto) = moto_url() else { return };
    let p = unique_prefix("run-trace");
    let (v1, v2) = (format!("zz{}", random_token(24)), format!("zz{}", random_token(24)));
    let name = format!("{p}/db/password");
    seed(&moto, &[Op::Put { name: &name, kind: "SecureString", value: &v1 }]);
    let dir = TestDir::new();
    let ports = Ports::pick();
    let cfg = dir.write("berth.toml", &config_toml(&dir, ports, "0s", "1s", &secrets_toml(&moto, Some(&p), &[], "1s")));
    let mut cmd = Berth::command(&cfg);
    aws_env(&mut cmd).env("BERTH_LOG", "trace").env("LOG_SENSITIVE_BODIES", "true");
    let mut berth = Berth::spawn(cmd, &dir);

    wait_for("the first fetch", Duration::from_secs(20), || {
        berth.logs().contains("GetParametersByPath page").then_some(())
    });
    seed(&moto, &[Op::Put { name: &name, kind: "SecureString", value: &v2 }]);
    wait_for("the change to be noticed", Duration::from_secs(10), || {
        berth.logs().contains("secrets changed").then_some(())
    });
    berth.signal("TERM");
    berth.wait_timeout(Duration::from_secs(10)).expect("berth stops");
    let logs = berth.logs();
    assert!(logs.contains("DB_PASSWORD"), "names are logged:\n{logs}");
    assert!(!logs.contains(&v1) && !logs.contains(&v2), "a secret value leaked into the daemon's logs:\n{logs}");
}
