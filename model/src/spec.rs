//! The job spec a user submits, and its validation.
//!
//! `JobSpec::from_json` / `JobSpec::from_value` are the one way in: they reject unknown fields,
//! name the field at fault in every error, and return a normalized spec. The same rules serve the
//! HTTP API, the CLI (`-f job.yaml` and flags) and the web page.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::compute::Compute;

use crate::limits::*;

/// Default grace between SIGTERM and SIGKILL when a job is stopped.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);
pub use crate::limits::{MAX_RETRIES, MIN_MEMORY};

/// A bad input, naming the field at fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize)]
#[error("{field}: {message}")]
pub struct ValidationError {
    pub field: String,
    pub message: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ValidationError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A validated, normalized job spec.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Display name; defaults to the script's file stem.
    #[serde(default)]
    pub name: String,
    /// Git URL: https, http, ssh, git, file, or scp-like `user@host:path`.
    pub repo: String,
    /// Branch, tag or commit; empty means the remote's default branch.
    #[serde(default)]
    pub revision: String,
    /// Path of the Python script inside the repository. Empty for an MLflow project's entry
    /// point (`entry_point`).
    #[serde(default)]
    pub script: String,
    /// Arguments, passed verbatim (never through a shell).
    #[serde(default)]
    pub args: Vec<String>,
    /// An entry point of the repository's `MLproject` (or a `.py`/`.sh` file run as one), instead
    /// of `script`. A spec with neither runs the entry point `main`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry_point: Option<String>,
    /// The entry point's parameters, by name (numbers are taken as their text). Checked against
    /// the types the `MLproject` declares before anything runs; undeclared ones are appended as
    /// `--name value`.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "parameter_values"
    )]
    #[schema(value_type = BTreeMap<String, String>)]
    pub parameters: BTreeMap<String, String>,
    /// An MLflow run the job logs into (created before the job starts unless `run_id` names
    /// one); the controller's `--mlflow-tracking-uri` applies when `tracking_uri` is absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlflow: Option<MlflowSpec>,
    /// pip requirement strings.
    #[serde(default)]
    pub requirements: Vec<String>,
    /// A requirements file inside the repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requirements_file: Option<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub compute: Compute,
    /// Wall-clock limit of one attempt (`2h`, `90m`); absent = no limit.
    #[schema(value_type = Option<String>, example = "2h")]
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    /// How many times a failing script is run again.
    #[serde(default)]
    pub retries: u32,
    /// Grace between SIGTERM and SIGKILL on stop (`10s`).
    #[schema(value_type = String, example = "10s")]
    #[serde(default = "default_grace", with = "duration")]
    pub stop_grace: Duration,
    /// Memory limit of one attempt (`512MiB`, `8GiB`, or bytes): past it the job is killed and
    /// fails with `oom`. Absent = no limit. Enforced by the agent's cgroup.
    #[schema(value_type = Option<String>, example = "8GiB")]
    #[serde(default, with = "opt_size", skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
    /// Environment variables whose values are secret: they reach the job's environment but
    /// never the API, the page, the CLI's output or the logs. Each is a value (kept apart from
    /// the spec once submitted: shown as `{"given": true}`) or `{"secret": NAME}`, a
    /// controller-side secret (`runyard secret set NAME`) copied when the job is submitted.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(value_type = BTreeMap<String, Object>)]
    pub secrets: BTreeMap<String, SecretSource>,
    /// The agent picks a free port for the attempt and sets `$PORT` (a server listens on
    /// `0.0.0.0:$PORT`); the port is shown on the attempt. Every service replica has one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub port: bool,
    /// A finished job whose best checkpoint is put in the attempt's directory before the script
    /// starts; its path is in `$RUNYARD_CHECKPOINT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_from: Option<String>,
}

/// The MLflow tracking a job asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MlflowSpec {
    /// The tracking server (`http(s)://host:port`); absent = the controller's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking_uri: Option<String>,
    /// The experiment a new run goes into (absent with `experiment_name` too: `0`, MLflow's
    /// default experiment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experiment_id: Option<String>,
    /// The experiment by name, created when missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experiment_name: Option<String>,
    /// An existing run to log into instead of a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
}

/// Where a secret environment variable's value comes from.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SecretSource {
    /// The value itself: in a submitted spec (the controller stores it apart at once), and in
    /// the spec an agent receives.
    Value(String),
    /// A controller-side secret, by name.
    Secret { secret: String },
    /// A value given when the job was submitted, stored apart from the spec.
    Given { given: bool },
}

/// Never prints a value, even in debug output.
impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Value(_) => f.write_str("Value(<hidden>)"),
            SecretSource::Secret { secret } => write!(f, "Secret({secret})"),
            SecretSource::Given { .. } => f.write_str("Given"),
        }
    }
}

fn default_grace() -> Duration {
    DEFAULT_STOP_GRACE
}

impl JobSpec {
    /// Parses and validates a JSON body.
    pub fn from_json(body: &[u8]) -> Result<JobSpec, ValidationError> {
        let de = &mut serde_json::Deserializer::from_slice(body);
        let spec: JobSpec = serde_path_to_error::deserialize(de).map_err(path_error)?;
        spec.validate()
    }

    /// Parses and validates an already-parsed value (YAML files come in this way).
    pub fn from_value(value: serde_json::Value) -> Result<JobSpec, ValidationError> {
        let spec: JobSpec = serde_path_to_error::deserialize(value).map_err(path_error)?;
        spec.validate()
    }

    /// Checks every field and fills defaults. Idempotent.
    pub fn validate(mut self) -> Result<JobSpec, ValidationError> {
        if self.repo.len() > MAX_REPO_LEN {
            return Err(too_long("repo", MAX_REPO_LEN, "characters"));
        }
        validate_repo(&self.repo)?;
        if self.script.is_empty() {
            let entry = self.entry_point.get_or_insert_with(|| "main".to_string());
            validate_entry_point(entry)?;
            validate_parameters(&self.parameters)?;
            if !self.args.is_empty() {
                return Err(ValidationError::new(
                    "args",
                    "an entry point takes `parameters`, not args",
                ));
            }
        } else {
            validate_repo_path("script", &self.script)?;
            if !self.script.ends_with(".py") {
                return Err(ValidationError::new(
                    "script",
                    format!("`{}` is not a Python file (.py)", self.script),
                ));
            }
            if self.entry_point.is_some() {
                return Err(ValidationError::new(
                    "entry_point",
                    "give either a script or an entry point, not both",
                ));
            }
            if !self.parameters.is_empty() {
                return Err(ValidationError::new(
                    "parameters",
                    "parameters go with an entry point; a script takes `args`",
                ));
            }
        }
        if let Some(m) = &self.mlflow {
            validate_mlflow(m)?;
        }
        if let Some(f) = &self.requirements_file {
            validate_repo_path("requirements_file", f)?;
        }
        if self.revision.len() > MAX_REVISION_LEN {
            return Err(too_long("revision", MAX_REVISION_LEN, "bytes"));
        }
        if snapshot_of(&self.repo).is_some() && !self.revision.is_empty() {
            return Err(ValidationError::new(
                "revision",
                "a snapshot of a local directory has no revision: leave it out",
            ));
        }
        if self.revision.chars().any(|c| c.is_control() || c == ' ')
            || self.revision.starts_with('-')
        {
            return Err(ValidationError::new(
                "revision",
                format!("`{}` is not a branch, tag or commit name", self.revision),
            ));
        }
        if self.requirements.len() > MAX_REQUIREMENTS {
            return Err(ValidationError::new(
                "requirements",
                format!(
                    "{} requirements: at most {MAX_REQUIREMENTS} (put more in a requirements_file)",
                    self.requirements.len()
                ),
            ));
        }
        for (i, r) in self.requirements.iter().enumerate() {
            validate_requirement(r)
                .map_err(|m| ValidationError::new(format!("requirements[{i}]"), m))?;
        }
        validate_env(&self.env)?;
        validate_secrets(&self.secrets, &self.env)?;
        validate_args(&self.args)?;
        if self.timeout == Some(Duration::ZERO) {
            return Err(ValidationError::new(
                "timeout",
                "must be positive (omit it for no limit)",
            ));
        }
        if self.timeout.is_some_and(|t| t > MAX_TIMEOUT) {
            return Err(ValidationError::new(
                "timeout",
                format!(
                    "at most {} (omit it for no limit)",
                    format_duration(MAX_TIMEOUT)
                ),
            ));
        }
        if self.retries > MAX_RETRIES {
            return Err(ValidationError::new(
                "retries",
                format!("at most {MAX_RETRIES}"),
            ));
        }
        if self.stop_grace > MAX_STOP_GRACE {
            return Err(ValidationError::new(
                "stop_grace",
                format!("at most {}", format_duration(MAX_STOP_GRACE)),
            ));
        }
        if let Some(m) = self.memory
            && m < MIN_MEMORY
        {
            return Err(ValidationError::new(
                "memory",
                format!(
                    "{} is too small: at least {} (a Python process needs more to start)",
                    crate::size::format(m),
                    crate::size::format(MIN_MEMORY)
                ),
            ));
        }
        if let Some(from) = &self.model_from
            && !crate::job::is_job_id(from)
        {
            return Err(ValidationError::new(
                "model_from",
                format!("`{from}` is not a job id (26 lower-case letters and digits)"),
            ));
        }
        if self.name.is_empty() {
            self.name = match &self.entry_point {
                Some(entry) => default_name(entry),
                None => default_name(&self.script),
            };
        }
        if self.name.chars().count() > MAX_NAME_CHARS || self.name.chars().any(char::is_control) {
            return Err(ValidationError::new(
                "name",
                format!("at most {MAX_NAME_CHARS} printable characters"),
            ));
        }
        Ok(self)
    }
}

fn too_long(field: &str, max: usize, unit: &str) -> ValidationError {
    ValidationError::new(field, format!("longer than {max} {unit}"))
}

fn validate_env(env: &BTreeMap<String, String>) -> Result<(), ValidationError> {
    if env.len() > MAX_ENV {
        return Err(ValidationError::new(
            "env",
            format!("{} variables: at most {MAX_ENV}", env.len()),
        ));
    }
    let mut total = 0;
    for (k, v) in env {
        if k.len() > MAX_ENV_NAME {
            return Err(ValidationError::new(
                "env",
                format!("a variable name is longer than {MAX_ENV_NAME} bytes"),
            ));
        }
        let field = format!("env.{k}");
        if !is_identifier(k) {
            return Err(ValidationError::new(
                field,
                format!(
                    "`{k}` is not a valid environment variable name (letters, digits and _, not starting with a digit)"
                ),
            ));
        }
        if k.starts_with("RUNYARD_") || k == "CUDA_VISIBLE_DEVICES" {
            return Err(ValidationError::new(
                field,
                format!("`{k}` is set by Runyard and cannot be overridden"),
            ));
        }
        if v.contains('\0') {
            return Err(ValidationError::new(field, "the value contains a NUL byte"));
        }
        if v.len() > MAX_ENV_VALUE {
            return Err(ValidationError::new(
                field,
                format!("the value is longer than {} KiB", MAX_ENV_VALUE / 1024),
            ));
        }
        total += k.len() + v.len();
    }
    if total > MAX_ENV_TOTAL {
        return Err(ValidationError::new(
            "env",
            format!(
                "names and values add up to more than {} KiB",
                MAX_ENV_TOTAL / 1024
            ),
        ));
    }
    Ok(())
}

fn validate_secrets(
    secrets: &BTreeMap<String, SecretSource>,
    env: &BTreeMap<String, String>,
) -> Result<(), ValidationError> {
    if secrets.len() > MAX_SECRETS {
        return Err(ValidationError::new(
            "secrets",
            format!("{} secrets: at most {MAX_SECRETS}", secrets.len()),
        ));
    }
    for (k, source) in secrets {
        let field = format!("secrets.{k}");
        if k.len() > MAX_ENV_NAME || !is_identifier(k) {
            return Err(ValidationError::new(
                field,
                format!(
                    "`{k}` is not a valid environment variable name (letters, digits and _, not starting with a digit)"
                ),
            ));
        }
        if k.starts_with("RUNYARD_") || k == "CUDA_VISIBLE_DEVICES" {
            return Err(ValidationError::new(
                field,
                format!("`{k}` is set by Runyard and cannot be overridden"),
            ));
        }
        if env.contains_key(k) {
            return Err(ValidationError::new(
                field,
                format!("`{k}` is also in `env`: give it in one of them"),
            ));
        }
        match source {
            SecretSource::Value(v) if v.contains('\0') => {
                return Err(ValidationError::new(field, "the value contains a NUL byte"));
            }
            SecretSource::Value(v) if v.len() > MAX_SECRET_VALUE => {
                return Err(ValidationError::new(
                    field,
                    format!("the value is longer than {} KiB", MAX_SECRET_VALUE / 1024),
                ));
            }
            SecretSource::Secret { secret } if !is_secret_name(secret) => {
                return Err(ValidationError::new(
                    field,
                    format!(
                        "`{secret}` is not a secret name: 1 to 64 of a-z, 0-9, `.`, `_`, `-`, starting with a letter or digit"
                    ),
                ));
            }
            SecretSource::Given { given: false } => {
                return Err(ValidationError::new(
                    field,
                    "give a value, or {\"secret\": NAME} for a controller-side secret",
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Whether `name` may name a controller-side secret (the same form as token names).
pub fn is_secret_name(name: &str) -> bool {
    crate::access::is_token_name(name)
}

fn validate_args(args: &[String]) -> Result<(), ValidationError> {
    if args.len() > MAX_ARGS {
        return Err(ValidationError::new(
            "args",
            format!("{} arguments: at most {MAX_ARGS}", args.len()),
        ));
    }
    let mut total = 0;
    for (i, a) in args.iter().enumerate() {
        if a.contains('\0') {
            return Err(ValidationError::new(
                format!("args[{i}]"),
                "contains a NUL byte",
            ));
        }
        if a.len() > MAX_ARG_BYTES {
            return Err(ValidationError::new(
                format!("args[{i}]"),
                format!("longer than {} KiB", MAX_ARG_BYTES / 1024),
            ));
        }
        total += a.len();
    }
    if total > MAX_ARGS_TOTAL {
        return Err(ValidationError::new(
            "args",
            format!(
                "the arguments add up to more than {} KiB",
                MAX_ARGS_TOTAL / 1024
            ),
        ));
    }
    Ok(())
}

/// Every field of `JobSpec` as it appears in JSON.
const FIELDS: [&str; 19] = [
    "name",
    "repo",
    "revision",
    "script",
    "args",
    "entry_point",
    "parameters",
    "mlflow",
    "requirements",
    "requirements_file",
    "env",
    "compute",
    "timeout",
    "retries",
    "stop_grace",
    "secrets",
    "memory",
    "port",
    "model_from",
];

/// Reads a spec that was validated when it was submitted (a stored job, an API reply), ignoring
/// fields this version does not know: a record written by a newer version still loads. Users'
/// input goes through `JobSpec::from_json`, which refuses unknown fields.
pub fn known_fields<'de, D: Deserializer<'de>>(d: D) -> Result<JobSpec, D::Error> {
    let mut v = serde_json::Value::deserialize(d)?;
    if let Some(fields) = v.as_object_mut() {
        fields.retain(|k, _| FIELDS.contains(&k.as_str()));
    }
    JobSpec::deserialize(v).map_err(serde::de::Error::custom)
}

fn default_name(script: &str) -> String {
    let file = script.rsplit('/').next().unwrap_or(script);
    let stem = file
        .strip_suffix(".py")
        .or_else(|| file.strip_suffix(".sh"));
    stem.unwrap_or(file).to_string()
}

/// An entry point is a name in the `MLproject` or a `.py`/`.sh` file of the repository.
fn validate_entry_point(entry: &str) -> Result<(), ValidationError> {
    let field = "entry_point";
    if entry.ends_with(".py") || entry.ends_with(".sh") {
        return validate_repo_path(field, entry);
    }
    if entry.is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if entry.len() > MAX_ENTRY_POINT_LEN {
        return Err(too_long(field, MAX_ENTRY_POINT_LEN, "bytes"));
    }
    if entry.chars().any(char::is_control) || entry.starts_with('-') {
        return Err(ValidationError::new(
            field,
            format!("`{entry}` is not an entry point name"),
        ));
    }
    Ok(())
}

/// Parameter names are what `{name}` in a command template can refer to.
fn validate_parameters(params: &BTreeMap<String, String>) -> Result<(), ValidationError> {
    if params.len() > MAX_PARAMETERS {
        return Err(ValidationError::new(
            "parameters",
            format!("{} parameters: at most {MAX_PARAMETERS}", params.len()),
        ));
    }
    let mut total = 0;
    for (k, v) in params {
        let field = format!("parameters.{k}");
        let name_ok = !k.is_empty()
            && k.len() <= MAX_PARAMETER_NAME
            && !k.starts_with('-')
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if !name_ok {
            return Err(ValidationError::new(
                field,
                format!(
                    "`{k}` is not a parameter name (letters, digits, `_`, `-` and `.`, at most {MAX_PARAMETER_NAME})"
                ),
            ));
        }
        if v.contains('\0') {
            return Err(ValidationError::new(field, "the value contains a NUL byte"));
        }
        if v.len() > MAX_ARG_BYTES {
            return Err(ValidationError::new(
                field,
                format!("the value is longer than {} KiB", MAX_ARG_BYTES / 1024),
            ));
        }
        total += k.len() + v.len();
    }
    if total > MAX_ARGS_TOTAL {
        return Err(ValidationError::new(
            "parameters",
            format!(
                "names and values add up to more than {} KiB",
                MAX_ARGS_TOTAL / 1024
            ),
        ));
    }
    Ok(())
}

fn validate_mlflow(m: &MlflowSpec) -> Result<(), ValidationError> {
    if let Some(uri) = &m.tracking_uri {
        validate_tracking_uri(uri)
            .map_err(|msg| ValidationError::new("mlflow.tracking_uri", msg))?;
    }
    if m.experiment_id.is_some() && m.experiment_name.is_some() {
        return Err(ValidationError::new(
            "mlflow.experiment_name",
            "give either experiment_id or experiment_name, not both",
        ));
    }
    if m.run_id.is_some() && (m.experiment_id.is_some() || m.experiment_name.is_some()) {
        return Err(ValidationError::new(
            "mlflow.run_id",
            "an existing run already has its experiment: drop experiment_id and experiment_name",
        ));
    }
    let plain = |field: &str, v: &str, max: usize| {
        if v.is_empty() || v.len() > max || v.chars().any(char::is_control) {
            Err(ValidationError::new(
                field,
                format!("must be 1 to {max} printable characters"),
            ))
        } else {
            Ok(())
        }
    };
    if let Some(id) = &m.experiment_id {
        plain("mlflow.experiment_id", id, 64)?;
    }
    if let Some(name) = &m.experiment_name {
        plain("mlflow.experiment_name", name, 256)?;
    }
    if let Some(run) = &m.run_id
        && (run.is_empty() || run.len() > 64 || !run.chars().all(|c| c.is_ascii_alphanumeric()))
    {
        return Err(ValidationError::new(
            "mlflow.run_id",
            format!("`{run}` is not an MLflow run id (letters and digits)"),
        ));
    }
    Ok(())
}

/// Runyard talks to MLflow's REST API: the tracking URI is an http(s) URL.
pub fn validate_tracking_uri(uri: &str) -> Result<(), String> {
    if uri.len() > MAX_REPO_LEN {
        return Err(format!("longer than {MAX_REPO_LEN} characters"));
    }
    let rest = uri
        .strip_prefix("http://")
        .or_else(|| uri.strip_prefix("https://"));
    match rest {
        Some(rest)
            if !rest.is_empty()
                && !rest.starts_with('/')
                && !uri.chars().any(|c| c.is_control() || c == ' ') =>
        {
            Ok(())
        }
        _ => Err(format!(
            "`{uri}` is not an http(s) URL: Runyard reaches MLflow through a tracking server (`mlflow server`), as in http://mlflow.internal:5000"
        )),
    }
}

/// Parameter values as users write them: text, or a number or boolean taken as its text.
fn parameter_values<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    let raw = BTreeMap::<String, serde_json::Value>::deserialize(d)?;
    raw.into_iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => Ok((k, s)),
            serde_json::Value::Number(n) => Ok((k, n.to_string())),
            serde_json::Value::Bool(b) => Ok((k, b.to_string())),
            other => Err(serde::de::Error::custom(format!(
                "parameter `{k}`: {other} is not a string or a number"
            ))),
        })
        .collect()
}

pub(crate) fn path_error<E: fmt::Display>(e: serde_path_to_error::Error<E>) -> ValidationError {
    let path = e.path().to_string();
    let inner = e.inner().to_string();
    // serde reports unknown and missing fields at the parent; name the field itself.
    let field = if let Some(rest) = inner.strip_prefix("unknown field `") {
        // The path ends at the unknown field itself.
        match path.as_str() {
            "." | "?" | "" => rest.split('`').next().unwrap_or("").to_string(),
            full => full.to_string(),
        }
    } else if let Some(rest) = inner.strip_prefix("missing field `") {
        let name = rest.split('`').next().unwrap_or("");
        match path.as_str() {
            "." | "?" | "" => name.to_string(),
            parent => format!("{parent}.{name}"),
        }
    } else if path == "." || path == "?" {
        "body".to_string()
    } else {
        path
    };
    let field = if field.is_empty() {
        "body".to_string()
    } else {
        field
    };
    let message = inner
        .split(" at line ")
        .next()
        .unwrap_or(&inner)
        .to_string();
    ValidationError::new(field, message)
}

pub fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A spec's `repo` naming an uploaded snapshot of a local directory: this prefix, then the hex
/// sha256 of the archive.
pub const SNAPSHOT_PREFIX: &str = "snapshot:sha256:";

/// The hex sha256 of the snapshot `repo` names, if it names one.
pub fn snapshot_of(repo: &str) -> Option<&str> {
    repo.strip_prefix(SNAPSHOT_PREFIX)
}

fn validate_repo(repo: &str) -> Result<(), ValidationError> {
    let err = |m: String| Err(ValidationError::new("repo", m));
    if repo.is_empty() {
        return err("must not be empty".into());
    }
    if let Some(hex) = snapshot_of(repo) {
        if hex.len() != 64
            || !hex
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        {
            return err(format!(
                "`{repo}` is not a snapshot id (snapshot:sha256: and 64 lower-case hex digits)"
            ));
        }
        return Ok(());
    }
    if repo.chars().any(|c| c.is_control() || c == ' ') {
        return err(format!("`{repo}` contains spaces or control characters"));
    }
    if let Some((scheme, rest)) = repo.split_once("://") {
        match scheme {
            "https" | "http" | "ssh" | "git" => {
                let host = rest.split('/').next().unwrap_or("");
                if host.is_empty() || !rest.contains('/') {
                    return err(format!("`{repo}` has no host or path"));
                }
            }
            "file" => {
                if !rest.starts_with('/') {
                    return err(format!(
                        "`{repo}`: a file URL needs an absolute path, as in file:///srv/repo.git"
                    ));
                }
            }
            _ => {
                return err(format!(
                    "unsupported scheme `{scheme}`: use https, ssh, git, http or file"
                ));
            }
        }
        return Ok(());
    }
    // scp-like: user@host:path
    if let Some((userhost, path)) = repo.split_once(':')
        && let Some((user, host)) = userhost.split_once('@')
        && !user.is_empty()
        && !host.is_empty()
        && !host.contains('/')
        && !path.is_empty()
    {
        return Ok(());
    }
    err(format!(
        "`{repo}` is not a git URL: use https://host/owner/repo, ssh://, git@host:owner/repo, git:// or file:///path"
    ))
}

/// A path relative to the repository root that stays inside it (symlinks are checked by the
/// agent after checkout).
fn validate_repo_path(field: &str, p: &str) -> Result<(), ValidationError> {
    if p.is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if p.len() > MAX_PATH_LEN {
        return Err(too_long(field, MAX_PATH_LEN, "bytes"));
    }
    if p.starts_with('/') {
        return Err(ValidationError::new(
            field,
            format!("`{p}` is absolute: give a path inside the repository"),
        ));
    }
    if p.split('/').any(|c| c == "..") {
        return Err(ValidationError::new(
            field,
            format!("`{p}` escapes the repository (`..`)"),
        ));
    }
    if p.chars().any(|c| c.is_control()) || p.contains('\\') {
        return Err(ValidationError::new(
            field,
            format!("`{p}` contains control characters or backslashes"),
        ));
    }
    Ok(())
}

fn validate_requirement(r: &str) -> Result<(), String> {
    let t = r.trim();
    if t.is_empty() {
        return Err("must not be empty".into());
    }
    if t.starts_with('-') {
        return Err(format!(
            "`{t}` is a pip option, not a requirement: options such as -e, -r and --index-url are not allowed"
        ));
    }
    if r.contains('\n') || r.contains('\r') {
        return Err("one requirement per entry: no line breaks".into());
    }
    if r.len() > MAX_REQUIREMENT_LEN {
        return Err(format!("longer than {MAX_REQUIREMENT_LEN} bytes"));
    }
    Ok(())
}

/// Parses a duration given as a human string (`90s`, `2h 30m`) or a number of seconds. Anything
/// longer than `limits::MAX_DURATION` is refused, so no value can overflow a clock later.
pub fn parse_duration_value(v: &serde_json::Value) -> Result<Duration, String> {
    match v {
        serde_json::Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                bounded(
                    Duration::from_secs(u.min(MAX_DURATION.as_secs() + 1)),
                    &n.to_string(),
                )
            } else if let Some(f) = n.as_f64() {
                if f < 0.0 || !f.is_finite() {
                    Err(format!(
                        "{f} is negative: give a positive duration such as `30m` or `2h`"
                    ))
                } else if f > MAX_DURATION.as_secs_f64() {
                    Err(too_long_duration(&n.to_string()))
                } else {
                    Ok(Duration::from_secs_f64(f))
                }
            } else {
                Err("not a duration".into())
            }
        }
        serde_json::Value::String(s) => parse_duration(s),
        _ => Err("expected a duration such as `30s`, `2h` or a number of seconds".into()),
    }
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.starts_with('-') {
        return Err(format!(
            "`{s}` is negative: give a positive duration such as `30m` or `2h`"
        ));
    }
    if let Ok(secs) = t.parse::<u64>() {
        return bounded(Duration::from_secs(secs.min(MAX_DURATION.as_secs() + 1)), s);
    }
    let d = humantime::parse_duration(t)
        .map_err(|e| format!("`{s}` is not a duration ({e}); use forms like `90s`, `30m`, `2h`"))?;
    bounded(d, s)
}

fn bounded(d: Duration, given: &str) -> Result<Duration, String> {
    if d > MAX_DURATION {
        return Err(too_long_duration(given));
    }
    Ok(d)
}

fn too_long_duration(given: &str) -> String {
    format!("`{given}` is longer than any duration Runyard takes (100 years)")
}

pub fn format_duration(d: Duration) -> String {
    humantime::format_duration(Duration::from_millis(d.as_millis() as u64)).to_string()
}

pub(crate) mod duration {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        parse_duration_value(&v).map_err(serde::de::Error::custom)
    }
}

mod opt_duration {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&format_duration(*d)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        if v.is_null() {
            return Ok(None);
        }
        parse_duration_value(&v)
            .map(Some)
            .map_err(serde::de::Error::custom)
    }
}

mod opt_size {
    use super::*;

    pub fn serialize<S: Serializer>(m: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match m {
            Some(m) => s.serialize_str(&crate::size::format(*m)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        if v.is_null() {
            return Ok(None);
        }
        crate::size::parse_value(&v)
            .map(Some)
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn stored_specs_ignore_fields_this_version_does_not_know() {
        let mut full = base();
        full["requirements_file"] = json!("r.txt");
        full["timeout"] = json!("1h");
        full["secrets"] = json!({"TOKEN": {"secret": "hub"}});
        full["memory"] = json!("1GiB");
        full["port"] = json!(true);
        full["model_from"] = json!("01h0000000000000000000000a");
        full["mlflow"] = json!({"tracking_uri": "http://m:5000"});
        let spec = JobSpec::from_value(full).unwrap();
        let v = serde_json::to_value(&spec).unwrap();
        let entry = serde_json::to_value(
            JobSpec::from_value(json!({"repo": "https://h/x", "parameters": {"a": "1"}})).unwrap(),
        )
        .unwrap();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.extend(
            ["entry_point", "parameters"]
                .iter()
                .filter(|k| entry.get(**k).is_some()),
        );
        let mut fields = FIELDS.to_vec();
        keys.sort();
        fields.sort();
        assert_eq!(keys, fields, "FIELDS lists every field");
        let mut newer = v.clone();
        newer["priority"] = json!(5);
        let read = known_fields(newer.clone()).unwrap();
        assert_eq!(read, spec);
        assert!(
            JobSpec::from_value(newer).is_err(),
            "users' input still refuses it"
        );
    }

    fn base() -> serde_json::Value {
        json!({"repo": "https://github.com/acme/train.git", "script": "train.py"})
    }

    fn with(k: &str, v: serde_json::Value) -> serde_json::Value {
        let mut b = base();
        b[k] = v;
        b
    }

    fn field_of(v: serde_json::Value) -> String {
        JobSpec::from_json(v.to_string().as_bytes())
            .unwrap_err()
            .field
    }

    #[test]
    fn an_entry_point_spec_defaults_to_main_and_takes_numbers_as_text() {
        let s = JobSpec::from_json(
            br#"{"repo": "https://h/x", "parameters": {"alpha": 0.5, "n": 3, "s": "x"}}"#,
        )
        .unwrap();
        assert_eq!(s.entry_point.as_deref(), Some("main"));
        assert_eq!(s.name, "main");
        assert_eq!(s.parameters["alpha"], "0.5");
        assert_eq!(s.parameters["n"], "3");
        let s = JobSpec::from_json(br#"{"repo": "https://h/x", "entry_point": "jobs/train.sh", "mlflow": {"tracking_uri": "http://m:5000", "experiment_name": "e"}}"#)
            .unwrap();
        assert_eq!(s.name, "train");
        assert_eq!(s.mlflow.unwrap().experiment_name.as_deref(), Some("e"));
    }

    #[test]
    fn minimal_spec_gets_defaults() {
        let s = JobSpec::from_json(base().to_string().as_bytes()).unwrap();
        assert_eq!(s.name, "train");
        assert_eq!(s.compute, Compute::CpuSmall);
        assert_eq!(s.stop_grace, DEFAULT_STOP_GRACE);
        assert_eq!(s.timeout, None);
        // Normalized output parses back to the same spec.
        let again = JobSpec::from_json(serde_json::to_string(&s).unwrap().as_bytes()).unwrap();
        assert_eq!(again, s);
    }

    #[test]
    fn durations_accept_strings_and_seconds() {
        let s = JobSpec::from_value(with("timeout", json!("2h"))).unwrap();
        assert_eq!(s.timeout, Some(Duration::from_secs(7200)));
        let s = JobSpec::from_value(with("timeout", json!(90))).unwrap();
        assert_eq!(s.timeout, Some(Duration::from_secs(90)));
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases: Vec<(serde_json::Value, &str)> = vec![
            (with("colour", json!("red")), "colour"),
            (json!({"script": "train.py"}), "repo"),
            (json!({"repo": "https://h/x", "args": ["a"]}), "args"),
            (with("entry_point", json!("main")), "entry_point"),
            (with("parameters", json!({"a": "1"})), "parameters"),
            (
                json!({"repo": "https://h/x", "entry_point": "-x"}),
                "entry_point",
            ),
            (
                json!({"repo": "https://h/x", "entry_point": "../t.py"}),
                "entry_point",
            ),
            (
                json!({"repo": "https://h/x", "parameters": {"a b": "1"}}),
                "parameters.a b",
            ),
            (
                json!({"repo": "https://h/x", "parameters": {"a": [1]}}),
                "parameters",
            ),
            (
                with("mlflow", json!({"tracking_uri": "file:///tmp/m"})),
                "mlflow.tracking_uri",
            ),
            (
                with(
                    "mlflow",
                    json!({"experiment_id": "1", "experiment_name": "x"}),
                ),
                "mlflow.experiment_name",
            ),
            (with("mlflow", json!({"run_id": "a;b"})), "mlflow.run_id"),
            (
                with("mlflow", json!({"tracking": "http://x"})),
                "mlflow.tracking",
            ),
            (with("repo", json!("not a url")), "repo"),
            (with("repo", json!("ftp://host/x.git")), "repo"),
            (with("repo", json!("file://relative/path")), "repo"),
            (with("script", json!("/etc/passwd.py")), "script"),
            (with("script", json!("../up.py")), "script"),
            (with("script", json!("a/../../up.py")), "script"),
            (with("compute", json!("tpu")), "compute"),
            (with("compute", json!("gpu:0")), "compute"),
            (with("timeout", json!(-5)), "timeout"),
            (with("timeout", json!("-5s")), "timeout"),
            (with("timeout", json!("soon")), "timeout"),
            (with("env", json!({"1BAD": "x"})), "env.1BAD"),
            (with("env", json!({"A-B": "x"})), "env.A-B"),
            (
                with("requirements", json!(["numpy", "-e ."])),
                "requirements[1]",
            ),
            (
                with("requirements", json!(["--index-url=http://evil"])),
                "requirements[0]",
            ),
            (
                with("requirements", json!(["-r other.txt"])),
                "requirements[0]",
            ),
            (with("retries", json!(-1)), "retries"),
            (with("args", json!("--lr 1")), "args"),
            (
                with("requirements_file", json!("../r.txt")),
                "requirements_file",
            ),
            (with("memory", json!("8 parsecs")), "memory"),
            (with("memory", json!("1MiB")), "memory"),
            (with("memory", json!(-1)), "memory"),
        ];
        for (body, field) in cases {
            assert_eq!(field_of(body.clone()), field, "body {body}");
        }
    }

    #[test]
    fn memory_accepts_units_and_bytes_and_reads_back() {
        let spec = JobSpec::from_value(with("memory", json!("512MiB"))).unwrap();
        assert_eq!(spec.memory, Some(512 << 20));
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["memory"], "512MiB");
        assert_eq!(JobSpec::from_value(json).unwrap(), spec);
        let spec = JobSpec::from_value(with("memory", json!(1 << 30))).unwrap();
        assert_eq!(spec.memory, Some(1 << 30));
        let spec = JobSpec::from_value(with("memory", json!("8GiB"))).unwrap();
        assert_eq!(spec.memory, Some(8 << 30));
        let none = JobSpec::from_value(base()).unwrap();
        assert_eq!(none.memory, None);
        assert!(serde_json::to_value(&none).unwrap().get("memory").is_none());
        let err = JobSpec::from_value(with("memory", json!("lots"))).unwrap_err();
        assert!(err.message.contains("is not a size"), "{err}");
    }

    #[test]
    fn repo_forms() {
        for ok in [
            "https://github.com/a/b.git",
            "http://127.0.0.1:8080/r.git",
            "ssh://git@github.com/a/b.git",
            "git@github.com:a/b.git",
            "git://127.0.0.1:9418/r",
            "file:///tmp/r",
        ] {
            assert!(validate_repo(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn every_limit_has_its_own_message() {
        let many = |n: usize, s: &str| json!(vec![s.to_string(); n]);
        let env = |n: usize, len: usize| {
            let m: serde_json::Map<String, serde_json::Value> = (0..n)
                .map(|i| (format!("V{i}"), json!("x".repeat(len))))
                .collect();
            serde_json::Value::Object(m)
        };
        let cases: Vec<(serde_json::Value, &str, &str)> = vec![
            (
                with(
                    "repo",
                    json!(format!("https://h/{}", "a".repeat(MAX_REPO_LEN))),
                ),
                "repo",
                "longer than 2048 characters",
            ),
            (with("name", json!("n".repeat(129))), "name", "at most 128"),
            (
                with("script", json!(format!("{}.py", "a".repeat(MAX_PATH_LEN)))),
                "script",
                "longer than 1024 bytes",
            ),
            (
                with("requirements_file", json!("r".repeat(MAX_PATH_LEN + 1))),
                "requirements_file",
                "longer than 1024 bytes",
            ),
            (
                with("revision", json!("r".repeat(256))),
                "revision",
                "longer than 255",
            ),
            (
                with("args", many(MAX_ARGS + 1, "x")),
                "args",
                "1025 arguments: at most 1024",
            ),
            (
                with("args", json!(["a".repeat(MAX_ARG_BYTES + 1)])),
                "args[0]",
                "longer than 16 KiB",
            ),
            (
                with("args", many(9, &"a".repeat(MAX_ARG_BYTES))),
                "args",
                "add up to more than 128 KiB",
            ),
            (
                with("env", env(MAX_ENV + 1, 1)),
                "env",
                "257 variables: at most 256",
            ),
            (
                with("env", env(1, 900 * 1024)),
                "env.V0",
                "longer than 32 KiB",
            ),
            (
                with("env", env(5, 30 * 1024)),
                "env",
                "add up to more than 128 KiB",
            ),
            (
                with("env", json!({"A".repeat(MAX_ENV_NAME + 1): "x"})),
                "env",
                "longer than 128 bytes",
            ),
            (
                with("requirements", many(MAX_REQUIREMENTS + 1, "numpy")),
                "requirements",
                "at most 256",
            ),
            (
                with("requirements", json!(["n".repeat(MAX_REQUIREMENT_LEN + 1)])),
                "requirements[0]",
                "longer than 1024 bytes",
            ),
            (
                with("timeout", json!(1e30)),
                "timeout",
                "longer than any duration",
            ),
            (
                with("timeout", json!(u64::MAX)),
                "timeout",
                "longer than any duration",
            ),
            (
                with("timeout", json!("10000000000000000000000y")),
                "timeout",
                "not a duration",
            ),
            (
                with("timeout", json!("367days")),
                "timeout",
                "at most 1year",
            ),
            (
                with("stop_grace", json!(1e300)),
                "stop_grace",
                "longer than any duration",
            ),
            (with("stop_grace", json!("2h")), "stop_grace", "at most 1h"),
            (with("retries", json!(101)), "retries", "at most 100"),
            (with("retries", json!(1e30)), "retries", "invalid type"),
        ];
        for (body, field, message) in cases {
            let e = JobSpec::from_json(body.to_string().as_bytes()).unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert!(e.message.contains(message), "{field}: {e}");
            let e = JobSpec::from_value(body).unwrap_err();
            assert_eq!(e.field, field, "{e}");
        }
        // At the limits, accepted.
        let at = with("args", many(8, &"a".repeat(MAX_ARG_BYTES)));
        assert!(JobSpec::from_value(at).is_ok());
        assert!(JobSpec::from_value(with("timeout", json!("366days"))).is_ok());
        assert!(JobSpec::from_value(with("env", env(MAX_ENV, 16))).is_ok());
    }

    /// Random documents, well-formed and not, with the spec's fields and others: the parser
    /// answers every one (a spec or an error naming a field) and never panics; what it accepts
    /// is within every limit and parses back to itself. A fixed budget of cases per run.
    mod property {
        use proptest::prelude::*;
        use serde_json::{Value, json};

        use super::super::*;

        fn leaf() -> impl Strategy<Value = Value> {
            prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                any::<u64>().prop_map(Value::from),
                any::<f64>().prop_map(|f| json!(f)),
                prop_oneof![
                    Just(1e30),
                    Just(1e300),
                    Just(-0.0),
                    Just(4.5e15),
                    Just(f64::MAX)
                ]
                .prop_map(|f| json!(f)),
                "[ -~]{0,40}".prop_map(Value::String),
                prop_oneof![
                    Just("2h"),
                    Just("1e30"),
                    Just("99999999999999999999s"),
                    Just("gpu:3"),
                    Just("cpu-small"),
                    Just("gpu:0"),
                    Just("train.py"),
                    Just("../x.py"),
                    Just("https://h/r.git"),
                    Just("file:///r"),
                    Just("-e ."),
                    Just("\u{0}"),
                    Just("367days"),
                    Just("1h"),
                    Just("ütf-8 ✓"),
                ]
                .prop_map(|s| Value::String(s.to_string())),
                (0usize..40_000).prop_map(|n| Value::String("x".repeat(n))),
            ]
        }

        fn value() -> impl Strategy<Value = Value> {
            leaf().prop_recursive(3, 64, 8, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                    prop::collection::btree_map(
                        "[A-Za-z_][A-Za-z0-9_]{0,8}|[ -~]{0,6}",
                        inner,
                        0..6
                    )
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        /// A document with some of the spec's fields (and sometimes an unknown one).
        fn document() -> impl Strategy<Value = Value> {
            let fields = prop::sample::subsequence(FIELDS.to_vec(), 0..=FIELDS.len());
            (
                fields,
                prop::collection::vec(value(), FIELDS.len()),
                any::<bool>(),
            )
                .prop_map(|(picked, values, extra)| {
                    let mut m = serde_json::Map::new();
                    m.insert("repo".into(), json!("https://h/r.git"));
                    m.insert("script".into(), json!("t.py"));
                    for (f, v) in picked.into_iter().zip(values) {
                        m.insert(f.to_string(), v);
                    }
                    if extra {
                        m.insert("colour".into(), json!("red"));
                    }
                    Value::Object(m)
                })
        }

        fn check(result: Result<JobSpec, ValidationError>) {
            match result {
                Ok(spec) => {
                    let text = serde_json::to_string(&spec).expect("a spec serializes");
                    assert!(text.len() < 1 << 20, "an accepted spec fits a request body");
                    let again = JobSpec::from_json(text.as_bytes()).expect("parses back");
                    assert_eq!(again, spec);
                }
                Err(e) => assert!(!e.field.is_empty() && !e.message.is_empty(), "{e:?}"),
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig {
                cases: 400,
                failure_persistence: None,
                ..ProptestConfig::default()
            })]

            #[test]
            fn documents_are_answered_never_panicked_on(doc in document()) {
                check(JobSpec::from_json(doc.to_string().as_bytes()));
                check(JobSpec::from_value(doc));
            }

            #[test]
            fn any_value_is_answered(v in value()) {
                check(JobSpec::from_value(v.clone()));
                check(JobSpec::from_json(v.to_string().as_bytes()));
            }

            #[test]
            fn any_bytes_are_answered(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
                check(JobSpec::from_json(&bytes));
            }
        }
    }

    #[test]
    fn malformed_json_is_a_body_error() {
        let e = JobSpec::from_json(b"{").unwrap_err();
        assert_eq!(e.field, "body", "{e:?}");
    }
}
