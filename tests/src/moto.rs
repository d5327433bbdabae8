//! Seeding moto (SSM Parameter Store and Secrets Manager) for the secrets tests, through
//! boto3, which moto's server install brings along. Each test uses its own prefix from
//! [`unique_prefix`], so parallel tests and repeated runs against one moto never collide.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

/// moto's URL from `scripts/testenv up` (`BERTH_TEST_MOTO_URL`). Outside CI a missing moto
/// skips the caller (`None`); under `CI=true` it fails loudly, so CI never passes by skipping.
pub fn moto_url() -> Option<String> {
    match std::env::var("BERTH_TEST_MOTO_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("BERTH_TEST_MOTO_URL is not set under CI=true: scripts/test must start moto (scripts/testenv up)")
        }
        _ => {
            eprintln!("skipped: BERTH_TEST_MOTO_URL is not set (run through scripts/test, or `source /tmp/berth-testenv/env.sh`)");
            None
        }
    }
}

/// The region every test seeds and reads in; moto keeps one store per region.
pub const REGION: &str = "us-east-1";

/// `/berth-test/<tag>-<pid>-<nanos>`: a parameter prefix no other test or run uses.
pub fn unique_prefix(tag: &str) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    format!("/berth-test/{tag}-{}-{nanos}", std::process::id())
}

/// Environment for any AWS client talking to moto: dummy keys, a fixed region, and IMDS
/// off, so nothing ever tries 169.254.169.254 from a test machine.
pub fn aws_env(cmd: &mut Command) -> &mut Command {
    cmd.env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_ENDPOINT_URL")
        .env("AWS_REGION", REGION)
        .env("AWS_DEFAULT_REGION", REGION)
        .env("AWS_EC2_METADATA_DISABLED", "true")
}

/// One seeding step.
pub enum Op<'a> {
    /// PutParameter with Overwrite; `kind` is `String`, `SecureString` or `StringList`.
    Put {
        name: &'a str,
        kind: &'a str,
        value: &'a str,
    },
    /// CreateSecret (or PutSecretValue when it exists) in Secrets Manager.
    Secret {
        name: &'a str,
        value: &'a str,
    },
    Delete {
        name: &'a str,
    },
}

const SEED_PY: &str = r#"
import json, sys, boto3
req = json.load(sys.stdin)
kw = dict(endpoint_url=req["endpoint"], region_name=req["region"])
ssm = boto3.client("ssm", **kw)
sm = boto3.client("secretsmanager", **kw)
for op in req["ops"]:
    if op["op"] == "put":
        ssm.put_parameter(Name=op["name"], Type=op["kind"], Value=op["value"], Overwrite=True)
    elif op["op"] == "secret":
        try:
            sm.create_secret(Name=op["name"], SecretString=op["value"])
        except sm.exceptions.ResourceExistsException:
            sm.put_secret_value(SecretId=op["name"], SecretString=op["value"])
    elif op["op"] == "delete":
        ssm.delete_parameter(Name=op["name"])
"#;

/// Applies `ops` to moto at `url`, in order. Values travel as JSON on stdin, so any
/// UTF-8, newline or quote arrives unchanged.
pub fn seed(url: &str, ops: &[Op]) {
    let ops: Vec<serde_json::Value> = ops
        .iter()
        .map(|op| match op {
            Op::Put { name, kind, value } => {
                serde_json::json!({"op": "put", "name": name, "kind": kind, "value": value})
            }
            Op::Secret { name, value } => serde_json::json!({"op": "secret", "name": name, "value": value}),
            Op::Delete { name } => serde_json::json!({"op": "delete", "name": name}),
        })
        .collect();
    let req = serde_json::json!({"endpoint": url, "region": REGION, "ops": ops}).to_string();
    let mut child = aws_env(Command::new("python3").arg("-c").arg(SEED_PY))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (with boto3, which moto[server] installs)");
    child.stdin.take().unwrap().write_all(req.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "seeding moto failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// A random lowercase-hex string, for secret values a test searches logs for.
pub fn random_token(len: usize) -> String {
    use std::hash::{BuildHasher, Hasher};
    // std's RandomState is seeded from the OS per process and differs per instance: random
    // enough for strings that must not show up in a log by accident, with no extra crate.
    let mut out = String::with_capacity(len);
    while out.len() < len {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(out.len());
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out.truncate(len);
    out
}
