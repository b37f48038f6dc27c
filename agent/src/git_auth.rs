//! Git credentials by host: `--git-credential HOST=FILE` gives the secret in FILE to HOST alone,
//! and only over a transport that protects it.
//!
//! ```text
//! remote URL                  credential of its host       sent
//! https://HOST[:port]/...     token file                   as the password of `x-access-token`
//! ssh://HOST/... , git@HOST:  private key file             as the ssh key
//! http://, git://, file://    —                            never
//! any other host              —                            never
//! ```
//! A file holding `-----BEGIN ... PRIVATE KEY-----` is an ssh key (used over ssh only); any other
//! file is a token (used over https only). `HOST` may carry a port (`git.internal:8443`): then
//! only that port matches; without one, any port of the host does.
//!
//! Invariants:
//! - The host is taken from the URL libgit2 is about to authenticate to (after redirects), and
//!   must also be the host of the job's repository URL: a redirect to another host never
//!   receives the credential.
//! - Secrets are read from their files at use, never kept in memory longer than one
//!   authentication, never put in a job's environment; the agent refuses at start a credential
//!   file a job could read (see `lib`).
//! - `RUNYARD_GIT_TOKEN` (a token sent to every host, even over plain http) is refused at start
//!   with a message naming its replacement.

use std::path::PathBuf;

/// The environment variable of the old, host-less token; refused at start.
pub const LEGACY_TOKEN_ENV: &str = "RUNYARD_GIT_TOKEN";
/// The user name that carries a token over https (GitHub, GitLab, Gitea accept it).
pub const TOKEN_USER: &str = "x-access-token";

/// One `HOST=FILE` credential.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostCredential {
    /// Lower-case host name, without a port.
    pub host: String,
    /// Only this port matches, when given.
    pub port: Option<u16>,
    pub file: PathBuf,
}

impl std::str::FromStr for HostCredential {
    type Err = String;

    /// Parses `HOST=FILE` or `HOST:PORT=FILE`.
    fn from_str(s: &str) -> Result<HostCredential, String> {
        let bad = |why: &str| {
            format!(
                "invalid git credential `{s}`: {why}; write HOST=FILE, e.g. github.com=/etc/runyard/github.token"
            )
        };
        let (host, file) = s.trim().split_once('=').ok_or_else(|| bad("no `=`"))?;
        let (host, port) = match host.rsplit_once(':') {
            Some((h, p)) => (
                h,
                Some(
                    p.parse::<u16>()
                        .map_err(|_| bad("the port is not a number"))?,
                ),
            ),
            None => (host, None),
        };
        let host = host.trim().to_ascii_lowercase();
        if host.is_empty()
            || !host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_')
        {
            return Err(bad(
                "HOST must be a host name such as github.com, without a scheme or path",
            ));
        }
        let file = PathBuf::from(file.trim());
        if !file.is_absolute() {
            return Err(bad("FILE must be an absolute path"));
        }
        Ok(HostCredential { host, port, file })
    }
}

/// Parses a comma-separated list of `HOST=FILE` (the `RUNYARD_GIT_CREDENTIALS` form).
pub fn parse_list(list: &str) -> Result<Vec<HostCredential>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::parse)
        .collect()
}

/// What a credential file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretKind {
    Token,
    SshKey,
}

/// What to authenticate with for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Choice {
    /// `x-access-token` and this token (https).
    Token(String),
    /// This private key file (ssh).
    SshKey(PathBuf),
    /// Nothing configured for this URL.
    None,
}

/// The credentials of one agent, by host.
#[derive(Clone, Debug, Default)]
pub struct GitCredentials {
    hosts: Vec<HostCredential>,
}

/// A remote's scheme, host and port, as far as credentials care.
#[derive(Debug, PartialEq, Eq)]
struct Remote<'a> {
    scheme: &'a str,
    host: String,
    port: Option<u16>,
}

/// Parses `scheme://[user@]host[:port]/...` and scp-like `user@host:path` (ssh).
fn remote(url: &str) -> Option<Remote<'_>> {
    let (scheme, authority) = match url.split_once("://") {
        Some((scheme, rest)) => (scheme, rest.split('/').next().unwrap_or("")),
        None => {
            let (userhost, _) = url.split_once(':')?;
            let (_, host) = userhost.split_once('@')?;
            return Some(Remote {
                scheme: "ssh",
                host: host.to_ascii_lowercase(),
                port: None,
            });
        }
    };
    let hostport = authority.rsplit('@').next().unwrap_or(authority);
    let (host, port) = if let Some(rest) = hostport.strip_prefix('[') {
        // [v6]:port
        let (h, p) = rest.split_once(']')?;
        (h, p.strip_prefix(':').and_then(|p| p.parse().ok()))
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p.parse().ok()?)),
            None => (hostport, None),
        }
    };
    Some(Remote {
        scheme,
        host: host.to_ascii_lowercase(),
        port,
    })
}

impl GitCredentials {
    pub fn new(hosts: Vec<HostCredential>) -> GitCredentials {
        GitCredentials { hosts }
    }

    /// The credential file for authenticating to `url` (libgit2's, after redirects) while
    /// fetching `repo`, and what kind it must be; `None` unless both name the same configured
    /// host over https (token) or ssh (key).
    fn file_for(&self, repo: &str, url: &str) -> Option<(&HostCredential, SecretKind)> {
        let (target, origin) = (remote(url)?, remote(repo)?);
        if target.host != origin.host {
            return None;
        }
        let kind = match (target.scheme, origin.scheme) {
            ("https", "https") => SecretKind::Token,
            ("ssh" | "ssh+git" | "git+ssh", "ssh" | "ssh+git" | "git+ssh") => SecretKind::SshKey,
            _ => return None,
        };
        self.hosts
            .iter()
            .find(|c| c.host == target.host && (c.port.is_none() || c.port == target.port))
            .map(|c| (c, kind))
    }

    /// What to send when `url` asks for credentials while fetching `repo`. Reads the file
    /// (blocking); a file of the wrong kind for the transport is not sent.
    pub fn choose(&self, repo: &str, url: &str) -> Result<Choice, String> {
        let Some((cred, kind)) = self.file_for(repo, url) else {
            return Ok(Choice::None);
        };
        let text = std::fs::read_to_string(&cred.file).map_err(|e| {
            format!(
                "cannot read the git credential for {} ({}): {e}",
                cred.host,
                cred.file.display()
            )
        })?;
        match (kind, kind_of(&text)) {
            (SecretKind::Token, SecretKind::Token) => Ok(Choice::Token(text.trim().to_string())),
            (SecretKind::SshKey, SecretKind::SshKey) => Ok(Choice::SshKey(cred.file.clone())),
            _ => Ok(Choice::None),
        }
    }
}

/// A private key or a token, by the file's first line.
pub fn kind_of(text: &str) -> SecretKind {
    let first = text.trim_start().lines().next().unwrap_or("");
    if first.starts_with("-----BEGIN") && first.contains("PRIVATE KEY") {
        SecretKind::SshKey
    } else {
        SecretKind::Token
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_parse_and_refuse_what_is_not_host_eq_file() {
        let c: HostCredential = "GitHub.com=/etc/runyard/gh.token".parse().unwrap();
        assert_eq!(
            c,
            HostCredential {
                host: "github.com".into(),
                port: None,
                file: "/etc/runyard/gh.token".into()
            }
        );
        let c: HostCredential = "git.internal:8443=/k".parse().unwrap();
        assert_eq!((c.host.as_str(), c.port), ("git.internal", Some(8443)));
        for bad in [
            "github.com",
            "https://github.com=/t",
            "github.com=relative",
            "=/t",
            "h:x=/t",
            "a/b=/t",
        ] {
            let e = bad.parse::<HostCredential>().unwrap_err();
            assert!(e.contains("invalid git credential"), "{bad}: {e}");
        }
        assert_eq!(parse_list("a.com=/x, b.org:2=/y,").unwrap().len(), 2);
        assert!(parse_list("a.com=/x,bad").is_err());
    }

    #[test]
    fn urls_name_their_scheme_host_and_port() {
        let r = remote("https://user:pw@Git.Example.com:8443/o/r.git").unwrap();
        assert_eq!(
            (r.scheme, r.host.as_str(), r.port),
            ("https", "git.example.com", Some(8443))
        );
        let r = remote("git@github.com:o/r.git").unwrap();
        assert_eq!((r.scheme, r.host.as_str()), ("ssh", "github.com"));
        let r = remote("http://[::1]:9000/r.git").unwrap();
        assert_eq!((r.host.as_str(), r.port), ("::1", Some(9000)));
        assert!(remote("/srv/repo").is_none());
    }

    #[test]
    fn a_credential_goes_to_its_host_over_https_or_ssh_only() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("t");
        std::fs::write(&token, "s3cret\n").unwrap();
        let key = dir.path().join("k");
        std::fs::write(
            &key,
            "-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH PRIVATE KEY-----\n",
        )
        .unwrap();
        let creds = GitCredentials::new(vec![
            HostCredential {
                host: "git.example.com".into(),
                port: None,
                file: token.clone(),
            },
            HostCredential {
                host: "ssh.example.com".into(),
                port: None,
                file: key.clone(),
            },
            HostCredential {
                host: "pinned.example.com".into(),
                port: Some(8443),
                file: token.clone(),
            },
        ]);
        let tok = Choice::Token("s3cret".into());
        let cases = [
            (
                "https://git.example.com/o/r.git",
                "https://git.example.com/o/r.git",
                tok.clone(),
            ),
            (
                "https://git.example.com:444/o/r.git",
                "https://git.example.com:444/o/r.git",
                tok.clone(),
            ),
            // Plain http, git:// and other hosts never get it.
            (
                "http://git.example.com/o/r.git",
                "http://git.example.com/o/r.git",
                Choice::None,
            ),
            (
                "git://git.example.com/o/r.git",
                "git://git.example.com/o/r.git",
                Choice::None,
            ),
            (
                "https://evil.example.net/o/r.git",
                "https://evil.example.net/o/r.git",
                Choice::None,
            ),
            (
                "https://git.example.com.evil.net/r",
                "https://git.example.com.evil.net/r",
                Choice::None,
            ),
            // A redirect to plain http or to another host does not take it along.
            (
                "https://git.example.com/o/r.git",
                "http://git.example.com/o/r.git",
                Choice::None,
            ),
            (
                "https://git.example.com/o/r.git",
                "https://evil.example.net/o/r.git",
                Choice::None,
            ),
            (
                "https://evil.example.net/o/r.git",
                "https://git.example.com/o/r.git",
                Choice::None,
            ),
            // A port, when given, must match.
            (
                "https://pinned.example.com:8443/r",
                "https://pinned.example.com:8443/r",
                tok.clone(),
            ),
            (
                "https://pinned.example.com/r",
                "https://pinned.example.com/r",
                Choice::None,
            ),
            // A key goes over ssh only; a token never over ssh, a key never over https.
            (
                "ssh://git@ssh.example.com/o/r.git",
                "ssh://git@ssh.example.com/o/r.git",
                Choice::SshKey(key.clone()),
            ),
            (
                "git@ssh.example.com:o/r.git",
                "git@ssh.example.com:o/r.git",
                Choice::SshKey(key.clone()),
            ),
            (
                "https://ssh.example.com/o/r.git",
                "https://ssh.example.com/o/r.git",
                Choice::None,
            ),
            (
                "ssh://git@git.example.com/o/r.git",
                "ssh://git@git.example.com/o/r.git",
                Choice::None,
            ),
        ];
        for (repo, url, want) in cases {
            assert_eq!(
                creds.choose(repo, url).unwrap(),
                want,
                "{repo} asked by {url}"
            );
        }
        std::fs::remove_file(&token).unwrap();
        let err = creds
            .choose("https://git.example.com/r", "https://git.example.com/r")
            .unwrap_err();
        assert!(
            err.contains("cannot read the git credential for git.example.com"),
            "{err}"
        );
    }
}
