//! What a single instance keeps in `state_dir/acme/` (0700; every file 0600): the ACME
//! account, the certificate chain and its key, and which directory issued them. A restart
//! reads them back instead of ordering again; a CA or domain change is noticed and ordered for.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::cert::Issued;
use crate::state;

pub(crate) struct LocalStore {
    dir: PathBuf,
}

/// `cert.json`: where the stored certificate came from.
#[derive(Serialize, Deserialize)]
struct CertMeta {
    directory: String,
}

/// `account.json`: instant-acme's credentials (account URL, key, directory), as it serializes them.
pub(crate) const ACCOUNT_FILE: &str = "account.json";

impl LocalStore {
    pub(crate) fn new(state_dir: &Path) -> LocalStore {
        LocalStore { dir: state_dir.join("acme") }
    }

    #[cfg(test)]
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    fn prepare(&self) -> anyhow::Result<()> {
        state::prepare(&self.dir)
    }

    /// The stored account credentials (JSON), if any.
    pub(crate) fn account(&self) -> anyhow::Result<Option<Zeroizing<String>>> {
        read_optional(&self.dir.join(ACCOUNT_FILE))
    }

    pub(crate) fn save_account(&self, credentials_json: &str) -> anyhow::Result<()> {
        self.prepare()?;
        state::write_private(&self.dir.join(ACCOUNT_FILE), credentials_json.as_bytes())
    }

    /// The stored certificate and the directory it came from. A pair that does not parse,
    /// or whose key does not match (a crash between the two writes), counts as none.
    pub(crate) fn certificate(&self) -> anyhow::Result<Option<(Issued, Option<String>)>> {
        let (Some(chain), Some(key)) =
            (read_optional(&self.dir.join("cert.pem"))?, read_optional(&self.dir.join("key.pem"))?)
        else {
            return Ok(None);
        };
        let issued = Issued::from_pem(chain.to_string(), key)
            .with_context(|| format!("the certificate stored in {}", self.dir.display()))?;
        let directory = std::fs::read(self.dir.join("cert.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<CertMeta>(&b).ok())
            .map(|m| m.directory);
        Ok(Some((issued, directory)))
    }

    /// Key first, then chain, then where it came from: a crash part-way leaves a pair
    /// that [`certificate`](Self::certificate) refuses, never a served mismatch.
    pub(crate) fn save_certificate(&self, issued: &Issued, directory: &str) -> anyhow::Result<()> {
        self.prepare()?;
        state::write_private(&self.dir.join("key.pem"), issued.key_pem.as_bytes())?;
        state::write_private(&self.dir.join("cert.pem"), issued.chain_pem.as_bytes())?;
        let meta = serde_json::to_vec(&CertMeta { directory: directory.to_owned() })?;
        state::write_private(&self.dir.join("cert.json"), &meta)
    }
}

fn read_optional(path: &Path) -> anyhow::Result<Option<Zeroizing<String>>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(Zeroizing::new(s))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::acme::cert::tests::issue;

    #[test]
    fn round_trip_private_files() {
        let dir = berth_tests::TestDir::new();
        let store = LocalStore::new(dir.path());
        assert!(store.certificate().unwrap().is_none());
        let (chain, key) = issue(&["a.example.com"], 0, 90);
        let issued = Issued::from_pem(chain, key).unwrap();
        store.save_certificate(&issued, "https://ca.example/dir").unwrap();
        store.save_account("{}").unwrap();
        let (back, directory) = store.certificate().unwrap().unwrap();
        assert_eq!(back.info, issued.info);
        assert_eq!(directory.as_deref(), Some("https://ca.example/dir"));
        for f in ["key.pem", "cert.pem", "cert.json", "account.json"] {
            let mode = std::fs::metadata(store.dir().join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{f}");
        }
        let mode = std::fs::metadata(store.dir()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }
}
