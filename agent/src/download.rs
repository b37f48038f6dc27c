//! Fetches what an attempt needs from the controller: the checkpoint it starts from
//! (`model_from`, checked against its size and sha256) and the snapshot it runs (a local
//! directory's archive, checked against the sha256 that names it). Streamed, retried with backoff
//! while the controller is away.

use std::path::{Path, PathBuf};
use std::time::Duration;

use runyard_proto::v1::{self, checkpoint_chunk::Part};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

/// Download attempts before the attempt fails.
const TRIES: u32 = 8;

/// Fetches `source`'s checkpoint for attempt `attempt` of `job_id` into `dir` (made here);
/// returns the file's path.
pub async fn download_checkpoint(
    controller: &str,
    auth: &crate::dial::Auth,
    job_id: &str,
    attempt: u32,
    source: &str,
    dir: &Path,
) -> Result<PathBuf, String> {
    with_retries(|| download_once(controller, auth, job_id, attempt, source, dir)).await
}

/// Fetches snapshot `sha256` (hex) that attempt `attempt` of `job_id` runs into `file`, written
/// whole and checked before it is renamed into place. A file already there is kept (it is
/// named by its content).
pub async fn download_snapshot(
    controller: &str,
    auth: &crate::dial::Auth,
    job_id: &str,
    attempt: u32,
    sha256: &str,
    file: &Path,
) -> Result<(), String> {
    if tokio::fs::metadata(file).await.is_ok() {
        return Ok(());
    }
    with_retries(|| snapshot_once(controller, auth, job_id, attempt, sha256, file)).await
}

/// Runs `once` until it succeeds, fails for good, or has been tried [`TRIES`] times.
async fn with_retries<T, F: Future<Output = Result<T, (bool, String)>>>(
    mut once: impl FnMut() -> F,
) -> Result<T, String> {
    let mut delay = Duration::from_millis(250);
    let mut last = String::new();
    for _ in 0..TRIES {
        match once().await {
            Ok(p) => return Ok(p),
            Err((true, e)) => last = e,
            Err((false, e)) => return Err(e),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
    Err(format!("cannot reach the controller: {last}"))
}

/// The controller's client, and whether a failure to get it may pass.
async fn client(
    controller: &str,
    auth: &crate::dial::Auth,
) -> Result<crate::dial::Client, (bool, String)> {
    crate::dial::connect(controller, auth)
        .await
        .map_err(|e| (!matches!(e, crate::dial::DialError::Token), e.to_string()))
}

fn retryable(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded
    )
}

async fn snapshot_once(
    controller: &str,
    auth: &crate::dial::Auth,
    job_id: &str,
    attempt: u32,
    sha256: &str,
    file: &Path,
) -> Result<(), (bool, String)> {
    let mut client = client(controller, auth).await?;
    let mut stream = client
        .download_snapshot(v1::SnapshotRequest {
            job_id: job_id.into(),
            attempt,
            sha256: sha256.into(),
        })
        .await
        .map_err(|s| (retryable(&s), s.message().to_string()))?
        .into_inner();
    let dir = file.parent().unwrap_or(Path::new("."));
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| (false, format!("cannot create {}: {e}", dir.display())))?;
    let tmp = file.with_extension(format!("{}.part", rand::random::<u64>()));
    let result = async {
        let mut out = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| (false, format!("cannot create {}: {e}", tmp.display())))?;
        let mut hasher = Sha256::new();
        loop {
            match stream.message().await {
                Ok(Some(chunk)) => {
                    hasher.update(&chunk.data);
                    out.write_all(&chunk.data)
                        .await
                        .map_err(|e| (false, format!("cannot write {}: {e}", tmp.display())))?;
                }
                Ok(None) => break,
                Err(s) => return Err((retryable(&s), s.message().to_string())),
            }
        }
        let ours = hex::encode(hasher.finalize());
        if ours != sha256 {
            return Err((
                true,
                format!("got a snapshot with sha256 {ours}, expected {sha256}"),
            ));
        }
        out.sync_all()
            .await
            .map_err(|e| (false, format!("cannot write {}: {e}", tmp.display())))?;
        tokio::fs::rename(&tmp, file)
            .await
            .map_err(|e| (false, format!("cannot rename {}: {e}", tmp.display())))
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    result
}

/// One try; the error says whether another try may help.
async fn download_once(
    controller: &str,
    auth: &crate::dial::Auth,
    job_id: &str,
    attempt: u32,
    source: &str,
    dir: &Path,
) -> Result<PathBuf, (bool, String)> {
    let mut client = client(controller, auth).await?;
    let mut stream = client
        .download_checkpoint(v1::CheckpointRequest {
            job_id: job_id.into(),
            attempt,
            source_job_id: source.into(),
        })
        .await
        .map_err(|s| (retryable(&s), s.message().to_string()))?
        .into_inner();
    let next = |m: Result<Option<v1::CheckpointChunk>, tonic::Status>| match m {
        Ok(Some(c)) => Ok(c.part),
        Ok(None) => Err((true, "the stream ended early".to_string())),
        Err(s) => Err((retryable(&s), s.message().to_string())),
    };
    let Some(Part::Header(h)) = next(stream.message().await)? else {
        return Err((false, "the controller sent no header".into()));
    };
    // The name comes from the controller's store, checked there; still, a bare file name only.
    let name = Path::new(&h.file_name)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty() && n != "." && n != "..")
        .unwrap_or_else(|| "checkpoint".into());
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| (false, format!("cannot create {}: {e}", dir.display())))?;
    let path = dir.join(&name);
    let mut file = tokio::fs::File::create(&path)
        .await
        .map_err(|e| (false, format!("cannot create {}: {e}", path.display())))?;
    let mut hasher = Sha256::new();
    let mut got = 0u64;
    loop {
        match next(stream.message().await)? {
            Some(Part::Data(d)) => {
                got += d.len() as u64;
                if got > h.size {
                    return Err((false, format!("more than the {} bytes announced", h.size)));
                }
                hasher.update(&d);
                file.write_all(&d)
                    .await
                    .map_err(|e| (false, format!("cannot write {}: {e}", path.display())))?;
            }
            Some(Part::Sha256(sum)) => {
                let ours = hex::encode(hasher.finalize());
                if got != h.size || ours != sum {
                    return Err((
                        true,
                        format!(
                            "got {got} bytes with sha256 {ours}, expected {} and {sum}",
                            h.size
                        ),
                    ));
                }
                file.sync_all()
                    .await
                    .map_err(|e| (false, format!("cannot write {}: {e}", path.display())))?;
                return Ok(path);
            }
            _ => return Err((false, "unexpected message in the checkpoint stream".into())),
        }
    }
}
