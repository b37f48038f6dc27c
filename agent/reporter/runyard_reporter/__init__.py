"""Runyard's job reporter: training progress, metrics and checkpoints as JSON lines.

The Runyard agent puts this distribution on every job's ``PYTHONPATH`` and names a report file
in ``RUNYARD_REPORT_FILE``. Each report is one JSON object on one line, appended to that file
(``O_APPEND``, one ``write`` per line, so lines from several processes never interleave). The
line format is Runyard's ``model/src/report.rs``.

PyTorch Lightning picks the callback up by itself through the entry points
``lightning.pytorch.callbacks_factory`` and ``pytorch_lightning.callbacks_factory``: no change
to user code. Plain scripts may report through the same channel::

    import runyard_reporter as ry
    ry.progress(epoch=1, step=200, max_steps=1000)
    ry.metrics({"val_loss": 0.31}, step=200, epoch=1)
    ry.checkpoint("ckpt/best.pt", monitor="val_loss", mode="min", score=0.31)

Invariant: nothing here ever raises into the caller. Without ``RUNYARD_REPORT_FILE`` every call
does nothing; if a write fails the report is dropped and one warning goes to stderr.
"""

import json
import math
import os
import sys
import time

__version__ = "0.1.0"
__all__ = [
    "REPORT_FILE_ENV",
    "checkpoint",
    "enabled",
    "lightning_callbacks",
    "metrics",
    "progress",
    "pytorch_lightning_callbacks",
    "report",
    "started",
]

#: The environment variable naming the report file.
REPORT_FILE_ENV = "RUNYARD_REPORT_FILE"

_warned = False


def _warn_once(message):
    """Prints ``[runyard] message`` to stderr the first time only; never raises."""
    global _warned
    if _warned:
        return
    _warned = True
    try:
        print("[runyard] " + str(message), file=sys.stderr, flush=True)
    except Exception:
        pass


def enabled():
    """True when this process has somewhere to report to."""
    return bool(os.environ.get(REPORT_FILE_ENV))


def _as_count(value):
    """A non-negative int, or None (bools, negatives, infinities and non-numbers give None)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        if hasattr(value, "item"):
            value = value.item()
        f = float(value)
    except Exception:
        return None
    if not math.isfinite(f) or f < 0:
        return None
    return int(f)


def _positive(value):
    """``_as_count(value)`` with 0 as None (Lightning's "no limit" is -1, and 0 steps means none)."""
    n = _as_count(value)
    return n if n else None


def _as_float(value):
    """A finite float from a number or a one-element tensor/array, or None."""
    if value is None or isinstance(value, bool):
        return None
    try:
        if hasattr(value, "numel") and value.numel() != 1:
            return None
        if hasattr(value, "size") and not callable(value.size) and value.size != 1:
            return None
        if hasattr(value, "item"):
            value = value.item()
        f = float(value)
    except Exception:
        return None
    return f if math.isfinite(f) else None


def _absolute(path):
    """``path`` made absolute, unless it is a URL (``s3://...``) or empty."""
    path = os.fspath(path)
    if not path or "://" in path:
        return path
    return os.path.abspath(path)


def report(type, **fields):
    """Writes one report line ``{"type": type, **fields}``; returns True if it was written.

    Fields must be JSON values; a line that cannot be encoded (NaN, objects) is dropped.
    """
    target = os.environ.get(REPORT_FILE_ENV)
    if not target:
        return False
    try:
        obj = {"type": str(type)}
        obj.update(fields)
        data = (json.dumps(obj, separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")
    except Exception as e:
        _warn_once("report line of type %r dropped, it is not valid JSON: %s" % (type, e))
        return False
    try:
        fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, data)
            while written < len(data):
                written += os.write(fd, data[written:])
        finally:
            os.close(fd)
        return True
    except Exception as e:
        _warn_once("cannot write a report line to %s: %s" % (target, e))
        return False


def started(max_epochs=None, max_steps=None, batches_per_epoch=None):
    """Reports that training started, with its planned size when known."""
    return report(
        "started",
        max_epochs=_as_count(max_epochs),
        max_steps=_positive(max_steps),
        batches_per_epoch=_as_count(batches_per_epoch),
    )


def progress(epoch=0, step=0, max_epochs=None, max_steps=None, fraction=None):
    """Reports training progress; ``fraction`` (0..1) is derived by Runyard when omitted."""
    f = _as_float(fraction)
    return report(
        "progress",
        epoch=_as_count(epoch) or 0,
        step=_as_count(step) or 0,
        max_epochs=_as_count(max_epochs),
        max_steps=_positive(max_steps),
        fraction=None if f is None else min(1.0, max(0.0, f)),
    )


def _clean_values(values):
    """``{str(name): float}`` of the scalar, finite entries of ``values``."""
    out = {}
    try:
        items = list(values.items())
    except Exception:
        return out
    for name, value in items:
        f = _as_float(value)
        if f is not None:
            out[str(name)] = f
    return out


def metrics(values, step=None, epoch=None):
    """Reports metric values (a dict of name to number or scalar tensor) at a point of training.

    Non-finite and non-scalar values are left out; nothing is written if none is left.
    """
    clean = _clean_values(values)
    if not clean:
        return False
    return report(
        "metrics",
        epoch=_as_count(epoch),
        step=_as_count(step),
        values=clean,
        time=time.time(),
    )


def checkpoint(path, monitor=None, mode=None, score=None, epoch=None, step=None, callback=0):
    """Reports a checkpoint file (made absolute); Runyard keeps the best one of the job."""
    path = _absolute(path) if path else ""
    if not path:
        return False
    return report(
        "checkpoint",
        callback=_as_count(callback) or 0,
        monitor=None if monitor is None else str(monitor),
        mode=None if mode is None else str(mode),
        score=_as_float(score),
        path=path,
        epoch=_as_count(epoch),
        step=_as_count(step),
    )


def lightning_callbacks():
    """Entry point of ``lightning.pytorch.callbacks_factory``: the callback for ``lightning``."""
    return _factory("lightning.pytorch")


def pytorch_lightning_callbacks():
    """Entry point of ``pytorch_lightning.callbacks_factory``: the callback for ``pytorch_lightning``."""
    return _factory("pytorch_lightning")


def _factory(package):
    if not enabled():
        return []
    try:
        from runyard_reporter import _lightning

        return [_lightning.make_callback(package)]
    except Exception as e:
        _warn_once("Lightning reporter disabled: %s" % (e,))
        return []
