"""oneDNN's linear product on PyTorch CPU, and when to take it.

`threaded_matmul` multiplies two or more float32 rows outside autograd
with oneDNN's `linear` (`torch.ops.mkldnn._linear_pointwise`, the kernel
PyTorch's own compiler emits for linear layers; it reads the weights in
place), or with MKL's (`torch.matmul`) for a kernel (`(K, N)`, or an
output-first `(N, K)` one) where MKL measured faster once in the process
(`beats_mkl`).

Example:

>>> import torch
>>> x, kernel = torch.ones(2, 3), torch.ones(3, 4)
>>> product = linear()
>>> product is None or bool(torch.equal(product(x, kernel), x @ kernel))
True
"""

import functools
import math


@functools.cache
def linear():
    """oneDNN's `linear(x, weight)` for float32 CPU tensors, or None where
    this PyTorch build lacks it or it disagrees with `torch.matmul`."""
    import torch

    try:
        pointwise = torch.ops.mkldnn._linear_pointwise
        x = torch.linspace(-1, 1, 6).reshape(2, 3)
        kernel = torch.linspace(-2, 1, 12).reshape(3, 4)
        out = pointwise(x, kernel.T, None, "none", [], "")
    except Exception:  # a build without it, or another signature
        return None
    if out.shape != (2, 4) or not torch.allclose(out, x @ kernel, atol=1e-5):
        return None
    return lambda x, kernel: pointwise(x, kernel.T, None, "none", [], "")


def faster(first, second, repeats=5, margin=1.0):
    """Whether `first()` runs faster than `second()` by at least `margin`
    (a ratio): the best time of each over `repeats + 1` alternating
    calls.

    >>> import time
    >>> faster(lambda: time.sleep(0.001), lambda: time.sleep(0.01), 2)
    True
    """
    import time

    best = [math.inf, math.inf]
    for index in [0, 1] * (repeats + 1):
        start = time.perf_counter()
        (first, second)[index]()
        best[index] = min(best[index], time.perf_counter() - start)
    return best[0] * margin < best[1]


@functools.cache
def beats_mkl():
    """Whether oneDNN's linear multiplies several rows by a `(K, N)`
    kernel faster than `torch.matmul` (MKL) on this machine; measured
    once per process, on 64 rows against a 2304 x 4096 kernel (PaliGemma
    2 3B's width), in about 0.15-0.3 s. The one answer serves every row
    count and kernel.

    Which one wins depends on the machine: oneDNN took 0.50-0.84x MKL's
    time for 2-268 rows on one host this project ran on, and MKL 0.53-0.9x
    oneDNN's on another (a prefill of the 4-layer benchmark config took
    1351-1417 against 1706-1760 ms there). Either result equals
    `x @ kernel` to float32 rounding.
    """
    import torch

    # Constant operands: the user's random stream is left alone.
    x = torch.full((64, 2304), 0.5, device="cpu")
    kernel = torch.full((2304, 4096), 0.25, device="cpu")
    with torch.no_grad():
        return faster(lambda: linear()(x, kernel), lambda: x @ kernel)


def applies(x, kernel, rows):
    """Two or more rows of float32 CPU tensors, outside autograd."""
    import torch

    return (
        rows > 1
        and x.dtype == kernel.dtype == torch.float32
        and not (
            torch.is_grad_enabled() and (x.requires_grad or kernel.requires_grad)
        )
        and linear() is not None
    )
