"""PNG plots of a coldstart-v1 report (matplotlib, Agg backend: no display needed).

* ``quality_<mode>.png``: HR@10 and nDCG@10 against K, one line per method (one figure per mode);
* ``latency.png``: adaptation latency per method (p50 bar, p95 whisker, log scale) at the largest K.
"""

from __future__ import annotations

from pathlib import Path

from .output import replaced

#: The files ``write_plots`` may write (patterns), so that a report writer can remove stale ones.
PLOT_FILES = ("quality_*.png", "latency.png")


def write_plots(report: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    rows = report["results"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    written = []
    title = f"{report['protocol']} on {report['dataset']['name']} (seed {report['seed']})"
    # one colour and marker per method: the default cycle has 10 colours, a report has 11+ methods
    colours = plt.get_cmap("tab20").colors
    styles = {m: (colours[(2 * i) % 20 + (i // 10) % 2], "osD^v<>ph*"[i % 10]) for i, m in enumerate(methods)}
    for mode in modes:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for metric, axis in zip(("hr@10", "ndcg@10"), axes):
            for method in methods:
                points = sorted((r["k"], r[metric]) for r in rows if r["method"] == method and r["mode"] == mode)
                if points:
                    axis.plot([k for k, _ in points], [v for _, v in points], color=styles[method][0], marker=styles[method][1], label=method)
            axis.set_xlabel("K (support positives)")
            axis.set_ylabel(metric.replace("hr", "HR").replace("ndcg", "nDCG"))
            axis.set_xticks(sorted({r["k"] for r in rows}))
            axis.grid(alpha=0.3)
        axes[1].legend(fontsize=7, loc="best")
        fig.suptitle(f"{title}, mode {mode}")
        fig.tight_layout()
        path = out / f"quality_{mode}.png"
        with replaced(path) as temporary:
            fig.savefig(temporary, dpi=110, format="png")
        plt.close(fig)
        written.append(path)
    k_max = max(r["k"] for r in rows)
    latency = {r["method"]: (r["adapt_ms_p50"], r["adapt_ms_p95"]) for r in rows if r["k"] == k_max}
    fig, axis = plt.subplots(figsize=(8, 4))
    names = list(latency)
    p50 = [max(latency[n][0], 1e-3) for n in names]
    p95 = [max(latency[n][1], 1e-3) for n in names]
    axis.bar(names, p50, yerr=[[0] * len(names), [b - a for a, b in zip(p50, p95)]], capsize=3, color="#4c72b0")
    axis.set_yscale("log")
    axis.set_ylabel(f"ms per user, K = {k_max} (p50, whisker p95)")
    axis.tick_params(axis="x", rotation=35, labelsize=8)
    axis.grid(axis="y", alpha=0.3)
    axis.set_title(f"{title}: adaptation + scoring latency")
    fig.tight_layout()
    path = out / "latency.png"
    with replaced(path) as temporary:
        fig.savefig(temporary, dpi=110, format="png")
    plt.close(fig)
    written.append(path)
    return written
