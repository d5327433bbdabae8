//! Proof that the test environment is the real thing, not a mock: the Docker Engine
//! answers its API, Pebble serves an ACME directory over TLS, and moto stores and returns a
//! SecureString through the real SSM wire protocol (SigV4-signed, as the SDK does it).

use std::process::Command;

use berth_tests::{env, ssm};

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run command");
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into()
}

#[test]
fn docker_engine_answers() {
    let version =
        run(Command::new("curl").args(["-sf", "--unix-socket", "/var/run/docker.sock", "http://docker/version"]));
    let v: serde_json::Value = serde_json::from_str(&version).unwrap();
    assert!(v["ApiVersion"].as_str().is_some(), "{version}");
    let image = env("BERTH_TEST_APP_IMAGE");
    let inspect = run(Command::new("docker").args(["image", "inspect", "--format", "{{.Id}}", &image]));
    assert!(inspect.starts_with("sha256:"), "test app image {image} exists: {inspect}");
}

#[test]
fn pebble_serves_an_acme_directory() {
    let dir = run(Command::new("curl").args([
        "-sf",
        "--cacert",
        &env("BERTH_TEST_PEBBLE_CA"),
        &env("BERTH_TEST_PEBBLE_DIRECTORY"),
    ]));
    let d: serde_json::Value = serde_json::from_str(&dir).unwrap();
    for key in ["newAccount", "newNonce", "newOrder"] {
        assert!(d[key].as_str().is_some_and(|u| u.starts_with("https://")), "{key} in {dir}");
    }
}

#[test]
fn moto_stores_and_returns_a_secure_string() {
    let name = format!("/berth-test/env/{}", std::process::id());
    let value = "s3cr3t=with\nnewline and ünïcode";
    ssm("PutParameter", serde_json::json!({"Name": name, "Value": value, "Type": "SecureString", "Overwrite": true}));
    let encrypted = ssm("GetParameter", serde_json::json!({"Name": name, "WithDecryption": false}));
    assert_ne!(encrypted["Parameter"]["Value"], value, "without decryption the value is not plain");
    let got = ssm("GetParameter", serde_json::json!({"Name": name, "WithDecryption": true}));
    assert_eq!(got["Parameter"]["Type"], "SecureString");
    assert_eq!(got["Parameter"]["Value"], value);
    ssm("DeleteParameter", serde_json::json!({"Name": name}));
}
