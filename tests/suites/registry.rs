//! Pulling the app image from a private registry with basic-auth credentials kept in SSM,
//! or with an ECR token (`registry_auth = "ecr"`): Debian's docker-registry (distribution)
//! on 127.0.0.1 with an htpasswd file, a real push, and berth pulling through the real
//! Docker Engine.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use berth_tests::{
    aws_json, berth_bin, config_toml, curl, env, free_port, ssm_put, wait_for, Berth, Ports, TestApp, TestDir,
};

struct Registry {
    child: Child,
    port: u16,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("command");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into()
}

fn start_registry(dir: &TestDir, user: &str, password: &str) -> Registry {
    let htpasswd = run(Command::new("htpasswd").args(["-Bbn", user, password]));
    dir.write("htpasswd", &htpasswd);
    let port = free_port();
    let cfg = format!(
        "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {root}\nhttp:\n  addr: 127.0.0.1:{port}\nauth:\n  htpasswd:\n    realm: berth-test\n    path: {htp}\n",
        root = dir.path().join("registry").display(),
        htp = dir.path().join("htpasswd").display(),
    );
    let cfg = dir.write("registry.yml", &cfg);
    let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("docker-registry (installed by scripts/testenv)");
    let reg = Registry { child, port };
    wait_for("the registry", Duration::from_secs(15), || {
        // 401 means it is up and asks for credentials.
        (curl(&[&format!("http://127.0.0.1:{port}/v2/")]).0 == 401).then_some(())
    });
    reg
}

/// `docker login --password-stdin`: the password never appears in a process list.
fn login(mut cmd: Command, password: &str) {
    use std::io::Write;
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(password.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "docker login: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn pulls_with_basic_auth_from_ssm_and_names_an_auth_failure() {
    let dir = TestDir::new();
    let (user, password) = ("berth", format!("pw-{}", std::process::id()));
    let reg = start_registry(&dir, user, &password);
    let image = format!("127.0.0.1:{}/testapp:1", reg.port);

    // Push the test app as an operator's CI would.
    let docker_config = dir.path().join("docker-config");
    std::fs::create_dir_all(&docker_config).unwrap();
    let docker = |args: &[&str]| {
        let mut c = Command::new("docker");
        c.arg("--config").arg(&docker_config).args(args);
        c
    };
    run(&mut docker(&["tag", &env("BERTH_TEST_APP_IMAGE"), &image]));
    login(docker(&["login", "-u", user, "--password-stdin", &format!("127.0.0.1:{}", reg.port)]), &password);
    run(&mut docker(&["push", &image]));
    // berth must pull it, not find it locally.
    run(&mut docker(&["rmi", &image]));

    let prefix = format!("/berth-test/{}/registry", std::process::id());
    ssm_put(&format!("{prefix}/user"), user);
    ssm_put(&format!("{prefix}/password"), &password);
    ssm_put(&format!("{prefix}/wrong"), "not-the-password");

    let start = |password_param: &str, app: &TestApp| {
        let auth = format!(r#"{{ username = "{prefix}/user", password = "{prefix}/{password_param}" }}"#);
        let (berth, ports, _) = start_pulling(&dir, app, &image, &auth);
        (berth, ports)
    };

    // Right credentials: pulled and serving.
    let good = TestApp::new("reg");
    let (berth, ports) = start("password", &good);
    wait_for("the pulled app to serve", Duration::from_secs(40), || {
        (curl(&[&format!("http://127.0.0.1:{}/_berth/health", ports.http)]).0 == 200).then_some(())
    });
    assert!(berth.logs().contains("pulling image"), "{}", berth.logs());
    let logs = berth.logs();
    assert!(!logs.contains(&password), "the registry password must not be logged");
    drop(berth);
    run(Command::new("docker").args(["rmi", "-f", &image]));

    // Wrong password: the error says it is authentication, and nothing serves.
    let bad = TestApp::new("regbad");
    let (berth, ports) = start("wrong", &bad);
    wait_for("the authentication error", Duration::from_secs(30), || {
        berth.logs().contains("authentication failed").then_some(())
    });
    assert_eq!(curl(&[&format!("http://127.0.0.1:{}/_berth/health", ports.http)]).0, 503);
    assert!(bad.containers(false).is_empty(), "no container without an image");
}

/// The Docker credentials ECR's GetAuthorizationToken hands out: `base64("AWS:" + password)`
/// decoded. Asked of moto with the same API call berth makes (signed by curl's SigV4).
fn ecr_token() -> (String, String) {
    let r = aws_json("ecr", "AmazonEC2ContainerRegistry_V20150921.GetAuthorizationToken", serde_json::json!({}));
    let b64 = r["authorizationData"][0]["authorizationToken"]
        .as_str()
        .unwrap_or_else(|| panic!("GetAuthorizationToken: {r}"));
    let raw = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (user, password) = text.split_once(':').unwrap();
    (user.to_string(), password.to_string())
}

fn status_json(config: &std::path::Path) -> serde_json::Value {
    let out = Command::new(berth_bin()).args(["status", "--json", "-c"]).arg(config).output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// `registry_auth = "ecr"`. Real: berth's aws-sdk-ecr GetAuthorizationToken call, answered
/// by moto (through `[aws] endpoint_url`); decoding the token; Docker pulling with it as
/// basic-auth credentials from a real registry (distribution), as it does from ECR.
/// Not real: the registry is not ECR. ECR checks the token against IAM; this registry checks
/// it against an htpasswd file the test writes with the password moto's token decodes to
/// (moto's token is fixed, `AWS:<account>-auth-token`, so the test asks moto for it with the
/// same call first). moto's `expiresAt` is in 2015, so berth never caches its token (the
/// 30-minutes-before-expiry cache and its per-registry keys are unit tests in `agent/src/ecr.rs`).
#[test]
fn pulls_with_an_ecr_token_from_moto_and_names_a_refused_token() {
    let dir = TestDir::new();
    let (user, password) = ecr_token();
    assert_eq!(user, "AWS", "ECR tokens are for the user AWS");
    let reg = start_registry(&dir, &user, &password);
    let image = format!("127.0.0.1:{}/ecr-testapp:1", reg.port);

    let docker_config = dir.path().join("docker-config");
    std::fs::create_dir_all(&docker_config).unwrap();
    let docker = |args: &[&str]| {
        let mut c = Command::new("docker");
        c.arg("--config").arg(&docker_config).args(args);
        c
    };
    run(&mut docker(&["tag", &env("BERTH_TEST_APP_IMAGE"), &image]));
    login(docker(&["login", "-u", &user, "--password-stdin", &format!("127.0.0.1:{}", reg.port)]), &password);
    run(&mut docker(&["push", &image]));
    run(&mut docker(&["rmi", &image]));

    // A second registry whose htpasswd holds another password for AWS: ECR refusing the
    // token (a role without ecr:BatchGetImage, another account's repository).
    let bad_dir = TestDir::new();
    let bad_reg = start_registry(&bad_dir, "AWS", "not-what-ecr-hands-out");
    let bad_image = format!("127.0.0.1:{}/ecr-testapp:1", bad_reg.port);

    let start = |image: &str, app: &TestApp| start_pulling(&dir, app, image, r#""ecr""#);

    let good = TestApp::new("ecr");
    let (berth, ports, _) = start(&image, &good);
    wait_for("the app pulled with the ECR token to serve", Duration::from_secs(40), || {
        (curl(&[&format!("http://127.0.0.1:{}/_berth/health", ports.http)]).0 == 200).then_some(())
    });
    let (code, body) = curl(&["-k", &format!("https://127.0.0.1:{}/health", ports.https)]);
    assert_eq!(code, 200, "through berth's https: {body}");
    let logs = berth.logs();
    assert!(logs.contains("fetched an ECR authorization token"), "{logs}");
    assert!(!logs.contains(&password), "the ECR token's password must not be logged");
    let id = &good.containers(true)[0];
    assert_eq!(TestApp::inspect(id, "{{.Config.Image}}"), image);
    drop(berth);
    run(Command::new("docker").args(["rmi", "-f", &image]));

    // Refused token: one retry with a fresh token, then an error that says so and names the
    // registry; nothing serves.
    let bad = TestApp::new("ecrbad");
    let (berth, ports, cfg) = start(&bad_image, &bad);
    let registry = format!("127.0.0.1:{}", bad_reg.port);
    let want = format!("authentication failed: {registry} refused the ECR token");
    wait_for("the ECR authentication error", Duration::from_secs(30), || berth.logs().contains(&want).then_some(()));
    let logs = berth.logs();
    assert!(logs.contains("the registry refused the ECR token; fetching a fresh one and retrying once"), "{logs}");
    assert!(!logs.contains(&password), "the ECR token's password must not be logged");
    let state = wait_for("status to name the failure", Duration::from_secs(10), || {
        let s = status_json(&cfg)["apps"][&bad.name]["state"].as_str().map(str::to_owned)?;
        s.contains("authentication failed").then_some(s)
    });
    assert!(state.contains(&registry), "{state}");
    assert_eq!(curl(&[&format!("http://127.0.0.1:{}/_berth/health", ports.http)]).0, 503);
    assert!(bad.containers(false).is_empty(), "no container without an image");
}

/// berth with one app that pulls `image` (always) with `registry_auth = <auth>`, AWS calls
/// going to moto. Returns berth, its ports and its config file.
fn start_pulling(dir: &TestDir, app: &TestApp, image: &str, auth: &str) -> (Berth, Ports, std::path::PathBuf) {
    let ports = Ports::pick();
    let rest = format!(
        r#"
[aws]
region = "us-east-1"
endpoint_url = "{moto}"

[apps.{name}]
image = "{image}"
port = 8080
pull = "always"
registry_auth = {auth}
[apps.{name}.health]
path = "/health"
interval = "300ms"
"#,
        moto = env("BERTH_TEST_MOTO_URL"),
        name = app.name,
    );
    let cfg = dir.write(&format!("{}.toml", app.name), &config_toml(dir, ports, "0s", "1s", &rest));
    (Berth::spawn(Berth::command(&cfg), dir), ports, cfg)
}
