"""Results of one benchmark run: pytest-benchmark's JSON read into one row per case and
provider, the summary fastseq adds to the JSON, the terminal table and the comparison with an
earlier run."""
from __future__ import annotations

import json
from collections import defaultdict
from typing import Optional

CASE_KEYS = ("op", "cell", "shape", "dtype", "passes")


def per_call_seconds(bench: dict) -> float:
    """The case's median time per call: the CUDA-event median (L2 flushed) when the suite
    measured one, else pytest-benchmark's median round over its calls per round."""
    info = bench["extra_info"]
    if info.get("median_us") is not None:
        return info["median_us"] / 1e6
    return bench["stats"]["median"] / info.get("calls_per_round", 1)


def is_fastseq(provider: str) -> bool:
    return provider.startswith("fastseq")


def summarize(data: dict, peaks: Optional[dict] = None) -> list[dict]:
    """One entry per case: its fields, and per provider the median, TFLOP/s, GB/s, fraction of
    the measured peak, peak memory and max error; the speed-up of each fastseq provider over
    each peer (peer time / fastseq time: > 1 means fastseq is faster)."""
    cases: dict = defaultdict(dict)
    fields: dict = {}
    for bench in data.get("benchmarks", []):
        info = bench["extra_info"]
        key = tuple(str(info.get(k, "")) for k in CASE_KEYS)
        fields[key] = {k: info.get(k, "") for k in CASE_KEYS}
        fields[key]["length"] = info.get("length")
        seconds = per_call_seconds(bench)
        entry = {"median_us": seconds * 1e6, "peak_mib": info.get("peak_mib"),
                 "max_error": info.get("max_error"), "tflops": None, "gbps": None,
                 "peak_fraction": None, "name": bench.get("name")}
        if info.get("gflop"):
            entry["tflops"] = info["gflop"] / seconds / 1e3
            rate = (peaks or {}).get("matmul_tflops", {}).get(info.get("dtype", ""))
            if rate:
                entry["peak_fraction"] = entry["tflops"] / rate
        if info.get("gbytes"):
            entry["gbps"] = info["gbytes"] / seconds
            bandwidth = (peaks or {}).get("copy_gbps")
            if bandwidth and entry["peak_fraction"] is None:
                entry["peak_fraction"] = entry["gbps"] / bandwidth
        cases[key][info["provider"]] = entry
    summary = []
    for key in sorted(cases):
        providers = cases[key]
        speedups = {f"{peer}/{ours}": providers[peer]["median_us"] / providers[ours]["median_us"]
                    for ours in providers if is_fastseq(ours)
                    for peer in providers if not is_fastseq(peer)}
        summary.append({"case": fields[key], "providers": providers, "speedups": speedups})
    return summary


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table_lines(summary: list[dict]) -> list[list[str]]:
    """Rows of the terminal table: one per case and provider, fastseq's first."""
    header = ["op", "cell", "shape", "dtype", "pass", "provider", "median us", "TFLOP/s",
              "% peak", "peak MiB", "max err", "speed-up vs peers"]
    lines = [header]
    for case in summary:
        c = case["case"]
        order = sorted(case["providers"], key=lambda p: (not is_fastseq(p), p))
        for provider in order:
            e = case["providers"][provider]
            vs = ", ".join(f"{name.split('/')[0]} {x:.2f}x" for name, x in case["speedups"].items()
                           if name.endswith("/" + provider))
            lines.append([c["op"], c["cell"], c["shape"], c["dtype"], c["passes"], provider,
                          _fmt(e["median_us"], ".1f"), _fmt(e["tflops"], ".3f"),
                          _fmt(None if e["peak_fraction"] is None else 100 * e["peak_fraction"],
                               ".1f"),
                          _fmt(e["peak_mib"], ".0f"), _fmt(e["max_error"], ".1e"), vs or "-"])
    return lines


def render(lines: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    text = []
    for n, row in enumerate(lines):
        text.append("  ".join(cell.ljust(w) if i in (0, 1, 2, 5, 11) else cell.rjust(w)
                              for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
        if n == 0:
            text.append("  ".join("-" * w for w in widths))
    return "\n".join(text)


def markdown(lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(lines[0]) + " |", "|" + "---|" * len(lines[0])]
    out += ["| " + " | ".join(row) + " |" for row in lines[1:]]
    return "\n".join(out) + "\n"


def compare(old: dict, new: dict) -> list[list[str]]:
    """Per case and provider present in both runs: old and new median, change (negative:
    faster now)."""
    def medians(data):
        return {(tuple(str(b["extra_info"].get(k, "")) for k in CASE_KEYS),
                 b["extra_info"]["provider"]): per_call_seconds(b) * 1e6
                for b in data.get("benchmarks", [])}

    before, after = medians(old), medians(new)
    lines = [["op", "cell", "shape", "dtype", "pass", "provider", "old us", "new us", "change"]]
    for key in sorted(before.keys() & after.keys()):
        case, provider = key
        change = 100 * (after[key] / before[key] - 1)
        lines.append([*case, provider, f"{before[key]:.1f}", f"{after[key]:.1f}",
                      f"{change:+.1f}%"])
    return lines


def load(path) -> dict:
    with open(path) as f:
        return json.load(f)
