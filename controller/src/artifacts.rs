//! The artifact store: each attempt's best checkpoint as a file under
//! `<data_dir>/artifacts/<job>/<attempt>/`, with its size and sha256 beside it.
//!
//! Invariant: an artifact is visible only complete and verified. Uploads stream into a temp
//! file, the size and sha256 are checked against what the agent declared, and only then is the
//! file renamed into place (a re-upload replaces it). `ArtifactStore` is the interface the
//! controller uses (an object store can implement it: `begin`/`write`/`finish` map to a
//! multipart upload); `DirStore` is the directory implementation.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

/// Largest accepted checkpoint.
pub const MAX_ARTIFACT: u64 = 64 << 30;

/// What is known of a stored artifact.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactMeta {
    pub file_name: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("invalid file name `{0}`")]
    FileName(String),
    #[error("not a job id: {0:?}")]
    JobId(String),
    #[error("artifact is larger than declared ({declared} bytes)")]
    TooLarge { declared: u64 },
    #[error("artifact size {got} differs from the declared {declared}")]
    Size { declared: u64, got: u64 },
    #[error("artifact checksum {got} differs from the declared {declared}")]
    Checksum { declared: String, got: String },
    #[error("artifact store I/O: {0}")]
    Io(#[from] io::Error),
}

/// Where the controller keeps uploaded checkpoints.
#[async_trait::async_trait]
pub trait ArtifactStore: Send + Sync + 'static {
    /// Starts receiving an artifact of `size` bytes for an attempt.
    async fn begin(
        &self,
        job: &str,
        attempt: u32,
        file_name: &str,
        size: u64,
    ) -> Result<Box<dyn ArtifactUpload>, ArtifactError>;
    /// The stored artifact of an attempt, opened for reading.
    async fn open(
        &self,
        job: &str,
        attempt: u32,
    ) -> Result<Option<(ArtifactMeta, ArtifactReader)>, ArtifactError>;
    /// Removes every attempt's artifact of a job; removing nothing succeeds.
    async fn remove(&self, job: &str) -> Result<(), ArtifactError>;
}

pub type ArtifactReader = std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>>;

/// One upload in progress: `write` the bytes in order, then `finish` with the declared sha256.
/// Dropping it unfinished abandons it and leaves nothing visible.
#[async_trait::async_trait]
pub trait ArtifactUpload: Send {
    async fn write(&mut self, data: &[u8]) -> Result<(), ArtifactError>;
    async fn finish(self: Box<Self>, declared_sha256: &str) -> Result<ArtifactMeta, ArtifactError>;
}

/// Receives one upload into the directory store.
pub struct Upload {
    tmp: PathBuf,
    dest_dir: PathBuf,
    meta: ArtifactMeta,
    file: tokio::fs::File,
    hasher: Sha256,
    written: u64,
}

#[async_trait::async_trait]
impl ArtifactUpload for Upload {
    async fn write(&mut self, data: &[u8]) -> Result<(), ArtifactError> {
        self.written += data.len() as u64;
        if self.written > self.meta.size {
            return Err(ArtifactError::TooLarge {
                declared: self.meta.size,
            });
        }
        self.hasher.update(data);
        self.file.write_all(data).await?;
        Ok(())
    }

    /// Verifies and publishes the artifact.
    async fn finish(
        mut self: Box<Self>,
        declared_sha256: &str,
    ) -> Result<ArtifactMeta, ArtifactError> {
        let result = self.verify(declared_sha256).await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&self.tmp).await;
        }
        result
    }
}

impl Upload {
    async fn verify(&mut self, declared_sha256: &str) -> Result<ArtifactMeta, ArtifactError> {
        if self.written != self.meta.size {
            return Err(ArtifactError::Size {
                declared: self.meta.size,
                got: self.written,
            });
        }
        let got = hex::encode(std::mem::take(&mut self.hasher).finalize());
        if !got.eq_ignore_ascii_case(declared_sha256) {
            return Err(ArtifactError::Checksum {
                declared: declared_sha256.into(),
                got,
            });
        }
        self.file.sync_all().await?;
        self.meta.sha256 = got;
        // Replace any earlier upload of this attempt.
        if let Ok(mut old) = tokio::fs::read_dir(&self.dest_dir).await {
            while let Ok(Some(e)) = old.next_entry().await {
                if e.path() != self.tmp {
                    let _ = tokio::fs::remove_file(e.path()).await;
                }
            }
        }
        let meta_json = serde_json::to_vec(&self.meta).expect("meta serializes");
        tokio::fs::write(self.dest_dir.join(".meta.json.tmp"), meta_json).await?;
        tokio::fs::rename(&self.tmp, self.dest_dir.join(&self.meta.file_name)).await?;
        tokio::fs::rename(
            self.dest_dir.join(".meta.json.tmp"),
            self.dest_dir.join(META),
        )
        .await?;
        Ok(self.meta.clone())
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        // Published uploads were renamed away; anything else is an abandoned temp file.
        let _ = std::fs::remove_file(&self.tmp);
    }
}

const META: &str = ".meta.json";

/// Artifacts in a directory tree.
#[derive(Clone, Debug)]
pub struct DirStore {
    root: PathBuf,
}

impl DirStore {
    pub fn open(root: impl Into<PathBuf>) -> io::Result<DirStore> {
        let root = root.into();
        std::fs::create_dir_all(&root)?;
        Ok(DirStore { root })
    }

    fn dir(&self, job: &str, attempt: u32) -> PathBuf {
        self.root.join(job).join(attempt.to_string())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

#[async_trait::async_trait]
impl ArtifactStore for DirStore {
    async fn begin(
        &self,
        job: &str,
        attempt: u32,
        file_name: &str,
        size: u64,
    ) -> Result<Box<dyn ArtifactUpload>, ArtifactError> {
        let bad = file_name.is_empty()
            || file_name.starts_with('.')
            || file_name.contains('/')
            || file_name.contains('\0')
            || file_name.len() > 255;
        if !runyard_model::is_job_id(job) {
            return Err(ArtifactError::JobId(job.into()));
        }
        if bad {
            return Err(ArtifactError::FileName(file_name.into()));
        }
        if size > MAX_ARTIFACT {
            return Err(ArtifactError::TooLarge { declared: size });
        }
        let dest_dir = self.dir(job, attempt);
        tokio::fs::create_dir_all(&dest_dir).await?;
        let tmp = dest_dir.join(format!(".upload-{}", ulid::Ulid::new()));
        let file = tokio::fs::File::create(&tmp).await?;
        Ok(Box::new(Upload {
            tmp,
            dest_dir,
            meta: ArtifactMeta {
                file_name: file_name.into(),
                size,
                sha256: String::new(),
            },
            file,
            hasher: Sha256::new(),
            written: 0,
        }))
    }

    async fn open(
        &self,
        job: &str,
        attempt: u32,
    ) -> Result<Option<(ArtifactMeta, ArtifactReader)>, ArtifactError> {
        if !runyard_model::is_job_id(job) {
            return Ok(None);
        }
        let dir = self.dir(job, attempt);
        let meta = match tokio::fs::read(dir.join(META)).await {
            Ok(bytes) => match serde_json::from_slice::<ArtifactMeta>(&bytes) {
                Ok(m) => m,
                Err(_) => return Ok(None),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        match tokio::fs::File::open(dir.join(&meta.file_name)).await {
            Ok(f) => Ok(Some((meta, Box::pin(f)))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn remove(&self, job: &str) -> Result<(), ArtifactError> {
        if job.is_empty() || job.contains('/') || job.starts_with('.') {
            return Err(ArtifactError::FileName(job.into()));
        }
        match tokio::fs::remove_dir_all(self.root.join(job)).await {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const J: &str = "01hzx3k8m9q2r4s5t6v7w8x9yz";

    async fn read(store: &DirStore) -> Option<(ArtifactMeta, Vec<u8>)> {
        use tokio::io::AsyncReadExt;
        let (meta, mut r) = store.open(J, 1).await.unwrap()?;
        let mut bytes = Vec::new();
        r.read_to_end(&mut bytes).await.unwrap();
        Some((meta, bytes))
    }

    fn sha(data: &[u8]) -> String {
        hex::encode(Sha256::digest(data))
    }

    #[tokio::test]
    async fn upload_is_verified_then_published() {
        let dir = tempfile::tempdir().unwrap();
        let store = DirStore::open(dir.path()).unwrap();
        assert!(read(&store).await.is_none());
        let mut up = store.begin(J, 1, "best.ckpt", 6).await.unwrap();
        up.write(b"abc").await.unwrap();
        assert!(
            read(&store).await.is_none(),
            "not visible before it is complete"
        );
        up.write(b"def").await.unwrap();
        let meta = up.finish(&sha(b"abcdef")).await.unwrap();
        let (found, bytes) = read(&store).await.unwrap();
        assert_eq!(found, meta);
        assert_eq!(bytes, b"abcdef");
        // A re-upload replaces it.
        let mut up = store.begin(J, 1, "other.ckpt", 1).await.unwrap();
        up.write(b"z").await.unwrap();
        up.finish(&sha(b"z")).await.unwrap();
        let (meta, bytes) = read(&store).await.unwrap();
        assert_eq!(
            (meta.file_name.as_str(), bytes),
            ("other.ckpt", b"z".to_vec())
        );
        assert_eq!(
            std::fs::read_dir(dir.path().join(format!("{J}/1")))
                .unwrap()
                .count(),
            2,
            "file + meta only"
        );
    }

    #[tokio::test]
    async fn bad_uploads_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = DirStore::open(dir.path()).unwrap();
        let mut up = store.begin(J, 1, "a.ckpt", 3).await.unwrap();
        up.write(b"abc").await.unwrap();
        assert!(matches!(
            up.finish(&sha(b"xyz")).await,
            Err(ArtifactError::Checksum { .. })
        ));
        let mut up = store.begin(J, 1, "a.ckpt", 3).await.unwrap();
        up.write(b"ab").await.unwrap();
        assert!(matches!(
            up.finish(&sha(b"ab")).await,
            Err(ArtifactError::Size { .. })
        ));
        let mut up = store.begin(J, 1, "a.ckpt", 1).await.unwrap();
        assert!(up.write(b"ab").await.is_err());
        for bad in ["", "../x", "a/b", ".hidden"] {
            assert!(store.begin(J, 1, bad, 1).await.is_err(), "{bad}");
        }
        let outside = dir.path().join("outside");
        for bad_job in ["..", "../outside", outside.to_str().unwrap(), "j"] {
            assert!(matches!(
                store.begin(bad_job, 1, "a.ckpt", 1).await,
                Err(ArtifactError::JobId(_))
            ));
            assert!(store.open(bad_job, 1).await.unwrap().is_none());
        }
        assert!(!outside.exists());
        assert!(read(&store).await.is_none());
        drop(up);
        assert_eq!(
            std::fs::read_dir(dir.path().join(format!("{J}/1")))
                .unwrap()
                .count(),
            0,
            "no temp file left"
        );
        // Deleting the job removes its directory; deleting nothing succeeds.
        store.remove("j").await.unwrap();
        store.remove("j").await.unwrap();
        assert!(!dir.path().join("j").exists());
        assert!(store.remove("..").await.is_err());
    }
}
