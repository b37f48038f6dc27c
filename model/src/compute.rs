//! The compute a job asks for: `cpu-small`, `gpu` (one GPU) or `gpu:N`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Compute {
    /// One of the agent's `cpu-small` slots.
    #[default]
    CpuSmall,
    /// This many whole GPUs on one agent (at least 1).
    Gpu(u32),
}

impl Compute {
    pub fn gpus(self) -> u32 {
        match self {
            Compute::CpuSmall => 0,
            Compute::Gpu(n) => n,
        }
    }
}

/// In JSON: `cpu-small`, `gpu` or `gpu:N`.
impl utoipa::PartialSchema for Compute {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some("^(cpu-small|gpu(:[1-9][0-9]*)?)$"))
            .description(Some("What the job runs on: `cpu-small`, `gpu` or `gpu:N`"))
            .into()
    }
}

impl utoipa::ToSchema for Compute {}

impl fmt::Display for Compute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Compute::CpuSmall => f.write_str("cpu-small"),
            Compute::Gpu(1) => f.write_str("gpu"),
            Compute::Gpu(n) => write!(f, "gpu:{n}"),
        }
    }
}

impl FromStr for Compute {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu-small" => Ok(Compute::CpuSmall),
            "gpu" => Ok(Compute::Gpu(1)),
            _ => {
                let Some(n) = s.strip_prefix("gpu:") else {
                    return Err(format!(
                        "unknown compute `{s}`: use `cpu-small`, `gpu` or `gpu:N`"
                    ));
                };
                match n.parse::<u32>() {
                    Ok(0) => Err(
                        "`gpu:0` asks for no GPU: use `cpu-small`, or `gpu:N` with N >= 1".into(),
                    ),
                    Ok(n) if n > 64 => Err(format!("`gpu:{n}`: at most 64 GPUs per job")),
                    Ok(n) => Ok(Compute::Gpu(n)),
                    Err(_) => Err(format!(
                        "`{s}`: the GPU count must be a whole number, as in `gpu:2`"
                    )),
                }
            }
        }
    }
}

impl Serialize for Compute {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Compute {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        for (s, c) in [
            ("cpu-small", Compute::CpuSmall),
            ("gpu", Compute::Gpu(1)),
            ("gpu:2", Compute::Gpu(2)),
        ] {
            assert_eq!(s.parse::<Compute>().unwrap(), c);
            assert_eq!(c.to_string(), s);
        }
        assert_eq!("gpu:1".parse::<Compute>().unwrap(), Compute::Gpu(1));
    }

    #[test]
    fn rejects_bad_values() {
        for s in ["", "tpu", "gpu:0", "gpu:x", "gpu:-1", "gpu:1000", "GPU"] {
            assert!(s.parse::<Compute>().is_err(), "{s} should be rejected");
        }
    }
}
