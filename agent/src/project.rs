//! An MLflow project entry point, after checkout: the `MLproject` (or a `.py`/`.sh` file run as
//! an entry point), its parameters checked and filled in, path parameters found in the checkout
//! or on the agent, and the environment file turned into pip requirements for uv. The decisions
//! are `runyard_model::mlproject`'s and `runyard_model::project_env`'s; this module reads the
//! files they need.

use std::path::{Component, Path, PathBuf};

use runyard_model::mlproject::{self, ParamType, ProjectEnv, ProjectRun, Resolved};
use runyard_model::project_env::{self, EnvRequest};
use runyard_model::{FailureKind, JobSpec};

use crate::checkout::resolve_script_at;

/// The file the project's requirements are written to in the attempt's directory.
pub const PROJECT_REQUIREMENTS: &str = "requirements.project.txt";

/// What an entry point runs.
#[derive(Debug)]
pub struct EntryPlan {
    /// The command: `argv[0]` as written (`python`, `bash`, a path in the repository, a name on
    /// `PATH`), resolved by the runner once the environment exists.
    pub argv: Vec<String>,
    /// The project's environment, if it asks for one.
    pub env: Option<EnvRequest>,
    /// What is reported (`project` report line).
    pub run: ProjectRun,
}

/// Why an entry point cannot run.
pub type Refusal = (FailureKind, String);

/// Largest file a `path` parameter's URL may bring.
const MAX_FETCH: u64 = 4 << 30;
/// Longest a `path` parameter's download may take.
const FETCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// Reads the project in `src` (checked out at `commit`) and plans `spec`'s entry point; `path`
/// parameters given as http(s) URLs are downloaded into `fetch_dir`, as MLflow does.
pub async fn plan(
    src: &Path,
    commit: &str,
    spec: &JobSpec,
    agent: &str,
    fetch_dir: &Path,
) -> Result<EntryPlan, Refusal> {
    let entry = spec.entry_point.as_deref().unwrap_or("main");
    let project = match find_project_file(src) {
        Some(file) => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| (FailureKind::Script, format!("cannot read MLproject: {e}")))?;
            Some(mlproject::parse(&text).map_err(|m| (FailureKind::Script, m))?)
        }
        None => None,
    };
    let is_file = entry.ends_with(".py") || entry.ends_with(".sh");
    let (values, argv) = match project.as_ref().and_then(|p| p.entry_points.get(entry)) {
        Some(ep) => {
            let given = mlproject::resolve(ep, &spec.parameters).map_err(params)?;
            let mut values = given.clone();
            locate_paths(src, &mut values, agent, fetch_dir).await?;
            let argv = mlproject::command_argv(&ep.command, &values)
                .map_err(|m| (FailureKind::Script, format!("entry point `{entry}`: {m}")))?;
            (given, argv)
        }
        None if is_file => {
            resolve_script_at(src, entry, commit).map_err(|m| (FailureKind::Script, m))?;
            let values: Vec<Resolved> = spec
                .parameters
                .iter()
                .map(|(k, v)| Resolved {
                    name: k.clone(),
                    kind: None,
                    value: v.clone(),
                })
                .collect();
            let argv = mlproject::file_argv(entry, &values);
            (values, argv)
        }
        None => {
            let why = match &project {
                Some(p) => format!(
                    "no entry point `{entry}` in the MLproject (it has: {})",
                    p.entry_points
                        .keys()
                        .map(String::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                None if spec.entry_point.is_none() => "the repository has no MLproject: name a \
                     script, or an entry point file (.py or .sh)"
                    .to_string(),
                None => format!(
                    "the repository has no MLproject, and entry point `{entry}` is not a .py or .sh file"
                ),
            };
            return Err((FailureKind::Script, why));
        }
    };
    let declared = project
        .as_ref()
        .map_or(ProjectEnv::Unspecified, |p| p.env.clone());
    let (env_name, env) = environment(src, commit, declared)?;
    Ok(EntryPlan {
        argv: argv.clone(),
        env,
        run: ProjectRun {
            entry_point: entry.to_string(),
            parameters: values.into_iter().map(|r| (r.name, r.value)).collect(),
            env: env_name.to_string(),
            argv,
        },
    })
}

fn params(e: mlproject::ParamError) -> Refusal {
    (FailureKind::Params, e.to_string())
}

/// `MLproject`, in any letter case, at the top of the checkout.
fn find_project_file(src: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(src).ok()?;
    entries
        .filter_map(Result::ok)
        .find(|e| {
            mlproject::is_project_file(&e.file_name().to_string_lossy())
                && e.file_type().is_ok_and(|t| t.is_file())
        })
        .map(|e| e.path())
}

/// Path parameters as MLflow has them: a file in the checkout (relative) or on the agent
/// (absolute), made absolute; it must exist, since the job runs here and not where it was
/// submitted.
async fn locate_paths(
    src: &Path,
    values: &mut [Resolved],
    agent: &str,
    fetch_dir: &Path,
) -> Result<(), Refusal> {
    for r in values
        .iter_mut()
        .filter(|r| r.kind == Some(ParamType::Path))
    {
        if let Some(scheme) = mlproject::uri_scheme(&r.value) {
            if scheme != "http" && scheme != "https" {
                return Err((
                    FailureKind::Params,
                    format!(
                        "parameter `{}`: `{}` is a {scheme} URI; the agent fetches http(s) URLs only: give an https:// URL, or declare the parameter as `uri` and fetch it in the script",
                        r.name, r.value
                    ),
                ));
            }
            let path = fetch(&r.value, &fetch_dir.join(&r.name))
                .await
                .map_err(|m| {
                    (
                        FailureKind::Params,
                        format!("parameter `{}`: cannot fetch {}: {m}", r.name, r.value),
                    )
                })?;
            r.value = path.display().to_string();
            continue;
        }
        let p = Path::new(&r.value);
        let full = if p.is_absolute() {
            p.to_path_buf()
        } else {
            if p.components().any(|c| matches!(c, Component::ParentDir)) {
                return Err((
                    FailureKind::Params,
                    format!(
                        "parameter `{}`: `{}` leaves the repository (`..`)",
                        r.name, r.value
                    ),
                ));
            }
            src.join(p)
        };
        if std::fs::symlink_metadata(&full).is_err() {
            return Err((
                FailureKind::Params,
                format!(
                    "parameter `{}`: no file `{}` in the repository or on agent {agent}. The job runs on the agent, not on the machine it was submitted from: give a path inside the repository, or one the agent has",
                    r.name, r.value
                ),
            ));
        }
        r.value = full.display().to_string();
    }
    Ok(())
}

/// Downloads `url` into `dir` under the last segment of its path; returns the file.
async fn fetch(url: &str, dir: &Path) -> Result<PathBuf, String> {
    use tokio::io::AsyncWriteExt;
    let parsed = reqwest::Url::parse(url).map_err(|e| e.to_string())?;
    let name = parsed
        .path_segments()
        .and_then(|mut s| s.next_back())
        .filter(|n| !n.is_empty() && *n != "." && *n != "..")
        .unwrap_or("download")
        .to_string();
    let client = reqwest::Client::builder()
        .timeout(FETCH_TIMEOUT)
        .build()
        .map_err(|e| e.to_string())?;
    let mut resp = client
        .get(parsed)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(|e| e.to_string())?;
    if resp.content_length().is_some_and(|n| n > MAX_FETCH) {
        return Err(format!(
            "larger than {}",
            runyard_model::size::format(MAX_FETCH)
        ));
    }
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let path = dir.join(name);
    let mut file = tokio::fs::File::create(&path)
        .await
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    let mut got = 0u64;
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        got += chunk.len() as u64;
        if got > MAX_FETCH {
            return Err(format!(
                "larger than {}",
                runyard_model::size::format(MAX_FETCH)
            ));
        }
        file.write_all(&chunk)
            .await
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    file.flush().await.map_err(|e| e.to_string())?;
    Ok(path)
}

/// The project's environment: the declared file, else `python_env.yaml`, else `conda.yaml` (as
/// MLflow looks for them), else none (`local`).
fn environment(
    src: &Path,
    commit: &str,
    declared: ProjectEnv,
) -> Result<(&'static str, Option<EnvRequest>), Refusal> {
    let declared = match declared {
        ProjectEnv::Unspecified if src.join("python_env.yaml").is_file() => {
            ProjectEnv::Python("python_env.yaml".into())
        }
        ProjectEnv::Unspecified if src.join("conda.yaml").is_file() => {
            ProjectEnv::Conda("conda.yaml".into())
        }
        other => other,
    };
    let read = |file: &str| {
        let path = resolve_script_at(src, file, commit)
            .map_err(|m| (FailureKind::Env, format!("environment file: {m}")))?;
        std::fs::read_to_string(&path)
            .map_err(|e| (FailureKind::Env, format!("cannot read {file}: {e}")))
    };
    let (name, request) = match declared {
        ProjectEnv::Unspecified => return Ok(("local", None)),
        ProjectEnv::Docker(image) => {
            return Err((
                FailureKind::Env,
                format!(
                    "docker_env ({image}): Runyard does not run containers; give the project a python_env.yaml or a conda.yaml"
                ),
            ));
        }
        ProjectEnv::Python(file) => (
            "python_env",
            project_env::parse_python_env(&read(&file)?)
                .map_err(|m| (FailureKind::Env, format!("{file}: {m}")))?,
        ),
        ProjectEnv::Conda(file) => (
            "conda",
            project_env::parse_conda(&read(&file)?)
                .map_err(|m| (FailureKind::Env, format!("{file}: {m}")))?,
        ),
    };
    let mut request = request;
    request.requirements = request
        .requirements
        .iter()
        .map(|line| anchor(src, line))
        .collect::<Result<_, _>>()?;
    Ok((name, Some(request)))
}

/// A requirement line whose file paths are relative to the project (`-r requirements.txt`,
/// `-e .`, `./pkg`), made absolute so it reads the same from the attempt's directory. Paths must
/// stay inside the checkout.
fn anchor(src: &Path, line: &str) -> Result<String, Refusal> {
    let line = line.trim();
    let inside = |p: &str| -> Result<String, Refusal> {
        let rel = Path::new(p);
        if rel.is_absolute() || rel.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err((
                FailureKind::Env,
                format!("requirement `{line}`: `{p}` is not a path inside the repository"),
            ));
        }
        Ok(src.join(rel).display().to_string())
    };
    for flag in [
        "-r",
        "-c",
        "-e",
        "--requirement",
        "--constraint",
        "--editable",
    ] {
        if let Some(rest) = line.strip_prefix(flag)
            && (rest.starts_with([' ', '=']))
        {
            let target = rest.trim_start_matches('=').trim();
            if mlproject::uri_scheme(target).is_some() {
                return Ok(line.to_string());
            }
            return Ok(format!("{flag} {}", inside(target)?));
        }
    }
    if line == "." || line.starts_with("./") || line.starts_with("../") {
        return inside(line);
    }
    Ok(line.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requirement_paths_are_anchored_in_the_checkout() {
        let src = Path::new("/j/src");
        assert_eq!(
            anchor(src, "-r requirements.txt").unwrap(),
            "-r /j/src/requirements.txt"
        );
        assert_eq!(
            anchor(src, "--requirement=r.txt").unwrap(),
            "--requirement /j/src/r.txt"
        );
        assert_eq!(anchor(src, "-e .").unwrap(), "-e /j/src/.");
        assert_eq!(anchor(src, "./pkg").unwrap(), "/j/src/./pkg");
        assert_eq!(anchor(src, "numpy>=1").unwrap(), "numpy>=1");
        assert_eq!(
            anchor(src, "-e git+https://h/x.git#egg=x").unwrap(),
            "-e git+https://h/x.git#egg=x"
        );
        assert!(anchor(src, "-r /etc/passwd").is_err());
        assert!(anchor(src, "-r ../../x.txt").is_err());
        assert!(anchor(src, "-rfoo").unwrap() == "-rfoo");
    }
}
