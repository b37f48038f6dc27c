//! Who is signed in (`GET /api/v1/whoami`) and the named tokens (`/api/v1/tokens`, admins
//! only). A token is shown once, when it is made; after that only its name and role.

use runyard_model::{Caller, Role, Timestamp, TokenRecord};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The caller: its token's name and role.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WhoAmI {
    pub name: String,
    pub role: Role,
}

impl From<&Caller> for WhoAmI {
    fn from(c: &Caller) -> WhoAmI {
        WhoAmI {
            name: c.name.clone(),
            role: c.role,
        }
    }
}

/// The body of `POST /api/v1/tokens`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// 1 to 64 of `a-z0-9._-`; `admin` is reserved.
    pub name: String,
    pub role: Role,
}

/// A named token, without the token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TokenView {
    pub name: String,
    pub role: Role,
    pub created_at: Timestamp,
    /// The token that made it.
    pub created_by: String,
}

impl From<&TokenRecord> for TokenView {
    fn from(t: &TokenRecord) -> TokenView {
        TokenView {
            name: t.name.clone(),
            role: t.role,
            created_at: t.created_at,
            created_by: t.created_by.clone(),
        }
    }
}

/// A token just made: the only time the token itself is shown.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TokenCreated {
    #[serde(flatten)]
    pub view: TokenView,
    /// Send as `Authorization: Bearer <token>` (the CLI reads RUNYARD_TOKEN). Not shown again.
    pub token: String,
}

/// `GET /api/v1/tokens`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TokenList {
    pub tokens: Vec<TokenView>,
}

/// The body of `PUT /api/v1/secrets/{name}`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetSecret {
    /// The value (at most 64 KiB). Never shown again.
    pub value: String,
}

/// A controller-side secret, without its value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SecretView {
    pub name: String,
    pub updated_at: Timestamp,
    pub updated_by: String,
}

/// `GET /api/v1/secrets`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SecretList {
    pub secrets: Vec<SecretView>,
}
