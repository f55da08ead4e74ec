"""Tuning records: one set of kernels on every rank, every run.

On a GPU two things are decided per launch key: the tile configuration of each autotuned Triton kernel (the GEMM
core's pointer and TMA forms, their pair forms, the attention kernels) and, for each plain GEMM, the fused Triton
core against cuBLAS + elementwise kernels. Timing them at start-up in every process gives decisions that differ
between ranks and runs (timing noise), and Triton's own on-disk autotune cache skips configurations with a
``pre_hook`` (the TMA kernel's), so nothing is reused. A tuning record fixes them instead:

* ``python -m fastvit_kernels.tune --model vit_base_patch16_224 --batch-size 256 --dtype bf16 --out tuning.json``
  (GPU) runs one training step with every key autotuned and both GEMM paths timed, and writes the winners keyed by
  (GPU name, Triton version, kernel, key) (:func:`snapshot`, :func:`save`);
* ``FASTVIT_TUNING=tuning.json`` (read on the first launch) or :func:`use_tuning_record` applies it: each recorded
  key runs its recorded candidate with nothing timed; a key the record lacks runs the default candidate and the
  fused core (untimed, with a warning); a record made on another GPU name or Triton version is ignored with a
  warning.

Without a record (the rules live in :mod:`fastvit_kernels.kernels.tuning_record` and
:func:`fastvit_kernels.kernels.gemm_impl.choose`): the GEMM path is the fused core unless ``MEASURED_CHOICES``
says otherwise (never a timing); tiles are autotuned per process, except under ``torch.distributed`` (initialized,
world size > 1), where every key runs its default candidate untimed, so all ranks run the same kernels.
To tune inside a distributed job instead, every rank runs its first step(s) inside :func:`autotuning` (each rank
times locally there) and leaves it together: on exit :func:`sync` broadcasts rank 0's decisions and every rank
installs them, so from then on all ranks run rank 0's kernels.

Design limits: the only collective is :func:`sync` (explicit, called by every rank at the same point; never inside
a CUDA graph capture), so nothing on the launch path can deadlock when ranks launch different keys (uneven last
batches, evaluation on rank 0 only). Inside an ``autotuning`` block ranks may run different tiles; after
:func:`sync`, a key rank 0 had not seen runs the default candidate everywhere. ``FASTVIT_AUTOTUNE=0`` launches the
first candidate without consulting the autotuner, so a record does not apply to tiles then (the GEMM path still
follows it).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import pkgutil

import torch

from .kernels import tuning_record as _record
from .kernels.tuning_record import TuningRecord, load

__all__ = ["TuningRecord", "load", "save", "use_tuning_record", "active", "snapshot", "sync", "autotuning", "status"]


def save(record: TuningRecord, path: str) -> None:
    """Write ``record`` to ``path`` as JSON (see :meth:`TuningRecord.to_json`), replacing the file atomically."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(record.to_json(), f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def _autotuners() -> dict:
    """{record kernel name: triton Autotuner} for the package's autotuned kernels (those whose ``early_config_prune``
    is a :func:`tuning_record.tuned_prune`); empty under the interpreter's bare kernels of attention."""
    from . import kernels

    out = {}
    for info in pkgutil.iter_modules(kernels.__path__):
        mod = importlib.import_module(f"{kernels.__name__}.{info.name}")
        for name, obj in vars(mod).items():
            kernel = getattr(getattr(obj, "early_config_prune", None), "kernel", None)
            if isinstance(kernel, str) and isinstance(getattr(obj, "cache", None), dict):
                out[kernel] = obj
    return out


def _forget_decisions() -> None:
    """Drop every decision cached in this process (Triton autotuners' key -> config caches, the GEMM path rule's
    decisions), so the next launch of each key consults the active record again."""
    from .kernels import gemm_impl

    for tuner in _autotuners().values():
        tuner.cache.clear()
    gemm_impl.reset_decisions()


def use_tuning_record(record: TuningRecord | str | os.PathLike | None) -> TuningRecord | None:
    """Apply a tuning record for the rest of the process (replacing ``FASTVIT_TUNING``'s and any earlier one), and
    forget the decisions made so far so that it takes effect for keys already launched. None: no record.

    Args:
        record: a :class:`TuningRecord`, the path of one written by :func:`save`, or None.

    Returns:
        The record now active (None for None).

    Raises:
        FileNotFoundError / ValueError: the path is missing or not a tuning record.
        TypeError: ``record`` is of another type.
    """
    if isinstance(record, (str, os.PathLike)):
        record = load(os.fspath(record))
    elif record is not None and not isinstance(record, TuningRecord):
        raise TypeError(f"record must be a TuningRecord, a path or None; got {type(record).__name__}")
    _record.install(record)
    _forget_decisions()
    return record


def active() -> TuningRecord | None:
    """The record in force (:func:`use_tuning_record`'s, else ``FASTVIT_TUNING``'s), or None."""
    return _record.active()


def snapshot() -> TuningRecord:
    """Every decision made in this process, as a record of this process's GPU and Triton version: the active record's
    entries, then what each package autotuner chose for every key it has launched, and the GEMM path of every key
    decided by the rule (forced settings are not decisions and are not recorded)."""
    from .kernels import gemm_impl

    gpu, version = _record.environment()
    current = _record.active()
    entries = dict(current.entries) if current is not None else {}
    for kernel, tuner in _autotuners().items():
        for key, cfg in tuner.cache.items():
            entries[(kernel, tuple(key))] = {"config": _record.config_entry(cfg)}
    for key, decision in gemm_impl.decisions().items():
        entries[(_record.GEMM_IMPL, tuple(key))] = {"impl": decision.impl}
    return TuningRecord(gpu, version, entries)


def sync(group=None, src: int = 0) -> TuningRecord | None:
    """Make every rank run rank ``src``'s kernels: a collective (all ranks of ``group`` must call it at the same
    point, outside CUDA graph capture) that broadcasts rank ``src``'s :func:`snapshot` and applies it on every rank
    (on ``src`` too, so its later keys follow the same rules), whatever GPU name or Triton version each rank has.
    Not distributed (``torch.distributed`` not initialized, or one rank): nothing happens.

    Returns:
        The record now active (None when nothing happened).

    Raises:
        RuntimeError: called while a CUDA graph is being captured.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1):
        return None
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("fastvit_kernels.tuning.sync() is a collective and cannot run during CUDA graph capture")
    payload = [snapshot().to_json() if dist.get_rank() == src else None]
    dist.broadcast_object_list(payload, src=src, group=group)
    record = TuningRecord.from_json(payload[0])
    record.check = False
    return use_tuning_record(record)


@contextlib.contextmanager
def autotuning(sync_on_exit: bool = True, group=None):
    """Block in which keys without a record entry are autotuned (timed) even under ``torch.distributed``; on a
    normal exit, :func:`sync` (every rank of ``group`` must leave the block at the same point). Does not lift an
    active record: recorded keys stay untimed."""
    _record.local_tuning(+1)
    try:
        yield
    finally:
        _record.local_tuning(-1)
    if sync_on_exit:
        sync(group)


def status() -> dict:
    """The tuning record in force, for ``python -m fastvit_kernels.info``: ``path`` (file, or None), ``entries``
    (count), ``gpu`` / ``triton`` (where it was made; None without a record), ``matching`` (whether those equal this
    process's current CUDA device name ("cpu" without CUDA) and Triton version; None without a record), and
    ``error`` (why ``FASTVIT_TUNING`` could not be loaded, else None)."""
    out = {"path": None, "entries": 0, "gpu": None, "triton": None, "matching": None, "error": None}
    try:
        record = _record.active()
    except (OSError, ValueError) as err:
        return {**out, "path": os.environ.get(_record.ENV), "error": str(err)}
    if record is None:
        return out
    return {**out, "path": record.path, "entries": len(record.entries), "gpu": record.gpu, "triton": record.triton,
            "matching": (record.gpu, record.triton) == _record.environment()}
