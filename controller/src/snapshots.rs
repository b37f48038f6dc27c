//! Snapshots of local project directories (`runyard submit --repo .`, `mlflow run .`): tar
//! archives uploaded by clients, checked (`runyard_proto::snapshot::check`), and kept by the
//! sha256 of their bytes under `<data dir>/snapshots/<hex>.tar`. Content-addressed: the same tree
//! uploaded twice is stored once, and a job names its snapshot by that id.

use std::path::PathBuf;

use bytes::Bytes;
use runyard_proto::snapshot::{self, Summary};
use sha2::{Digest, Sha256};

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
}
