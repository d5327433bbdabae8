//! Fleet mode (`tls.acme.shared = "/prefix"`): the instances behind one ALB share one ACME
//! account and one certificate through SSM Parameter Store, and only one of them orders.
//!
//! | parameter          | type         | written                                              |
//! |--------------------|--------------|------------------------------------------------------|
//! | `{prefix}/account` | SecureString | once, create-only: the first instance wins; the      |
//! |                    |              | account *key* (`{"directory","key_pkcs8"}`)          |
//! | `{prefix}/lock`    | String       | `{"holder","expires"}`; create-only, or over a       |
//! |                    |              | stale one; deleted after the order                   |
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
//! is enough to take a free lock. A holder that died leaves a lock whose `expires` has
//! passed; the next instance overwrites it with its own (overwrite, not delete-and-create:
//! there is never a moment without a lock). Two instances taking over the same stale lock
//! can clobber each other, so every new lock stands for a settle time and is read back
//! before it counts, and a takeover counts only if it landed within that settle time of the
//! read that judged the lock stale ([`Fleet::take_over`] has the argument). The holder
//! re-reads the certificate under the lock before ordering, so an instance that waited for
//! the lock while another renewed finds the new certificate and orders nothing: one order per fleet per
//! renewal.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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
    settle: Duration,
    /// A lock value of ours put by a takeover too slow to be sure of: it may stand in for
    /// another instance's order, so it is neither ours to use nor to release.
    guard: Mutex<Option<String>>,
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
        let (_, pkcs8) =
            instant_acme::Key::generate_pkcs8().map_err(|e| anyhow::anyhow!("generating the account key: {e}"))?;
        Self::encode(directory, &pkcs8)
    }

    /// The parameter's JSON for an existing key (one the CA already registered).
    pub(crate) fn encode(
        directory: &str,
        pkcs8: &rustls::pki_types::PrivatePkcs8KeyDer<'_>,
    ) -> anyhow::Result<Zeroizing<String>> {
        use base64::prelude::{Engine, BASE64_URL_SAFE_NO_PAD};
        let value = FleetAccount {
            directory: directory.to_owned(),
            key_pkcs8: BASE64_URL_SAFE_NO_PAD.encode(pkcs8.secret_pkcs8_der()),
        };
        Ok(Zeroizing::new(serde_json::to_string(&value)?))
    }

    pub(crate) fn parse(json: &str) -> anyhow::Result<(String, rustls::pki_types::PrivatePkcs8KeyDer<'static>)> {
        use base64::prelude::{Engine, BASE64_URL_SAFE_NO_PAD};
        let v: FleetAccount =
            serde_json::from_str(json).context("the fleet's account parameter is not berth's JSON")?;
        let der = BASE64_URL_SAFE_NO_PAD.decode(&v.key_pkcs8).context("the fleet's account key is not base64url")?;
        Ok((v.directory.clone(), der.into()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LockValue {
    holder: String,
    /// Unix seconds.
    expires: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Lock {
    Acquired,
    /// Another instance is ordering; it said it would be done by `expires`.
    HeldBy {
        holder: String,
        expires: SystemTime,
    },
}

/// The lock parameter as read, and when the read was sent.
pub(crate) struct Observed {
    raw: Option<String>,
    sent: Instant,
}

/// Our lock value, put but not yet confirmed.
pub(crate) struct Claim {
    value: LockValue,
}

enum Judgement {
    Free,
    HeldBy(Lock),
    /// Stale, or ours: overwrite it with a fresh value of ours.
    Reclaim,
}

impl Fleet {
    /// `settle`: how long a lock we put must stand before we trust it (see [`Fleet::confirm`]);
    /// well above SSM's latency.
    pub(crate) fn new(sdk: &SdkConfig, prefix: &str, settle: Duration) -> Fleet {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "unknown-host".into());
        let tag: u32 = rand::random();
        Fleet {
            ssm: aws_sdk_ssm::Client::new(sdk),
            prefix: prefix.trim_end_matches('/').to_owned(),
            holder: format!("{host}/{}/{tag:08x}", std::process::id()),
            settle,
            guard: Mutex::new(None),
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
        match self.ssm.put_parameter().name(&name).r#type(kind).value(value).overwrite(false).send().await {
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
        self.put("account", ParameterType::SecureString, credentials_json, ParameterTier::Standard).await
    }

    // -- lock --------------------------------------------------------------------------

    /// Takes the order lock if it is free, stale, or already ours.
    pub(crate) async fn try_lock(&self, ttl: Duration) -> anyhow::Result<Lock> {
        // A few rounds: a lock released or deleted under us sends us round again.
        for _ in 0..3 {
            let mine = self.lock_value(ttl);
            let claim = if self.create("lock", ParameterType::String, &serde_json::to_string(&mine)?).await? {
                Claim { value: mine }
            } else {
                let seen = self.observe_lock().await?;
                match self.judge(&seen, ttl, SystemTime::now()) {
                    Judgement::Free => continue,
                    Judgement::HeldBy(lock) => return Ok(lock),
                    Judgement::Reclaim => match self.take_over(&seen, ttl).await? {
                        Some(claim) => claim,
                        None => return Ok(unconfirmed(ttl)),
                    },
                }
            };
            if let Some(lock) = self.confirm(&claim).await? {
                return Ok(lock);
            }
        }
        Ok(Lock::HeldBy {
            holder: "unknown (the lock changed hands while we tried)".into(),
            expires: SystemTime::now(),
        })
    }

    fn lock_value(&self, ttl: Duration) -> LockValue {
        LockValue {
            holder: self.holder.clone(),
            expires: unix(SystemTime::now().checked_add(ttl).unwrap_or_else(SystemTime::now)),
        }
    }

    /// Reads the lock, noting when the read was sent: a takeover must land within
    /// `settle` of that moment (see [`take_over`](Self::take_over)).
    pub(crate) async fn observe_lock(&self) -> anyhow::Result<Observed> {
        let sent = Instant::now();
        let raw = self.get("lock").await?.map(|r| r.to_string());
        Ok(Observed { raw, sent })
    }

    fn judge(&self, seen: &Observed, ttl: Duration, now: SystemTime) -> Judgement {
        let Some(raw) = &seen.raw else {
            return Judgement::Free;
        };
        let current = parse_lock(raw);
        let believed = believed_expiry(current.expires, now, ttl);
        let is_guard = self.guard.lock().unwrap_or_else(|e| e.into_inner()).as_deref() == Some(raw.as_str());
        if current.holder == self.holder && !is_guard {
            // Ours from an attempt that failed after taking it (an SSM error on the
            // read-back): renew it rather than wait for ourselves.
            return Judgement::Reclaim;
        }
        match believed {
            Some(expires) if expires > now => Judgement::HeldBy(Lock::HeldBy {
                // Our guard stands for whoever we may have clobbered; we do not know who.
                holder: if is_guard { UNCONFIRMED.into() } else { current.holder },
                expires,
            }),
            _ => {
                tracing::warn!(prefix = %self.prefix, stale_holder = %current.holder, "taking over a stale ACME order lock");
                Judgement::Reclaim
            }
        }
    }

    /// Replaces the lock value `seen` (stale, or ours) with ours.
    ///
    /// SSM has no compare-and-swap, so an overwrite may clobber a lock another instance put
    /// after our read. That is safe as long as the overwrite lands within `settle` of our
    /// read: the other instance's lock is younger than our read, and it confirms only
    /// `settle` after putting it (see [`confirm`](Self::confirm)), so it sees our value and
    /// steps back. An overwrite slower than that may have landed after someone confirmed;
    /// our value then stays as a guard (it keeps third instances out until it expires) and
    /// we do not order. `None` in that case. Overwriting rather than delete-and-create
    /// leaves no moment without a lock for a third instance to create one in.
    pub(crate) async fn take_over(&self, seen: &Observed, ttl: Duration) -> anyhow::Result<Option<Claim>> {
        let mine = self.lock_value(ttl);
        let raw = serde_json::to_string(&mine)?;
        let name = self.name("lock");
        self.ssm
            .put_parameter()
            .name(&name)
            .r#type(ParameterType::String)
            .value(&raw)
            .overwrite(true)
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("PutParameter {name}: {}", DisplayErrorContext(&e)))?;
        if seen.sent.elapsed() >= self.settle {
            tracing::warn!(prefix = %self.prefix, "taking over the ACME order lock took too long to be sure nobody else holds it; not ordering until it expires");
            *self.guard.lock().unwrap_or_else(|e| e.into_inner()) = Some(raw);
            return Ok(None);
        }
        Ok(Some(Claim { value: mine }))
    }

    /// After putting our lock, waits `settle` and reads it back: still ours means nobody's
    /// takeover is in flight that could remove it (any takeover that read the lock before
    /// ours existed has landed by now, or will not count itself as holder). `None`: the lock
    /// vanished meanwhile; try again.
    pub(crate) async fn confirm(&self, claim: &Claim) -> anyhow::Result<Option<Lock>> {
        // Jitter only upwards: the safety argument needs at least `settle`.
        tokio::time::sleep(self.settle.mul_f64(1.0 + rand::random::<f64>() * 0.2)).await;
        let seen = match self.observe_lock().await {
            Ok(s) => s,
            Err(e) => {
                // We may hold it: release it, or we would wait on ourselves until it expires.
                if let Err(u) = self.unlock().await {
                    tracing::warn!(prefix = %self.prefix, error = format!("{u:#}"), "cannot release the ACME order lock");
                }
                return Err(e);
            }
        };
        Ok(seen.raw.map(|raw| {
            let current = parse_lock(&raw);
            if current == claim.value {
                Lock::Acquired
            } else {
                let expires = from_unix(current.expires).unwrap_or(UNIX_EPOCH);
                Lock::HeldBy { holder: current.holder, expires }
            }
        }))
    }

    /// Releases the lock if it is still ours.
    pub(crate) async fn unlock(&self) -> anyhow::Result<()> {
        let Some(raw) = self.get("lock").await? else {
            return Ok(());
        };
        let current = parse_lock(&raw);
        if current.holder != self.holder {
            return Ok(());
        }
        // A guard may stand for someone else's order; it expires on its own.
        if self.guard.lock().unwrap_or_else(|e| e.into_inner()).as_deref() == Some(raw.as_str()) {
            return Ok(());
        }
        // Once ours has (nearly) expired someone may be taking it over right now, and a
        // delete landing after their confirmation would let a third instance in. An expired
        // lock needs no release anyway.
        let now = SystemTime::now();
        if from_unix(current.expires).is_none_or(|e| e <= now + self.settle) {
            return Ok(());
        }
        self.delete("lock").await
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
        self.put("key", ParameterType::SecureString, &issued.key_pem, ParameterTier::Standard).await?;
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

/// `None` for a time `SystemTime` cannot hold (the value is another instance's, or hand-made).
fn from_unix(secs: u64) -> Option<SystemTime> {
    UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

/// The lock's expiry, if it is believable: a holder never sets it more than `ttl` ahead, so
/// one further out than `2 × ttl` (a holder with a wrong clock, or a hand-made value) would
/// block the fleet for that long and is treated as stale instead. The margin of one more
/// `ttl` covers clock skew between honest instances.
fn believed_expiry(secs: u64, now: SystemTime, ttl: Duration) -> Option<SystemTime> {
    let at = from_unix(secs)?;
    let cap = now.checked_add(ttl).and_then(|t| t.checked_add(ttl));
    match cap {
        Some(cap) if at > cap => None,
        _ => Some(at),
    }
}

fn parse_lock(raw: &str) -> LockValue {
    // An unreadable lock (someone wrote it by hand) is treated as expired long ago.
    serde_json::from_str(raw).unwrap_or(LockValue {
        holder: format!("unparsable value {:?}", raw.chars().take(60).collect::<String>()),
        expires: 0,
    })
}

/// Who holds the lock, as far as we know, after a takeover we could not be sure of.
const UNCONFIRMED: &str = "unknown (a takeover of a stale lock raced with ours)";

/// What we tell the manager after a takeover we could not be sure of.
fn unconfirmed(ttl: Duration) -> Lock {
    Lock::HeldBy {
        holder: UNCONFIRMED.into(),
        expires: SystemTime::now().checked_add(ttl).unwrap_or_else(SystemTime::now),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn implausible_expiries_are_not_believed() {
        let now = SystemTime::now();
        let ttl = Duration::from_secs(600);
        let soon = unix(now) + 300;
        assert_eq!(believed_expiry(soon, now, ttl), from_unix(soon));
        // Within the skew margin.
        assert!(believed_expiry(unix(now) + 1100, now, ttl).is_some());
        // A clock years ahead, and values SystemTime cannot even hold: stale, no panic.
        assert_eq!(believed_expiry(unix(now) + 86_400 * 365, now, ttl), None);
        assert_eq!(believed_expiry(u64::MAX, now, ttl), None);
        assert_eq!(from_unix(u64::MAX), None);
        assert_eq!(parse_lock("{\"holder\":\"h\"").expires, 0);
    }
}
