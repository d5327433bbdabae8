//! ACME HTTP-01 answers for `/.well-known/acme-challenge/{token}`.
//!
//! Two ways to answer, both needed in a fleet:
//! - tokens this instance is validating right now (a map the ACME client fills);
//! - *stateless*: any well-formed token gets `token.thumbprint`. The key authorization only
//!   depends on the token and the account key's thumbprint, so every instance of a fleet that
//!   shares the account can answer a validation request the ALB routed to it, whichever
//!   instance placed the order.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};

#[derive(Clone, Default)]
pub struct ChallengeResponder {
    tokens: Arc<ArcSwap<HashMap<String, String>>>,
    thumbprint: Arc<ArcSwapOption<String>>,
}

impl ChallengeResponder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves `key_authorization` for `token` until [`remove`](Self::remove).
    pub fn insert(&self, token: &str, key_authorization: &str) {
        self.tokens.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.insert(token.to_owned(), key_authorization.to_owned());
            m
        });
    }

    pub fn remove(&self, token: &str) {
        self.tokens.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.remove(token);
            m
        });
    }

    /// Turns on stateless answering with the account key's JWK thumbprint (base64url).
    pub fn set_thumbprint(&self, thumbprint: Option<String>) {
        self.thumbprint.store(thumbprint.map(Arc::new));
    }

    /// The key authorization for a token, if we can answer it. Malformed tokens never are.
    pub fn answer(&self, token: &str) -> Option<String> {
        if !is_well_formed_token(token) {
            return None;
        }
        if let Some(ka) = self.tokens.load().get(token) {
            return Some(ka.clone());
        }
        self.thumbprint.load().as_ref().map(|thumb| format!("{token}.{thumb}"))
    }
}

/// RFC 8555 §8.3: a token is base64url without padding; Let's Encrypt's are 43 characters.
/// Anything else is a probe and must not be echoed back.
pub fn is_well_formed_token(token: &str) -> bool {
    (16..=128).contains(&token.len()) && token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_known_tokens_then_stateless_then_nothing() {
        let r = ChallengeResponder::new();
        let t = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA";
        assert_eq!(r.answer(t), None);
        r.set_thumbprint(Some("THUMB".into()));
        assert_eq!(r.answer(t).as_deref(), Some(&*format!("{t}.THUMB")));
        r.insert(t, "explicit");
        assert_eq!(r.answer(t).as_deref(), Some("explicit"));
        assert_eq!(r.answer("../../etc/passwd"), None);
        assert_eq!(r.answer("short"), None);
    }
}
