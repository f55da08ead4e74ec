"""Every Triton launch runs under the device guard of its tensors' device (fastvit_kernels/_device.py).

A test-local wrapper around every Triton kernel launch (``JITFunction.run`` compiled, ``InterpretedFunction.run``
under the interpreter; autotuned kernels end in one of them) checks that a guard is active, that it is for the
device of every tensor the launch is given, and, on CUDA, that this device is the current one. It runs the
forward and backward of every public op and a FastViT training step.

What the CPU cannot cover: the interpreter has one device, so there the check is that every launch happens inside
the guard (and for the CPU device); that ``torch.cuda.device`` is entered for a CUDA tensor is checked with
``torch.cuda.device`` stubbed. With two or more GPUs the ops run on the last one while device 0 is current, and
the wrapper checks the current device at each launch.
"""

from __future__ import annotations

import ast
import contextlib
import pathlib
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import fastvit_kernels
from fastvit_kernels import _device, ops

_OPS_DIR = pathlib.Path(fastvit_kernels.__file__).parent / "ops"


def _launch_device() -> str:
    """The device the guarded launches are checked on: the last GPU when there are two or more (device 0 stays
    current, so an unguarded launch lands on the wrong device), else the tests' device."""
    if torch.cuda.device_count() >= 2:
        return f"cuda:{torch.cuda.device_count() - 1}"
    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def checked_launches():
    """Wrap every Triton launch; yields (launches, violations): the kernel names launched, and one message for each
    launch attempted outside the guard, under a guard for another device, or (CUDA) with another device current.
    Such a launch raises AssertionError instead of running (on a GPU it would fault or race)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    launches, violations = [], []

    def checking(real):
        def run(self, *args, **kwargs):
            if not kwargs.get("warmup"):
                name = self.fn.__name__
                launches.append(name)
                guard = _device.guarded_device()
                # tensors, and the tensors under TMA descriptors (``.base``) on Hopper
                values = [a if isinstance(a, torch.Tensor) else getattr(a, "base", None)
                          for a in (*args, *kwargs.values())]
                devices = {t.device for t in values if isinstance(t, torch.Tensor)}
                problem = None
                if guard is None:
                    problem = f"{name}: launched outside the device guard (tensors on {devices})"
                elif devices and devices != {guard}:
                    problem = f"{name}: guard for {guard}, tensors on {devices}"
                elif guard.type == "cuda" and torch.cuda.current_device() != guard.index:
                    problem = f"{name}: guard for {guard}, current device {torch.cuda.current_device()}"
                if problem is not None:
                    violations.append(problem)
                    raise AssertionError(problem)
            return real(self, *args, **kwargs)
        return run

    with mock.patch.object(InterpretedFunction, "run", checking(InterpretedFunction.run)), \
            mock.patch.object(JITFunction, "run", checking(JITFunction.run)):
        yield launches, violations


def _fwd_bwd(fn, *inputs, **kwargs):
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves, backend="triton", **kwargs)
    out.backward(torch.randn_like(out))
    return out


def _block(B, N, D, device):
    return [torch.randn(B, N, D, device=device), 1 + 0.1 * torch.randn(D, device=device),
            0.1 * torch.randn(D, device=device)]


def _case(name: str, device: str):
    """(op, inputs, kwargs) of a small forward + backward of public op ``name`` on ``device``."""
    B, N, D, H = 2, 5, 32, 2

    def w(*shape):
        return torch.randn(*shape, device=device) / shape[-1] ** 0.5

    def b(n):
        return 0.1 * torch.randn(n, device=device)

    x, nw, nb = _block(B, N, D, device)
    return {
        "patch_embed": (ops.patch_embed, [torch.randn(B, 3, 8, 8, device=device), w(D, 3, 4, 4), b(D),
                                          0.5 * torch.randn(1, 5, D, device=device),
                                          torch.randn(1, 1, D, device=device)], {}),
        "patch_embed_tokens": (ops.patch_embed_tokens, [torch.randn(B, N, 12, device=device), w(D, 12), b(D),
                                                        torch.randn(7, D, device=device)],
                               dict(pos_index=torch.arange(B * N, device=device).view(B, N) % 7,
                                    ids_keep=torch.tensor([[3, 1], [0, 4]], device=device),
                                    mask=torch.tensor([[True, False], [False, False]], device=device),
                                    mask_token=torch.randn(D, device=device),
                                    prefix=torch.randn(2, D, device=device))),
        "layernorm_linear": (ops.layernorm_linear, [x, nw, nb, w(3 * D, D), b(3 * D)], {}),
        "linear_residual": (ops.linear_residual, [x, w(D, D), b(D), torch.randn(B, N, D, device=device)], {}),
        "attention": (ops.attention, [torch.randn(B, N, 3 * D, device=device)], dict(num_heads=H)),
        "attention_block": (ops.attention_block, [x, nw, nb, w(3 * D, D), b(3 * D), w(D, D), b(D)],
                            dict(num_heads=H)),
        "layernorm_mlp": (ops.layernorm_mlp, [x, nw, nb, w(4 * D, D), b(4 * D), w(D, 4 * D), b(D)], {}),
        "swiglu_mlp": (ops.swiglu_mlp, [x, nw, nb, w(2 * D, D), b(2 * D), w(2 * D, D), b(2 * D), w(D, 2 * D), b(D)],
                       {}),
    }[name]


# the public differentiable ops; ops.__all__ also exports the FLOP-formula helpers, which launch nothing
OP_NAMES = ("attention", "attention_block", "layernorm_linear", "layernorm_mlp", "linear_residual", "patch_embed",
            "patch_embed_tokens", "swiglu_mlp")


def test_every_public_op_is_covered():
    assert set(ops.__all__) - {"flop_formulas", "register_flop_formulas"} == set(OP_NAMES)


@pytest.mark.parametrize("name", OP_NAMES)
def test_every_launch_of_each_op_runs_under_its_device_guard(name):
    device = _launch_device()
    fn, inputs, kwargs = _case(name, device)
    with checked_launches() as (launches, violations):
        _fwd_bwd(fn, *inputs, **kwargs)
    assert launches, f"{name}: no Triton launch seen (is the Triton path running?)"
    assert not violations, "\n".join(violations)
    assert _device.guarded_device() is None  # the guard is left on return


def test_training_step_launches_run_under_the_device_guard():
    from fastvit_kernels import create_model

    device = _launch_device()
    model = create_model("vit_micro_patch4_32", depth=1, img_size=16, backend="triton").to(device)
    images, labels = torch.randn(2, 3, 16, 16, device=device), torch.tensor([1, 7], device=device)
    with checked_launches() as (launches, violations):
        F.cross_entropy(model(images), labels).backward()
    assert {"_layernorm_bwd_kernel", "_attention_fwd_kernel"} <= set(launches), launches
    assert not violations, "\n".join(violations)


def test_the_check_fails_on_an_unguarded_launch():
    """The wrapper is not vacuous: a kernel launched without the guard, or under a guard for another device, is
    reported."""
    from fastvit_kernels.kernels.layernorm import row_stats

    device = _launch_device()
    x = torch.randn(4, 32, device=device)
    with checked_launches() as (launches, violations):
        with pytest.raises(AssertionError, match="outside the device guard"):
            row_stats(x, 1e-6)
        with pytest.raises(AssertionError, match="guard for meta"), _device.on_device(torch.device("meta")):
            row_stats(x, 1e-6)
        with _device.on_device(x):
            row_stats(x, 1e-6)
    assert launches == ["_layernorm_stats_kernel"] * 3 and len(violations) == 2, violations


def test_on_device_enters_the_cuda_device_and_records_the_guard():
    """The CUDA branch with ``torch.cuda.device`` stubbed (no GPU needed): a CUDA device is entered and restored;
    the guard's device is recorded on every device type and reset on exit, also after an error."""
    entered = []

    @contextlib.contextmanager
    def fake_cuda_device(d):
        entered.append(("enter", d))
        yield
        entered.append(("exit", d))

    with mock.patch.object(torch.cuda, "device", fake_cuda_device):
        with _device.on_device(torch.device("cuda", 1)) as d:
            assert d == torch.device("cuda", 1) == _device.guarded_device()
            assert entered == [("enter", torch.device("cuda", 1))]
        assert entered[-1] == ("exit", torch.device("cuda", 1)) and _device.guarded_device() is None
        with _device.on_device(torch.zeros(1)):
            assert _device.guarded_device() == torch.device("cpu")
        assert len(entered) == 2  # nothing to switch for the CPU
    with pytest.raises(RuntimeError, match="boom"), _device.on_device(torch.zeros(1)):
        raise RuntimeError("boom")
    assert _device.guarded_device() is None
    with pytest.raises(ValueError, match="index"):
        with _device.on_device(torch.device("cuda")):
            pass
    with pytest.raises(TypeError, match="where"):
        with _device.on_device("cuda:0"):
            pass


def test_decorator_takes_the_first_tensor_argument():
    seen = []
    guarded = _device.launches_on_input_device(lambda n, t, u=None: seen.append(_device.guarded_device()))
    guarded(3, torch.zeros(1))
    guarded(3, None, u=torch.zeros(1))
    assert seen == [torch.device("cpu")] * 2
    with pytest.raises(TypeError, match="no tensor argument"):
        guarded(3, None)


def test_every_custom_op_implementation_is_guarded():
    """Static check over ops/*.py: each ``@fastvit_op`` function (the Triton implementations; a custom op, or the
    Python kernels attached to the C++ library's definition) is also decorated with ``launches_on_input_device``,
    below the fastvit_op decorator (so the op's kernel is the guarded function)."""
    found, unguarded = 0, []
    for path in sorted(_OPS_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef):
                continue
            names = [ast.unparse(d.func if isinstance(d, ast.Call) else d) for d in node.decorator_list]
            if "fastvit_op" not in names:
                continue
            found += 1
            i = names.index("fastvit_op")
            if "launches_on_input_device" not in names[i + 1:]:
                unguarded.append(f"{path.name}:{node.lineno} {node.name}")
    # forward and backward of the eight ops, of layernorm_linear with RoPE and of attention's varlen / masked forms
    assert found == 22, found
    assert not unguarded, f"custom ops without the device guard: {unguarded}"
