"""The launch-plan recorder (fastvit_kernels/aot/plans.py) on ATen calls alone, in process (no _C, no cubin table):
what it records, the Tensor forms it records for Scalar arguments, and what it refuses. The replay of recorded plans
by _C is tested in tests/csrc/test_plans.py."""

from __future__ import annotations

import pytest
import torch

from fastvit_kernels.aot import plans


def _tape(fn, *inputs):
    """Run ``fn(*inputs)`` under a tape whose arguments are ``inputs``; returns (tape, result)."""
    tape = plans._Tape(None, 80, list(inputs))
    with tape:
        out = fn(*inputs)
    return tape, out


def _scalars(steps) -> list:
    """Any recorded argument that is a number where a plan needs a tensor: there must be none."""
    return [a for s in steps if "aten" in s for a in s["args"] if isinstance(a, (int, float))]


@pytest.mark.parametrize("name, fn", [
    ("arange", lambda x: torch.arange(x.shape[0]) + x),
    ("arange(start, end, step)", lambda x: torch.arange(2, 11, 3) * x[:3]),
    ("add int / sub alpha", lambda x: (x + 5) - x * 2),
    ("where Scalars", lambda x: torch.where(x >= 2, 1, 0)),
    ("where ScalarOther", lambda x: torch.where(x > 1, x, 7)),
    ("clamp", lambda x: (x - 3).clamp(min=0, max=2)),
])
def test_scalar_arguments_take_an_exact_tensor_form(name, fn):
    x = torch.tensor([3, 1, 4, 1, 5], dtype=torch.int32)
    tape, out = _tape(fn, x)
    assert tape.why is None, tape.why
    assert torch.equal(out, fn(x))
    assert any("const" in s for s in tape.steps) or name == "arange"
    assert _scalars(tape.steps) == []
    # every step's Scalar-typed argument slot is gone: only Tensor overloads and Scalar-free ops are recorded
    ops = {f"{s['aten']}.{s['overload']}" for s in tape.steps if "aten" in s}
    assert not ops & {"aten::add.Tensor", "aten::sub.Tensor", "aten::ge.Scalar", "aten::where.Scalar",
                      "aten::clamp.", "aten::arange.", "aten::arange.start_step"}, ops
    assert tape.ids[id(out)] < len(tape.slots)  # the result is a slot the plan can return


@pytest.mark.parametrize("fn, why", [
    (lambda x: x * 0.5, "only int and bool Scalars"),
    (lambda x: x.new_empty(int(x.sum().item())), "returns"),
    (lambda x: x[x.bool()], "shape depends on tensor values"),
    (lambda x: torch.nonzero(x), "shape depends on tensor values"),
    (lambda x: x + _CACHED, "neither an argument of the op nor made by an ATen call"),
])
def test_what_a_plan_cannot_hold_is_refused_with_the_reason(fn, why):
    x = torch.rand(4)
    tape, _ = _tape(fn, x)
    assert tape.why is not None and why in tape.why, tape.why


_CACHED = torch.ones(4)


def test_call_key_encodes_every_argument_kind():
    class Arg:  # call_key reads each schema argument's type and name
        def __init__(self, kind, name="a"):
            self.type, self.name = kind, name

    class Schema:
        arguments = [Arg("Tensor"), Arg("Optional[Tensor]"), Arg("SymInt"), Arg("bool"), Arg("List[bool]"),
                     Arg("float"), Arg("str")]

    t = torch.zeros(9, dtype=torch.float16)[1:].view(2, 4)  # not 16-byte aligned
    key = plans.call_key("fastvit::x", 90, Schema, [t, None, 3, True, [True, False], 0.5, "tanh"])
    assert key == "fastvit::x@90;Tf16[2,4][4,1]a0;N;I3;B1;L1,0;F3fe0000000000000;Stanh"
    with pytest.raises(TypeError, match="plan keys do not encode"):
        plans.call_key("fastvit::x", 90, type("S", (), {"arguments": [Arg("Scalar")]}), [1])
