//! `runyard submit`: flags and an optional `-f` file become one job spec, checked with the same
//! rules as the API (`JobSpec::from_value`) before any request is sent.
//!
//! Merge rule: start from the file's mapping; each flag given replaces that field (lists such as
//! `--req` and the args after `--` replace the file's list), except `--env`, whose entries are
//! added to the file's `env`, replacing equal keys.

use std::path::Path;

use serde_json::{Map, Value};

use runyard_api::JobView;
use runyard_model::{JobSpec, JobStatus, ValidationError};

use super::{CommandError, client_for, jobs};
use crate::args::SubmitArgs;
use crate::output;

/// Submits the job; with `--follow`, streams its logs and returns the exit code the job earned.
pub async fn submit(args: SubmitArgs) -> Result<u8, CommandError> {
    let mut fields = spec_fields(&args)?;
    // A local directory travels as a snapshot; any other spec is checked before a request.
    let local = fields
        .get("repo")
        .and_then(Value::as_str)
        .filter(|r| crate::snapshot::is_local_dir(r))
        .map(std::path::PathBuf::from);
    let check = |fields: Map<String, Value>| {
        JobSpec::from_value(Value::Object(fields))
            .map_err(|e| CommandError::Spec(with_flag_hint(e)))
    };
    if local.is_none() {
        check(fields.clone())?;
    }
    let client = client_for(&args.client)?;
    if let Some(dir) = local {
        if fields
            .get("revision")
            .and_then(Value::as_str)
            .is_some_and(|r| !r.is_empty())
        {
            return Err(CommandError::Spec(ValidationError::new(
                "revision",
                "a local directory runs as it is now: leave --revision out (or give its git URL)",
            )));
        }
        let archive = tokio::task::spawn_blocking(move || crate::snapshot::archive(&dir))
            .await
            .map_err(|e| CommandError::Snapshot(e.to_string()))?
            .map_err(CommandError::Snapshot)?;
        let (files, commit) = (archive.files, archive.commit.clone());
        let stored = client.upload_snapshot(archive.bytes).await?.value;
        eprintln!(
            "snapshot {} ({} files, {}{})",
            stored.snapshot,
            files,
            runyard_model::size::format(stored.size),
            commit
                .map(|c| format!(", at commit {}", &c[..c.len().min(12)]))
                .unwrap_or_default()
        );
        fields.insert("repo".into(), Value::String(stored.snapshot));
    }
    let spec = checked(fields)?;
    let reply = client.submit(&spec).await?;
    let job = reply.value;
    if args.client.json {
        output::write_json(&reply.raw).map_err(CommandError::Stdout)?;
    } else {
        output::write_stdout(format!("{}\n", job.id).as_bytes()).map_err(CommandError::Stdout)?;
    }
    if !args.follow {
        return Ok(0);
    }
    let done = jobs::follow_logs(&client, &job.id).await?;
    eprintln!("{}", output::final_status(&done));
    Ok(exit_code_of(&done))
}

/// The spec from the `-f` file (if any) and the flags, validated.
#[cfg(test)]
pub fn build_spec(args: &SubmitArgs) -> Result<JobSpec, CommandError> {
    checked(spec_fields(args)?)
}

/// Spec fields checked as the API checks them, a missing one naming its flag.
fn checked(fields: Map<String, Value>) -> Result<JobSpec, CommandError> {
    JobSpec::from_value(Value::Object(fields)).map_err(|e| CommandError::Spec(with_flag_hint(e)))
}

/// The `-f` file's fields with the flags laid over them, not validated yet.
pub fn spec_fields(args: &SubmitArgs) -> Result<Map<String, Value>, CommandError> {
    let base = match &args.file {
        Some(path) => load_file(path)?,
        None => Map::new(),
    };
    merge_flags(base, args)
}

/// Reads a YAML (or, for `.json`, JSON) file holding a mapping of spec fields.
fn load_file(path: &Path) -> Result<Map<String, Value>, CommandError> {
    let text = std::fs::read_to_string(path).map_err(|e| CommandError::ReadSpecFile {
        path: path.to_path_buf(),
        cause: e.to_string(),
    })?;
    parse_file(path, &text)
}

fn parse_file(path: &Path, text: &str) -> Result<Map<String, Value>, CommandError> {
    let parse_error = |cause: String| CommandError::ParseSpecFile {
        path: path.to_path_buf(),
        cause: crate::client::one_line(&cause),
    };
    let value: Value = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(text).map_err(|e| parse_error(e.to_string()))?
    } else {
        serde_yaml::from_str(text).map_err(|e| parse_error(e.to_string()))?
    };
    match value {
        Value::Object(map) => Ok(map),
        Value::Null => Ok(Map::new()),
        _ => Err(parse_error(
            "expected a mapping of job spec fields (repo, script, ...)".into(),
        )),
    }
}

/// Lays the flags given over `base`.
fn merge_flags(
    mut base: Map<String, Value>,
    args: &SubmitArgs,
) -> Result<Map<String, Value>, CommandError> {
    let mut set = |key: &str, v: Option<Value>| {
        if let Some(v) = v {
            base.insert(key.to_string(), v);
        }
    };
    let string = |s: &Option<String>| s.clone().map(Value::String);
    let list = |v: &[String]| {
        (!v.is_empty()).then(|| Value::Array(v.iter().cloned().map(Value::String).collect()))
    };
    set("name", string(&args.name));
    set("repo", string(&args.repo));
    set("revision", string(&args.revision));
    set("script", string(&args.script));
    set("entry_point", string(&args.entry_point));
    set("args", list(&args.args));
    set("requirements", list(&args.requirements));
    set("requirements_file", string(&args.requirements_file));
    set("compute", string(&args.compute));
    set("retries", args.retries.map(Value::from));
    set("timeout", string(&args.timeout));
    set("stop_grace", string(&args.stop_grace));
    set("memory", string(&args.memory));
    if !args.env.is_empty() {
        let mut env = match base.remove("env") {
            Some(Value::Object(m)) => m,
            // Not a mapping (or null): let the flags replace it; the spec check names `env` if
            // anything is still wrong.
            _ => Map::new(),
        };
        for pair in &args.env {
            let (k, v) = parse_env_pair(pair)?;
            env.insert(k.to_string(), Value::String(v.to_string()));
        }
        base.insert("env".into(), Value::Object(env));
    }
    if !args.params.is_empty() {
        let mut params = match base.remove("parameters") {
            Some(Value::Object(m)) => m,
            _ => Map::new(),
        };
        for pair in &args.params {
            let (k, v) = match pair.split_once('=') {
                Some((k, v)) if !k.is_empty() => (k, v),
                _ => return Err(CommandError::ParamPair(pair.to_string())),
            };
            params.insert(k.to_string(), Value::String(v.to_string()));
        }
        base.insert("parameters".into(), Value::Object(params));
    }
    let tracking = [
        ("tracking_uri", &args.mlflow_tracking_uri),
        ("experiment_name", &args.experiment_name),
        ("experiment_id", &args.experiment_id),
        ("run_id", &args.mlflow_run_id),
    ];
    if tracking.iter().any(|(_, v)| v.is_some()) {
        let mut mlflow = match base.remove("mlflow") {
            Some(Value::Object(m)) => m,
            _ => Map::new(),
        };
        for (k, v) in tracking {
            if let Some(v) = v {
                mlflow.insert(k.to_string(), Value::String(v.clone()));
            }
        }
        base.insert("mlflow".into(), Value::Object(mlflow));
    }
    if !args.secrets.is_empty() {
        let mut secrets = match base.remove("secrets") {
            Some(Value::Object(m)) => m,
            _ => Map::new(),
        };
        for pair in &args.secrets {
            let (k, name) = parse_env_pair(pair)?;
            secrets.insert(k.to_string(), serde_json::json!({ "secret": name }));
        }
        base.insert("secrets".into(), Value::Object(secrets));
    }
    Ok(base)
}

/// `KEY=VALUE`; the value may contain `=` and may be empty, the key may not.
fn parse_env_pair(pair: &str) -> Result<(&str, &str), CommandError> {
    match pair.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k, v)),
        _ => Err(CommandError::EnvPair(pair.to_string())),
    }
}

/// A missing required field names the flag that provides it.
pub fn with_flag_hint(e: ValidationError) -> ValidationError {
    if e.message.starts_with("missing field") {
        let flag = e.field.replace('_', "-");
        return ValidationError::new(
            e.field.clone(),
            format!("required: give --{flag} (or `{}` in the -f file)", e.field),
        );
    }
    e
}

/// 0 if the job succeeded, the script's exit code if it failed with one, 1 otherwise.
fn exit_code_of(job: &JobView) -> u8 {
    match (job.status, job.exit_code) {
        (JobStatus::Succeeded, _) => 0,
        (JobStatus::Failed, Some(code)) if (1..=255).contains(&code) => code as u8,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use clap::Parser;
    use runyard_model::{Compute, Timestamp};

    use super::*;
    use crate::args::{Cli, Command};

    fn parse(argv: &[&str]) -> SubmitArgs {
        let mut full = vec!["runyard", "submit"];
        full.extend_from_slice(argv);
        match Cli::try_parse_from(full).unwrap().command {
            Command::Submit(a) => a,
            other => panic!("parsed as {other:?}"),
        }
    }

    fn spec_of(argv: &[&str]) -> Result<JobSpec, CommandError> {
        build_spec(&parse(argv))
    }

    #[test]
    fn flags_become_the_spec() {
        let spec = spec_of(&[
            "--repo",
            "https://example.com/a/b.git",
            "--script",
            "src/train.py",
            "--revision",
            "v1.2",
            "--req",
            "numpy>=2",
            "--req",
            "torch",
            "--requirements-file",
            "requirements.txt",
            "--env",
            "A=1",
            "--env",
            "B=x=y",
            "--env",
            "EMPTY=",
            "--compute",
            "gpu:2",
            "--name",
            "my run",
            "--retries",
            "3",
            "--timeout",
            "2h",
            "--stop-grace",
            "30s",
        ])
        .unwrap();
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "name": "my run",
                "repo": "https://example.com/a/b.git",
                "revision": "v1.2",
                "script": "src/train.py",
                "args": [],
                "requirements": ["numpy>=2", "torch"],
                "requirements_file": "requirements.txt",
                "env": {"A": "1", "B": "x=y", "EMPTY": ""},
                "compute": "gpu:2",
                "timeout": "2h",
                "retries": 3,
                "stop_grace": "30s",
            })
        );
    }

    #[test]
    fn args_after_double_dash_are_verbatim() {
        let spec = spec_of(&[
            "--repo",
            "https://example.com/a/b.git",
            "--script",
            "t.py",
            "--",
            "--lr",
            "0.1",
            "two words",
            "it's \"quoted\"",
            "$HOME;rm -rf /",
            "--repo",
            "",
        ])
        .unwrap();
        assert_eq!(
            spec.args,
            vec![
                "--lr",
                "0.1",
                "two words",
                "it's \"quoted\"",
                "$HOME;rm -rf /",
                "--repo",
                ""
            ]
        );
        assert_eq!(spec.repo, "https://example.com/a/b.git");
        assert_eq!(spec.name, "t");
    }

    #[test]
    fn yaml_file_is_merged_with_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("job.yaml");
        std::fs::write(
            &file,
            "repo: https://example.com/a/b.git\nscript: train.py\ncompute: gpu\n\
             args: [--epochs, '3']\nrequirements: [numpy]\nenv: {A: from-file, B: kept}\n\
             timeout: 90\n",
        )
        .unwrap();
        let f = file.to_str().unwrap();
        let spec = spec_of(&["-f", f, "--compute", "cpu-small", "--env", "A=flag"]).unwrap();
        assert_eq!(spec.repo, "https://example.com/a/b.git");
        assert_eq!(spec.compute, Compute::CpuSmall);
        assert_eq!(spec.args, vec!["--epochs", "3"]);
        assert_eq!(spec.requirements, vec!["numpy"]);
        assert_eq!(spec.env["A"], "flag");
        assert_eq!(spec.env["B"], "kept");
        assert_eq!(spec.timeout, Some(Duration::from_secs(90)));
        // Lists given as flags replace the file's.
        let spec = spec_of(&["-f", f, "--req", "torch", "--", "--epochs", "9"]).unwrap();
        assert_eq!(spec.requirements, vec!["torch"]);
        assert_eq!(spec.args, vec!["--epochs", "9"]);
    }

    #[test]
    fn json_file_is_read_as_json() {
        let m = parse_file(
            &PathBuf::from("job.json"),
            r#"{"repo": "file:///srv/r", "script": "a.py"}"#,
        )
        .unwrap();
        assert_eq!(m["repo"], "file:///srv/r");
    }

    #[test]
    fn bad_files_are_named() {
        let p = PathBuf::from("job.yaml");
        let e = parse_file(&p, "- a\n- b\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "job file job.yaml: expected a mapping of job spec fields (repo, script, ...)"
        );
        assert!(matches!(
            parse_file(&p, "repo: [unclosed\n"),
            Err(CommandError::ParseSpecFile { .. })
        ));
        let e = spec_of(&["-f", "/nonexistent/job.yaml"]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cannot read job file /nonexistent/job.yaml:")
        );
    }

    #[test]
    fn unknown_file_fields_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("job.yaml");
        std::fs::write(&file, "repo: file:///r\nscript: a.py\ncolour: red\n").unwrap();
        let e = spec_of(&["-f", file.to_str().unwrap()]).unwrap_err();
        assert!(
            matches!(&e, CommandError::Spec(v) if v.field == "colour"),
            "{e}"
        );
    }

    #[test]
    fn bad_env_is_refused_locally() {
        let base = ["--repo", "file:///r", "--script", "a.py"];
        let with = |extra: &[&str]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            spec_of(&v)
        };
        let e = with(&["--env", "NOEQUALS"]).unwrap_err();
        assert_eq!(e.to_string(), "--env `NOEQUALS`: expected KEY=VALUE");
        let e = with(&["--env", "=v"]).unwrap_err();
        assert_eq!(e.to_string(), "--env `=v`: expected KEY=VALUE");
        let e = with(&["--env", "1X=v"]).unwrap_err();
        assert!(
            matches!(&e, CommandError::Spec(v) if v.field == "env.1X"),
            "{e}"
        );
    }

    #[test]
    fn other_bad_values_name_the_field() {
        let e = spec_of(&["--script", "a.py"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "repo: required: give --repo (or `repo` in the -f file)"
        );
        let cases = [
            (vec!["--compute", "tpu"], "compute"),
            (vec!["--timeout", "soon"], "timeout"),
            (vec!["--stop-grace", "-1s"], "stop_grace"),
            (vec!["--req", "-e ."], "requirements[0]"),
        ];
        for (extra, field) in cases {
            let mut argv = vec!["--repo", "file:///r", "--script", "a.py"];
            argv.extend(extra);
            let e = spec_of(&argv).unwrap_err();
            assert!(
                matches!(&e, CommandError::Spec(v) if v.field == field),
                "{e}"
            );
        }
    }

    #[test]
    fn follow_exit_codes() {
        let spec = spec_of(&["--repo", "file:///r", "--script", "a.py"]).unwrap();
        let mut job = JobView::from(&runyard_model::Job::new("j".into(), spec, Timestamp(0)));
        let code = |job: &JobView| exit_code_of(job);
        job.status = JobStatus::Succeeded;
        assert_eq!(code(&job), 0);
        job.status = JobStatus::Failed;
        job.exit_code = Some(3);
        assert_eq!(code(&job), 3);
        job.exit_code = None;
        assert_eq!(code(&job), 1);
        job.exit_code = Some(-9);
        assert_eq!(code(&job), 1);
        job.status = JobStatus::Stopped;
        assert_eq!(code(&job), 1);
    }

    /// A YAML job file with huge numbers is refused with the field named, not a crash (exit
    /// code 101 before).
    #[test]
    fn yaml_with_out_of_range_numbers_names_the_field() {
        let dir = tempfile::tempdir().unwrap();
        for (text, field) in [
            (
                "repo: https://h/r.git\nscript: t.py\ntimeout: 1e30\n",
                "timeout",
            ),
            (
                "repo: https://h/r.git\nscript: t.py\nstop_grace: 1e300\n",
                "stop_grace",
            ),
            (
                "repo: https://h/r.git\nscript: t.py\nretries: 1e30\n",
                "retries",
            ),
            (
                "repo: https://h/r.git\nscript: t.py\ntimeout: -1e30\n",
                "timeout",
            ),
        ] {
            let file = dir.path().join("job.yaml");
            std::fs::write(&file, text).unwrap();
            match spec_of(&["-f", file.to_str().unwrap()]) {
                Err(CommandError::Spec(e)) => assert_eq!(e.field, field, "{text}: {e}"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    /// Random YAML documents (the spec's fields with random scalars, sequences and mappings,
    /// and random text): every one is answered with a spec or an error, never a panic. A fixed
    /// budget of cases per run.
    mod property {
        use proptest::prelude::*;

        use super::*;

        fn scalar() -> impl Strategy<Value = String> {
            prop_oneof![
                "[ -~]{0,30}",
                any::<i64>().prop_map(|n| n.to_string()),
                any::<f64>().prop_map(|f| f.to_string()),
                prop_oneof![
                    Just("1e30"),
                    Just(".inf"),
                    Just("-.nan"),
                    Just("~"),
                    Just("[]"),
                    Just("{}"),
                    Just("99999999999999999999999"),
                    Just("2h"),
                    Just("gpu:2"),
                    Just("&a x"),
                    Just("*a"),
                    Just("!!binary aGk="),
                    Just("'quoted'"),
                    Just("\"x\\u0000\""),
                ]
                .prop_map(str::to_string),
            ]
        }

        fn document() -> impl Strategy<Value = String> {
            let field = prop_oneof![
                Just("repo"),
                Just("script"),
                Just("name"),
                Just("revision"),
                Just("args"),
                Just("requirements"),
                Just("env"),
                Just("compute"),
                Just("timeout"),
                Just("retries"),
                Just("stop_grace"),
                Just("requirements_file"),
                Just("other"),
            ];
            let value = prop_oneof![
                scalar(),
                prop::collection::vec(scalar(), 0..4)
                    .prop_map(|v| format!("\n  - {}", v.join("\n  - "))),
                prop::collection::vec(("[A-Z_]{1,6}", scalar()), 0..3).prop_map(|kv| {
                    kv.iter()
                        .map(|(k, v)| format!("\n  {k}: {v}"))
                        .collect::<String>()
                }),
            ];
            prop::collection::vec((field, value), 0..8).prop_map(|fields| {
                let mut doc = String::from("repo: https://h/r.git\nscript: t.py\n");
                for (k, v) in fields {
                    doc.push_str(&format!("{k}: {v}\n"));
                }
                doc
            })
        }

        fn answer(text: &str) {
            let path = std::path::Path::new("job.yaml");
            if let Ok(map) = parse_file(path, text) {
                let _ = JobSpec::from_value(Value::Object(map));
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig {
                cases: 400,
                failure_persistence: None,
                ..ProptestConfig::default()
            })]

            #[test]
            fn yaml_documents_are_answered(doc in document()) {
                answer(&doc);
            }

            #[test]
            fn any_text_is_answered(text in "[ -~\n\t]{0,200}") {
                answer(&text);
            }
        }
    }
}
