//! Limits on every field of a job spec: what one job may ask for, so a single request cannot
//! make the controller store, list and ship megabytes per job. Each limit has its own error
//! message naming the field (see `spec::JobSpec::validate`); the README lists them.

use std::time::Duration;

/// Characters of `repo`.
pub const MAX_REPO_LEN: usize = 2048;
/// Characters of `name`.
pub const MAX_NAME_CHARS: usize = 128;
/// Bytes of `script` and of `requirements_file` (paths inside the repository).
pub const MAX_PATH_LEN: usize = 1024;
/// Bytes of `revision`.
pub const MAX_REVISION_LEN: usize = 255;
/// Bytes of `entry_point` (a name in the `MLproject`; a file name is a path).
pub const MAX_ENTRY_POINT_LEN: usize = 256;
/// Number of `parameters`.
pub const MAX_PARAMETERS: usize = 256;
/// Bytes of a parameter's name (a value is limited as one argument, all of them as all args).
pub const MAX_PARAMETER_NAME: usize = 128;
/// Number of `args`.
pub const MAX_ARGS: usize = 1024;
/// Bytes of one argument.
pub const MAX_ARG_BYTES: usize = 16 * 1024;
/// Bytes of all arguments together.
pub const MAX_ARGS_TOTAL: usize = 128 * 1024;
/// Number of `env` variables.
pub const MAX_ENV: usize = 256;
/// Bytes of one variable's name.
pub const MAX_ENV_NAME: usize = 128;
/// Bytes of one variable's value.
pub const MAX_ENV_VALUE: usize = 32 * 1024;
/// Bytes of all names and values together.
pub const MAX_ENV_TOTAL: usize = 128 * 1024;
/// Number of `requirements`.
pub const MAX_REQUIREMENTS: usize = 256;
/// Bytes of one requirement.
pub const MAX_REQUIREMENT_LEN: usize = 1024;
/// Number of `secrets`.
pub const MAX_SECRETS: usize = 64;
/// Bytes of one secret's value.
pub const MAX_SECRET_VALUE: usize = 64 * 1024;
/// The smallest `memory` limit: below it Python itself cannot start.
pub const MIN_MEMORY: u64 = 16 << 20;
/// Upper bound on `retries`.
pub const MAX_RETRIES: u32 = 100;
/// Longest `timeout`.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(366 * 24 * 3600);
/// Longest `stop_grace`.
pub const MAX_STOP_GRACE: Duration = Duration::from_secs(3600);
/// Longest duration any field or flag parses (a hundred years); anything beyond is refused
/// before it can overflow a clock.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 366 * 24 * 3600);
