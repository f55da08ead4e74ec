"""Look-up side of tuning records: what the autotuned kernels and the GEMM path rule consult before timing anything.

A tuning record (written by ``python -m fastvit_kernels.tune``; public API in :mod:`fastvit_kernels.tuning`) maps
``(kernel, key)`` to a decision made once, offline, on one GPU with one Triton version:

* ``kernel`` is an autotuned kernel's name (``"matmul._matmul_kernel"``, ...) and ``key`` is the tuple Triton's
  autotuner caches its choice under (the values of the ``key=`` arguments, then the ``str(dtype)`` of every argument
  that has one; :func:`autotune_key`); the value is ``{"config": {"kwargs": {...}, "num_warps": w,
  "num_stages": s}}``, one of the kernel's candidates;
* ``kernel == "gemm_impl"`` and ``key`` is :func:`fastvit_kernels.kernels.gemm_impl.gemm_key`'s tuple; the value is
  ``{"impl": "triton" | "cublas"}``.

How a tile configuration is picked for one autotuner key (on a Triton autotune cache miss; :func:`tuned_prune`
wraps each kernel's ``early_config_prune``):

1. a record is active and made on this GPU name and Triton version: the recorded candidate, alone. Triton does not
   benchmark a pruned list of one (3.9: it skips benchmarking; 3.4, which benchmarks even one candidate, reaches
   :func:`bench`, which then returns without running anything), so nothing is timed. A key the record lacks, or a
   recorded configuration that is no longer a candidate, runs the first candidate (the default) with a warning.
   A record from another GPU or Triton version is ignored, with a warning, as if there were none;
2. no record, under ``torch.distributed`` (initialized, world size > 1), outside a
   :func:`fastvit_kernels.tuning.autotuning` block: the first candidate, untimed, so every rank runs the same
   kernel without any collective on the launch path (``fastvit_kernels.tuning.sync()`` then shares rank 0's
   decisions);
3. otherwise (one process, or inside an ``autotuning`` block): every candidate, timed by Triton's autotuner through
   :func:`bench` (``triton.testing.do_bench``), the fastest kept for the process.

Nothing here imports triton or reads the environment at import; ``FASTVIT_TUNING`` is read on the first look-up.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from dataclasses import dataclass, field

import torch

FORMAT = "fastvit_kernels.tuning/1"
ENV = "FASTVIT_TUNING"
GEMM_IMPL = "gemm_impl"  # the kernel name of the Triton-vs-cuBLAS decisions

_SCALARS = (str, int, float, bool, type(None))


@dataclass
class TuningRecord:
    """Decisions made on one GPU with one Triton version.

    Attributes:
        gpu: ``torch.cuda.get_device_name()`` where they were made ("cpu" under the Triton interpreter).
        triton: ``triton.__version__`` there.
        entries: ``(kernel, key tuple) -> {"config": {...}}`` or ``{"impl": ...}`` (see the module docstring).
        path: the file it was loaded from, or None.
        check: apply it only on a matching GPU name and Triton version (False for the record
            :func:`fastvit_kernels.tuning.sync` broadcasts: every rank runs rank 0's kernels).
    """

    gpu: str
    triton: str
    entries: dict = field(default_factory=dict)
    path: str | None = None
    check: bool = True

    def to_json(self) -> dict:
        """The JSON document (``format``, ``gpu``, ``triton``, ``entries`` as a list sorted by kernel and key)."""
        rows = [{"kernel": k, "key": list(key), **value} for (k, key), value in self.entries.items()]
        rows.sort(key=lambda r: (r["kernel"], repr(r["key"])))
        return {"format": FORMAT, "gpu": self.gpu, "triton": self.triton, "entries": rows}

    @classmethod
    def from_json(cls, data, path: str | None = None) -> TuningRecord:
        """Parse :meth:`to_json`'s document.

        Raises:
            ValueError: a missing or malformed field, named with the expected and the actual value.
        """
        where = f"tuning record {path}" if path else "tuning record"
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{where}: format must be {FORMAT!r}; got {got!r}")
        for name in ("gpu", "triton"):
            if not isinstance(data.get(name), str):
                raise ValueError(f"{where}: {name!r} must be a string; got {data.get(name)!r}")
        if not isinstance(data.get("entries"), list):
            raise ValueError(f"{where}: 'entries' must be a list; got {type(data.get('entries')).__name__}")
        entries = {}
        for i, row in enumerate(data["entries"]):
            if not isinstance(row, dict) or not isinstance(row.get("kernel"), str) \
                    or not isinstance(row.get("key"), list) or not all(isinstance(v, _SCALARS) for v in row["key"]):
                raise ValueError(f"{where}: entries[{i}] must have a string 'kernel' and a 'key' list of scalars; "
                                 f"got {row!r}")
            value = {k: v for k, v in row.items() if k not in ("kernel", "key")}
            if row["kernel"] == GEMM_IMPL:
                if value.get("impl") not in ("triton", "cublas"):
                    raise ValueError(f"{where}: entries[{i}]['impl'] must be 'triton' or 'cublas'; "
                                     f"got {value.get('impl')!r}")
            else:
                cfg = value.get("config")
                if not isinstance(cfg, dict) or not isinstance(cfg.get("kwargs"), dict) \
                        or not isinstance(cfg.get("num_warps"), int) or not isinstance(cfg.get("num_stages"), int):
                    raise ValueError(f"{where}: entries[{i}]['config'] must be {{'kwargs': dict, 'num_warps': int, "
                                     f"'num_stages': int}}; got {cfg!r}")
            entries[(row["kernel"], tuple(row["key"]))] = value
        return cls(data["gpu"], data["triton"], entries, path)


def load(path: str) -> TuningRecord:
    """Read a record from the JSON file at ``path``.

    Raises:
        FileNotFoundError: no such file. ValueError: not a tuning record (see :meth:`TuningRecord.from_json`).
    """
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"tuning record {path}: not JSON ({err})") from None
    return TuningRecord.from_json(data, path)


def config_entry(cfg) -> dict:
    """A ``triton.Config``'s record value: ``{"kwargs": ..., "num_warps": ..., "num_stages": ...}``."""
    return {"kwargs": dict(cfg.kwargs), "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def _config_id(entry: dict) -> tuple:
    return tuple(sorted(entry["kwargs"].items())), entry["num_warps"], entry["num_stages"]


# ----------------------------------------------------------------------------------------------------------------
# the active record
# ----------------------------------------------------------------------------------------------------------------
_lock = threading.Lock()
_state = {"record": None, "env_read": False, "local_tuning": 0}
_matching: dict[str, bool] = {}  # device -> the active record applies there
_warned: set = set()
_tls = threading.local()  # .single: the last pruning on this thread left one candidate


def install(record: TuningRecord | None) -> None:
    """Make ``record`` the active one (None: none), replacing any earlier one and ``FASTVIT_TUNING``'s. Callers also
    drop decisions already cached (:func:`fastvit_kernels.tuning.use_tuning_record` does)."""
    with _lock:
        _state["record"] = record
        _state["env_read"] = True
        _matching.clear()
        _warned.clear()


def active() -> TuningRecord | None:
    """The active record: the installed one, else the file ``FASTVIT_TUNING`` names (read on the first call).

    Raises:
        FileNotFoundError / ValueError: ``FASTVIT_TUNING`` names a missing file or not a tuning record.
    """
    if not _state["env_read"]:
        with _lock:
            if not _state["env_read"]:
                path = os.environ.get(ENV)
                if path:
                    try:
                        _state["record"] = load(path)
                    except FileNotFoundError:
                        raise FileNotFoundError(f"{ENV}={path!r}: no such file") from None
                _state["env_read"] = True
    return _state["record"]


def environment(device: torch.device | None = None) -> tuple[str, str]:
    """(GPU name, Triton version) a record made here would carry: ``torch.cuda.get_device_name`` of ``device`` (the
    current CUDA device when None), "cpu" off CUDA (the interpreter)."""
    import triton

    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return name, triton.__version__


def _warn_once(tag, message: str) -> None:
    if tag not in _warned:
        _warned.add(tag)
        warnings.warn(message, stacklevel=3)


def matches(record: TuningRecord, device: torch.device | None = None) -> bool:
    """Whether ``record`` applies on ``device`` (its GPU name and the Triton version equal this process's, or its
    ``check`` is off); a mismatch warns once per device."""
    if not record.check:
        return True
    dev = str(device)
    if dev not in _matching:
        gpu, version = environment(device)
        ok = (record.gpu, record.triton) == (gpu, version)
        _matching[dev] = ok
        if not ok:
            _warn_once(("mismatch", dev),
                       f"tuning record {record.path or ''} was made on {record.gpu!r} with Triton {record.triton}; "
                       f"this is {gpu!r} with Triton {version}: ignored (run python -m fastvit_kernels.tune here)")
    return _matching[dev]


def lookup(kernel: str, key: tuple, device: torch.device | None = None) -> dict | None:
    """The active, matching record's value for ``(kernel, key)``, or None."""
    record = active()
    if record is None or not matches(record, device):
        return None
    return record.entries.get((kernel, tuple(key)))


def distributed() -> bool:
    """Whether this process is one rank of several (``torch.distributed`` initialized, world size > 1)."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def local_tuning(delta: int) -> None:
    """Enter (+1) or leave (-1) a block where keys without a record are autotuned even under ``torch.distributed``
    (:func:`fastvit_kernels.tuning.autotuning`)."""
    with _lock:
        _state["local_tuning"] += delta


# ----------------------------------------------------------------------------------------------------------------
# the autotuner hooks
# ----------------------------------------------------------------------------------------------------------------
def autotune_key(key_names, nargs: dict, kwargs: dict) -> tuple:
    """The key Triton's autotuner (3.4 - 3.9, ``Autotuner.run``) caches a launch's choice under: the values of the
    ``key=`` arguments present, then ``str(dtype)`` of every argument with a ``dtype``, in argument order.
    ``nargs``: the positional arguments by name; ``kwargs``: the keyword arguments (what ``early_config_prune``
    receives)."""
    args = {**nargs, **kwargs}
    key = [args[k] for k in key_names if k in args]
    key += [str(v.dtype) for v in args.values() if hasattr(v, "dtype")]
    return tuple(key)


def _device(nargs: dict) -> torch.device | None:
    for v in nargs.values():
        t = v if isinstance(v, torch.Tensor) else getattr(v, "base", None)  # TMA descriptors carry their tensor
        if isinstance(t, torch.Tensor):
            return t.device
    return None


def _single(configs: list) -> list:
    _tls.single = len(configs) == 1
    return configs


def tuned_prune(kernel: str, key_names, prune):
    """An ``early_config_prune`` for ``triton.autotune``: ``prune(configs, nargs, **kwargs)`` (the kernel's own
    candidate filter), then the rule of the module docstring. The result carries ``kernel`` (the record's kernel
    name) and ``candidates`` (``prune`` itself: every candidate, for the AOT check)."""

    def early_config_prune(configs, nargs, **kwargs):
        cands = prune(configs, nargs, **kwargs)
        key = autotune_key(key_names, nargs, kwargs)
        device = _device(nargs)
        record = active()
        if record is not None and matches(record, device):
            entry = record.entries.get((kernel, key))
            if entry is not None and "config" in entry:
                chosen = [c for c in cands if _config_id(config_entry(c)) == _config_id(entry["config"])]
                if chosen:
                    return _single(chosen[:1])
                _warn_once(("stale", kernel, key),
                           f"tuning record: {kernel} key {key}: recorded config {entry['config']} is not a candidate "
                           "here; the default candidate runs (untimed)")
            else:
                _warn_once(("missing", kernel, key),
                           f"tuning record {record.path or ''} has no entry for {kernel} key {key}: the default "
                           "candidate runs (untimed); re-run python -m fastvit_kernels.tune with this shape")
            return _single(cands[:1])
        if distributed() and not _state["local_tuning"]:
            _warn_once("distributed",
                       "torch.distributed without a tuning record: autotuned kernels run their default candidate "
                       "(untimed) so that every rank runs the same kernels; set FASTVIT_TUNING to a record from "
                       "python -m fastvit_kernels.tune, or tune inside fastvit_kernels.tuning.autotuning()")
            return _single(cands[:1])
        return _single(cands)

    early_config_prune.kernel = kernel
    early_config_prune.candidates = prune
    return early_config_prune


def bench(kernel_call, quantiles):
    """The autotuners' ``do_bench``: ``triton.testing.do_bench`` (the CUDA driver's own benchmarker), except right
    after a pruning that left one candidate, where there is nothing to choose and nothing is run or timed (the
    autotuner launches the one candidate afterwards)."""
    if getattr(_tls, "single", False):
        return [0.0] * len(quantiles)
    import triton.testing

    return triton.testing.do_bench(kernel_call, quantiles=quantiles)
