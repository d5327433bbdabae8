//! Secrets against a real moto (seeded through boto3), with `berth_tests::faultproxy` in
//! front of it for what moto does not model: throttling, IAM denials, KMS failures.
//! Without `BERTH_TEST_MOTO_URL` the moto tests skip, except under `CI=true`, where they fail.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use aws_config::retry::RetryConfig;
use berth_tests::faultproxy::{Fault, FaultProxy};
use berth_tests::moto::{moto_url, random_token, seed, unique_prefix, Op, REGION};

use super::*;
use crate::config::{AwsConfig, OnChange, SecretSelection, SecretsConfig};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// berth's real SDK configuration pointed at `endpoint`, with two test-only changes: static
/// dummy keys (the default chain would end at IMDS, which no test may call) and SDK retry
/// backoff in milliseconds instead of seconds, so retry tests take seconds, not minutes.
async fn sdk(endpoint: &str) -> SdkConfig {
    let real =
        crate::aws::sdk_config(&AwsConfig { region: Some(REGION.into()), endpoint_url: Some(endpoint.into()) }).await;
    let retry = real.retry_config().unwrap().clone();
    real.into_builder()
        .credentials_provider(crate::aws::test_credentials())
        .retry_config(
            RetryConfig::adaptive()
                .with_max_attempts(retry.max_attempts())
                .with_initial_backoff(Duration::from_millis(20))
                .with_max_backoff(Duration::from_millis(100)),
        )
        .build()
}

fn secrets_config(path: Option<&str>, parameters: &[&str]) -> SecretsConfig {
    SecretsConfig {
        path: path.map(str::to_owned),
        parameters: parameters.iter().map(|s| s.to_string()).collect(),
        refresh_interval: crate::config::Dur::secs(300),
        on_change: OnChange::Redeploy,
    }
}

async fn source(endpoint: &str, path: Option<&str>, parameters: &[&str]) -> SecretsSource {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let partition = format!("berth-test-{}", N.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    SecretsSource::isolated(&sdk(endpoint).await, &secrets_config(path, parameters), &partition)
}

const FAST: RetryPolicy = RetryPolicy {
    initial: Duration::from_millis(50),
    max: Duration::from_millis(200),
    max_attempts: Some(5),
    retry_permanent: false,
    first_jitter: Duration::ZERO,
};

/// name → (value, parameter): the part of a set a test compares exactly.
fn flatten(set: &SecretSet) -> BTreeMap<String, (String, String)> {
    set.iter().map(|(k, e)| (k.to_string(), (e.value.expose().to_string(), e.parameter.clone()))).collect()
}

fn set_of(pairs: &[(&str, &str)]) -> SecretSet {
    let mut b = SetBuilder::default();
    for (k, v) in pairs {
        b.add(k.to_string(), format!("/p/{k}"), Secret::new(v.to_string()), 1);
    }
    b.finish().unwrap()
}

// ---------------------------------------------------------------------------------------
// Without moto
// ---------------------------------------------------------------------------------------

#[test]
fn secret_values_are_redacted_when_formatted() {
    let s = Secret::new("hunter2".into());
    assert_eq!(format!("{s}"), "<redacted>");
    assert_eq!(format!("{s:?}"), "<redacted>");
    assert_eq!(s.expose(), "hunter2");
    let set = set_of(&[("DB_PASSWORD", "hunter2")]);
    let debug = format!("{set:?} {:?}", set.entry("DB_PASSWORD"));
    assert!(!debug.contains("hunter2"), "{debug}");
    assert!(debug.contains("/p/DB_PASSWORD"), "{debug}");
}

#[test]
fn digest_depends_on_names_and_values_only() {
    let a = set_of(&[("A", "1"), ("B", "2")]);
    let b = set_of(&[("B", "2"), ("A", "1")]);
    assert_eq!(a.digest(), b.digest());
    assert_eq!(a.digest().len(), 64);
    assert_ne!(a.digest(), set_of(&[("A", "1"), ("B", "3")]).digest());
    assert_ne!(a.digest(), set_of(&[("A", "1"), ("C", "2")]).digest());
    // Length prefixes: moving a boundary is a different set.
    assert_ne!(set_of(&[("A", "B=C")]).digest(), set_of(&[("AB", "=C")]).digest());
    // The version is not part of it: re-putting an unchanged value redeploys nothing.
    let mut v2 = SetBuilder::default();
    v2.add("A".into(), "/p/A".into(), Secret::new("1".into()), 7);
    v2.add("B".into(), "/p/B".into(), Secret::new("2".into()), 9);
    assert_eq!(v2.finish().unwrap().digest(), a.digest());
}

#[test]
fn diff_names_added_removed_and_changed() {
    let old = set_of(&[("A", "1"), ("B", "2"), ("C", "3")]);
    let new = set_of(&[("A", "1"), ("B", "20"), ("D", "4")]);
    let c = old.diff(&new);
    assert_eq!(c.added, ["D"]);
    assert_eq!(c.removed, ["C"]);
    assert_eq!(c.changed, ["B"]);
    assert!(old.diff(&old.clone()).is_empty());
}

#[test]
fn select_returns_requested_names_or_every_missing_one() {
    let set = set_of(&[("A", "1"), ("B", "2")]);
    assert_eq!(set.select(&SecretSelection::All).unwrap().len(), 2);
    let only = set.select(&SecretSelection::Only(vec!["B".into()])).unwrap();
    assert_eq!(only.iter().map(|(k, v)| (*k, v.expose())).collect::<Vec<_>>(), [("B", "2")]);
    let missing = set.select(&SecretSelection::Only(vec!["X".into(), "A".into(), "Y".into()])).unwrap_err();
    assert_eq!(missing, ["X", "Y"]);
}

#[test]
fn collisions_name_both_parameters() {
    let mut b = SetBuilder::default();
    b.add("DB_PASSWORD".into(), "/app/db/password".into(), Secret::new("s1".into()), 1);
    b.add("DB_PASSWORD".into(), "/app/db-password".into(), Secret::new("s2".into()), 1);
    // The same parameter reached twice (path and list) is not a collision.
    b.add("X".into(), "/app/x".into(), Secret::new("s3".into()), 1);
    b.add("X".into(), "/app/x".into(), Secret::new("s3".into()), 1);
    let e = b.finish().unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, SecretsError::Collision { ref collisions } if collisions.len() == 1), "{msg}");
    for want in ["DB_PASSWORD", "/app/db/password", "/app/db-password"] {
        assert!(msg.contains(want), "{msg}");
    }
    assert!(!msg.contains("s1") && !msg.contains("s2"), "{msg}");
}

#[test]
fn waits_are_bounded() {
    for _ in 0..50 {
        let d = at_cap(Duration::from_secs(2));
        assert!(d >= Duration::from_secs(1) && d <= Duration::from_secs(2), "{d:?}");
        // Never longer than the interval, so a change is seen within one.
        let d = interval_jitter(Duration::from_secs(10));
        assert!(d >= Duration::from_secs(9) && d <= Duration::from_secs(10), "{d:?}");
        assert!(random_up_to(Duration::from_millis(5)) <= Duration::from_millis(5));
    }
    assert_eq!(random_up_to(Duration::ZERO), Duration::ZERO);
}

#[test]
fn a_short_interval_does_not_shorten_the_backoff_below_its_floor() {
    // A 1 s interval while throttled: back off to 30 s, not retry every second.
    let mut b = RefreshTiming::new(Duration::from_secs(1)).backoff();
    let late: Vec<Duration> = (0..10).map(|_| b.next_delay()).skip(6).collect();
    assert!(late.iter().all(|d| *d >= BACKOFF_CAP_FLOOR / 2), "{late:?}");
    assert_eq!(b.step(20), BACKOFF_CAP_FLOOR);
    // Long intervals keep the usual 60 s cap; shorter ones between the floor and it cap there.
    assert_eq!(RefreshTiming::new(Duration::from_secs(300)).backoff().step(20), Duration::from_secs(60));
    assert_eq!(RefreshTiming::new(Duration::from_secs(45)).backoff().step(20), Duration::from_secs(45));
    assert_eq!(RefreshTiming::new(Duration::ZERO).backoff().step(20), Duration::from_secs(60));
}

fn call<'a>(scope: Scope<'a>) -> Call<'a> {
    Call {
        action: "ssm:GetParametersByPath",
        scope,
        region: "eu-central-1",
        endpoint: "https://ssm.eu-central-1.amazonaws.com",
    }
}

#[test]
fn service_errors_are_classified_for_operators() {
    let c = call(Scope::Path("/myapp/prod/"));
    let denied = c.classify_service(
        "AccessDeniedException".into(),
        "User: arn:aws:sts::111122223333:assumed-role/web/i-1 is not authorized to perform: \
         ssm:GetParametersByPath on resource: arn:aws:ssm:eu-central-1:111122223333:parameter/myapp/prod \
         because no identity-based policy allows the ssm:GetParametersByPath action"
            .into(),
        400,
    );
    let msg = denied.to_string();
    assert_eq!(denied.kind(), "access_denied");
    assert!(
        msg.contains(
            "access denied: ssm:GetParametersByPath on arn:aws:ssm:eu-central-1:111122223333:parameter/myapp/prod"
        ),
        "{msg}"
    );
    assert!(msg.contains("instance profile role needs ssm:GetParametersByPath on arn:aws:ssm:eu-central-1:111122223333:parameter/myapp/prod*"), "{msg}");

    let kms = c.classify_service(
        "AccessDeniedException".into(),
        "The ciphertext refers to a customer master key that does not exist, does not exist in this \
         region, or you are not allowed to access. (Service: AWSKMS; Status Code: 400)"
            .into(),
        400,
    );
    assert_eq!(kms.kind(), "kms", "{kms}");
    assert!(kms.to_string().contains("kms:Decrypt"), "{kms}");
    assert_eq!(c.classify_service("InvalidKeyId".into(), "".into(), 400).kind(), "kms");
    assert_eq!(c.classify_service("KMS.DisabledException".into(), "key is disabled".into(), 400).kind(), "kms");

    let t = c.classify_service("ThrottlingException".into(), "Rate exceeded".into(), 400);
    assert!(t.is_retryable() && t.kind() == "throttled", "{t}");
    // KMS throttling behind a SecureString: retried, not sent to the IAM console.
    for code in ["ThrottlingException", "KMSThrottlingException", "KMS.ThrottlingException"] {
        let t = c.classify_service(code.into(), "Rate exceeded (Service: AWSKMS; Status Code: 400)".into(), 400);
        assert!(t.is_retryable() && t.kind() == "throttled", "{code}: {t}");
        assert!(!t.to_string().contains("kms:Decrypt"), "{t}");
    }
    let s = c.classify_service("InternalServerError".into(), "oops".into(), 500);
    assert!(s.is_retryable() && s.kind() == "server", "{s}");
    let cred = c.classify_service(
        "UnrecognizedClientException".into(),
        "The security token included in the request is invalid.".into(),
        400,
    );
    assert_eq!(cred.kind(), "credentials");
    assert!(!cred.is_retryable());

    // Denied GetParameters on a Secrets Manager reference: also say which secretsmanager grant.
    let names = vec!["/aws/reference/secretsmanager/myapp/db".to_string(), "shared-token".to_string()];
    let c = Call { action: "ssm:GetParameters", ..call(Scope::Names(&names)) };
    let msg = c.classify_service("AccessDeniedException".into(), "not allowed".into(), 400).to_string();
    assert!(
        msg.contains("arn:aws:ssm:eu-central-1:ACCOUNT_ID:parameter/aws/reference/secretsmanager/myapp/db"),
        "{msg}"
    );
    assert!(msg.contains("arn:aws:ssm:eu-central-1:ACCOUNT_ID:parameter/shared-token"), "{msg}");
    assert!(msg.contains("secretsmanager:GetSecretValue"), "{msg}");
    let sm = c
        .classify_service(
            "AccessDeniedException".into(),
            "User: arn:aws:sts::111122223333:assumed-role/web/i-1 is not authorized to perform: \
             secretsmanager:GetSecretValue on resource: arn:aws:secretsmanager:eu-central-1:111122223333:secret:myapp/db-AbCdEf"
                .into(),
            400,
        )
        .to_string();
    assert!(
        sm.contains("role needs secretsmanager:GetSecretValue on arn:aws:secretsmanager:eu-central-1:111122223333:secret:myapp/db-AbCdEf"),
        "{sm}"
    );
}

// ---------------------------------------------------------------------------------------
// Against moto
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn fetches_nested_paths_every_type_and_references_exactly() {
    let Some(moto) = moto_url() else { return };
    let p = unique_prefix("mapping");
    let shared = unique_prefix("shared");
    let secret_name = format!("{}/dbjson", &unique_prefix("sm")[1..]);

    let special: &[(&str, &str, &str, &str)] = &[
        // (parameter under p, type, value, env name)
        ("/db/password", "SecureString", "pa=ss=word==", "DB_PASSWORD"),
        ("/db/user", "String", "app", "DB_USER"),
        ("/multi/line", "SecureString", "line1\nline2\n", "MULTI_LINE"),
        ("/quotes", "String", r#"he said "hi", it's 'fine' \n not a newline"#, "QUOTES"),
        ("/unicode", "SecureString", "héllo wörld ✓ 日本語 🚀", "UNICODE"),
        ("/list", "StringList", "a,b,c", "LIST"),
        ("/api-key.v2", "SecureString", "k-1", "API_KEY_V2"),
        ("/deep/a/b/c/d", "String", "deep", "DEEP_A_B_C_D"),
        ("/Mixed_Case", "String", "m", "MIXED_CASE"),
    ];
    let mut ops = Vec::new();
    let mut expected: BTreeMap<String, (String, String)> = BTreeMap::new();
    let names: Vec<String> = special.iter().map(|(n, ..)| format!("{p}{n}")).collect();
    for ((_, kind, value, env), name) in special.iter().zip(&names) {
        ops.push(Op::Put { name, kind, value });
        expected.insert(env.to_string(), (value.to_string(), name.clone()));
    }
    // 18 more under three nested services: 27 under the path, three pages of at most 10.
    let more: Vec<(String, String, String)> = (0..18)
        .map(|i| {
            let name = format!("{p}/svc{}/group{}/key{i}", i % 3, i % 2);
            let env = format!("SVC{}_GROUP{}_KEY{i}", i % 3, i % 2);
            (name, format!("value {i} = {}", random_token(8)), env)
        })
        .collect();
    for (name, value, env) in &more {
        ops.push(Op::Put { name, kind: if env.ends_with('0') { "SecureString" } else { "String" }, value });
        expected.insert(env.clone(), (value.clone(), name.clone()));
    }
    assert_eq!(expected.len(), 27);
    let token_param = format!("{shared}/GITHUB_TOKEN");
    ops.push(Op::Put { name: &token_param, kind: "SecureString", value: "ghp_abc=def" });
    let sm_json = r#"{"username":"app","password":"p@ss=word\n\"x\""}"#;
    ops.push(Op::Secret { name: &secret_name, value: sm_json });
    seed(&moto, &ops);

    let reference = format!("/aws/reference/secretsmanager/{secret_name}");
    expected.insert("GITHUB_TOKEN".into(), ("ghp_abc=def".into(), token_param.clone()));
    expected.insert("DBJSON".into(), (sm_json.into(), reference.clone()));

    let proxy = FaultProxy::start(&moto);
    // The path with its trailing slash, as operators write it.
    let path = format!("{p}/");
    let src = source(&proxy.url(), Some(&path), &[&token_param, &reference]).await;
    let set = src.fetch().await.expect("fetch");
    assert_eq!(flatten(&set), expected);
    let by_path = proxy.actions().iter().filter(|a| *a == "GetParametersByPath").count();
    assert_eq!(by_path, 3, "27 parameters in pages of 10: {:?}", proxy.actions());
    assert_eq!(set.entry("DB_PASSWORD").unwrap().version, 1);
    assert_eq!(src.describe(), format!("{path} and 2 parameters"));
}

#[tokio::test]
async fn every_missing_parameter_is_named() {
    let Some(moto) = moto_url() else { return };
    let p = unique_prefix("missing");
    // 12 names: two GetParameters batches, one missing name in each.
    let names: Vec<String> = (0..12).map(|i| format!("{p}/P{i}")).collect();
    let ops: Vec<Op> = names[..11]
        .iter()
        .filter(|n| !n.ends_with("/P3"))
        .map(|name| Op::Put { name, kind: "SecureString", value: "v" })
        .collect();
    seed(&moto, &ops);
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let err = source(&moto, None, &refs).await.fetch().await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(&err, SecretsError::NotFound { names: n, .. } if n.len() == 2), "{msg}");
    assert!(msg.contains(&format!("{p}/P3")) && msg.contains(&format!("{p}/P11")), "{msg}");
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn a_missing_secrets_manager_reference_is_named_alone() {
    let Some(moto) = moto_url() else { return };
    let p = unique_prefix("missing-ref");
    let (a, b) = (format!("{p}/A"), format!("{p}/B"));
    let present = format!("{}/present", &unique_prefix("sm")[1..]);
    seed(
        &moto,
        &[
            Op::Put { name: &a, kind: "SecureString", value: "va" },
            Op::Put { name: &b, kind: "String", value: "vb" },
            Op::Secret { name: &present, value: "vs" },
        ],
    );
    let present_ref = format!("{SECRETS_MANAGER_REFERENCE}{present}");
    let absent_ref = format!("{SECRETS_MANAGER_REFERENCE}{}/absent", &unique_prefix("sm")[1..]);
    // One batch: SSM fails all of it with ParameterNotFound because of the one reference.
    let err = source(&moto, None, &[&a, &absent_ref, &b, &present_ref]).await.fetch().await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(&err, SecretsError::NotFound { names, .. } if names.as_slice() == [absent_ref.as_str()]), "{msg}");
    for existing in [&a, &b, &present_ref] {
        assert!(!msg.contains(existing.as_str()), "{existing} exists but is named: {msg}");
    }
}

/// A stand-in for SSM that answers every GetParametersByPath with one parameter and the
/// NextToken `token(request number)`. In-process rather than moto because moto's
/// pagination is correct: it cannot be made to return a token twice or never finish.
/// Returns the endpoint URL and the request counter.
async fn paging_fake(
    token: impl Fn(usize) -> Option<String> + Send + Sync + 'static,
) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let requests = Arc::new(AtomicUsize::new(0));
    let (counter, token) = (requests.clone(), Arc::new(token));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (counter, token) = (counter.clone(), token.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| {
                    let n = counter.fetch_add(1, Ordering::SeqCst);
                    let mut body = serde_json::json!({
                        "Parameters": [{ "Name": format!("/cycle/P{n}"), "Type": "String", "Value": "v", "Version": 1 }]
                    });
                    if let Some(t) = token(n) {
                        body["NextToken"] = t.into();
                    }
                    let resp = hyper::Response::builder()
                        .header("content-type", "application/x-amz-json-1.1")
                        .body(http_body_util::Full::new(bytes::Bytes::from(body.to_string())))
                        .unwrap();
                    async move { Ok::<_, std::convert::Infallible>(resp) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    (url, requests)
}

#[tokio::test]
async fn a_next_token_cycle_is_an_error_naming_the_path() {
    // A → B → A: not the same token twice in a row, but a loop all the same.
    let (url, requests) = paging_fake(|n| Some(["A", "B"][n % 2].to_string())).await;
    let src = source(&url, Some("/cycle/"), &[]).await;
    let err = tokio::time::timeout(Duration::from_secs(10), src.fetch())
        .await
        .expect("a token cycle must not loop forever")
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("/cycle/") && msg.contains("NextToken"), "{msg}");
    assert_eq!(requests.load(std::sync::atomic::Ordering::SeqCst), 3, "{msg}");
}

#[tokio::test]
async fn a_listing_that_never_ends_stops_at_the_page_cap() {
    let (url, requests) = paging_fake(|n| Some(format!("T{n}"))).await;
    let src = source(&url, Some("/cycle/"), &[]).await;
    let err = tokio::time::timeout(Duration::from_secs(60), src.fetch())
        .await
        .expect("an endless listing must stop")
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("/cycle/") && msg.contains("1000 pages"), "{msg}");
    assert_eq!(requests.load(std::sync::atomic::Ordering::SeqCst), MAX_PAGES as usize);
}

#[tokio::test]
async fn an_empty_path_is_an_error_naming_it() {
    let Some(moto) = moto_url() else { return };
    let p = unique_prefix("empty");
    let err = source(&moto, Some(&p), &[]).await.fetch().await.unwrap_err();
    assert!(matches!(err, SecretsError::EmptyPath { .. }), "{err}");
    assert!(err.to_string().contains(&p), "{err}");
}

#[tokio::test]
async fn colliding_names_are_an_error_naming_both_parameters() {
    let Some(moto) = moto_url() else { return };
    let p = unique_prefix("collide");
    let other = unique_prefix("collide-list");
    let (a, b, c) = (format!("{p}/db/password"), format!("{p}/db-password"), format!("{other}/TOKEN"));
    let d = format!("{p}/token");
    seed(
        &moto,
        &[
            Op::Put { name: &a, kind: "SecureString", value: "first-secret" },
            Op::Put { name: &b, kind: "SecureString", value: "second-secret" },
            Op::Put { name: &c, kind: "String", value: "t1" },
            Op::Put { name: &d, kind: "String", value: "t2" },
        ],
    );
    let err = source(&moto, Some(&p), &[&c]).await.fetch().await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(&err, SecretsError::Collision { collisions } if collisions.len() == 2), "{msg}");
    for want in ["DB_PASSWORD", a.as_str(), b.as_str(), "TOKEN", c.as_str(), d.as_str()] {
        assert!(msg.contains(want), "missing {want}: {msg}");
    }
    assert!(!msg.contains("first-secret") && !msg.contains("t1"), "{msg}");
}

#[tokio::test]
async fn access_denied_says_which_grant_the_instance_profile_needs() {
    let Some(moto) = moto_url() else { return };
    let p = unique_prefix("denied");
    seed(&moto, &[Op::Put { name: &format!("{p}/x"), kind: "String", value: "v" }]);
    let proxy = FaultProxy::start(&moto);
    let arn = format!("arn:aws:ssm:us-east-1:123456789012:parameter{p}");
    proxy.fail_always(Fault::access_denied("ssm:GetParametersByPath", &arn));
    let src = source(&proxy.url(), Some(&format!("{p}/")), &[]).await;
    let start = Instant::now();
    let err = src.fetch_with_retry(&FAST, |_, _| {}).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, SecretsError::AccessDenied { .. }), "{msg}");
    assert!(msg.contains(&format!("ssm:GetParametersByPath on {arn}")), "{msg}");
    assert!(msg.contains(&format!("instance profile role needs ssm:GetParametersByPath on {arn}*")), "{msg}");
    // Not retried: an IAM policy does not fix itself within a backoff.
    assert_eq!(proxy.requests(), 1, "{:?}", proxy.actions());
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_kms_decrypt_failure_is_its_own_error() {
    let Some(moto) = moto_url() else { return };
    let p = unique_prefix("kms");
    let name = format!("{p}/TOKEN");
    seed(&moto, &[Op::Put { name: &name, kind: "SecureString", value: "v" }]);
    let proxy = FaultProxy::start(&moto);
    proxy.fail_always(
        Fault::new(
            400,
            "AccessDeniedException",
            "The ciphertext refers to a customer master key that does not exist, does not exist in this \
             region, or you are not allowed to access. (Service: AWSKMS; Status Code: 400; Error Code: AccessDeniedException)",
        )
        .for_action("GetParameters"),
    );
    let err = source(&proxy.url(), None, &[&name]).await.fetch().await.unwrap_err();
    assert!(matches!(err, SecretsError::Kms { .. }), "{err}");
    assert!(err.to_string().contains("kms:Decrypt") && err.to_string().contains(&name), "{err}");
}

#[tokio::test]
async fn an_unreachable_endpoint_is_a_network_error_mentioning_vpc_endpoints() {
    // A closed port on loopback: connection refused, the quick form of "no route to SSM".
    let port = berth_tests::free_port();
    let src = source(&format!("http://127.0.0.1:{port}"), Some("/x/"), &[]).await;
    let start = Instant::now();
    let err = src.fetch().await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, SecretsError::Network { .. }), "{msg}");
    assert!(err.is_retryable());
    assert!(msg.contains("VPC interface endpoints") && msg.contains("NAT gateway"), "{msg}");
    assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
    assert!(start.elapsed() < Duration::from_secs(10), "{:?}", start.elapsed());
}

#[tokio::test]
async fn throttled_calls_are_retried_until_the_fetch_succeeds() {
    let Some(moto) = moto_url() else { return };
    let p = unique_prefix("throttle");
    let names: Vec<String> = (0..3).map(|i| format!("{p}/K{i}")).collect();
    let ops: Vec<Op> = names.iter().map(|name| Op::Put { name, kind: "String", value: "v" }).collect();
    seed(&moto, &ops);
    let proxy = FaultProxy::start(&moto);
    // More throttles than the SDK's own attempts: berth's backoff around the whole fetch
    // has to carry it over.
    proxy.fail_next(6, Fault::throttling());
    let src = source(&proxy.url(), Some(&p), &[]).await;
    let mut retries = Vec::new();
    let set =
        src.fetch_with_retry(&FAST, |e, wait| retries.push((e.kind(), wait))).await.expect("fetch after throttling");
    assert_eq!(set.len(), 3);
    assert_eq!(proxy.faults(), 6);
    assert!(!retries.is_empty() && retries.iter().all(|(k, _)| *k == "throttled"), "{retries:?}");

    // 5xx too.
    proxy.fail_next(5, Fault::internal());
    let set = src.fetch_with_retry(&FAST, |_, _| {}).await.expect("fetch after 500s");
    assert_eq!(set.len(), 3);
}

#[tokio::test]
async fn kms_throttling_is_retried_until_the_fetch_succeeds() {
    let Some(moto) = moto_url() else { return };
    let p = unique_prefix("kms-throttle");
    let name = format!("{p}/TOKEN");
    seed(&moto, &[Op::Put { name: &name, kind: "SecureString", value: "v" }]);
    let proxy = FaultProxy::start(&moto);
    // What SSM relays when KMS rate-limits decryption during a fleet boot.
    proxy.fail_next(
        6,
        Fault::new(
            400,
            "ThrottlingException",
            "Rate exceeded (Service: AWSKMS; Status Code: 400; Error Code: ThrottlingException)",
        ),
    );
    let src = source(&proxy.url(), None, &[&name]).await;
    let mut retries = Vec::new();
    let set = src.fetch_with_retry(&FAST, |e, _| retries.push(e.kind())).await.expect("fetch after KMS throttling");
    assert_eq!(set.get("TOKEN").map(Secret::expose), Some("v"));
    assert_eq!(proxy.faults(), 6);
    assert!(!retries.is_empty() && retries.iter().all(|k| *k == "throttled"), "{retries:?}");
}

#[tokio::test]
async fn failing_forever_keeps_the_last_good_set_and_reports_it() {
    let Some(moto) = moto_url() else { return };
    let p = unique_prefix("forever");
    let name = format!("{p}/KEY");
    seed(&moto, &[Op::Put { name: &name, kind: "SecureString", value: "good" }]);
    let proxy = FaultProxy::start(&moto);
    let src = source(&proxy.url(), Some(&p), &[]).await;
    let initial = src.fetch().await.unwrap();
    let timing = RefreshTiming {
        interval: Duration::from_millis(300),
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(300),
        reload_jitter: Duration::ZERO,
    };
    let handle = spawn_refresh_with(src, timing, initial);
    let mut changes = handle.subscribe();
    proxy.fail_always(Fault::throttling());
    let mut status = handle.subscribe_status();
    let st = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            status.changed().await.unwrap();
            let s = status.borrow_and_update().clone();
            if s.refresh_error >= 3 {
                return s;
            }
        }
    })
    .await
    .expect("three failed refreshes");
    assert_eq!(st.last_error_kind, Some("throttled"));
    assert!(st.last_error.as_deref().unwrap().contains("throttled"), "{st:?}");
    assert!(st.consecutive_failures >= 3);
    assert_eq!(handle.current().get("KEY").unwrap().expose(), "good");
    assert!(!changes.has_changed().unwrap(), "a failed refresh must not publish a set");

    // And it recovers by itself once SSM answers again.
    proxy.forward();
    let st = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            status.changed().await.unwrap();
            let s = status.borrow_and_update().clone();
            if s.last_error.is_none() {
                return s;
            }
        }
    })
    .await
    .expect("recovery");
    assert_eq!(st.consecutive_failures, 0);
    assert!(st.refresh_ok >= 2);
    assert!(!changes.has_changed().unwrap(), "same values after recovery: no change event");
    let _ = changes.borrow_and_update();
}

#[tokio::test]
async fn a_changed_value_is_seen_within_one_interval_and_an_unchanged_set_is_silent() {
    let Some(moto) = moto_url() else { return };
    let p = unique_prefix("refresh");
    let (a, b) = (format!("{p}/A"), format!("{p}/B"));
    seed(
        &moto,
        &[Op::Put { name: &a, kind: "SecureString", value: "a1" }, Op::Put { name: &b, kind: "String", value: "b1" }],
    );
    let src = source(&moto, Some(&p), &[]).await;
    let initial = src.fetch().await.unwrap();
    let interval = Duration::from_secs(1);
    let handle = spawn_refresh(src, interval, initial);
    let mut rx = handle.subscribe();

    // Unchanged: several refreshes, no event.
    let mut status = handle.subscribe_status();
    tokio::time::timeout(Duration::from_secs(10), async {
        while status.borrow_and_update().refresh_ok < 3 {
            status.changed().await.unwrap();
        }
    })
    .await
    .expect("refreshes run");
    assert!(!rx.has_changed().unwrap(), "an unchanged set must not emit a change");
    assert_eq!(handle.status().changes, 0);

    // Changed: seen within one interval (plus the fetch itself).
    let before = rx.borrow_and_update().clone();
    seed(&moto, &[Op::Put { name: &a, kind: "SecureString", value: "a2" }]);
    let seeded = Instant::now();
    tokio::time::timeout(interval + Duration::from_millis(1500), rx.changed())
        .await
        .expect("change seen within one refresh interval")
        .unwrap();
    let took = seeded.elapsed();
    let after = rx.borrow_and_update().clone();
    assert_eq!(after.get("A").unwrap().expose(), "a2");
    assert_eq!(before.diff(&after).changed, ["A"]);
    assert!(took < interval + Duration::from_millis(1500), "{took:?}");

    // Added and removed parameters are changes too.
    let c = format!("{p}/C");
    seed(&moto, &[Op::Put { name: &c, kind: "String", value: "c1" }, Op::Delete { name: &b }]);
    tokio::time::timeout(interval * 3, rx.changed()).await.expect("add/remove seen").unwrap();
    let diff = after.diff(&rx.borrow_and_update());
    assert_eq!((diff.added, diff.removed), (vec!["C".to_string()], vec!["B".to_string()]));
    assert_eq!(handle.status().changes, 2);
}

#[test]
fn zero_interval_fetches_once_and_never_refreshes() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let src = source("http://127.0.0.1:1", Some("/x/"), &[]).await;
        let handle = spawn_refresh(src, Duration::ZERO, set_of(&[("A", "1")]));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let st = handle.status();
        assert_eq!((st.refresh_ok, st.refresh_error, st.next_refresh), (1, 0, None));
        assert_eq!(handle.current().len(), 1);
    });
}

#[tokio::test]
async fn a_panicking_task_is_reported_and_restarted() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let runs = Arc::new(AtomicUsize::new(0));
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let mut done_tx = Some(done_tx);
    let mut reported = Vec::new();
    let run = {
        let runs = runs.clone();
        move || {
            let n = runs.fetch_add(1, Ordering::SeqCst);
            let done = if n == 0 { None } else { done_tx.take() };
            async move {
                if n == 0 {
                    panic!("refresh broke");
                }
                if let Some(d) = done {
                    let _ = d.send(());
                }
            }
        }
    };
    let backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(10));
    tokio::time::timeout(
        Duration::from_secs(5),
        supervise("test", run, |msg, wait| reported.push((msg, wait)), backoff),
    )
    .await
    .expect("the restarted task ran to its end");
    done_rx.await.expect("second run finished");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert_eq!(reported.len(), 1, "{reported:?}");
    assert_eq!(reported[0].0, "refresh broke");
    assert!(reported[0].1 <= Duration::from_millis(10));
}

/// Everything any crate logs during a fetch and a refresh that sees a change, at TRACE with
/// no filter at all (so not relying on berth's log filter): no secret value may appear.
///
/// The logging runs in a child process (this test binary, running only
/// [`trace_child`]) with a global subscriber: a thread-local one in a test binary full of
/// parallel tests misses events, because tracing caches per-callsite interest globally.
#[test]
fn trace_logs_of_fetch_and_refresh_never_contain_values() {
    let Some(moto) = moto_url() else { return };
    let p = unique_prefix("trace");
    let secret_name = format!("{}/sm", &unique_prefix("trace-sm")[1..]);
    let values: Vec<String> = (0..5).map(|_| format!("zz{}", random_token(24))).collect();
    let (a, b, c) = (format!("{p}/db/password"), format!("{p}/api"), format!("{p}/list"));
    let list = format!("{},second", values[2]);
    seed(
        &moto,
        &[
            Op::Put { name: &a, kind: "SecureString", value: &values[0] },
            Op::Put { name: &b, kind: "String", value: &values[1] },
            Op::Put { name: &c, kind: "StringList", value: &list },
            Op::Secret { name: &secret_name, value: &values[3] },
        ],
    );
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["secrets::tests::trace_child", "--exact", "--nocapture", "--test-threads=1"])
        .env("BERTH_TRACE_CHILD", "1")
        .env("BERTH_TRACE_PATH", &p)
        .env("BERTH_TRACE_PARAM", &a)
        .env("BERTH_TRACE_REF", format!("/aws/reference/secretsmanager/{secret_name}"))
        // The new value reaches the child through its environment, which is not output.
        .env("BERTH_TRACE_NEW", &values[4])
        .env_remove("LOG_SENSITIVE_BODIES")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let logs = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "child failed: {logs}");
    // The capture really holds the SDK's wire-level TRACE events and berth's own.
    assert!(logs.contains("read HTTP response body"), "no SDK trace captured: {logs}");
    assert!(logs.contains("GetParametersByPath page") && logs.contains("secrets changed"), "{logs}");
    assert!(logs.contains(&a), "parameter names are logged");
    for v in &values {
        assert!(!logs.contains(v.as_str()), "secret value {v} leaked into TRACE logs");
    }
}

/// The child half of the test above; does nothing unless started by it.
#[test]
fn trace_child() {
    if std::env::var_os("BERTH_TRACE_CHILD").is_none() {
        return;
    }
    let var = |k: &str| std::env::var(k).unwrap();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let moto = moto_url().unwrap();
        let src = source(&moto, Some(&var("BERTH_TRACE_PATH")), &[&var("BERTH_TRACE_REF")]).await;
        let initial = src.fetch_with_retry(&FAST, |_, _| {}).await.unwrap();
        assert_eq!(initial.len(), 4);
        let handle = spawn_refresh(src, Duration::from_millis(200), initial);
        let mut rx = handle.subscribe();
        let (param, new) = (var("BERTH_TRACE_PARAM"), var("BERTH_TRACE_NEW"));
        tokio::task::spawn_blocking(move || {
            seed(&moto, &[Op::Put { name: &param, kind: "SecureString", value: &new }])
        })
        .await
        .unwrap();
        if tokio::time::timeout(Duration::from_secs(15), rx.changed()).await.is_err() {
            panic!("no change seen; status: {:?}", handle.status());
        }
    });
}
