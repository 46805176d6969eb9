//! API keys and scopes: minting (operator CLI only), hashing, and checking
//! a presented key.
//!
//! A key is `cn_live_` followed by 40 random base-62 characters. Only its
//! SHA-256 is stored: the secret is high-entropy, so a fast hash is enough
//! and lookups stay one indexed query. Scopes are singular `resource:action`
//! strings; there is no wildcard at check time (`all` is expanded when the
//! key is minted), so a key's power is exactly its list.

use rand::Rng;
use sha2::{Digest, Sha256};

use crate::clock::Millis;
use crate::ids;
use crate::store::{KeyRow, Scope, Store, StoreError};

pub const KEY_PREFIX: &str = "cn_live_";
const SECRET_LEN: usize = 40;
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Every scope the host knows. Keep in step with the routes that check them.
pub const SCOPES: &[&str] = &[
    "sandboxes:create",
    "sandboxes:read",
    "sandboxes:kill",
    "sandboxes:network",
    "commands:run",
    "commands:read",
    "commands:kill",
    "templates:read",
    "audit:read",
    "artifacts:create",
    "artifacts:read",
    "code:run",
    "code:read",
    "usage:read",
    "files:read",
    "files:write",
    "previews:create",
    "previews:read",
    "previews:delete",
    "previews:access",
    "workspace_runs:create",
    "workspace_runs:read",
    "workspace_runs:cancel",
];

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("unknown scope `{0}`; known scopes: {known}", known = SCOPES.join(", "))]
    UnknownScope(String),
    #[error("no scopes given: pass a comma-separated list or `all`")]
    NoScopes,
    #[error("no org named `{0}`")]
    UnknownOrg(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The authenticated caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub key_id: String,
    pub org_id: String,
    pub project_id: Option<String>,
    pub scopes: Vec<String>,
}

impl Principal {
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }

    /// Whether a resource of `org_id` / `project_id` is visible to this
    /// caller: its org, and its project when the key is restricted to one
    /// (what [`Scope`] asks of the store).
    pub fn may_see(&self, org_id: &str, project_id: Option<&str>) -> bool {
        self.org_id == org_id
            && self
                .project_id
                .as_deref()
                .is_none_or(|p| project_id == Some(p))
    }

    /// What this caller may see in the store.
    pub fn scope(&self) -> Scope {
        Scope {
            org_id: self.org_id.clone(),
            project_id: self.project_id.clone(),
        }
    }
}

/// Parses `--scopes`: a comma-separated list of known scopes, or `all`.
pub fn parse_scopes(text: &str) -> Result<Vec<String>, AuthError> {
    if text.trim() == "all" {
        return Ok(SCOPES.iter().map(|s| s.to_string()).collect());
    }
    let mut scopes = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if !SCOPES.contains(&part) {
            return Err(AuthError::UnknownScope(part.to_string()));
        }
        if !scopes.iter().any(|s| s == part) {
            scopes.push(part.to_string());
        }
    }
    if scopes.is_empty() {
        return Err(AuthError::NoScopes);
    }
    Ok(scopes)
}

pub fn hash_secret(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// A freshly minted key: the row to store and the secret to show once.
pub struct MintedKey {
    pub row: KeyRow,
    pub secret: String,
}

/// Creates a key for `org` (created if new), optionally restricted to
/// `project` (created if new). Only the operator CLI calls this: no HTTP
/// route can mint keys.
pub fn mint_key(
    store: &dyn Store,
    org: &str,
    project: Option<&str>,
    name: Option<&str>,
    scopes: Vec<String>,
    now: Millis,
) -> Result<MintedKey, AuthError> {
    let org = store.ensure_org(org, now)?;
    let project_id = match project {
        Some(p) => Some(store.ensure_project(&org.id, p, now)?.id),
        None => None,
    };
    let mut rng = rand::rng();
    let mut secret = String::from(KEY_PREFIX);
    for _ in 0..SECRET_LEN {
        secret.push(BASE62[rng.random_range(0..BASE62.len())] as char);
    }
    let row = KeyRow {
        id: ids::new(ids::Kind::Key),
        org_id: org.id,
        project_id,
        name: name.map(str::to_string),
        prefix: secret[..KEY_PREFIX.len() + 4].to_string(),
        hash: hash_secret(&secret),
        scopes,
        created_at: now,
        revoked_at: None,
    };
    store.insert_key(&row)?;
    Ok(MintedKey { row, secret })
}

/// Looks a presented secret up. `None` for unknown, malformed or revoked
/// keys: the caller answers all three the same way (401) so that a probe
/// learns nothing.
pub fn authenticate(store: &dyn Store, secret: &str) -> Result<Option<Principal>, StoreError> {
    if !secret.starts_with(KEY_PREFIX) || secret.len() != KEY_PREFIX.len() + SECRET_LEN {
        return Ok(None);
    }
    let Some(key) = store.find_key_by_hash(&hash_secret(secret))? else {
        return Ok(None);
    };
    if key.revoked_at.is_some() {
        return Ok(None);
    }
    Ok(Some(Principal {
        key_id: key.id,
        org_id: key.org_id,
        project_id: key.project_id,
        scopes: key.scopes,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;

    #[test]
    fn may_see_its_org_and_only_its_project_when_restricted() {
        let mut principal = Principal {
            key_id: "key_1".into(),
            org_id: "org_a".into(),
            project_id: None,
            scopes: Vec::new(),
        };
        assert!(principal.may_see("org_a", None));
        assert!(principal.may_see("org_a", Some("prj_x")));
        assert!(!principal.may_see("org_b", None));
        principal.project_id = Some("prj_x".into());
        assert!(principal.may_see("org_a", Some("prj_x")));
        assert!(!principal.may_see("org_a", Some("prj_y")));
        assert!(!principal.may_see("org_a", None));
    }

    #[test]
    fn parse_scopes_expands_all_and_rejects_unknown() {
        assert_eq!(parse_scopes("all").expect("all").len(), SCOPES.len());
        assert_eq!(
            parse_scopes("sandboxes:read, commands:run").expect("list"),
            vec!["sandboxes:read", "commands:run"]
        );
        assert!(matches!(
            parse_scopes("sandboxes:*"),
            Err(AuthError::UnknownScope(_))
        ));
        assert!(matches!(parse_scopes(" , "), Err(AuthError::NoScopes)));
    }

    #[test]
    fn minted_key_authenticates_until_revoked() {
        let store = SqliteStore::open_in_memory().expect("store");
        let minted = mint_key(
            &store,
            "acme",
            Some("web"),
            None,
            vec!["sandboxes:read".into()],
            1,
        )
        .expect("mint");
        assert!(minted.secret.starts_with(KEY_PREFIX));
        let principal = authenticate(&store, &minted.secret)
            .expect("auth")
            .expect("known");
        assert!(principal.project_id.is_some());
        assert!(principal.has_scope("sandboxes:read"));
        assert!(!principal.has_scope("sandboxes:create"));
        store.revoke_key(&minted.row.id, 2).expect("revoke");
        assert!(
            authenticate(&store, &minted.secret)
                .expect("auth")
                .is_none()
        );
    }

    #[test]
    fn the_secret_is_not_stored() {
        let store = SqliteStore::open_in_memory().expect("store");
        let minted =
            mint_key(&store, "acme", None, None, vec!["sandboxes:read".into()], 1).expect("mint");
        let listed = store.list_keys().expect("list");
        assert_eq!(listed.len(), 1);
        assert_ne!(listed[0].key.hash, minted.secret.as_bytes());
        assert!(minted.secret.starts_with(&listed[0].key.prefix));
        assert!(listed[0].key.prefix.len() < minted.secret.len() / 2);
    }

    #[test]
    fn malformed_secrets_are_rejected_without_lookup() {
        let store = SqliteStore::open_in_memory().expect("store");
        for bad in [
            "",
            "cn_live_",
            "Bearer x",
            "cn_test_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        ] {
            assert!(authenticate(&store, bad).expect("auth").is_none());
        }
    }
}
