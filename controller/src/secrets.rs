//! Secrets: controller-side ones set by admins (`secrets/NAME`, `runyard secret set NAME`), and
//! the values a job's spec carries (`job-secrets/ID`), kept apart from the job's intent so that
//! no view of a job (API, page, CLI, events, logs) can show them. A job's values are fixed when
//! it is submitted (a named secret is copied then) and resolved into the spec only for the
//! assignment an agent receives.
//!
//! Values are stored as they are in the store (`state.redb`, mode 0600 in a private data dir, or
//! etcd): protect the store as the secrets it holds.

use std::collections::BTreeMap;
use std::sync::Arc;

use runyard_model::job::first_schema_version;
use runyard_model::spec::{SecretSource, is_secret_name};
use runyard_model::{JobSpec, Timestamp, ValidationError};
use serde::{Deserialize, Serialize};

use crate::store::{Precondition, Store, StoreError};

const NAMED: &str = "secrets/";
const OF_JOB: &str = "job-secrets/";

/// A controller-side secret as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretRecord {
    #[serde(default = "first_schema_version")]
    pub schema_version: u32,
    pub name: String,
    pub value: String,
    pub updated_at: Timestamp,
    pub updated_by: String,
}

/// The secret values of one job, by variable name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct JobSecrets {
    values: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("`{0}` is not a secret name: 1 to 64 of a-z, 0-9, `.`, `_`, `-`")]
    BadName(String),
    #[error("the value is empty or longer than {} KiB", runyard_model::limits::MAX_SECRET_VALUE / 1024)]
    BadValue,
    #[error(transparent)]
    Spec(#[from] ValidationError),
    #[error("the secret values of job {0} are missing from the store")]
    Missing(String),
    #[error("secret store: {0}")]
    Store(#[from] StoreError),
}

#[derive(Clone)]
pub struct Secrets {
    store: Arc<dyn Store>,
}

impl Secrets {
    pub fn new(store: Arc<dyn Store>) -> Secrets {
        Secrets { store }
    }

    /// Sets (or replaces) a controller-side secret.
    pub async fn set(
        &self,
        name: &str,
        value: &str,
        by: &str,
    ) -> Result<SecretRecord, SecretError> {
        if !is_secret_name(name) {
            return Err(SecretError::BadName(name.into()));
        }
        if value.is_empty()
            || value.len() > runyard_model::limits::MAX_SECRET_VALUE
            || value.contains('\0')
        {
            return Err(SecretError::BadValue);
        }
        let record = SecretRecord {
            schema_version: 1,
            name: name.into(),
            value: value.into(),
            updated_at: Timestamp::now(),
            updated_by: by.into(),
        };
        let bytes = serde_json::to_vec(&record).expect("a secret serializes");
        self.store
            .put(&format!("{NAMED}{name}"), bytes, Precondition::Any)
            .await?;
        Ok(record)
    }

    /// Every controller-side secret (with values: callers show only names and times).
    pub async fn list(&self) -> Result<Vec<SecretRecord>, SecretError> {
        let mut out = Vec::new();
        for (_, v) in self.store.list(NAMED).await? {
            if let Ok(r) = serde_json::from_slice::<SecretRecord>(&v.value) {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// Removes a controller-side secret; whether there was one. Jobs submitted before keep
    /// their copy.
    pub async fn remove(&self, name: &str) -> Result<bool, SecretError> {
        let key = format!("{NAMED}{name}");
        let had = self.store.get(&key).await?.is_some();
        self.store.delete(&key).await?;
        Ok(had)
    }

    /// At submit: takes the values out of `spec` (a value given, or a named secret's current
    /// value) and stores them for job `id`; the spec keeps only `{"given": true}` and
    /// `{"secret": NAME}`. An unknown named secret is a 400 naming the variable.
    pub async fn take(&self, id: &str, mut spec: JobSpec) -> Result<JobSpec, SecretError> {
        if spec.secrets.is_empty() {
            return Ok(spec);
        }
        let mut values = BTreeMap::new();
        for (k, source) in spec.secrets.iter_mut() {
            let field = format!("secrets.{k}");
            match source {
                SecretSource::Value(v) => {
                    values.insert(k.clone(), std::mem::take(v));
                    *source = SecretSource::Given { given: true };
                }
                SecretSource::Secret { secret } => {
                    let Some(v) = self.store.get(&format!("{NAMED}{secret}")).await? else {
                        return Err(ValidationError::new(
                            field,
                            format!("no secret named `{secret}`: an admin sets it with `runyard secret set {secret}`"),
                        )
                        .into());
                    };
                    let record: SecretRecord = serde_json::from_slice(&v.value).map_err(|_| {
                        ValidationError::new(
                            field.clone(),
                            format!("secret `{secret}` is unreadable; set it again"),
                        )
                    })?;
                    values.insert(k.clone(), record.value);
                }
                SecretSource::Given { .. } => {
                    return Err(ValidationError::new(
                        field,
                        "`given` is the controller's mark for a stored value: give the value itself",
                    )
                    .into());
                }
            }
        }
        let bytes = serde_json::to_vec(&JobSecrets { values }).expect("values serialize");
        self.store
            .put(&format!("{OF_JOB}{id}"), bytes, Precondition::Any)
            .await?;
        Ok(spec)
    }

    /// For an assignment: the spec with every secret's value in it. Never store or show it.
    pub async fn resolve(&self, id: &str, spec: &JobSpec) -> Result<JobSpec, SecretError> {
        if spec.secrets.is_empty() {
            return Ok(spec.clone());
        }
        let v = self
            .store
            .get(&format!("{OF_JOB}{id}"))
            .await?
            .ok_or_else(|| SecretError::Missing(id.into()))?;
        let stored: JobSecrets =
            serde_json::from_slice(&v.value).map_err(|_| SecretError::Missing(id.into()))?;
        let mut spec = spec.clone();
        for (k, source) in spec.secrets.iter_mut() {
            let value = stored
                .values
                .get(k)
                .ok_or_else(|| SecretError::Missing(id.into()))?;
            *source = SecretSource::Value(value.clone());
        }
        Ok(spec)
    }

    /// Forgets a job's values (with the job).
    pub async fn forget(&self, id: &str) -> Result<(), SecretError> {
        Ok(self.store.delete(&format!("{OF_JOB}{id}")).await?)
    }
}
