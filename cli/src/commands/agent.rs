//! `runyard agent`: agent configuration from flags (token, `--compute` list, host facts) and the
//! run until a signal. `up` builds its local agent with the same helpers.
//!
//! Invariant: a configuration error is reported before the agent dials anything.

use std::path::{Path, PathBuf};

use tracing::info;

use super::{CommandError, data_dir_or_default};
use crate::args::{AgentArgs, DEFAULT_PYTHON};
use crate::shutdown;

/// Subdirectory of the data dir that an agent uses by default.
pub const AGENT_DIR_NAME: &str = "agent";
/// Name used when the host name cannot be read.
const FALLBACK_HOST_NAME: &str = "localhost";

/// What an agent offers, from `--compute`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offer {
    /// Concurrent `cpu-small` jobs; 0 when the list has no `cpu-small`.
    pub cpu_small_slots: u32,
    /// Offer the GPUs NVML finds.
    pub gpus: bool,
}

/// Runs the agent until SIGINT/SIGTERM.
pub async fn agent(args: AgentArgs) -> Result<u8, CommandError> {
    let root = shutdown::root_token().map_err(CommandError::Signals)?;
    let token = match (args.token, &args.token_file) {
        (Some(t), _) if !t.trim().is_empty() => t.trim().to_string(),
        (_, Some(path)) => read_token_file(path).await?,
        _ => return Err(CommandError::NoAgentToken),
    };
    let offer = match &args.compute {
        Some(list) => parse_compute_list(list, cpu_count()).map_err(CommandError::ComputeList)?,
        None => default_offer(),
    };
    let data_dir = match args.data_dir {
        Some(d) => d,
        None => data_dir_or_default(None)?.join(AGENT_DIR_NAME),
    };
    let name = match args.name {
        Some(n) => n,
        None => host_name().await,
    };
    let mut config = runyard_agent::Config {
        controller: args.controller,
        token,
        ca: args.ca,
        data_dir,
        name,
        cpu_small_slots: offer.cpu_small_slots,
        offer_gpus: offer.gpus,
        nvml_library: args.nvml_library,
        python: args.python,
        uv: args.uv,
        uv_cache: args.uv_cache,
        cache_size: args.cache_size,
        min_free: args.min_free,
        isolation: Default::default(),
        git_credentials: Vec::new(),
    };
    args.isolation.apply(&mut config);
    info!(
        agent = %config.name,
        controller = %config.controller,
        cpu_small = config.cpu_small_slots,
        gpus = config.offer_gpus,
        data_dir = %config.data_dir.display(),
        "agent starting"
    );
    runyard_agent::run(config, root).await?;
    info!("agent stopped");
    Ok(0)
}

/// The local agent of `runyard up`: every CPU as a `cpu-small` slot, and the GPUs.
pub async fn local_config(
    controller: String,
    token: String,
    data_dir: &Path,
) -> runyard_agent::Config {
    let offer = default_offer();
    runyard_agent::Config {
        controller,
        token,
        ca: None,
        data_dir: data_dir.join(AGENT_DIR_NAME),
        name: host_name().await,
        cpu_small_slots: offer.cpu_small_slots,
        offer_gpus: offer.gpus,
        nvml_library: None,
        python: PathBuf::from(DEFAULT_PYTHON),
        uv: None,
        uv_cache: None,
        cache_size: None,
        min_free: runyard_agent::cache::DEFAULT_MIN_FREE,
        isolation: Default::default(),
        git_credentials: Vec::new(),
    }
}

/// A configuration to apply flags to, in tests.
#[cfg(test)]
pub fn test_config() -> runyard_agent::Config {
    runyard_agent::Config {
        controller: String::new(),
        token: String::new(),
        data_dir: PathBuf::new(),
        name: String::new(),
        cpu_small_slots: 0,
        offer_gpus: false,
        nvml_library: None,
        python: PathBuf::from(DEFAULT_PYTHON),
        uv: None,
        uv_cache: None,
        cache_size: None,
        min_free: 0,
        ca: None,
        isolation: Default::default(),
        git_credentials: Vec::new(),
    }
}

/// `cpu-small:<CPUs>,gpu`.
pub fn default_offer() -> Offer {
    Offer {
        cpu_small_slots: cpu_count(),
        gpus: true,
    }
}

/// Parses `cpu-small[:N]` and `gpu`, comma-separated; `cpu-small` alone means `cpus` slots.
pub fn parse_compute_list(list: &str, cpus: u32) -> Result<Offer, String> {
    let mut cpu_small: Option<u32> = None;
    let mut gpus = false;
    for item in list.split(',').map(str::trim) {
        match item.split_once(':') {
            _ if item.is_empty() => {
                return Err(format!(
                    "an empty entry in `{list}`: list `cpu-small[:N]` and/or `gpu`, comma-separated"
                ));
            }
            None if item == "cpu-small" => set_once(&mut cpu_small, cpus.max(1), item)?,
            Some(("cpu-small", n)) => {
                let n: u32 = n.parse().map_err(|_| {
                    format!("`{item}`: the slot count must be a whole number, as in `cpu-small:4`")
                })?;
                if n == 0 {
                    return Err(format!(
                        "`{item}` offers no slots: leave `cpu-small` out of the list instead"
                    ));
                }
                set_once(&mut cpu_small, n, item)?;
            }
            None if item == "gpu" => {
                if gpus {
                    return Err("`gpu` is listed twice".into());
                }
                gpus = true;
            }
            Some(("gpu", _)) => {
                return Err(format!(
                    "`{item}`: `gpu` takes no count; the agent offers every GPU NVML finds"
                ));
            }
            _ => {
                return Err(format!(
                    "unknown entry `{item}`: use `cpu-small[:N]` or `gpu`"
                ));
            }
        }
    }
    Ok(Offer {
        cpu_small_slots: cpu_small.unwrap_or(0),
        gpus,
    })
}

fn set_once(slot: &mut Option<u32>, n: u32, item: &str) -> Result<(), String> {
    if slot.is_some() {
        return Err(format!("`{item}`: `cpu-small` is listed twice"));
    }
    *slot = Some(n);
    Ok(())
}

/// CPUs this process may use (honours affinity and cgroup quotas).
pub fn cpu_count() -> u32 {
    std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        .unwrap_or(1)
}

/// The kernel's host name; `localhost` if it cannot be read.
pub async fn host_name() -> String {
    let read = tokio::fs::read_to_string("/proc/sys/kernel/hostname").await;
    let name = read.ok().map(|s| s.trim().to_string()).unwrap_or_default();
    if name.is_empty() {
        FALLBACK_HOST_NAME.to_string()
    } else {
        name
    }
}

async fn read_token_file(path: &Path) -> Result<String, CommandError> {
    let err = |cause: String| CommandError::TokenFile {
        path: path.to_path_buf(),
        cause,
    };
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| err(e.to_string()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(err("the file is empty".into()));
    }
    Ok(token.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(cpu_small_slots: u32, gpus: bool) -> Offer {
        Offer {
            cpu_small_slots,
            gpus,
        }
    }

    #[test]
    fn compute_lists() {
        assert_eq!(parse_compute_list("cpu-small,gpu", 8), Ok(offer(8, true)));
        assert_eq!(parse_compute_list("cpu-small:2", 8), Ok(offer(2, false)));
        assert_eq!(
            parse_compute_list(" gpu , cpu-small:3 ", 8),
            Ok(offer(3, true))
        );
        assert_eq!(parse_compute_list("gpu", 8), Ok(offer(0, true)));
        assert_eq!(parse_compute_list("cpu-small", 0), Ok(offer(1, false)));
    }

    #[test]
    fn bad_compute_lists_say_why() {
        for (list, needle) in [
            ("", "empty entry"),
            ("cpu-small,", "empty entry"),
            ("cpu-small:0", "offers no slots"),
            ("cpu-small:x", "whole number"),
            ("cpu-small:-1", "whole number"),
            ("cpu-small,cpu-small:2", "listed twice"),
            ("gpu,gpu", "listed twice"),
            ("gpu:2", "takes no count"),
            ("tpu", "unknown entry `tpu`"),
            ("CPU-SMALL", "unknown entry"),
        ] {
            let e = parse_compute_list(list, 4).unwrap_err();
            assert!(e.contains(needle), "{list}: {e}");
        }
    }

    #[test]
    fn default_offers_every_cpu_and_the_gpus() {
        let d = default_offer();
        assert!(d.gpus);
        assert!(d.cpu_small_slots >= 1);
        assert_eq!(d.cpu_small_slots, cpu_count());
    }

    #[tokio::test]
    async fn token_file_is_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("agent.token");
        std::fs::write(&f, "ryj_abc\n").unwrap();
        assert_eq!(read_token_file(&f).await.unwrap(), "ryj_abc");
        std::fs::write(&f, "\n").unwrap();
        assert!(
            read_token_file(&f)
                .await
                .unwrap_err()
                .to_string()
                .contains("empty")
        );
        let missing = dir.path().join("nope");
        assert!(matches!(
            read_token_file(&missing).await,
            Err(CommandError::TokenFile { .. })
        ));
    }

    #[tokio::test]
    async fn host_name_is_never_empty() {
        assert!(!host_name().await.is_empty());
    }
}
