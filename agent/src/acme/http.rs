//! The HTTP client instant-acme talks to the CA through.
//!
//! instant-acme's default client brings hyper-rustls with the platform verifier and its own
//! feature set; we turn that off and hand it this one instead, for three reasons:
//! - one TLS stack: rustls 0.23 with aws-lc-rs, the hyper-rustls and native roots the AWS
//!   SDK already compiles in;
//! - `tls.acme.ca_bundle`: extra roots for the ACME server's own certificate (a private CA,
//!   or Pebble in the tests) on top of the system's;
//! - `Retry-After`: instant-acme turns an error response into a `Problem` and drops its
//!   headers, so a rate-limit answer would lose the one thing that says how long to wait.
//!   We note it here, where the headers are still visible, for the retry loop to honour.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use bytes::Bytes;
use http::header::RETRY_AFTER;
use http_body_util::BodyExt;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use instant_acme::{BodyWrapper, BytesResponse, HttpClient};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// A CA that accepts the TCP connection and then says nothing must not stall renewal forever.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest wait a `Retry-After` can impose. A CA may say "a week" (or, broken, "year
/// 9999"); asking again after a day costs it one request, and a wait past this would only
/// leave a certificate to expire.
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// `badNonce` answers seen by this process.
pub(crate) static BAD_NONCES: AtomicU64 = AtomicU64::new(0);

/// The latest `Retry-After` the CA sent with an error response, shared with the retry loop.
#[derive(Clone, Default)]
pub(crate) struct RetryAfter(Arc<Mutex<Option<SystemTime>>>);

impl RetryAfter {
    /// Takes the noted time (clearing it), so an old answer never delays a later attempt.
    pub(crate) fn take(&self) -> Option<SystemTime> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    fn note(&self, at: SystemTime) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(at);
    }
}

pub(crate) struct AcmeHttp {
    client: Client<HttpsConnector<HttpConnector>, BodyWrapper<Bytes>>,
    retry_after: RetryAfter,
}

impl AcmeHttp {
    /// System roots plus the PEM certificates in `ca_bundle`, if given.
    pub(crate) fn new(ca_bundle: Option<&Path>, retry_after: RetryAfter) -> anyhow::Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        // A host without a CA store (a minimal image) still works with `ca_bundle` alone,
        // so missing or partly unreadable system roots are not an error here.
        let native = rustls_native_certs::load_native_certs();
        let (added, _ignored) = roots.add_parsable_certificates(native.certs);
        tracing::debug!(system_roots = added, "ACME client trust store");
        if let Some(path) = ca_bundle {
            let pem = std::fs::read(path).with_context(|| format!("reading tls.acme.ca_bundle {}", path.display()))?;
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<_, _>>()
                .with_context(|| format!("parsing tls.acme.ca_bundle {}", path.display()))?;
            anyhow::ensure!(!certs.is_empty(), "tls.acme.ca_bundle {} holds no PEM certificate", path.display());
            for cert in certs {
                roots
                    .add(cert)
                    .with_context(|| format!("tls.acme.ca_bundle {}: unusable certificate", path.display()))?;
            }
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        // `http://` directories are allowed by the config (a CA on a private network); RFC
        // 8555 wants https, which every public CA is.
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(AcmeHttp { client, retry_after })
    }

    /// A plain GET (the directory, for `berth check --online`), through the same path as the
    /// requests instant-acme makes: same timeouts, same handling of what the CA answers.
    pub(crate) async fn get(&self, url: &str) -> anyhow::Result<(http::StatusCode, Bytes)> {
        let req = http::Request::get(url).body(BodyWrapper::default()).context("not a URL")?;
        let mut rsp = self.request(req).await?;
        let body = rsp.body.into_bytes().await.map_err(|e| anyhow::anyhow!(e))?;
        Ok((rsp.parts.status, body))
    }
}

impl HttpClient for AcmeHttp {
    fn request(
        &self,
        req: http::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let fut = self.client.request(req);
        let retry_after = self.retry_after.clone();
        Box::pin(async move {
            // The body is read inside the timeout too: a stalled body is as bad as no answer.
            let exchange = async {
                let rsp = fut.await.map_err(|e| instant_acme::Error::Other(Box::new(e)))?;
                let (parts, body) = rsp.into_parts();
                let body = body.collect().await.map_err(|e| instant_acme::Error::Other(Box::new(e)))?.to_bytes();
                Ok::<_, instant_acme::Error>((parts, body))
            };
            let (parts, body) = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
                .await
                .map_err(|_| instant_acme::Error::Other(format!("no answer within {REQUEST_TIMEOUT:?}").into()))??;
            if parts.status == http::StatusCode::BAD_REQUEST && body.windows(8).any(|w| w == b"badNonce") {
                // instant-acme retries these itself with the fresh nonce from this answer;
                // counted so the tests can show rejections happened and were survived.
                BAD_NONCES.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("the CA rejected a nonce (badNonce); retrying with a fresh one");
            }
            let mut parts = parts;
            let said = parts.headers.get(RETRY_AFTER).map(|v| v.to_str().ok().and_then(parse_retry_after));
            match said {
                None => {}
                Some(Some(at)) => {
                    if parts.status.is_client_error() || parts.status.is_server_error() {
                        retry_after.note(at);
                    }
                    // instant-acme reads the header too (order polling, ARI) and adds it to
                    // the clock unchecked, which panics for a huge value: it gets the capped
                    // delay instead.
                    let d = at.duration_since(SystemTime::now()).unwrap_or_default();
                    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
                    parts.headers.insert(RETRY_AFTER, http::HeaderValue::from(secs));
                }
                Some(None) => {
                    parts.headers.remove(RETRY_AFTER);
                }
            }
            Ok(BytesResponse { parts, body: Box::new(body) })
        })
    }
}

/// RFC 9110 `Retry-After`: delay-seconds or an HTTP-date, as the moment to wait for, no
/// more than [`MAX_RETRY_AFTER`] from now.
pub(crate) fn parse_retry_after(value: &str) -> Option<SystemTime> {
    let value = value.trim();
    let now = SystemTime::now();
    let wait = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => httpdate_parse(value)?.duration_since(now).unwrap_or_default(),
    };
    Some(now + cap_retry_after(wait))
}

pub(crate) fn cap_retry_after(wait: Duration) -> Duration {
    wait.min(MAX_RETRY_AFTER)
}

/// IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the only form RFC 9110 says to send.
fn httpdate_parse(s: &str) -> Option<SystemTime> {
    let mut it = s.split_whitespace();
    let _weekday = it.next()?;
    let day: u64 = it.next()?.parse().ok()?;
    let month = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
        .iter()
        .position(|m| Some(*m) == it.clone().next())? as u64
        + 1;
    it.next();
    // The grammar's year has four digits; bounding it keeps the arithmetic below in range.
    let year: i64 = it.next()?.parse().ok().filter(|y| (1970..=9999).contains(y))?;
    let mut hms = it.next()?.split(':').map(|p| p.parse::<u64>().ok().filter(|v| *v < 60));
    let (h, m, sec) = (hms.next()??, hms.next()??, hms.next()??);
    if it.next()? != "GMT" || h >= 24 {
        return None;
    }
    let days = days_from_civil(year, month, day)?;
    let secs = u64::try_from(days).ok()? * 86_400 + h * 3600 + m * 60 + sec;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

/// Days since 1970-01-01 for a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u64, d: u64) -> Option<i64> {
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let (m, d) = (m as i64, d as i64);
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(era * 146_097 + doe - 719_468)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_seconds_and_dates() {
        let t = parse_retry_after("120").unwrap();
        let d = t.duration_since(SystemTime::now()).unwrap();
        assert!(d > Duration::from_secs(118) && d <= Duration::from_secs(120));
        let t = httpdate_parse("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(), 784_111_777);
        // A date in the past: no wait.
        let t = parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert!(t.duration_since(SystemTime::now()).unwrap_or_default() < Duration::from_secs(1));
        assert!(parse_retry_after("soon").is_none());
        assert!(parse_retry_after("Sun, 06 Foo 1994 08:49:37 GMT").is_none());
    }

    #[test]
    fn absurd_retry_after_is_capped_not_a_panic() {
        let in_at_most = |v: &str| parse_retry_after(v).unwrap().duration_since(SystemTime::now()).unwrap_or_default();
        for v in [&u64::MAX.to_string(), "18446744073709551", "Fri, 31 Dec 9999 23:59:59 GMT"] {
            let wait = in_at_most(v);
            assert!(wait <= MAX_RETRY_AFTER && wait > MAX_RETRY_AFTER - Duration::from_secs(5), "{v}: {wait:?}");
        }
        // Years outside the grammar are refused, not computed with.
        assert!(parse_retry_after("Fri, 31 Dec 99999999999999 23:59:59 GMT").is_none());
        assert!(parse_retry_after("Fri, 31 Dec -9223372036854775808 23:59:59 GMT").is_none());
    }

    /// instant-acme parses `Retry-After` itself, unchecked: what it gets must be capped.
    #[tokio::test]
    async fn the_header_instant_acme_sees_is_capped() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let rsp =
                format!("HTTP/1.1 429 Too Many Requests\r\nRetry-After: {}\r\nContent-Length: 0\r\n\r\n", u64::MAX);
            s.write_all(rsp.as_bytes()).await.unwrap();
        });
        let noted = RetryAfter::default();
        let client = AcmeHttp::new(None, noted.clone()).unwrap();
        let req = http::Request::get(format!("http://{addr}/")).body(BodyWrapper::default()).unwrap();
        let rsp = client.request(req).await.unwrap();
        let secs: u64 = rsp.parts.headers[RETRY_AFTER].to_str().unwrap().parse().unwrap();
        assert!(secs <= MAX_RETRY_AFTER.as_secs(), "{secs}");
        assert!(noted.take().is_some_and(|t| t <= SystemTime::now() + MAX_RETRY_AFTER));
    }
}
