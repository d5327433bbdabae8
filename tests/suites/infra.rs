//! `infra/`: the Terraform that puts berth on an Auto Scaling group behind an ALB.
//!
//! What runs here, with the real `terraform` and the real `berth`:
//! - `terraform fmt -check -recursive infra/`;
//! - a render with no providers at all: `infra/tests/render` uses only the provider-free
//!   `modules/berth-config`, so `terraform init` + `apply` work with no registry. The rendered
//!   berth.toml must pass `berth check`, the cloud-config must parse as YAML and write that
//!   file 0600 and start berth with `systemctl enable --now --no-block`, and the IAM policy
//!   JSON must keep every ssm/kms action off `*` resources;
//! - `terraform validate` of the example root, when the AWS provider can be installed (a
//!   filesystem mirror in `$BERTH_TF_PROVIDER_MIRROR` or /opt/tf-plugins, else the registry);
//!   where it cannot, the test says so and skips only that part. With moto reachable it also
//!   plans the whole example and runs `berth check` on the config inside the planned
//!   launch template's user data.
//!
//! Terraform runs in copies of `infra/` under temp dirs: no `.terraform`, lock or state file is
//! ever left in the repository. Without `terraform` on PATH the suite fails under `CI=true`
//! and says why; elsewhere it prints that it skipped.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use berth_tests::{berth_bin, TestDir};
use serde_json::Value;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

fn in_ci() -> bool {
    matches!(std::env::var("CI").as_deref(), Ok("true") | Ok("1"))
}

/// The `terraform` binary, or `None` outside CI (after saying so). In CI a missing terraform
/// is a failure: the infra checks must not pass by not running.
fn terraform() -> Option<PathBuf> {
    static FOUND: OnceLock<Option<PathBuf>> = OnceLock::new();
    let found = FOUND.get_or_init(|| {
        if let Some(p) = std::env::var_os("TERRAFORM") {
            return Some(PathBuf::from(p));
        }
        std::env::var_os("PATH")
            .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join("terraform")).find(|p| p.is_file()))
    });
    match found {
        Some(p) => Some(p.clone()),
        None if in_ci() => panic!(
            "terraform is not on PATH (nor in $TERRAFORM), and CI=true: the infra/ checks (fmt, offline render, \
             berth check of the rendered user data, IAM policy rules) cannot run. Install Terraform >= 1.5 on the CI \
             machine (it is not in the Debian or PyPI registries: put the release binary on PATH)."
        ),
        None => {
            println!("SKIPPED: terraform is not on PATH (set TERRAFORM=/path/to/terraform); under CI=true this fails");
            None
        }
    }
}

/// What a finished command said.
struct Output {
    status: Option<i32>,
    stdout: String,
    stderr: String,
    timed_out: bool,
}

impl Output {
    fn ok(&self) -> bool {
        self.status == Some(0) && !self.timed_out
    }
    fn both(&self) -> String {
        format!("--- stdout\n{}\n--- stderr\n{}", self.stdout, self.stderr)
    }
}

/// Runs `cmd` to completion or until `timeout` (then kills it), collecting its output.
fn run(mut cmd: Command, timeout: Duration) -> Output {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st.code();
        }
        if Instant::now() > deadline {
            timed_out = true;
            let _ = child.kill();
            break child.wait().ok().and_then(|s| s.code());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output { status, stdout: t_out.join().unwrap_or_default(), stderr: t_err.join().unwrap_or_default(), timed_out }
}

/// A terraform command with automation settings and our own CLI config (so a user's
/// ~/.terraformrc, plugin cache or credentials never change what the test sees).
fn tf(bin: &Path, cli_config: &Path, dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg(format!("-chdir={}", dir.display()))
        .args(args)
        .env("TF_IN_AUTOMATION", "1")
        .env("TF_INPUT", "0")
        .env("CHECKPOINT_DISABLE", "1")
        .env("TF_CLI_CONFIG_FILE", cli_config)
        .env_remove("TF_DATA_DIR")
        .env_remove("TF_PLUGIN_CACHE_DIR")
        .env_remove("TF_WORKSPACE");
    for (k, _) in std::env::vars_os() {
        if let Some(k) = k.to_str() {
            if k.starts_with("TF_VAR_") || k.starts_with("TF_CLI_ARGS") {
                cmd.env_remove(k);
            }
        }
    }
    cmd
}

fn must(what: &str, out: Output) -> Output {
    assert!(
        out.ok(),
        "{what} failed (status {:?}{})\n{}",
        out.status,
        if out.timed_out { ", timed out" } else { "" },
        out.both()
    );
    out
}

/// Copies `infra/` into `dest/infra`, without Terraform's working files.
fn copy_infra(dest: &Path) -> PathBuf {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name();
            let name_s = name.to_string_lossy();
            if name_s == ".terraform"
                || name_s.ends_with(".tfstate")
                || name_s.contains(".tfstate.")
                || name_s == ".terraform.lock.hcl"
            {
                continue;
            }
            let ty = entry.file_type().unwrap();
            if ty.is_dir() {
                copy(&entry.path(), &to.join(&name));
            } else if ty.is_file() {
                std::fs::copy(entry.path(), to.join(&name)).unwrap();
            }
        }
    }
    let to = dest.join("infra");
    copy(&repo_root().join("infra"), &to);
    to
}

/// Runs a short python3 program; the YAML checks use PyYAML, as cloud-init does.
fn python(program: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new("python3");
    cmd.arg("-c").arg(program).args(args);
    run(cmd, Duration::from_secs(60))
}

// ------------------------------------------------------------------------------------------
// terraform fmt
// ------------------------------------------------------------------------------------------

#[test]
fn terraform_fmt_check_passes() {
    let Some(bin) = terraform() else { return };
    let dir = TestDir::new();
    let rc = dir.write("terraformrc", "");
    let out =
        run(tf(&bin, &rc, &repo_root(), &["fmt", "-check", "-recursive", "-diff", "infra"]), Duration::from_secs(60));
    assert!(
        out.ok(),
        "`terraform fmt -check -recursive infra/` wants changes (run `terraform fmt -recursive infra`):\n{}",
        out.both()
    );
}

// ------------------------------------------------------------------------------------------
// Offline render through modules/berth-config
// ------------------------------------------------------------------------------------------

/// One rendered case of infra/tests/render.
struct Case {
    name: String,
    berth_toml: String,
    cloud_config: String,
    iam_policy: Value,
    statement_count: u64,
    /// The Session Manager policy, when the case asks for it.
    session_manager_policy: Option<Value>,
}

struct Rendered {
    cases: Vec<Case>,
    /// Kept alive so the files stay while tests read them.
    _dir: TestDir,
}

/// Renders infra/tests/render once per test binary: init + apply in a temp copy (no
/// providers, no registry), then `terraform output -json`.
fn rendered() -> Option<&'static Rendered> {
    static RENDERED: OnceLock<Rendered> = OnceLock::new();
    let bin = terraform()?;
    Some(RENDERED.get_or_init(|| {
        let dir = TestDir::new();
        let rc = dir.write("terraformrc", "");
        let infra = copy_infra(dir.path());
        let root = infra.join("tests/render");
        let t0 = Instant::now();
        must(
            "terraform init -backend=false (render root, no providers)",
            run(
                tf(&bin, &rc, &root, &["init", "-backend=false", "-input=false", "-no-color"]),
                Duration::from_secs(120),
            ),
        );
        must(
            "terraform apply (render root)",
            run(
                tf(&bin, &rc, &root, &["apply", "-auto-approve", "-input=false", "-no-color"]),
                Duration::from_secs(120),
            ),
        );
        let out = must(
            "terraform output -json cases",
            run(tf(&bin, &rc, &root, &["output", "-json", "cases"]), Duration::from_secs(60)),
        );
        println!("rendered infra/tests/render with no providers in {:.1}s", t0.elapsed().as_secs_f64());
        let cases: Value = serde_json::from_str(&out.stdout).expect("terraform output -json is JSON");
        let cases = cases
            .as_object()
            .expect("cases is an object")
            .iter()
            .map(|(name, c)| Case {
                name: name.clone(),
                berth_toml: c["berth_toml"].as_str().expect("berth_toml").to_string(),
                cloud_config: c["cloud_config"].as_str().expect("cloud_config").to_string(),
                iam_policy: serde_json::from_str(c["iam_policy_json"].as_str().expect("iam_policy_json"))
                    .expect("iam_policy_json is JSON"),
                statement_count: c["iam_policy_statement_count"].as_u64().expect("statement count"),
                session_manager_policy: c["session_manager_policy"]
                    .as_str()
                    .map(|s| serde_json::from_str(s).expect("session_manager_policy_json is JSON")),
            })
            .collect::<Vec<_>>();
        assert!(cases.len() >= 2, "expected the full and minimal cases, got {}", cases.len());
        Rendered { cases, _dir: dir }
    }))
}

fn berth_check(dir: &TestDir, file_name: &str, toml: &str) -> Output {
    let path = dir.write(file_name, toml);
    let mut cmd = Command::new(berth_bin());
    cmd.arg("check").arg("-c").arg(&path);
    run(cmd, Duration::from_secs(30))
}

#[test]
fn rendered_berth_toml_passes_berth_check() {
    let Some(r) = rendered() else { return };
    let dir = TestDir::new();
    for case in &r.cases {
        let out = berth_check(&dir, &format!("{}.toml", case.name), &case.berth_toml);
        assert!(
            out.status == Some(0),
            "`berth check` rejected the berth.toml rendered for case {:?} (exit {:?}):\n{}\n--- berth.toml\n{}",
            case.name,
            out.status,
            out.both(),
            case.berth_toml
        );
        println!("case {}: berth check exit 0 ({} lines of plan)", case.name, out.stdout.lines().count());
    }
    // The full case exercises what an operator sets in production; make sure it really does.
    let full = r.cases.iter().find(|c| c.name == "full").expect("full case");
    for needle in [
        "mode = \"acme\"",
        "shared = ",
        "eab_kid = \"kid-1\"",
        "eab_hmac_key_parameter = \"/myapp/prod/acme-eab-key\"",
        "[secrets]",
        "registry_auth = \"ecr\"",
        "[apps.web.health]",
        "env = {",
    ] {
        assert!(full.berth_toml.contains(needle), "full case lacks {needle:?}:\n{}", full.berth_toml);
    }
    let minimal = r.cases.iter().find(|c| c.name == "minimal").expect("minimal case");
    assert!(minimal.berth_toml.contains("mode = \"self-signed\""), "{}", minimal.berth_toml);
}

/// Parses cloud-config text with PyYAML (what cloud-init uses) and returns it as JSON.
fn parse_cloud_config(dir: &TestDir, name: &str, text: &str) -> Value {
    let path = dir.write(&format!("{name}.cloud-config.yaml"), text);
    let out = python(
        "import json, sys\n\
         try:\n    import yaml\n\
         except ImportError:\n    sys.exit('PyYAML is missing: apt-get install python3-yaml (or pip install pyyaml)')\n\
         print(json.dumps(yaml.safe_load(open(sys.argv[1]).read())))",
        &[path.to_str().unwrap()],
    );
    assert!(out.ok(), "the cloud-config of case {name:?} is not valid YAML:\n{}\n--- cloud-config\n{text}", out.both());
    serde_json::from_str(&out.stdout).expect("python printed JSON")
}

fn runcmd_lines(doc: &Value) -> Vec<String> {
    doc["runcmd"]
        .as_array()
        .expect("runcmd is a list")
        .iter()
        .map(|c| match c {
            Value::String(s) => s.clone(),
            Value::Array(parts) => {
                parts.iter().map(|p| p.as_str().unwrap_or("").to_string()).collect::<Vec<_>>().join(" ")
            }
            other => panic!("unexpected runcmd entry {other}"),
        })
        .collect()
}

fn permissions_are(entry: &Value, octal: u32) -> bool {
    match &entry["permissions"] {
        Value::String(s) => u32::from_str_radix(s.trim_start_matches("0o"), 8) == Ok(octal),
        // YAML 1.1 reads an unquoted 0600 as octal.
        Value::Number(n) => n.as_u64() == Some(octal as u64),
        _ => false,
    }
}

#[test]
fn rendered_cloud_config_writes_the_config_and_starts_berth() {
    let Some(r) = rendered() else { return };
    let dir = TestDir::new();
    for case in &r.cases {
        let text = &case.cloud_config;
        assert!(
            text.starts_with("#cloud-config\n"),
            "case {}: user data must start with #cloud-config:\n{text}",
            case.name
        );
        assert!(text.len() < 16 * 1024, "case {}: user data is {} bytes, EC2 allows 16 KiB", case.name, text.len());
        for bad in ["sleep 90", "--env-file", "certbot"] {
            assert!(!text.contains(bad), "case {}: the user data still has {bad:?}", case.name);
        }
        let doc = parse_cloud_config(&dir, &case.name, text);

        let files = doc["write_files"].as_array().expect("write_files is a list");
        let config = files
            .iter()
            .find(|f| f["path"] == "/etc/berth/berth.toml")
            .unwrap_or_else(|| panic!("case {}: no write_files entry for /etc/berth/berth.toml", case.name));
        assert!(
            permissions_are(config, 0o600),
            "case {}: berth.toml must be written 0600, entry is {config}",
            case.name
        );
        assert_eq!(config["owner"], "root:root", "case {}", case.name);
        assert_eq!(
            config["content"].as_str(),
            Some(case.berth_toml.as_str()),
            "case {}: the config in the user data differs from the rendered berth.toml",
            case.name
        );
        // The file as it lands on the instance passes `berth check` too (not just the
        // Terraform output): YAML block scalars are where indentation bugs would show.
        let out = berth_check(&dir, &format!("{}.from-user-data.toml", case.name), config["content"].as_str().unwrap());
        assert!(out.status == Some(0), "case {}: berth check of the file in the user data:\n{}", case.name, out.both());

        let install = files
            .iter()
            .find(|f| f["path"] == "/usr/local/sbin/berth-install")
            .unwrap_or_else(|| panic!("case {}: no install script in write_files", case.name));
        assert!(permissions_are(install, 0o700), "case {}: install script entry {install}", case.name);
        let script = dir.write(&format!("{}.berth-install.sh", case.name), install["content"].as_str().unwrap());
        let mut sh = Command::new("sh");
        sh.arg("-n").arg(&script);
        let out = run(sh, Duration::from_secs(10));
        assert!(out.ok(), "case {}: the install script is not valid sh:\n{}", case.name, out.both());

        let cmds = runcmd_lines(&doc);
        let enable = cmds
            .iter()
            .position(|c| {
                c.split_whitespace().collect::<Vec<_>>().join(" ")
                    == "systemctl enable --now --no-block berth.socket berth.service"
            })
            .unwrap_or_else(|| {
                panic!(
                    "case {}: runcmd lacks `systemctl enable --now --no-block berth.socket berth.service`: {cmds:?}",
                    case.name
                )
            });
        let install_at = cmds
            .iter()
            .position(|c| c.contains("/usr/local/sbin/berth-install"))
            .unwrap_or_else(|| panic!("case {}: runcmd never runs the install script: {cmds:?}", case.name));
        assert!(install_at < enable, "case {}: berth is enabled before it is installed: {cmds:?}", case.name);
        println!("case {}: cloud-config OK ({} bytes, runcmd {:?})", case.name, text.len(), cmds);
    }
}

/// Writes an executable stub that logs its command line and, for downloads, writes a file.
fn stub(dir: &Path, name: &str, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\necho \"{name} $*\" >> \"$STUB_LOG\"\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A PATH with stubs for the package managers, downloaders, systemctl and berth, plus links
/// to the few real tools the script needs. `with_apt` picks which AMI family it looks like.
fn stub_path(dir: &Path, with_apt: bool) -> PathBuf {
    let bin = dir.join(if with_apt { "bin-apt" } else { "bin-dnf" });
    if bin.exists() {
        return bin;
    }
    std::fs::create_dir_all(&bin).unwrap();
    for tool in ["sed", "mktemp", "sha256sum", "rm", "head", "cat", "mkdir", "sleep"] {
        let real = ["/usr/bin", "/bin"].iter().map(|d| Path::new(d).join(tool)).find(|p| p.exists());
        let real = real.unwrap_or_else(|| panic!("{tool} not found in /usr/bin or /bin"));
        std::os::unix::fs::symlink(real, bin.join(tool)).unwrap();
    }
    let download = r#"while [ $# -gt 0 ]; do case "$1" in -o) shift; echo package > "$1" ;; esac; shift; done"#;
    stub(&bin, "curl", download);
    stub(&bin, "aws", r#"eval "dest=\${$#}"; echo package > "$dest""#);
    stub(&bin, "systemctl", "");
    stub(&bin, "berth", "echo 'berth 0.1.0 (stub)'");
    stub(&bin, "uname", "echo x86_64");
    if with_apt {
        stub(&bin, "apt-get", "");
        stub(&bin, "dpkg", "echo amd64");
    } else {
        stub(&bin, "dnf", "");
    }
    bin
}

#[test]
fn rendered_install_script_installs_the_package_for_the_ami_family() {
    let Some(r) = rendered() else { return };
    let dir = TestDir::new();
    let script_of = |case: &Case| -> PathBuf {
        let doc = parse_cloud_config(&dir, &format!("{}-install", case.name), &case.cloud_config);
        let files = doc["write_files"].as_array().unwrap();
        let content = files.iter().find(|f| f["path"] == "/usr/local/sbin/berth-install").unwrap()["content"]
            .as_str()
            .unwrap()
            .to_string();
        dir.write(&format!("{}.install.sh", case.name), &content)
    };
    let run_script = |script: &Path, with_apt: bool, tag: &str| -> (Output, String) {
        let log = dir.path().join(format!("{tag}.log"));
        let mut cmd = Command::new("/bin/sh");
        cmd.arg(script)
            .env_clear()
            .env("PATH", stub_path(dir.path(), with_apt))
            .env("STUB_LOG", &log)
            .env("TMPDIR", dir.path());
        let out = run(cmd, Duration::from_secs(30));
        (out, std::fs::read_to_string(&log).unwrap_or_default())
    };
    let full = r.cases.iter().find(|c| c.name == "full").unwrap();
    let minimal = r.cases.iter().find(|c| c.name == "minimal").unwrap();

    // Debian/Ubuntu: apt, the .deb for this architecture, from S3; the config kept.
    let (out, log) = run_script(&script_of(full), true, "full-apt");
    assert!(out.ok(), "install script (apt) failed:\n{}\n--- calls\n{log}", out.both());
    for want in [
        "apt-get install -y -q docker.io",
        "systemctl enable --now --no-block docker.service",
        "aws s3 cp --only-show-errors s3://berth-artifacts-123456789012/berth/0.1.0/berth_0.1.0_amd64.deb",
        "apt-get install -y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold /",
    ] {
        assert!(log.contains(want), "install script (apt) never ran {want:?}; calls:\n{log}");
    }
    // Amazon Linux 2023: dnf and the .rpm.
    let (out, log) = run_script(&script_of(full), false, "full-dnf");
    assert!(out.ok(), "install script (dnf) failed:\n{}\n--- calls\n{log}", out.both());
    for want in ["dnf install -y -q docker", "berth_0.1.0_x86_64.rpm", "dnf install -y -q /"] {
        assert!(log.contains(want), "install script (dnf) never ran {want:?}; calls:\n{log}");
    }
    // A download that does not match package_sha256 is never installed.
    let (out, log) = run_script(&script_of(minimal), true, "minimal-apt");
    assert!(!out.ok(), "a package with the wrong checksum was accepted; calls:\n{log}");
    assert!(out.stderr.contains("does not match package_sha256"), "{}", out.both());
    assert!(
        log.contains("curl ") && !log.lines().any(|l| l.starts_with("apt-get install") && l.contains("berth.deb")),
        "the mismatching package was installed; calls:\n{log}"
    );
    println!("install script: apt and dnf paths install the right package; a checksum mismatch stops it");
}

/// The statements of a policy document as a list.
fn statements(policy: &Value) -> Vec<Value> {
    match &policy["Statement"] {
        Value::Array(a) => a.clone(),
        Value::Object(_) => vec![policy["Statement"].clone()],
        other => panic!("Statement is {other}"),
    }
}

fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a.iter().map(|x| x.as_str().expect("a string").to_string()).collect(),
        Value::Null => vec![],
        other => panic!("expected a string or a list of strings, got {other}"),
    }
}

/// The least-privilege rules every berth policy must keep. Returns the problems.
fn policy_problems(policy: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    for st in statements(policy) {
        let sid = st["Sid"].as_str().unwrap_or("(no Sid)").to_string();
        if st.get("NotAction").is_some() || st.get("NotResource").is_some() {
            problems.push(format!("{sid}: NotAction/NotResource grant more than they name"));
        }
        let actions = strings(&st["Action"]);
        let resources = strings(&st["Resource"]);
        let ssm_or_kms: Vec<&String> = actions
            .iter()
            .filter(|a| {
                let a = a.to_ascii_lowercase();
                a == "*"
                    || a.starts_with("ssm:")
                    || a.starts_with("kms:")
                    || a.starts_with("ssm*")
                    || a.starts_with("kms*")
            })
            .collect();
        if st["Effect"] != "Allow" || ssm_or_kms.is_empty() {
            continue;
        }
        for a in &ssm_or_kms {
            if a.ends_with(":*") || a.as_str() == "*" {
                problems.push(format!("{sid}: wildcard action {a}"));
            }
        }
        for r in &resources {
            let account_wide = r == "*"
                || r.ends_with(":parameter/*")
                || r.ends_with(":parameter*")
                || r.ends_with(":key/*")
                || r.ends_with(":*")
                || r.contains(":ssm:*")
                || r.contains(":kms:*");
            if account_wide {
                problems.push(format!(
                    "{sid}: {} on resource {r:?}",
                    ssm_or_kms.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                ));
            }
        }
        let is_kms = ssm_or_kms.iter().any(|a| a.to_ascii_lowercase().starts_with("kms:"));
        if is_kms {
            let via = &st["Condition"]["StringEquals"]["kms:ViaService"];
            let services = strings(via);
            if services.is_empty()
                || !services.iter().all(|s| s.starts_with("ssm.") || s.starts_with("secretsmanager."))
            {
                problems.push(format!(
                    "{sid}: kms actions without a kms:ViaService = ssm.REGION.amazonaws.com condition (got {via})"
                ));
            }
        }
        let writes = ssm_or_kms.iter().any(|a| {
            matches!(
                a.as_str(),
                "ssm:PutParameter" | "ssm:DeleteParameter" | "ssm:DeleteParameters" | "ssm:LabelParameterVersion"
            )
        });
        if writes && !sid.starts_with("Fleet") {
            problems.push(format!("{sid}: parameter writes outside the fleet ACME statement"));
        }
    }
    problems
}

#[test]
fn rendered_iam_policies_keep_ssm_and_kms_off_wildcard_resources() {
    let Some(r) = rendered() else { return };
    for case in &r.cases {
        let p = &case.iam_policy;
        assert_eq!(p["Version"], "2012-10-17", "case {}", case.name);
        assert_eq!(statements(p).len() as u64, case.statement_count, "case {}: iam_policy_statement_count", case.name);
        let problems = policy_problems(p);
        assert!(
            problems.is_empty(),
            "case {}: the IAM policy breaks least privilege:\n  {}\n{p:#}",
            case.name,
            problems.join("\n  ")
        );
        if let Some(sm) = &case.session_manager_policy {
            let problems = policy_problems(sm);
            assert!(
                problems.is_empty(),
                "case {}: the Session Manager policy:\n  {}\n{sm:#}",
                case.name,
                problems.join("\n  ")
            );
            for st in statements(sm) {
                for a in strings(&st["Action"]) {
                    assert!(
                        !a.starts_with("ssm:GetParameter"),
                        "case {}: Session Manager must not read parameters: {st}",
                        case.name
                    );
                }
            }
        }
    }
    assert!(r.cases.iter().any(|c| c.session_manager_policy.is_some()), "no case renders the Session Manager policy");

    // The full case: each feature's statement is there, on exactly its resources.
    let full = r.cases.iter().find(|c| c.name == "full").expect("full case");
    let by_sid = |sid: &str| {
        statements(&full.iam_policy)
            .into_iter()
            .find(|s| s["Sid"] == sid)
            .unwrap_or_else(|| panic!("full case: no statement {sid}:\n{:#}", full.iam_policy))
    };
    let arn = "arn:aws:ssm:eu-west-1:123456789012:parameter";
    assert_eq!(
        strings(&by_sid("ReadAppSecretsByPath")["Resource"]),
        [format!("{arn}/myapp/prod/env"), format!("{arn}/myapp/prod/env/*")]
    );
    let kms = by_sid("DecryptSecretsThroughSsm");
    assert_eq!(strings(&kms["Action"]), ["kms:Decrypt"]);
    assert!(
        strings(&kms["Condition"]["StringEquals"]["kms:ViaService"])
            .contains(&"ssm.eu-west-1.amazonaws.com".to_string()),
        "kms:ViaService must name ssm.eu-west-1.amazonaws.com: {kms}"
    );
    let fleet = by_sid("FleetAcmeState");
    for r in strings(&fleet["Resource"]) {
        assert!(r.starts_with(&format!("{arn}/myapp/prod/berth/")), "fleet writes outside the prefix: {r}");
    }
    // The EAB MAC key: read-only, that one parameter.
    let eab = by_sid("ReadAcmeEabKey");
    assert_eq!(strings(&eab["Action"]), ["ssm:GetParameter"]);
    assert_eq!(strings(&eab["Resource"]), [format!("{arn}/myapp/prod/acme-eab-key")]);
    // ecr:GetAuthorizationToken has no resource-level permissions: "*" is AWS's design, and
    // the only "*" allowed; the pulls themselves are per repository.
    assert_eq!(strings(&by_sid("EcrAuthorizationToken")["Action"]), ["ecr:GetAuthorizationToken"]);
    for r in strings(&by_sid("EcrPull")["Resource"]) {
        assert!(r.starts_with("arn:aws:ecr:eu-west-1:123456789012:repository/myapp/"), "ECR pull on {r}");
    }
    for st in statements(&full.iam_policy) {
        if strings(&st["Resource"]).iter().any(|r| r == "*") {
            assert_eq!(
                strings(&st["Action"]),
                ["ecr:GetAuthorizationToken"],
                "only GetAuthorizationToken may use \"*\": {st}"
            );
        }
    }
    println!("IAM: {} statements in the full case, none with ssm/kms on \"*\"", full.statement_count);
}

/// The rule itself catches what it is for (a test of the test).
#[test]
fn policy_rule_rejects_wildcards() {
    let bad = serde_json::json!({"Version": "2012-10-17", "Statement": [
        {"Sid": "A", "Effect": "Allow", "Action": "ssm:GetParameters", "Resource": "*"},
        {"Sid": "B", "Effect": "Allow", "Action": ["kms:Decrypt"], "Resource": ["arn:aws:kms:eu-west-1:123456789012:key/x"]},
        {"Sid": "C", "Effect": "Allow", "Action": ["ssm:PutParameter"], "Resource": ["arn:aws:ssm:eu-west-1:123456789012:parameter/*"]},
    ]});
    let problems = policy_problems(&bad);
    assert!(problems.iter().any(|p| p.starts_with("A:")), "{problems:?}");
    assert!(problems.iter().any(|p| p.starts_with("B:") && p.contains("kms:ViaService")), "{problems:?}");
    assert!(problems.iter().any(|p| p.starts_with("C:") && p.contains("parameter/*")), "{problems:?}");
    assert!(problems.iter().any(|p| p.starts_with("C:") && p.contains("writes")), "{problems:?}");
}

#[test]
fn fleet_prefix_under_the_secrets_path_is_refused() {
    // berth reads secrets.path recursively into the app's environment: a fleet prefix below
    // it would hand the app the ACME account key and the certificate's private key.
    let Some(bin) = terraform() else { return };
    let dir = TestDir::new();
    let rc = dir.write("terraformrc", "");
    let infra = copy_infra(dir.path());
    let root = infra.join("tests/nested-prefix");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(
        root.join("main.tf"),
        r#"module "cfg" {
  source      = "../../modules/berth-config"
  region      = "eu-west-1"
  account_id  = "123456789012"
  package_url = ""
  secrets     = { path = "/myapp/prod/" }
  tls = {
    mode    = "acme"
    domains = ["api.example.com"]
    acme    = { shared = "/myapp/prod/berth" }
  }
  apps = { web = { image = "web:1", port = 8080 } }
}

output "toml" {
  value = module.cfg.berth_toml
}
"#,
    )
    .unwrap();
    must(
        "terraform init (nested-prefix root)",
        run(tf(&bin, &rc, &root, &["init", "-backend=false", "-no-color"]), Duration::from_secs(120)),
    );
    let out = run(tf(&bin, &rc, &root, &["apply", "-auto-approve", "-no-color"]), Duration::from_secs(120));
    assert!(!out.ok(), "a fleet prefix under secrets.path must be refused:\n{}", out.both());
    assert!(out.stderr.contains("must not lie under secrets.path"), "unexpected error:\n{}", out.both());
}

// ------------------------------------------------------------------------------------------
// The example root, where the AWS provider can be installed
// ------------------------------------------------------------------------------------------

/// A CLI config that installs providers from a filesystem mirror when one is there.
fn provider_cli_config(dir: &TestDir) -> (PathBuf, String) {
    let mirror = std::env::var_os("BERTH_TF_PROVIDER_MIRROR")
        .map(PathBuf::from)
        .or_else(|| Some(PathBuf::from("/opt/tf-plugins")).filter(|p| p.is_dir()));
    match mirror {
        Some(m) => (
            dir.write(
                "terraformrc",
                &format!(
                    "provider_installation {{\n  filesystem_mirror {{\n    path = {:?}\n  }}\n}}\n",
                    m.display().to_string()
                ),
            ),
            format!("filesystem mirror {}", m.display()),
        ),
        None => (dir.write("terraformrc", ""), "the public registry".to_string()),
    }
}

#[test]
fn example_root_validates_and_plans_where_providers_are_available() {
    let Some(bin) = terraform() else { return };
    let dir = TestDir::new();
    let (rc, source) = provider_cli_config(&dir);
    let infra = copy_infra(dir.path());
    let root = infra.join("examples/fleet");

    let init =
        run(tf(&bin, &rc, &root, &["init", "-backend=false", "-input=false", "-no-color"]), Duration::from_secs(180));
    if !init.ok() {
        // Only a provider that cannot be fetched (no registry, no mirror) is a reason to skip:
        // anything else (a syntax error, a wrong module source) is a broken example.
        let said = init.both();
        let cannot_fetch_provider = [
            "Failed to query available provider packages",
            "Failed to install provider",
            "could not connect to registry",
        ]
        .iter()
        .any(|m| said.contains(m));
        assert!(cannot_fetch_provider, "terraform init of infra/examples/fleet failed:\n{said}");
        let why = init
            .stderr
            .lines()
            .chain(init.stdout.lines())
            .filter(|l| !l.trim().is_empty())
            .take(8)
            .collect::<Vec<_>>()
            .join("\n  ");
        println!(
            "SKIPPED terraform validate/plan of infra/examples/fleet: the AWS provider cannot be installed from {source} here \
             (no provider registry). The offline render tests cover berth.toml, the cloud-config and IAM. terraform init said:\n  {why}"
        );
        return;
    }
    let validate = must(
        "terraform validate (examples/fleet)",
        run(tf(&bin, &rc, &root, &["validate", "-no-color"]), Duration::from_secs(180)),
    );
    println!("terraform validate of infra/examples/fleet with providers from {source}: {}", validate.stdout.trim());

    // The modules on their own, too (each must stand alone for other roots), in parallel.
    std::thread::scope(|s| {
        for m in ["network", "alb", "fleet", "berth-config"] {
            let (bin, rc, mdir) = (&bin, &rc, infra.join("modules").join(m));
            s.spawn(move || {
                must(
                    &format!("terraform init (modules/{m})"),
                    run(tf(bin, rc, &mdir, &["init", "-backend=false", "-no-color"]), Duration::from_secs(180)),
                );
                must(
                    &format!("terraform validate (modules/{m})"),
                    run(tf(bin, rc, &mdir, &["validate", "-no-color"]), Duration::from_secs(180)),
                );
            });
        }
    });

    plan_against_moto(&bin, &rc, &dir, &root);
}

/// `terraform plan` of the whole example against moto (read-only: data sources only), then
/// `berth check` on the berth.toml inside the planned launch template's user data.
fn plan_against_moto(bin: &Path, rc: &Path, dir: &TestDir, root: &Path) {
    let Some(moto) = std::env::var("BERTH_TEST_MOTO_URL").ok().filter(|u| !u.is_empty()) else {
        assert!(!in_ci(), "BERTH_TEST_MOTO_URL is not set under CI=true: scripts/test must start moto");
        println!(
            "SKIPPED terraform plan of infra/examples/fleet: BERTH_TEST_MOTO_URL is not set (scripts/test sets it)"
        );
        return;
    };
    let services = ["acm", "autoscaling", "ec2", "elbv2", "iam", "kms", "route53", "ssm", "sts"];
    let endpoints = services.iter().map(|s| format!("    {s} = {moto:?}\n")).collect::<String>();
    std::fs::write(
        root.join("moto_override.tf"),
        format!(
            "provider \"aws\" {{\n  access_key                  = \"test\"\n  secret_key                  = \"test\"\n  \
             skip_credentials_validation = true\n  skip_metadata_api_check     = true\n  endpoints {{\n{endpoints}  }}\n}}\n"
        ),
    )
    .unwrap();
    std::fs::write(
        root.join("terraform.tfvars"),
        r#"region          = "us-east-1"
domains         = ["api.example.com", "www.example.com"]
route53_zone_id = "Z0000000000000000000"
app_image       = "123456789012.dkr.ecr.us-east-1.amazonaws.com/myapp/web:1.0.0"
secret_names    = ["db/password", "api-key"]
package_url     = "https://downloads.example.com/berth/berth_{arch}.{format}"
tls_mode        = "acme"
acme_contact    = ["mailto:ops@example.com"]
"#,
    )
    .unwrap();
    let plan_file = dir.path().join("example.tfplan");
    let plan_arg = format!("-out={}", plan_file.display());
    let plan = run(
        tf(bin, rc, root, &["plan", "-input=false", "-no-color", "-lock=false", &plan_arg]),
        Duration::from_secs(300),
    );
    assert!(plan.ok(), "terraform plan of infra/examples/fleet against moto ({moto}) failed:\n{}", plan.both());
    let summary = plan.stdout.lines().find(|l| l.starts_with("Plan:")).unwrap_or("(no summary)").to_string();
    let show = must(
        "terraform show -json (example plan)",
        run(tf(bin, rc, root, &["show", "-json", plan_file.to_str().unwrap()]), Duration::from_secs(120)),
    );
    let plan_json: Value = serde_json::from_str(&show.stdout).expect("plan JSON");
    let changes = plan_json["resource_changes"].as_array().expect("resource_changes");
    let find = |address: &str| {
        changes.iter().find(|c| c["address"] == address).unwrap_or_else(|| panic!("the plan has no {address}")).clone()
    };
    let lt = find("module.fleet.aws_launch_template.this");
    let user_data_b64 = lt["change"]["after"]["user_data"].as_str().expect("user_data known at plan time");
    for address in [
        "module.fleet.aws_autoscaling_group.this",
        "module.fleet.aws_autoscaling_lifecycle_hook.drain[0]",
        "module.fleet.aws_autoscaling_policy.requests_per_target[0]",
        "module.alb.aws_lb_listener.https",
        "module.alb.aws_route53_record.alias[\"api.example.com\"]",
        "aws_ssm_parameter.secret[\"db/password\"]",
    ] {
        find(address);
    }
    let tg = find("module.alb.aws_lb_target_group.https");
    assert_eq!(
        tg["change"]["after"]["deregistration_delay"], "15",
        "deregistration delay must equal drain_delay (15s)"
    );
    assert_eq!(tg["change"]["after"]["health_check"][0]["path"], "/_berth/health");
    let param = find("aws_ssm_parameter.secret[\"db/password\"]");
    assert_eq!(param["change"]["after"]["type"], "SecureString");

    // Decode the user data as EC2 hands it to cloud-init and check the config in it.
    let ud_path = dir.write("user-data.b64", user_data_b64);
    let out = python(
        "import base64, json, sys, yaml\n\
         text = base64.b64decode(open(sys.argv[1]).read()).decode()\n\
         assert text.startswith('#cloud-config\\n'), text[:40]\n\
         doc = yaml.safe_load(text)\n\
         print(json.dumps([f['content'] for f in doc['write_files'] if f['path'] == '/etc/berth/berth.toml'][0]))",
        &[ud_path.to_str().unwrap()],
    );
    assert!(out.ok(), "decoding the planned user data:\n{}", out.both());
    let toml: String = serde_json::from_str(&out.stdout).unwrap();
    let check = berth_check(dir, "example-plan.toml", &toml);
    assert!(
        check.status == Some(0),
        "berth check of the example's planned user data:\n{}\n--- berth.toml\n{toml}",
        check.both()
    );
    assert!(toml.contains("shared = \"/myapp/prod/berth\"") && toml.contains("path = \"/myapp/prod/env/\""), "{toml}");
    println!(
        "terraform plan of infra/examples/fleet against moto: {summary}; berth check of the planned user data: exit 0"
    );
}
