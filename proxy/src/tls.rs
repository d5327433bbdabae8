//! Certificates served on `:443`, chosen by SNI, swapped atomically.
//!
//! The store starts with a self-signed certificate for the configured domains so `:443`
//! serves from the first second (an ALB does not verify its targets' certificates), and the
//! agent later swaps in ACME or file certificates. A swap affects only new handshakes;
//! established connections keep the certificate they negotiated, so nothing is dropped.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("generating a self-signed certificate: {0}")]
    SelfSigned(#[from] rcgen::Error),
    #[error("the private key is not usable: {0}")]
    Key(rustls::Error),
    #[error("no certificate in the PEM data")]
    NoCertificate,
    #[error("no private key in the PEM data")]
    NoKey,
    #[error("reading PEM: {0}")]
    Pem(String),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// An immutable set of certificates: exact names, wildcard names, and a default for
/// clients that send no (or an unknown) SNI, such as an ALB health check by IP.
#[derive(Default)]
struct CertSet {
    by_name: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

/// The resolver handed to rustls. Cloning shares the same store.
#[derive(Clone, Default)]
pub struct CertStore {
    current: Arc<ArcSwap<CertSet>>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = self.current.load();
        f.debug_struct("CertStore")
            .field("names", &set.by_name.keys().collect::<Vec<_>>())
            .field("has_default", &set.default.is_some())
            .finish()
    }
}

impl CertStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Installs `cert` for each of `names` (the first also becomes the default), keeping
    /// the certificates of other names. Lock-free for readers.
    pub fn install(&self, names: &[String], cert: Arc<CertifiedKey>) {
        self.current.rcu(|old| {
            let mut by_name = old.by_name.clone();
            for n in names {
                by_name.insert(n.to_ascii_lowercase(), cert.clone());
            }
            CertSet { by_name, default: Some(cert.clone()) }
        });
    }

    /// Drops the certificates of names not in `names` (a reload removed them from the
    /// config). The default certificate stays.
    pub fn retain(&self, names: &[String]) {
        let keep: Vec<String> = names.iter().map(|n| n.to_ascii_lowercase()).collect();
        self.current.rcu(|old| CertSet {
            by_name: old
                .by_name
                .iter()
                .filter(|(n, _)| keep.contains(n))
                .map(|(n, c)| (n.clone(), c.clone()))
                .collect(),
            default: old.default.clone(),
        });
    }

    /// The certificate a client asking for `sni` would get.
    pub fn lookup(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let set = self.current.load();
        let Some(name) = sni.map(|s| s.trim_end_matches('.').to_ascii_lowercase()) else {
            return set.default.clone();
        };
        if let Some(c) = set.by_name.get(&name) {
            return Some(c.clone());
        }
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(c) = set.by_name.get(&format!("*.{parent}")) {
                return Some(c.clone());
            }
        }
        set.default.clone()
    }

    /// A rustls server config using this store, TLS 1.2 and 1.3 only, ALPN h2 then http/1.1.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(self.clone()));
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }
}

impl std::fmt::Debug for CertSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.by_name.keys()).finish()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.lookup(hello.server_name())
    }
}

/// A certificate and key in PEM, as stored on disk or in SSM.
pub fn certified_key_from_pem(chain_pem: &[u8], key_pem: &[u8]) -> Result<Arc<CertifiedKey>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem(e.to_string()))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey,
        other => TlsError::Pem(other.to_string()),
    })?;
    certified_key(chain, key)
}

pub fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let signing_key = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key).map_err(TlsError::Key)?;
    Ok(Arc::new(CertifiedKey::new(chain, signing_key)))
}

/// A self-signed certificate (ECDSA P-256) for `names`; `localhost` if there are none.
/// Returned as PEM too, so a demo can hand it to curl's `--cacert`.
pub struct SelfSigned {
    pub cert_pem: String,
    pub key: Arc<CertifiedKey>,
}

pub fn self_signed(names: &[String]) -> Result<SelfSigned, TlsError> {
    let names = if names.is_empty() { vec!["localhost".to_string()] } else { names.to_vec() };
    let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::new(names.clone())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, format!("berth self-signed {}", names[0]));
    let cert = params.self_signed(&key_pair)?;
    let key_der = PrivateKeyDer::try_from(key_pair.serialize_der()).map_err(|e| TlsError::Pem(e.to_string()))?;
    let key = certified_key(vec![cert.der().clone()], key_der)?;
    Ok(SelfSigned { cert_pem: cert.pem(), key })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_prefers_exact_then_wildcard_then_default() {
        let store = CertStore::new();
        let a = self_signed(&["a.example.com".into()]).unwrap().key;
        let w = self_signed(&["*.example.com".into()]).unwrap().key;
        store.install(&["a.example.com".into()], a.clone());
        store.install(&["*.example.com".into()], w.clone());
        assert!(Arc::ptr_eq(&store.lookup(Some("A.example.com")).unwrap(), &a));
        assert!(Arc::ptr_eq(&store.lookup(Some("b.example.com")).unwrap(), &w));
        assert!(Arc::ptr_eq(&store.lookup(None).unwrap(), &w));
    }

    #[test]
    fn retain_drops_other_names_only() {
        let store = CertStore::new();
        let a = self_signed(&["a.test".into()]).unwrap().key;
        let b = self_signed(&["b.test".into()]).unwrap().key;
        store.install(&["a.test".into()], a.clone());
        store.install(&["b.test".into()], b.clone());
        store.retain(&["A.test".into()]);
        assert!(Arc::ptr_eq(&store.lookup(Some("a.test")).unwrap(), &a));
        // b.test now gets the default (the last installed), not its own entry.
        assert!(Arc::ptr_eq(&store.lookup(Some("b.test")).unwrap(), &b));
        assert!(!store.current.load().by_name.contains_key("b.test"));
    }

    #[test]
    fn pem_round_trip() {
        let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x.test".into()]).unwrap().self_signed(&key_pair).unwrap();
        assert!(certified_key_from_pem(cert.pem().as_bytes(), key_pair.serialize_pem().as_bytes()).is_ok());
        assert!(matches!(certified_key_from_pem(b"", b""), Err(TlsError::NoCertificate)));
    }
}
