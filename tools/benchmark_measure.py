"""Measurements for `tools/benchmark.py`: time, peak RSS and floors.

The floors come from this machine's memory bandwidth and matmul
throughput, measured in the same run as the models (the machine is
shared and its bandwidth varies run to run).
"""

import os
import threading
import time

import keras
import numpy as np
import torch


class PeakRss(threading.Thread):
    """Peak resident memory of this process inside a `with` block."""

    def __init__(self):
        super().__init__(daemon=True)
        self.before = self.peak = resident_bytes()
        self.running = True

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.join()

    def run(self):
        while self.running:
            self.peak = max(self.peak, resident_bytes())
            time.sleep(0.002)


def resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def seconds(function, repeats=1):
    """Best wall time of `function()` over `repeats` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def read_rates(bandwidth_mb, repeats=5):
    """Memory read rates (bytes/s) over a `bandwidth_mb` float32 matrix.

    A matrix-vector product with the backend (what a decode step does
    with each weight) and with torch, and torch's sum of the matrix
    (torch's CPU matrix-vector product runs on one thread, so it
    understates the machine); each the best of `repeats`; and
    `bandwidth`, the fastest of the three.
    """
    ops = keras.ops
    rows = bandwidth_mb * 2**20 // (4 * 1024)
    big, vector = ops.ones((rows, 1024)), ops.ones((1024,))
    big_t, vector_t = torch.ones(rows, 1024), torch.ones(1024)
    with torch.no_grad():
        rates = {
            "bandwidth_backend": rows * 4096 / seconds(
                lambda: ops.convert_to_numpy(ops.matmul(big, vector)), repeats),
            "bandwidth_torch": rows * 4096 / seconds(
                lambda: (big_t @ vector_t).numpy(), repeats),
            "bandwidth_torch_sum": rows * 4096 / seconds(
                lambda: big_t.sum().item(), repeats),
        }
    return dict(rates, bandwidth=max(rates.values()))


def measure_hardware(bandwidth_mb, matmul_size):
    """Bandwidth (bytes/s, the best of `read_rates`) and matmul FLOP/s
    (square float32 matrices of side `matmul_size`), with the backend and
    torch."""
    ops = keras.ops
    m = matmul_size
    a, a_t = ops.ones((m, m)), torch.ones(m, m)
    found = read_rates(bandwidth_mb)
    with torch.no_grad():
        found["matmul_backend"] = 2 * m**3 / seconds(
            lambda: ops.convert_to_numpy(ops.matmul(a, a)), 5)
        found["matmul_torch"] = 2 * m**3 / seconds(
            lambda: (a_t @ a_t).numpy(), 5)
    found["matmul"] = max(found["matmul_backend"], found["matmul_torch"])
    return found


def median_hardware(samples):
    """One `measure_hardware` result from several taken during the run:
    the median of each figure, with the bandwidths' range and the count.
    On a shared machine the bandwidth drifts (35-68 GB/s here); a floor
    from one early sample may come from a faster or slower moment than
    the timings it divides.

    >>> found = median_hardware([{"bandwidth": 3.0, "matmul": 1.0},
    ...                          {"bandwidth": 1.0, "matmul": 2.0},
    ...                          {"bandwidth": 2.0, "matmul": 3.0}])
    >>> found["bandwidth"], found["matmul"], found["bandwidth_range"]
    (2.0, 2.0, [1.0, 3.0])
    """
    found = {key: float(np.median([s[key] for s in samples]))
             for key in samples[0]}
    bandwidths = [s["bandwidth"] for s in samples]
    found["bandwidth_range"] = [min(bandwidths), max(bandwidths)]
    found["samples"] = len(samples)
    return found


def parameter_counts(backbone):
    """Weights per part: `vision` (encoder + projector), `decoder`, `embedding`."""
    parts = {"vision_encoder": "vision", "token_embedding": "embedding"}
    counts = {"vision": 0, "decoder": 0, "embedding": 0}
    for variable in backbone.weights:
        part = parts.get(variable.path.split("/")[0], "decoder")
        counts[part] += int(np.prod(variable.shape))
    return counts


def floors(backbone, batch, hardware, prompt_length):
    """Lower bounds in seconds for prefill, TTFT and one decode step.

    Prefill is the measured forward pass: every layer over image + prompt
    and logits at every prompt position. TTFT needs less: the logits of
    the last position only, and of the last decoder block only the keys
    and values of the other positions (for the cache).
    """
    counts = parameter_counts(backbone)
    bandwidth, matmul = hardware["bandwidth"], hardware["matmul"]
    image_tokens = backbone.num_image_tokens
    prefix = image_tokens + prompt_length
    weight_bytes = 4 * sum(counts.values())
    prefill_flops = 2 * batch * (
        counts["vision"] * image_tokens
        + counts["decoder"] * prefix
        + counts["embedding"] * prompt_length
    )
    last = backbone.decoder_blocks[-1]
    keys_values = last.attention.key_dense.weights
    keys_values += last.attention.value_dense.weights
    skipped = sum(int(np.prod(w.shape)) for w in last.weights) - sum(
        int(np.prod(w.shape)) for w in keys_values
    )
    ttft_flops = 2 * batch * (
        counts["vision"] * image_tokens
        + counts["decoder"] * prefix
        - skipped * (prefix - 1)
        + counts["embedding"]
    )
    step_bytes = 4 * (counts["decoder"] + counts["embedding"])
    step_flops = 2 * batch * (counts["decoder"] + counts["embedding"])
    prefill = max(prefill_flops / matmul, weight_bytes / bandwidth)
    ttft = max(ttft_flops / matmul, weight_bytes / bandwidth)
    decode = max(step_bytes / bandwidth, step_flops / matmul)
    return {"prefill": prefill, "ttft": ttft, "decode": decode}
