"""Render docs/findings.md's pictures from the ablation studies' JSON (tasks/train/ablations.py output).

Usage: python docs/findings_plots.py [RESULTS_DIR [STUDY ...]]  (default docs/ablations/results; reads
out-<dataset>-<study>.json, writes docs/*.png, or prints the named studies' tables)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
PARTS = ("new1", "new5", "new10")


def load(root: Path, name: str) -> dict | None:
    path = root / f"out-{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def serve_steps(root: Path) -> None:
    study = load(root, "ml-100k-serveL")
    if study is None:
        return
    steps = {"serve L=0": 0, "serve L=1": 1, "L=2 (default)": 2, "serve L=3": 3, "serve L=5": 5}
    fig, ax = plt.subplots(figsize=(6, 4))
    for part in PARTS:
        xs = [steps[label] for label in steps if label in study["summary"]]
        ys = [study["summary"][label][part]["ndcg"]["mean"] for label in steps if label in study["summary"]]
        ax.plot(xs, ys, marker="o", label=f"new users, n = {part[3:]}")
    ax.set_xlabel("inner steps L at serving (trained with L = 2; 0 = Θ alone)")
    ax.set_ylabel("NDCG@10 (validation)")
    ax.set_title("ml-100k: adaptation is what serves a new user")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "serve_L.png", dpi=110)
    plt.close(fig)


def learning_curve(root: Path) -> None:
    study = load(root, "ml-100k-curve")
    if study is None:
        return
    points = study["points"]
    epochs = [p["epoch"] for p in points]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 6), sharex=True)
    for part in PARTS:
        top.plot(epochs, [p[f"{part}_ndcg"] for p in points], marker="o", label=f"new users, n = {part[3:]}")
    top.plot(epochs, [p["tail_ndcg"] for p in points], marker="s", label="held-out tail (existing users)")
    top.set_ylabel("NDCG@10 (validation)")
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    bottom.plot(epochs, [p["support_loss"] for p in points], label="support loss")
    bottom.plot(epochs, [p["query_loss"] for p in points], label="query loss")
    bottom.set_xlabel("meta-epoch")
    bottom.set_ylabel("training loss")
    bottom.legend(fontsize=8)
    bottom.grid(alpha=0.3)
    top.set_title("ml-100k, Ours (paper): best at 4-6 epochs, then the query loss keeps falling and NDCG does not")
    top.title.set_fontsize(9)
    fig.tight_layout()
    fig.savefig(HERE / "learning_curve.png", dpi=110)
    plt.close(fig)


def deltas(root: Path, name: str, out: str, title: str) -> None:
    study = load(root, name)
    if study is None:
        return
    labels = [label for label in study["summary"] if any("ndcg_vs_reference" in study["summary"][label][p] for p in PARTS)]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(labels) * len(PARTS) / 1.5 + 1.5))
    y = 0
    ticks, names = [], []
    for label in labels:
        for offset, part in enumerate(PARTS):
            d = study["summary"][label][part].get("ndcg_vs_reference")
            if d is None:
                continue
            ax.errorbar(d["mean"], y + offset * 0.25, xerr=[[d["mean"] - d["ci"][0]], [d["ci"][1] - d["mean"]]], fmt="o",
                        color=f"C{offset}", label=f"n = {part[3:]}" if label == labels[0] else None)
        ticks.append(y + 0.25)
        names.append(label)
        y += 1
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(ticks, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"NDCG@10 minus '{next(iter(study['summary']))}' (paired 95% CI over users, validation)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(HERE / out, dpi=110)
    plt.close(fig)


def markdown_table(root: Path, name: str) -> str:
    """A study as a Markdown table: NDCG@10 per part, and each variant minus the first with its paired 95% CI."""
    study = load(root, name)
    if study is None:
        return f"(no study {name})"
    summary = study["summary"]
    parts = list(next(iter(summary.values())))
    header = "| variant | " + " | ".join(("new users, n = " + p[3:]) if p.startswith("new") else "held-out tail (existing users)" for p in parts) + " |"
    lines = [header, "|---" * (len(parts) + 1) + "|"]
    for label, row in summary.items():
        cells = []
        for p in parts:
            cell = f"{row[p]['ndcg']['mean']:.3f}"
            d = row[p].get("ndcg_vs_reference")
            if d is not None:
                mark = " ✔" if d["ci"][0] > 0 else (" ✘" if d["ci"][1] < 0 else "")
                cell += f" ({d['mean']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]{mark})"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    cases = {p: row[p]["cases"] for p in parts}
    fits = study.get("fit_seconds", {})
    lines.append("")
    lines.append(f"Cases: {cases}; fit seconds per trained variant: " + ", ".join(sorted({f'{v:.0f}' for v in fits.values()})))
    return "\n".join(lines)


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "ablations" / "results"
    if len(sys.argv) > 2:  # print the named studies' tables
        for name in sys.argv[2:]:
            print(f"### {name}\n\n{markdown_table(root, name)}\n")
        sys.exit(0)
    serve_steps(root)
    learning_curve(root)
    deltas(root, "ml-100k-plus", "ablation_ml100k.png", "ml-100k: supports without neighbours, serving's k, α and L")
    deltas(root, "ml-100k-plus2", "ablation_ml100k_k.png", "ml-100k: k in training and serving, without neighbours")
    deltas(root, "ml-1m-first2999-plusx", "ablation_ml1m.png", "ML-1M users 1-2,999: the same options")
    deltas(root, "synthetic-drift-plusx", "ablation_drift.png", "synthetic-drift: the same options")
