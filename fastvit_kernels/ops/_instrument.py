"""The ops' instrumentation hook: which public op (or which part of a fused op) is running, for an observer such as
the training-step profiler (:mod:`fastvit_kernels.bench.profile`).

Every public op of :mod:`fastvit_kernels.ops` runs its whole call inside :func:`op_scope` of its own name (the
:func:`instrumented` decorator), whatever the backend. A fused op also reports each of its phases as the public op
that phase computes: :func:`~fastvit_kernels.ops.attention_block` enters ``op_scope("layernorm_linear")``,
``op_scope("attention")`` and ``op_scope("linear_residual")`` around norm1 + qkv, the attention and proj +
residual, in its forward and (reverse order) its backward; on the Triton path those scopes open inside the
``fastvit::attention_block_*`` custom ops' implementations, where a ``TorchDispatchMode`` sees no ops. An observer
can so attribute the work of a fused op per op without the package replacing anything (docs/design.md,
"Instrumentation and launch recording").

Cost without an observer: one module-global read and a branch per op call (and per phase). The observer is
process-wide (not per thread), like the profiler's other modes.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, ContextManager, Iterator

# the active observer, or None: scopes are no-ops
_observer: Callable[[str], ContextManager] | None = None
_NO_SCOPE = contextlib.nullcontext()  # stateless, so one instance serves every call


def op_scope(name: str) -> ContextManager:
    """The context manager an op (or a fused op's phase) runs inside: the active observer's ``observer(name)``, or a
    no-op one when nothing observes.

    Args:
        name: the public op's name as exported by :mod:`fastvit_kernels.ops` (``"attention"``,
            ``"layernorm_linear"``, ...); a fused op's phase is named by the public op it computes.

    Returns:
        a context manager; enter it for the op's duration.
    """
    observer = _observer
    return _NO_SCOPE if observer is None else observer(name)


def instrumented(name: str) -> Callable:
    """Decorator for a public op: its every call runs inside :func:`op_scope` ``(name)``; the signature and
    docstring are kept (``functools.wraps``). Without an observer the call costs one global check more.

    Args:
        name: the op's public name.

    Returns:
        the decorator.
    """

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def op(*args, **kwargs):
            observer = _observer
            if observer is None:
                return fn(*args, **kwargs)
            with observer(name):
                return fn(*args, **kwargs)

        return op

    return decorate


@contextlib.contextmanager
def observing(observer: Callable[[str], ContextManager]) -> Iterator[Callable]:
    """Context manager: inside it, :func:`op_scope` ``(name)`` returns ``observer(name)``, which the op enters for its
    duration (a public op for its whole call, a fused op's phase for that phase; they nest: a phase's scope opens
    inside its op's). Nests: an inner ``observing`` replaces the outer observer for its block; the outer one is
    restored on exit (also after an error).

    Args:
        observer: ``observer(name) -> context manager``; called when an op or phase starts; the context manager's
            exit marks its end (an exception inside the op passes through it).

    Yields:
        ``observer``.

    Raises:
        TypeError: ``observer`` is not callable.
    """
    global _observer
    if not callable(observer):
        raise TypeError(f"observer must be callable; got {type(observer).__name__}")
    outer = _observer
    _observer = observer
    try:
        yield observer
    finally:
        _observer = outer
