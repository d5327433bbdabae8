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
    assert_config_error(
        "check",
        &src,
        "apps.Web_1",
        line_of(&src, "[apps.Web_1]"),
        "may contain only a-z, 0-9 and '-'",
    );
}

#[test]
fn route_without_host() {
    let src = GOOD.replace("routes = [\"api.example.com/\"]", "routes = [\"api.example.com/\", \"/v2\"]");
    assert_config_error("check", &src, "apps.web.routes[1]", line_of(&src, "\"/v2\""), "has no host");
}

#[test]
fn route_claimed_twice() {
    let src = GOOD.replace("routes = [\"www.example.com/admin/\"]", "routes = [\"api.example.com/\"]");
    // The first of the two identical lines is web's: [apps.web] comes first in the file.
    let line = line_of(&src, "routes = [\"api.example.com/\"]");
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
    assert_config_error(
        "check",
        &src,
        "tls.domains[1]",
        line_of(&src, "*.example.com"),
        "HTTP-01 cannot validate wildcards",
    );
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
    let stderr =
        assert_config_error("check", &src, "tls.mode", line_of(&src, "mode = \"files\""), "needs tls.cert_file");
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
    assert_config_error(
        "check",
        &src,
        "tls.acme.shared",
        line_of(&src, "shared = "),
        "the app would receive the ACME account and TLS private keys",
    );
}

#[test]
fn access_rules_name_secrets_and_networks() {
    let src = GOOD.replace(
        "[apps.web.health]",
        "[apps.web.access]\nallow = [\"10.0.0.0/8\", \"not-a-net\"]\napi_keys = [\"sk_live_literal_value\"]\n[apps.web.health]",
    );
    let stderr = assert_config_error(
        "check",
        &src,
        "apps.web.access.allow[1]",
        line_of(&src, "not-a-net"),
        "is not an address or network",
    );
    assert!(stderr.contains("`apps.web.access.api_keys[0]`") && stderr.contains("must name a secret"), "{stderr}");
}

/// One change to [`GOOD`]: replace text that occurs exactly once, or append whole tables.
enum Edit {
    Replace(&'static str, String),
    Append(String),
}

fn rep(from: &'static str, to: impl Into<String>) -> Edit {
    Edit::Replace(from, to.into())
}

fn app(text: &str) -> Edit {
    Edit::Append(text.to_string())
}

/// One invalid config and the problem `berth check` must report for it.
struct Case {
    name: &'static str,
    edits: Vec<Edit>,
    /// The key path as printed between backticks.
    key: &'static str,
    /// Text occurring exactly once in the edited config, on the line the problem must name.
    at: &'static str,
    /// Part of the message.
    phrase: &'static str,
}

fn case(name: &'static str, edits: Vec<Edit>, key: &'static str, at: &'static str, phrase: &'static str) -> Case {
    Case { name, edits, key, at, phrase }
}

/// Applies the edits, failing if one of them would leave the text as it was.
fn apply(edits: &[Edit]) -> Result<String, String> {
    let mut src = GOOD.to_string();
    for edit in edits {
        match edit {
            Edit::Replace(from, to) => {
                let n = src.matches(from).count();
                if n != 1 {
                    return Err(format!("edit target {from:?} occurs {n} times in the config, not once"));
                }
                let next = src.replacen(from, to, 1);
                if next == src {
                    return Err(format!("edit {from:?} -> {to:?} changed nothing"));
                }
                src = next;
            }
            Edit::Append(text) => src = format!("{src}\n{text}"),
        }
    }
    Ok(src)
}

/// Runs `berth check` on one case; `Err` says what was wrong and shows the whole output.
fn check_case(c: &Case) -> Result<(), String> {
    let src = apply(&c.edits)?;
    let hits: Vec<usize> = src.lines().enumerate().filter(|(_, l)| l.contains(c.at)).map(|(i, _)| i + 1).collect();
    let [line] = hits[..] else {
        return Err(format!("{:?} must occur on exactly one line of the edited config, found on {hits:?}", c.at));
    };
    let dir = TestDir::new();
    let path = dir.write("berth.toml", &src);
    let o = berth(&["check", "-c", path.to_str().unwrap()]);
    // Key, line and phrase must be on the same problem line, not scattered over several.
    let located = format!("{}:{line}:", path.display());
    let key = format!("`{}`", c.key);
    let named = o.stderr.lines().any(|l| l.contains(&located) && l.contains(&key) && l.contains(c.phrase));
    let mut wrong = Vec::new();
    if o.code != 78 {
        wrong.push(format!("exit {} instead of 78", o.code));
    }
    if !named {
        wrong.push(format!("no problem line with {located}, {key} and {:?}", c.phrase));
    }
    if !o.stdout.is_empty() {
        wrong.push("output on stdout".to_string());
    }
    if wrong.is_empty() {
        return Ok(());
    }
    Err(format!("{}\n--- config\n{src}--- stdout\n{}--- stderr\n{}", wrong.join("; "), o.stdout, o.stderr))
}

/// Every check in `Config::validate` (and the serde errors the tests above do not cover),
/// each through the real binary: exit 78, the key path, its line, and what is wrong.
#[test]
fn every_validation_error_names_key_and_line() {
    // 64 characters: one more than a container name label may have.
    let long: &'static str = "a".repeat(64).leak();
    let long_key: &'static str = format!("apps.{long}").leak();
    let cases = vec![
        // [agent]
        case("relative state_dir", vec![rep("drain_delay = \"1s\"", "drain_delay = \"1s\"\nstate_dir = \"var/lib/berth\"")], "agent.state_dir", "state_dir", "must be an absolute path"),
        case("relative admin_socket", vec![rep("drain_delay = \"1s\"", "drain_delay = \"1s\"\nadmin_socket = \"admin.sock\"")], "agent.admin_socket", "admin_socket", "must be an absolute path"),
        case("bad metrics_listen", vec![rep("drain_delay = \"1s\"", "drain_delay = \"1s\"\nmetrics_listen = \"9180\"")], "agent.metrics_listen", "metrics_listen", "is not an address"),
        // [aws]
        case("endpoint_url without scheme", vec![app("[aws]\nendpoint_url = \"localhost:4566\"\n")], "aws.endpoint_url", "endpoint_url", "must be an http:// or https:// URL"),
        case("bad region", vec![app("[aws]\nregion = \"US East\"\n")], "aws.region", "region", "is not a region name like \"us-east-1\""),
        // [secrets]
        case("relative secrets.path", vec![rep("path = \"/myapp/prod/\"", "path = \"myapp/prod/\"")], "secrets.path", "myapp/prod/", "must start with '/'"),
        case("parameter name is a path", vec![rep("[\"/shared/GITHUB_TOKEN\", ", "[\"/shared/GITHUB_TOKEN\", \"/shared/\", ")], "secrets.parameters[1]", "parameters =", "is not a parameter name"),
        // [http]
        case("bad http.listen", vec![app("[http]\nlisten = \"80\"\n")], "http.listen", "listen = \"80\"", "is not an address"),
        case("access_log_sample above 1", vec![app("[http]\naccess_log_sample = 1.5\n")], "http.access_log_sample", "access_log_sample", "must be between 0.0 and 1.0"),
        case("relative health_path", vec![app("[http]\nhealth_path = \"healthz\"\n")], "http.health_path", "health_path", "must start with '/'"),
        case("health_path under acme-challenge", vec![app("[http]\nhealth_path = \"/.well-known/acme-challenge/h\"\n")], "http.health_path", "health_path", "must not be under /.well-known/acme-challenge/"),
        // [tls]
        case("domain listed twice", vec![rep("\"www.example.com\"]", "\"www.example.com\", \"API.example.com\"]")], "tls.domains[2]", "domains =", "\"API.example.com\" is listed twice"),
        case("empty domain", vec![rep("\"www.example.com\"]", "\"www.example.com\", \"\"]")], "tls.domains[2]", "domains =", "\"\" is not a domain name"),
        case("IP address as domain", vec![rep("\"www.example.com\"]", "\"www.example.com\", \"10.0.0.1\"]")], "tls.domains[2]", "domains =", "is an IP address"),
        case("acme.directory not a URL", vec![rep("[tls.acme]\n", "[tls.acme]\ndirectory = \"acme-v02.api.letsencrypt.org/directory\"\n")], "tls.acme.directory", "directory =", "must be the ACME directory URL"),
        case("acme.contact without mailto", vec![rep("\"mailto:ops@example.com\"", "\"mailto:ops@example.com\", \"ops@example.com\"")], "tls.acme.contact[1]", "contact =", "must look like \"mailto:ops@example.com\""),
        case("acme.shared not a prefix", vec![rep("shared = \"/myapp/berth\"", "shared = \"myapp/berth/\"")], "tls.acme.shared", "shared =", "must be an SSM prefix"),
        case(
            "files mode without key_file",
            vec![
                rep("mode = \"acme\"", "mode = \"files\"\ncert_file = \"/etc/berth/cert.pem\""),
                rep("[tls.acme]\ncontact = [\"mailto:ops@example.com\"]\nshared = \"/myapp/berth\"\n", ""),
            ],
            "tls.mode",
            "mode = \"files\"",
            "needs tls.key_file",
        ),
        case("cert_file outside files mode", vec![rep("mode = \"acme\"", "mode = \"acme\"\ncert_file = \"/etc/berth/cert.pem\"")], "tls.cert_file", "cert_file", "only used with tls.mode = \"files\" (mode is \"acme\")"),
        case("key_file outside files mode", vec![rep("mode = \"acme\"", "mode = \"acme\"\nkey_file = \"/etc/berth/key.pem\"")], "tls.key_file", "key_file", "only used with tls.mode = \"files\""),
        case("[tls.acme] with another mode", vec![rep("mode = \"acme\"", "mode = \"self-signed\"")], "tls.acme", "[tls.acme]", "[tls.acme] is set but tls.mode is \"self-signed\""),
        // [apps.*]
        case(
            "app name ends with '-'",
            vec![rep("[apps.web]", "[apps.web-]"), rep("[apps.web.health]", "[apps.web-.health]")],
            "apps.web-",
            "[apps.web-]",
            "must not start or end with '-'",
        ),
        case("app name too long", vec![Edit::Append(format!("[{long_key}]\nimage = \"x:1\"\nport = 1\nroutes = [\"long.example.com/\"]\n"))], long_key, long, "must be 1 to 63 characters"),
        case("image with a space", vec![rep("web:1.2.3\"", "web 1.2.3\"")], "apps.web.image", "web 1.2.3", "is not an image reference"),
        case(
            "two apps without routes",
            vec![rep("routes = [\"api.example.com/\"]\n", ""), rep("routes = [\"www.example.com/admin/\"]\n", "")],
            "apps.web.routes",
            "[apps.web]",
            "apps admin and web both have no routes",
        ),
        case("route without '/'", vec![rep("[\"api.example.com/\"]", "[\"api.example.com\"]")], "apps.web.routes[0]", "\"api.example.com\"]", "must be \"host/prefix\""),
        case("route with an invalid host", vec![rep("[\"api.example.com/\"]", "[\"api_example.com/\"]")], "apps.web.routes[0]", "api_example", "has an invalid host"),
        case("route with an invalid prefix", vec![rep("[\"api.example.com/\"]", "[\"api.example.com/a b\"]")], "apps.web.routes[0]", "/a b", "has an invalid path prefix"),
        case("invalid env name", vec![rep("LOG_LEVEL = \"info\"", "LOG_LEVEL = \"info\", \"1BAD\" = \"x\"")], "apps.web.env.1BAD", "1BAD", "is not a valid environment variable name"),
        case("env hides a secret", vec![rep("LOG_LEVEL = \"info\"", "LOG_LEVEL = \"info\", GITHUB_TOKEN = \"x\"")], "apps.web.env.GITHUB_TOKEN", "env =", "GITHUB_TOKEN is also a secret from secrets.parameters"),
        case("app secret not a mapped name", vec![rep("secrets = [\"GITHUB_TOKEN\"]", "secrets = [\"GITHUB_TOKEN\", \"db-password\"]")], "apps.admin.secrets[1]", "db-password", "is not a mapped secret name"),
        case(
            "app secrets without [secrets]",
            vec![rep("path = \"/myapp/prod/\"\nparameters = [\"/shared/GITHUB_TOKEN\", \"/aws/reference/secretsmanager/myapp/db\"]\n", "")],
            "apps.admin.secrets",
            "secrets = [\"GITHUB_TOKEN\"]",
            "names secrets but [secrets] has neither path nor parameters",
        ),
        case("app secrets neither \"all\" nor a list", vec![rep("secrets = [\"GITHUB_TOKEN\"]", "secrets = \"some\"")], "apps.admin.secrets", "secrets = \"some\"", "\"all\" or a list of secret names"),
        case("registry_auth unknown", vec![rep("port = 8050", "port = 8050\nregistry_auth = \"basic\"")], "apps.web.registry_auth", "registry_auth", "\"none\", \"ecr\", or"),
        case(
            "registry_auth password as a value",
            vec![rep("port = 8050", "port = 8050\nregistry_auth = { username = \"/ci/user\", password = \"hunter2!\" }")],
            "apps.web.registry_auth.password",
            "registry_auth",
            "must be an SSM parameter name, not a value",
        ),
        case("memory not a size", vec![rep("port = 9000", "port = 9000\nmemory = \"lots\"")], "apps.admin.memory", "memory", "is not a size like \"512m\""),
        case("memory below Docker's minimum", vec![rep("port = 9000", "port = 9000\nmemory = \"1k\"")], "apps.admin.memory", "memory", "is below Docker's minimum of 6m"),
        case("memory overflowing", vec![rep("port = 9000", "port = 9000\nmemory = \"99999999999g\"")], "apps.admin.memory", "memory", "is too large"),
        case("cpus zero", vec![rep("port = 9000", "port = 9000\ncpus = 0.0")], "apps.admin.cpus", "cpus", "must be greater than 0"),
        case("cpus above 1024", vec![rep("port = 9000", "port = 9000\ncpus = 2000.0")], "apps.admin.cpus", "cpus", "at most 1024"),
        case("max_connections zero", vec![rep("port = 9000", "port = 9000\nmax_connections = 0")], "apps.admin.max_connections", "max_connections", "must be at least 1"),
        case("max_connections too many", vec![rep("port = 9000", "port = 9000\nmax_connections = 50000")], "apps.admin.max_connections", "max_connections", "at most 10000"),
        case("relative health.path", vec![rep("path = \"/health\"", "path = \"health\"")], "apps.web.health.path", "\"health\"", "must start with '/'"),
        case("health interval zero", vec![rep("path = \"/health\"", "path = \"/health\"\ninterval = \"0s\"")], "apps.web.health.interval", "interval", "must be greater than 0s"),
        case("health timeout zero", vec![rep("path = \"/health\"", "path = \"/health\"\ntimeout = \"0s\"")], "apps.web.health.timeout", "timeout", "must be greater than 0s"),
        case("healthy_threshold zero", vec![rep("path = \"/health\"", "path = \"/health\"\nhealthy_threshold = 0")], "apps.web.health.healthy_threshold", "healthy_threshold", "must be at least 1"),
        case("unhealthy_threshold zero", vec![rep("path = \"/health\"", "path = \"/health\"\nunhealthy_threshold = 0")], "apps.web.health.unhealthy_threshold", "unhealthy_threshold", "must be at least 1"),
        case("restart backoff zero", vec![app("[apps.web.restart]\ninitial_backoff = \"0s\"\n")], "apps.web.restart.initial_backoff", "initial_backoff", "must be greater than 0s"),
        case(
            "restart max below initial",
            vec![app("[apps.web.restart]\ninitial_backoff = \"10s\"\nmax_backoff = \"5s\"\n")],
            "apps.web.restart.max_backoff",
            "max_backoff",
            "5s is less than initial_backoff 10s",
        ),
        case("trusted_proxies not a network", vec![app("[apps.web.access]\ntrusted_proxies = [\"alb\"]\n")], "apps.web.access.trusted_proxies[0]", "trusted_proxies", "is not an address or network"),
        case("basic_auth password as a value", vec![app("[apps.web.access]\nbasic_auth = { ops = \"hunter2\" }\n")], "apps.web.access.basic_auth.ops", "basic_auth", "must name a secret"),
        case("basic_auth user with ':'", vec![app("[apps.web.access]\nbasic_auth = { \"ops:x\" = \"OPS_PASSWORD\" }\n")], "apps.web.access.basic_auth", "basic_auth", "must be non-empty and contain no ':'"),
        case(
            "access key without [secrets]",
            vec![
                rep("path = \"/myapp/prod/\"\nparameters = [\"/shared/GITHUB_TOKEN\", \"/aws/reference/secretsmanager/myapp/db\"]\n", ""),
                rep("secrets = [\"GITHUB_TOKEN\"]\n", ""),
                app("[apps.web.access]\napi_keys = [\"API_KEY\"]\n"),
            ],
            "apps.web.access.api_keys[0]",
            "api_keys",
            "names a secret but [secrets] has neither path nor parameters",
        ),
    ];

    let failures: Vec<String> =
        cases.iter().filter_map(|c| check_case(c).err().map(|why| format!("=== {}: {why}", c.name))).collect();
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
}
