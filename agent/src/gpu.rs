//! GPU detection and sampling through NVML: a host without the NVML library (or without a loaded
//! driver) has zero GPUs, not an error; every call here blocks, so async callers go through
//! `spawn_blocking`, which is why `GpuProbe` is `Send + Sync`.

use std::path::Path;
use std::sync::{Mutex, PoisonError};

use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, Nvml};
use runyard_model::GpuInfo;
use tracing::{debug, info, warn};

/// The library `Nvml::init` opens when no path is given (resolved through the loader path).
const DEFAULT_LIBRARY: &str = "libnvidia-ml.so.1";

/// A failed NVML call while detecting GPUs. Each variant names the NVML function that failed.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("nvmlInit_v2 failed for library {library}: {source}")]
    Init { library: String, source: NvmlError },
    #[error("nvmlDeviceGetCount_v2 failed: {source}")]
    DeviceCount { source: NvmlError },
    #[error("nvmlDeviceGetHandleByIndex_v2 failed for GPU {index}: {source}")]
    DeviceHandle { index: u32, source: NvmlError },
    #[error("nvmlDeviceGetName failed for GPU {index}: {source}")]
    Name { index: u32, source: NvmlError },
    #[error("nvmlDeviceGetUUID failed for GPU {index}: {source}")]
    Uuid { index: u32, source: NvmlError },
    #[error("nvmlDeviceGetMemoryInfo_v2 failed for GPU {index}: {source}")]
    MemoryInfo { index: u32, source: NvmlError },
    #[error("nvmlDeviceGetUtilizationRates failed for GPU {index}: {source}")]
    Utilization { index: u32, source: NvmlError },
}

/// The GPUs of this host and the NVML handle to sample them.
///
/// `Send + Sync`: NVML is thread-safe and `Nvml` says so; the last readings sit behind a
/// `Mutex` that is held only while sampling (never across `.await`, there is none here).
/// Dropping the probe shuts NVML down and unloads the library.
pub struct GpuProbe {
    /// `None` for a host without GPUs or an agent told not to offer them.
    nvml: Option<Nvml>,
    /// One entry per GPU, in NVML index order, with its latest readings.
    gpus: Mutex<Vec<Reading>>,
}

/// The latest readings of one GPU.
struct Reading {
    info: GpuInfo,
    /// The last sample failed; its error was logged once and is not repeated until recovery.
    failing: bool,
}

impl std::fmt::Debug for GpuProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuProbe")
            .field("nvml", &self.nvml.is_some())
            .field("gpus", &self.gpus())
            .finish()
    }
}

/// Why an NVML init failure still means "a host with zero GPUs".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NoGpus {
    /// The library could not be loaded: no NVIDIA driver is installed.
    NoLibrary,
    /// The library is there but the kernel driver is not loaded (a CPU host with the user-space
    /// driver installed, or a GPU host after a failed driver update). The agent still serves
    /// `cpu-small` jobs and shows zero GPUs rather than refusing to start.
    DriverNotLoaded,
}

/// Sorts an init failure into "zero GPUs" or a real error.
fn classify_init_error(err: NvmlError) -> Result<(NoGpus, String), NvmlError> {
    match err {
        NvmlError::LibloadingError(load) => Ok((NoGpus::NoLibrary, load.to_string())),
        NvmlError::DriverNotLoaded => Ok((NoGpus::DriverNotLoaded, err.to_string())),
        other => Err(other),
    }
}

/// Detects this host's GPUs: count, index, UUID, name, memory and utilisation.
///
/// `lib_path` loads NVML from that file instead of the system's `libnvidia-ml.so.1`. A library
/// that cannot be loaded means zero GPUs (logged at info), as does a driver that is not loaded
/// (logged at warn); any other NVML failure is an error naming the call. Blocks: call it from
/// `spawn_blocking` in async code.
pub fn detect(lib_path: Option<&Path>) -> Result<GpuProbe, GpuError> {
    let library = lib_path.map_or_else(
        || DEFAULT_LIBRARY.to_owned(),
        |path| path.display().to_string(),
    );
    let mut builder = Nvml::builder();
    if let Some(path) = lib_path {
        builder.lib_path(path.as_os_str());
    }
    let nvml = match builder.init() {
        Ok(nvml) => nvml,
        Err(err) => {
            return match classify_init_error(err) {
                Ok((NoGpus::NoLibrary, reason)) => {
                    info!(%library, %reason, "no NVML library, offering no GPUs");
                    Ok(GpuProbe::none())
                }
                Ok((NoGpus::DriverNotLoaded, reason)) => {
                    warn!(%library, %reason, "NVIDIA driver not loaded, offering no GPUs");
                    Ok(GpuProbe::none())
                }
                Err(source) => Err(GpuError::Init { library, source }),
            };
        }
    };
    let count = nvml
        .device_count()
        .map_err(|source| GpuError::DeviceCount { source })?;
    let gpus = (0..count)
        .map(|index| read_gpu(&nvml, index))
        .collect::<Result<Vec<_>, _>>()?;
    let driver = nvml
        .sys_driver_version()
        .unwrap_or_else(|_| "unknown".to_owned());
    info!(%library, %driver, count, "gpus detected");
    for gpu in &gpus {
        info!(
            gpu = gpu.index,
            uuid = %gpu.uuid,
            name = %gpu.name,
            memory_total_bytes = gpu.memory_total_bytes,
            "gpu found"
        );
    }
    Ok(GpuProbe {
        nvml: Some(nvml),
        gpus: Mutex::new(
            gpus.into_iter()
                .map(|info| Reading {
                    info,
                    failing: false,
                })
                .collect(),
        ),
    })
}

impl GpuProbe {
    /// A probe with no GPUs and no NVML handle, for hosts without GPUs or agents told not to
    /// offer them.
    pub fn none() -> Self {
        Self {
            nvml: None,
            gpus: Mutex::new(Vec::new()),
        }
    }

    /// How many GPUs were detected.
    pub fn count(&self) -> u32 {
        let count = self.lock().len();
        u32::try_from(count).unwrap_or(u32::MAX)
    }

    /// The GPUs with their latest readings, without asking NVML.
    pub fn gpus(&self) -> Vec<GpuInfo> {
        self.lock().iter().map(|gpu| gpu.info.clone()).collect()
    }

    /// Reads memory used and utilisation of every GPU again, for a heartbeat. Blocks.
    ///
    /// A reading that fails keeps its previous value: the error is logged at warn the first
    /// time and at debug while it persists, so a flaky sensor does not flood the log or drop
    /// the GPU from the agent's offer.
    pub fn sample(&self) -> Vec<GpuInfo> {
        let Some(nvml) = &self.nvml else {
            return Vec::new();
        };
        let mut gpus = self.lock();
        for gpu in gpus.iter_mut() {
            match sample_usage(nvml, &mut gpu.info) {
                Ok(()) => {
                    if gpu.failing {
                        info!(gpu = gpu.info.index, "gpu sampling recovered");
                    }
                    gpu.failing = false;
                }
                Err(err) if gpu.failing => {
                    debug!(gpu = gpu.info.index, error = %err, "gpu sampling still failing");
                }
                Err(err) => {
                    warn!(gpu = gpu.info.index, error = %err, "gpu sampling failed, keeping last readings");
                    gpu.failing = true;
                }
            }
        }
        gpus.iter().map(|gpu| gpu.info.clone()).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Reading>> {
        // The readings are plain values, always consistent: a panic elsewhere cannot leave them
        // half-written in a way that matters, so a poisoned lock is still usable.
        self.gpus.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Reads everything about GPU `index`.
fn read_gpu(nvml: &Nvml, index: u32) -> Result<GpuInfo, GpuError> {
    let device = device(nvml, index)?;
    let name = device
        .name()
        .map_err(|source| GpuError::Name { index, source })?;
    let uuid = device
        .uuid()
        .map_err(|source| GpuError::Uuid { index, source })?;
    let memory = device
        .memory_info()
        .map_err(|source| GpuError::MemoryInfo { index, source })?;
    let utilization_percent = utilization(&device, index)?;
    Ok(GpuInfo {
        index,
        uuid,
        name,
        memory_total_bytes: memory.total,
        memory_used_bytes: memory.used,
        utilization_percent,
    })
}

/// Updates memory used and utilisation in `info`; each reading that succeeds is stored even if
/// the other fails.
fn sample_usage(nvml: &Nvml, info: &mut GpuInfo) -> Result<(), GpuError> {
    let index = info.index;
    let device = device(nvml, index)?;
    let memory = device
        .memory_info()
        .map_err(|source| GpuError::MemoryInfo { index, source });
    if let Ok(memory) = &memory {
        info.memory_used_bytes = memory.used;
    }
    let utilization = utilization(&device, index);
    if let Ok(percent) = utilization {
        info.utilization_percent = percent;
    }
    memory.and(utilization).map(|_| ())
}

fn device(nvml: &Nvml, index: u32) -> Result<Device<'_>, GpuError> {
    nvml.device_by_index(index)
        .map_err(|source| GpuError::DeviceHandle { index, source })
}

/// GPU utilisation in percent; 0 on devices that do not report it (some MIG and vGPU setups).
fn utilization(device: &Device<'_>, index: u32) -> Result<u32, GpuError> {
    match device.utilization_rates() {
        Ok(rates) => Ok(rates.gpu),
        Err(NvmlError::NotSupported) => Ok(0),
        Err(source) => Err(GpuError::Utilization { index, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<GpuProbe>();
    }

    #[test]
    fn none_has_no_gpus() {
        let probe = GpuProbe::none();
        assert_eq!(probe.count(), 0);
        assert!(probe.gpus().is_empty());
        assert!(probe.sample().is_empty());
    }

    #[test]
    fn missing_library_means_zero_gpus() {
        let dir = tempfile::tempdir().expect("temp dir");
        let probe = detect(Some(&dir.path().join("libnvidia-ml.so.1"))).expect("not an error");
        assert_eq!(probe.count(), 0);
        assert!(probe.sample().is_empty());
    }

    #[test]
    fn a_file_that_is_not_a_library_means_zero_gpus() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("libnvidia-ml.so.1");
        std::fs::write(&path, b"not an ELF file").expect("write");
        let probe = detect(Some(&path)).expect("not an error");
        assert_eq!(probe.count(), 0);
    }

    #[test]
    fn a_library_without_nvml_is_an_init_error() {
        // libm is loadable everywhere glibc is, and exports no nvmlInit_v2.
        let err = detect(Some(Path::new("libm.so.6"))).expect_err("must fail");
        match &err {
            GpuError::Init { library, source } => {
                assert_eq!(library, "libm.so.6");
                assert!(
                    matches!(source, NvmlError::FailedToLoadSymbol(_)),
                    "{source:?}"
                );
            }
            other => panic!("wrong error: {other:?}"),
        }
        assert!(err.to_string().starts_with("nvmlInit_v2 failed"), "{err}");
    }

    #[test]
    fn init_errors_are_sorted_into_zero_gpus_or_errors() {
        assert!(matches!(
            classify_init_error(NvmlError::DriverNotLoaded),
            Ok((NoGpus::DriverNotLoaded, _))
        ));
        assert!(matches!(
            classify_init_error(NvmlError::NoPermission),
            Err(NvmlError::NoPermission)
        ));
        assert!(matches!(
            classify_init_error(NvmlError::Unknown),
            Err(NvmlError::Unknown)
        ));
    }
}
