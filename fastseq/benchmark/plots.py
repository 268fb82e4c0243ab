"""PNG plots of a run: TFLOP/s (or time) against sequence length per provider, one figure per
op, cell, dtype and pass; and the speed-ups of fastseq over each peer as bars. matplotlib is
optional (the GPU machine may lack it): without it no plots, and the command says so."""
from __future__ import annotations

import pathlib
from collections import defaultdict


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# Shape tokens that vary along a length sweep (lengths, and batch at a fixed token count).
_SWEPT = ("B=", "L=", "Lq=", "M=", "T=")


def _variant(shape: str) -> str:
    """What tells apart the series of one plot: the shape without its swept tokens."""
    return " ".join(t for t in shape.split() if not t.startswith(_SWEPT))


def write_plots(summary: list[dict], out_dir: pathlib.Path, title: str) -> list[pathlib.Path]:
    """The PNG files written (none without matplotlib)."""
    plt = _pyplot()
    if plt is None:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    groups: dict = defaultdict(lambda: defaultdict(list))
    for case in summary:
        c = case["case"]
        if c.get("length") is None:
            continue
        group = (c["op"], c["cell"], c["dtype"], c["passes"])
        for provider, e in case["providers"].items():
            value = e["tflops"] if e["tflops"] is not None else e["median_us"]
            groups[group][(provider, _variant(c["shape"]))].append(
                (c["length"], value, e["tflops"] is not None))
    for (op, cell, dtype, passes), series in sorted(groups.items()):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        uses_tflops = True
        for (provider, variant), points in sorted(series.items()):
            points.sort()
            uses_tflops = uses_tflops and all(p[2] for p in points)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                    label=f"{provider} {variant}".strip())
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("TFLOP/s" if uses_tflops else "median time (us)")
        name = " ".join(x for x in (op, cell, dtype, passes) if x)
        ax.set_title(f"{name}\n{title}", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        path = out_dir / ("_".join(x for x in (op, cell, dtype, passes) if x)
                          .replace("+", "") + "_vs_length.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    bars = [(f"{c['case']['op']} {c['case']['cell']} {c['case']['shape']} {c['case']['dtype']} "
             f"{c['case']['passes']}: {name}", x)
            for c in summary for name, x in c["speedups"].items()]
    if bars:
        fig, ax = plt.subplots(figsize=(10, 0.28 * len(bars) + 1.5))
        labels, values = zip(*bars)
        ax.barh(range(len(bars)), values,
                color=["tab:green" if v >= 1 else "tab:red" for v in values])
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(bars)), labels, fontsize=6)
        ax.invert_yaxis()
        ax.set_xlabel("speed-up (peer time / fastseq time; > 1: fastseq faster)")
        ax.set_title(f"fastseq speed-ups\n{title}", fontsize=9)
        fig.tight_layout()
        path = out_dir / "speedups.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
