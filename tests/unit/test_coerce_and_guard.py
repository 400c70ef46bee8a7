"""The 64-bit policy pieces on their own: batch narrowing and the guard."""

from __future__ import annotations

import pytest
import torch

from glmport.coerce import coerce_batch
from glmport.errors import SixtyFourBitError
from glmport.guard import sixty_four_bit_guard

NARROW = {torch.int64: torch.int32, torch.float64: torch.float32}


def test_coerce_keeps_values_and_structure():
    batch = {"ids": torch.tensor([[5, -7]]), "rows": [(torch.tensor([1.5], dtype=torch.float64), "x")]}
    out = coerce_batch(batch, NARROW)
    assert out["ids"].dtype == torch.int32 and out["ids"].tolist() == [[5, -7]]
    assert out["rows"][0][0].dtype == torch.float32 and out["rows"][0][1] == "x"


def test_coerce_refuses_float_overflow():
    with pytest.raises(SixtyFourBitError, match=r"batch\['scale'\]: value 1e\+300 does not fit"):
        coerce_batch({"scale": torch.tensor([1.0, 1e300], dtype=torch.float64)}, NARROW)


def test_coerce_keeps_batch_encoding_type():
    from transformers import BatchEncoding

    out = coerce_batch(BatchEncoding({"input_ids": torch.tensor([1])}), NARROW)
    assert isinstance(out, BatchEncoding) and out["input_ids"].dtype == torch.int32


def test_guard_names_op_dtype_and_call_site():
    ids = torch.arange(4)  # int64: creating it is fine, computing with it is not
    with pytest.raises(SixtyFourBitError) as caught, sixty_four_bit_guard(NARROW, label="test"):
        ids * 2
    message = str(caught.value)
    assert "aten.mul.Tensor got a int64 tensor of shape [4]" in message
    assert "test_coerce_and_guard.py" in message and "ids * 2" in message


def test_guard_allows_views_metadata_and_explicit_narrowing():
    ids = torch.arange(6)
    with sixty_four_bit_guard(NARROW) as report:
        narrowed = ids.view(2, 3).t().to(torch.int32)
        total = (narrowed + 1).sum(dtype=torch.int32)
    assert report.clean and report.ops_checked > 0 and int(total) == 21


def test_guard_checks_backward_ops_too():
    weight = torch.randn(3, requires_grad=True)
    scale = torch.ones(3, dtype=torch.float64)
    out = (weight.double() * scale).sum()  # built outside the guard
    with pytest.raises(SixtyFourBitError, match="float64"), sixty_four_bit_guard(NARROW):
        out.backward()


def test_report_mode_lists_each_leak_once():
    ids = torch.arange(4)
    with sixty_four_bit_guard(NARROW, mode="report") as report:
        for _ in range(3):
            ids + 1
        ids.float() * torch.ones(4, dtype=torch.float64)
    ops = [leak.op for leak in report.leaks]
    assert ops.count("aten.add.Tensor") == 1 and "aten.mul.Tensor" in ops


def test_coerce_narrows_complex_and_refuses_overflow():
    narrow = {torch.complex128: torch.complex64}
    out = coerce_batch({"z": torch.tensor([1 + 2j], dtype=torch.complex128)}, narrow)
    assert out["z"].dtype == torch.complex64 and out["z"].tolist() == [1 + 2j]
    with pytest.raises(SixtyFourBitError, match="does not fit in torch.complex64"):
        coerce_batch({"z": torch.tensor([1e300 + 0j], dtype=torch.complex128)}, narrow)
