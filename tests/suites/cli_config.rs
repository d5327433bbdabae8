//! The command line and the config file, through the real binary: every class of config
//! error names the key and the line and exits 78; a good config prints its plan.

use std::process::Command;

use berth_tests::{berth_bin, TestDir};

const GOOD: &str = r#"[agent]
drain_delay = "1s"

[secrets]
path = "/myapp/prod/"
parameters = ["/shared/GITHUB_TOKEN", "/aws/reference/secretsmanager/myapp/db"]

[tls]
mode = "acme"
domains = ["api.example.com", "www.example.com"]
[tls.acme]
contact = ["mailto:ops@example.com"]
shared = "/myapp/berth"

[apps.web]
image = "registry.example.com/web:1.2.3"
port = 8050
routes = ["api.example.com/"]
env = { LOG_LEVEL = "info" }
[apps.web.health]
path = "/health"

[apps.admin]
image = "registry.example.com/admin:7"
port = 9000
routes = ["www.example.com/admin/"]
secrets = ["GITHUB_TOKEN"]
"#;

struct Outcome {
    code: i32,
    stdout: String,
    stderr: String,
}

fn berth(args: &[&str]) -> Outcome {
    let out = Command::new(berth_bin()).args(args).env_remove("BERTH_CONFIG").output().unwrap();
    Outcome {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    }
}

/// Writes `src`, runs `berth <cmd> -c file`, and asserts exit 78 with `key` and `file:line`
/// in the message. Returns stderr for more specific checks.
fn assert_config_error(cmd: &str, src: &str, key: &str, line: usize, also: &str) -> String {
    let dir = TestDir::new();
    let path = dir.write("berth.toml", src);
    let o = berth(&[cmd, "-c", path.to_str().unwrap()]);
    assert_eq!(o.code, 78, "`berth {cmd}` should exit 78 for {key}; stderr:\n{}", o.stderr);
    let located = format!("{}:{line}:", path.display());
    assert!(o.stderr.contains(&located), "expected {located} in:\n{}", o.stderr);
    assert!(o.stderr.contains(&format!("`{key}`")), "expected key `{key}` in:\n{}", o.stderr);
    assert!(o.stderr.contains(also), "expected {also:?} in:\n{}", o.stderr);
    assert!(o.stdout.is_empty(), "nothing on stdout for an invalid config: {}", o.stdout);
    o.stderr
}

/// `src` with the single occurrence of `from` replaced. Panics when `from` is absent or
/// ambiguous: an edit that changes nothing would test the good config and pass silently.
fn replace_once(src: &str, from: &str, to: &str) -> String {
    assert_eq!(src.matches(from).count(), 1, "edit must match exactly once: {from:?} in:\n{src}");
    let out = src.replacen(from, to, 1);
    assert_ne!(out, src, "edit {from:?} -> {to:?} changed nothing");
    out
}

fn line_of(src: &str, needle: &str) -> usize {
    src.lines().position(|l| l.contains(needle)).expect("needle in source") + 1
}

#[test]
fn good_config_prints_the_resolved_plan() {
    let dir = TestDir::new();
    let path = dir.write("berth.toml", GOOD);
    let o = berth(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    for expected in [
        "is valid",
        "acme for api.example.com, www.example.com",
        "shared in SSM under /myapp/berth",
        "/myapp/prod/ (recursive",
        "/shared/GITHUB_TOKEN -> GITHUB_TOKEN",
        "/aws/reference/secretsmanager/myapp/db -> DB",
        "registry.example.com/web:1.2.3 (pull missing)",
        "routes  api.example.com/",
        "routes  www.example.com/admin/",
        "secrets GITHUB_TOKEN",
        "GET /health every 5s",
        "health 503, wait 1s, then drain up to 30s",
    ] {
        assert!(o.stdout.contains(expected), "missing {expected:?} in plan:\n{}", o.stdout);
    }
}

#[test]
fn config_path_comes_from_env_when_not_given() {
    let dir = TestDir::new();
    let path = dir.write("berth.toml", GOOD);
    let out = Command::new(berth_bin()).arg("check").env("BERTH_CONFIG", &path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn missing_file_is_a_config_error() {
    let o = berth(&["check", "-c", "/nonexistent/berth.toml"]);
    assert_eq!(o.code, 78);
    assert!(o.stderr.contains("cannot read config /nonexistent/berth.toml"), "{}", o.stderr);
}

#[test]
fn toml_syntax_error() {
    let src = GOOD.replace("port = 8050", "port = = 8050");
    let dir = TestDir::new();
    let path = dir.write("berth.toml", &src);
    let o = berth(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(o.code, 78);
    assert!(o.stderr.contains(&format!("{}:{}:", path.display(), line_of(&src, "port = = 8050"))), "{}", o.stderr);
    assert!(o.stderr.contains("TOML syntax"), "{}", o.stderr);
}

#[test]
fn unknown_key() {
    let src = GOOD.replace("port = 8050", "port = 8050\nimgae = \"typo\"");
    assert_config_error("check", &src, "apps.web.imgae", line_of(&src, "imgae"), "unknown field `imgae`");
}

#[test]
fn unknown_table() {
    let src = format!("{GOOD}\n[proxy]\nworkers = 4\n");
    assert_config_error("check", &src, "proxy", line_of(&src, "[proxy]"), "unknown field `proxy`");
}

#[test]
fn wrong_type() {
    let src = GOOD.replace("port = 8050", "port = \"8050\"");
    assert_config_error("check", &src, "apps.web.port", line_of(&src, "port = \"8050\""), "invalid type");
}

#[test]
fn port_out_of_range() {
    let src = GOOD.replace("port = 8050", "port = 70000");
    assert_config_error("check", &src, "apps.web.port", line_of(&src, "port = 70000"), "70000");
    let src = GOOD.replace("port = 8050", "port = 0");
    assert_config_error("check", &src, "apps.web.port", line_of(&src, "port = 0"), "between 1 and 65535");
}

#[test]
fn bad_duration() {
    let src = GOOD.replace("drain_delay = \"1s\"", "drain_delay = \"soon\"");
    assert_config_error("check", &src, "agent.drain_delay", line_of(&src, "soon"), "invalid duration \"soon\"");
}

#[test]
fn missing_required_key() {
    let src = GOOD.replace("image = \"registry.example.com/web:1.2.3\"\n", "");
    assert_config_error("check", &src, "apps.web", line_of(&src, "[apps.web]"), "missing field `image`");
}

#[test]
fn invalid_app_name() {
    let src = GOOD.replace("[apps.web]", "[apps.Web_1]").replace("[apps.web.health]", "[apps.Web_1.health]");
    assert_config_error("check", &src, "apps.Web_1", line_of(&src, "[apps.Web_1]"), "may contain only a-z, 0-9 and '-'");
}

#[test]
fn route_without_host() {
    let src = GOOD.replace("routes = [\"api.example.com/\"]", "routes = [\"api.example.com/\", \"/v2\"]");
    assert_config_error("check", &src, "apps.web.routes[1]", line_of(&src, "\"/v2\""), "has no host");
}

#[test]
fn route_claimed_twice() {
    let src = GOOD.replace("routes = [\"www.example.com/admin/\"]", "routes = [\"api.example.com/\"]");
    let line = src.lines().enumerate().filter(|(_, l)| l.contains("routes = [\"api.example.com/\"]")).nth(0).unwrap().0 + 1;
    // BTreeMap order: `admin` is checked before `web`, so `web` is the duplicate.
    assert_config_error("check", &src, "apps.web.routes[0]", line, "already routed to app admin");
}

#[test]
fn secret_name_collision() {
    let src = GOOD.replace(
        "parameters = [\"/shared/GITHUB_TOKEN\", ",
        "parameters = [\"/shared/GITHUB_TOKEN\", \"/other/github_token\", ",
    );
    assert_config_error(
        "check",
        &src,
        "secrets.parameters[1]",
        line_of(&src, "/other/github_token"),
        "maps to GITHUB_TOKEN, as does secrets.parameters[0]",
    );
}

#[test]
fn acme_without_domains() {
    let src = GOOD.replace("domains = [\"api.example.com\", \"www.example.com\"]", "domains = []");
    assert_config_error("check", &src, "tls.domains", line_of(&src, "domains = []"), "needs at least one domain");
}

#[test]
fn acme_wildcard_domain() {
    let src = GOOD.replace("\"www.example.com\"]", "\"*.example.com\"]");
    assert_config_error("check", &src, "tls.domains[1]", line_of(&src, "*.example.com"), "HTTP-01 cannot validate wildcards");
}

#[test]
fn invalid_domain() {
    let src = GOOD.replace("\"www.example.com\"]", "\"www..example.com\"]");
    assert_config_error("check", &src, "tls.domains[1]", line_of(&src, "www..example"), "not a valid domain name");
}

#[test]
fn files_mode_without_files() {
    let src = replace_once(GOOD, "mode = \"acme\"", "mode = \"files\"");
    // Without [tls.acme] the only problem left is the missing files, not a stray ACME table.
    let src = replace_once(&src, "[tls.acme]\ncontact = [\"mailto:ops@example.com\"]\nshared = \"/myapp/berth\"\n", "");
    let stderr = assert_config_error("check", &src, "tls.mode", line_of(&src, "mode = \"files\""), "needs tls.cert_file");
    assert!(stderr.contains("needs tls.key_file"), "{stderr}");
    assert!(!stderr.contains("`tls.acme`"), "the [tls.acme] table should be gone:\n{stderr}");
}

#[test]
fn bad_listen_address() {
    let src = format!("{GOOD}\n[https]\nlisten = \"443\"\n");
    assert_config_error("check", &src, "https.listen", line_of(&src, "listen = \"443\""), "is not an address");
}

#[test]
fn bad_enum_value() {
    let src = GOOD.replace("port = 8050", "port = 8050\npull = \"sometimes\"");
    assert_config_error("check", &src, "apps.web.pull", line_of(&src, "sometimes"), "unknown variant `sometimes`");
}

#[test]
fn every_semantic_problem_is_reported_at_once() {
    let src = GOOD.replace("port = 8050", "port = 0").replace("port = 9000", "port = 9000\nmemory = \"1k\"");
    let stderr = assert_config_error("check", &src, "apps.web.port", line_of(&src, "port = 0"), "2 problems");
    assert!(stderr.contains("`apps.admin.memory`"), "{stderr}");
}

#[test]
fn run_refuses_an_invalid_config_with_78() {
    let src = GOOD.replace("port = 8050", "port = 0");
    assert_config_error("run", &src, "apps.web.port", line_of(&src, "port = 0"), "between 1 and 65535");
}

#[test]
fn version_names_the_build() {
    let o = berth(&["--version"]);
    assert_eq!(o.code, 0);
    assert!(o.stdout.starts_with(&format!("berth {} (git ", env!("CARGO_PKG_VERSION"))), "{}", o.stdout);
    assert!(o.stdout.contains("features:"), "{}", o.stdout);
}

#[test]
fn help_describes_every_command() {
    let o = berth(&["--help"]);
    assert_eq!(o.code, 0);
    for cmd in ["run", "check", "status", "deploy", "renew"] {
        assert!(o.stdout.contains(&format!("  {cmd}")), "`{cmd}` missing from --help:\n{}", o.stdout);
    }
}

#[test]
fn status_without_a_daemon_exits_69() {
    let dir = TestDir::new();
    let path = dir.write("berth.toml", &format!("[agent]\nadmin_socket = \"{}/admin.sock\"\n", dir.path().display()));
    let o = berth(&["status", "-c", path.to_str().unwrap()]);
    assert_eq!(o.code, 69, "{}", o.stderr);
    assert!(o.stderr.contains("no berth daemon answers on"), "{}", o.stderr);
}

#[test]
fn fleet_prefix_under_the_secrets_path() {
    // secrets.path is read recursively: the ACME keys would reach the app as env vars.
    let src = GOOD.replace("shared = \"/myapp/berth\"", "shared = \"/myapp/prod/berth\"");
    assert_config_error("check", &src, "tls.acme.shared", line_of(&src, "shared = "), "the app would receive the ACME account and TLS private keys");
}

#[test]
fn access_rules_name_secrets_and_networks() {
    let src = GOOD.replace(
        "[apps.web.health]",
        "[apps.web.access]\nallow = [\"10.0.0.0/8\", \"not-a-net\"]\napi_keys = [\"sk_live_literal_value\"]\n[apps.web.health]",
    );
    let stderr = assert_config_error("check", &src, "apps.web.access.allow[1]", line_of(&src, "not-a-net"), "is not an address or network");
    assert!(stderr.contains("`apps.web.access.api_keys[0]`") && stderr.contains("must name a secret"), "{stderr}");
}
