//! `/etc/berth/berth.toml`: the schema, its defaults, and the checks that turn a typo into a
//! message naming the key and the line, before berth touches AWS, Docker or a port.
//!
//! Loading happens in two passes. Serde does the shape (types, unknown keys, required keys)
//! with `serde_path_to_error` recording where it was when it failed; then [`Config::validate`]
//! does everything serde cannot express (names, routes, collisions, cross-key rules) and
//! collects *all* problems so an operator fixes the file in one round. Both passes report a
//! key path like `apps.web.routes[1]`, which [`Locator`] maps back to a line and column.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use crate::secrets::Secret;

/// The default location, used when neither `-c` nor `$BERTH_CONFIG` says otherwise.
pub const DEFAULT_PATH: &str = "/etc/berth/berth.toml";

/// One problem in the config file, located for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, e.g. `apps.web.port`; empty for a syntax error before any key.
    pub key: String,
    /// 1-based line and column of the offending key or value, when it exists in the file.
    pub position: Option<(usize, usize)>,
    pub message: String,
}

/// Why a config could not be used. `berth run` and `berth check` exit 78 (EX_CONFIG) on it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", render_problems(.path, .problems))]
    Invalid { path: PathBuf, problems: Vec<Problem> },
}

fn render_problems(path: &Path, problems: &[Problem]) -> String {
    let mut out = format!(
        "invalid config {}: {} problem{}",
        path.display(),
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    for p in problems {
        out.push_str("\n  ");
        out.push_str(&path.display().to_string());
        if let Some((line, col)) = p.position {
            out.push_str(&format!(":{line}:{col}"));
        }
        if p.key.is_empty() {
            out.push_str(&format!(": {}", p.message));
        } else {
            out.push_str(&format!(": `{}`: {}", p.key, p.message));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Schema. Every table denies unknown keys: a misspelt key silently ignored is how a fleet
// ends up running with the default it thought it had overridden.
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub agent: AgentConfig,
    #[serde(default)]
    pub aws: AwsConfig,
    #[serde(default)]
    pub secrets: SecretsConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub https: HttpsConfig,
    #[serde(default)]
    pub tls: TlsConfig,
    #[serde(default)]
    pub apps: BTreeMap<String, AppConfig>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    pub state_dir: PathBuf,
    pub admin_socket: PathBuf,
    /// Empty string turns the metrics listener off.
    pub metrics_listen: String,
    pub drain_delay: Dur,
    pub drain_timeout: Dur,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            state_dir: "/var/lib/berth".into(),
            admin_socket: "/run/berth/admin.sock".into(),
            metrics_listen: "127.0.0.1:9180".into(),
            drain_delay: Dur::secs(15),
            drain_timeout: Dur::secs(30),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AwsConfig {
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecretsConfig {
    pub path: Option<String>,
    pub parameters: Vec<String>,
    pub refresh_interval: Dur,
    pub on_change: OnChange,
}

impl Default for SecretsConfig {
    fn default() -> Self {
        Self { path: None, parameters: Vec::new(), refresh_interval: Dur::secs(300), on_change: OnChange::Redeploy }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnChange {
    Redeploy,
    Ignore,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub listen: String,
    pub health_path: String,
    /// Access log events (journald, target `berth::access`): "off", "errors" (4xx/5xx), "all".
    pub access_log: AccessLogMode,
    /// With `access_log = "all"`, the fraction of successful requests logged (errors always are).
    pub access_log_sample: f64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:80".into(),
            health_path: "/_berth/health".into(),
            access_log: AccessLogMode::Errors,
            access_log_sample: 1.0,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AccessLogMode {
    Off,
    #[default]
    Errors,
    All,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpsConfig {
    pub listen: String,
}

impl Default for HttpsConfig {
    fn default() -> Self {
        Self { listen: "0.0.0.0:443".into() }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    pub mode: TlsMode,
    pub domains: Vec<String>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub acme: Option<AcmeConfig>,
}

/// Self-signed is the default because it always works: an ALB does not verify its
/// targets' certificates. ACME is for NLB pass-through and clients that connect directly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    Acme,
    #[default]
    SelfSigned,
    Files,
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsMode::Acme => "acme",
            TlsMode::SelfSigned => "self-signed",
            TlsMode::Files => "files",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AcmeConfig {
    pub directory: String,
    pub contact: Vec<String>,
    pub ca_bundle: Option<PathBuf>,
    pub shared: Option<String>,
    /// External Account Binding (RFC 8555 §7.3.4), for CAs that only register accounts
    /// they know (ZeroSSL, Google, most private CAs): the key identifier the CA issued.
    pub eab_kid: Option<String>,
    /// The EAB MAC key, base64url, written inline. `Secret`: never printed.
    pub eab_hmac_key: Option<Secret>,
    /// ...or the SSM parameter (SecureString) holding it, so the file holds no secret.
    pub eab_hmac_key_parameter: Option<String>,
}

impl Default for AcmeConfig {
    fn default() -> Self {
        Self {
            directory: "https://acme-v02.api.letsencrypt.org/directory".into(),
            contact: Vec::new(),
            ca_bundle: None,
            shared: None,
            eab_kid: None,
            eab_hmac_key: None,
            eab_hmac_key_parameter: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    pub image: String,
    pub port: u16,
    #[serde(default)]
    pub routes: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub secrets: SecretSelection,
    #[serde(default)]
    pub pull: PullPolicy,
    #[serde(default)]
    pub registry_auth: RegistryAuth,
    #[serde(default)]
    pub watch_image: Dur,
    #[serde(default)]
    pub memory: Option<String>,
    #[serde(default)]
    pub cpus: Option<f64>,
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout: Dur,
    /// Connections berth opens to the container at most, idle or carrying a request;
    /// requests past it wait for one to come free. Set it to what the app can serve at once
    /// (a 5-thread Puma: 5) so a burst queues in berth instead of in the app.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default)]
    pub restart: RestartConfig,
    #[serde(default)]
    pub access: Option<AccessConfig>,
}

/// `[apps.NAME.access]`: who may reach the app. Checked by berth before the request is
/// forwarded; denied requests never reach the container.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessConfig {
    /// Client networks (CIDR) allowed in; empty: any address.
    pub allow: Vec<String>,
    /// Networks of proxies (the ALB's subnets) whose X-Forwarded-For is believed.
    pub trusted_proxies: Vec<String>,
    /// Names of secrets holding API keys, sent as `Authorization: Bearer KEY` or `X-Api-Key: KEY`.
    pub api_keys: Vec<String>,
    /// HTTP Basic users: user name → name of the secret holding the password.
    pub basic_auth: BTreeMap<String, String>,
}

fn default_stop_timeout() -> Dur {
    Dur::secs(30)
}

fn default_max_connections() -> u32 {
    berth_proxy::upstream::DEFAULT_MAX_CONNS as u32
}

/// Above this, one app's connections would use a large part of berth's own port range
/// (each is a socket from an ephemeral port to the same container address).
const MAX_APP_CONNECTIONS: u32 = 10_000;

/// `"missing"` by default: an image built on the instance or preloaded in the AMI must not
/// fail to start because no registry answers. `berth deploy` always pulls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PullPolicy {
    Always,
    #[default]
    Missing,
    Never,
}

impl fmt::Display for PullPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PullPolicy::Always => "always",
            PullPolicy::Missing => "missing",
            PullPolicy::Never => "never",
        })
    }
}

/// Which of the fetched secrets an app receives: `"all"` or a list of mapped names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum SecretSelection {
    #[default]
    All,
    Only(Vec<String>),
}

impl<'de> Deserialize<'de> for SecretSelection {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = SecretSelection;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#""all" or a list of secret names like ["DB_PASSWORD"]"#)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                match v {
                    "all" => Ok(SecretSelection::All),
                    other => Err(E::invalid_value(de::Unexpected::Str(other), &self)),
                }
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut names = Vec::new();
                while let Some(n) = seq.next_element::<String>()? {
                    names.push(n);
                }
                Ok(SecretSelection::Only(names))
            }
        }
        d.deserialize_any(V)
    }
}

/// How the Docker daemon authenticates to the image's registry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum RegistryAuth {
    #[default]
    None,
    /// ECR: a token from `GetAuthorizationToken` with the instance's credentials.
    Ecr,
    /// Basic auth; both fields are SSM parameter *names*, never the values themselves.
    Basic { username: String, password: String },
}

impl<'de> Deserialize<'de> for RegistryAuth {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Basic {
            username: String,
            password: String,
        }
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RegistryAuth;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#""none", "ecr", or { username = "/ssm/name", password = "/ssm/name" }"#)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                match v {
                    "none" => Ok(RegistryAuth::None),
                    "ecr" => Ok(RegistryAuth::Ecr),
                    other => Err(E::invalid_value(de::Unexpected::Str(other), &self)),
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                let b = Basic::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(RegistryAuth::Basic { username: b.username, password: b.password })
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// HTTP path probed on the container port; absent means "running is healthy".
    pub path: Option<String>,
    pub interval: Dur,
    pub timeout: Dur,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    pub start_period: Dur,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            path: None,
            interval: Dur::secs(5),
            timeout: Dur::secs(2),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            start_period: Dur::secs(60),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RestartConfig {
    pub initial_backoff: Dur,
    pub max_backoff: Dur,
}

impl Default for RestartConfig {
    fn default() -> Self {
        Self { initial_backoff: Dur::secs(1), max_backoff: Dur::secs(60) }
    }
}

/// Bounds of `[secrets] refresh_interval` other than `"0s"`.
pub const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(1);
pub const MAX_REFRESH_INTERVAL: Duration = Duration::from_secs(7 * 24 * 3600);

/// A duration written as a string (`"500ms"`, `"30s"`, `"5m"`), as the operator wrote it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl Dur {
    pub const fn secs(s: u64) -> Self {
        Dur(Duration::from_secs(s))
    }
    pub fn is_zero(&self) -> bool {
        self.0.is_zero()
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"a duration string like "500ms", "30s" or "5m""#)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Dur, E> {
                humantime::parse_duration(v.trim()).map(Dur).map_err(|e| {
                    E::custom(format!("invalid duration {v:?}: {e} (write e.g. \"500ms\", \"30s\", \"5m\")"))
                })
            }
        }
        d.deserialize_str(V)
    }
}

// ---------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------

impl Config {
    /// Reads, parses and validates the file. Any problem is a [`ConfigError`].
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let src =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Config::parse(&src).map_err(|problems| ConfigError::Invalid { path: path.to_owned(), problems })
    }

    /// Parses and validates TOML text; on failure, every problem found, located.
    pub fn parse(src: &str) -> Result<Config, Vec<Problem>> {
        let locator = Locator::new(src);
        let deserializer = toml::Deserializer::parse(src).map_err(|e| vec![locator.syntax(&e)])?;
        let config: Config = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let key = e.path().to_string();
            let key = if key == "." { String::new() } else { key };
            let inner = e.into_inner();
            let position = inner.span().map(|s| locator.line_col(s.start)).or_else(|| locator.position_of(&key));
            vec![Problem { key, position, message: inner.message().trim().to_string() }]
        })?;
        let problems = config.validate();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(problems
                .into_iter()
                .map(|(key, message)| Problem { position: locator.position_of(&key), key, message })
                .collect())
        }
    }

    /// Everything serde cannot check. Returns `(key path, message)` pairs.
    fn validate(&self) -> Vec<(String, String)> {
        let mut v = Validation::default();

        // [agent]
        if self.agent.state_dir.as_os_str().is_empty() || !self.agent.state_dir.is_absolute() {
            v.err("agent.state_dir", "must be an absolute path");
        }
        if !self.agent.admin_socket.is_absolute() {
            v.err("agent.admin_socket", "must be an absolute path");
        }
        if !self.agent.metrics_listen.is_empty() {
            v.socket_addr("agent.metrics_listen", &self.agent.metrics_listen);
        }

        // [aws]
        if let Some(url) = &self.aws.endpoint_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                v.err("aws.endpoint_url", format!("{url:?} must be an http:// or https:// URL"));
            }
        }
        if let Some(region) = &self.aws.region {
            let ok =
                !region.is_empty() && region.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
            if !ok {
                v.err("aws.region", format!("{region:?} is not a region name like \"us-east-1\""));
            }
        }

        // [secrets]
        if let Some(path) = &self.secrets.path {
            if !path.starts_with('/') {
                v.err("secrets.path", format!("{path:?} must start with '/' (GetParametersByPath takes a hierarchy)"));
            }
        }
        // Under a second would hammer SSM from every instance; past a week is a typo, and
        // an absurd value would overflow the refresh loop's time arithmetic.
        let refresh = self.secrets.refresh_interval;
        if !refresh.is_zero() && !(MIN_REFRESH_INTERVAL..=MAX_REFRESH_INTERVAL).contains(&refresh.0) {
            v.err("secrets.refresh_interval", format!("{refresh} must be \"0s\" (fetch once) or between 1s and 7days"));
        }
        let mut from_parameters: BTreeMap<String, (usize, &str)> = BTreeMap::new();
        for (i, name) in self.secrets.parameters.iter().enumerate() {
            let key = format!("secrets.parameters[{i}]");
            if name.is_empty() || name.ends_with('/') {
                v.err(&key, format!("{name:?} is not a parameter name"));
                continue;
            }
            let env = env_name_for_parameter(name);
            if let Some((j, other)) = from_parameters.get(&env) {
                v.err(
                    &key,
                    format!("{name:?} maps to {env}, as does secrets.parameters[{j}] {other:?}; rename one parameter"),
                );
            } else {
                from_parameters.insert(env, (i, name));
            }
        }

        // [http] / [https]
        v.socket_addr("http.listen", &self.http.listen);
        v.socket_addr("https.listen", &self.https.listen);
        if !(0.0..=1.0).contains(&self.http.access_log_sample) {
            v.err("http.access_log_sample", format!("{} must be between 0.0 and 1.0", self.http.access_log_sample));
        }
        if !self.http.health_path.starts_with('/') {
            v.err("http.health_path", "must start with '/'");
        } else if self.http.health_path.starts_with("/.well-known/acme-challenge") {
            v.err("http.health_path", "must not be under /.well-known/acme-challenge/");
        }

        // [tls]
        let mut seen_domains = BTreeSet::new();
        for (i, d) in self.tls.domains.iter().enumerate() {
            let key = format!("tls.domains[{i}]");
            if let Err(why) = check_domain(d, self.tls.mode != TlsMode::Acme) {
                v.err(&key, format!("{d:?} {why}"));
            } else if !seen_domains.insert(d.to_ascii_lowercase()) {
                v.err(&key, format!("{d:?} is listed twice"));
            }
        }
        match self.tls.mode {
            TlsMode::Acme => {
                if self.tls.domains.is_empty() {
                    v.err("tls.domains", "tls.mode = \"acme\" needs at least one domain to order a certificate for");
                }
                let acme = self.tls.acme.clone().unwrap_or_default();
                if !acme.directory.starts_with("https://") && !acme.directory.starts_with("http://") {
                    v.err("tls.acme.directory", format!("{:?} must be the ACME directory URL", acme.directory));
                }
                for (i, c) in acme.contact.iter().enumerate() {
                    if !c.starts_with("mailto:") || c.len() <= "mailto:".len() {
                        v.err(
                            format!("tls.acme.contact[{i}]"),
                            format!("{c:?} must look like \"mailto:ops@example.com\""),
                        );
                    }
                }
                if let Some(shared) = &acme.shared {
                    if !shared.starts_with('/') || shared.ends_with('/') || shared.len() < 2 {
                        v.err("tls.acme.shared", format!("{shared:?} must be an SSM prefix like \"/myapp/prod/berth\" (leading '/', no trailing '/')"));
                    }
                    // secrets.path is read recursively: a fleet prefix under it would hand the
                    // ACME account key and the certificate's private key to the app.
                    if let Some(path) = &self.secrets.path {
                        let path = path.trim_end_matches('/');
                        if shared == path || shared.starts_with(&format!("{path}/")) {
                            v.err("tls.acme.shared", format!("{shared:?} is under secrets.path {:?}, so the app would receive the ACME account and TLS private keys; use a prefix outside it, e.g. \"{path}-berth\"", self.secrets.path.as_deref().unwrap_or_default()));
                        }
                    }
                }
                match (&acme.eab_kid, &acme.eab_hmac_key, &acme.eab_hmac_key_parameter) {
                    (None, None, None) => {}
                    (Some(kid), key, param) => {
                        if kid.trim().is_empty() {
                            v.err("tls.acme.eab_kid", "must be the key identifier your CA gave you");
                        }
                        match (key, param) {
                            (None, None) => v.err(
                                "tls.acme.eab_kid",
                                "needs tls.acme.eab_hmac_key or tls.acme.eab_hmac_key_parameter",
                            ),
                            (Some(_), Some(_)) => {
                                v.err("tls.acme.eab_hmac_key", "set eab_hmac_key or eab_hmac_key_parameter, not both")
                            }
                            (Some(k), None) => {
                                if let Err(why) = eab_hmac_key_bytes(k.expose()) {
                                    v.err("tls.acme.eab_hmac_key", why);
                                }
                            }
                            (None, Some(name)) => {
                                if name.trim().is_empty() {
                                    v.err(
                                        "tls.acme.eab_hmac_key_parameter",
                                        "must name the SSM parameter holding the key",
                                    );
                                }
                            }
                        }
                    }
                    (None, key, _) => {
                        let k = if key.is_some() { "tls.acme.eab_hmac_key" } else { "tls.acme.eab_hmac_key_parameter" };
                        v.err(k, "is used only with tls.acme.eab_kid, the key identifier it belongs to");
                    }
                }
            }
            TlsMode::Files => {
                if self.tls.cert_file.is_none() {
                    v.err("tls.mode", "tls.mode = \"files\" needs tls.cert_file");
                }
                if self.tls.key_file.is_none() {
                    v.err("tls.mode", "tls.mode = \"files\" needs tls.key_file");
                }
            }
            TlsMode::SelfSigned => {}
        }
        if self.tls.mode != TlsMode::Files {
            for k in ["cert_file", "key_file"] {
                let set = if k == "cert_file" { self.tls.cert_file.is_some() } else { self.tls.key_file.is_some() };
                if set {
                    v.err(
                        format!("tls.{k}"),
                        format!("only used with tls.mode = \"files\" (mode is \"{}\")", self.tls.mode),
                    );
                }
            }
        }
        if self.tls.mode != TlsMode::Acme && self.tls.acme.is_some() {
            v.err(
                "tls.acme",
                format!(
                    "[tls.acme] is set but tls.mode is \"{}\"; set tls.mode = \"acme\" or remove the table",
                    self.tls.mode
                ),
            );
        }

        // [apps.*]
        let mut route_owner: BTreeMap<(String, String), String> = BTreeMap::new();
        let mut catch_all: Option<&str> = None;
        for (name, app) in &self.apps {
            let base = format!("apps.{name}");
            if let Err(why) = check_app_name(name) {
                v.err(&base, format!("app name {name:?} {why}"));
            }
            if app.image.trim().is_empty() || app.image.contains(char::is_whitespace) {
                v.err(format!("{base}.image"), format!("{:?} is not an image reference", app.image));
            }
            if app.port == 0 {
                v.err(format!("{base}.port"), "must be between 1 and 65535");
            }
            if app.routes.is_empty() {
                if let Some(other) = catch_all {
                    v.err(
                        format!("{base}.routes"),
                        format!("apps {other} and {name} both have no routes, so both would take every request; give one of them routes"),
                    );
                }
                catch_all = Some(name);
            }
            for (i, r) in app.routes.iter().enumerate() {
                let key = format!("{base}.routes[{i}]");
                match parse_route(r) {
                    Ok((host, prefix)) => {
                        if let Some(owner) = route_owner.insert((host.clone(), prefix.clone()), name.clone()) {
                            v.err(&key, format!("{r:?} is already routed to app {owner}"));
                        }
                    }
                    Err(why) => v.err(&key, format!("{r:?} {why}")),
                }
            }
            for k in app.env.keys() {
                if !is_env_name(k) {
                    v.err(
                        format!("{base}.env.{k}"),
                        "is not a valid environment variable name ([A-Za-z_][A-Za-z0-9_]*)",
                    );
                } else if app.secrets != SecretSelection::Only(vec![]) && from_parameters.contains_key(k) {
                    v.err(
                        format!("{base}.env.{k}"),
                        format!("{k} is also a secret from secrets.parameters; the plain value would hide it"),
                    );
                }
            }
            if let SecretSelection::Only(names) = &app.secrets {
                for (i, n) in names.iter().enumerate() {
                    if !is_mapped_secret_name(n) {
                        v.err(
                            format!("{base}.secrets[{i}]"),
                            format!("{n:?} is not a mapped secret name (upper-case, like DB_PASSWORD)"),
                        );
                    }
                }
                if !names.is_empty() && self.secrets.path.is_none() && self.secrets.parameters.is_empty() {
                    v.err(format!("{base}.secrets"), "names secrets but [secrets] has neither path nor parameters");
                }
            }
            if let RegistryAuth::Basic { username, password } = &app.registry_auth {
                for (field, val) in [("username", username), ("password", password)] {
                    if !val.starts_with('/') && !val.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)) {
                        v.err(
                            format!("{base}.registry_auth.{field}"),
                            format!("{val:?} must be an SSM parameter name, not a value"),
                        );
                    }
                }
            }
            if let Some(mem) = &app.memory {
                match parse_memory(mem) {
                    Ok(bytes) if bytes < 6 * 1024 * 1024 => {
                        v.err(format!("{base}.memory"), format!("{mem:?} is below Docker's minimum of 6m"))
                    }
                    Ok(_) => {}
                    Err(why) => v.err(format!("{base}.memory"), format!("{mem:?} {why}")),
                }
            }
            if app.max_connections == 0 || app.max_connections > MAX_APP_CONNECTIONS {
                v.err(
                    format!("{base}.max_connections"),
                    format!("{} must be at least 1 and at most {MAX_APP_CONNECTIONS}", app.max_connections),
                );
            }
            if let Some(cpus) = app.cpus {
                if !(cpus > 0.0 && cpus <= 1024.0) {
                    v.err(format!("{base}.cpus"), format!("{cpus} must be greater than 0 and at most 1024"));
                }
            }
            let h = &app.health;
            if let Some(p) = &h.path {
                if !p.starts_with('/') {
                    v.err(format!("{base}.health.path"), format!("{p:?} must start with '/'"));
                }
            }
            if h.interval.is_zero() {
                v.err(format!("{base}.health.interval"), "must be greater than 0s");
            }
            if h.timeout.is_zero() {
                v.err(format!("{base}.health.timeout"), "must be greater than 0s");
            }
            if h.healthy_threshold == 0 {
                v.err(format!("{base}.health.healthy_threshold"), "must be at least 1");
            }
            if h.unhealthy_threshold == 0 {
                v.err(format!("{base}.health.unhealthy_threshold"), "must be at least 1");
            }
            if let Some(access) = &app.access {
                for (field, list) in [("allow", &access.allow), ("trusted_proxies", &access.trusted_proxies)] {
                    for (i, net) in list.iter().enumerate() {
                        if parse_net(net).is_none() {
                            v.err(
                                format!("{base}.access.{field}[{i}]"),
                                format!("{net:?} is not an address or network like \"10.0.0.0/16\""),
                            );
                        }
                    }
                }
                let mut names: Vec<(String, &String)> = access
                    .api_keys
                    .iter()
                    .enumerate()
                    .map(|(i, n)| (format!("{base}.access.api_keys[{i}]"), n))
                    .collect();
                names.extend(access.basic_auth.iter().map(|(u, n)| (format!("{base}.access.basic_auth.{u}"), n)));
                for (key, n) in names {
                    if !is_mapped_secret_name(n) {
                        v.err(
                            &key,
                            format!("{n:?} must name a secret (upper-case mapped name like API_KEY), not hold a value"),
                        );
                    } else if !self.has_secrets() {
                        v.err(&key, "names a secret but [secrets] has neither path nor parameters");
                    }
                }
                for user in access.basic_auth.keys() {
                    if user.is_empty() || user.contains(':') {
                        v.err(
                            format!("{base}.access.basic_auth"),
                            format!("user name {user:?} must be non-empty and contain no ':'"),
                        );
                    }
                }
            }
            let r = &app.restart;
            if r.initial_backoff.is_zero() {
                v.err(format!("{base}.restart.initial_backoff"), "must be greater than 0s (a crash loop would spin)");
            }
            if r.max_backoff < r.initial_backoff {
                v.err(
                    format!("{base}.restart.max_backoff"),
                    format!("{} is less than initial_backoff {}", r.max_backoff, r.initial_backoff),
                );
            }
        }
        v.problems
    }

    /// The ACME settings with defaults filled in (only meaningful when mode is acme).
    pub fn acme(&self) -> AcmeConfig {
        self.tls.acme.clone().unwrap_or_default()
    }

    /// Whether any secrets are configured at all.
    pub fn has_secrets(&self) -> bool {
        self.secrets.path.is_some() || !self.secrets.parameters.is_empty()
    }
}

#[derive(Default)]
struct Validation {
    problems: Vec<(String, String)>,
}

impl Validation {
    fn err(&mut self, key: impl Into<String>, msg: impl Into<String>) {
        self.problems.push((key.into(), msg.into()));
    }
    fn socket_addr(&mut self, key: &str, value: &str) {
        if value.parse::<SocketAddr>().is_err() {
            self.err(key, format!("{value:?} is not an address like \"0.0.0.0:443\" or \"[::]:443\""));
        }
    }
}

/// App names become container names and journald field values: keep them boring.
fn check_app_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > 63 {
        return Err("must be 1 to 63 characters");
    }
    if !name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') {
        return Err("may contain only a-z, 0-9 and '-'");
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err("must not start or end with '-'");
    }
    Ok(())
}

/// A DNS name a certificate can carry. Wildcards need DNS-01, which berth does not do, so
/// they are refused for ACME; a self-signed certificate may carry them.
fn check_domain(d: &str, allow_wildcard: bool) -> Result<(), &'static str> {
    let name = match d.strip_prefix("*.") {
        Some(rest) if allow_wildcard => rest,
        Some(_) => return Err("is a wildcard; ACME HTTP-01 cannot validate wildcards"),
        None => d,
    };
    if name.is_empty() || name.len() > 253 {
        return Err("is not a domain name");
    }
    if name.parse::<std::net::IpAddr>().is_ok() {
        return Err("is an IP address; certificates here are for domain names");
    }
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err("is not a valid domain name (labels of a-z, 0-9, '-', separated by dots)");
        }
    }
    Ok(())
}

/// `"host/prefix"` → (lower-cased host, prefix starting with '/').
pub fn parse_route(r: &str) -> Result<(String, String), &'static str> {
    let Some(slash) = r.find('/') else {
        return Err("must be \"host/prefix\", e.g. \"api.example.com/\"");
    };
    let (host, prefix) = r.split_at(slash);
    if host.is_empty() {
        return Err("has no host; write \"host/prefix\", e.g. \"api.example.com/\"");
    }
    check_domain(host, false).map_err(|_| "has an invalid host")?;
    if prefix.contains(char::is_whitespace) || prefix.contains('?') || prefix.contains('#') {
        return Err("has an invalid path prefix");
    }
    Ok((host.to_ascii_lowercase(), prefix.to_string()))
}

/// `10.0.0.0/16`, or a bare address meaning just that host.
pub fn parse_net(s: &str) -> Option<ipnet::IpNet> {
    s.parse::<ipnet::IpNet>().ok().or_else(|| s.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from))
}

fn is_env_name(k: &str) -> bool {
    let mut chars = k.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn is_mapped_secret_name(k: &str) -> bool {
    !k.is_empty() && k.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

/// The environment variable name for a parameter fetched under `path`, as SPEC defines it:
/// the part after `path`, `/` → `_`, anything else outside `[A-Za-z0-9_]` → `_`, upper-cased.
pub fn env_name_under_path(path: &str, name: &str) -> String {
    let rest = name.strip_prefix(path).unwrap_or(name);
    sanitize_env(rest.trim_start_matches('/'))
}

/// The environment variable name for an explicitly listed parameter: its last segment.
pub fn env_name_for_parameter(name: &str) -> String {
    sanitize_env(name.rsplit('/').next().unwrap_or(name))
}

fn sanitize_env(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c.to_ascii_uppercase() } else { '_' }).collect()
}

/// `"512m"` → bytes. Suffixes b, k, m, g (powers of 1024), as `docker run --memory` takes.
pub fn parse_memory(s: &str) -> Result<i64, &'static str> {
    let s = s.trim().to_ascii_lowercase();
    let (num, mult) = match s.chars().last() {
        Some('b') => (&s[..s.len() - 1], 1),
        Some('k') => (&s[..s.len() - 1], 1 << 10),
        Some('m') => (&s[..s.len() - 1], 1 << 20),
        Some('g') => (&s[..s.len() - 1], 1 << 30),
        Some(c) if c.is_ascii_digit() => (&s[..], 1),
        _ => return Err("is not a size like \"512m\" or \"2g\""),
    };
    let n: i64 = num.parse().map_err(|_| "is not a size like \"512m\" or \"2g\"")?;
    n.checked_mul(mult).ok_or("is too large")
}

// ---------------------------------------------------------------------------------------
// Locating keys in the source text
// ---------------------------------------------------------------------------------------

/// Maps a key path back to where it is written. Parsing the text a second time with spans
/// kept is cheap (the file is small) and keeps the typed schema free of `Spanned<T>` noise.
struct Locator<'a> {
    src: &'a str,
    doc: Option<toml::Spanned<toml::de::DeTable<'a>>>,
}

impl<'a> Locator<'a> {
    fn new(src: &'a str) -> Self {
        Locator { src, doc: toml::de::DeTable::parse(src).ok() }
    }

    fn syntax(&self, e: &toml::de::Error) -> Problem {
        Problem {
            key: String::new(),
            position: e.span().map(|s| self.line_col(s.start)),
            message: format!("TOML syntax: {}", e.message().trim()),
        }
    }

    fn line_col(&self, offset: usize) -> (usize, usize) {
        let before = &self.src[..offset.min(self.src.len())];
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        (line, col)
    }

    /// Position of the deepest part of `key` that exists in the file: a missing key is
    /// reported where its table is, which is where the operator has to add it.
    fn position_of(&self, key: &str) -> Option<(usize, usize)> {
        let doc = self.doc.as_ref()?;
        let mut best: Option<usize> = None;
        let mut table: Option<&toml::de::DeTable> = Some(doc.get_ref());
        let mut value: Option<&toml::de::DeValue> = None;
        for seg in split_key_path(key) {
            let found = match (seg, table, value) {
                (Seg::Key(k), Some(t), _) => t.get_key_value(k).map(|(key, val)| {
                    best = Some(key.span().start);
                    val
                }),
                (Seg::Index(i), _, Some(toml::de::DeValue::Array(a))) => a.get(i).inspect(|val| {
                    best = Some(val.span().start);
                }),
                _ => None,
            };
            let Some(val) = found else { break };
            value = Some(val.get_ref());
            table = match val.get_ref() {
                toml::de::DeValue::Table(t) => Some(t),
                _ => None,
            };
        }
        best.map(|o| self.line_col(o))
    }
}

enum Seg<'k> {
    Key(&'k str),
    Index(usize),
}

/// `apps.web.routes[1]` → [Key(apps), Key(web), Key(routes), Index(1)]. App names cannot
/// contain dots or brackets, and env names cannot either, so a plain split is exact.
fn split_key_path(key: &str) -> Vec<Seg<'_>> {
    let mut out = Vec::new();
    for part in key.split('.').filter(|p| !p.is_empty()) {
        let mut rest = part;
        if let Some(b) = rest.find('[') {
            out.push(Seg::Key(&rest[..b]));
            rest = &rest[b..];
            while let Some(stripped) = rest.strip_prefix('[') {
                let end = stripped.find(']').unwrap_or(stripped.len());
                if let Ok(i) = stripped[..end].parse() {
                    out.push(Seg::Index(i));
                }
                rest = stripped.get(end + 1..).unwrap_or("");
            }
        } else {
            out.push(Seg::Key(rest));
        }
    }
    out
}

/// The EAB MAC key from its base64url text (CAs print it with or without padding). The
/// error never quotes the value: it is a secret.
pub fn eab_hmac_key_bytes(text: &str) -> Result<zeroize::Zeroizing<Vec<u8>>, String> {
    use base64::prelude::{Engine, BASE64_URL_SAFE_NO_PAD};
    let bytes = BASE64_URL_SAFE_NO_PAD.decode(text.trim().trim_end_matches('=')).map_err(|_| {
        "is not base64url (the alphabet A-Z a-z 0-9 - _); copy the key exactly as your CA shows it".to_owned()
    })?;
    if bytes.is_empty() {
        return Err("is empty".into());
    }
    Ok(zeroize::Zeroizing::new(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[agent]
state_dir = "/var/lib/berth"
drain_delay = "1s"

[secrets]
path = "/myapp/prod/"
parameters = ["/shared/GITHUB_TOKEN"]

[tls]
mode = "acme"
domains = ["api.example.com"]
[tls.acme]
contact = ["mailto:ops@example.com"]

[apps.web]
image = "web:latest"
port = 8050
routes = ["api.example.com/"]
"#;

    fn problems(src: &str) -> Vec<Problem> {
        Config::parse(src).expect_err("config should be invalid")
    }

    #[test]
    fn good_config_parses_with_defaults() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.agent.drain_delay, Dur(Duration::from_secs(1)));
        assert_eq!(c.agent.drain_timeout, Dur::secs(30));
        assert_eq!(c.apps["web"].health.healthy_threshold, 2);
        assert_eq!(c.apps["web"].secrets, SecretSelection::All);
        assert_eq!(c.tls.mode, TlsMode::Acme);
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let src = GOOD.replace("port = 8050", "port = 8050\nimgae = \"x\"");
        let p = problems(&src);
        assert_eq!(p.len(), 1);
        assert!(p[0].message.contains("unknown field `imgae`"), "{p:?}");
        assert_eq!(p[0].key, "apps.web.imgae");
        assert_eq!(p[0].position.map(|x| x.0), Some(19));
    }

    #[test]
    fn semantic_problems_are_all_reported_and_located() {
        let src = GOOD
            .replace("port = 8050", "port = 0")
            .replace("routes = [\"api.example.com/\"]", "routes = [\"api.example.com/\", \"/nohost\"]");
        let p = problems(&src);
        let keys: Vec<_> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["apps.web.port", "apps.web.routes[1]"]);
        assert_eq!(p[0].position, Some((18, 1)));
        assert_eq!(p[1].position.map(|x| x.0), Some(19));
    }

    #[test]
    fn refresh_interval_is_zero_or_between_a_second_and_a_week() {
        for ok in ["0s", "1s", "5m", "7days"] {
            let src = GOOD.replace("parameters = [", &format!("refresh_interval = \"{ok}\"\nparameters = ["));
            assert!(Config::parse(&src).is_ok(), "{ok} should be accepted");
        }
        for bad in ["500ms", "8days", "500000000000years"] {
            let src = GOOD.replace("parameters = [", &format!("refresh_interval = \"{bad}\"\nparameters = ["));
            let p = problems(&src);
            assert_eq!(p.len(), 1, "{bad}: {p:?}");
            assert_eq!(p[0].key, "secrets.refresh_interval");
            assert_eq!(p[0].position.map(|x| x.0), Some(8), "{bad}: {p:?}");
            assert!(p[0].message.contains("between 1s and 7days"), "{bad}: {p:?}");
        }
    }

    #[test]
    fn eab_keys_come_as_a_pair_and_the_key_is_never_printed() {
        let with = |extra: &str| {
            GOOD.replace(
                "contact = [\"mailto:ops@example.com\"]",
                &format!("contact = [\"mailto:ops@example.com\"]\n{extra}"),
            )
        };
        let key = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W";
        let c = Config::parse(&with(&format!("eab_kid = \"kid-1\"\neab_hmac_key = \"{key}\""))).unwrap();
        assert_eq!(c.acme().eab_kid.as_deref(), Some("kid-1"));
        assert!(!format!("{:?}", c.acme()).contains(key), "Debug must redact the MAC key");
        let c = Config::parse(&with("eab_kid = \"kid-1\"\neab_hmac_key_parameter = \"/ca/eab-key\"")).unwrap();
        assert_eq!(c.acme().eab_hmac_key_parameter.as_deref(), Some("/ca/eab-key"));

        let keys = |extra: &str| problems(&with(extra)).into_iter().map(|p| (p.key, p.message)).collect::<Vec<_>>();
        let p = keys("eab_kid = \"kid-1\"");
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].0 == "tls.acme.eab_kid" && p[0].1.contains("eab_hmac_key"), "{p:?}");
        let p = keys(&format!("eab_hmac_key = \"{key}\""));
        assert!(p.len() == 1 && p[0].0 == "tls.acme.eab_hmac_key" && p[0].1.contains("eab_kid"), "{p:?}");
        let p = keys(&format!("eab_kid = \"k\"\neab_hmac_key = \"{key}\"\neab_hmac_key_parameter = \"/x\""));
        assert!(p.len() == 1 && p[0].1.contains("not both"), "{p:?}");
        let p = keys("eab_kid = \"k\"\neab_hmac_key = \"not base64 +/ at all!\"");
        assert!(p.len() == 1 && p[0].0 == "tls.acme.eab_hmac_key" && p[0].1.contains("base64url"), "{p:?}");
        assert!(!p[0].1.contains("at all"), "the message must not quote the secret: {p:?}");
        // Padding, as some CAs print it, is accepted.
        assert_eq!(eab_hmac_key_bytes("YWJj").unwrap().as_slice(), b"abc");
        assert_eq!(eab_hmac_key_bytes("YWI=").unwrap().as_slice(), b"ab");
    }

    #[test]
    fn env_name_mapping_follows_the_spec() {
        assert_eq!(env_name_under_path("/myapp/prod/", "/myapp/prod/db/password"), "DB_PASSWORD");
        assert_eq!(env_name_under_path("/myapp/prod", "/myapp/prod/api-key.v2"), "API_KEY_V2");
        assert_eq!(env_name_for_parameter("/aws/reference/secretsmanager/myapp/db"), "DB");
        assert_eq!(env_name_for_parameter("/shared/GITHUB_TOKEN"), "GITHUB_TOKEN");
    }

    #[test]
    fn key_paths_split_into_segments() {
        let segs = split_key_path("apps.web.routes[1]");
        assert!(matches!(segs[..], [Seg::Key("apps"), Seg::Key("web"), Seg::Key("routes"), Seg::Index(1)]));
    }

    #[test]
    fn memory_sizes_parse() {
        assert_eq!(parse_memory("512m"), Ok(512 << 20));
        assert_eq!(parse_memory("2g"), Ok(2 << 30));
        assert!(parse_memory("lots").is_err());
    }
}
