//! GPU detection through the real nvml-wrapper code path, against fake NVML libraries with
//! different GPU counts loaded side by side in one process, as several agents in one test would.

use std::path::Path;
use std::sync::Arc;

use runyard_agent::gpu::{self, GpuProbe};
use runyard_tests::fake_nvml::build_fake_nvml;

const GIB: u64 = 1024 * 1024 * 1024;

fn detect(path: &Path) -> GpuProbe {
    gpu::detect(Some(path)).unwrap_or_else(|err| panic!("detect {}: {err}", path.display()))
}

/// Checks what the fake reports for a host with `count` GPUs.
fn assert_fake_gpus(probe: &GpuProbe, count: u32) {
    let gpus = probe.gpus();
    assert_eq!(probe.count(), count);
    assert_eq!(gpus.len(), count as usize);
    for (gpu, index) in gpus.iter().zip(0u32..) {
        assert_eq!(gpu.index, index);
        assert_eq!(gpu.uuid, format!("GPU-fake-{count}-{index}"));
        assert_eq!(gpu.name, format!("Fake GPU {index}"));
        assert_eq!(gpu.memory_total_bytes, 16 * GIB);
        // GPU i uses (i + 1) GiB plus 1 MiB per earlier reading of the same loaded library.
        let base = u64::from(index + 1) * GIB;
        assert!(
            (base..base + GIB).contains(&gpu.memory_used_bytes),
            "GPU {index} memory used {}",
            gpu.memory_used_bytes
        );
        assert!(gpu.utilization_percent <= 100);
    }
}

#[test]
fn two_and_four_gpu_libraries_in_one_process() {
    let two_path = build_fake_nvml(2).expect("build 2-GPU fake");
    let four_path = build_fake_nvml(4).expect("build 4-GPU fake");
    assert_ne!(two_path, four_path);

    let two = detect(&two_path);
    let four = detect(&four_path);
    // Both stay loaded at once: each sees only its own library.
    assert_fake_gpus(&two, 2);
    assert_fake_gpus(&four, 4);

    for probe in [&two, &four] {
        let before = probe.gpus();
        let sampled = probe.sample();
        assert_eq!(sampled.len(), before.len());
        for (old, new) in before.iter().zip(&sampled) {
            // Identity is fixed at detection; usage is read again.
            assert_eq!(
                (old.index, &old.uuid, &old.name, old.memory_total_bytes),
                (new.index, &new.uuid, &new.name, new.memory_total_bytes)
            );
            assert!(
                new.memory_used_bytes > old.memory_used_bytes,
                "sample did not read memory again: {old:?} then {new:?}"
            );
            assert!(new.utilization_percent <= 100);
        }
        assert_eq!(probe.gpus(), sampled, "gpus() returns the latest sample");
    }
}

#[test]
fn nonexistent_library_means_zero_gpus() {
    let dir = tempfile::tempdir().expect("temp dir");
    let probe = gpu::detect(Some(&dir.path().join("no-such-libnvidia-ml.so.1")))
        .expect("a missing library is not an error");
    assert_eq!(probe.count(), 0);
    assert!(probe.gpus().is_empty());
    assert!(probe.sample().is_empty());
}

#[test]
fn nvml_with_zero_devices() {
    let probe = detect(&build_fake_nvml(0).expect("build 0-GPU fake"));
    assert_eq!(probe.count(), 0);
    assert!(probe.sample().is_empty());
}

#[test]
fn detect_again_after_drop() {
    let path = build_fake_nvml(2).expect("build 2-GPU fake");
    drop(detect(&path));
    // Shutdown and unload on drop leave nothing behind that breaks a later init.
    let again = detect(&path);
    assert_fake_gpus(&again, 2);
    assert_eq!(again.sample().len(), 2);
}

#[tokio::test]
async fn probe_is_used_from_spawn_blocking() {
    let path = build_fake_nvml(3).expect("build 3-GPU fake");
    let probe = tokio::task::spawn_blocking(move || gpu::detect(Some(&path)))
        .await
        .expect("detect task")
        .expect("detect");
    let probe = Arc::new(probe);
    let samples = futures::future::join_all((0..4).map(|_| {
        let probe = Arc::clone(&probe);
        tokio::task::spawn_blocking(move || probe.sample())
    }))
    .await;
    for sample in samples {
        let sample = sample.expect("sample task");
        assert_eq!(
            sample
                .iter()
                .map(|gpu| gpu.uuid.as_str())
                .collect::<Vec<_>>(),
            ["GPU-fake-3-0", "GPU-fake-3-1", "GPU-fake-3-2"]
        );
    }
}
