//! `registry_auth = "ecr"`: Docker credentials from ECR's GetAuthorizationToken.
//!
//! The token is `base64("AWS:" + password)` and valid for 12 hours. berth keeps it in memory
//! (never on disk, never in a log) per registry and region until 30 minutes before it expires,
//! so a fleet pulling on every rollout does not call ECR every time, and a token is never
//! used so close to its end that a long pull outlives it. A pull that the registry refuses
//! anyway (a revoked session, a clock that is off) drops the cached token: see
//! [`EcrAuth::invalidate`].

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use aws_config::{Region, SdkConfig};
use aws_sdk_ecr::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use base64::Engine;
use bollard::auth::DockerCredentials;
use tokio::sync::OnceCell;

use crate::config::AwsConfig;
use crate::secrets::Secret;

/// How long before `expiresAt` a cached token is dropped and a new one fetched.
pub const REFRESH_BEFORE_EXPIRY: Duration = Duration::from_secs(30 * 60);

/// Why berth could not get an ECR token, worded for the operator who has to fix it. No
/// variant ever holds the token.
#[derive(Debug, thiserror::Error)]
pub enum EcrError {
    #[error(
        "access denied calling ecr:GetAuthorizationToken in {region} ({message}). The instance \
         profile role needs the IAM action ecr:GetAuthorizationToken on resource \"*\" (plus \
         ecr:BatchGetImage and ecr:GetDownloadUrlForLayer on the repository; see docs/iam.md)"
    )]
    AccessDenied { region: String, message: String },
    #[error(
        "cannot reach the ECR API at {endpoint} ({detail}). An instance without internet access \
         needs the VPC interface endpoints com.amazonaws.{region}.ecr.api and \
         com.amazonaws.{region}.ecr.dkr and the S3 gateway endpoint (image layers), or a route \
         through a NAT gateway"
    )]
    Network { endpoint: String, region: String, detail: String },
    #[error(
        "no usable AWS credentials for ECR ({detail}): attach an instance profile (an IAM role) \
         to the instance and keep IMDSv2 reachable, or set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
    )]
    Credentials { detail: String },
    #[error("no AWS region for ECR: set [aws] region, or use an image on <account>.dkr.ecr.<region>.amazonaws.com")]
    NoRegion,
    /// The detail is fixed text about the token's shape, never any part of the token.
    #[error("ECR GetAuthorizationToken in {region} returned an unusable token: {detail}")]
    BadToken { region: String, detail: &'static str },
    #[error("ECR GetAuthorizationToken in {region} failed: {detail}")]
    Other { region: String, detail: String },
}

/// The part of `[aws]` ECR needs, the SDK config loaded on first use (berth loads none when
/// no feature at start needed AWS, and a reload may add an ECR app later), and the tokens.
pub struct EcrAuth {
    aws: AwsConfig,
    sdk: OnceCell<SdkConfig>,
    cache: Mutex<TokenCache>,
}

impl EcrAuth {
    pub fn new(aws: AwsConfig, sdk: Option<SdkConfig>) -> Self {
        EcrAuth { aws, sdk: OnceCell::new_with(sdk), cache: Mutex::new(TokenCache::default()) }
    }

    /// Docker credentials for `registry` (the image reference's host), from the cache while
    /// the cached token has more than [`REFRESH_BEFORE_EXPIRY`] left, else from ECR.
    pub async fn credentials(&self, registry: &str) -> Result<DockerCredentials, EcrError> {
        let sdk = self.sdk.get_or_init(|| crate::aws::sdk_config(&self.aws)).await;
        let region = match ecr_host(registry) {
            Some(host) => host.region.to_string(),
            None => sdk.region().map(|r| r.to_string()).ok_or(EcrError::NoRegion)?,
        };
        let key = (region.clone(), registry.to_string());
        if let Some(c) = self.cache.lock().unwrap().get(&key, SystemTime::now()) {
            tracing::debug!(registry, region, "using the cached ECR token");
            return Ok(c);
        }
        let token = fetch(sdk, &region).await?;
        let now = SystemTime::now();
        let expires = token.expires_at;
        let creds = token.credentials(registry);
        let cached = self.cache.lock().unwrap().put(key, token, now);
        tracing::info!(
            registry,
            region,
            expires_in_s = expires.and_then(|e| e.duration_since(now).ok()).map(|d| d.as_secs()),
            cached,
            "fetched an ECR authorization token"
        );
        Ok(creds)
    }

    /// Drops the cached tokens for `registry`: the registry refused one, so the next
    /// [`credentials`](Self::credentials) asks ECR again.
    pub fn invalidate(&self, registry: &str) {
        self.cache.lock().unwrap().remove_registry(registry);
    }
}

/// One decoded token. The password is a redacting [`Secret`].
#[derive(Clone)]
struct Token {
    username: String,
    password: Secret,
    expires_at: Option<SystemTime>,
}

impl Token {
    /// `authorizationToken` is `base64("AWS:" + password)`.
    fn decode(b64: &str, expires_at: Option<SystemTime>) -> Result<Token, &'static str> {
        let raw = base64::engine::general_purpose::STANDARD.decode(b64.trim()).map_err(|_| "not base64")?;
        let text = String::from_utf8(raw).map_err(|_| "not UTF-8")?;
        let (user, password) = text.split_once(':').ok_or("no user:password pair")?;
        if user.is_empty() || password.is_empty() {
            return Err("empty user or password");
        }
        let token = Token { username: user.to_string(), password: Secret::new(password.to_string()), expires_at };
        // `text` held the password too: wipe it rather than leave it in freed memory.
        zeroize::Zeroize::zeroize(&mut { text });
        Ok(token)
    }

    fn credentials(&self, registry: &str) -> DockerCredentials {
        DockerCredentials {
            username: Some(self.username.clone()),
            password: Some(self.password.expose().to_string()),
            serveraddress: Some(registry.to_string()),
            ..Default::default()
        }
    }
}

/// Tokens by (region, registry host).
#[derive(Default)]
struct TokenCache {
    entries: HashMap<(String, String), (Token, SystemTime)>,
}

impl TokenCache {
    fn get(&self, key: &(String, String), now: SystemTime) -> Option<DockerCredentials> {
        let (token, refresh_at) = self.entries.get(key)?;
        (now < *refresh_at).then(|| token.credentials(&key.1))
    }

    /// Keeps `token` until [`REFRESH_BEFORE_EXPIRY`] before it expires. A token without an
    /// expiry, or with less than that left (a skewed clock, or a stand-in like moto, which
    /// says 2015), is used once and not kept. Returns whether it was kept.
    fn put(&mut self, key: (String, String), token: Token, now: SystemTime) -> bool {
        let refresh_at = token.expires_at.and_then(|e| e.checked_sub(REFRESH_BEFORE_EXPIRY));
        match refresh_at {
            Some(at) if at > now => {
                self.entries.insert(key, (token, at));
                true
            }
            _ => {
                self.entries.remove(&key);
                false
            }
        }
    }

    fn remove_registry(&mut self, registry: &str) {
        self.entries.retain(|(_, r), _| r != registry);
    }
}

/// An ECR registry host: `<account>.dkr.ecr[-fips].<region>.amazonaws.com[.cn]`, or the
/// dual-stack `<account>.dkr-ecr.<region>.on.aws`.
#[derive(Debug, PartialEq, Eq)]
struct EcrHost<'a> {
    account: &'a str,
    region: &'a str,
}

fn ecr_host(host: &str) -> Option<EcrHost<'_>> {
    let host = host.split(':').next()?;
    let labels: Vec<&str> = host.split('.').collect();
    let account = *labels.first()?;
    if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let region = match labels.as_slice() {
        [_, "dkr", ecr, region, "amazonaws", "com", rest @ ..]
            if (*ecr == "ecr" || *ecr == "ecr-fips") && (rest.is_empty() || rest == ["cn"]) =>
        {
            region
        }
        [_, "dkr-ecr", region, "on", "aws"] => region,
        _ => return None,
    };
    Some(EcrHost { account, region })
}

/// The ECR API endpoint calls go to, for messages.
fn endpoint(sdk: &SdkConfig, region: &str) -> String {
    match sdk.endpoint_url() {
        Some(url) => url.to_string(),
        None => format!("https://api.ecr.{region}.amazonaws.com"),
    }
}

/// One GetAuthorizationToken call in `region` (the image's region, which may differ from
/// `[aws] region`), through `endpoint_url` / `AWS_ENDPOINT_URL` when one is configured.
async fn fetch(sdk: &SdkConfig, region: &str) -> Result<Token, EcrError> {
    let conf = aws_sdk_ecr::config::Builder::from(sdk).region(Region::new(region.to_string())).build();
    let client = aws_sdk_ecr::Client::from_conf(conf);
    let out = client.get_authorization_token().send().await.map_err(|e| classify(e, sdk, region))?;
    let data = out
        .authorization_data()
        .first()
        .ok_or(EcrError::BadToken { region: region.to_string(), detail: "no authorizationData" })?;
    let b64 = data
        .authorization_token()
        .ok_or(EcrError::BadToken { region: region.to_string(), detail: "no authorizationToken" })?;
    let expires_at = data.expires_at().and_then(|t| SystemTime::try_from(*t).ok());
    Token::decode(b64, expires_at).map_err(|detail| EcrError::BadToken { region: region.to_string(), detail })
}

fn classify<E>(err: SdkError<E>, sdk: &SdkConfig, region: &str) -> EcrError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let region_s = region.to_string();
    let detail = DisplayErrorContext(&err).to_string();
    match &err {
        SdkError::ServiceError(se) => {
            let code = se.err().code().unwrap_or("");
            let message = se.err().message().unwrap_or("").to_string();
            match code {
                "AccessDeniedException" | "AccessDenied" | "UnauthorizedOperation" => {
                    EcrError::AccessDenied { region: region_s, message: format!("{code}: {message}") }
                }
                "UnrecognizedClientException"
                | "InvalidSignatureException"
                | "ExpiredTokenException"
                | "InvalidClientTokenId"
                | "SignatureDoesNotMatch" => EcrError::Credentials { detail: format!("{code}: {message}") },
                _ => EcrError::Other {
                    region: region_s,
                    detail: format!("HTTP {} {code}: {message}", se.raw().status().as_u16()),
                },
            }
        }
        SdkError::TimeoutError(_) => EcrError::Network {
            endpoint: endpoint(sdk, region),
            region: region_s,
            detail: format!("timed out: {detail}"),
        },
        SdkError::DispatchFailure(d) if d.is_io() || d.is_timeout() => {
            EcrError::Network { endpoint: endpoint(sdk, region), region: region_s, detail }
        }
        _ if detail.to_ascii_lowercase().contains("credentials") => EcrError::Credentials { detail },
        _ => EcrError::Other { region: region_s, detail },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(expires_in: Option<Duration>, now: SystemTime) -> Token {
        let b64 = base64::engine::general_purpose::STANDARD.encode("AWS:pa:ss");
        Token::decode(&b64, expires_in.map(|d| now + d)).unwrap()
    }

    #[test]
    fn decodes_aws_user_and_password_with_colons() {
        let t = token(None, SystemTime::now());
        assert_eq!(t.username, "AWS");
        assert_eq!(t.password.expose(), "pa:ss");
        assert_eq!(format!("{:?}", t.password), "<redacted>");
        assert!(Token::decode("%%%", None).is_err());
        let no_colon = base64::engine::general_purpose::STANDARD.encode("AWS");
        assert_eq!(Token::decode(&no_colon, None).err(), Some("no user:password pair"));
    }

    #[test]
    fn cached_until_thirty_minutes_before_expiry_per_registry_and_region() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut cache = TokenCache::default();
        let key = ("eu-west-1".to_string(), "1.dkr.ecr.eu-west-1.amazonaws.com".to_string());
        assert!(cache.put(key.clone(), token(Some(Duration::from_secs(12 * 3600)), now), now));
        let hit = cache.get(&key, now + Duration::from_secs(11 * 3600)).unwrap();
        assert_eq!(hit.username.as_deref(), Some("AWS"));
        assert_eq!(hit.serveraddress.as_deref(), Some(key.1.as_str()));
        // 29 minutes before expiry: fetch again.
        assert!(cache.get(&key, now + Duration::from_secs(12 * 3600 - 29 * 60)).is_none());
        // Another region of the same host name is another entry.
        assert!(cache.get(&("us-east-1".into(), key.1.clone()), now).is_none());
        cache.remove_registry(&key.1);
        assert!(cache.get(&key, now).is_none());
    }

    #[test]
    fn tokens_too_close_to_expiry_or_without_one_are_not_kept() {
        let now = SystemTime::now();
        let mut cache = TokenCache::default();
        let key = ("r".to_string(), "h".to_string());
        assert!(!cache.put(key.clone(), token(Some(Duration::from_secs(20 * 60)), now), now));
        assert!(!cache.put(key.clone(), token(None, now), now));
        // moto's token "expires" in 2015.
        let past = Token::decode(
            &base64::engine::general_purpose::STANDARD.encode("AWS:x"),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_420_070_400)),
        )
        .unwrap();
        assert!(!cache.put(key.clone(), past, now));
        assert!(cache.get(&key, now).is_none());
    }

    #[test]
    fn ecr_hosts_give_account_and_region() {
        assert_eq!(
            ecr_host("123456789012.dkr.ecr.eu-west-1.amazonaws.com"),
            Some(EcrHost { account: "123456789012", region: "eu-west-1" })
        );
        assert_eq!(
            ecr_host("123456789012.dkr.ecr-fips.us-gov-west-1.amazonaws.com").map(|h| h.region),
            Some("us-gov-west-1")
        );
        assert_eq!(ecr_host("123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn").map(|h| h.region), Some("cn-north-1"));
        assert_eq!(ecr_host("123456789012.dkr-ecr.ap-south-1.on.aws").map(|h| h.region), Some("ap-south-1"));
        assert_eq!(ecr_host("127.0.0.1:5000"), None);
        assert_eq!(ecr_host("registry.example.com"), None);
        assert_eq!(ecr_host("12345.dkr.ecr.eu-west-1.amazonaws.com"), None);
    }

    /// berth's real SDK configuration pointed at `endpoint`, with static dummy keys (the
    /// default chain would end at IMDS, which no test may call).
    async fn sdk(endpoint: &str) -> SdkConfig {
        crate::aws::sdk_config(&AwsConfig {
            region: Some(berth_tests::moto::REGION.into()),
            endpoint_url: Some(endpoint.into()),
        })
        .await
        .into_builder()
        .credentials_provider(crate::aws::test_credentials())
        .build()
    }

    #[tokio::test]
    async fn moto_answers_get_authorization_token() {
        let Some(moto) = berth_tests::moto::moto_url() else { return };
        let auth = EcrAuth::new(AwsConfig::default(), Some(sdk(&moto).await));
        let c = auth.credentials("127.0.0.1:5000").await.unwrap();
        assert_eq!(c.username.as_deref(), Some("AWS"));
        // moto's fixed token: `AWS:<account>-auth-token`.
        assert!(c.password.as_deref().is_some_and(|p| p.ends_with("-auth-token")), "{:?}", c.username);
        assert_eq!(c.serveraddress.as_deref(), Some("127.0.0.1:5000"));
    }

    #[tokio::test]
    async fn access_denied_names_the_missing_iam_action() {
        use berth_tests::faultproxy::{Fault, FaultProxy};
        let Some(moto) = berth_tests::moto::moto_url() else { return };
        let proxy = FaultProxy::start(&moto);
        proxy.fail_always(Fault::access_denied("ecr:GetAuthorizationToken", "*"));
        let auth = EcrAuth::new(AwsConfig::default(), Some(sdk(&proxy.url()).await));
        let err = auth.credentials("127.0.0.1:5000").await.unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, EcrError::AccessDenied { .. }), "{msg}");
        assert!(msg.contains("needs the IAM action ecr:GetAuthorizationToken"), "{msg}");
    }

    #[tokio::test]
    async fn unreachable_endpoint_is_a_network_error_naming_it() {
        use aws_config::retry::RetryConfig;
        use aws_config::BehaviorVersion;
        // Static keys (no env, which parallel tests share) and a closed port on loopback:
        // the call must fail on the network, at once, not for want of credentials.
        let sdk = SdkConfig::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("eu-west-3"))
            .endpoint_url("http://127.0.0.1:1")
            .retry_config(RetryConfig::disabled())
            .credentials_provider(crate::aws::test_credentials())
            .build();
        let auth = EcrAuth::new(AwsConfig::default(), Some(sdk));
        let err = auth.credentials("127.0.0.1:5000").await.unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, EcrError::Network { .. }), "{msg}");
        assert!(msg.contains("http://127.0.0.1:1"), "{msg}");
        assert!(msg.contains("com.amazonaws.eu-west-3.ecr.api"), "{msg}");
    }
}
