"""Print pytest-benchmark JSON from fastseq's suites as a comparison table: per case, each
provider's median time, each fastseq provider's speed-up over each peer (torch, the reference),
the best GFLOP/s and (recurrences) the best
time per step.

    python bench/report.py bench/out/latest.json [--markdown out.md]
"""
import argparse
import json
from collections import defaultdict

CASE_KEYS = ("op", "cell", "shape", "dtype", "passes")


def load_rows(path):
    with open(path) as f:
        data = json.load(f)
    cases = defaultdict(dict)
    device = "?"
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        device = info.get("device", device)
        per_call = bench["stats"]["median"] / info.get("calls_per_round", 1)
        key = tuple(info.get(k, "") for k in CASE_KEYS)
        cases[key][info["provider"]] = (per_call, info.get("gflop"), info.get("steps"))
    return device, data.get("machine_info", {}), cases


def table(cases):
    """One row per case: each provider's time, then the speed-up of every fastseq provider over
    every peer (a provider not named fastseq-*: torch, the reference, ...)."""
    providers = sorted({p for row in cases.values() for p in row},
                       key=lambda p: (not p.startswith("fastseq"), p))
    ours = [p for p in providers if p.startswith("fastseq")]
    peers = [p for p in providers if not p.startswith("fastseq")]
    header = list(CASE_KEYS) + [f"{p} (us)" for p in providers] + \
        [f"{peer}/{p}" for peer in peers for p in ours] + ["best GFLOP/s", "best us/step"]
    lines = [header]
    for key in sorted(cases):
        row = cases[key]
        cells = list(key)
        cells += [f"{row[p][0] * 1e6:.1f}" if p in row else "-" for p in providers]
        for peer in peers:
            for p in ours:
                cells.append(f"{row[peer][0] / row[p][0]:.2f}x" if p in row and peer in row else "-")
        best = min(row.values(), key=lambda v: v[0])
        cells.append(f"{best[1] / best[0]:.1f}" if best[1] else "-")
        # Recurrences: time per step (layers x steps, both directions sharing a step).
        cells.append(f"{best[0] * 1e6 / best[2]:.2f}" if best[2] else "-")
        lines.append(cells)
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json")
    parser.add_argument("--markdown", help="also write the table as Markdown to this file")
    args = parser.parse_args()
    device, machine, cases = load_rows(args.json)
    lines = table(cases)
    widths = [max(len(str(r[i])) for r in lines) for i in range(len(lines[0]))]
    print(f"\nfastseq benchmark on {device} ({machine.get('cpu', {}).get('brand_raw', '')}); "
          "medians per call; peer/X > 1 means X is faster than that peer")
    for r in lines:
        print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"Device: {device}\n\n")
            f.write("| " + " | ".join(lines[0]) + " |\n")
            f.write("|" + "---|" * len(lines[0]) + "\n")
            for r in lines[1:]:
                f.write("| " + " | ".join(map(str, r)) + " |\n")


if __name__ == "__main__":
    main()
