//! The agent join token and the CA fingerprint it carries.
//!
//! A controller that serves TLS prints and stores its join token as `RY1<fingerprint>::<secret>`
//! (the shape of k3s's `K10<hash>::...` tokens): the fingerprint is the sha256 of its CA
//! certificate's DER, in 64 lower-case hex digits, so an agent given the token alone can verify
//! the controller it dials. The secret part is what the agent presents (bearer) and what the
//! controller compares. A token without the prefix (`ryj_...`, as in data dirs made before TLS,
//! or a controller run with `--no-tls`) is the secret alone and pins nothing.
//!
//! Invariant: parsing never panics and never guesses: a token that starts with `RY1` but is not
//! `RY1<64 hex>::<non-empty secret>` is an error that says which part is wrong.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

/// Start of a join token that carries a CA fingerprint (version 1 of the format).
pub const PREFIX: &str = "RY1";
/// Between the fingerprint and the secret.
const SEPARATOR: &str = "::";

/// sha256 of a certificate's DER encoding.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of one DER-encoded certificate.
    pub fn of(der: &[u8]) -> Fingerprint {
        Fingerprint(Sha256::digest(der).into())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl FromStr for Fingerprint {
    type Err = JoinTokenError;

    /// 64 hex digits (either case; `:` separators as `openssl x509 -fingerprint` prints them are
    /// accepted).
    fn from_str(s: &str) -> Result<Fingerprint, JoinTokenError> {
        let digits: String = s.chars().filter(|c| *c != ':').collect();
        let bytes = hex::decode(&digits).map_err(|_| JoinTokenError::Fingerprint)?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| JoinTokenError::Fingerprint)?;
        Ok(Fingerprint(bytes))
    }
}

/// A parsed join token: the controller's CA fingerprint, if it has one, and the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub ca: Option<Fingerprint>,
    pub secret: String,
}

impl JoinToken {
    pub fn new(ca: Option<Fingerprint>, secret: impl Into<String>) -> JoinToken {
        JoinToken {
            ca,
            secret: secret.into(),
        }
    }
}

/// The token as printed and stored; `{:?}` hides the secret.
impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.ca {
            Some(ca) => write!(f, "{PREFIX}{ca}{SEPARATOR}{}", self.secret),
            None => f.write_str(&self.secret),
        }
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("ca", &self.ca)
            .field("secret", &"<hidden>")
            .finish()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JoinTokenError {
    #[error("the join token is empty")]
    Empty,
    #[error(
        "the join token starts with `{PREFIX}` but has no `{SEPARATOR}` after the CA fingerprint: copy the whole token from the controller's agent.token file"
    )]
    Separator,
    #[error(
        "the CA fingerprint in the join token is not 64 hex digits: copy the whole token from the controller's agent.token file"
    )]
    Fingerprint,
    #[error("the join token has no secret after `{SEPARATOR}`")]
    Secret,
    #[error("the join token contains whitespace or control characters")]
    Characters,
}

impl FromStr for JoinToken {
    type Err = JoinTokenError;

    /// Surrounding whitespace is ignored (token files end in a newline).
    fn from_str(s: &str) -> Result<JoinToken, JoinTokenError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(JoinTokenError::Empty);
        }
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(JoinTokenError::Characters);
        }
        let Some(rest) = s.strip_prefix(PREFIX) else {
            return Ok(JoinToken::new(None, s));
        };
        let (fingerprint, secret) = rest
            .split_once(SEPARATOR)
            .ok_or(JoinTokenError::Separator)?;
        if fingerprint.len() != 64 {
            return Err(JoinTokenError::Fingerprint);
        }
        let ca = fingerprint.parse()?;
        if secret.is_empty() {
            return Err(JoinTokenError::Secret);
        }
        Ok(JoinToken::new(Some(ca), secret))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "ryj_0123456789abcdefABCDEF";

    #[test]
    fn round_trips_with_and_without_a_fingerprint() {
        let ca = Fingerprint::of(b"a certificate");
        let token = JoinToken::new(Some(ca), SECRET);
        let text = token.to_string();
        assert_eq!(text, format!("RY1{ca}::{SECRET}"));
        assert_eq!(text.len(), 3 + 64 + 2 + SECRET.len());
        assert_eq!(text.parse::<JoinToken>(), Ok(token));
        let old: JoinToken = format!(" {SECRET}\n").parse().unwrap();
        assert_eq!(old, JoinToken::new(None, SECRET));
        assert_eq!(old.to_string(), SECRET);
    }

    #[test]
    fn fingerprints_parse_in_either_case_and_with_colons() {
        let ca = Fingerprint::of(b"x");
        let hex = ca.to_string();
        assert_eq!(hex.len(), 64);
        assert_eq!(hex.to_uppercase().parse::<Fingerprint>(), Ok(ca));
        let colons = hex
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(colons.parse::<Fingerprint>(), Ok(ca));
        assert!("abc".parse::<Fingerprint>().is_err());
    }

    #[test]
    fn malformed_tokens_say_what_is_wrong() {
        let hex = Fingerprint::of(b"x").to_string();
        for (token, err) in [
            ("", JoinTokenError::Empty),
            ("  \n", JoinTokenError::Empty),
            ("RY1abc", JoinTokenError::Separator),
            ("RY1abc::ryj_x", JoinTokenError::Fingerprint),
            (
                &format!("RY1{}::ryj_x", &hex[..63]),
                JoinTokenError::Fingerprint,
            ),
            (
                &format!("RY1{}zz::ryj_x", &hex[..62]),
                JoinTokenError::Fingerprint,
            ),
            (&format!("RY1{hex}::"), JoinTokenError::Secret),
            (&format!("RY1{hex}:: x"), JoinTokenError::Characters),
            ("ryj_a b", JoinTokenError::Characters),
        ] {
            assert_eq!(token.parse::<JoinToken>(), Err(err), "{token:?}");
        }
    }

    #[test]
    fn debug_hides_the_secret() {
        let t = JoinToken::new(Some(Fingerprint::of(b"x")), SECRET);
        assert!(!format!("{t:?}").contains(SECRET));
    }
}
