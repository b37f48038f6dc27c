//! Who may do what through the user API: named tokens with a role. The controller keeps each
//! token's sha256, never the token.
//!
//! | role | may |
//! |---|---|
//! | `viewer` | read everything (jobs, logs, metrics, checkpoints, agents) |
//! | `user` | what a viewer may, submit jobs, stop and delete its own jobs |
//! | `admin` | everything: any job, agents, tokens, secrets |

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::job::first_schema_version;
use crate::time::Timestamp;

/// The layout of token records this version writes.
pub const TOKEN_SCHEMA_VERSION: u32 = 1;

/// The name of the built-in admin (the controller's `admin.token`).
pub const BUILTIN_ADMIN: &str = "admin";

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    User,
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Viewer, Role::User, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::User => "user",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown role `{s}`: one of viewer, user, admin"))
    }
}

/// Who is calling the user API: a token's name and role.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

/// What a caller asks to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act<'a> {
    /// Read anything.
    Read,
    /// Submit a job.
    Submit,
    /// Stop or delete the job owned by `owner` (`None`: a job from before owners were kept).
    Change { owner: Option<&'a str> },
    /// Manage agents, tokens and secrets.
    Administer,
}

impl Caller {
    /// Whether the caller may do `act`; `Err` says why not, for a 403.
    pub fn may(&self, act: Act<'_>) -> Result<(), String> {
        let ok = match (self.role, act) {
            (_, Act::Read) => true,
            (Role::Admin, _) => true,
            (Role::User, Act::Submit) => true,
            (Role::User, Act::Change { owner }) => owner == Some(self.name.as_str()),
            _ => false,
        };
        if ok {
            return Ok(());
        }
        Err(match act {
            Act::Read => unreachable!("every role reads"),
            Act::Submit => format!("{} `{}` may not submit jobs", self.role, self.name),
            Act::Change { owner } => format!(
                "{} `{}` may not change a job of {}: only its owner or an admin may",
                self.role,
                self.name,
                owner.map_or("no recorded owner".to_string(), |o| format!("`{o}`"))
            ),
            Act::Administer => format!(
                "{} `{}` may not do this: it needs an admin token",
                self.role, self.name
            ),
        })
    }
}

/// A named token as the controller stores it (at `tokens/NAME`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    #[serde(default = "first_schema_version")]
    pub schema_version: u32,
    pub name: String,
    pub role: Role,
    /// sha256 of the token, hex.
    pub sha256: String,
    pub created_at: Timestamp,
    /// Who created it.
    pub created_by: String,
}

/// Whether `name` may name a token: 1 to 64 of `a-z0-9._-`, starting with a letter or digit.
pub fn is_token_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(name: &str, role: Role) -> Caller {
        Caller {
            name: name.into(),
            role,
        }
    }

    #[test]
    fn each_role_may_what_its_table_says() {
        let (v, u, a) = (
            caller("v", Role::Viewer),
            caller("u", Role::User),
            caller("a", Role::Admin),
        );
        let mine = Act::Change { owner: Some("u") };
        let theirs = Act::Change { owner: Some("x") };
        let legacy = Act::Change { owner: None };
        let table = [
            (&v, Act::Read, true),
            (&v, Act::Submit, false),
            (&v, mine, false),
            (&v, Act::Administer, false),
            (&u, Act::Read, true),
            (&u, Act::Submit, true),
            (&u, mine, true),
            (&u, theirs, false),
            (&u, legacy, false),
            (&u, Act::Administer, false),
            (&a, Act::Submit, true),
            (&a, theirs, true),
            (&a, legacy, true),
            (&a, Act::Administer, true),
        ];
        for (c, act, ok) in table {
            assert_eq!(c.may(act).is_ok(), ok, "{c:?} {act:?}");
        }
        let why = u.may(theirs).unwrap_err();
        assert!(why.contains("only its owner or an admin"), "{why}");
    }

    #[test]
    fn names_and_roles_parse() {
        for ok in ["alice", "ci-bot", "team.ml_1", "7"] {
            assert!(is_token_name(ok), "{ok}");
        }
        for bad in ["", "Alice", "-x", "a b", "a/b", &"x".repeat(65)] {
            assert!(!is_token_name(bad), "{bad}");
        }
        assert_eq!("user".parse::<Role>(), Ok(Role::User));
        assert!(
            "root"
                .parse::<Role>()
                .unwrap_err()
                .contains("viewer, user, admin")
        );
    }
}
