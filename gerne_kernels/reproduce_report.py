"""The reproduce command's report: text and Markdown tables (ours beside the paper's
Table 1), the selections, the time per method, and the plot of GBA and WGA against the
minority ratio. Reads the JSON-friendly result of
:func:`gerne_kernels.reproduce.run_protocol`."""
from __future__ import annotations

from typing import Optional

RATIOS = (0.005, 0.01, 0.02, 0.05)

# Table 1 of the paper, Colored MNIST, test GBA in % at 0.5 / 1 / 2 / 5 % minority.
PAPER_GBA = {
    "erm": (35.19, 52.09, 65.86, 82.17),
    "groupdro": (63.12, 68.78, 76.30, 84.20),
    "gerne_known": (77.79, 84.47, 88.30, 92.16),
    "gerne_unknown": (77.25, 83.98, 87.41, 90.98),
}

__all__ = ["format_table", "format_markdown", "save_plot", "percent", "PAPER_GBA", "RATIOS"]


def _cell(s: dict) -> str:
    return f"{100 * s['mean']:5.2f} ± {100 * s['std']:4.2f}"


def _paper(key: str, ratio: float) -> Optional[float]:
    if key in PAPER_GBA and ratio in RATIOS:
        return PAPER_GBA[key][RATIOS.index(ratio)]
    return None


def _rows(result: dict):
    """(label, [(ratio, gba cell, wga cell, paper)]) per method, in the protocol's order."""
    ratios = list(result["ratios"].values())
    for key in result["protocol"]["methods"]:
        label = ratios[0]["methods"][key]["label"]
        cells = []
        for r in ratios:
            m = r["methods"][key]
            cells.append((r["ratio"], _cell(m["test_gba"]), _cell(m["test_wga"]),
                          _paper(key, r["ratio"])))
        yield key, label, cells


def format_table(result: dict) -> str:
    """Text tables: test GBA (paper's beside) and WGA per method and ratio; the choices."""
    p = result["protocol"]
    ratios = list(result["ratios"].values())
    width = max(len(m["label"]) for m in ratios[0]["methods"].values()) + 2
    head = "".join(f"{percent(r['ratio']):>24}" for r in ratios)
    lines = [f"Colored MNIST (offline digits), Table 1 protocol: test accuracy in %, mean ± std "
             f"over {p['seeds']} seed(s); {p['steps']} steps, batch {p['batch_size']}/class, "
             f"hyperparameters chosen on validation GBA",
             "", "GBA (paper's Table 1 in brackets)", f"{'method':<{width}}{head}"]
    for key, label, cells in _rows(result):
        lines.append(f"{label:<{width}}" + "".join(
            f"{gba:>15} {f'({paper:.2f})' if paper is not None else '':>8}"
            for _, gba, _, paper in cells))
    lines += ["", "WGA (not reported in the paper for Colored MNIST)", f"{'method':<{width}}{head}"]
    for key, label, cells in _rows(result):
        lines.append(f"{label:<{width}}" + "".join(f"{wga:>24}" for _, _, wga, _ in cells))
    lines += ["", "Selection (validation GBA of each grid point, seed 0; * kept):"]
    for r in ratios:
        lines.append(f"  {100 * r['ratio']:g}% ({r['empty_groups']} empty training groups)")
        for m in r["methods"].values():
            points = ", ".join(f"{'*' if g['config'] == m['chosen'] else ''}"
                               f"{_config_text(g['config'])}: {100 * g['val_gba']:.1f}"
                               for g in m["grid"])
            lines.append(f"    {m['label']:<{width}}{points}  -> {_config_text(m['chosen'])}"
                         f" ({m['chosen_described']})")
    lines += ["", "Time per method (summed over its units): " + ", ".join(
        f"{key} {sec:.0f} s" for key, sec in result["seconds_per_method"].items()),
        f"Total: {result['seconds']:.0f} s wall ({result.get('cpu_seconds', 0):.0f} s CPU; "
        f"load average {'/'.join(f'{v:.1f}' for v in result.get('load_average', []))} at "
        f"start/end), {result.get('jobs', 1)} process(es) of {result['threads']} thread(s), torch "
        f"{result['torch']}, GERNE backends available: {', '.join(result['backends_available'])}"]
    return "\n".join(lines)


def percent(ratio: float) -> str:
    return f"{100 * ratio:g}%"


def _config_text(cfg: dict) -> str:
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in cfg.items())


def format_markdown(result: dict) -> str:
    """The GBA / WGA table as Markdown (README's results section)."""
    ratios = list(result["ratios"].values())
    lines = ["| method | " + " | ".join(f"GBA {percent(r['ratio'])}" for r in ratios) + " | "
             + " | ".join(f"WGA {percent(r['ratio'])}" for r in ratios) + " |",
             "| --- |" + " --- |" * (2 * len(ratios))]
    for key, label, cells in _rows(result):
        gba = [f"{c[1].strip()}" + (f" ({c[3]:.2f})" if c[3] is not None else "") for c in cells]
        wga = [c[2].strip() for c in cells]
        lines.append(f"| {label} | " + " | ".join(gba + wga) + " |")
    return "\n".join(lines)


def save_plot(result: dict, path: str) -> None:
    """GBA and WGA against the minority ratio, one line per method; the paper's GERNE
    (Table 1, GBA) dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = list(result["ratios"].values())
    x = [100 * r["ratio"] for r in ratios]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, metric in zip(axes, ("test_gba", "test_wga")):
        for key in result["protocol"]["methods"]:
            mean = [100 * r["methods"][key][metric]["mean"] for r in ratios]
            std = [100 * r["methods"][key][metric]["std"] for r in ratios]
            ax.errorbar(x, mean, yerr=std, marker="o", capsize=3,
                        label=ratios[0]["methods"][key]["label"])
        if metric == "test_gba":
            for key, style in (("gerne_known", "k--x"), ("gerne_unknown", "k:+")):
                ref = [(r, _paper(key, r / 100)) for r in x if _paper(key, r / 100) is not None]
                if ref and key in result["protocol"]["methods"]:
                    ax.plot([r for r, _ in ref], [v for _, v in ref], style,
                            label=f"paper: {ratios[0]['methods'][key]['label']}")
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(x)
        ax.set_xticklabels([f"{v:g}" for v in x])
        ax.set_xlabel("minority ratio (%)")
        ax.set_ylabel(f"test {metric[5:].upper()} (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[0].set_title("GBA (dashed: the paper's GERNE, Table 1)")
    axes[1].set_title("WGA")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
