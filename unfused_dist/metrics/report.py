"""The run's results table (markdown), and PNG plots of accuracies and training losses."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def results_markdown(results: dict) -> str:
    base = results["baseline"]["test_acc"]
    lines = [f"# UnFuSeD results: task `{results['task']}`", "",
             f"Labelled training clips: {results['rows'][0]['train_clips'] if results['rows'] else 0}; "
             f"classes: {results['classes']} (chance {results['chance']:.3f}); "
             f"simple baseline (log-mel mean/std + logistic regression, same labelled clips): test {base:.3f}.", "",
             "| row | init | mode | parameters | val acc | test acc | vs simple baseline |",
             "|---|---|---|---:|---:|---:|---|"]
    for r in results["rows"]:
        verdict = "above" if r["test_acc"] > base else "**NOT above**"
        lines.append(f"| {r['row']} | {r['init']} | {r['mode']} | {r['parameters']:,} | {r['val_acc']:.3f} | "
                     f"{r['test_acc']:.3f} | {verdict} |")
    below = [r["row"] for r in results["rows"] if r["test_acc"] <= base]
    lines += ["", (f"Rows NOT above the simple baseline ({base:.3f}): {', '.join(below)}." if below
                   else f"Every row is above the simple baseline ({base:.3f}).")]
    pl = results.get("pseudolabels") or {}
    if pl:
        lines.append(f"Pseudo-labels: K={pl.get('k')}, NMI vs true labels {pl.get('nmi_vs_true_labels')}, "
                     f"purity {pl.get('purity')}.")
    lines.append("Models are selected on the validation split; the test split is scored once per row.")
    return "\n".join(lines) + "\n"


def plot_accuracies(results: dict, path: Path) -> None:
    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(8, 4))
    names = [r["row"] for r in rows]
    ax.bar(names, [r["test_acc"] for r in rows], color="#4477aa")
    ax.axhline(results["baseline"]["test_acc"], color="#cc3311", ls="--", label="simple baseline")
    ax.axhline(results["chance"], color="grey", ls=":", label="chance")
    for i, r in enumerate(rows):
        ax.text(i, r["test_acc"] + 0.01, f"{r['test_acc']:.2f}\n{r['parameters'] / 1e6:.1f}M", ha="center",
                fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test accuracy")
    ax.set_title(f"UnFuSeD on {results['task']}")
    ax.legend(loc="upper left", fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=15)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_losses(histories: dict[str, Path], path: Path) -> None:
    present = {k: json.loads(p.read_text()) for k, p in histories.items() if p.exists()}
    if not present:
        return
    fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3.2), squeeze=False)
    for ax, (name, hist) in zip(axes[0], present.items()):
        ax.plot([h["step"] for h in hist], [h["loss"] for h in hist], lw=1)
        ax.set_title(f"{name} loss")
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
