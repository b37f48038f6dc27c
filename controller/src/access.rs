//! Who is calling the user API: the built-in admin token (`admin.token`) and named tokens with a
//! role (`runyard token create`), kept as sha256 hashes in the store under `tokens/NAME` and in
//! memory for the per-request check. Creating and revoking go through this registry, so a
//! revoked token is refused from the next request on.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use runyard_model::access::{BUILTIN_ADMIN, TOKEN_SCHEMA_VERSION, is_token_name};
use runyard_model::{Caller, Role, Timestamp, TokenRecord};
use tracing::{info, warn};

use crate::store::{Precondition, Store, StoreError};
use crate::tokens::{credential_hash, token_eq};

const PREFIX: &str = "tokens/";

#[derive(Clone)]
pub struct Access {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    admin: String,
    /// Named tokens by name.
    tokens: Mutex<BTreeMap<String, TokenRecord>>,
}

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error(
        "`{0}` is not a token name: 1 to 64 of a-z, 0-9, `.`, `_`, `-`, starting with a letter or digit"
    )]
    BadName(String),
    #[error("`admin` is the controller's built-in admin token; choose another name")]
    Reserved,
    #[error("a token named `{0}` exists; revoke it first or choose another name")]
    Exists(String),
    #[error("token store: {0}")]
    Store(#[from] StoreError),
}

impl Access {
    /// The registry: the built-in admin token and the named tokens in the store.
    pub async fn load(store: Arc<dyn Store>, admin: String) -> Result<Access, StoreError> {
        let mut tokens = BTreeMap::new();
        for (key, v) in store.list(PREFIX).await? {
            match serde_json::from_slice::<TokenRecord>(&v.value) {
                Ok(t) => {
                    tokens.insert(t.name.clone(), t);
                }
                Err(error) => warn!(%key, %error, "token record skipped: it cannot be read"),
            }
        }
        Ok(Access {
            inner: Arc::new(Inner {
                store,
                admin,
                tokens: Mutex::new(tokens),
            }),
        })
    }

    /// Who presents `token`, if anyone. Compared in constant time (the admin token) or by hash.
    pub fn caller(&self, token: &str) -> Option<Caller> {
        if token_eq(token, &self.inner.admin) {
            return Some(Caller {
                name: BUILTIN_ADMIN.into(),
                role: Role::Admin,
            });
        }
        let hash = credential_hash(token);
        let tokens = self.inner.tokens.lock().unwrap();
        tokens
            .values()
            .find(|t| token_eq(&t.sha256, &hash))
            .map(|t| Caller {
                name: t.name.clone(),
                role: t.role,
            })
    }

    /// Makes a token; returns it (shown once: only its hash is kept).
    pub async fn create(
        &self,
        name: &str,
        role: Role,
        by: &Caller,
    ) -> Result<(TokenRecord, String), AccessError> {
        if name == BUILTIN_ADMIN {
            return Err(AccessError::Reserved);
        }
        if !is_token_name(name) {
            return Err(AccessError::BadName(name.to_string()));
        }
        let secret = runyard_proto::secret::random("ryt_");
        let record = TokenRecord {
            schema_version: TOKEN_SCHEMA_VERSION,
            name: name.to_string(),
            role,
            sha256: credential_hash(&secret),
            created_at: Timestamp::now(),
            created_by: by.name.clone(),
        };
        let value = serde_json::to_vec(&record).expect("a token record serializes");
        match self
            .inner
            .store
            .put(&format!("{PREFIX}{name}"), value, Precondition::Absent)
            .await
        {
            Ok(_) => {}
            Err(StoreError::Conflict { .. }) => return Err(AccessError::Exists(name.into())),
            Err(e) => return Err(e.into()),
        }
        self.inner
            .tokens
            .lock()
            .unwrap()
            .insert(name.to_string(), record.clone());
        info!(token = %name, %role, by = %by.name, "token created");
        Ok((record, secret))
    }

    /// Revokes a token at once. Returns it, or `None` if there was none.
    pub async fn revoke(
        &self,
        name: &str,
        by: &Caller,
    ) -> Result<Option<TokenRecord>, AccessError> {
        let Some(record) = self.inner.tokens.lock().unwrap().get(name).cloned() else {
            return Ok(None);
        };
        // Refused from now on, even if the store write below fails and is retried.
        self.inner.tokens.lock().unwrap().remove(name);
        if let Err(e) = self.inner.store.delete(&format!("{PREFIX}{name}")).await {
            self.inner
                .tokens
                .lock()
                .unwrap()
                .insert(name.to_string(), record);
            return Err(e.into());
        }
        info!(token = %name, by = %by.name, "token revoked");
        Ok(Some(record))
    }

    /// Every named token, by name.
    pub fn list(&self) -> Vec<TokenRecord> {
        self.inner
            .tokens
            .lock()
            .unwrap()
            .values()
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn access(dir: &std::path::Path) -> Access {
        let store = crate::store::open("file:", dir).await.unwrap();
        Access::load(store, "rya_admin".into()).await.unwrap()
    }

    #[tokio::test]
    async fn tokens_are_kept_hashed_and_revoked_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let a = access(dir.path()).await;
        let admin = a.caller("rya_admin").unwrap();
        assert_eq!(admin.role, Role::Admin);
        let (rec, secret) = a.create("alice", Role::User, &admin).await.unwrap();
        assert_ne!(rec.sha256, secret);
        assert_eq!(
            a.caller(&secret),
            Some(Caller {
                name: "alice".into(),
                role: Role::User
            })
        );
        assert!(a.caller("ryt_wrong").is_none());
        assert!(matches!(
            a.create("alice", Role::Viewer, &admin).await,
            Err(AccessError::Exists(_))
        ));
        assert!(matches!(
            a.create("admin", Role::Viewer, &admin).await,
            Err(AccessError::Reserved)
        ));
        assert!(matches!(
            a.create("Bad Name", Role::Viewer, &admin).await,
            Err(AccessError::BadName(_))
        ));
        // A restart reads them back; the store holds no token.
        drop(a);
        let a = access(dir.path()).await;
        assert_eq!(a.caller(&secret).unwrap().name, "alice");
        let raw = std::fs::read(dir.path().join(crate::store::DEFAULT_FILE_NAME)).unwrap();
        assert!(
            !raw.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "the token itself is never stored"
        );
        a.revoke("alice", &admin).await.unwrap().unwrap();
        assert!(a.caller(&secret).is_none());
        assert!(a.revoke("alice", &admin).await.unwrap().is_none());
        drop(a);
        assert!(access(dir.path()).await.caller(&secret).is_none());
    }
}
