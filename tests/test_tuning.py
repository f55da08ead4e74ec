"""Tuning records (fastvit_kernels/tuning.py, kernels/tuning_record.py): a record applies untimed, a record from
another GPU / Triton is ignored with a warning, and under torch.distributed every rank ends with rank 0's decisions
when the ranks' timers disagree. The GPU is simulated: the autotuned GEMM kernel runs under the interpreter with
autotuning switched on, the GEMM path rule is told it may time, and every timer is a stub."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch


@pytest.fixture
def tuning(monkeypatch):
    """The tuning API with no record active, the GEMM kernel autotuned as on a GPU, and the GEMM path rule free to
    time (the stubs decide what it would measure)."""
    from fastvit_kernels import tuning
    from fastvit_kernels.kernels import gemm_configs, gemm_impl

    tuning.use_tuning_record(None)
    monkeypatch.setattr(gemm_configs, "autotune_enabled", lambda: True)
    monkeypatch.setattr(gemm_impl, "_can_measure", lambda device: True)
    yield tuning
    tuning.use_tuning_record(None)


def _no_timing(monkeypatch):
    """Make every timer raise: the tile benchmark (triton.testing.do_bench) and the GEMM path timer."""
    import triton.testing

    from fastvit_kernels.kernels import gemm_impl

    def boom(*args, **kwargs):
        raise AssertionError("something was timed")

    monkeypatch.setattr(triton.testing, "do_bench", boom)
    monkeypatch.setattr(gemm_impl, "_time_ms", boom)


def _linear(M: int):
    """An fp16 GEMM + bias of M rows (3 tile candidates in fp16), checked against fp32 math."""
    from fastvit_kernels.kernels.matmul import linear

    g = torch.Generator().manual_seed(M)
    x, w, b = (torch.randn(*s, generator=g).half() for s in ((M, 16), (24, 16), (24,)))
    torch.testing.assert_close(linear(x, w, b).float(), x.float() @ w.float().t() + b.float(), atol=2e-2, rtol=2e-2)


def _cfg_id(c):
    return tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages


def test_record_applies_untimed(tuning, monkeypatch, tmp_path):
    """With a record, nothing is timed and the recorded tile configuration (a non-default candidate) and GEMM path
    (cuBLAS) are what runs; a key the record lacks runs the default candidate, untimed, with a warning. The record
    goes through its JSON file, so the autotuner's own cache key and the record's look-up key must agree."""
    from fastvit_kernels.kernels import gemm_configs, gemm_impl, matmul, tuning_record

    _no_timing(monkeypatch)
    gpu, version = tuning_record.environment()
    tuning.use_tuning_record(tuning.TuningRecord(gpu, version, {}))
    with pytest.warns(UserWarning, match="has no entry for matmul._matmul_kernel"):
        _linear(20)
        _linear(100)
    default, last = gemm_configs.gemm_configs(torch.float16)[0], gemm_configs.gemm_configs(torch.float16)[-1]
    assert _cfg_id(matmul._matmul_autotuned.best_config) == _cfg_id(default)
    learned = tuning.snapshot()
    tiles = [k for k in learned.entries if k[0] == "matmul._matmul_kernel"]
    impls = sorted((k for k in learned.entries if k[0] == "gemm_impl"), key=lambda k: k[1][2])
    assert len(tiles) == 2 and len(impls) == 2
    for k in tiles:
        learned.entries[k] = {"config": tuning_record.config_entry(last)}
    learned.entries[impls[1]] = {"impl": "cublas"}  # M = 100
    path = str(tmp_path / "tuning.json")
    tuning.save(learned, path)

    assert tuning.use_tuning_record(path).path == path
    _linear(20)
    assert _cfg_id(matmul._matmul_autotuned.best_config) == _cfg_id(last)
    _linear(100)
    decisions = gemm_impl.decisions()
    assert decisions[impls[0][1]] == gemm_impl.Decision("triton", "record")
    assert decisions[impls[1][1]] == gemm_impl.Decision("cublas", "record")
    assert tuning.status() == {"path": path, "entries": 4, "gpu": gpu, "triton": version, "matching": True,
                               "error": None}


@pytest.mark.parametrize("field", ["gpu", "triton"])
def test_record_from_elsewhere_is_ignored(tuning, monkeypatch, field):
    """A record made on another GPU name or Triton version is not applied: a warning says so, and the key is decided
    as without a record (tiles timed in this single process, the fused core for the GEMM path)."""
    import triton.testing

    from fastvit_kernels.kernels import gemm_configs, gemm_impl, matmul, tuning_record

    calls = []

    def fake_bench(kernel_call, quantiles=None, **kwargs):  # the first candidate timed is the fastest
        calls.append(kernel_call)
        return [float(len(calls))] * len(quantiles)

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    gpu, version = tuning_record.environment()
    tuning.use_tuning_record(None)
    _linear(20)  # learn the keys
    record = tuning.snapshot()
    last = gemm_configs.gemm_configs(torch.float16)[-1]
    for k in record.entries:
        record.entries[k] = ({"impl": "cublas"} if k[0] == "gemm_impl"
                             else {"config": tuning_record.config_entry(last)})
    setattr(record, field, "NVIDIA H100 80GB HBM3" if field == "gpu" else "0.0.1")
    calls.clear()
    tuning.use_tuning_record(record)
    with pytest.warns(UserWarning, match="was made on .*: ignored"):
        _linear(20)
    assert len(calls) == len(gemm_configs.gemm_configs(torch.float16))  # timed here, as without a record
    assert _cfg_id(matmul._matmul_autotuned.best_config) == _cfg_id(gemm_configs.gemm_configs(torch.float16)[0])
    assert {d.impl for d in gemm_impl.decisions().values()} == {"triton"}
    assert tuning.status()["matching"] is False


def test_record_file_validation_and_env(tmp_path):
    """FASTVIT_TUNING names the file (read lazily, in a fresh process); bad files raise naming what is wrong."""
    from fastvit_kernels import tuning
    from fastvit_kernels.kernels import tuning_record

    key = ("cpu", "float16", 32, 24, 16, "bias")
    rec = tuning.TuningRecord("cpu", "3.9.0", {("gemm_impl", key): {"impl": "cublas"}})
    path = tmp_path / "t.json"
    tuning.save(rec, str(path))
    assert tuning_record.load(str(path)).entries == rec.entries
    code = "import json, fastvit_kernels.tuning as t; print(json.dumps(t.status()))"
    res = subprocess.run([sys.executable, "-c", code], env={**os.environ, "FASTVIT_TUNING": str(path)},
                         capture_output=True, text=True, timeout=120)
    status = json.loads(res.stdout)
    assert (status["path"], status["entries"], status["gpu"], status["triton"]) == (str(path), 1, "cpu", "3.9.0")
    data = json.loads(path.read_text())
    data["entries"][0]["impl"] = "cudnn"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"entries\[0\]\['impl'\] must be 'triton' or 'cublas'; got 'cudnn'"):
        tuning_record.load(str(path))
    path.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="format must be 'fastvit_kernels.tuning/1'; got 'other'"):
        tuning.use_tuning_record(str(path))
    with pytest.raises(TypeError, match="record must be a TuningRecord, a path or None; got int"):
        tuning.use_tuning_record(3)


def test_every_autotuned_kernel_consults_the_record():
    """Each triton.autotune of the package prunes through the record (so a record covers it) and keeps its full
    candidate filter reachable for the AOT check."""
    from triton.runtime.autotuner import Autotuner

    from fastvit_kernels import tuning
    from fastvit_kernels.kernels import matmul, matmul_tma

    found = tuning._autotuners()
    for mod in (matmul, matmul_tma):
        for name, obj in vars(mod).items():
            if isinstance(obj, Autotuner):
                # recorded under the module and the kernel's own name (the autotuner may be bound to another)
                assert found[f"{mod.__name__.rsplit('.', 1)[1]}.{obj.fn.__name__}"] is obj, name
    assert found["matmul._matmul_kernel"].early_config_prune.candidates is matmul._prune_plain


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_tune_cli_refuses_without_a_gpu(tmp_path, capsys):
    from fastvit_kernels.tune import main

    out = tmp_path / "t.json"
    assert main(["--out", str(out)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err and not out.exists()


_WORKER = textwrap.dedent('''
    import json, sys
    import torch, torch.distributed as dist, triton.testing
    from fastvit_kernels import tuning
    from fastvit_kernels.backend import use_gemm_impl
    from fastvit_kernels.kernels import gemm_configs, gemm_impl, matmul

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    timed = {"tiles": 0, "impl": 0}

    def do_bench(kernel_call, quantiles=None, **kwargs):
        # the ranks' timers disagree: rank 0 finds later candidates faster, rank 1 earlier ones
        timed["tiles"] += 1
        return [float(-timed["tiles"] if rank == 0 else timed["tiles"])] * len(quantiles)

    def time_ms(fn):  # called for triton, then cublas: rank 0 finds cuBLAS faster, rank 1 the fused core
        timed["impl"] += 1
        return float(timed["impl"] % 2 == (1 if rank == 0 else 0))

    triton.testing.do_bench = do_bench
    gemm_impl._time_ms = time_ms
    gemm_impl._can_measure = lambda device: True
    gemm_configs.autotune_enabled = lambda: True

    def launch(M):
        g = torch.Generator().manual_seed(M)
        x, w, b = (torch.randn(*s, generator=g).half() for s in ((M, 16), (24, 16), (24,)))
        y = matmul.linear(x, w, b).float()
        torch.testing.assert_close(y, x.float() @ w.float().t() + b.float(), atol=2e-2, rtol=2e-2)

    def state():
        tiles = {repr(k): [sorted(c.kwargs.items()), c.num_warps, c.num_stages]
                 for k, c in matmul._matmul_autotuned.cache.items()}
        return {"tiles": tiles, "impl": {repr(k): d.impl for k, d in gemm_impl.decisions().items()},
                "timed": dict(timed)}

    out = {}
    launch(20)  # no record, distributed: the defaults, untimed
    out["untuned"] = state()
    with tuning.autotuning():  # every rank times locally; rank 0's decisions are shared on exit
        with use_gemm_impl("triton"):
            launch(40)
        with use_gemm_impl("measure"):
            launch(100)
        out["local"] = state()
    timed.update(tiles=0, impl=0)
    for M in (20, 40, 100):
        launch(M)
    out["final"] = state()
    with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()
''')


def test_two_ranks_with_disagreeing_timers_end_identical(tmp_path):
    """2 processes, gloo: without a record nothing is timed and both ranks run the defaults; inside
    tuning.autotuning() each rank's stubbed timers pick differently (tiles and GEMM path); after it (sync) both run
    rank 0's choices for every key, with nothing timed."""
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for r in (r0, r1):
        assert r["untuned"]["timed"] == {"tiles": 0, "impl": 0}
        assert r["final"]["timed"] == {"tiles": 0, "impl": 0}
    assert r0["untuned"]["tiles"] == r1["untuned"]["tiles"] and r0["untuned"]["impl"] == r1["untuned"]["impl"]
    assert set(r0["untuned"]["impl"].values()) == {"triton"}
    # the timers disagreed: the ranks decided differently on their own (tiles at M = 40, GEMM path at M = 100)
    assert r0["local"]["tiles"] != r1["local"]["tiles"] and r0["local"]["impl"] != r1["local"]["impl"]
    assert "cublas" in r0["local"]["impl"].values() and "cublas" not in r1["local"]["impl"].values()
    # after sync both run rank 0's decisions
    assert r0["final"]["tiles"] == r1["final"]["tiles"] and r0["final"]["impl"] == r1["final"]["impl"]
    for kind in ("tiles", "impl"):
        for key, choice in r0["local"][kind].items():
            assert r0["final"][kind][key] == r1["final"][kind][key] == choice, (kind, key)
