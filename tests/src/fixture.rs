//! Git repositories made at test time with the git CLI, in temp dirs.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

pub struct GitRepo {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl GitRepo {
    /// A repository on branch `main` with one commit holding `files`.
    pub fn new(files: &[(&str, &str)]) -> anyhow::Result<GitRepo> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("repo");
        std::fs::create_dir_all(&path)?;
        git(&path, &["init", "-q", "-b", "main"])?;
        let repo = GitRepo { _dir: dir, path };
        repo.commit(files, "initial")?;
        Ok(repo)
    }

    pub fn url(&self) -> String {
        format!("file://{}", self.path.display())
    }

    /// Writes `files` and commits them; returns the commit id.
    pub fn commit(&self, files: &[(&str, &str)], message: &str) -> anyhow::Result<String> {
        for (name, body) in files {
            let p = self.path.join(name);
            if let Some(d) = p.parent() {
                std::fs::create_dir_all(d)?;
            }
            std::fs::write(&p, body)?;
        }
        git(&self.path, &["add", "-A"])?;
        git(&self.path, &["commit", "-q", "-m", message])?;
        self.head()
    }

    pub fn head(&self) -> anyhow::Result<String> {
        Ok(git(&self.path, &["rev-parse", "HEAD"])?.trim().to_string())
    }
}

pub fn git(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "Runyard Test")
        .env("GIT_AUTHOR_EMAIL", "test@runyard.invalid")
        .env("GIT_COMMITTER_NAME", "Runyard Test")
        .env("GIT_COMMITTER_EMAIL", "test@runyard.invalid")
        .output()
        .with_context(|| format!("running git {args:?}"))?;
    if !out.status.success() {
        bail!(
            "git {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
