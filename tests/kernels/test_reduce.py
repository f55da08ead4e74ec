"""Column sums (kernels/reduce.py): the converted copy written by the same launch, and ``column_sum_tail`` (sum of
the rows after a head, head rows converted) bit-identical to ``column_sum`` of the tail rows."""

import pytest
import torch

from helpers import count_launches


@pytest.mark.parametrize("split", [None, 70])
@pytest.mark.parametrize("copy_from", [0, 37])
@pytest.mark.parametrize("M", [1, 5, 130])  # 130: more rows than one 64-row block
def test_column_sum_copy(M, copy_from, split, device, monkeypatch):
    from fastvit_kernels.kernels.reduce import column_sum

    x = torch.randn(M, 150, device=device)
    plain = column_sum(x, torch.float32, split=split)
    with count_launches(monkeypatch) as launches:
        sums, copy = column_sum(x, torch.float32, split=split, copy_dtype=torch.float16, copy_from=copy_from)
    assert launches == {"_column_sum_kernel": 1}
    plain, sums = (torch.cat(t) if split else t for t in (plain, sums))
    assert torch.equal(sums, plain)
    assert copy.dtype == torch.float16 and torch.equal(copy, plain[copy_from:].half())
    torch.testing.assert_close(plain.double(), x.double().sum(0), atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,head,head_split", [(1, 0, None), (9, 0, 0), (9, 3, 1), (9, 3, 0), (9, 3, 3),
                                               (80, 5, 1)])
def test_column_sum_tail(M, head, head_split, dtype, device, monkeypatch):
    from fastvit_kernels.kernels.reduce import column_sum, column_sum_tail

    x = torch.randn(M, 40, device=device)
    with count_launches(monkeypatch) as launches:
        total, first, second = column_sum_tail(x, head, dtype, head_split=head_split)
    assert launches == {"_column_sum_tail_kernel": 1}
    split = head if head_split is None else head_split
    assert torch.equal(total, column_sum(x[head:], dtype))
    assert first.shape == (split, 40) and second.shape == (head - split, 40)
    assert torch.equal(first, x[:split].to(dtype)) and torch.equal(second, x[split:head].to(dtype))
