//! MLflow projects: the `MLproject` file, its entry points and typed parameters, and how an entry
//! point becomes the argv of a process (no shell). Pure: the agent reads the files, checks paths
//! and fetches URIs; this module decides what they mean.
//!
//! The format is MLflow's (`mlflow/projects/_project_spec.py`): `name`, one of `python_env`,
//! `conda_env` or `docker_env`, and `entry_points.NAME` with `parameters` (a type name, or
//! `{type, default}`) and a `command` template whose `{name}`s are filled with shell-quoted
//! values. Runyard is stricter where MLflow is silent: parameter types are checked, an unknown
//! type is an error, and a command that needs a shell (`&&`, `|`, `$VAR`, ...) is refused with a
//! reason instead of being run by one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The file names MLflow accepts for a project file (it compares them case-insensitively).
pub fn is_project_file(name: &str) -> bool {
    name.eq_ignore_ascii_case("MLproject")
}

/// A parsed `MLproject`.
#[derive(Clone, Debug, PartialEq)]
pub struct Project {
    pub name: Option<String>,
    pub env: ProjectEnv,
    pub entry_points: BTreeMap<String, EntryPoint>,
}

/// The environment a project declares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProjectEnv {
    /// Nothing declared: the agent looks for `python_env.yaml`, then `conda.yaml`, as MLflow does.
    Unspecified,
    /// A `python_env.yaml`-style file, by its path in the repository.
    Python(String),
    /// A conda environment file, by its path in the repository.
    Conda(String),
    /// A container image: not something Runyard runs.
    Docker(String),
}

#[derive(Clone, Debug, PartialEq)]
pub struct EntryPoint {
    pub parameters: Vec<(String, Parameter)>,
    pub command: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Parameter {
    pub kind: ParamType,
    pub default: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamType {
    String,
    Float,
    Int,
    Path,
    Uri,
}

impl ParamType {
    fn parse(s: &str) -> Option<ParamType> {
        Some(match s {
            "string" | "str" => ParamType::String,
            "float" => ParamType::Float,
            "int" => ParamType::Int,
            "path" => ParamType::Path,
            "uri" => ParamType::Uri,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ParamType::String => "string",
            ParamType::Float => "float",
            ParamType::Int => "int",
            ParamType::Path => "path",
            ParamType::Uri => "uri",
        }
    }
}

/// What a job ran as an MLflow project (the agent's `project` report line).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProjectRun {
    pub entry_point: String,
    /// Every parameter the command got, defaults included (path values as given, not as
    /// fetched).
    pub parameters: BTreeMap<String, String>,
    /// The environment the project got: `python_env`, `conda`, or `local` (the agent's
    /// interpreter plus the spec's requirements).
    pub env: String,
    /// The command as run.
    pub argv: Vec<String>,
}

/// Text as YAML scalars print in Python (`str(value)`), for defaults written as numbers.
fn scalar(v: &serde_yaml::Value) -> Option<String> {
    match v {
        serde_yaml::Value::String(s) => Some(s.clone()),
        serde_yaml::Value::Number(n) => Some(n.to_string()),
        serde_yaml::Value::Bool(b) => Some(if *b { "True" } else { "False" }.to_string()),
        _ => None,
    }
}

/// Parses an `MLproject` file. Errors name the key at fault.
pub fn parse(text: &str) -> Result<Project, String> {
    let doc: serde_yaml::Value =
        serde_yaml::from_str(text).map_err(|e| format!("MLproject is not valid YAML: {e}"))?;
    let map = match doc {
        serde_yaml::Value::Mapping(m) => m,
        serde_yaml::Value::Null => serde_yaml::Mapping::new(),
        _ => return Err("MLproject: the top level is not a mapping".into()),
    };
    let get = |k: &str| map.get(serde_yaml::Value::String(k.into()));
    let name = get("name").and_then(scalar);
    let mut envs = Vec::new();
    if let Some(v) = get("python_env") {
        let file = v
            .as_str()
            .ok_or("MLproject: `python_env` is not a file name")?;
        envs.push(ProjectEnv::Python(file.to_string()));
    }
    if let Some(v) = get("conda_env") {
        let file = v
            .as_str()
            .ok_or("MLproject: `conda_env` is not a file name")?;
        envs.push(ProjectEnv::Conda(file.to_string()));
    }
    if let Some(v) = get("docker_env") {
        let image = v
            .get("image")
            .and_then(|i| i.as_str())
            .unwrap_or("")
            .to_string();
        envs.push(ProjectEnv::Docker(image));
    }
    if envs.len() > 1 {
        return Err(
            "MLproject: give one of python_env, conda_env and docker_env, not several".into(),
        );
    }
    let env = envs.pop().unwrap_or(ProjectEnv::Unspecified);
    let mut entry_points = BTreeMap::new();
    if let Some(eps) = get("entry_points") {
        let eps = eps
            .as_mapping()
            .ok_or("MLproject: `entry_points` is not a mapping")?;
        for (k, v) in eps {
            let ep_name = scalar(k).ok_or("MLproject: an entry point's name is not text")?;
            let ep = parse_entry_point(&ep_name, v)?;
            entry_points.insert(ep_name, ep);
        }
    }
    Ok(Project {
        name,
        env,
        entry_points,
    })
}

fn parse_entry_point(name: &str, v: &serde_yaml::Value) -> Result<EntryPoint, String> {
    let at = format!("MLproject: entry_points.{name}");
    let command = v
        .get("command")
        .and_then(scalar)
        .ok_or_else(|| format!("{at}: no `command`"))?;
    let mut parameters = Vec::new();
    if let Some(ps) = v.get("parameters") {
        let ps = match ps {
            serde_yaml::Value::Null => serde_yaml::Mapping::new(),
            serde_yaml::Value::Mapping(m) => m.clone(),
            _ => return Err(format!("{at}.parameters is not a mapping")),
        };
        for (k, p) in &ps {
            let pname = scalar(k).ok_or_else(|| format!("{at}: a parameter name is not text"))?;
            let (kind, default) = match p {
                serde_yaml::Value::String(t) => (t.clone(), None),
                serde_yaml::Value::Null => ("string".to_string(), None),
                serde_yaml::Value::Mapping(m) => {
                    let kind = match m.get(serde_yaml::Value::String("type".into())) {
                        None => "string".to_string(),
                        Some(t) => t.as_str().map(str::to_string).ok_or_else(|| {
                            format!("{at}.parameters.{pname}.type is not a type name")
                        })?,
                    };
                    let default = match m.get(serde_yaml::Value::String("default".into())) {
                        None | Some(serde_yaml::Value::Null) => None,
                        Some(d) => Some(scalar(d).ok_or_else(|| {
                            format!("{at}.parameters.{pname}.default is not a single value")
                        })?),
                    };
                    (kind, default)
                }
                _ => {
                    return Err(format!(
                        "{at}.parameters.{pname}: expected a type name or {{type, default}}"
                    ));
                }
            };
            let kind = ParamType::parse(&kind).ok_or_else(|| {
                format!(
                    "{at}.parameters.{pname}: unknown type `{kind}` (string, float, int, path or uri)"
                )
            })?;
            parameters.push((pname, Parameter { kind, default }));
        }
    }
    Ok(EntryPoint {
        parameters,
        command,
    })
}

/// A parameter that cannot be used, by name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("parameter `{name}`: {message}")]
pub struct ParamError {
    pub name: String,
    pub message: String,
}

/// One parameter's value for the command, with its declared type (`None`: not declared, appended
/// as `--name value`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub name: String,
    pub kind: Option<ParamType>,
    pub value: String,
}

/// The values an entry point runs with: the user's, else the defaults; every declared value
/// checked against its type; required ones (no default) present. Declared first (in the file's
/// order), then the undeclared ones in name order.
pub fn resolve(
    ep: &EntryPoint,
    given: &BTreeMap<String, String>,
) -> Result<Vec<Resolved>, ParamError> {
    let mut out = Vec::new();
    let mut missing = Vec::new();
    for (name, p) in &ep.parameters {
        let value = match given.get(name).or(p.default.as_ref()) {
            Some(v) => v.clone(),
            None => {
                missing.push(name.clone());
                continue;
            }
        };
        check_type(p.kind, &value).map_err(|message| ParamError {
            name: name.clone(),
            message,
        })?;
        out.push(Resolved {
            name: name.clone(),
            kind: Some(p.kind),
            value,
        });
    }
    if !missing.is_empty() {
        return Err(ParamError {
            name: missing.join("`, `"),
            message: "required (the MLproject gives no default): pass it with -P name=value".into(),
        });
    }
    for (name, value) in given {
        if !ep.parameters.iter().any(|(n, _)| n == name) {
            out.push(Resolved {
                name: name.clone(),
                kind: None,
                value: value.clone(),
            });
        }
    }
    Ok(out)
}

/// Whether `value` is a `kind`. Paths are checked by the agent, which knows its files.
pub fn check_type(kind: ParamType, value: &str) -> Result<(), String> {
    match kind {
        ParamType::String | ParamType::Path => Ok(()),
        ParamType::Int => value
            .trim()
            .parse::<i64>()
            .map(|_| ())
            .map_err(|_| format!("`{value}` is not an int")),
        ParamType::Float => value
            .trim()
            .parse::<f64>()
            .map(|_| ())
            .map_err(|_| format!("`{value}` is not a float")),
        ParamType::Uri => {
            if uri_scheme(value).is_some() {
                Ok(())
            } else {
                Err(format!("`{value}` is not a URI (scheme://...)"))
            }
        }
    }
}

/// The scheme of a URI (`s3` of `s3://b/k`), if `value` is one. One-letter schemes are Windows
/// drive letters, not schemes (as in MLflow).
pub fn uri_scheme(value: &str) -> Option<&str> {
    let (scheme, _) = value.split_once(':')?;
    let mut chars = scheme.chars();
    let ok = scheme.len() > 1
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    ok.then_some(scheme)
}

/// Python's `shlex.quote`.
pub fn shell_quote(s: &str) -> String {
    if s.is_empty() {
        return "''".into();
    }
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "@%+=:,./-_".contains(c))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', "'\"'\"'"))
}

/// Fills a command template (`{name}`, with `{{` and `}}` for braces, as Python's `str.format`)
/// with shell-quoted values, appends the undeclared parameters as `--name value`, and splits the
/// result into an argv as a POSIX shell would, without running one.
pub fn command_argv(template: &str, values: &[Resolved]) -> Result<Vec<String>, String> {
    let mut line = String::new();
    let mut chars = template.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                line.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                line.push('}');
            }
            '{' => {
                let mut name = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(c) => name.push(c),
                        None => return Err(format!("command: `{{{name}` is not closed")),
                    }
                }
                let v = values
                    .iter()
                    .find(|r| r.kind.is_some() && r.name == name)
                    .ok_or_else(|| {
                        format!("command: `{{{name}}}` is not a parameter of the entry point")
                    })?;
                line.push_str(&shell_quote(&v.value));
            }
            '}' => return Err("command: a lone `}` (write `}}` for a brace)".into()),
            c => line.push(c),
        }
    }
    for r in values.iter().filter(|r| r.kind.is_none()) {
        line.push_str(&format!(" --{} {}", r.name, shell_quote(&r.value)));
    }
    split(&line)
}

/// Splits a command line into words with POSIX shell quoting (`'...'`, `"..."`, `\`), refusing
/// what only a shell would do: operators, redirections, substitutions and variables.
pub fn split(line: &str) -> Result<Vec<String>, String> {
    let needs_shell = |what: &str| {
        Err(format!(
            "command: `{what}` needs a shell, and Runyard runs commands without one: put it in a .sh entry point, or run `bash -c '...'`"
        ))
    };
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' | '\n' => {
                if let Some(w) = word.take() {
                    words.push(w);
                }
            }
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => w.push(c),
                        None => return Err("command: an unclosed `'`".into()),
                    }
                }
            }
            '"' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => w.push(c),
                            Some('\n') => {}
                            Some(c) => {
                                w.push('\\');
                                w.push(c);
                            }
                            None => return Err("command: an unclosed `\"`".into()),
                        },
                        Some('$') => return needs_shell("$"),
                        Some('`') => return needs_shell("`"),
                        Some(c) => w.push(c),
                        None => return Err("command: an unclosed `\"`".into()),
                    }
                }
            }
            '\\' => match chars.next() {
                Some('\n') => {}
                Some(c) => word.get_or_insert_with(String::new).push(c),
                None => return Err("command: ends with `\\`".into()),
            },
            '#' if word.is_none() => break,
            '&' | '|' | ';' | '<' | '>' | '(' | ')' | '`' | '$' | '*' | '?' => {
                let mut op = c.to_string();
                if let Some(&n) = chars.peek()
                    && matches!((c, n), ('&', '&') | ('|', '|') | ('>', '>') | ('$', '('))
                {
                    op.push(n);
                }
                return needs_shell(&op);
            }
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    if let Some(w) = word {
        words.push(w);
    }
    if words.is_empty() {
        return Err("command: empty".into());
    }
    Ok(words)
}

/// The argv of an entry point that is a file (`train.py`, `run.sh`): every parameter as
/// `--name value`, as MLflow runs them.
pub fn file_argv(entry: &str, values: &[Resolved]) -> Vec<String> {
    let runner = if entry.ends_with(".sh") {
        "bash"
    } else {
        "python"
    };
    let mut argv = vec![runner.to_string(), entry.to_string()];
    for r in values {
        argv.push(format!("--{}", r.name));
        argv.push(r.value.clone());
    }
    argv
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROJECT: &str = r#"
name: demo
python_env: python_env.yaml
entry_points:
  main:
    parameters:
      alpha: {type: float, default: 0.5}
      l1_ratio: {type: float, default: 0.1}
      epochs: {type: int, default: 3}
      data: path
      name: {type: string, default: "a b"}
    command: "python train.py --alpha {alpha} --l1 {l1_ratio} --epochs {epochs} --data {data} --name {name}"
  other:
    command: python other.py
"#;

    fn given(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_entry_points_types_and_defaults() {
        let p = parse(PROJECT).unwrap();
        assert_eq!(p.name.as_deref(), Some("demo"));
        assert_eq!(p.env, ProjectEnv::Python("python_env.yaml".into()));
        let main = &p.entry_points["main"];
        assert_eq!(main.parameters.len(), 5);
        assert_eq!(main.parameters[0].0, "alpha");
        assert_eq!(main.parameters[0].1.kind, ParamType::Float);
        assert_eq!(main.parameters[0].1.default.as_deref(), Some("0.5"));
        assert_eq!(main.parameters[2].1.default.as_deref(), Some("3"));
        assert_eq!(
            main.parameters[3].1,
            Parameter {
                kind: ParamType::Path,
                default: None
            }
        );
        assert!(p.entry_points["other"].parameters.is_empty());
    }

    #[test]
    fn fills_the_template_with_quoted_values_and_appends_the_undeclared() {
        let p = parse(PROJECT).unwrap();
        let ep = &p.entry_points["main"];
        let values = resolve(
            ep,
            &given(&[
                ("alpha", "0.9"),
                ("data", "d.csv"),
                ("name", "it's $HOME; rm -rf /"),
                ("zeta", "z z"),
            ]),
        )
        .unwrap();
        let argv = command_argv(&ep.command, &values).unwrap();
        assert_eq!(
            argv,
            [
                "python",
                "train.py",
                "--alpha",
                "0.9",
                "--l1",
                "0.1",
                "--epochs",
                "3",
                "--data",
                "d.csv",
                "--name",
                "it's $HOME; rm -rf /",
                "--zeta",
                "z z"
            ]
        );
    }

    #[test]
    fn wrong_types_and_missing_parameters_are_named() {
        let p = parse(PROJECT).unwrap();
        let ep = &p.entry_points["main"];
        let e = resolve(ep, &given(&[("alpha", "lots"), ("data", "x")])).unwrap_err();
        assert_eq!(e.name, "alpha");
        assert!(e.message.contains("not a float"), "{e}");
        let e = resolve(ep, &given(&[("epochs", "2.5"), ("data", "x")])).unwrap_err();
        assert_eq!(e.name, "epochs");
        let e = resolve(ep, &given(&[])).unwrap_err();
        assert_eq!(e.name, "data");
        assert!(e.to_string().contains("required"), "{e}");
    }

    #[test]
    fn uris_and_unknown_types() {
        assert!(check_type(ParamType::Uri, "s3://b/k").is_ok());
        assert!(check_type(ParamType::Uri, "C:/x").is_err());
        assert!(check_type(ParamType::Uri, "plain").is_err());
        let e = parse(
            "entry_points:\n  main:\n    parameters: {x: boolean}\n    command: python a.py\n",
        )
        .unwrap_err();
        assert!(e.contains("unknown type `boolean`"), "{e}");
    }

    #[test]
    fn commands_that_need_a_shell_are_refused_with_the_reason() {
        for (cmd, op) in [
            ("python a.py && python b.py", "&&"),
            ("python a.py | tee x", "|"),
            ("python a.py > out", ">"),
            ("python a.py $HOME", "$"),
            ("python a.py \"$(id)\"", "$"),
            ("python a.py; rm x", ";"),
        ] {
            let e = split(cmd).unwrap_err();
            assert!(e.contains(&format!("`{op}`")), "{cmd}: {e}");
        }
        assert_eq!(
            split(r#"python "a b.py" 'c d' e\ f "x\"y""#).unwrap(),
            ["python", "a b.py", "c d", "e f", "x\"y"]
        );
        assert!(split("python 'open").is_err());
        assert!(
            command_argv("python {nope}", &[])
                .unwrap_err()
                .contains("{nope}")
        );
        assert_eq!(command_argv("echo {{x}}", &[]).unwrap(), ["echo", "{x}"]);
    }

    #[test]
    fn quoting_matches_python() {
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a-b_c.d/e:1,2@%+="), "a-b_c.d/e:1,2@%+=");
        assert_eq!(shell_quote("it's"), r#"'it'"'"'s'"#);
    }

    #[test]
    fn file_entry_points_take_every_parameter_as_a_flag() {
        let v = vec![Resolved {
            name: "lr".into(),
            kind: None,
            value: "0.1".into(),
        }];
        assert_eq!(
            file_argv("train.py", &v),
            ["python", "train.py", "--lr", "0.1"]
        );
        assert_eq!(file_argv("run.sh", &[]), ["bash", "run.sh"]);
    }

    #[test]
    fn environments_and_their_conflicts() {
        assert_eq!(
            parse("conda_env: env.yaml").unwrap().env,
            ProjectEnv::Conda("env.yaml".into())
        );
        assert_eq!(
            parse("docker_env: {image: x:1}").unwrap().env,
            ProjectEnv::Docker("x:1".into())
        );
        assert!(parse("conda_env: a.yaml\npython_env: b.yaml").is_err());
        assert_eq!(parse("").unwrap().env, ProjectEnv::Unspecified);
        assert!(parse("[1, 2]").is_err());
        assert!(
            parse("entry_points:\n  main: {}\n")
                .unwrap_err()
                .contains("no `command`")
        );
    }
}
