//! The environment files of an MLflow project, as pip requirements for uv: `python_env.yaml`
//! (`python`, `build_dependencies`, `dependencies`) and conda environment files (the `pip:` list,
//! and conda packages published on PyPI under the same name, with their conda version specs
//! rewritten as pip's). What has no PyPI counterpart is listed, never dropped silently.

use serde::Deserialize;

/// What an environment file asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EnvRequest {
    /// The Python version constraint (`3.11`, `3.11.7`, `>=3.9`), if any.
    pub python: Option<String>,
    /// pip requirement lines (options such as `-r file` included), build dependencies first.
    pub requirements: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PythonEnvFile {
    #[serde(default)]
    python: Option<serde_yaml::Value>,
    #[serde(default)]
    build_dependencies: Vec<String>,
    #[serde(default)]
    dependencies: Vec<String>,
}

/// Parses a `python_env.yaml`.
pub fn parse_python_env(text: &str) -> Result<EnvRequest, String> {
    let f: PythonEnvFile = serde_yaml::from_str(text).map_err(|e| format!("{e}"))?;
    let python = match f.python {
        None | Some(serde_yaml::Value::Null) => None,
        Some(serde_yaml::Value::String(s)) => Some(s),
        Some(serde_yaml::Value::Number(n)) if n.is_f64() => {
            return Err(format!(
                "`python: {n}` is read as a number, which loses trailing zeros (3.10 is 3.1): quote the version, as in python: \"3.10\""
            ));
        }
        Some(serde_yaml::Value::Number(n)) => Some(n.to_string()),
        Some(_) => return Err("`python` is not a version".into()),
    };
    let mut requirements = f.build_dependencies;
    requirements.extend(f.dependencies);
    Ok(EnvRequest {
        python,
        requirements,
    })
}

#[derive(Deserialize)]
struct CondaFile {
    #[serde(default)]
    dependencies: Vec<serde_yaml::Value>,
}

/// Conda packages that are not Python packages (libraries, toolchains, CUDA runtimes): they have
/// no PyPI counterpart of the same name.
const CONDA_ONLY: &[&str] = &[
    "blas",
    "bzip2",
    "ca-certificates",
    "cudatoolkit",
    "cudnn",
    "ffmpeg",
    "gcc",
    "git",
    "gxx",
    "ld_impl_linux-64",
    "make",
    "mkl",
    "nccl",
    "ncurses",
    "nodejs",
    "openblas",
    "openssl",
    "readline",
    "sqlite",
    "tk",
    "xz",
    "zlib",
];

/// Conda names of packages PyPI knows under another name.
const RENAMED: &[(&str, &str)] = &[
    ("pytorch", "torch"),
    ("pytorch-cpu", "torch"),
    ("py-xgboost", "xgboost"),
    ("py-opencv", "opencv-python"),
];

/// Parses a conda environment file into pip requirements. `Err` lists every dependency that has
/// no PyPI counterpart.
pub fn parse_conda(text: &str) -> Result<EnvRequest, String> {
    let f: CondaFile = serde_yaml::from_str(text).map_err(|e| format!("{e}"))?;
    let mut out = EnvRequest::default();
    let mut unmapped = Vec::new();
    for dep in f.dependencies {
        match dep {
            serde_yaml::Value::String(spec) => match conda_to_pip(&spec) {
                Mapped::Python(v) => out.python = v,
                Mapped::Skip => {}
                Mapped::Pip(r) => out.requirements.push(r),
                Mapped::No => unmapped.push(spec),
            },
            serde_yaml::Value::Mapping(m) => {
                for (k, v) in m {
                    if k.as_str() != Some("pip") {
                        return Err(format!(
                            "dependencies: `{}` is not a package or a `pip:` list",
                            serde_yaml::to_string(&k).unwrap_or_default().trim()
                        ));
                    }
                    let list: Vec<String> =
                        serde_yaml::from_value(v).map_err(|e| format!("dependencies.pip: {e}"))?;
                    out.requirements.extend(list);
                }
            }
            other => {
                return Err(format!(
                    "dependencies: `{}` is not a package",
                    serde_yaml::to_string(&other).unwrap_or_default().trim()
                ));
            }
        }
    }
    if !unmapped.is_empty() {
        return Err(format!(
            "conda packages with no PyPI counterpart (Runyard installs with uv, not conda): {}; \
             remove them, or use a python_env.yaml",
            unmapped.join(", ")
        ));
    }
    Ok(out)
}

enum Mapped {
    Python(Option<String>),
    Skip,
    Pip(String),
    No,
}

/// One conda match spec (`numpy=1.21`, `conda-forge::scikit-learn>=1.0`, `pip`, `python=3.11`).
fn conda_to_pip(spec: &str) -> Mapped {
    let spec = spec.trim();
    let spec = spec.rsplit_once("::").map_or(spec, |(_, s)| s);
    let end = spec
        .find(|c: char| " =<>!~".contains(c))
        .unwrap_or(spec.len());
    let (name, version) = (spec[..end].trim(), spec[end..].trim());
    let lower = name.to_ascii_lowercase();
    let version = pip_version(version);
    if lower == "python" {
        return Mapped::Python(version.map(|v| v.trim_start_matches("==").to_string()));
    }
    if lower == "pip" {
        return Mapped::Skip;
    }
    if CONDA_ONLY.contains(&lower.as_str())
        || lower.starts_with("lib")
        || lower.starts_with('_')
        || lower.starts_with("r-")
        || lower.starts_with("cuda-")
        || lower.starts_with("mkl-")
    {
        return Mapped::No;
    }
    let name = RENAMED
        .iter()
        .find(|(c, _)| *c == lower)
        .map_or(name, |(_, p)| p);
    Mapped::Pip(format!("{name}{}", version.unwrap_or_default()))
}

/// A conda version spec as pip's: `=1.21` (a prefix) is `==1.21.*`, `=1.21=build` drops the
/// build, `1.21*` is `==1.21.*`; comparisons stay as they are.
fn pip_version(v: &str) -> Option<String> {
    let v = v.trim();
    if v.is_empty() {
        return None;
    }
    if v.starts_with(['<', '>', '!', '~']) || v.starts_with("==") {
        return Some(v.replace(' ', ""));
    }
    let v = v.trim_start_matches('=').trim();
    let v = v.split(['=', ' ']).next().unwrap_or(v);
    let v = v.trim_end_matches('*').trim_end_matches('.');
    if v.is_empty() {
        return None;
    }
    Some(format!("=={v}.*"))
}

/// Whether an interpreter of version `have` (`3.11.7`) satisfies `want`: a version (`3.11` or
/// `3.11.7`: the same minor version, any patch release, since they share their ABI), or
/// comparisons joined by commas (`>=3.9,<3.13`).
pub fn python_matches(want: &str, have: &str) -> bool {
    let have = parse_version(have);
    want.split(',').map(str::trim).all(|clause| {
        let (op, v) = match clause.find(|c: char| c.is_ascii_digit()) {
            Some(i) => clause.split_at(i),
            None => return false,
        };
        let v = v.trim_end_matches(".*").trim_end_matches('*');
        let want = parse_version(v);
        match op.trim() {
            "" | "=" | "==" => have.iter().zip(&want).take(2).all(|(a, b)| a == b),
            ">=" => have >= want,
            "<=" => have <= want,
            ">" => have > want,
            "<" => have < want,
            "!=" => have != want,
            "~=" => have >= want && have[0] == want[0],
            _ => false,
        }
    })
}

fn parse_version(v: &str) -> Vec<u32> {
    v.split('.')
        .map(|p| {
            p.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .unwrap_or(0)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_env_files() {
        let e = parse_python_env(
            "python: \"3.11.7\"\nbuild_dependencies: [pip, setuptools]\ndependencies:\n  - six==1.16.0\n  - -r requirements.txt\n",
        )
        .unwrap();
        assert_eq!(e.python.as_deref(), Some("3.11.7"));
        assert_eq!(
            e.requirements,
            ["pip", "setuptools", "six==1.16.0", "-r requirements.txt"]
        );
        assert!(
            parse_python_env("python: 3.10")
                .unwrap_err()
                .contains("quote")
        );
        assert_eq!(
            parse_python_env("python: '3.10'")
                .unwrap()
                .python
                .as_deref(),
            Some("3.10")
        );
        assert!(parse_python_env("pyhton: 3.10").is_err());
    }

    #[test]
    fn conda_files_map_to_pip_or_list_what_cannot() {
        let e = parse_conda(
            "name: t\nchannels: [conda-forge]\ndependencies:\n  - python=3.11\n  - pip\n  - numpy=1.26\n  - conda-forge::scikit-learn>=1.3\n  - pandas\n  - pytorch\n  - scipy=1.11.4=py311h\n  - pip:\n    - mlflow\n    - six==1.16.0\n",
        )
        .unwrap();
        assert_eq!(e.python.as_deref(), Some("3.11.*"));
        assert_eq!(
            e.requirements,
            [
                "numpy==1.26.*",
                "scikit-learn>=1.3",
                "pandas",
                "torch",
                "scipy==1.11.4.*",
                "mlflow",
                "six==1.16.0"
            ]
        );
        let err =
            parse_conda("dependencies: [numpy, cudatoolkit=11.8, libgcc-ng, r-base]").unwrap_err();
        assert!(err.contains("cudatoolkit=11.8, libgcc-ng, r-base"), "{err}");
    }

    #[test]
    fn python_versions() {
        assert!(python_matches("3.11", "3.11.7"));
        assert!(python_matches("3.11.2", "3.11.7"));
        assert!(python_matches("3.11.*", "3.11.7"));
        assert!(!python_matches("3.10", "3.11.7"));
        assert!(python_matches(">=3.9,<3.13", "3.11.7"));
        assert!(!python_matches(">=3.12", "3.11.7"));
        assert!(!python_matches("latest", "3.11.7"));
    }
}
