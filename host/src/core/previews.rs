//! Previews: a TCP port of a live sandbox exposed as an authenticated URL.
//! A request to the URL is authenticated here (an API key of the preview's
//! org, or the preview's own browser token) and then carried to the port
//! through the agent (`AgentClient::tcp_connect`): the sandbox keeps no
//! network but loopback, and nothing in it learns the caller's key.

use rand::Rng;

use super::{CoreError, Host};
use crate::agent::{AgentError, Tunnel};
use crate::auth::Principal;
use crate::ids;
use crate::model::{PreviewCloseReason, PreviewStatus};
use crate::store::{Cursor, InsertPreview, PreviewRow};

/// The browser token of a preview: this prefix and 40 random characters.
pub const TOKEN_PREFIX: &str = "cn_prv_";
const TOKEN_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// How a request to a preview URL proves it may see it.
pub enum PreviewCredential {
    /// An API key (the API layer has checked its `previews:access` scope).
    Key(Principal),
    /// The preview's own token (query parameter or cookie).
    Token(String),
}

/// Stored like an API key's secret: its SHA-256, here as hex.
fn token_hash(token: &str) -> String {
    hex::encode(crate::auth::hash_secret(token))
}

fn new_token() -> String {
    let mut rng = rand::rng();
    let mut token = String::from(TOKEN_PREFIX);
    for _ in 0..40 {
        token.push(TOKEN_ALPHABET[rng.random_range(0..TOKEN_ALPHABET.len())] as char);
    }
    token
}

/// Compares without an early exit, so timing says nothing about the hash.
fn same_hash(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

impl Host {
    /// Exposes `port` of a live sandbox. Returns the row and the browser
    /// token, which is shown this once.
    pub async fn create_preview(
        &self,
        principal: &Principal,
        sandbox_id: &str,
        port: i64,
    ) -> Result<(PreviewRow, String), CoreError> {
        let port = u16::try_from(port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| CoreError::invalid("port", "port must be between 1 and 65535"))?;
        let (sandbox, _) = self.usable_sandbox(principal, sandbox_id).await?;
        let max = self.config.limits.max_previews_per_sandbox;
        let scope = principal.scope();
        let sid = sandbox.id.clone();
        let active = self
            .store
            .call(move |s| s.active_previews(&scope, &sid))
            .await?;
        if active >= max {
            return Err(CoreError::SandboxBusy {
                sandbox_id: sandbox.id.clone(),
                what: "active previews",
                max,
            });
        }
        let token = new_token();
        let row = PreviewRow {
            id: ids::new(ids::Kind::Preview),
            org_id: sandbox.org_id.clone(),
            project_id: sandbox.project_id.clone(),
            sandbox_id: sandbox.id.clone(),
            port,
            status: PreviewStatus::Active,
            token_hash: token_hash(&token),
            created_at: self.clock.now_ms(),
            closed_at: None,
            close_reason: None,
            created_by_key: principal.key_id.clone(),
        };
        let stored = row.clone();
        match self.store.call(move |s| s.insert_preview(&stored)).await? {
            InsertPreview::Inserted => Ok((row, token)),
            InsertPreview::PortTaken { existing_id } => Err(CoreError::PreviewPortTaken {
                sandbox_id: sandbox.id,
                port,
                existing_id,
            }),
        }
    }

    /// A sandbox's previews, newest first (also after it was destroyed).
    pub async fn list_previews(
        &self,
        principal: &Principal,
        sandbox_id: &str,
        after: Option<Cursor>,
        limit: usize,
    ) -> Result<Vec<PreviewRow>, CoreError> {
        let sandbox = self.get_sandbox(principal, sandbox_id).await?;
        let scope = principal.scope();
        Ok(self
            .store
            .call(move |s| s.list_previews(&scope, &sandbox.id, after.as_ref(), limit))
            .await?)
    }

    pub async fn get_preview(
        &self,
        principal: &Principal,
        sandbox_id: &str,
        preview_id: &str,
    ) -> Result<PreviewRow, CoreError> {
        let not_found = || CoreError::NotFound {
            kind: "preview",
            id: preview_id.to_string(),
        };
        if !ids::is_valid(ids::Kind::Preview, preview_id) {
            return Err(not_found());
        }
        let sandbox = self.get_sandbox(principal, sandbox_id).await?;
        let scope = principal.scope();
        let id = preview_id.to_string();
        self.store
            .call(move |s| s.get_preview(&scope, &id))
            .await?
            .filter(|p| p.sandbox_id == sandbox.id)
            .ok_or_else(not_found)
    }

    /// Closes a preview; its URL stops working at once. Closing a closed
    /// preview returns it unchanged.
    pub async fn delete_preview(
        &self,
        principal: &Principal,
        sandbox_id: &str,
        preview_id: &str,
    ) -> Result<PreviewRow, CoreError> {
        let preview = self.get_preview(principal, sandbox_id, preview_id).await?;
        if preview.status == PreviewStatus::Active {
            let id = preview.id.clone();
            let now = self.clock.now_ms();
            self.store
                .call(move |s| s.close_preview(&id, PreviewCloseReason::Deleted, now))
                .await?;
        }
        let scope = principal.scope();
        let id = preview.id.clone();
        Ok(self
            .store
            .call(move |s| s.get_preview(&scope, &id))
            .await?
            .unwrap_or(preview))
    }

    /// Checks `credential` against an active preview. Another org's
    /// preview and a wrong token are both `NotFound` (the API answers a
    /// token with 401, so it cannot probe which previews exist).
    pub async fn authorize_preview(
        &self,
        preview_id: &str,
        credential: &PreviewCredential,
    ) -> Result<PreviewRow, CoreError> {
        let not_found = || CoreError::NotFound {
            kind: "preview",
            id: preview_id.to_string(),
        };
        if !ids::is_valid(ids::Kind::Preview, preview_id) {
            return Err(not_found());
        }
        let id = preview_id.to_string();
        let preview = self
            .store
            .call(move |s| s.find_preview(&id))
            .await?
            .ok_or_else(not_found)?;
        let allowed = match credential {
            PreviewCredential::Key(principal) => {
                principal.may_see(&preview.org_id, preview.project_id.as_deref())
            }
            PreviewCredential::Token(token) => same_hash(&token_hash(token), &preview.token_hash),
        };
        if !allowed {
            return Err(not_found());
        }
        if preview.status != PreviewStatus::Active {
            return Err(CoreError::PreviewClosed(preview.id));
        }
        Ok(preview)
    }

    /// Authorizes, then connects to the preview's port inside the sandbox.
    pub async fn open_preview(
        &self,
        preview_id: &str,
        credential: &PreviewCredential,
    ) -> Result<(PreviewRow, Tunnel), CoreError> {
        let preview = self.authorize_preview(preview_id, credential).await?;
        let live = self
            .live_sandbox(&preview.sandbox_id)
            .ok_or_else(|| CoreError::PreviewClosed(preview.id.clone()))?;
        match live.agent.tcp_connect(preview.port).await {
            Ok(tunnel) => Ok((preview, tunnel)),
            Err(AgentError::PortUnreachable(message)) => Err(CoreError::PreviewUnreachable {
                port: preview.port,
                message,
            }),
            Err(e) => Err(CoreError::Agent(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_prefixed_random_and_compared_by_hash() {
        let a = new_token();
        let b = new_token();
        assert!(a.starts_with(TOKEN_PREFIX) && a.len() == TOKEN_PREFIX.len() + 40);
        assert_ne!(a, b);
        assert!(same_hash(&token_hash(&a), &token_hash(&a)));
        assert!(!same_hash(&token_hash(&a), &token_hash(&b)));
        assert!(!same_hash("ab", "abc"));
    }
}
