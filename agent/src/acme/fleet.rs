//! Fleet mode (`tls.acme.shared = "/prefix"`): the instances behind one ALB share one ACME
//! account and one certificate through SSM Parameter Store, and only one of them orders.
//!
//! | parameter          | type         | written                                              |
//! |--------------------|--------------|------------------------------------------------------|
//! | `{prefix}/account` | SecureString | once, create-only: the first instance wins; the      |
//! |                    |              | account *key* (`{"directory","key_pkcs8"}`)          |
//! | `{prefix}/lock`    | String       | create-only, `{"holder","expires"}`; deleted after   |
//! | `{prefix}/key`     | SecureString | by the lock holder, before the chain                 |
//! | `{prefix}/cert`    | String       | by the lock holder; Advanced tier only above 4 KB    |
//!
//! The account parameter holds the key, not the CA's account URL, and is written before
//! anyone talks to the CA: an instance that lost the race knows the winner's thumbprint
//! after one SSM read, so it answers HTTP-01 for the fleet before the winner's first order
//! can be validated. Every instance then registers that same key with the CA, which
//! returns the one account it already has for it (RFC 8555 §7.3.1).
//!
//! SSM has no compare-and-swap, but `PutParameter` without `Overwrite` is create-only, which
//! is enough for a lock: the winner of the create holds it. A holder that died leaves a lock
//! whose `expires` has passed; the next instance deletes it and creates its own, then reads
//! the lock back to be sure its own value is the one that stuck. The holder re-reads the
//! certificate under the lock before ordering, so an instance that waited for the lock while
//! another renewed finds the new certificate and orders nothing: one order per fleet per
//! renewal.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use aws_config::SdkConfig;
use aws_sdk_ssm::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_ssm::types::{ParameterTier, ParameterType};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::cert::Issued;
use super::unix;

/// Standard-tier parameters hold up to 4 KB; a longer chain (several intermediates) needs
/// the Advanced tier, which costs money, so only then.
const STANDARD_TIER_LIMIT: usize = 4096;

pub(crate) struct Fleet {
    ssm: aws_sdk_ssm::Client,
    prefix: String,
    /// Who we are in the lock's value: hostname, pid and a random tag (a restarted berth
    /// that reuses a pid is still someone else).
    pub(crate) holder: String,
}

/// `{prefix}/account`: the fleet's ACME account key and the directory it is registered with.
#[derive(Serialize, Deserialize)]
pub(crate) struct FleetAccount {
    pub directory: String,
    /// PKCS#8 DER, base64url without padding (instant-acme's own encoding of it).
    pub key_pkcs8: String,
}

impl FleetAccount {
    /// A new P-256 account key for `directory`, as the parameter's JSON.
    pub(crate) fn generate(directory: &str) -> anyhow::Result<Zeroizing<String>> {
        use base64::prelude::{Engine, BASE64_URL_SAFE_NO_PAD};
        let (_, pkcs8) = instant_acme::Key::generate_pkcs8().map_err(|e| anyhow::anyhow!("generating the account key: {e}"))?;
        let value = FleetAccount {
            directory: directory.to_owned(),
            key_pkcs8: BASE64_URL_SAFE_NO_PAD.encode(pkcs8.secret_pkcs8_der()),
        };
        Ok(Zeroizing::new(serde_json::to_string(&value)?))
    }

    pub(crate) fn parse(json: &str) -> anyhow::Result<(String, rustls::pki_types::PrivatePkcs8KeyDer<'static>)> {
        use base64::prelude::{Engine, BASE64_URL_SAFE_NO_PAD};
        let v: FleetAccount = serde_json::from_str(json).context("the fleet's account parameter is not berth's JSON")?;
        let der = BASE64_URL_SAFE_NO_PAD
            .decode(&v.key_pkcs8)
            .context("the fleet's account key is not base64url")?;
        Ok((v.directory.clone(), der.into()))
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct LockValue {
    holder: String,
    /// Unix seconds.
    expires: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Lock {
    Acquired,
    /// Another instance is ordering; it said it would be done by `expires`.
    HeldBy { holder: String, expires: SystemTime },
}

impl Fleet {
    pub(crate) fn new(sdk: &SdkConfig, prefix: &str) -> Fleet {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "unknown-host".into());
        let tag: u32 = rand::random();
        Fleet {
            ssm: aws_sdk_ssm::Client::new(sdk),
            prefix: prefix.trim_end_matches('/').to_owned(),
            holder: format!("{host}/{}/{tag:08x}", std::process::id()),
        }
    }

    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    fn name(&self, leaf: &str) -> String {
        format!("{}/{leaf}", self.prefix)
    }

    /// A parameter's value, decrypted; `None` if it does not exist.
    async fn get(&self, leaf: &str) -> anyhow::Result<Option<Zeroizing<String>>> {
        let name = self.name(leaf);
        match self.ssm.get_parameter().name(&name).with_decryption(true).send().await {
            Ok(out) => {
                let p = out.parameter.with_context(|| format!("SSM returned no parameter for {name}"))?;
                Ok(Some(Zeroizing::new(p.value.unwrap_or_default())))
            }
            Err(e) if e.as_service_error().is_some_and(|s| s.is_parameter_not_found()) => Ok(None),
            Err(e) => Err(anyhow::anyhow!("GetParameter {name}: {}", DisplayErrorContext(&e))),
        }
    }

    /// Create-only put; `Ok(false)` when the parameter already exists.
    async fn create(&self, leaf: &str, kind: ParameterType, value: &str) -> anyhow::Result<bool> {
        let name = self.name(leaf);
        match self
            .ssm
            .put_parameter()
            .name(&name)
            .r#type(kind)
            .value(value)
            .overwrite(false)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_parameter_already_exists()) => Ok(false),
            Err(e) => Err(anyhow::anyhow!("PutParameter {name}: {}", DisplayErrorContext(&e))),
        }
    }

    async fn delete(&self, leaf: &str) -> anyhow::Result<()> {
        let name = self.name(leaf);
        match self.ssm.delete_parameter().name(&name).send().await {
            Ok(_) => Ok(()),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_parameter_not_found()) => Ok(()),
            Err(e) => Err(anyhow::anyhow!("DeleteParameter {name}: {}", DisplayErrorContext(&e))),
        }
    }

    // -- account -----------------------------------------------------------------------

    /// The fleet's account key ([`FleetAccount`] JSON), if some instance stored it.
    pub(crate) async fn account(&self) -> anyhow::Result<Option<Zeroizing<String>>> {
        self.get("account").await
    }

    /// Stores our freshly generated account key, unless another instance was first
    /// (`Ok(false)`: read theirs with [`account`](Self::account) and use that one).
    pub(crate) async fn offer_account(&self, credentials_json: &str) -> anyhow::Result<bool> {
        self.create("account", ParameterType::SecureString, credentials_json).await
    }

    /// Replaces the fleet's account key after the CA refused the old one (deactivated);
    /// the other instances notice the new value at their next poll.
    pub(crate) async fn replace_account(&self, credentials_json: &str) -> anyhow::Result<()> {
        self.put("account", ParameterType::SecureString, credentials_json, ParameterTier::Standard)
            .await
    }

    // -- lock --------------------------------------------------------------------------

    pub(crate) async fn try_lock(&self, ttl: Duration) -> anyhow::Result<Lock> {
        let expires = SystemTime::now() + ttl;
        let value = serde_json::to_string(&LockValue {
            holder: self.holder.clone(),
            expires: unix(expires),
        })?;
        // Two rounds: the second after taking over a stale lock.
        for _ in 0..2 {
            if self.create("lock", ParameterType::String, &value).await? {
                // Read back: if a stale-lock taker deleted ours in between and put its own,
                // the value says so and we step back.
                return Ok(match self.read_lock().await? {
                    Some(v) if v.holder == self.holder => Lock::Acquired,
                    Some(v) => Lock::HeldBy {
                        holder: v.holder,
                        expires: from_unix(v.expires),
                    },
                    None => continue,
                });
            }
            let Some(current) = self.read_lock().await? else {
                continue; // released between our put and our read: try again
            };
            if from_unix(current.expires) > SystemTime::now() {
                return Ok(Lock::HeldBy {
                    holder: current.holder,
                    expires: from_unix(current.expires),
                });
            }
            // Stale: its holder died or hung. If another instance takes it over at the same
            // moment, the read-back after our create above sorts out who holds it.
            tracing::warn!(prefix = %self.prefix, stale_holder = %current.holder, "taking over a stale ACME order lock");
            self.delete("lock").await?;
        }
        // Lost both rounds to others taking over the same stale lock: someone holds it now.
        Ok(match self.read_lock().await? {
            Some(v) => Lock::HeldBy {
                holder: v.holder,
                expires: from_unix(v.expires),
            },
            None => Lock::HeldBy {
                holder: "unknown".into(),
                expires: SystemTime::now(),
            },
        })
    }

    async fn read_lock(&self) -> anyhow::Result<Option<LockValue>> {
        let Some(raw) = self.get("lock").await? else {
            return Ok(None);
        };
        // An unreadable lock (someone wrote it by hand) is treated as expired long ago.
        let value = serde_json::from_str(&raw).unwrap_or(LockValue {
            holder: format!("unparsable value {:?}", raw.chars().take(60).collect::<String>()),
            expires: 0,
        });
        Ok(Some(value))
    }

    /// Releases the lock if it is still ours.
    pub(crate) async fn unlock(&self) -> anyhow::Result<()> {
        match self.read_lock().await? {
            Some(v) if v.holder == self.holder => self.delete("lock").await,
            _ => Ok(()),
        }
    }

    // -- certificate -------------------------------------------------------------------

    /// The fleet's certificate: chain and key, as PEM. `None` until one was stored.
    pub(crate) async fn certificate(&self) -> anyhow::Result<Option<(String, Zeroizing<String>)>> {
        // Chain first, then key: the writer stores the key first, so a chain we read always
        // has its key stored already (at worst we read a newer key, which the caller's
        // keys_match check rejects until the next poll).
        let Some(chain) = self.get("cert").await? else {
            return Ok(None);
        };
        let Some(key) = self.get("key").await? else {
            return Ok(None);
        };
        Ok(Some((chain.to_string(), key)))
    }

    pub(crate) async fn store_certificate(&self, issued: &Issued) -> anyhow::Result<()> {
        self.put("key", ParameterType::SecureString, &issued.key_pem, ParameterTier::Standard)
            .await?;
        // Intelligent-Tiering picks Standard for a chain that fits and never fails on a
        // parameter that an earlier, longer chain made Advanced (a plain "Standard" would:
        // SSM cannot downgrade a tier).
        let tier = if issued.chain_pem.len() > STANDARD_TIER_LIMIT {
            ParameterTier::Advanced
        } else {
            ParameterTier::IntelligentTiering
        };
        self.put("cert", ParameterType::String, &issued.chain_pem, tier).await
    }

    async fn put(&self, leaf: &str, kind: ParameterType, value: &str, tier: ParameterTier) -> anyhow::Result<()> {
        let name = self.name(leaf);
        self.ssm
            .put_parameter()
            .name(&name)
            .r#type(kind)
            .value(value)
            .tier(tier)
            .overwrite(true)
            .send()
            .await
            .map_err(|e| {
                let code = e.code().unwrap_or("").to_owned();
                anyhow::anyhow!("PutParameter {name} ({code}): {}", DisplayErrorContext(&e))
            })?;
        Ok(())
    }
}

fn from_unix(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}
