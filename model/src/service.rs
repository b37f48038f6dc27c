//! A service: a server kept running as between `min` and `max` replicas behind the controller,
//! which balances, batches and autoscales requests to them. What a user asks for is the
//! `ServiceSpec`; the `Service` record (stored at `services/NAME`) is the intent: the spec, the
//! replica count the autoscaler wants now, and the replicas it has made. Each replica is a job
//! (with `port: true`) whose intent names its service (`ReplicaOf`), so replicas are placed,
//! logged, stopped and replaced by the same core as jobs.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::job::{Desired, first_schema_version};
use crate::spec::{JobSpec, ValidationError, duration, format_duration, is_identifier};
use crate::time::Timestamp;

/// The layout of service records this version writes.
pub const SERVICE_SCHEMA_VERSION: u32 = 1;
/// Longest service name (a DNS label).
pub const MAX_SERVICE_NAME: usize = 63;
/// Most replicas one service may ask for.
pub const MAX_REPLICAS: u32 = 256;
/// Largest `batching.max_batch_size`.
pub const MAX_BATCH_SIZE: u32 = 1024;
/// Longest `batching.timeout`.
pub const MAX_BATCH_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest `cold_start.timeout`.
pub const MAX_COLD_START_TIMEOUT: Duration = Duration::from_secs(3600);
/// Shortest scaling interval.
pub const MIN_SCALE_INTERVAL: Duration = Duration::from_millis(100);
/// Longest scaling interval.
pub const MAX_SCALE_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// Longest `health` path.
pub const MAX_HEALTH_PATH: usize = 1024;
/// Ended replicas a service record remembers (for `service logs --replica N`).
pub const ENDED_REPLICAS_KEPT: usize = 32;
/// Requests per replica the default policy aims for when the service does not batch.
pub const DEFAULT_TARGET_PER_REPLICA: u32 = 8;

/// The fields a service adds to a job's.
const SERVICE_FIELDS: [&str; 8] = [
    "health",
    "replicas",
    "autoscale",
    "batching",
    "cold_start",
    "public",
    "health_interval",
    "strip_prefix",
];

/// What a user asks for: the replica's job (repository, script, environment, compute per
/// replica) and how the replicas are served and scaled.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceSpec {
    /// The service's name: `/s/NAME/` on the controller.
    pub name: String,
    /// What each replica runs. `port` is always set; `timeout` and `retries` do not apply.
    #[serde(deserialize_with = "crate::spec::known_fields")]
    pub job: JobSpec,
    #[serde(flatten)]
    pub serving: Serving,
}

/// How a service's replicas are checked, balanced, batched and scaled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Serving {
    /// Readiness path: a replica is ready when it answers it with 200.
    #[serde(default = "default_health")]
    pub health: String,
    /// How often a ready replica's health is checked again (`2s`).
    #[schema(value_type = String, example = "2s")]
    #[serde(default = "default_health_interval", with = "duration")]
    pub health_interval: Duration,
    #[serde(default)]
    pub replicas: Replicas,
    #[serde(default)]
    pub autoscale: Autoscale,
    /// Group requests into batches: one POST with a JSON array of bodies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batching: Option<Batching>,
    #[serde(default)]
    pub cold_start: ColdStart,
    /// Requests need no token.
    #[serde(default)]
    pub public: bool,
    /// Forward only the path after `/s/NAME` (true), or the whole path (false: for apps told
    /// their base URL, such as JupyterLab with `--ServerApp.base_url=/s/NAME/`).
    #[serde(default = "default_strip")]
    pub strip_prefix: bool,
}

/// The replica count's bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Replicas {
    /// 0 = scale to zero when idle.
    #[serde(default = "default_min")]
    pub min: u32,
    #[serde(default = "default_max")]
    pub max: u32,
}

impl Default for Replicas {
    fn default() -> Replicas {
        Replicas {
            min: default_min(),
            max: default_max(),
        }
    }
}

/// When and how the replica count changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Autoscale {
    /// Least time between two scale-outs.
    #[schema(value_type = String, example = "10s")]
    #[serde(default = "default_interval", with = "duration")]
    pub scale_out_interval: Duration,
    /// Least time between two scale-ins.
    #[schema(value_type = String, example = "10s")]
    #[serde(default = "default_interval", with = "duration")]
    pub scale_in_interval: Duration,
    /// A Python function in the repository, `file.py:function`, called as
    /// `function(replicas, metrics) -> int`; absent = the default policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
}

impl Default for Autoscale {
    fn default() -> Autoscale {
        Autoscale {
            scale_out_interval: default_interval(),
            scale_in_interval: default_interval(),
            policy: None,
        }
    }
}

/// Request batching.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Batching {
    #[serde(default = "default_batch")]
    pub max_batch_size: u32,
    /// How long the first request of a batch waits for others.
    #[schema(value_type = String, example = "1s")]
    #[serde(default = "default_batch_timeout", with = "duration")]
    pub timeout: Duration,
}

/// What requests do while no replica is ready.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ColdStart {
    /// How long a request waits for a replica before a 503.
    #[schema(value_type = String, example = "60s")]
    #[serde(default = "default_cold_timeout", with = "duration")]
    pub timeout: Duration,
    /// An HTTP URL that answers requests meanwhile (the path after `/s/NAME` is appended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<String>,
}

impl Default for ColdStart {
    fn default() -> ColdStart {
        ColdStart {
            timeout: default_cold_timeout(),
            proxy: None,
        }
    }
}

fn default_strip() -> bool {
    true
}
fn default_health() -> String {
    "/health".into()
}
fn default_health_interval() -> Duration {
    Duration::from_secs(2)
}
fn default_min() -> u32 {
    1
}
fn default_max() -> u32 {
    4
}
fn default_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_batch() -> u32 {
    8
}
fn default_batch_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_cold_timeout() -> Duration {
    Duration::from_secs(60)
}

impl ServiceSpec {
    /// Parses and validates a user's service: the job's fields and the service's, in one flat
    /// object. Unknown fields are refused; errors name the field.
    pub fn from_value(value: Value) -> Result<ServiceSpec, ValidationError> {
        let Value::Object(mut job) = value else {
            return Err(ValidationError::new("body", "a service is a JSON object"));
        };
        for (field, why) in [
            ("timeout", "a replica runs until it is scaled in or stopped"),
            ("retries", "a replica that fails is replaced"),
            ("port", "every replica gets $PORT"),
        ] {
            if job.contains_key(field) {
                return Err(ValidationError::new(
                    field,
                    format!("does not apply to a service: {why}"),
                ));
            }
        }
        let mut serving = Map::new();
        for field in SERVICE_FIELDS {
            if let Some(v) = job.remove(field) {
                serving.insert(field.to_string(), v);
            }
        }
        let name = match job.get("name") {
            Some(Value::String(n)) => n.clone(),
            Some(_) => return Err(ValidationError::new("name", "must be a string")),
            None => {
                return Err(ValidationError::new(
                    "name",
                    "a service needs a name (lower-case letters, digits and `-`): it is in its URL, /s/NAME/",
                ));
            }
        };
        validate_name(&name)?;
        let mut job = JobSpec::from_value(Value::Object(job))?;
        job.port = true;
        let de = serde_json::Value::Object(serving);
        let serving: Serving =
            serde_path_to_error::deserialize(de).map_err(crate::spec::path_error)?;
        let spec = ServiceSpec { name, job, serving };
        spec.validate()
    }

    /// Parses and validates a JSON body.
    pub fn from_json(body: &[u8]) -> Result<ServiceSpec, ValidationError> {
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| ValidationError::new("body", format!("not JSON: {e}")))?;
        ServiceSpec::from_value(value)
    }

    /// Checks the service's own fields. Idempotent.
    pub fn validate(self) -> Result<ServiceSpec, ValidationError> {
        validate_name(&self.name)?;
        let s = &self.serving;
        if !s.health.starts_with('/')
            || s.health.len() > MAX_HEALTH_PATH
            || s.health.chars().any(|c| c.is_control() || c == ' ')
        {
            return Err(ValidationError::new(
                "health",
                format!(
                    "`{}` is not a path (starts with `/`, at most {MAX_HEALTH_PATH} bytes, no spaces)",
                    s.health
                ),
            ));
        }
        bounded_interval("health_interval", s.health_interval)?;
        let r = s.replicas;
        if r.max == 0 {
            return Err(ValidationError::new(
                "replicas.max",
                "must be at least 1 (stop the service to have none)",
            ));
        }
        if r.max > MAX_REPLICAS {
            return Err(ValidationError::new(
                "replicas.max",
                format!("at most {MAX_REPLICAS}"),
            ));
        }
        if r.min > r.max {
            return Err(ValidationError::new(
                "replicas.min",
                format!("{} is more than replicas.max ({})", r.min, r.max),
            ));
        }
        bounded_interval(
            "autoscale.scale_out_interval",
            s.autoscale.scale_out_interval,
        )?;
        bounded_interval("autoscale.scale_in_interval", s.autoscale.scale_in_interval)?;
        if let Some(p) = &s.autoscale.policy {
            parse_policy(p).map_err(|m| ValidationError::new("autoscale.policy", m))?;
        }
        if let Some(b) = s.batching {
            if b.max_batch_size == 0 || b.max_batch_size > MAX_BATCH_SIZE {
                return Err(ValidationError::new(
                    "batching.max_batch_size",
                    format!("must be between 1 and {MAX_BATCH_SIZE}"),
                ));
            }
            if b.timeout > MAX_BATCH_TIMEOUT {
                return Err(ValidationError::new(
                    "batching.timeout",
                    format!("at most {}", format_duration(MAX_BATCH_TIMEOUT)),
                ));
            }
        }
        if s.cold_start.timeout > MAX_COLD_START_TIMEOUT {
            return Err(ValidationError::new(
                "cold_start.timeout",
                format!("at most {}", format_duration(MAX_COLD_START_TIMEOUT)),
            ));
        }
        if s.cold_start.proxy.as_ref().is_some_and(|url| {
            !(url.starts_with("http://") || url.starts_with("https://")) || url.len() > 2048
        }) {
            return Err(ValidationError::new(
                "cold_start.proxy",
                "must be an http:// or https:// URL of at most 2048 bytes",
            ));
        }
        Ok(self)
    }

    /// The flat form users write (the job's fields and the service's side by side).
    pub fn to_value(&self) -> Value {
        let mut out = match serde_json::to_value(&self.job) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        };
        out.remove("port");
        out.remove("retries");
        out.insert("name".into(), Value::String(self.name.clone()));
        if let Ok(Value::Object(serving)) = serde_json::to_value(&self.serving) {
            out.extend(serving);
        }
        Value::Object(out)
    }

    /// What the batching and the default policy aim for per replica.
    pub fn target_per_replica(&self) -> u32 {
        self.serving
            .batching
            .map_or(DEFAULT_TARGET_PER_REPLICA, |b| b.max_batch_size)
    }

    /// Whether `other` runs different code or environment, so replicas must be rolled.
    pub fn needs_rollout(&self, other: &ServiceSpec) -> bool {
        self.job != other.job || self.serving.health != other.serving.health
    }
}

/// `file.py:function` → (file, function).
pub fn parse_policy(p: &str) -> Result<(&str, &str), String> {
    let Some((file, function)) = p.rsplit_once(':') else {
        return Err(format!(
            "`{p}` is not `file.py:function` (a Python file in the repository and its function)"
        ));
    };
    if !file.ends_with(".py")
        || file.starts_with('/')
        || file.split('/').any(|c| c == ".." || c.is_empty())
        || file.len() > crate::limits::MAX_PATH_LEN
    {
        return Err(format!(
            "`{file}` is not a Python file path inside the repository"
        ));
    }
    if !is_identifier(function) {
        return Err(format!("`{function}` is not a Python function name"));
    }
    Ok((file, function))
}

fn bounded_interval(field: &str, d: Duration) -> Result<(), ValidationError> {
    if d < MIN_SCALE_INTERVAL || d > MAX_SCALE_INTERVAL {
        return Err(ValidationError::new(
            field,
            format!(
                "must be between {} and {}",
                format_duration(MIN_SCALE_INTERVAL),
                format_duration(MAX_SCALE_INTERVAL)
            ),
        ));
    }
    Ok(())
}

/// Whether `name` may name a service: a DNS label.
pub fn is_service_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_SERVICE_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

fn validate_name(name: &str) -> Result<(), ValidationError> {
    if is_service_name(name) {
        Ok(())
    } else {
        Err(ValidationError::new(
            "name",
            format!(
                "`{name}` is not a service name: 1 to {MAX_SERVICE_NAME} lower-case letters, digits and `-`, not starting or ending with `-`"
            ),
        ))
    }
}

/// A replica job's link to its service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReplicaOf {
    pub service: String,
    /// The service generation (spec version) the replica runs.
    pub generation: u64,
    /// The replica's number within the service, from 1, never reused.
    pub index: u32,
}

/// One replica the service has made: its job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReplicaRef {
    pub index: u32,
    pub job: String,
    pub generation: u64,
}

/// The last change of the replica count, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Decision {
    #[schema(value_type = String)]
    pub at: Timestamp,
    pub from: u32,
    pub to: u32,
    pub why: String,
}

/// A service's intent, stored at `services/NAME`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Service {
    #[serde(default = "first_schema_version")]
    pub schema_version: u32,
    pub name: String,
    pub spec: ServiceSpec,
    /// Bumped when the spec changes what replicas run (a rollout).
    pub generation: u64,
    #[serde(default)]
    pub desired: Desired,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// How many replicas the autoscaler wants now, within `[min, max]`.
    pub target: u32,
    /// Replicas made and not yet known to have ended, oldest first.
    #[serde(default)]
    pub replicas: Vec<ReplicaRef>,
    /// Replicas that ended, newest last, at most `ENDED_REPLICAS_KEPT`.
    #[serde(default)]
    pub ended: Vec<ReplicaRef>,
    /// The next replica's index.
    pub next_index: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
    /// Why the custom policy was not used at its last call (its error), if it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_error: Option<String>,
    /// Why the service is as it is (a replica failing to start, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

impl Service {
    pub fn new(spec: ServiceSpec, owner: Option<String>, now: Timestamp) -> Service {
        Service {
            schema_version: SERVICE_SCHEMA_VERSION,
            name: spec.name.clone(),
            target: spec.serving.replicas.min,
            spec,
            generation: 1,
            desired: Desired::Run,
            owner,
            replicas: Vec::new(),
            ended: Vec::new(),
            next_index: 1,
            decision: None,
            policy_error: None,
            reason: None,
            created_at: now,
            updated_at: now,
        }
    }

    /// Takes a new spec (`runyard serve` again): a rollout when replicas would run something
    /// else, else only the serving settings change. The target stays within the new bounds.
    pub fn respec(&mut self, spec: ServiceSpec, now: Timestamp) {
        if self.spec.needs_rollout(&spec) {
            self.generation += 1;
        }
        let r = spec.serving.replicas;
        self.spec = spec;
        self.target = self.target.clamp(r.min, r.max);
        self.desired = Desired::Run;
        self.updated_at = now;
    }

    /// The replica job's spec and link for a new replica.
    pub fn replica_job(&self, index: u32) -> (JobSpec, ReplicaOf) {
        let mut job = self.spec.job.clone();
        job.name = format!("{}-{index}", self.name);
        job.port = true;
        job.timeout = None;
        job.retries = 0;
        (
            job,
            ReplicaOf {
                service: self.name.clone(),
                generation: self.generation,
                index,
            },
        )
    }

    /// Moves a replica from the live list to the ended ones.
    pub fn forget(&mut self, job: &str) {
        if let Some(i) = self.replicas.iter().position(|r| r.job == job) {
            let r = self.replicas.remove(i);
            self.ended.push(r);
            let over = self.ended.len().saturating_sub(ENDED_REPLICAS_KEPT);
            self.ended.drain(..over);
        }
    }

    /// Every replica the record knows, live and ended.
    pub fn all_replicas(&self) -> impl Iterator<Item = &ReplicaRef> {
        self.ended.iter().chain(self.replicas.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({"name": "echo", "repo": "https://example.com/r.git", "script": "serve.py"})
    }

    fn with(k: &str, v: Value) -> Value {
        let mut b = base();
        b[k] = v;
        b
    }

    fn field_of(v: Value) -> String {
        ServiceSpec::from_value(v).unwrap_err().field
    }

    #[test]
    fn defaults_are_the_seeds() {
        let s = ServiceSpec::from_value(base()).unwrap();
        assert_eq!(s.serving.replicas, Replicas { min: 1, max: 4 });
        assert_eq!(
            s.serving.autoscale.scale_out_interval,
            Duration::from_secs(10)
        );
        assert_eq!(s.serving.health, "/health");
        assert!(s.job.port);
        assert_eq!(s.serving.batching, None);
        assert!(!s.serving.public);
        let again = ServiceSpec::from_value(s.to_value()).unwrap();
        assert_eq!(again, s);
        let stored: ServiceSpec =
            serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
        assert_eq!(stored, s);
    }

    #[test]
    fn batching_defaults_and_round_trip() {
        let s = ServiceSpec::from_value(with("batching", json!({}))).unwrap();
        assert_eq!(
            s.serving.batching,
            Some(Batching {
                max_batch_size: 8,
                timeout: Duration::from_secs(1)
            })
        );
        assert_eq!(s.target_per_replica(), 8);
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases = [
            (
                with("replicas", json!({"min": 3, "max": 2})),
                "replicas.min",
            ),
            (with("replicas", json!({"max": 0})), "replicas.max"),
            (with("replicas", json!({"max": 100000})), "replicas.max"),
            (
                with("batching", json!({"max_batch_size": 0})),
                "batching.max_batch_size",
            ),
            (
                with("batching", json!({"timeout": "2m"})),
                "batching.timeout",
            ),
            (
                with("autoscale", json!({"policy": "scaling"})),
                "autoscale.policy",
            ),
            (
                with("autoscale", json!({"policy": "../x.py:f"})),
                "autoscale.policy",
            ),
            (
                with("autoscale", json!({"policy": "x.py:not a name"})),
                "autoscale.policy",
            ),
            (
                with("autoscale", json!({"scale_out_interval": "1ms"})),
                "autoscale.scale_out_interval",
            ),
            (with("autoscale", json!({"bogus": 1})), "autoscale.bogus"),
            (
                with("cold_start", json!({"proxy": "ftp://x"})),
                "cold_start.proxy",
            ),
            (with("health", json!("health")), "health"),
            (with("timeout", json!("1h")), "timeout"),
            (with("retries", json!(2)), "retries"),
            (with("port", json!(true)), "port"),
            (with("name", json!("Not_A_Label")), "name"),
            (with("name", json!(5)), "name"),
            (with("script", json!("x.sh")), "script"),
            (with("unknown", json!(1)), "unknown"),
            (json!([]), "body"),
        ];
        for (v, field) in cases {
            assert_eq!(field_of(v.clone()), field, "{v}");
        }
        let mut no_name = base();
        no_name.as_object_mut().unwrap().remove("name");
        assert_eq!(field_of(no_name), "name");
    }

    #[test]
    fn policies_parse() {
        assert_eq!(
            parse_policy("scaling.py:scale"),
            Ok(("scaling.py", "scale"))
        );
        assert_eq!(parse_policy("a/b.py:f_1"), Ok(("a/b.py", "f_1")));
        assert!(parse_policy("/abs.py:f").is_err());
        assert!(parse_policy("x.py:").is_err());
    }

    #[test]
    fn respec_rolls_only_when_replicas_change() {
        let now = Timestamp::from_millis(0);
        let spec = ServiceSpec::from_value(base()).unwrap();
        let mut s = Service::new(spec.clone(), None, now);
        let mut wider = spec.clone();
        wider.serving.replicas = Replicas { min: 2, max: 8 };
        s.respec(wider, now);
        assert_eq!((s.generation, s.target), (1, 2));
        let mut newer = s.spec.clone();
        newer.job.revision = "v2".into();
        s.respec(newer, now);
        assert_eq!(s.generation, 2);
        let (job, of) = s.replica_job(3);
        assert_eq!(
            (job.name.as_str(), job.port, of.generation),
            ("echo-3", true, 2)
        );
    }

    #[test]
    fn ended_replicas_are_bounded() {
        let now = Timestamp::from_millis(0);
        let mut s = Service::new(ServiceSpec::from_value(base()).unwrap(), None, now);
        for i in 0..100u32 {
            s.replicas.push(ReplicaRef {
                index: i,
                job: format!("j{i}"),
                generation: 1,
            });
            s.forget(&format!("j{i}"));
        }
        assert!(s.replicas.is_empty());
        assert_eq!(s.ended.len(), ENDED_REPLICAS_KEPT);
        assert_eq!(s.ended.last().unwrap().index, 99);
    }
}
