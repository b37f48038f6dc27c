"""The Lightning callback: reports a Trainer's progress, metrics and checkpoints.

Lightning calls ``runyard_reporter.lightning_callbacks`` (or ``pytorch_lightning_callbacks``)
when a Trainer is built and adds the returned callback next to the user's own. The callback class
is made once per Lightning package (``lightning.pytorch`` and ``pytorch_lightning`` have distinct
``Callback`` bases) and is reachable as a module attribute, so a Trainer pickled into a spawned
process finds it again.

Invariants:
- No hook raises: each runs under ``Reporter.guard``; the first failure is printed to stderr with
  a ``[runyard]`` prefix, later ones are silent, and training goes on.
- Only the global rank zero process reports.
- Lightning runs ``ModelCheckpoint`` callbacks after every other callback, so a checkpoint saved
  at a hook is seen at the next hook: each callback's best path is compared at every training
  batch end, epoch start and end, and validation start and end, and reported again in full at
  fit end and on an exception.
- Validation metrics are reported once per validation run (at its end); the metrics line at a
  training epoch end leaves them out, so each has one value per validation.
"""

import glob
import os
import re
import time

from runyard_reporter import (
    _absolute,
    _as_count,
    _as_float,
    _clean_values,
    _positive,
    _warn_once,
    checkpoint,
    metrics,
    progress,
    started,
)

#: Least time between two progress reports from training batches.
PROGRESS_INTERVAL = 0.5

_EPOCH_IN_NAME = re.compile(r"(?:^|[^A-Za-z0-9])epoch=(\d+)")
_STEP_IN_NAME = re.compile(r"(?:^|[^A-Za-z0-9])step=(\d+)")

#: Callback class name per Lightning package.
_CLASS_NAMES = {
    "lightning.pytorch": "RunyardReporter",
    "pytorch_lightning": "RunyardReporterPL",
}
_classes = {}


class Reporter:
    """The reporting state of one Trainer, independent of the Lightning package."""

    def __init__(self):
        self.max_epochs = None
        self.max_steps = None
        self.total_steps = None
        self.last_progress = None
        # Metric values at the start of the current validation run, and every metric name a
        # validation run has set or changed: those are the validation metrics.
        self.before_validation = {}
        self.validation_keys = set()
        # Per checkpoint callback index: the (path, score) last reported.
        self.reported = {}
        # Per checkpoint path: the (epoch, step) it was saved at.
        self.origins = {}
        self.last_save = None

    def guard(self, hook, fn, trainer, *args):
        """Runs ``fn(trainer, *args)`` on global rank zero; never raises."""
        try:
            if not getattr(trainer, "is_global_zero", True):
                return
            fn(trainer, *args)
        except Exception as e:
            _warn_once("reporter error in %s, reporting may be incomplete: %s: %s" % (hook, type(e).__name__, e))

    # Hooks.

    def train_start(self, trainer):
        self.max_epochs = _as_count(getattr(trainer, "max_epochs", None))
        self.max_steps = _positive(getattr(trainer, "max_steps", None))
        batches = _as_count(getattr(trainer, "num_training_batches", None))
        self.total_steps = self.max_steps
        if self.total_steps is None:
            try:
                self.total_steps = _positive(trainer.estimated_stepping_batches)
            except Exception:
                self.total_steps = None
        if self.total_steps is None and self.max_epochs and batches:
            self.total_steps = self.max_epochs * batches
        self.last_progress = None
        started(max_epochs=self.max_epochs, max_steps=self.max_steps, batches_per_epoch=batches)
        self.poll_checkpoints(trainer)

    def train_batch_end(self, trainer):
        self.poll_checkpoints(trainer)
        now = time.monotonic()
        if self.last_progress is None or now - self.last_progress >= PROGRESS_INTERVAL:
            self.last_progress = now
            self.progress(trainer)

    def train_epoch_start(self, trainer):
        self.poll_checkpoints(trainer)

    def train_epoch_end(self, trainer):
        values = {
            k: v for k, v in self.current_metrics(trainer).items() if k not in self.validation_keys
        }
        if values:
            metrics(values, step=trainer.global_step, epoch=trainer.current_epoch)
        self.last_progress = time.monotonic()
        self.progress(trainer)
        self.poll_checkpoints(trainer)

    def validation_start(self, trainer):
        self.before_validation = self.current_metrics(trainer)
        if not getattr(trainer, "sanity_checking", False):
            self.poll_checkpoints(trainer)

    def validation_end(self, trainer):
        after = self.current_metrics(trainer)
        before = self.before_validation
        self.validation_keys.update(k for k, v in after.items() if before.get(k) != v)
        if getattr(trainer, "sanity_checking", False):
            return
        values = {k: v for k, v in after.items() if k in self.validation_keys}
        if values:
            metrics(values, step=trainer.global_step, epoch=trainer.current_epoch)
        self.poll_checkpoints(trainer)

    def save_checkpoint(self, trainer, saved):
        try:
            self.last_save = (_as_count(saved.get("epoch")), _as_count(saved.get("global_step")))
        except Exception:
            self.last_save = (_as_count(trainer.current_epoch), _as_count(trainer.global_step))

    def fit_end(self, trainer):
        if getattr(trainer, "interrupted", False):
            self.progress(trainer)
        else:
            self.progress(trainer, fraction=1.0)
        self.poll_checkpoints(trainer, every=True)

    def exception(self, trainer):
        self.progress(trainer)
        self.poll_checkpoints(trainer, every=True, scan=True)

    # Reports.

    def progress(self, trainer, fraction=None):
        step = _as_count(getattr(trainer, "global_step", None)) or 0
        if fraction is None and self.total_steps:
            fraction = min(1.0, step / self.total_steps)
        progress(
            epoch=getattr(trainer, "current_epoch", 0),
            step=step,
            max_epochs=self.max_epochs,
            max_steps=self.max_steps,
            fraction=fraction,
        )

    @staticmethod
    def current_metrics(trainer):
        return _clean_values(getattr(trainer, "callback_metrics", None) or {})

    def poll_checkpoints(self, trainer, every=False, scan=False):
        """Reports each checkpoint callback whose best changed (all of them with ``every``).

        With ``scan``, a callback whose best file is missing reports the newest ``*.ckpt`` of its
        directory instead (a run that crashed before the callback recorded its save).
        """
        callbacks = list(getattr(trainer, "checkpoint_callbacks", None) or [])
        for index, cb in enumerate(callbacks):
            path = getattr(cb, "best_model_path", "") or ""
            score = _as_float(getattr(cb, "best_model_score", None)) if path else None
            if not path:
                path = getattr(cb, "last_model_path", "") or ""
            if scan and (not path or not _exists(path)):
                found = _newest_checkpoint(getattr(cb, "dirpath", None))
                if found:
                    path = found
                    score = _as_float((getattr(cb, "best_k_models", None) or {}).get(found))
            if not path:
                continue
            path = _absolute(path)
            if not every and self.reported.get(index) == (path, score):
                continue
            self.reported[index] = (path, score)
            epoch, step = self.origin(trainer, path)
            monitor = getattr(cb, "monitor", None)
            checkpoint(
                path,
                monitor=monitor,
                mode=getattr(cb, "mode", None) if monitor else None,
                score=score,
                epoch=epoch,
                step=step,
                callback=index,
            )

    def origin(self, trainer, path):
        """The (epoch, step) ``path`` was saved at: from its name, else the latest save seen."""
        if path not in self.origins:
            name = os.path.basename(path)
            epoch = _EPOCH_IN_NAME.search(name)
            step = _STEP_IN_NAME.search(name)
            fallback = self.last_save or (
                _as_count(getattr(trainer, "current_epoch", None)),
                _as_count(getattr(trainer, "global_step", None)),
            )
            self.origins[path] = (
                int(epoch.group(1)) if epoch else fallback[0],
                int(step.group(1)) if step else fallback[1],
            )
        return self.origins[path]


def _exists(path):
    return "://" in path or os.path.isfile(path)


def _newest_checkpoint(dirpath):
    """The most recently modified ``*.ckpt`` file in ``dirpath`` (local paths only), or None."""
    if not dirpath:
        return None
    dirpath = os.fspath(dirpath)
    if "://" in dirpath:
        return None
    newest, newest_mtime = None, None
    for candidate in glob.glob(os.path.join(glob.escape(dirpath), "*.ckpt")):
        try:
            mtime = os.stat(candidate).st_mtime
        except OSError:
            continue
        if newest_mtime is None or mtime > newest_mtime:
            newest, newest_mtime = candidate, mtime
    return newest


def _build(package):
    if package == "pytorch_lightning":
        from pytorch_lightning import Callback
    else:
        from lightning.pytorch import Callback

    name = _CLASS_NAMES[package]

    class RunyardReporter(Callback):
        """Reports progress, metrics and checkpoints to Runyard (see ``runyard_reporter``)."""

        def __init__(self):
            super().__init__()
            self._runyard = Reporter()

        def on_train_start(self, trainer, pl_module):
            self._runyard.guard("on_train_start", self._runyard.train_start, trainer)

        def on_train_batch_end(self, trainer, pl_module, *args, **kwargs):
            self._runyard.guard("on_train_batch_end", self._runyard.train_batch_end, trainer)

        def on_train_epoch_start(self, trainer, pl_module):
            self._runyard.guard("on_train_epoch_start", self._runyard.train_epoch_start, trainer)

        def on_train_epoch_end(self, trainer, pl_module):
            self._runyard.guard("on_train_epoch_end", self._runyard.train_epoch_end, trainer)

        def on_validation_start(self, trainer, pl_module):
            self._runyard.guard("on_validation_start", self._runyard.validation_start, trainer)

        def on_validation_end(self, trainer, pl_module):
            self._runyard.guard("on_validation_end", self._runyard.validation_end, trainer)

        def on_save_checkpoint(self, trainer, pl_module, saved):
            self._runyard.guard("on_save_checkpoint", self._runyard.save_checkpoint, trainer, saved)

        def on_fit_end(self, trainer, pl_module):
            self._runyard.guard("on_fit_end", self._runyard.fit_end, trainer)

        def on_exception(self, trainer, pl_module, exception):
            self._runyard.guard("on_exception", self._runyard.exception, trainer)

    RunyardReporter.__name__ = name
    RunyardReporter.__qualname__ = name
    RunyardReporter.__module__ = __name__
    return RunyardReporter


def callback_class(package):
    """The reporter callback class for ``package`` (``lightning.pytorch`` or ``pytorch_lightning``)."""
    if package not in _classes:
        _classes[package] = _build(package)
    return _classes[package]


def make_callback(package):
    """A new reporter callback for one Trainer of ``package``."""
    return callback_class(package)()


def __getattr__(name):
    # Unpickling looks the classes up by name (PEP 562).
    for package, class_name in _CLASS_NAMES.items():
        if name == class_name:
            return callback_class(package)
    raise AttributeError(name)
