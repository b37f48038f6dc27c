//! Builds the fake `libnvidia-ml.so` (`fake-nvml/fake_nvml.c`) with gcc, one library per GPU
//! count, cached by count and source hash; concurrent callers (threads or test processes) are
//! safe because each builds to its own temporary name and renames it into place atomically.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, bail};

/// Path of the C source of the fake library.
pub const FAKE_NVML_SOURCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fake-nvml/fake_nvml.c");

/// Returns the path of a fake NVML library reporting `gpu_count` GPUs, compiling it with
/// `gcc -shared -fPIC` if it is not cached yet.
///
/// GPU `i` is "Fake GPU i" with UUID `GPU-fake-<gpu_count>-<i>` and 16 GiB of memory. Each
/// count gets its own file, so several variants can be loaded in one process.
pub fn build_fake_nvml(gpu_count: u32) -> anyhow::Result<PathBuf> {
    let source =
        std::fs::read(FAKE_NVML_SOURCE).with_context(|| format!("reading {FAKE_NVML_SOURCE}"))?;
    let dir = cache_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let library = dir.join(format!(
        "libnvidia-ml-fake{gpu_count}-{:016x}.so",
        fnv1a(&source)
    ));
    if library.is_file() {
        return Ok(library);
    }

    static BUILDS: AtomicU64 = AtomicU64::new(0);
    let temporary = dir.join(format!(
        ".building-{}-{}-{}",
        std::process::id(),
        BUILDS.fetch_add(1, Ordering::Relaxed),
        library
            .file_name()
            .and_then(|name| name.to_str())
            .unwrap_or("fake.so"),
    ));
    let built = compile(gpu_count, &temporary).and_then(|()| {
        std::fs::rename(&temporary, &library)
            .with_context(|| format!("renaming {} to {}", temporary.display(), library.display()))
    });
    if built.is_err() {
        // Nothing else uses this name; a failed build must not leave it behind.
        let _ = std::fs::remove_file(&temporary);
    }
    built.map(|()| library)
}

fn compile(gpu_count: u32, output: &Path) -> anyhow::Result<()> {
    // No `-Wl,-soname`: glibc could otherwise alias two variants loaded from different paths.
    let result = Command::new("gcc")
        .args(["-shared", "-fPIC", "-fvisibility=hidden", "-std=c11", "-O1"])
        .args(["-Wall", "-Wextra"])
        .arg(format!("-DFAKE_GPU_COUNT={gpu_count}"))
        .arg("-o")
        .arg(output)
        .arg(FAKE_NVML_SOURCE)
        .output()
        .context("running gcc to build the fake NVML library")?;
    if !result.status.success() {
        bail!(
            "gcc failed to build the fake NVML library ({}): {}",
            result.status,
            String::from_utf8_lossy(&result.stderr)
        );
    }
    Ok(())
}

/// `<target dir>/fake-nvml` when running from a Cargo target directory (test binaries live in
/// `<target>/<profile>/deps`), else a per-user directory under the system temp dir.
fn cache_dir() -> PathBuf {
    let in_target = std::env::current_exe().ok().and_then(|exe| {
        exe.ancestors()
            .find(|dir| dir.file_name().is_some_and(|name| name == "deps"))
            .and_then(Path::parent)
            .map(|profile| profile.join("fake-nvml"))
    });
    in_target.unwrap_or_else(|| {
        // Keyed by user so users sharing a temp dir do not fight over one cache; `/proc/self`
        // belongs to this process's effective user.
        let uid = std::fs::metadata("/proc/self").map_or(0, |meta| meta.uid());
        std::env::temp_dir().join(format!("runyard-fake-nvml-{uid}"))
    })
}

/// 64-bit FNV-1a: a hash that is stable across Rust versions, to key the cache by source.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_reference_values() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn libraries_are_cached_per_count() {
        let one = build_fake_nvml(1).expect("build 1");
        let three = build_fake_nvml(3).expect("build 3");
        assert_ne!(one, three);
        assert!(one.is_file() && three.is_file());
        assert_eq!(build_fake_nvml(1).expect("cached"), one);
    }

    #[test]
    fn concurrent_builds_agree() {
        let paths: Vec<PathBuf> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|_| scope.spawn(|| build_fake_nvml(5).expect("build 5")))
                .collect();
            handles
                .into_iter()
                .map(|handle| handle.join().expect("builder thread"))
                .collect()
        });
        assert!(paths.iter().all(|path| path == &paths[0] && path.is_file()));
        let leftovers = std::fs::read_dir(cache_dir())
            .expect("cache dir")
            .filter_map(Result::ok)
            .filter(|entry| {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                name.starts_with(&format!(".building-{}-", std::process::id()))
                    && name.contains("libnvidia-ml-fake5-")
            })
            .count();
        assert_eq!(leftovers, 0, "temporary build files left behind");
    }
}
