//! Who is calling: the API key's owner id (a hash prefix, never the key) and whether the
//! caller holds the admin token. Generations, their feedback and jobs belong to the key that
//! made them; another key sees them as unknown (404), the admin token sees all.

use std::convert::Infallible;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::HeaderMap;

use super::AppState;
use crate::config::ServerConfig;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Caller {
    /// `None` when the server has no API keys (everything is everyone's).
    pub owner: Option<String>,
    pub admin: bool,
}

/// The owner id of an API key: the first 12 hex digits of its SHA-256.
pub fn owner_id(key: &str) -> String {
    crate::util::sha256_hex(key.as_bytes())[..12].to_string()
}

impl Caller {
    pub fn of(config: &ServerConfig, headers: &HeaderMap) -> Self {
        let token = super::bearer_token(headers);
        let admin = match (config.admin_token.as_deref(), token) {
            (Some(expected), Some(t)) => super::constant_time_eq(expected, t),
            _ => false,
        };
        let owner = match token {
            Some(t) if !config.api_keys.is_empty() => Some(owner_id(t)),
            _ => None,
        };
        Self { owner, admin }
    }

    /// Whether this caller may see (and act on) something made by `owner`.
    pub fn may_see(&self, owner: Option<&str>) -> bool {
        self.admin || self.owner.is_none() || self.owner.as_deref() == owner
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Infallible> {
        Ok(Self::of(&state.config, &parts.headers))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_own_what_they_made_and_the_admin_sees_all() {
        let a = Caller {
            owner: Some(owner_id("key-a")),
            admin: false,
        };
        let b = Caller {
            owner: Some(owner_id("key-b")),
            admin: false,
        };
        let mine = owner_id("key-a");
        assert!(a.may_see(Some(&mine)));
        assert!(!b.may_see(Some(&mine)));
        assert!(!b.may_see(None));
        assert!(
            Caller::default().may_see(Some(&mine)),
            "a server without keys"
        );
        let admin = Caller {
            owner: Some(owner_id("admin")),
            admin: true,
        };
        assert!(admin.may_see(Some(&mine)));
    }
}
