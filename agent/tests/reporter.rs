//! The Lightning reporter run for real: plain Python scripts with the system `python3`, and small
//! Lightning trainings (CPU, random tensors) in a venv built with uv from PyPI.
//!
//! Lightning comes from one shared uv cache: `RUNYARD_TEST_UV_CACHE`, default
//! `$HOME/.cache/runyard-test-uv` (warm: a venv takes seconds). Without uv, or when the install
//! fails (no network, cold cache), the Lightning test fails when `CI` is set and is skipped with a
//! message otherwise. Every line a script reports must parse as a `runyard_model::Report`.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use runyard_model::report::{self, Report};
use runyard_model::{Placement, Timestamp};

/// Bound of a plain Python script.
const PLAIN_LIMIT: Duration = Duration::from_secs(30);
/// Bound of one small training run (most of it is importing torch).
const TRAINING_LIMIT: Duration = Duration::from_secs(240);
/// Bound of building the Lightning venv (a cold cache downloads about 3 GB).
const INSTALL_LIMIT: Duration = Duration::from_secs(1200);

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn python3() -> PathBuf {
    on_path("python3").expect("python3 on PATH")
}

/// Stops the test with `why`: a failure under `CI`, a visible skip otherwise.
fn unavailable(why: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{why} (CI is set, so this fails instead of skipping)");
    }
    eprintln!("SKIPPED: {why}");
}

struct Ran {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn output(&self) -> String {
        format!(
            "status {}\n--- stdout\n{}\n--- stderr\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// A started command whose output goes to files (a progress bar can write hundreds of KB).
struct Running {
    child: std::process::Child,
    out: PathBuf,
    err: PathBuf,
    what: String,
    limit: Duration,
}

fn start(mut cmd: Command, logs: &Path, name: &str, limit: Duration) -> Running {
    let out = logs.join(format!("{name}.stdout"));
    let err = logs.join(format!("{name}.stderr"));
    cmd.stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap());
    let what = format!("{cmd:?}");
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    Running {
        child,
        out,
        err,
        what,
        limit,
    }
}

impl Running {
    /// Waits for the exit within the limit; kills the process and panics past it.
    fn wait(mut self) -> Ran {
        let deadline = Instant::now() + self.limit;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "{} did not finish within {:?}\n--- stderr\n{}",
                    self.what,
                    self.limit,
                    std::fs::read_to_string(&self.err).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        Ran {
            status,
            stdout: std::fs::read_to_string(&self.out).unwrap_or_default(),
            stderr: std::fs::read_to_string(&self.err).unwrap_or_default(),
        }
    }
}

/// A command running `python` with the reporter on `PYTHONPATH` and reports going to `report`
/// (`None`: no `RUNYARD_REPORT_FILE`).
fn python_cmd(python: &Path, reporter: &Path, report: Option<&Path>, cwd: &Path) -> Command {
    let mut cmd = Command::new(python);
    cmd.current_dir(cwd)
        .env(
            "PYTHONPATH",
            runyard_agent::reporter::pythonpath(reporter, None),
        )
        .env("PYTHONUNBUFFERED", "1")
        .env_remove("RUNYARD_REPORT_FILE");
    if let Some(r) = report {
        cmd.env("RUNYARD_REPORT_FILE", r);
    }
    cmd
}

/// The report lines of `path`; panics on any line that is not a valid report.
fn reports(path: &Path) -> Vec<Report> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("report file {}: {e}", path.display()));
    assert!(text.ends_with('\n'), "report ends with a newline: {text:?}");
    text.lines()
        .map(|l| Report::parse(l).unwrap_or_else(|| panic!("not a report line: {l:?}")))
        .collect()
}

fn fold(lines: &[Report]) -> Placement {
    let mut job = Placement::new("j", 1, "a", Vec::new(), Timestamp(0));
    for l in lines {
        report::apply(&mut job, l);
    }
    job
}

fn series(path: &Path) -> std::collections::BTreeMap<String, Vec<runyard_model::MetricPoint>> {
    let text = std::fs::read_to_string(path).unwrap();
    report::series(text.lines())
}

struct Plain {
    tmp: tempfile::TempDir,
    reporter: PathBuf,
}

impl Plain {
    fn new() -> Plain {
        let tmp = tempfile::tempdir().unwrap();
        let reporter = runyard_agent::reporter::install(&tmp.path().join("reporter")).unwrap();
        Plain { tmp, reporter }
    }

    /// Runs `code` with the system python3 in the temp dir.
    fn run(&self, code: &str, report: Option<&Path>) -> Ran {
        let script = self.tmp.path().join("script.py");
        std::fs::write(&script, code).unwrap();
        let mut cmd = python_cmd(&python3(), &self.reporter, report, self.tmp.path());
        cmd.arg(&script);
        start(cmd, self.tmp.path(), "plain", PLAIN_LIMIT).wait()
    }
}

#[test]
fn plain_script_without_lightning_is_unaffected() {
    let p = Plain::new();
    let report = p.tmp.path().join("report.jsonl");
    let ran = p.run(
        "import sys\nprint('hello', sys.argv[0].endswith('script.py'))\n",
        Some(&report),
    );
    assert!(ran.status.success(), "{}", ran.output());
    assert_eq!(ran.stdout, "hello True\n", "{}", ran.output());
    assert!(!ran.stderr.contains("[runyard]"), "{}", ran.output());
    assert!(!report.exists(), "nothing reported, no file");
}

#[test]
fn plain_script_reports_through_the_api() {
    let p = Plain::new();
    let report = p.tmp.path().join("report.jsonl");
    let ran = p.run(
        r#"
import runyard_reporter as ry

class Scalar:
    """Tensor-like: numel() and item()."""
    def __init__(self, value, n=1):
        self.value, self.n = value, n
    def numel(self):
        return self.n
    def item(self):
        return self.value

assert ry.enabled()
assert ry.started(max_epochs=2, max_steps=-1, batches_per_epoch=float("inf"))
assert ry.progress(epoch=1, step=5, max_epochs=2, fraction=0.5)
assert ry.metrics(
    {"loss": 0.25, "acc": Scalar(0.75), "nan": float("nan"), "inf": float("inf"),
     "vector": Scalar(1.0, n=3), "text": "x", "flag": True},
    step=5, epoch=1,
)
assert not ry.metrics({"nan": float("nan")}), "nothing left to report"
assert ry.checkpoint("ckpt/best.pt", monitor="loss", mode="min", score=Scalar(0.25), epoch=1, step=5)
assert not ry.report("metrics", values={"x": float("nan")}), "NaN cannot be encoded"
assert ry.report("progress", epoch=2, step=10, fraction=1.0)
print("done")
"#,
        Some(&report),
    );
    assert!(ran.status.success(), "{}", ran.output());
    assert_eq!(
        ran.stderr.trim(),
        "[runyard] report line of type 'metrics' dropped, it is not valid JSON: \
         Out of range float values are not JSON compliant",
        "{}",
        ran.output()
    );
    let lines = reports(&report);
    assert_eq!(lines.len(), 5, "{lines:?}");
    assert_eq!(
        lines[0],
        Report::Started {
            max_epochs: Some(2),
            max_steps: None,
            batches_per_epoch: None
        }
    );
    assert_eq!(
        lines[1],
        Report::Progress {
            epoch: 1,
            max_epochs: Some(2),
            step: 5,
            max_steps: None,
            fraction: Some(0.5)
        }
    );
    let Report::Metrics {
        epoch,
        step,
        values,
        time,
    } = &lines[2]
    else {
        panic!("metrics expected: {:?}", lines[2]);
    };
    assert_eq!((*epoch, *step), (Some(1), Some(5)));
    assert_eq!(
        values
            .iter()
            .map(|(k, v)| (k.as_str(), *v))
            .collect::<Vec<_>>(),
        vec![("acc", 0.75), ("loss", 0.25)]
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(time.is_some_and(|t| (now - t).abs() < 60.0), "{time:?}");
    let ckpt = std::fs::canonicalize(p.tmp.path())
        .unwrap()
        .join("ckpt/best.pt");
    assert_eq!(
        lines[3],
        Report::Checkpoint {
            callback: 0,
            monitor: Some("loss".into()),
            mode: Some("min".into()),
            score: Some(0.25),
            path: ckpt.display().to_string(),
            epoch: Some(1),
            step: Some(5)
        }
    );
    let job = fold(&lines);
    let progress = job.progress.unwrap();
    assert_eq!((progress.epoch, progress.fraction), (2, 1.0));
    assert_eq!(job.best.unwrap().path, ckpt.display().to_string());
}

#[test]
fn reporter_is_silent_without_a_report_file_and_warns_once_when_writes_fail() {
    let p = Plain::new();
    let code = r#"
import runyard_reporter as ry
results = [ry.metrics({"a": 1.0}), ry.progress(epoch=0, step=1), ry.checkpoint("x.ckpt"),
           ry.lightning_callbacks(), ry.pytorch_lightning_callbacks()]
print(results)
"#;
    let ran = p.run(code, None);
    assert!(ran.status.success(), "{}", ran.output());
    assert_eq!(
        ran.stdout,
        "[False, False, False, [], []]\n",
        "{}",
        ran.output()
    );
    assert!(ran.stderr.is_empty(), "{}", ran.output());

    let unwritable = p.tmp.path().join("missing-dir/report.jsonl");
    let ran = p.run(code, Some(&unwritable));
    assert!(ran.status.success(), "{}", ran.output());
    assert!(
        ran.stdout.starts_with("[False, False, False, "),
        "{}",
        ran.output()
    );
    let warnings: Vec<_> = ran
        .stderr
        .lines()
        .filter(|l| l.starts_with("[runyard] "))
        .collect();
    assert_eq!(warnings.len(), 1, "{}", ran.output());
    assert!(warnings[0].contains("missing-dir"), "{}", ran.output());
    assert!(!unwritable.exists());
}

/// The callback's logic against a stand-in Trainer (no Lightning needed): after an exception a
/// callback whose best file is missing reports the newest `*.ckpt` of its directory, and a hook
/// that fails inside the reporter warns once and does not raise.
#[test]
fn exception_falls_back_to_the_newest_checkpoint_file_and_hooks_never_raise() {
    let p = Plain::new();
    let report = p.tmp.path().join("report.jsonl");
    let ran = p.run(
        r#"
import os, time
from runyard_reporter._lightning import Reporter

os.makedirs("ckpts")
for name in ["old.ckpt", "newest.ckpt", "notes.txt"]:
    open(os.path.join("ckpts", name), "w").close()
    time.sleep(0.02)
os.utime("ckpts/newest.ckpt", (time.time() + 5, time.time() + 5))

class Checkpoint:
    def __init__(self, best, dirpath, monitor):
        self.best_model_path, self.best_model_score = best, None
        self.last_model_path, self.dirpath, self.monitor, self.mode = "", dirpath, monitor, "max"
        self.best_k_models = {}

class Trainer:
    is_global_zero, current_epoch, global_step, sanity_checking = True, 4, 40, False
    callback_metrics = {}
    checkpoint_callbacks = [
        Checkpoint("", "ckpts", "acc"),
        Checkpoint("ckpts/gone.ckpt", "ckpts", None),
        Checkpoint("", "empty-dir", None),
    ]

class Broken(Trainer):
    @property
    def callback_metrics(self):
        raise RuntimeError("metrics exploded")

r = Reporter()
r.guard("on_exception", r.exception, Trainer())
r.guard("on_validation_end", r.validation_end, Broken())
r.guard("on_train_epoch_end", r.train_epoch_end, Broken())
print("survived")
"#,
        Some(&report),
    );
    assert!(ran.status.success(), "{}", ran.output());
    assert_eq!(ran.stdout, "survived\n", "{}", ran.output());
    let warnings: Vec<_> = ran.stderr.lines().collect();
    assert_eq!(warnings.len(), 1, "{}", ran.output());
    assert!(
        warnings[0].starts_with("[runyard] reporter error in on_validation_end")
            && warnings[0].contains("metrics exploded"),
        "{}",
        ran.output()
    );
    let newest = std::fs::canonicalize(p.tmp.path())
        .unwrap()
        .join("ckpts/newest.ckpt")
        .display()
        .to_string();
    let lines = reports(&report);
    assert_eq!(
        lines[1..],
        [
            Report::Checkpoint {
                callback: 0,
                monitor: Some("acc".into()),
                mode: Some("max".into()),
                score: None,
                path: newest.clone(),
                epoch: Some(4),
                step: Some(40)
            },
            Report::Checkpoint {
                callback: 1,
                monitor: None,
                mode: None,
                score: None,
                path: newest,
                epoch: Some(4),
                step: Some(40)
            },
        ],
        "{lines:?}"
    );
    assert!(matches!(
        lines[0],
        Report::Progress {
            epoch: 4,
            step: 40,
            ..
        }
    ));
}

/// One training script for both Lightning packages: `train.py PACKAGE CRASH_EPOCH ROOT`.
/// Three epochs of four batches; a custom callback printing at each epoch end; two
/// `ModelCheckpoint`s (val_loss min; train_loss min with save_last).
const TRAIN: &str = r#"
import importlib, sys
import torch
from torch.utils.data import DataLoader, TensorDataset

package, crash_epoch, root = sys.argv[1], int(sys.argv[2]), sys.argv[3]
pl = importlib.import_module(package)
callbacks = importlib.import_module(package + ".callbacks")


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        if self.current_epoch == crash_epoch:
            raise RuntimeError("boom in epoch %d" % self.current_epoch)
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.layer(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Printer(callbacks.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        print("CUSTOM epoch end %d" % trainer.current_epoch, flush=True)


torch.manual_seed(0)
x = torch.randn(64, 4)
data = TensorDataset(x, x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(64, 1))
trainer = pl.Trainer(
    max_epochs=3,
    accelerator="cpu",
    devices=1,
    logger=False,
    enable_progress_bar=True,
    enable_model_summary=False,
    default_root_dir=root,
    callbacks=[
        Printer(),
        callbacks.ModelCheckpoint(monitor="val_loss", mode="min"),
        callbacks.ModelCheckpoint(monitor="train_loss", mode="min", save_last=True, filename="train-{epoch}"),
    ],
)
trainer.fit(Tiny(), DataLoader(data, batch_size=16), DataLoader(data, batch_size=16))
print("CALLBACKS", sorted(type(c).__name__ for c in trainer.callbacks), flush=True)
"#;

/// A venv with Lightning in `dir`, or `None` (skipped) when uv or the install is unavailable.
fn lightning_venv(dir: &Path, logs: &Path) -> Option<PathBuf> {
    let Some(uv) = on_path("uv") else {
        unavailable("uv is not on PATH (install it with `pip install uv`)");
        return None;
    };
    let cache = std::env::var_os("RUNYARD_TEST_UV_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
                .join(".cache/runyard-test-uv")
        });
    let uv_cmd = |args: &[&str]| {
        let mut cmd = Command::new(&uv);
        cmd.args(args)
            .env("UV_CACHE_DIR", &cache)
            .env("UV_PYTHON_DOWNLOADS", "never")
            .env_remove("VIRTUAL_ENV");
        cmd
    };
    let venv = dir.join("venv");
    let mut cmd = uv_cmd(&["venv", "--quiet", "--python", "python3"]);
    cmd.arg(&venv);
    let ran = start(cmd, logs, "uv-venv", INSTALL_LIMIT).wait();
    assert!(ran.status.success(), "uv venv failed: {}", ran.output());
    let python = venv.join("bin/python");
    // From the cache alone first (no network); then from PyPI.
    for (name, offline) in [("uv-offline", true), ("uv-online", false)] {
        let mut args = vec!["pip", "install", "--quiet", "--python"];
        let py = python.display().to_string();
        args.push(&py);
        if offline {
            args.push("--offline");
        }
        args.push("lightning");
        let ran = start(uv_cmd(&args), logs, name, INSTALL_LIMIT).wait();
        if ran.status.success() {
            return Some(python);
        }
        if !offline {
            unavailable(&format!(
                "cannot install lightning with uv: {}",
                ran.output()
            ));
        }
    }
    None
}

/// Same file system as the uv cache where possible: uv hardlinks from the cache instead of
/// copying gigabytes.
fn venv_tempdir() -> tempfile::TempDir {
    let near_cache = std::env::var_os("RUNYARD_TEST_UV_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .and_then(|p| {
            let parent = if p.ends_with(".cache") {
                p
            } else {
                p.parent()?.to_path_buf()
            };
            tempfile::Builder::new()
                .prefix("runyard-test-venv-")
                .tempdir_in(parent)
                .ok()
        });
    near_cache.unwrap_or_else(|| tempfile::tempdir().unwrap())
}

/// What a checkpoint line says about one callback's checkpoint.
struct Seen {
    monitor: Option<String>,
    score: Option<f64>,
    path: String,
    epoch: Option<u64>,
}

fn checkpoints_of(lines: &[Report], which: u32) -> Vec<Seen> {
    lines
        .iter()
        .filter_map(|l| match l {
            Report::Checkpoint {
                callback,
                monitor,
                score,
                path,
                epoch,
                ..
            } if *callback == which => Some(Seen {
                monitor: monitor.clone(),
                score: *score,
                path: path.clone(),
                epoch: *epoch,
            }),
            _ => None,
        })
        .collect()
}

fn min(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::INFINITY, f64::min)
}

/// Scenarios 1, 3, 4 and 5 in two trainings run side by side (each costs ~15 s of imports):
/// `lightning` completing normally, and `pytorch_lightning` crashing in epoch 2. Both have a
/// custom callback and two `ModelCheckpoint`s.
#[test]
fn lightning_trainings_report_progress_metrics_and_checkpoints() {
    let venv_dir = venv_tempdir();
    let tmp = tempfile::tempdir().unwrap();
    let logs = tmp.path();
    let Some(python) = lightning_venv(venv_dir.path(), logs) else {
        return;
    };
    let reporter = runyard_agent::reporter::install(&tmp.path().join("reporter")).unwrap();
    let script = tmp.path().join("train.py");
    std::fs::write(&script, TRAIN).unwrap();

    let run = |name: &str, package: &str, crash_epoch: &str| {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let report = dir.join("report.jsonl");
        let mut cmd = python_cmd(&python, &reporter, Some(&report), &dir);
        cmd.arg(&script)
            .args([package, crash_epoch])
            .arg(dir.join("root"));
        (start(cmd, logs, name, TRAINING_LIMIT), report)
    };
    let (normal, normal_report) = run("normal", "lightning.pytorch", "-1");
    let (crash, crash_report) = run("crash", "pytorch_lightning", "2");
    let normal = normal.wait();
    let crash = crash.wait();

    // 1 + 4 + 5: a normal run, with the script's own callback and two checkpoints.
    assert!(normal.status.success(), "{}", normal.output());
    assert!(!normal.stderr.contains("[runyard]"), "{}", normal.output());
    // The progress bar's `\r` updates share lines with the callback's prints.
    let custom = normal.stdout.matches("CUSTOM epoch end").count();
    assert_eq!(custom, 3, "custom callback ran: {}", normal.output());
    assert!(
        normal.stdout.contains("'Printer'") && normal.stdout.contains("'RunyardReporter'"),
        "{}",
        normal.output()
    );
    let lines = reports(&normal_report);
    assert_eq!(
        lines[0],
        Report::Started {
            max_epochs: Some(3),
            max_steps: None,
            batches_per_epoch: Some(4)
        }
    );
    let fractions: Vec<f64> = lines
        .iter()
        .filter_map(|l| match l {
            Report::Progress { fraction, .. } => *fraction,
            _ => None,
        })
        .collect();
    assert!(fractions.len() >= 4, "{lines:?}");
    assert!(fractions.windows(2).all(|w| w[0] <= w[1]), "{fractions:?}");
    assert_eq!(fractions.last(), Some(&1.0));
    let history = series(&normal_report);
    let val: Vec<f64> = history["val_loss"].iter().map(|p| p.value).collect();
    let val_epochs: Vec<_> = history["val_loss"].iter().map(|p| p.epoch).collect();
    assert_eq!(val_epochs, vec![Some(0), Some(1), Some(2)], "{history:?}");
    assert_eq!(history["train_loss_epoch"].len(), 3, "{history:?}");
    let best = checkpoints_of(&lines, 0);
    let best = best.last().expect("a checkpoint line for callback 0");
    let path = &best.path;
    assert_eq!(best.monitor.as_deref(), Some("val_loss"));
    assert_eq!(best.score, Some(min(&val)), "best of {val:?}");
    assert!(
        Path::new(path).is_absolute() && Path::new(path).is_file(),
        "{path}"
    );
    let second = checkpoints_of(&lines, 1);
    let second = second.last().expect("a checkpoint line for callback 1");
    let second_path = &second.path;
    assert_eq!(second.monitor.as_deref(), Some("train_loss"));
    assert!(Path::new(second_path).is_file(), "{second_path}");
    let job = fold(&lines);
    assert_eq!(job.progress.as_ref().map(|p| p.fraction), Some(1.0));
    assert_eq!(job.best.as_ref().map(|b| &b.path), Some(path));
    assert_eq!(job.metrics["val_loss"], *val.last().unwrap());

    // 3: a crash in epoch 2 (pytorch_lightning's entry point): the best so far is reported.
    assert!(!crash.status.success(), "{}", crash.output());
    assert!(
        crash.stderr.contains("boom in epoch 2"),
        "{}",
        crash.output()
    );
    assert!(!crash.stderr.contains("[runyard]"), "{}", crash.output());
    assert!(
        crash.stdout.contains("CUSTOM epoch end 1"),
        "{}",
        crash.output()
    );
    let crash_lines = reports(&crash_report);
    assert!(
        matches!(
            crash_lines[0],
            Report::Started {
                max_epochs: Some(3),
                ..
            }
        ),
        "{crash_lines:?}"
    );
    assert!(
        !crash_lines
            .iter()
            .any(|l| matches!(l, Report::Progress { fraction: Some(f), .. } if *f >= 1.0)),
        "{crash_lines:?}"
    );
    let crash_val: Vec<f64> = series(&crash_report)["val_loss"]
        .iter()
        .map(|p| p.value)
        .collect();
    assert_eq!(crash_val.len(), 2, "epochs 0 and 1 validated");
    let crashed = checkpoints_of(&crash_lines, 0)
        .pop()
        .expect("a checkpoint line after the crash");
    let crash_path = crashed.path;
    assert_eq!(crashed.monitor.as_deref(), Some("val_loss"));
    assert_eq!(
        crashed.score,
        Some(min(&crash_val)),
        "best of {crash_val:?}"
    );
    assert!(Path::new(&crash_path).is_file(), "{crash_path}");
    let best_epoch = if crash_val[1] < crash_val[0] { 1 } else { 0 };
    assert_eq!(crashed.epoch, Some(best_epoch));
    assert!(
        !checkpoints_of(&crash_lines, 1).is_empty(),
        "{crash_lines:?}"
    );
    // `on_exception` wrote the last lines: progress, then every checkpoint callback.
    let n = crash_lines.len();
    assert!(
        matches!(crash_lines[n - 3], Report::Progress { epoch: 2, .. })
            && matches!(crash_lines[n - 2], Report::Checkpoint { callback: 0, .. })
            && matches!(crash_lines[n - 1], Report::Checkpoint { callback: 1, .. }),
        "{crash_lines:?}"
    );

    // The reported files are real checkpoints.
    let mut cmd = Command::new(&python);
    cmd.args([
        "-c",
        "import sys, torch\n\
         for p in sys.argv[1:]:\n    assert 'state_dict' in torch.load(p, map_location='cpu', weights_only=False), p\n\
         print('loaded', len(sys.argv) - 1)",
    ])
    .args([path, second_path, &crash_path]);
    let loaded = start(cmd, logs, "load", TRAINING_LIMIT).wait();
    assert!(loaded.status.success(), "{}", loaded.output());
    assert_eq!(loaded.stdout.trim(), "loaded 3", "{}", loaded.output());
}
