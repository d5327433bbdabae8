//! Pulling the app image from a private registry with basic-auth credentials kept in SSM:
//! Debian's docker-registry (distribution) on 127.0.0.1 with an htpasswd file, a real push,
//! and berth pulling through the real Docker Engine.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use berth_tests::{config_toml, curl, env, free_port, ssm_put, wait_for, Berth, Ports, TestApp, TestDir};

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
    assert!(out.status.success(), "{cmd:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
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
registry_auth = {{ username = "{prefix}/user", password = "{prefix}/{password_param}" }}
[apps.{name}.health]
path = "/health"
interval = "300ms"
"#,
            moto = env("BERTH_TEST_MOTO_URL"),
            name = app.name,
        );
        let cfg = dir.write(&format!("{}.toml", app.name), &config_toml(&dir, ports, "0s", "1s", &rest));
        (Berth::spawn(Berth::command(&cfg), &dir), ports)
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
