//! Checkout cache: one bare mirror per repository URL, fetched on use, and per-job trees
//! materialized from it.
//!
//! Invariants:
//! - A mirror lives at `<root>/<16 hex of sha1(url)>-<readable suffix>.git`. It is created in a
//!   temporary directory and renamed into place only after its first fetch succeeded, so a bad URL
//!   leaves nothing behind and an existing mirror always holds a complete fetch.
//! - Only one fetch per mirror runs at a time (a per-mirror async lock, held until the blocking
//!   git2 work ends even if the caller's future is dropped). Materializing reads objects only,
//!   which a concurrent fetch never rewrites (no gc), so it runs outside the lock.
//! - The mirror tracks `refs/heads/*` and `refs/tags/*` of the remote (pruned), and its `HEAD`
//!   follows the remote's `HEAD`, so an empty revision means "the default branch".
//! - A full commit id already in the mirror is used without touching the network.
//! - Credentials: only those `git_auth` chooses for the URL asking (its host, over https or
//!   ssh), then the agent user's ssh-agent and default keys over ssh; never over plain http.
//! - Cancellation: `checkout` takes a [`CancellationToken`]; a fetch in progress notices it at
//!   the next progress callback and returns [`CheckoutError::Cancelled`]. Dropping the future
//!   also works but lets a running fetch finish in the background.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use git2::build::CheckoutBuilder;
use git2::{
    AutotagOption, Cred, CredentialType, ErrorCode, FetchOptions, FetchPrune, ObjectType, Oid,
    RemoteCallbacks, Repository,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::git_auth::{self, Choice, GitCredentials};

/// Refspecs of a mirror: every branch and tag, forced (remote rewrites win).
const MIRROR_REFSPECS: [&str; 2] = ["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"];

/// Why a checkout failed. The messages are meant for users.
#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    /// The repository could not be cloned or fetched; carries git's message.
    #[error("{0}")]
    Clone(String),
    /// The revision does not name a commit of the repository.
    #[error("{0}")]
    Revision(String),
    /// The commit's tree could not be written to the job directory.
    #[error("cannot write the checkout to {path}: {message}")]
    Materialize { path: PathBuf, message: String },
    /// A local file system operation on the cache failed.
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The caller cancelled the checkout.
    #[error("checkout cancelled")]
    Cancelled,
}

/// Bare mirrors of remote repositories under one cache root, shared by all jobs of an agent.
pub struct CheckoutCache {
    root: PathBuf,
    credentials: Arc<GitCredentials>,
    /// One lock per mirror directory; entries are never removed (one per repository ever used).
    locks: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
}

impl CheckoutCache {
    /// A cache keeping its mirrors in `root` (created on first use), fetching with no
    /// credentials but the ssh ones of the agent's user.
    pub fn new(root: PathBuf) -> Self {
        CheckoutCache::with_credentials(root, GitCredentials::default())
    }

    /// A cache that authenticates with `credentials` (by host, see `git_auth`).
    pub fn with_credentials(root: PathBuf, credentials: GitCredentials) -> Self {
        CheckoutCache {
            root,
            credentials: Arc::new(credentials),
            locks: Mutex::new(HashMap::new()),
        }
    }

    /// The directory of the mirror for `repo`.
    pub fn mirror_path(&self, repo: &str) -> PathBuf {
        self.root.join(mirror_dir_name(repo))
    }

    /// Fetches `repo` into its mirror (cloning it on first use), resolves `revision` (branch,
    /// tag, full or abbreviated commit id, or empty for the remote's default branch) and writes
    /// that commit's tree into `dest`, which must not exist yet or be empty.
    ///
    /// Returns the resolved commit id (40 hex).
    pub async fn checkout(
        &self,
        repo: &str,
        revision: &str,
        dest: &Path,
        cancel: &CancellationToken,
    ) -> Result<String, CheckoutError> {
        let mirror = self.mirror_path(repo);
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
            locks.entry(mirror.clone()).or_default().clone()
        };
        let guard = tokio::select! {
            biased;
            () = cancel.cancelled() => return Err(CheckoutError::Cancelled),
            g = lock.lock_owned() => g,
        };
        let (url, rev, root, token) = (
            repo.to_string(),
            revision.to_string(),
            self.root.clone(),
            cancel.clone(),
        );
        let mirror_dir = mirror.clone();
        let creds = self.credentials.clone();
        let oid = spawn_git(move || {
            // The guard moves here so it is released only when the blocking work ends.
            let _guard = guard;
            let oid = update_and_resolve(&root, &mirror_dir, &url, &rev, &creds, &token)?;
            let _ = crate::cache::touch_mirror(&mirror_dir);
            Ok(oid)
        })
        .await?;
        if cancel.is_cancelled() {
            return Err(CheckoutError::Cancelled);
        }
        let dest = dest.to_path_buf();
        spawn_git(move || materialize(&mirror, oid, &dest)).await?;
        info!(repo = %redact(repo), revision, commit = %oid, "checkout done");
        Ok(oid.to_string())
    }
}

async fn spawn_git<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CheckoutError> + Send + 'static,
) -> Result<T, CheckoutError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CheckoutError::Clone(format!("git task failed: {e}")))?
}

/// `<16 hex of sha1(url)>-<last path component, sanitized>.git`: unique per URL, readable in `ls`.
fn mirror_dir_name(url: &str) -> String {
    let hash = Oid::hash_object(ObjectType::Blob, url.as_bytes())
        .map(|o| o.to_string())
        .unwrap_or_else(|_| "0".repeat(40));
    let tail = url
        .trim_end_matches('/')
        .rsplit(['/', ':'])
        .next()
        .unwrap_or("");
    let tail = tail.strip_suffix(".git").unwrap_or(tail);
    let suffix: String = tail
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    let suffix = suffix.trim_start_matches('.');
    if suffix.is_empty() {
        format!("{}.git", &hash[..16])
    } else {
        format!("{}-{suffix}.git", &hash[..16])
    }
}

/// The URL with any password or token in its user info replaced, for messages and logs.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            let user = userinfo.split(':').next().unwrap_or("");
            let masked = if userinfo.contains(':') {
                format!("{user}:***")
            } else if scheme.starts_with("http") {
                // `https://TOKEN@host/...` is a common way to pass a token.
                "***".to_string()
            } else {
                user.to_string()
            };
            format!("{scheme}://{masked}{}", &rest[at..])
        }
        None => url.to_string(),
    }
}

/// Blocking: brings the mirror up to date (unless the revision is a commit already present) and
/// resolves the revision in it.
fn update_and_resolve(
    root: &Path,
    mirror: &Path,
    url: &str,
    revision: &str,
    creds: &GitCredentials,
    cancel: &CancellationToken,
) -> Result<Oid, CheckoutError> {
    if url.starts_with('/') && !Path::new(url).exists() {
        // libgit2 would say "unsupported URL protocol".
        return Err(CheckoutError::Clone(format!(
            "cannot fetch {url}: no such directory"
        )));
    }
    let repo = if mirror.exists() {
        let repo = Repository::open_bare(mirror).map_err(|e| {
            CheckoutError::Clone(format!(
                "cannot open the cached mirror of {} at {}: {}",
                redact(url),
                mirror.display(),
                e.message()
            ))
        })?;
        if let Some(oid) = present_commit(&repo, revision) {
            debug!(repo = %redact(url), commit = %oid, "commit already in mirror, not fetching");
            return Ok(oid);
        }
        fetch(&repo, url, creds, cancel)?;
        repo
    } else {
        create_mirror(root, mirror, url, creds, cancel)?
    };
    resolve(&repo, url, revision, cancel)
}

/// A full commit id that is already in the mirror: nothing to fetch, ever.
fn present_commit(repo: &Repository, revision: &str) -> Option<Oid> {
    if revision.len() != 40 || !revision.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let oid = Oid::from_str(revision).ok()?;
    repo.find_commit(oid).ok().map(|c| c.id())
}

fn create_mirror(
    root: &Path,
    mirror: &Path,
    url: &str,
    creds: &GitCredentials,
    cancel: &CancellationToken,
) -> Result<Repository, CheckoutError> {
    std::fs::create_dir_all(root).map_err(|source| CheckoutError::Io {
        what: "cannot create the checkout cache",
        path: root.to_path_buf(),
        source,
    })?;
    let mut tmp = mirror.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    if tmp.exists() {
        // Left by a crash during a first fetch; nothing else uses it (we hold the mirror lock).
        std::fs::remove_dir_all(&tmp).map_err(|source| CheckoutError::Io {
            what: "cannot remove a stale temporary mirror",
            path: tmp.clone(),
            source,
        })?;
    }
    let result = Repository::init_bare(&tmp)
        .map_err(|e| CheckoutError::Clone(format!("cannot create a mirror: {}", e.message())))
        .and_then(|repo| fetch(&repo, url, creds, cancel));
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, mirror).map_err(|source| CheckoutError::Io {
        what: "cannot move the new mirror into place at",
        path: mirror.to_path_buf(),
        source,
    })?;
    info!(repo = %redact(url), mirror = %mirror.display(), "mirror created");
    Repository::open_bare(mirror)
        .map_err(|e| CheckoutError::Clone(format!("cannot open the new mirror: {}", e.message())))
}

/// Fetches branches and tags (only what's new: git negotiates with what the mirror has) and
/// points the mirror's `HEAD` where the remote's points.
fn fetch(
    repo: &Repository,
    url: &str,
    creds: &GitCredentials,
    cancel: &CancellationToken,
) -> Result<(), CheckoutError> {
    let clone_err = |e: git2::Error| {
        if cancel.is_cancelled() {
            CheckoutError::Cancelled
        } else {
            CheckoutError::Clone(format!("cannot fetch {}: {}", redact(url), e.message()))
        }
    };
    let mut remote = repo.remote_anonymous(url).map_err(clone_err)?;
    let mut opts = FetchOptions::new();
    opts.remote_callbacks(callbacks(url, creds, cancel))
        .prune(FetchPrune::On)
        .download_tags(AutotagOption::None);
    remote
        .fetch(&MIRROR_REFSPECS, Some(&mut opts), Some("runyard: fetch"))
        .map_err(clone_err)?;

    // The ref list stays available after the fetch disconnected.
    match remote.default_branch() {
        Ok(head) => {
            let head = head.as_str().unwrap_or_default().to_string();
            if repo.find_reference(&head).is_ok() {
                repo.reference_symbolic("HEAD", &head, true, "runyard: remote HEAD")
                    .map_err(clone_err)?;
            }
        }
        Err(_) => {
            // No symref advertised (old server or a detached HEAD): use HEAD's commit if any.
            let head = remote
                .list()
                .ok()
                .and_then(|l| l.iter().find(|h| h.name() == "HEAD").map(|h| h.oid()));
            if let Some(oid) = head.filter(|o| repo.find_commit(*o).is_ok()) {
                repo.set_head_detached(oid).map_err(clone_err)?;
            }
        }
    }
    debug!(repo = %redact(url), "mirror fetched");
    Ok(())
}

/// Callbacks for fetches: credentials (see the module invariants) and cancellation through the
/// progress callbacks.
fn callbacks<'a>(
    repo_url: &'a str,
    creds: &'a GitCredentials,
    cancel: &CancellationToken,
) -> RemoteCallbacks<'a> {
    let mut cb = RemoteCallbacks::new();
    // libgit2 calls back again after each rejected credential: count to try each one once.
    let (mut ssh_tries, mut token_tries) = (0usize, 0u32);
    let have_agent = std::env::var_os("SSH_AUTH_SOCK").is_some();
    cb.credentials(move |url, username, allowed| {
        let user = username.unwrap_or("git");
        if allowed.contains(CredentialType::USERNAME) {
            return Cred::username(user);
        }
        if allowed.contains(CredentialType::SSH_KEY) {
            // The host's configured key, then the agent user's ssh-agent and default keys.
            let mut keys: Vec<Option<PathBuf>> = Vec::new();
            if let Ok(Choice::SshKey(key)) = creds.choose(repo_url, url) {
                keys.push(Some(key));
            }
            if have_agent {
                keys.push(None);
            }
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default();
            keys.extend(
                ["id_ed25519", "id_rsa"]
                    .iter()
                    .map(|k| home.join(".ssh").join(k))
                    .filter(|p| p.is_file())
                    .map(Some),
            );
            ssh_tries += 1;
            return match keys.get(ssh_tries - 1) {
                Some(Some(key)) => Cred::ssh_key(user, None, key, None),
                Some(None) => Cred::ssh_key_from_agent(user),
                None => Err(git2::Error::from_str(
                    "ssh authentication failed (tried the host's --git-credential key, ssh-agent, \
                     ~/.ssh/id_ed25519, ~/.ssh/id_rsa)",
                )),
            };
        }
        if allowed.contains(CredentialType::USER_PASS_PLAINTEXT) && token_tries == 0 {
            token_tries += 1;
            match creds.choose(repo_url, url) {
                Ok(Choice::Token(token)) => {
                    return Cred::userpass_plaintext(git_auth::TOKEN_USER, &token);
                }
                Err(message) => return Err(git2::Error::from_str(&message)),
                Ok(_) => {}
            }
        }
        Err(git2::Error::from_str(
            "the remote asks for credentials and this agent has none for it: give the agent \
             --git-credential HOST=FILE (sent over https and ssh only, never plain http)",
        ))
    });
    let c = cancel.clone();
    cb.transfer_progress(move |_| !c.is_cancelled());
    let c = cancel.clone();
    cb.sideband_progress(move |_| !c.is_cancelled());
    cb
}

/// Resolves a revision in the mirror: empty = `HEAD`; then tag, branch (as git orders them),
/// a full ref name, then a full or abbreviated commit id. Expressions (`main~1`) are not
/// accepted: the recorded commit must be what the user named.
fn resolve(
    repo: &Repository,
    url: &str,
    revision: &str,
    cancel: &CancellationToken,
) -> Result<Oid, CheckoutError> {
    if cancel.is_cancelled() {
        return Err(CheckoutError::Cancelled);
    }
    let not_found = || {
        CheckoutError::Revision(format!(
            "revision `{revision}` not found in {}: no such branch, tag or commit",
            redact(url)
        ))
    };
    if revision.is_empty() {
        return repo
            .head()
            .and_then(|h| h.peel_to_commit())
            .map(|c| c.id())
            .map_err(|_| {
                CheckoutError::Revision(format!(
                    "{} has no default branch (empty repository?): name a revision",
                    redact(url)
                ))
            });
    }
    let candidates = [
        format!("refs/tags/{revision}"),
        format!("refs/heads/{revision}"),
        revision.to_string(),
    ];
    for name in candidates.iter().filter(|n| n.starts_with("refs/")) {
        if let Ok(reference) = repo.find_reference(name) {
            return reference.peel_to_commit().map(|c| c.id()).map_err(|_| {
                CheckoutError::Revision(format!(
                    "revision `{revision}` in {} does not point to a commit",
                    redact(url)
                ))
            });
        }
    }
    let is_hex =
        (4..=40).contains(&revision.len()) && revision.bytes().all(|b| b.is_ascii_hexdigit());
    if !is_hex {
        return Err(not_found());
    }
    match repo.find_commit_by_prefix(revision) {
        Ok(c) => Ok(c.id()),
        Err(e) if e.code() == ErrorCode::Ambiguous => Err(CheckoutError::Revision(format!(
            "revision `{revision}` is ambiguous in {}: give more digits",
            redact(url)
        ))),
        Err(_) => Err(not_found()),
    }
}

/// Blocking: writes the tree of `commit` into `dest` (no `.git` there).
fn materialize(mirror: &Path, commit: Oid, dest: &Path) -> Result<(), CheckoutError> {
    let materialize_err = |message: String| CheckoutError::Materialize {
        path: dest.to_path_buf(),
        message,
    };
    match std::fs::read_dir(dest) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(materialize_err("the directory is not empty".into()));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dest).map_err(|source| CheckoutError::Io {
                what: "cannot create the checkout directory",
                path: dest.to_path_buf(),
                source,
            })?;
        }
        Err(source) => {
            return Err(CheckoutError::Io {
                what: "cannot read the checkout directory",
                path: dest.to_path_buf(),
                source,
            });
        }
    }
    let git = |e: git2::Error| materialize_err(e.message().to_string());
    let repo = Repository::open_bare(mirror).map_err(git)?;
    let tree = repo
        .find_commit(commit)
        .and_then(|c| c.tree())
        .map_err(git)?;
    // An in-memory index of the tree: checkouts run outside the mirror lock, so they must not
    // read or write the shared mirror's index file.
    let mut index = git2::Index::new().map_err(git)?;
    index.read_tree(&tree).map_err(git)?;
    let mut opts = CheckoutBuilder::new();
    opts.target_dir(dest)
        .force()
        .recreate_missing(true)
        .update_index(false)
        .disable_filters(true);
    repo.checkout_index(Some(&mut index), Some(&mut opts))
        .map_err(git)?;
    Ok(())
}

/// The script to run: `script` (a relative path) must exist in `worktree`, be a regular file
/// (symlinks are followed) and stay inside `worktree`. Returns its canonical path.
pub fn resolve_script(worktree: &Path, script: &str) -> Result<PathBuf, String> {
    resolve_script_in(worktree, script, "in the repository")
}

/// [`resolve_script`], naming `commit` in its messages ("not found in the repository at abc123").
pub fn resolve_script_at(worktree: &Path, script: &str, commit: &str) -> Result<PathBuf, String> {
    let short: String = commit.chars().take(12).collect();
    resolve_script_in(worktree, script, &format!("in the repository at {short}"))
}

fn resolve_script_in(worktree: &Path, script: &str, at: &str) -> Result<PathBuf, String> {
    let rel = Path::new(script);
    if script.is_empty()
        || !rel
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(format!(
            "script `{script}` is not a relative path inside the repository"
        ));
    }
    let root = worktree
        .canonicalize()
        .map_err(|e| format!("checkout {} unreadable: {e}", worktree.display()))?;
    let path = root.join(rel);
    let meta = match std::fs::symlink_metadata(&path) {
        Ok(m) => m,
        Err(_) => {
            // Also covers a symlinked directory on the way that leads nowhere.
            return match path.canonicalize() {
                Ok(p) if !p.starts_with(&root) => Err(format!(
                    "script `{script}` is a symlink pointing outside the repository"
                )),
                _ => Err(format!("script `{script}` not found {at}")),
            };
        }
    };
    let real = match path.canonicalize() {
        Ok(p) => p,
        Err(_) if meta.file_type().is_symlink() => {
            let target = std::fs::read_link(&path).unwrap_or_default();
            let lexical = path.parent().unwrap_or(&root).join(&target);
            return if target.is_absolute() || !normalize(&lexical).starts_with(&root) {
                Err(format!(
                    "script `{script}` is a symlink pointing outside the repository"
                ))
            } else {
                Err(format!("script `{script}` is a broken symlink {at}"))
            };
        }
        Err(_) => return Err(format!("script `{script}` not found {at}")),
    };
    if !real.starts_with(&root) {
        return Err(format!(
            "script `{script}` is a symlink pointing outside the repository"
        ));
    }
    if !real.is_file() {
        return Err(format!("script `{script}` is not a file {at}"));
    }
    Ok(real)
}

/// Lexical `..`/`.` removal (no file system access), for a link whose target does not exist.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_names_are_stable_readable_and_distinct() {
        let a = mirror_dir_name("https://github.com/org/My-Repo.git");
        assert!(a.ends_with("-My-Repo.git"), "{a}");
        assert_eq!(a, mirror_dir_name("https://github.com/org/My-Repo.git"));
        assert_eq!(a.len(), 16 + 1 + "My-Repo.git".len());
        let b = mirror_dir_name("git@github.com:other/My-Repo.git");
        assert_ne!(a, b);
        assert!(b.ends_with("-My-Repo.git"), "{b}");
        assert_eq!(
            mirror_dir_name("file:///").len(),
            "0123456789abcdef.git".len()
        );
        assert!(mirror_dir_name("https://h/a b?c").ends_with("-a_b_c.git"));
        assert!(!mirror_dir_name("https://h/..").contains("/"));
    }

    #[test]
    fn redact_hides_credentials_only() {
        assert_eq!(
            redact("https://user:tok@host/r.git"),
            "https://user:***@host/r.git"
        );
        assert_eq!(redact("https://tok@host/r.git"), "https://***@host/r.git");
        assert_eq!(redact("https://host/a@b"), "https://host/a@b");
        assert_eq!(redact("git@host:r.git"), "git@host:r.git");
        assert_eq!(redact("ssh://git@host/r.git"), "ssh://git@host/r.git");
    }
}
