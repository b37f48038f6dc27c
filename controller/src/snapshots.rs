//! Snapshots of local project directories (`runyard submit --repo .`, `mlflow run .`): tar
//! archives uploaded by clients, checked (`runyard_proto::snapshot::check`), and kept by the
//! sha256 of their bytes under `<data dir>/snapshots/<hex>.tar`. Content-addressed: the same tree
//! uploaded twice is stored once, and a job names its snapshot by that id.
//!
//! Every job that runs a snapshot holds a reference in the store (`snapshot-refs/<sha>/<job>`),
//! made before the job is stored and removed with the job; [`Snapshots::collect`] removes
//! snapshots that no job references and that were uploaded longer ago than a grace period (an
//! upload waits that long for the submit that names it).

use std::path::PathBuf;

use bytes::Bytes;
use runyard_proto::snapshot::{self, Summary};
use sha2::{Digest, Sha256};

/// How long an unreferenced snapshot is kept after its upload (the submit that names it comes
/// after the upload).
pub const GRACE: std::time::Duration = std::time::Duration::from_secs(3600);
/// How often unreferenced snapshots are looked for.
pub const COLLECT_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

/// The store key of job `job`'s reference to snapshot `sha256`.
pub fn ref_key(sha256: &str, job: &str) -> String {
    format!("snapshot-refs/{sha256}/{job}")
}

/// The largest archive the controller takes by default (`--max-snapshot-size`).
pub const DEFAULT_MAX_SNAPSHOT: u64 = 64 << 20;

#[derive(Clone)]
pub struct Snapshots {
    dir: PathBuf,
    pub max: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("the archive is refused: {0}")]
    Invalid(String),
    #[error("cannot store the snapshot: {0}")]
    Io(#[from] std::io::Error),
}

/// A stored snapshot.
#[derive(Clone, Debug)]
pub struct Stored {
    pub sha256: String,
    pub summary: Summary,
    pub size: u64,
    /// It was not there before.
    pub created: bool,
}

impl Snapshots {
    pub fn open(dir: PathBuf, max: u64) -> std::io::Result<Snapshots> {
        std::fs::create_dir_all(&dir)?;
        Ok(Snapshots { dir, max })
    }

    fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}.tar"))
    }

    /// Checks and stores an archive; idempotent.
    pub async fn put(&self, body: Bytes) -> Result<Stored, SnapshotError> {
        let size = body.len() as u64;
        let (sha256, summary) = tokio::task::spawn_blocking({
            let body = body.clone();
            move || {
                let sha = hex::encode(Sha256::digest(&body));
                snapshot::check(&body[..]).map(|s| (sha, s))
            }
        })
        .await
        .map_err(|e| SnapshotError::Invalid(e.to_string()))?
        .map_err(SnapshotError::Invalid)?;
        let path = self.path(&sha256);
        let created = tokio::fs::metadata(&path).await.is_err();
        if created {
            let tmp = self
                .dir
                .join(format!(".{sha256}.{}.tmp", ulid::Ulid::new()));
            tokio::fs::write(&tmp, &body).await?;
            tokio::fs::File::open(&tmp).await?.sync_all().await?;
            tokio::fs::rename(&tmp, &path).await?;
        }
        Ok(Stored {
            sha256,
            summary,
            size,
            created,
        })
    }

    /// The stored archive `sha256` names, if there is one.
    pub async fn open_archive(&self, sha256: &str) -> Option<tokio::fs::File> {
        if sha256.len() != 64 || !sha256.chars().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        tokio::fs::File::open(self.path(sha256)).await.ok()
    }

    pub async fn exists(&self, sha256: &str) -> bool {
        self.open_archive(sha256).await.is_some()
    }

    /// Removes every stored snapshot that no job references and that was stored more than
    /// `grace` ago; returns the ids removed.
    pub async fn collect(
        &self,
        store: &dyn crate::store::Store,
        grace: std::time::Duration,
    ) -> Result<Vec<String>, crate::store::StoreError> {
        let mut removed = Vec::new();
        let Ok(mut entries) = tokio::fs::read_dir(&self.dir).await else {
            return Ok(removed);
        };
        while let Ok(Some(entry)) = entries.next_entry().await {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(sha) = name.strip_suffix(".tar").filter(|s| s.len() == 64) else {
                continue;
            };
            let old = entry
                .metadata()
                .await
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age >= grace));
            if !old {
                continue;
            }
            if !store
                .list(&format!("snapshot-refs/{sha}/"))
                .await?
                .is_empty()
            {
                continue;
            }
            match tokio::fs::remove_file(entry.path()).await {
                Ok(()) => {
                    tracing::info!(snapshot = %sha, "unreferenced snapshot removed");
                    removed.push(sha.to_string());
                }
                Err(error) => tracing::warn!(snapshot = %sha, %error, "cannot remove a snapshot"),
            }
        }
        Ok(removed)
    }
}
