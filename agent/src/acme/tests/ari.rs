//! ARI (RFC 9773): renewal inside the CA's window, and `replaces` on the renewal order.
//!
//! Debian's Pebble (2.4) has no `renewalInfo`, and no CA we can run here has, so these tests
//! put a small HTTPS front of their own before a real Pebble. The front adds `renewalInfo`
//! to Pebble's directory and answers it with a window the test chooses, reads the
//! `replaces` field of every newOrder, and plays one of three CAs with it (see
//! [`Replaces`]). Everything else goes on to Pebble with its `Host` unchanged: Pebble builds
//! its URLs from `Host` and checks each JWS `url` against it, so accounts, orders,
//! validation and issuance all stay Pebble's own. The fake part is only what ARI adds.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

use ::http::{header::CONTENT_LENGTH, Method, Request, Response, StatusCode};
use base64::prelude::{Engine, BASE64_URL_SAFE_NO_PAD};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use x509_parser::extensions::ParsedExtension;

use super::*;

/// What the front saw, in order.
#[derive(Default, Debug)]
struct Seen {
    /// Certificate identifiers asked about at `renewalInfo`.
    asked: Vec<String>,
    /// The `replaces` field of each newOrder (`None`: the order had none).
    orders: Vec<Option<String>>,
}

/// The page the front says explains a later certificate's window.
const EXPLANATION: &str = "https://ca.example/incidents/renew-early";

/// What the CA in front does with a newOrder's `replaces`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Replaces {
    /// Takes it and reflects it in the order, as RFC 9773 asks (Let's Encrypt does).
    Honours,
    /// Refuses the order with `alreadyReplaced`, as when another order already replaced
    /// that certificate.
    RefusesOnce,
    /// Creates the order and leaves the field out: what Pebble 2.4 does on its own.
    Ignores,
}

struct AriFront {
    /// Pebble's API, `127.0.0.1:port`.
    pebble: String,
    /// This front's own address, as clients name it in `Host`.
    host: String,
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    seen: Mutex<Seen>,
    replaces: Replaces,
    /// For [`Replaces::RefusesOnce`]: not refused yet.
    refusal_due: AtomicBool,
}

impl AriFront {
    /// Serves on a free port until `stop`, with Pebble's own API certificate (which names
    /// 127.0.0.1 and chains to the CA the tests already trust).
    async fn start(pebble: &Pebble, replaces: Replaces, stop: CancellationToken) -> Arc<AriFront> {
        let (_, cert, key, ca) = pebble_env().expect("pebble is configured");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(&cert).unwrap().map(Result::unwrap).collect();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&key).unwrap();
        let mut tls = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];

        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&ca).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let to_pebble = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector =
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(to_pebble).https_only().enable_http1().build();

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front = Arc::new(AriFront {
            pebble: format!("127.0.0.1:{}", pebble.listen),
            host: listener.local_addr().unwrap().to_string(),
            client: Client::builder(TokioExecutor::new()).build(connector),
            seen: Mutex::default(),
            replaces,
            refusal_due: AtomicBool::new(replaces == Replaces::RefusesOnce),
        });
        tokio::spawn(server::serve(
            listener,
            Some(Arc::new(tls)),
            Limits::default(),
            front.clone(),
            stop,
            Duration::from_millis(100),
        ));
        front
    }

    fn directory(&self) -> String {
        format!("https://{}/dir", self.host)
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap()
    }

    /// The window for `id`: open (and already past its start) for the first certificate
    /// anyone asks about, a month away for every later one, with [`EXPLANATION`].
    fn renewal_info(&self, id: &str) -> Response<berth_proxy::Body> {
        let mut seen = self.seen();
        let first = seen.asked.first().is_none_or(|f| f == id);
        seen.asked.push(id.to_owned());
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        let (start, end) = if first { (now - 2 * hour, now - hour) } else { (now + 720 * hour, now + 744 * hour) };
        let mut body = serde_json::json!({"suggestedWindow": {
            "start": humantime::format_rfc3339_seconds(start).to_string(),
            "end": humantime::format_rfc3339_seconds(end).to_string(),
        }});
        if !first {
            body["explanationURL"] = EXPLANATION.into();
        }
        Response::builder()
            .header("content-type", "application/json")
            .header("retry-after", "60")
            .body(berth_proxy::full_body(body.to_string()))
            .unwrap()
    }
}

impl server::Handler for AriFront {
    async fn handle(
        &self,
        req: Request<hyper::body::Incoming>,
        _conn: &server::ConnInfo,
    ) -> Response<berth_proxy::Body> {
        let path = req.uri().path().to_owned();
        if req.method() == Method::GET {
            if let Some(id) = path.strip_prefix("/renewal-info/") {
                return self.renewal_info(id);
            }
        }
        let (mut parts, body) = req.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        let mut replaces = None;
        if parts.method == Method::POST && path == "/order-plz" {
            replaces = order_replaces(&body);
            self.seen().orders.push(replaces.clone());
            if replaces.is_some() && self.refusal_due.swap(false, Ordering::SeqCst) {
                let problem = serde_json::json!({
                    "type": "urn:ietf:params:acme:error:alreadyReplaced",
                    "detail": "this certificate has already been replaced",
                    "status": 409,
                });
                return Response::builder()
                    .status(StatusCode::CONFLICT)
                    .header("content-type", "application/problem+json")
                    .body(berth_proxy::full_body(problem.to_string()))
                    .unwrap();
            }
        }

        // On to Pebble, `Host` (this front) unchanged.
        let pq = parts.uri.path_and_query().map_or("/", |pq| pq.as_str()).to_owned();
        parts.uri = format!("https://{}{pq}", self.pebble).parse().unwrap();
        let resp = self.client.request(Request::from_parts(parts, Full::new(body))).await.expect("pebble answers");
        let (mut parts, body) = resp.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        let mut json = |edit: &dyn Fn(&mut serde_json::Value)| {
            let mut v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            edit(&mut v);
            parts.headers.remove(CONTENT_LENGTH);
            Bytes::from(v.to_string())
        };
        let body = match (path.as_str(), replaces) {
            ("/dir", _) => json(&|dir| dir["renewalInfo"] = format!("https://{}/renewal-info", self.host).into()),
            ("/order-plz", Some(id)) if self.replaces != Replaces::Ignores && parts.status.is_success() => {
                json(&|order| order["replaces"] = id.clone().into())
            }
            _ => body.clone(),
        };
        Response::from_parts(parts, berth_proxy::full_body(body))
    }
}

/// The `replaces` member of a newOrder's JWS payload.
fn order_replaces(jws: &[u8]) -> Option<String> {
    let jws: serde_json::Value = serde_json::from_slice(jws).expect("a JWS in JSON");
    let payload = BASE64_URL_SAFE_NO_PAD.decode(jws["payload"].as_str().expect("a payload")).expect("base64url");
    let payload: serde_json::Value = serde_json::from_slice(&payload).expect("a JSON payload");
    payload.get("replaces").map(|r| r.as_str().expect("replaces is a string").to_owned())
}

/// RFC 9773 §4.1, worked out here from the certificate rather than by berth's code:
/// base64url(AKI keyIdentifier) "." base64url(serial DER bytes).
fn ari_id_of(cert: &CertificateDer<'_>) -> String {
    let (_, x509) = x509_parser::parse_x509_certificate(cert).unwrap();
    let aki = x509
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => aki.key_identifier.as_ref().map(|k| k.0.to_vec()),
            _ => None,
        })
        .expect("Pebble's certificates have an AKI");
    format!("{}.{}", BASE64_URL_SAFE_NO_PAD.encode(aki), BASE64_URL_SAFE_NO_PAD.encode(x509.raw_serial()))
}

/// Orders a certificate through a front that plays `replaces`, lets the first
/// certificate's ARI window (already open) bring a renewal, and returns what the front saw,
/// the two certificates' identifiers, how many orders reached Pebble, and the status after.
/// `None` when Pebble is not set up (outside CI: skipped).
async fn renew_in_the_ari_window(
    replaces: Replaces,
    domain: &str,
) -> Option<(Seen, String, String, usize, AcmeStatus)> {
    let mut pebble = Pebble::configure(None, Some(0))?;
    pebble.start();
    let stop = CancellationToken::new();
    let responder = ChallengeResponder::new();
    serve_http01(pebble.http01, responder.clone(), stop.clone()).await;
    let front = AriFront::start(&pebble, replaces, stop.clone()).await;
    let dir = TestDir::new();
    let mut s = setup(&pebble, dir.path(), &[domain]);
    s.acme.directory = front.directory();
    let certs = CertStore::new();
    let handle = spawn(s, certs.clone(), responder, stop.clone());

    let first = wait_until("the first certificate", Duration::from_secs(30), || ordered_cert(&handle)).await;
    let first_id = ari_id_of(&certs.lookup(Some(domain)).unwrap().cert[0]);
    // The front says the first certificate's window is open: berth renews at once.
    let second = wait_until("the renewal in the ARI window", Duration::from_secs(30), || {
        ordered_cert(&handle).filter(|c| c.info.serial != first.info.serial)
    })
    .await;
    let second_id = ari_id_of(&certs.lookup(Some(domain)).unwrap().cert[0]);
    verify_served(&certs, domain, pebble.root());
    // The new certificate's window is a month away: the next renewal waits for it.
    let tomorrow = unix(SystemTime::now() + Duration::from_secs(86_400));
    let status = wait_until("the next renewal to be planned", Duration::from_secs(10), || {
        let status = handle.status();
        status.next_renewal.is_some_and(|t| t > tomorrow).then_some(status)
    })
    .await;
    assert_eq!(second.info.serial, status.certificate.as_ref().unwrap().info.serial);
    handle.stop().await;
    stop.cancel();
    let seen = std::mem::take(&mut *front.seen());
    Some((seen, first_id, second_id, pebble.orders(), status))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_in_the_ari_window_names_the_certificate_it_replaces() {
    let Some((seen, first_id, second_id, pebble_orders, status)) =
        renew_in_the_ari_window(Replaces::Honours, "ari.berth.test").await
    else {
        return;
    };
    assert_eq!(seen.asked.first(), Some(&first_id), "berth asks the CA about the certificate it serves: {seen:?}");
    // The first order replaced nothing; the renewal names the first certificate, which is
    // what makes Let's Encrypt exempt it from the weekly limit per name set.
    assert_eq!(seen.orders, vec![None, Some(first_id.clone())]);
    assert_eq!(pebble_orders, 2, "one order per certificate");
    assert_ne!(first_id, second_id);
    assert!(seen.asked.contains(&second_id), "berth asks about the new certificate too: {seen:?}");
    // Inside the window the front gave for the new certificate (30 to 31 days away), not at
    // two thirds of its lifetime (Pebble's certificates last years).
    let day = 86_400;
    let (now, next) = (unix(SystemTime::now()), status.next_renewal.unwrap());
    assert!((now + 30 * day - 60..=now + 31 * day).contains(&next), "next renewal {next}, now {now}: {status:?}");
    assert_eq!(status.renewal_basis.as_deref(), Some("ari window"));
    // What `berth status` shows an operator about why the window is where it is.
    assert_eq!(status.renewal_explanation.as_deref(), Some(EXPLANATION));
    assert_eq!(status.orders_error, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_refusing_replaces_still_gets_the_renewal_ordered() {
    let Some((seen, first_id, _, pebble_orders, status)) =
        renew_in_the_ari_window(Replaces::RefusesOnce, "ari-refused.berth.test").await
    else {
        return;
    };
    // The order naming the old certificate is refused; berth orders again at once without
    // `replaces`, since the certificate still has to be renewed.
    assert_eq!(seen.orders, vec![None, Some(first_id), None]);
    assert_eq!(pebble_orders, 2, "the refused order never reached Pebble; the plain one did");
    assert_eq!(status.orders_error, 0, "the refusal is handled inside the renewal, not counted as a failed one");
}

/// A CA that offers ARI windows but drops `replaces` from the order it creates. instant-acme
/// rejects that order; berth used to count it a failure and try the same again, so the
/// certificate would never have been renewed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_ignoring_replaces_still_gets_the_renewal_ordered() {
    let Some((seen, first_id, _, pebble_orders, status)) =
        renew_in_the_ari_window(Replaces::Ignores, "ari-ignored.berth.test").await
    else {
        return;
    };
    assert_eq!(seen.orders, vec![None, Some(first_id), None]);
    assert_eq!(pebble_orders, 3, "the order that lost `replaces` was created at the CA and left to expire");
    assert_eq!(status.orders_error, 0);
}
