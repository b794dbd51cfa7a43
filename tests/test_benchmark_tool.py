"""`tools/benchmark.py --small` runs end to end on the current backend."""

import doctest
import importlib
import json
import math
import os
import subprocess
import sys

from conftest import BACKEND
from conftest import REPO


def test_small_benchmark_runs_and_agrees_with_its_peers(tmp_path):
    out = tmp_path / "benchmark.json"
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "benchmark.py"),
         "--small", "--batches", "2", "--repeats", "1", "--new-tokens", "3",
         "--variants", "int8,bfloat16", "--questions", "3",
         "--json", str(out)],
        env={**os.environ, "KERAS_BACKEND": BACKEND},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| ours | 2 |" in result.stdout
    report = json.loads(out.read_text())
    assert report["backend"] == BACKEND
    # Measured before the runs and before the one repeat of one batch.
    hardware = report["hardware"]
    assert hardware["samples"] == 2
    low, high = hardware["bandwidth_range"]
    assert 0 < low <= hardware["bandwidth"] <= high
    assert "(median of 2, " in result.stdout
    rows = {row["model"]: row for row in report["rows"]}
    assert set(rows) == {
        "ours", "ours-int8", "ours-bfloat16", "keras_hub", "transformers"}
    # Same weights, greedy: the converters and the three models agree.
    for model in ("ours", "keras_hub", "transformers"):
        assert rows[model]["tokens_equal_ours"], model
    assert rows["keras_hub"]["max_logit_drift"] < 1e-3
    assert rows["transformers"]["max_logit_drift"] is None
    variants = ("ours-int8", "ours-bfloat16")
    for variant in variants:
        assert 0 <= rows[variant]["token_agreement"] <= 1
        assert 0 < rows[variant]["max_logit_drift"] < 1.0
    # Sharing one image among prompts changes the cost, not the tokens.
    (questions,) = report["questions"]
    assert questions["questions"] == 3 and questions["tokens_equal"]
    assert questions["shared_ttft_ms"] > 0 and questions["repeated_ttft_ms"] > 0
    for row in rows.values():
        for key in ("prefill_ms", "ttft_ms", "first_of_new_tokens_ms",
                    "peak_rss_mb"):
            assert row[key] > 0
        assert math.isfinite(row["decode_ms_per_token"])
        # One repeat: its decode time, with the read rate around it.
        ((decode_ms, rate),) = row["decode_samples"]
        assert decode_ms == row["decode_ms_per_token"] and rate > 0
        if row["model"] in variants:  # int8 / bfloat16: no float32 floor
            assert row["decode_over_paired_floor"] is None
            continue
        # The decode floor at that rate: float32 decoder and table weights
        # read once, or their matmul work if that takes longer.
        weights = report["parameters"]["decoder"] + report["parameters"]["embedding"]
        floor_ms = 1e3 * max(4 * weights / rate,
                             2 * row["batch"] * weights / hardware["matmul"])
        assert math.isclose(row["decode_over_paired_floor"],
                            decode_ms / floor_ms, rel_tol=1e-9)
    # One compilation per buffer length (1 and 3 new tokens); the shorter
    # prompt reuses them. Nothing compiles on torch or in transformers.
    expected = 0 if BACKEND == "torch" else 2
    assert rows["ours"]["compilations"] == expected
    assert rows["transformers"]["compilations"] == 0
    metrics = {(r["metric"], r["batch"]) for r in report["ratios"]}
    assert metrics == {("prefill", 2), ("ttft", 2), ("decode", 2)}
    for entry in report["ratios"]:
        assert entry["floor_ms"] > 0
        keys = ["us_over_floor", "us_over_keras_hub", "us_over_transformers"]
        assert ("us_over_paired_floor" in entry) == (entry["metric"] == "decode")
        if entry["metric"] == "decode":
            assert entry["us_over_paired_floor"] == rows["ours"][
                "decode_over_paired_floor"]
        for key in keys:
            assert math.isfinite(entry[key])
            # Decode is a difference of two timings: at toy sizes it is
            # noise and may come out negative.
            assert entry["metric"] == "decode" or entry[key] > 0


def test_benchmark_helpers_examples(monkeypatch):
    """The docstring examples of the benchmark's helpers (floors: the
    median of samples, the paired floor)."""
    monkeypatch.syspath_prepend(os.path.join(REPO, "tools"))
    for name in ("benchmark_measure", "benchmark_report"):
        result = doctest.testmod(importlib.import_module(name))
        assert result.attempted > 0 and result.failed == 0, name


def test_first_token_stops_after_one_token_with_room_for_more(monkeypatch):
    """Decode is timed as N tokens less their first: the first with the
    same buffer (so the same prefill width), stopped after one token."""
    monkeypatch.syspath_prepend(os.path.join(REPO, "tools"))
    benchmark = importlib.import_module("benchmark")
    backbone = benchmark.random_backbone(benchmark.SMALL, 0)
    images, prompts = benchmark.random_inputs(backbone, 2, 12, 0)
    runners = [
        benchmark.KerasRunner("ours", benchmark.PaliGemmaCausalLM(backbone)),
        benchmark.KerasRunner(
            "keras_hub", benchmark.keras_hub_causal_lm(backbone)),
    ]
    for runner in runners:
        full = runner.generate(images, prompts, 5)
        first = runner.first_token(images, prompts, 5, full[:, 0])
        assert first.shape == full.shape, runner.name
        assert (first[:, 0] == full[:, 0]).all(), runner.name
        assert (full[:, 1:] != 0).any() and (first[:, 1:] == 0).all(), (
            runner.name)
