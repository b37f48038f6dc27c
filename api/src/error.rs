//! The body of every error response, whatever the status: 400, 401, 404, 405, 409, 413, 5xx.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `{"error": message, "field": field-or-null}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// One line a user can act on; for bad input it starts with the field's name.
    pub error: String,
    /// The input at fault (`repo`, `env.KEY`, `limit`, `body`, ...), or null.
    #[serde(default)]
    #[schema(required)]
    pub field: Option<String>,
}

impl ErrorBody {
    pub fn new(error: impl Into<String>, field: Option<&str>) -> ErrorBody {
        ErrorBody {
            error: error.into(),
            field: field.map(str::to_string),
        }
    }
}
