//! Uploads an attempt's best checkpoint to the controller's artifact store over gRPC, streaming
//! with its sha256, retrying with backoff while the controller is away.

use std::path::Path;
use std::time::Duration;

use runyard_proto::v1::{self, checkpoint_chunk::Part};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

const CHUNK: usize = 1 << 20;
/// Upload attempts before giving up (the job's status then says why).
const TRIES: u32 = 8;

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("checkpoint {path} is missing: {source}")]
    Missing {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot read checkpoint {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "checkpoint {} is outside the job's directory: an isolated job uploads only its own files",
        .0.display()
    )]
    Outside(std::path::PathBuf),
    #[error("the controller refused the checkpoint: {0}")]
    Refused(String),
    #[error("cannot reach the controller: {0}")]
    Unreachable(String),
}

/// Uploads `path` as the checkpoint of `job_id`/`attempt`; returns size and sha256.
pub async fn upload_checkpoint(
    controller: &str,
    auth: &crate::dial::Auth,
    job_id: &str,
    attempt: u32,
    path: &Path,
) -> Result<(u64, String), UploadError> {
    let mut delay = Duration::from_millis(250);
    let mut last = String::new();
    for _ in 0..TRIES {
        match upload_once(controller, auth, job_id, attempt, path).await {
            Ok(r) => return Ok(r),
            Err(UploadError::Unreachable(e)) => last = e,
            Err(other) => return Err(other),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
    Err(UploadError::Unreachable(last))
}

async fn upload_once(
    controller: &str,
    auth: &crate::dial::Auth,
    job_id: &str,
    attempt: u32,
    path: &Path,
) -> Result<(u64, String), UploadError> {
    let shown = path.display().to_string();
    let meta = tokio::fs::metadata(path)
        .await
        .map_err(|source| UploadError::Missing {
            path: shown.clone(),
            source,
        })?;
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|source| UploadError::Missing {
            path: shown.clone(),
            source,
        })?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "checkpoint".into());
    let size = meta.len();
    let mut client = crate::dial::connect(controller, auth)
        .await
        .map_err(|e| match e {
            crate::dial::DialError::Token => UploadError::Refused(e.to_string()),
            other => UploadError::Unreachable(other.to_string()),
        })?;

    let (tx, rx) = tokio::sync::mpsc::channel::<v1::CheckpointChunk>(4);
    let header = v1::CheckpointChunk {
        part: Some(Part::Header(v1::CheckpointHeader {
            job_id: job_id.into(),
            attempt,
            file_name,
            size,
        })),
    };
    let reader = async move {
        let _ = tx.send(header).await;
        let mut hasher = Sha256::new();
        let mut sent = 0u64;
        loop {
            let mut buf = vec![0u8; CHUNK];
            let n = file
                .read(&mut buf)
                .await
                .map_err(|source| UploadError::Read {
                    path: shown.clone(),
                    source,
                })?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            hasher.update(&buf);
            sent += n as u64;
            if tx
                .send(v1::CheckpointChunk {
                    part: Some(Part::Data(buf)),
                })
                .await
                .is_err()
            {
                break;
            }
        }
        let sum = hex::encode(hasher.finalize());
        let _ = tx
            .send(v1::CheckpointChunk {
                part: Some(Part::Sha256(sum.clone())),
            })
            .await;
        Ok::<_, UploadError>((sent, sum))
    };
    let call = client.upload_checkpoint(tokio_stream::wrappers::ReceiverStream::new(rx));
    let (read, resp) = tokio::join!(reader, call);
    let (sent, sum) = read?;
    match resp {
        Ok(r) => {
            let r = r.into_inner();
            if r.sha256 != sum || r.size != sent {
                return Err(UploadError::Refused(format!(
                    "the controller stored {} bytes with sha256 {}, expected {sent} and {sum}",
                    r.size, r.sha256
                )));
            }
            Ok((r.size, r.sha256))
        }
        Err(s)
            if matches!(
                s.code(),
                tonic::Code::Unavailable
                    | tonic::Code::Unknown
                    | tonic::Code::Cancelled
                    | tonic::Code::DeadlineExceeded
            ) =>
        {
            Err(UploadError::Unreachable(s.message().to_string()))
        }
        Err(s) => Err(UploadError::Refused(s.message().to_string())),
    }
}
