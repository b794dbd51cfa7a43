"""One row times a table's row blocks on PyTorch CPU: both sides of
`torch.bmm` give `x @ table.T`, and the side is measured once."""

import keras
import numpy as np
import pytest

from keras_paligemma.layers import row_product
from keras_paligemma.layers.threaded_matmul import threaded_matmul

pytestmark = pytest.mark.skipif(
    keras.config.backend() != "torch",
    reason="the side of `torch.bmm` is a PyTorch CPU choice",
)

RNG = np.random.default_rng(0)


@pytest.fixture
def left_operands(monkeypatch):
    """The first operand of each `torch.bmm`: "table" or "rows"."""
    import torch

    seen = []
    real_bmm = torch.bmm

    def recording_bmm(a, b):
        seen.append("table" if a.numel() >= b.numel() else "rows")
        return real_bmm(a, b)

    monkeypatch.setattr(torch, "bmm", recording_bmm)
    return seen


@pytest.mark.parametrize("table_on_left", [True, False])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_either_side_equals_the_product(
    table_on_left, rows, dtype, monkeypatch, left_operands
):
    import torch

    monkeypatch.setattr(row_product, "table_on_left", lambda *_: table_on_left)
    table = RNG.normal(size=(40, 12)).astype("float32")
    flat = RNG.normal(size=(rows, 12)).astype("float32")
    torch_dtype = getattr(torch, dtype)
    table_t = torch.tensor(table).to(torch_dtype)
    flat_t = torch.tensor(flat).to(torch_dtype)
    with torch.no_grad():
        out = row_product.table_rows_product(flat_t, table_t.reshape(2, 20, 12))
    assert tuple(out.shape) == (rows, 40)
    expected = flat_t.float().numpy() @ table_t.float().numpy().T
    tolerance = 1e-5 if dtype == "float32" else 5e-2
    np.testing.assert_allclose(
        out.float().numpy(), expected, rtol=tolerance, atol=tolerance
    )
    # Only one row takes the measured side.
    assert left_operands == ["table" if table_on_left and rows == 1 else "rows"]


@pytest.mark.parametrize("table_on_left", [True, False])
def test_a_decode_step_product_takes_the_measured_side(
    table_on_left, monkeypatch, left_operands
):
    """One row against an output-first kernel, as in every decode step."""
    import torch

    monkeypatch.setattr(row_product, "table_on_left", lambda *_: table_on_left)
    kernel = RNG.normal(size=(40, 12)).astype("float32")
    x = RNG.normal(size=(1, 1, 12)).astype("float32")
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            out = threaded_matmul(
                torch.tensor(x), torch.tensor(kernel), transposed=True
            )
    finally:
        torch.set_num_threads(previous)
    np.testing.assert_allclose(out.numpy(), x @ kernel.T, atol=1e-5)
    assert left_operands == ["table" if table_on_left else "rows"]


def test_the_side_is_measured_once_per_shape_on_constant_operands(
    monkeypatch,
):
    import torch

    timed = []

    def fake_faster(first, second, margin):
        timed.append((first(), second(), margin))
        return True

    monkeypatch.setattr(row_product, "faster", fake_faster)
    monkeypatch.setattr(row_product, "MEASURED_BYTES", 4 * 2 * 64 * 16)
    row_product.table_on_left.cache_clear()
    try:
        state = torch.random.get_rng_state()
        for _ in range(3):
            assert row_product.table_on_left(2, 16, torch.float32)
        assert row_product.table_on_left(2, 32, torch.float32)
        assert torch.equal(torch.random.get_rng_state(), state)
    finally:
        row_product.table_on_left.cache_clear()
    # One measurement per shape, then cached; each times both sides on a
    # table of MEASURED_BYTES, which give the same product.
    assert [tuple(first.shape) for first, _, _ in timed] == [(1, 128), (1, 64)]
    for first, second, margin in timed:
        assert torch.equal(first, second)
        assert margin == row_product.MARGIN > 1
