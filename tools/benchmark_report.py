"""Tables of `tools/benchmark.py`: rows, ratios against peers and floors."""


METRICS = [("prefill", "prefill_ms"), ("ttft", "ttft_ms"),
           ("decode", "decode_ms_per_token")]


def paired_floor_ratio(samples, decode_floor):
    """Decode time over the floor of the same moment, best of the repeats.

    `samples` are `(decode ms, read rate)` pairs, the rate measured just
    around that repeat's decode (the faster of before and after);
    `decode_floor(rate)` is the floor in seconds at that rate. On a
    machine whose bandwidth switches during a run, this compares each
    timing with the bandwidth the machine had while it ran, where the
    run's median may come from another moment.

    >>> paired_floor_ratio([(120.0, 40.0), (100.0, 60.0)],
    ...                    lambda rate: 4.0 / rate)
    1.2
    """
    return min(ms / (1e3 * decode_floor(rate)) for ms, rate in samples)


def ratios(rows, floor_by_batch):
    """us/peer and us/floor for each batch and metric (for decode also
    us over the paired floor, see `paired_floor_ratio`)."""
    out = []
    for batch, floor in floor_by_batch.items():
        by_model = {r["model"]: r for r in rows if r["batch"] == batch}
        for metric, key in METRICS:
            ours = by_model["ours"][key]
            entry = {"batch": batch, "metric": metric,
                     "floor_ms": 1e3 * floor[metric],
                     "us_over_floor": ours / (1e3 * floor[metric])}
            if metric == "decode":
                entry["us_over_paired_floor"] = by_model["ours"][
                    "decode_over_paired_floor"]
            for model, row in by_model.items():
                if not model.startswith("ours"):  # Peers, not variants.
                    entry[f"us_over_{model}"] = ours / row[key]
            out.append(entry)
    return out


ROW_COLUMNS = [
    ("model", "model", ""), ("batch", "batch", ""),
    ("prefill ms", "prefill_ms", ".1f"), ("TTFT ms", "ttft_ms", ".1f"),
    ("decode ms/token", "decode_ms_per_token", ".2f"),
    ("decode / paired floor", "decode_over_paired_floor", ".2f"),
    ("peak RSS MB", "peak_rss_mb", ".0f"),
    ("RSS increase MB", "rss_increase_mb", ".0f"),
    ("compilations", "compilations", ""),
    ("tokens = ours", "tokens_equal_ours", ""),
    ("token agreement", "token_agreement", ".3f"),
    ("max logit drift", "max_logit_drift", ".2g"),
]
QUESTION_COLUMNS = [
    ("questions", "questions", ""), ("new tokens", "new_tokens", ""),
    ("TTFT ms shared", "shared_ttft_ms", ".1f"),
    ("TTFT ms repeated", "repeated_ttft_ms", ".1f"),
    ("TTFT saving", "ttft_saving", ".1%"),
    ("generate ms shared", "shared_generate_ms", ".1f"),
    ("generate ms repeated", "repeated_generate_ms", ".1f"),
    ("generate saving", "generate_saving", ".1%"),
    ("same tokens", "tokens_equal", ""),
]


def table(entries, columns):
    """A markdown table of dicts; `columns` are `(header, key, format)`."""
    lines = ["| " + " | ".join(c[0] for c in columns) + " |",
             "|" + "---|" * len(columns)]
    for entry in entries:
        cells = ["-" if entry.get(key) is None else format(entry[key], spec)
                 for _, key, spec in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(result):
    """The measurements and the ratios as two markdown tables."""
    hardware = result["hardware"]
    low, high = hardware["bandwidth_range"]
    peers = [r["model"] for r in result["rows"]
             if not r["model"].startswith("ours")]
    ratio_columns = [("batch", "batch", ""), ("metric", "metric", ""),
                     ("floor ms", "floor_ms", ".2f"),
                     ("us/floor", "us_over_floor", ".2f"),
                     ("us/paired floor", "us_over_paired_floor", ".2f")]
    ratio_columns += [(f"us/{p}", f"us_over_{p}", ".2f")
                      for p in dict.fromkeys(peers)]
    return "\n\n".join([
        f"backend {result['backend']}, "
        f"{sum(result['parameters'].values()):,} parameters, bandwidth "
        f"{hardware['bandwidth'] / 1e9:.1f} GB/s (median of "
        f"{hardware['samples']}, {low / 1e9:.1f}-{high / 1e9:.1f}), matmul "
        f"{hardware['matmul'] / 1e9:.1f} GFLOP/s",
        table(result["rows"], ROW_COLUMNS),
        table(result["ratios"], ratio_columns),
    ] + ([
        "Several questions about one image (ours; shared = encoded once):",
        table(result["questions"], QUESTION_COLUMNS),
    ] if result["questions"] else []))
