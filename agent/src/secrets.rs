//! The app's secrets from SSM Parameter Store (and Secrets Manager through SSM references),
//! held in memory only and refreshed.
//!
//! The user-data script wrote `aws ssm get-parameter` output to an env file and never looked
//! again. Here a value lives in a [`Secret`] (redacted when printed, zeroized when dropped)
//! inside a [`SecretSet`]; the daemon fetches one at boot ([`SecretsSource::fetch_with_retry`])
//! and [`spawn_refresh`] keeps it current, publishing a new set only when something changed.
//!
//! Nothing here puts a value in a log line, an error, a status field or a panic: events carry
//! parameter *names*, counts and timings. The SDK's own TRACE events of response bodies are
//! redacted by the SDK for these operations (they are marked sensitive), unless
//! `LOG_SENSITIVE_BODIES=true` is set; berth's log filter (`logging::init`) holds the SDK's
//! wire-level crates at info and drops that variable, so they stay out of berth's logs.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use aws_config::SdkConfig;
use aws_sdk_ssm::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use rand::Rng;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use zeroize::Zeroize;

use crate::aws;
use crate::backoff::Backoff;
use crate::config::{env_name_for_parameter, env_name_under_path, Config, SecretSelection, SecretsConfig};

/// GetParameters takes at most 10 names per call.
const GET_PARAMETERS_BATCH: usize = 10;
/// GetParametersByPath pages followed before giving up: 10,000 parameters at SSM's 10 a
/// page, far more than an app's environment, and a bound on a listing that never ends.
const MAX_PAGES: u32 = 1_000;
/// The prefix SSM uses for Secrets Manager references.
const SECRETS_MANAGER_REFERENCE: &str = "/aws/reference/secretsmanager/";

// ---------------------------------------------------------------------------------------
// Values
// ---------------------------------------------------------------------------------------

/// One secret value. It cannot be printed (`Debug` and `Display` say `<redacted>`), is not
/// serializable, and its memory is overwritten when it is dropped; [`Secret::expose`] is the
/// one way to read it, so every use is a visible decision in the code. It deserializes, for
/// a secret written into the config file itself (`tls.acme.eab_hmac_key`).
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Secret(value)
    }

    /// The value, for handing to the container. Never log or format it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A fetched secret and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretEntry {
    pub value: Secret,
    /// The SSM parameter name it was read from, e.g. `/myapp/prod/db/password`.
    pub parameter: String,
    /// SSM's version number of that parameter.
    pub version: i64,
}

/// Every secret berth fetched, by environment variable name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecretSet {
    entries: BTreeMap<String, SecretEntry>,
}

/// What differs between two sets, by environment variable name (never values).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

impl Changes {
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

impl SecretSet {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn get(&self, name: &str) -> Option<&Secret> {
        self.entries.get(name).map(|e| &e.value)
    }

    #[cfg(test)]
    pub fn entry(&self, name: &str) -> Option<&SecretEntry> {
        self.entries.get(name)
    }

    /// Environment variable names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// `(name, entry)` pairs, sorted by name.
    #[cfg(test)]
    pub fn iter(&self) -> impl Iterator<Item = (&str, &SecretEntry)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The secrets an app asked for (`secrets = "all"` or a list of names); on a name that
    /// was not fetched, every such name, so the operator fixes them in one go.
    pub fn select(&self, selection: &SecretSelection) -> Result<Vec<(&str, &Secret)>, Vec<String>> {
        match selection {
            SecretSelection::All => Ok(self.entries.iter().map(|(k, e)| (k.as_str(), &e.value)).collect()),
            SecretSelection::Only(names) => {
                let missing: Vec<String> = names.iter().filter(|n| !self.entries.contains_key(*n)).cloned().collect();
                if !missing.is_empty() {
                    return Err(missing);
                }
                Ok(names
                    .iter()
                    .filter_map(|n| self.entries.get_key_value(n))
                    .map(|(k, e)| (k.as_str(), &e.value))
                    .collect())
            }
        }
    }

    /// Hex SHA-256 over the sorted (name, value) pairs: equal exactly when the environment
    /// the app would see is equal. Versions are left out on purpose: re-putting the same
    /// value bumps the version but must not redeploy the fleet.
    ///
    /// It never leaves the process: unkeyed, it would let anyone who saw it test guesses
    /// of short values offline. The container's `berth.config-hash` label, which anyone
    /// with Docker access can read, uses the supervisor's own hash of the selected values,
    /// keyed with a per-instance key from `state_dir` (`state::hash_key`).
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"berth-secrets-v1\0");
        for (name, entry) in &self.entries {
            // Length prefixes keep ("A", "B=C") and ("A=B", "C") apart.
            h.update((name.len() as u64).to_be_bytes());
            h.update(name.as_bytes());
            h.update((entry.value.0.len() as u64).to_be_bytes());
            h.update(entry.value.0.as_bytes());
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// What `other` (the newer set) changed relative to `self`.
    pub fn diff(&self, other: &SecretSet) -> Changes {
        let mut c = Changes::default();
        for (name, entry) in &other.entries {
            match self.entries.get(name) {
                None => c.added.push(name.clone()),
                Some(old) if old.value != entry.value => c.changed.push(name.clone()),
                Some(_) => {}
            }
        }
        c.removed = self.entries.keys().filter(|k| !other.entries.contains_key(*k)).cloned().collect();
        c
    }
}

/// Collects mapped parameters, noticing names two parameters map to.
#[derive(Default)]
struct SetBuilder {
    entries: BTreeMap<String, SecretEntry>,
    collisions: Vec<Collision>,
}

impl SetBuilder {
    fn add(&mut self, env_name: String, parameter: String, value: Secret, version: i64) {
        match self.entries.get(&env_name) {
            // Listed in `parameters` and also under `path`: one parameter, no conflict.
            Some(existing) if existing.parameter == parameter => {}
            Some(existing) => {
                self.collisions.push(Collision { name: env_name, first: existing.parameter.clone(), second: parameter })
            }
            None => {
                tracing::trace!(parameter = %parameter, env = %env_name, version, "mapped parameter");
                self.entries.insert(env_name, SecretEntry { value, parameter, version });
            }
        }
    }

    fn finish(self) -> Result<SecretSet, SecretsError> {
        if self.collisions.is_empty() {
            Ok(SecretSet { entries: self.entries })
        } else {
            Err(SecretsError::Collision { collisions: self.collisions })
        }
    }
}

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

/// Two parameters that map to the same environment variable name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Collision {
    pub name: String,
    pub first: String,
    pub second: String,
}

/// Why a fetch failed, worded for the operator who has to fix it. No variant ever holds a
/// value: AWS error messages name parameters and ARNs, never their contents.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error(
        "access denied: {action} on {resource} ({message}). The instance profile role needs \
         {needed}"
    )]
    AccessDenied { action: String, resource: String, needed: String, message: String },
    #[error(
        "SSM parameter{} not found: {} (check the names in [secrets] parameters and the region \
         {region}; a Secrets Manager reference {SECRETS_MANAGER_REFERENCE}NAME needs the secret NAME to exist)",
        if names.len() == 1 { "" } else { "s" },
        names.join(", ")
    )]
    NotFound { names: Vec<String>, region: String },
    #[error(
        "no SSM parameters under {path} in {region} (check [secrets] path and the region; \
         the instance profile role also needs ssm:GetParametersByPath on it)"
    )]
    EmptyPath { path: String, region: String },
    #[error(
        "SSM could not decrypt a SecureString in {scope} ({message}). If it is encrypted with a \
         customer managed KMS key, the instance profile role needs kms:Decrypt on that key and \
         the key must be enabled (the AWS managed key aws/ssm needs no grant)"
    )]
    Kms { scope: String, message: String },
    #[error(
        "SSM throttled {action} ({message}); berth retries with backoff. If many instances \
         fetch at once, raise [secrets] refresh_interval or enable Parameter Store's higher \
         throughput setting"
    )]
    Throttled { action: String, message: String },
    #[error(
        "cannot reach SSM at {endpoint} ({detail}). An instance without internet access needs \
         VPC interface endpoints for ssm and kms (com.amazonaws.REGION.ssm, com.amazonaws.REGION.kms) \
         or a route through a NAT gateway, and its security group must allow HTTPS out"
    )]
    Network { endpoint: String, detail: String },
    #[error(
        "no usable AWS credentials ({detail}): attach an instance profile (an IAM role) to the \
         instance and keep IMDSv2 reachable (hop limit 2 if berth runs in a container), or set \
         AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
    )]
    Credentials { detail: String },
    #[error("{}", render_collisions(.collisions))]
    Collision { collisions: Vec<Collision> },
    #[error("SSM {action} failed with HTTP {status} {code} ({message}); berth retries with backoff")]
    Server { action: String, status: u16, code: String, message: String },
    #[error("SSM {action} failed: {detail}")]
    Other { action: String, detail: String },
}

fn render_collisions(collisions: &[Collision]) -> String {
    let parts: Vec<String> =
        collisions.iter().map(|c| format!("{} would come from both {} and {}", c.name, c.first, c.second)).collect();
    format!(
        "secret name collision: {}; rename one of each pair (names are mapped as SPEC [secrets] says)",
        parts.join("; ")
    )
}

impl SecretsError {
    /// Transient: the same request may well succeed later without anyone changing anything.
    pub fn is_retryable(&self) -> bool {
        matches!(self, SecretsError::Throttled { .. } | SecretsError::Network { .. } | SecretsError::Server { .. })
    }

    /// A short machine-friendly kind, for status output and metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            SecretsError::AccessDenied { .. } => "access_denied",
            SecretsError::NotFound { .. } | SecretsError::EmptyPath { .. } => "not_found",
            SecretsError::Kms { .. } => "kms",
            SecretsError::Throttled { .. } => "throttled",
            SecretsError::Network { .. } => "network",
            SecretsError::Credentials { .. } => "credentials",
            SecretsError::Collision { .. } => "collision",
            SecretsError::Server { .. } => "server",
            SecretsError::Other { .. } => "other",
        }
    }
}

/// What a failed call was about, to turn an SDK error into an operator's message.
struct Call<'a> {
    action: &'static str,
    /// The `[secrets] path`, or the parameter names of a GetParameters batch.
    scope: Scope<'a>,
    region: &'a str,
    endpoint: &'a str,
}

enum Scope<'a> {
    Path(&'a str),
    Names(&'a [String]),
}

impl Call<'_> {
    fn scope_text(&self) -> String {
        match self.scope {
            Scope::Path(p) => p.to_string(),
            Scope::Names(n) => n.join(", "),
        }
    }

    /// The IAM grant that would make this call work. The account comes from the ARN in
    /// AWS's message when there is one (it names the caller's role).
    fn needed_grant(&self, message: &str) -> String {
        let account = arn_in(message).and_then(|a| a.split(':').nth(4).filter(|s| !s.is_empty()).map(str::to_owned));
        let account = account.as_deref().unwrap_or("ACCOUNT_ID");
        let prefix = format!("arn:{}:ssm:{}:{}:parameter", aws::partition(self.region), self.region, account);
        match self.scope {
            Scope::Path(p) => format!("{} on {prefix}{}*", self.action, p.trim_end_matches('/')),
            Scope::Names(names) => {
                let arns: Vec<String> = names.iter().map(|n| format!("{prefix}{}", with_slash(n))).collect();
                let mut s = format!("{} on {}", self.action, arns.join(", "));
                if names.iter().any(|n| n.starts_with(SECRETS_MANAGER_REFERENCE)) {
                    s.push_str(
                        ", and secretsmanager:GetSecretValue on the referenced Secrets Manager \
                         secrets (plus kms:Decrypt if they use a customer managed key)",
                    );
                }
                s
            }
        }
    }

    fn classify<E>(&self, err: SdkError<E>) -> SecretsError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let action = self.action.to_string();
        match &err {
            SdkError::ServiceError(se) => {
                let code = se.err().code().unwrap_or("").to_string();
                let message = se.err().message().unwrap_or("").to_string();
                let status = se.raw().status().as_u16();
                self.classify_service(code, message, status)
            }
            SdkError::TimeoutError(_) => SecretsError::Network {
                endpoint: self.endpoint.to_string(),
                detail: format!("timed out: {}", DisplayErrorContext(&err)),
            },
            SdkError::DispatchFailure(d) => {
                let detail = DisplayErrorContext(&err).to_string();
                if d.is_io() || d.is_timeout() {
                    SecretsError::Network { endpoint: self.endpoint.to_string(), detail }
                } else if detail.to_ascii_lowercase().contains("credentials") {
                    SecretsError::Credentials { detail }
                } else {
                    SecretsError::Other { action, detail }
                }
            }
            SdkError::ResponseError(r) if r.raw().status().is_server_error() => SecretsError::Server {
                action,
                status: r.raw().status().as_u16(),
                code: "unparseable response".into(),
                message: DisplayErrorContext(&err).to_string(),
            },
            _ => {
                let detail = DisplayErrorContext(&err).to_string();
                if detail.to_ascii_lowercase().contains("credentials") {
                    SecretsError::Credentials { detail }
                } else {
                    SecretsError::Other { action, detail }
                }
            }
        }
    }

    fn classify_service(&self, code: String, message: String, status: u16) -> SecretsError {
        let action = self.action.to_string();
        let lower = message.to_ascii_lowercase();
        let kms = code.starts_with("KMS")
            || code == "InvalidKeyId"
            || lower.contains("kms:")
            || lower.contains("awskms")
            || lower.contains("kms key")
            || lower.contains("ciphertext")
            || lower.contains("customer master key");
        match code.as_str() {
            // Before the KMS check: KMS throttling during a fleet boot comes back as a
            // ThrottlingException naming AWSKMS (or as KMS's own KMSThrottlingException),
            // and it needs a retry, not an IAM fix.
            _ if is_throttling(&code) => SecretsError::Throttled { action, message: format!("{code}: {message}") },
            _ if kms => SecretsError::Kms { scope: self.scope_text(), message: format!("{code}: {message}") },
            "AccessDeniedException" | "AccessDenied" | "UnauthorizedOperation" | "NotAuthorized" => {
                let performed = performed_action(&message).unwrap_or(self.action).to_string();
                let named = resource_in(&message);
                let resource = named.map(str::to_owned).unwrap_or_else(|| self.scope_text());
                // Denied further down the chain (Secrets Manager behind a reference, KMS
                // behind a SecureString): the grant to add is the one AWS named.
                let needed = match named {
                    Some(arn) if performed != self.action => format!("{performed} on {arn}"),
                    _ => self.needed_grant(&message),
                };
                SecretsError::AccessDenied { needed, action: performed, resource, message }
            }
            "UnrecognizedClientException"
            | "InvalidSignatureException"
            | "ExpiredTokenException"
            | "ExpiredToken"
            | "InvalidClientTokenId"
            | "SignatureDoesNotMatch"
            | "IncompleteSignature" => SecretsError::Credentials { detail: format!("{code}: {message}") },
            "ParameterNotFound" => SecretsError::NotFound {
                names: match self.scope {
                    Scope::Path(p) => vec![p.to_string()],
                    Scope::Names(n) => n.to_vec(),
                },
                region: self.region.to_string(),
            },
            _ if status >= 500 => SecretsError::Server { action, status, code, message },
            _ => SecretsError::Other { action, detail: format!("HTTP {status} {code}: {message}") },
        }
    }
}

/// Error codes AWS uses for "slow down", by the code alone: messages of throttled
/// requests may name other services (AWSKMS) and must not change the classification.
fn is_throttling(code: &str) -> bool {
    // KMS forwards its own as `KMSThrottlingException` or `KMS.ThrottlingException`.
    let code = code.strip_prefix("KMS.").or_else(|| code.strip_prefix("KMS")).unwrap_or(code);
    matches!(
        code,
        "ThrottlingException"
            | "Throttling"
            | "ThrottledException"
            | "TooManyRequestsException"
            | "RequestLimitExceeded"
            | "RequestThrottled"
            | "RequestThrottledException"
    )
}

fn with_slash(name: &str) -> String {
    if name.starts_with('/') {
        name.to_string()
    } else {
        format!("/{name}")
    }
}

/// The first `arn:...` token in an AWS message.
fn arn_in(message: &str) -> Option<&str> {
    message.split_whitespace().map(|w| w.trim_end_matches(['.', ',', ';', ')'])).find(|w| w.starts_with("arn:"))
}

/// "... is not authorized to perform: ssm:GetParametersByPath on resource: arn:... because ..."
fn performed_action(message: &str) -> Option<&str> {
    let rest = message.split("to perform: ").nth(1)?;
    rest.split_whitespace().next()
}

fn resource_in(message: &str) -> Option<&str> {
    let rest = message.split("on resource: ").nth(1)?;
    rest.split_whitespace().next().map(|w| w.trim_end_matches(['.', ',', ';', ')']))
}

// ---------------------------------------------------------------------------------------
// Fetching
// ---------------------------------------------------------------------------------------

/// Reads the configured parameters from SSM.
#[derive(Clone)]
pub struct SecretsSource {
    client: aws_sdk_ssm::Client,
    config: SecretsConfig,
    region: Option<String>,
    endpoint: String,
}

impl SecretsSource {
    pub fn new(sdk: &SdkConfig, config: &SecretsConfig) -> Self {
        Self::with_ssm_config(aws_sdk_ssm::Config::new(sdk), sdk, config)
    }

    fn with_ssm_config(ssm: aws_sdk_ssm::Config, sdk: &SdkConfig, config: &SecretsConfig) -> Self {
        SecretsSource {
            client: aws_sdk_ssm::Client::from_conf(ssm),
            config: config.clone(),
            region: sdk.region().map(|r| r.to_string()),
            endpoint: aws::ssm_endpoint(sdk),
        }
    }

    /// The SDK's adaptive rate limiter and retry quota are process-wide per partition; a
    /// test that throttles on purpose must not slow down the tests running beside it.
    #[cfg(test)]
    fn isolated(sdk: &SdkConfig, config: &SecretsConfig, partition: &str) -> Self {
        use aws_sdk_ssm::config::retry::RetryPartition;
        let ssm =
            aws_sdk_ssm::config::Builder::from(sdk).retry_partition(RetryPartition::new(partition.to_string())).build();
        Self::with_ssm_config(ssm, sdk, config)
    }

    /// `/myapp/prod/ and 2 parameters`: what this source reads, for messages.
    pub fn describe(&self) -> String {
        let n = self.config.parameters.len();
        let params = format!("{n} parameter{}", if n == 1 { "" } else { "s" });
        match (&self.config.path, n) {
            (Some(p), 0) => p.clone(),
            (Some(p), _) => format!("{p} and {params}"),
            (None, _) => params,
        }
    }

    /// One fetch of everything configured, mapped to environment variable names.
    pub async fn fetch(&self) -> Result<SecretSet, SecretsError> {
        let start = Instant::now();
        let Some(region) = self.region.as_deref() else {
            return Err(SecretsError::Other {
                action: "configuration".into(),
                detail: "no AWS region: set [aws] region or AWS_REGION, or run on EC2 where IMDSv2 provides it".into(),
            });
        };
        let mut set = SetBuilder::default();
        if let Some(path) = &self.config.path {
            self.fetch_path(path, region, &mut set).await?;
        }
        if !self.config.parameters.is_empty() {
            self.fetch_parameters(region, &mut set).await?;
        }
        let set = set.finish()?;
        tracing::debug!(
            count = set.len(),
            elapsed_ms = start.elapsed().as_millis() as u64,
            source = %self.describe(),
            "fetched secrets"
        );
        Ok(set)
    }

    async fn fetch_path(&self, path: &str, region: &str, set: &mut SetBuilder) -> Result<(), SecretsError> {
        // SSM wants the hierarchy without a trailing slash; the mapping strips either form.
        let api_path = if path.len() > 1 { path.trim_end_matches('/') } else { path };
        let call =
            Call { action: "ssm:GetParametersByPath", scope: Scope::Path(path), region, endpoint: &self.endpoint };
        let mut token: Option<String> = None;
        let mut seen: HashSet<String> = HashSet::new();
        let mut pages = 0u32;
        let mut count = 0usize;
        loop {
            let page_start = Instant::now();
            let out = self
                .client
                .get_parameters_by_path()
                .path(api_path)
                .recursive(true)
                .with_decryption(true)
                .set_next_token(token.clone())
                .send()
                .await
                .map_err(|e| call.classify(e))?;
            pages += 1;
            let params = out.parameters.unwrap_or_default();
            tracing::trace!(
                path,
                page = pages,
                count = params.len(),
                elapsed_ms = page_start.elapsed().as_millis() as u64,
                "GetParametersByPath page"
            );
            for p in params {
                let name = p.name.unwrap_or_default();
                let value = Secret::new(p.value.unwrap_or_default());
                set.add(env_name_under_path(path, &name), name, value, p.version);
                count += 1;
            }
            // A page may be short (even empty) and still have a token: only an absent or
            // empty token ends the listing. A token seen before would loop forever, and so
            // would an endpoint that never stops handing out new ones.
            match out.next_token.filter(|t| !t.is_empty()) {
                Some(next) if !seen.insert(next.clone()) => {
                    return Err(SecretsError::Other {
                        action: call.action.into(),
                        detail: format!(
                            "SSM returned a NextToken it had returned before (after {pages} pages) while \
                             listing {path}; giving up on this listing"
                        ),
                    });
                }
                Some(_) if pages >= MAX_PAGES => {
                    return Err(SecretsError::Other {
                        action: call.action.into(),
                        detail: format!(
                            "listing {path} did not end after {MAX_PAGES} pages; giving up (is the path \
                             too broad, e.g. \"/\"?)"
                        ),
                    });
                }
                Some(next) => token = Some(next),
                None => break,
            }
        }
        if count == 0 {
            return Err(SecretsError::EmptyPath { path: path.to_string(), region: region.to_string() });
        }
        tracing::debug!(path, count, pages, "fetched parameters by path");
        Ok(())
    }

    async fn fetch_parameters(&self, region: &str, set: &mut SetBuilder) -> Result<(), SecretsError> {
        let mut wanted: Vec<String> = Vec::new();
        for p in &self.config.parameters {
            if !wanted.contains(p) {
                wanted.push(p.clone());
            }
        }
        let mut missing: Vec<String> = Vec::new();
        for batch in wanted.chunks(GET_PARAMETERS_BATCH) {
            let (params, invalid) = match self.get_parameters(batch, region).await {
                // SSM (and moto) answer a missing Secrets Manager reference with
                // ParameterNotFound for the whole call instead of listing it as invalid, so
                // the error names every name in the batch. Asking one name at a time finds
                // the missing ones; it costs extra calls only on a path that already fails.
                Err(SecretsError::NotFound { .. }) if batch.len() == 1 => (Vec::new(), batch.to_vec()),
                Err(SecretsError::NotFound { .. }) => {
                    let mut params = Vec::new();
                    let mut invalid = Vec::new();
                    for name in batch {
                        match self.get_parameters(std::slice::from_ref(name), region).await {
                            Ok((p, i)) => {
                                params.extend(p);
                                invalid.extend(i);
                            }
                            Err(SecretsError::NotFound { .. }) => invalid.push(name.clone()),
                            Err(e) => return Err(e),
                        }
                    }
                    (params, invalid)
                }
                other => other?,
            };
            missing.extend(invalid);
            // SSM echoes a name with a version/label selector (`/x:3`) as `/x` plus the
            // selector, and an ARN as the plain name: map each back to what was configured,
            // since that is what the env name (and config validation) is derived from.
            let by_key: HashMap<&str, &String> = batch.iter().map(|n| (n.as_str(), n)).collect();
            for p in params {
                let name = p.name.unwrap_or_default();
                let with_selector = format!("{name}{}", p.selector.as_deref().unwrap_or(""));
                let as_reference = format!("{SECRETS_MANAGER_REFERENCE}{name}");
                let configured = by_key
                    .get(name.as_str())
                    .or_else(|| by_key.get(with_selector.as_str()))
                    .or_else(|| p.arn.as_deref().and_then(|a| by_key.get(a)))
                    // A Secrets Manager reference may come back under the secret's own name.
                    .or_else(|| by_key.get(as_reference.as_str()))
                    .map(|s| s.as_str())
                    .unwrap_or(name.as_str())
                    .to_string();
                let value = Secret::new(p.value.unwrap_or_default());
                set.add(env_name_for_parameter(&configured), configured, value, p.version);
            }
        }
        if !missing.is_empty() {
            return Err(SecretsError::NotFound { names: missing, region: region.to_string() });
        }
        Ok(())
    }

    /// One GetParameters call: the parameters found and the names SSM listed as invalid.
    async fn get_parameters(
        &self,
        names: &[String],
        region: &str,
    ) -> Result<(Vec<aws_sdk_ssm::types::Parameter>, Vec<String>), SecretsError> {
        let call = Call { action: "ssm:GetParameters", scope: Scope::Names(names), region, endpoint: &self.endpoint };
        let start = Instant::now();
        let out = self
            .client
            .get_parameters()
            .set_names(Some(names.to_vec()))
            .with_decryption(true)
            .send()
            .await
            .map_err(|e| call.classify(e))?;
        let params = out.parameters.unwrap_or_default();
        tracing::trace!(
            count = params.len(),
            requested = names.len(),
            elapsed_ms = start.elapsed().as_millis() as u64,
            "GetParameters batch"
        );
        Ok((params, out.invalid_parameters.unwrap_or_default()))
    }

    /// [`fetch`](Self::fetch), retried per `policy`; `on_retry` hears about every failed
    /// attempt that will be retried (the daemon puts it in the systemd status line).
    pub async fn fetch_with_retry(
        &self,
        policy: &RetryPolicy,
        mut on_retry: impl FnMut(&SecretsError, Duration),
    ) -> Result<SecretSet, SecretsError> {
        if !policy.first_jitter.is_zero() {
            // Instances of an Auto Scaling group boot within seconds of each other; spread
            // their first calls so SSM sees a ramp instead of a wall.
            tokio::time::sleep(random_up_to(policy.first_jitter)).await;
        }
        let mut backoff = Backoff::new(policy.initial, policy.max);
        let mut failures = 0u32;
        loop {
            let err = match self.fetch().await {
                Ok(set) => return Ok(set),
                Err(e) => e,
            };
            failures += 1;
            let retry = err.is_retryable() || policy.retry_permanent;
            if !retry || policy.max_attempts.is_some_and(|max| failures >= max) {
                return Err(err);
            }
            let wait = if err.is_retryable() { backoff.next_delay() } else { at_cap(policy.max) };
            tracing::warn!(
                error = %err,
                kind = err.kind(),
                attempt = failures,
                retry_in_ms = wait.as_millis() as u64,
                "fetching secrets failed; retrying"
            );
            on_retry(&err, wait);
            tokio::time::sleep(wait).await;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Retry policy
// ---------------------------------------------------------------------------------------

/// A uniform random wait in `[0, max]`.
fn random_up_to(max: Duration) -> Duration {
    rand::rng().random_range(Duration::ZERO..=max)
}

/// For errors only an operator can fix: about the cap (half fixed, half random), neither
/// hammering SSM nor leaving a fixed IAM policy unnoticed for long.
fn at_cap(max: Duration) -> Duration {
    Backoff::new(max, max).next_delay()
}

/// How [`SecretsSource::fetch_with_retry`] retries.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Capped exponential backoff between attempts (see [`crate::backoff`]).
    pub initial: Duration,
    pub max: Duration,
    /// Give up after this many attempts; `None`: until it works.
    pub max_attempts: Option<u32>,
    /// Also retry errors only an operator can fix (access denied, not found, KMS,
    /// collisions), at the backoff cap: a daemon waits for the IAM policy to be fixed
    /// instead of exiting and being restarted by systemd.
    pub retry_permanent: bool,
    /// A random wait in `[0, first_jitter]` before the first attempt.
    pub first_jitter: Duration,
}

impl RetryPolicy {
    /// `berth run`'s first fetch: until it works, saying why it waits.
    pub const DAEMON: RetryPolicy = RetryPolicy {
        initial: Duration::from_secs(1),
        max: Duration::from_secs(60),
        max_attempts: None,
        retry_permanent: true,
        first_jitter: Duration::from_secs(1),
    };

    /// `berth check --online`: one more try for transient errors (on top of the SDK's own
    /// retries), anything else at once, so an operator gets an answer in seconds.
    pub const CHECK: RetryPolicy = RetryPolicy {
        initial: Duration::from_secs(1),
        max: Duration::from_secs(4),
        max_attempts: Some(2),
        retry_permanent: false,
        first_jitter: Duration::ZERO,
    };
}

// ---------------------------------------------------------------------------------------
// Refresh
// ---------------------------------------------------------------------------------------

/// What `berth status` and `/metrics` show about secrets. Names and counts only.
#[derive(Debug, Clone)]
pub struct SecretsStatus {
    /// What is read, e.g. `/myapp/prod/ and 2 parameters`.
    pub source: String,
    /// Number of secrets in the current set.
    pub count: usize,
    /// When the current set (or a confirmation that it is unchanged) was last fetched.
    pub last_success: SystemTime,
    /// The error of the last attempt, if it failed; `None` once a refresh succeeds again.
    pub last_error: Option<String>,
    /// `kind()` of `last_error`.
    pub last_error_kind: Option<&'static str>,
    pub consecutive_failures: u32,
    /// When the next refresh is due; `None` when refreshing is off (`refresh_interval = "0s"`).
    pub next_refresh: Option<SystemTime>,
    /// `berth_secrets_refresh_total{result="ok"}`; the initial fetch counts as one.
    pub refresh_ok: u64,
    /// `berth_secrets_refresh_total{result="error"}`.
    pub refresh_error: u64,
    /// How many times a refresh found a different set.
    pub changes: u64,
}

/// The daemon's view of the secrets: the current set, which changes only when a refresh
/// found different names or values, and the refresh status.
#[derive(Clone)]
pub struct SecretsHandle {
    secrets: watch::Receiver<Arc<SecretSet>>,
    status: watch::Receiver<SecretsStatus>,
    /// What the loop reads and how often; a reload sends new settings.
    control: Arc<watch::Sender<Settings>>,
}

/// The refresh loop's source and timing. No source: nothing is configured, the set is empty.
#[derive(Clone)]
struct Settings {
    source: Option<SecretsSource>,
    timing: RefreshTiming,
}

impl SecretsHandle {
    /// The current set.
    pub fn current(&self) -> Arc<SecretSet> {
        self.secrets.borrow().clone()
    }

    /// A receiver whose `changed()` fires once per changed set (never for an unchanged
    /// refresh): the supervisor's trigger for `on_change = "redeploy"`.
    pub fn subscribe(&self) -> watch::Receiver<Arc<SecretSet>> {
        self.secrets.clone()
    }

    pub fn status(&self) -> SecretsStatus {
        self.status.borrow().clone()
    }

    /// A receiver for status updates (every attempt).
    #[cfg(test)]
    pub fn subscribe_status(&self) -> watch::Receiver<SecretsStatus> {
        self.status.clone()
    }

    /// A reload changed what is read (`path`, `parameters`, `[aws]`) or how often: the loop
    /// switches to `source` and fetches at once. The set it publishes replaces the current
    /// one only if it differs, exactly as a refresh would (so the supervisor's `on_change`
    /// applies); if the fetch fails, the last good set stays and the loop retries with
    /// backoff. `None`: no secrets any more, the set becomes empty.
    pub fn reconfigure(&self, source: Option<SecretsSource>, interval: Duration) {
        self.control.send_modify(|s| {
            s.source = source;
            s.timing.interval = interval;
        });
    }
}

/// Timing of the refresh loop; [`RefreshTiming::new`] is what the daemon uses.
#[derive(Debug, Clone, Copy)]
pub struct RefreshTiming {
    pub interval: Duration,
    /// Backoff after failed refreshes, capped at `interval` when that is longer than
    /// [`BACKOFF_CAP_FLOOR`], so a failing refresh is retried about as often as a healthy
    /// one runs, without a short interval making a throttled fleet retry every second.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// A random wait in `[0, reload_jitter]` before the fetch a reload triggers: a config
    /// pushed to a whole fleet at once must not make every instance call SSM together.
    pub reload_jitter: Duration,
}

/// The least the refresh backoff may grow to, whatever the interval.
pub const BACKOFF_CAP_FLOOR: Duration = Duration::from_secs(30);

impl RefreshTiming {
    pub fn new(interval: Duration) -> Self {
        RefreshTiming {
            interval,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            reload_jitter: RetryPolicy::DAEMON.first_jitter,
        }
    }

    /// A one-off fetch after a reload (`interval = 0`) that fails is retried at the plain
    /// backoff.
    fn backoff_cap(&self) -> Duration {
        if self.interval.is_zero() {
            self.max_backoff
        } else {
            self.max_backoff.min(self.interval.max(BACKOFF_CAP_FLOOR))
        }
    }

    fn backoff(&self) -> Backoff {
        let max = self.backoff_cap();
        Backoff::new(self.initial_backoff.min(max), max)
    }
}

/// Starts refreshing `initial` (the set the daemon fetched at boot) every `interval`.
/// `interval == 0` means fetch once: the set never changes, until a reload gives a new
/// source. The loop runs until the runtime shuts down (restarted if it panics); dropping
/// receivers does not stop it.
pub fn spawn_refresh(source: SecretsSource, interval: Duration, initial: SecretSet) -> SecretsHandle {
    spawn_refresh_with(source, RefreshTiming::new(interval), initial)
}

pub fn spawn_refresh_with(source: SecretsSource, timing: RefreshTiming, initial: SecretSet) -> SecretsHandle {
    spawn_loop(Some(source), timing, initial)
}

/// No `[secrets]` configured: an empty set that a reload can fill (see
/// [`SecretsHandle::reconfigure`]).
pub fn spawn_empty() -> SecretsHandle {
    spawn_loop(None, RefreshTiming::new(Duration::ZERO), SecretSet::default())
}

fn spawn_loop(source: Option<SecretsSource>, timing: RefreshTiming, initial: SecretSet) -> SecretsHandle {
    let now = SystemTime::now();
    let status = SecretsStatus {
        source: describe(source.as_ref()),
        count: initial.len(),
        last_success: now,
        last_error: None,
        last_error_kind: None,
        consecutive_failures: 0,
        next_refresh: (source.is_some() && !timing.interval.is_zero()).then_some(timing.interval).and_then(due_in),
        refresh_ok: u64::from(source.is_some()),
        refresh_error: 0,
        changes: 0,
    };
    let (set_tx, set_rx) = watch::channel(Arc::new(initial));
    let (status_tx, status_rx) = watch::channel(status);
    let (control_tx, control_rx) = watch::channel(Settings { source, timing });
    let (set_tx, status_tx) = (Arc::new(set_tx), Arc::new(status_tx));
    let on_panic = {
        let status_tx = status_tx.clone();
        move |message: String, restart_in: Duration| {
            status_tx.send_modify(|s| {
                s.last_error = Some(format!(
                    "the secrets refresh loop panicked ({message}); restarting it in {}s",
                    restart_in.as_secs()
                ));
                s.last_error_kind = Some("panic");
                s.consecutive_failures = s.consecutive_failures.saturating_add(1);
                s.next_refresh = None;
                s.refresh_error += 1;
            })
        }
    };
    // Runs until the runtime shuts down. A panic in the loop would otherwise end refreshing
    // silently, with the status frozen at its last report.
    tokio::spawn(supervise(
        "secrets refresh",
        move || refresh_loop(control_rx.clone(), set_tx.clone(), status_tx.clone()),
        on_panic,
        Backoff::new(Duration::from_secs(1), Duration::from_secs(60)),
    ));
    SecretsHandle { secrets: set_rx, status: status_rx, control: Arc::new(control_tx) }
}

fn describe(source: Option<&SecretsSource>) -> String {
    source.map_or_else(|| "no secrets configured".to_string(), SecretsSource::describe)
}

/// `None`: no refresh is due (refreshing is off, or there is nothing to read).
fn next_wait(settings: &Settings) -> Option<Duration> {
    (settings.source.is_some() && !settings.timing.interval.is_zero())
        .then(|| interval_jitter(settings.timing.interval))
}

async fn sleep_for(wait: Option<Duration>) {
    match wait {
        Some(w) => tokio::time::sleep(w).await,
        None => std::future::pending().await,
    }
}

/// Runs the task `run` makes until it returns, making a new one (after `backoff`) each
/// time one panics; `on_panic` hears the panic message and the delay before the restart.
async fn supervise<F, Fut>(
    what: &'static str,
    mut run: F,
    mut on_panic: impl FnMut(String, Duration),
    mut backoff: Backoff,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let started = Instant::now();
        let err = match tokio::spawn(run()).await {
            Ok(()) => return,
            // Cancelled: the runtime is shutting down.
            Err(e) if !e.is_panic() => return,
            Err(e) => e,
        };
        // A task that ran healthily for a while before panicking starts the backoff afresh.
        if started.elapsed() > Duration::from_secs(600) {
            backoff.reset();
        }
        let message = panic_message(err.into_panic());
        let restart_in = backoff.next_delay();
        tracing::error!(
            task = what,
            panic = %message,
            restart_in_ms = restart_in.as_millis() as u64,
            "task panicked; restarting it"
        );
        on_panic(message, restart_in);
        tokio::time::sleep(restart_in).await;
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

async fn refresh_loop(
    mut control: watch::Receiver<Settings>,
    set_tx: Arc<watch::Sender<Arc<SecretSet>>>,
    status_tx: Arc<watch::Sender<SecretsStatus>>,
) {
    // Also after a restart: `borrow_and_update` marks the settings seen, and the set
    // last published is the one to compare against.
    let mut settings = control.borrow_and_update().clone();
    let mut backoff = settings.timing.backoff();
    let mut digest = set_tx.borrow().digest();
    let mut wait = next_wait(&settings);
    // After a restart the status still shows the schedule of the loop that panicked.
    status_tx.send_modify(|s| s.next_refresh = wait.and_then(due_in));
    loop {
        // Runs for the daemon's lifetime even when nobody holds a receiver of the set (no
        // apps, say): the status and the metrics still report the refreshes.
        tokio::select! {
            _ = sleep_for(wait) => {}
            // All handles gone: nobody can reconfigure; the branch is then disabled.
            Ok(()) = control.changed() => {
                settings = control.borrow_and_update().clone();
                backoff = settings.timing.backoff();
                let source = describe(settings.source.as_ref());
                tracing::info!(source = %source, interval = ?settings.timing.interval, "secrets source reloaded; fetching it");
                status_tx.send_modify(|s| s.source = source);
                if settings.source.is_none() {
                    let empty = SecretSet::default();
                    if empty.digest() != digest {
                        digest = empty.digest();
                        status_tx.send_modify(|s| {
                            s.count = 0;
                            s.next_refresh = None;
                            s.changes += 1;
                        });
                        set_tx.send_replace(Arc::new(empty));
                    }
                    wait = None;
                    continue;
                }
                // Fetch after the jitter, unless another reload comes first.
                wait = Some(random_up_to(settings.timing.reload_jitter));
                continue;
            }
        }
        let Some(source) = &settings.source else {
            wait = None;
            continue;
        };
        let start = Instant::now();
        let result = source.fetch().await;
        let elapsed_ms = start.elapsed().as_millis() as u64;
        match result {
            Ok(set) => {
                backoff.reset();
                wait = next_wait(&settings);
                let new_digest = set.digest();
                let changed = new_digest != digest;
                if changed {
                    let changes = set_tx.borrow().diff(&set);
                    tracing::info!(
                        count = set.len(),
                        added = ?changes.added,
                        removed = ?changes.removed,
                        changed = ?changes.changed,
                        elapsed_ms,
                        "secrets changed"
                    );
                    digest = new_digest;
                } else {
                    tracing::debug!(count = set.len(), elapsed_ms, "secrets unchanged");
                }
                let count = set.len();
                status_tx.send_modify(|s| {
                    s.count = count;
                    s.last_success = SystemTime::now();
                    s.last_error = None;
                    s.last_error_kind = None;
                    s.consecutive_failures = 0;
                    s.next_refresh = wait.and_then(due_in);
                    s.refresh_ok += 1;
                    s.changes += u64::from(changed);
                });
                if changed {
                    // Only a different set wakes the supervisor.
                    set_tx.send_replace(Arc::new(set));
                }
            }
            Err(err) => {
                let failures = status_tx.borrow().consecutive_failures + 1;
                let retry =
                    if err.is_retryable() { backoff.next_delay() } else { at_cap(settings.timing.backoff_cap()) };
                wait = Some(retry);
                tracing::warn!(
                    error = %err,
                    kind = err.kind(),
                    failures,
                    retry_in_ms = retry.as_millis() as u64,
                    elapsed_ms,
                    "secrets refresh failed; keeping the last good set"
                );
                let message = err.to_string();
                status_tx.send_modify(|s| {
                    s.last_error = Some(message);
                    s.last_error_kind = Some(err.kind());
                    s.consecutive_failures = failures;
                    s.next_refresh = due_in(retry);
                    s.refresh_error += 1;
                });
            }
        }
    }
}

/// When a wait starting now ends; `None` past what the clock can represent (config
/// validation bounds the interval, but a panic here would stop refreshing).
fn due_in(wait: Duration) -> Option<SystemTime> {
    SystemTime::now().checked_add(wait)
}

/// 90–100 % of the interval: a fleet booted together drifts apart instead of refreshing in
/// lock-step forever, and a change is still seen within one interval.
fn interval_jitter(interval: Duration) -> Duration {
    interval - random_up_to(interval / 10)
}

// ---------------------------------------------------------------------------------------
// berth check --online
// ---------------------------------------------------------------------------------------

/// Fetches once and summarises: `ssm: 27 secrets from /myapp/prod/ and 2 parameters in
/// 143 ms` and a second line with the mapped names (never values); or the specific error.
pub async fn online_check(config: &Config) -> anyhow::Result<String> {
    if !config.has_secrets() {
        return Ok("ssm: no [secrets] path or parameters configured; nothing to fetch".into());
    }
    let sdk = aws::sdk_config(&config.aws).await;
    let source = SecretsSource::new(&sdk, &config.secrets);
    let start = Instant::now();
    let set = source.fetch_with_retry(&RetryPolicy::CHECK, |_, _| {}).await.map_err(|e| anyhow::anyhow!("ssm: {e}"))?;
    let ms = start.elapsed().as_millis();
    let names: BTreeSet<&str> = set.names().collect();
    Ok(format!(
        "ssm: {} secret{} from {} in {ms} ms\n  names: {}",
        set.len(),
        if set.len() == 1 { "" } else { "s" },
        source.describe(),
        names.into_iter().collect::<Vec<_>>().join(", ")
    ))
}

#[cfg(test)]
mod tests;
