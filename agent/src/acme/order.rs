//! One ACME order, start to finish: HTTP-01 for every domain through the `:80` responder,
//! a fresh P-256 key, the chain. And what a failure means for the next attempt.

use std::fmt;
use std::time::{Duration, SystemTime};

use instant_acme::{
    Account, AuthorizationStatus, CertificateIdentifier, ChallengeType, Identifier, NewOrder, OrderStatus, RetryPolicy,
};

use super::cert::{new_key_and_csr, Issued};
use berth_proxy::challenge::ChallengeResponder;

/// How long the CA may take to validate and to issue. Let's Encrypt takes seconds; a CA
/// that takes longer than this is retried from a fresh order later.
const VALIDATION_TIMEOUT: Duration = Duration::from_secs(120);
const ISSUANCE_TIMEOUT: Duration = Duration::from_secs(120);

/// Why an attempt failed, sorted by what the retry loop must do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailureKind {
    /// Network, 5xx, timeouts, a nonce rejected more often than instant-acme retries:
    /// plain capped backoff.
    Transient,
    /// The CA could not validate a domain (DNS, firewall, wrong instance). Retrying fast
    /// only burns the CA's failed-validation limit (Let's Encrypt: 5 per hour).
    Validation,
    /// The CA said "too many": wait as long as it says.
    RateLimited,
    /// The CA no longer knows our account (deactivated, or a CA reset): make a new one.
    AccountGone,
}

#[derive(Debug)]
pub(crate) struct Failure {
    pub kind: FailureKind,
    pub message: String,
    /// When the CA said to come back (`Retry-After`, or an order's polling hint).
    pub retry_at: Option<SystemTime>,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl Failure {
    pub(crate) fn transient(message: impl Into<String>) -> Failure {
        Failure { kind: FailureKind::Transient, message: message.into(), retry_at: None }
    }

    /// Sorts an instant-acme error. `context` says which step failed, for the log line.
    pub(crate) fn from_acme(context: &str, e: instant_acme::Error) -> Failure {
        let (kind, retry_at) = match &e {
            instant_acme::Error::Api(p) => (kind_of_problem(p.r#type.as_deref()), None),
            instant_acme::Error::Timeout(Some(at)) => {
                let wait = super::http::cap_retry_after(at.saturating_duration_since(std::time::Instant::now()));
                (FailureKind::Transient, Some(SystemTime::now() + wait))
            }
            _ => (FailureKind::Transient, None),
        };
        Failure { kind, message: format!("{context}: {}", error_chain(&e)), retry_at }
    }
}

/// RFC 8555 §6.7 problem types, by what they mean for a retry.
fn kind_of_problem(t: Option<&str>) -> FailureKind {
    let Some(t) = t.and_then(|t| t.strip_prefix("urn:ietf:params:acme:error:")) else {
        return FailureKind::Transient;
    };
    match t {
        "rateLimited" => FailureKind::RateLimited,
        "accountDoesNotExist" => FailureKind::AccountGone,
        "unauthorized" | "connection" | "dns" | "incorrectResponse" | "caa" | "tls" | "rejectedIdentifier" => {
            FailureKind::Validation
        }
        _ => FailureKind::Transient,
    }
}

/// Did a newOrder naming the certificate it replaces fail over that name, so that the same
/// order without it may succeed?
fn refused_replaces(e: &instant_acme::Error) -> bool {
    match e {
        // Refused outright: another order already replaced that certificate, say.
        instant_acme::Error::Api(p) => kind_of_problem(p.r#type.as_deref()) == FailureKind::Transient,
        // Created, but without the field: a CA that offers `renewalInfo` yet ignores
        // `replaces` (Pebble 2.4 does). instant-acme rejects such an order, and says so only
        // in this message; without this, every renewal would fail the same way until the
        // certificate expired. The order left behind expires unused at the CA.
        instant_acme::Error::Other(e) => e.to_string().starts_with("replaces field mismatch"),
        _ => false,
    }
}

/// An error with its sources, on one line: hyper's "client error (Connect)" alone says nothing.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    s
}

/// Removes the tokens it served when the order is over, whichever way it ends.
struct Tokens<'a> {
    responder: &'a ChallengeResponder,
    tokens: Vec<String>,
}

impl Drop for Tokens<'_> {
    fn drop(&mut self) {
        for t in &self.tokens {
            self.responder.remove(t);
        }
    }
}

/// Orders one certificate for all of `domains`. `replaces` is the ARI identifier of the
/// certificate this one succeeds (only passed when the CA offers ARI).
pub(crate) async fn order(
    account: &Account,
    domains: &[String],
    replaces: Option<&str>,
    responder: &ChallengeResponder,
) -> Result<Issued, Failure> {
    let label = domains.join(",");
    let identifiers: Vec<Identifier> = domains.iter().map(|d| Identifier::Dns(d.clone())).collect();
    let replaces_id = replaces.and_then(ari_identifier);
    let mut new_order = NewOrder::new(&identifiers);
    if let Some(id) = replaces_id.clone() {
        new_order = new_order.replaces(id);
    }
    tracing::info!(domain = %label, replaces = replaces.unwrap_or(""), "placing ACME order");
    let mut order = match account.new_order(&new_order).await {
        Ok(o) => o,
        // The certificate still has to be renewed whatever the CA made of `replaces`, so ask
        // again without it.
        Err(e) if replaces_id.is_some() && refused_replaces(&e) => {
            tracing::warn!(domain = %label, error = %e, "the CA did not take the ARI `replaces` field; ordering without it");
            account
                .new_order(&NewOrder::new(&identifiers))
                .await
                .map_err(|e| Failure::from_acme("creating the order", e))?
        }
        Err(e) => return Err(Failure::from_acme("creating the order", e)),
    };

    let mut served = Tokens { responder, tokens: Vec::new() };
    let mut authorizations = order.authorizations();
    while let Some(result) = authorizations.next().await {
        let mut authz = result.map_err(|e| Failure::from_acme("fetching an authorization", e))?;
        let ident = authz.identifier().to_string();
        match authz.status {
            AuthorizationStatus::Pending => {}
            // Valid from an earlier order of this account (CAs reuse them for a while).
            AuthorizationStatus::Valid => continue,
            other => {
                return Err(Failure {
                    kind: FailureKind::Validation,
                    message: format!("authorization for {ident} is {other:?}"),
                    retry_at: None,
                })
            }
        }
        let mut challenge = authz.challenge(ChallengeType::Http01).ok_or_else(|| Failure {
            kind: FailureKind::Validation,
            message: format!("the CA offers no http-01 challenge for {ident}"),
            retry_at: None,
        })?;
        let key_authorization = challenge.key_authorization();
        responder.insert(&challenge.token, key_authorization.as_str());
        served.tokens.push(challenge.token.clone());
        tracing::debug!(domain = %ident, "serving the http-01 challenge");
        challenge.set_ready().await.map_err(|e| Failure::from_acme(&format!("starting validation of {ident}"), e))?;
    }

    // First look after 100 ms (a CA that validates at once, as Pebble does, is done by
    // then), then 1.5x: about ten polls in the first 10 s, far below any CA's request limits.
    let policy = RetryPolicy::new().initial_delay(Duration::from_millis(100)).backoff(1.5).timeout(VALIDATION_TIMEOUT);
    let status = order.poll_ready(&policy).await.map_err(|e| Failure::from_acme("waiting for validation", e))?;
    if status != OrderStatus::Ready {
        return Err(Failure {
            kind: FailureKind::Validation,
            message: format!("validation failed: {}", validation_errors(&mut order).await),
            retry_at: None,
        });
    }

    let (key_pem, csr) =
        new_key_and_csr(domains).map_err(|e| Failure::transient(format!("creating the key and CSR: {e:#}")))?;
    order.finalize_csr(&csr).await.map_err(|e| Failure::from_acme("finalizing the order", e))?;
    // Often the finalize answer already says "valid": download at once instead of
    // sleeping first, which is all `poll_certificate` can do.
    let ready = order.certificate().await.map_err(|e| Failure::from_acme("downloading the certificate", e))?;
    let chain = match ready {
        Some(chain) => chain,
        None => {
            let policy =
                RetryPolicy::new().initial_delay(Duration::from_millis(100)).backoff(1.5).timeout(ISSUANCE_TIMEOUT);
            order.poll_certificate(&policy).await.map_err(|e| Failure::from_acme("downloading the certificate", e))?
        }
    };
    drop(served);
    Issued::from_pem(chain, key_pem).map_err(|e| Failure::transient(format!("the CA's certificate is unusable: {e:#}")))
}

/// What the CA said about each failed challenge, e.g. "a.example.com: connection refused".
async fn validation_errors(order: &mut instant_acme::Order) -> String {
    let mut out = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authz)) = authorizations.next().await {
        let ident = authz.identifier().to_string();
        if authz.refresh().await.is_err() {
            continue;
        }
        for c in &authz.challenges {
            if let Some(e) = &c.error {
                out.push(format!("{ident}: {e}"));
            }
        }
    }
    if out.is_empty() {
        "the order became invalid".into()
    } else {
        out.join("; ")
    }
}

/// `aki.serial` (the form [`super::cert::CertInfo::ari_id`] keeps) back into instant-acme's type.
pub(crate) fn ari_identifier(id: &str) -> Option<CertificateIdentifier<'_>> {
    let (aki, serial) = id.split_once('.')?;
    Some(CertificateIdentifier { authority_key_identifier: aki.into(), serial: serial.into() })
}

/// A key authorization's public half: the account key's RFC 7638 JWK thumbprint, computed
/// from the key alone, so every instance of a fleet can answer HTTP-01 statelessly before
/// (or without) talking to the CA.
pub(crate) fn thumbprint(key: &rustls::pki_types::PrivatePkcs8KeyDer<'_>) -> anyhow::Result<String> {
    use base64::prelude::{Engine, BASE64_URL_SAFE_NO_PAD};
    use sha2::Digest;
    let key = rcgen::KeyPair::try_from(key)?;
    let raw = key.public_key_raw();
    // Uncompressed P-256 point: 0x04 || x (32) || y (32).
    anyhow::ensure!(raw.len() == 65 && raw[0] == 4, "the account key is not an uncompressed P-256 key");
    let b64 = |b: &[u8]| BASE64_URL_SAFE_NO_PAD.encode(b);
    // RFC 7638 §3: the required members, sorted, no whitespace.
    let jwk = format!(r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#, b64(&raw[1..33]), b64(&raw[33..]));
    Ok(b64(&sha2::Sha256::digest(jwk.as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_sort_by_retry_policy() {
        let k = |t: &str| kind_of_problem(Some(t));
        assert_eq!(k("urn:ietf:params:acme:error:rateLimited"), FailureKind::RateLimited);
        assert_eq!(k("urn:ietf:params:acme:error:connection"), FailureKind::Validation);
        assert_eq!(k("urn:ietf:params:acme:error:badNonce"), FailureKind::Transient);
        assert_eq!(k("urn:ietf:params:acme:error:accountDoesNotExist"), FailureKind::AccountGone);
        assert_eq!(kind_of_problem(None), FailureKind::Transient);
    }
}
