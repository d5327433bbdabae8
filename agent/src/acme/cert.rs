//! A certificate chain and its key as berth keeps them (state_dir, SSM), and what the
//! scheduler needs to know about them: names, validity, serial, the ARI identifier.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use rustls::pki_types::CertificateDer;
use rustls::sign::CertifiedKey;
use serde::Serialize;
use x509_parser::extensions::GeneralName;
use zeroize::Zeroizing;

/// A chain and its private key, both PEM. The key is wiped from memory when dropped and
/// never printed (`Debug` shows the certificate facts only).
#[derive(Clone)]
pub(crate) struct Issued {
    pub chain_pem: String,
    pub key_pem: Zeroizing<String>,
    pub info: CertInfo,
    /// What rustls serves; built once so installing twice costs nothing.
    pub certified: Arc<CertifiedKey>,
}

impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued").field("info", &self.info).field("key", &"<redacted>").finish()
    }
}

/// Facts about a leaf certificate, for scheduling, status and metrics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertInfo {
    /// DNS names from the subjectAltName extension, lower-case, sorted.
    pub names: Vec<String>,
    /// Colon-separated hex, as `openssl x509 -serial` prints it (without the colons there).
    pub serial: String,
    pub issuer: String,
    #[serde(serialize_with = "unix_secs")]
    pub not_before: SystemTime,
    #[serde(serialize_with = "unix_secs")]
    pub not_after: SystemTime,
    /// RFC 9773 identifier (`base64url(AKI).base64url(serial)`); `None` without an AKI.
    #[serde(skip)]
    pub ari_id: Option<String>,
}

fn unix_secs<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0))
}

impl Issued {
    /// Parses and checks a chain and key: at least one certificate, a usable key that
    /// belongs to the leaf. Anything less is refused before it can reach a handshake.
    pub(crate) fn from_pem(chain_pem: String, key_pem: Zeroizing<String>) -> anyhow::Result<Issued> {
        let certified = berth_proxy::tls::certified_key_from_pem(chain_pem.as_bytes(), key_pem.as_bytes())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        certified
            .keys_match()
            .map_err(|e| anyhow::anyhow!("the private key does not belong to the certificate: {e}"))?;
        let leaf = certified.end_entity_cert().map_err(|e| anyhow::anyhow!("{e}"))?;
        let info = CertInfo::parse(leaf.as_ref())?;
        Ok(Issued { chain_pem, key_pem, info, certified })
    }
}

impl CertInfo {
    pub(crate) fn parse(der: &[u8]) -> anyhow::Result<CertInfo> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).context("parsing the certificate")?;
        let mut names = BTreeSet::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for n in &san.value.general_names {
                if let GeneralName::DNSName(d) = n {
                    names.insert(d.to_ascii_lowercase());
                }
            }
        }
        let to_time = |t: i64| UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0));
        let validity = cert.validity();
        let ari_id =
            instant_acme::CertificateIdentifier::try_from(&CertificateDer::from(der)).ok().map(|id| id.to_string());
        Ok(CertInfo {
            names: names.into_iter().collect(),
            serial: cert.raw_serial_as_string(),
            issuer: cert.issuer().to_string(),
            not_before: to_time(validity.not_before.timestamp()),
            not_after: to_time(validity.not_after.timestamp()),
            ari_id,
        })
    }

    /// Does this certificate name exactly the configured domains? A certificate for fewer
    /// names cannot serve them all; one for more names means the config dropped a domain,
    /// and the next order should stop vouching for it.
    pub(crate) fn matches(&self, domains: &[String]) -> bool {
        let want: BTreeSet<String> = domains.iter().map(|d| d.to_ascii_lowercase()).collect();
        let have: BTreeSet<String> = self.names.iter().cloned().collect();
        want == have
    }

    pub(crate) fn lifetime(&self) -> Duration {
        self.not_after.duration_since(self.not_before).unwrap_or_default()
    }

    /// Without ARI: two thirds into the lifetime (Let's Encrypt's own advice), which leaves
    /// a third (30 days of 90, 2 days of 6) to ride out a CA outage.
    pub(crate) fn lifetime_renewal(&self) -> SystemTime {
        self.not_before + self.lifetime() * 2 / 3
    }

    pub(crate) fn expired(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }

    /// Is `self` a later issuance than `other` (for fleet pick-up)?
    pub(crate) fn newer_than(&self, other: &CertInfo) -> bool {
        self.serial != other.serial && (self.not_before, self.not_after) > (other.not_before, other.not_after)
    }
}

/// A fresh ECDSA P-256 key and a CSR for `domains`, the first one as the subject.
pub(crate) fn new_key_and_csr(domains: &[String]) -> anyhow::Result<(Zeroizing<String>, Vec<u8>)> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::new(domains.to_vec())?;
    // CAs take the names from the SANs; an empty subject is what Let's Encrypt expects.
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(&key)?;
    Ok((Zeroizing::new(key.serialize_pem()), csr.der().to_vec()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A chain + key from a throwaway CA with an AKI, like a real CA's, valid for `days`.
    pub(crate) fn issue(domains: &[&str], not_before_days_ago: u64, days: u64) -> (String, Zeroizing<String>) {
        let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.key_identifier_method = rcgen::KeyIdMethod::Sha256;
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::new(domains.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        p.use_authority_key_identifier_extension = true;
        // rcgen takes `time` dates; build them from the epoch so this crate needs no `time`.
        let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let now = rcgen::date_time_ymd(1970, 1, 1) + since_epoch;
        p.not_before = now - Duration::from_secs(not_before_days_ago * 86_400);
        p.not_after = p.not_before + Duration::from_secs(days * 86_400);
        let cert = p.signed_by(&key, &issuer).unwrap();
        (format!("{}{}", cert.pem(), ca_cert.pem()), Zeroizing::new(key.serialize_pem()))
    }

    #[test]
    fn parses_names_validity_and_two_thirds() {
        let (chain, key) = issue(&["b.example.com", "A.example.com"], 10, 90);
        let issued = Issued::from_pem(chain, key).unwrap();
        let info = &issued.info;
        assert_eq!(info.names, vec!["a.example.com", "b.example.com"]);
        assert!(info.matches(&["a.example.com".into(), "B.example.com".into()]));
        assert!(!info.matches(&["a.example.com".into()]));
        assert_eq!(info.lifetime(), Duration::from_secs(90 * 86_400));
        assert_eq!(info.lifetime_renewal(), info.not_before + Duration::from_secs(60 * 86_400));
        assert!(info.ari_id.as_deref().is_some_and(|id| id.contains('.')), "{:?}", info.ari_id);
        assert!(format!("{issued:?}").contains("redacted") && !format!("{issued:?}").contains("PRIVATE"));
    }

    #[test]
    fn refuses_a_key_of_another_certificate() {
        let (chain, _) = issue(&["a.example.com"], 0, 90);
        let (_, other_key) = issue(&["a.example.com"], 0, 90);
        let err = Issued::from_pem(chain, other_key).unwrap_err();
        assert!(err.to_string().contains("does not belong"), "{err}");
    }

    #[test]
    fn csr_is_p256_for_all_names() {
        let (key, csr) = new_key_and_csr(&["a.example.com".into(), "b.example.com".into()]).unwrap();
        assert!(key.contains("BEGIN PRIVATE KEY"));
        use x509_parser::prelude::FromDer;
        let (_, req) = x509_parser::certification_request::X509CertificationRequest::from_der(&csr).unwrap();
        assert_eq!(
            req.certification_request_info.subject_pki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok()),
            Some(x509_parser::oid_registry::OID_EC_P256)
        );
    }
}
