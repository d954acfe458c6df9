"""Collect every row's metrics, add the simple baseline of DATA.md measured on the same labelled clips,
and write results.json, results.md and PNG plots in the run directory."""
from __future__ import annotations

import json
import sys

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ..artefacts import atomic_write_text, is_done
from ..audio.frontend import LogMel
from ..run_layout import RunLayout
from ..config import Config
from ..errors import MissingArtefactError
from ..data.loader import make_loader
from ..data.source import ShardSource
from ..data.stream import EvaluationStream
from ..metrics.report import plot_accuracies, plot_losses, results_markdown
from ..data.transforms import eval_transform
from .common import labelled_subset, split_dir


def run(cfg: Config) -> dict:
    layout = RunLayout.of(cfg)
    rows = []
    for row in cfg.finetune.rows:
        d = layout.row(row)
        if not is_done(d):
            raise MissingArtefactError(f"{d}: row '{row}' has not finished; run `unfused run finetune-{row}` "
                                       "(or the pipeline) with this config first")
        rows.append(json.loads((d / "metrics.json").read_text()))
    train = ShardSource(split_dir(cfg, "train"))
    classes = len(train.manifest.labels or [])
    pl = layout.pseudolabel_report
    results = {"task": cfg.data.task, "classes": classes, "chance": 1 / max(classes, 1), "rows": rows,
               "baseline": simple_baseline(cfg), "config_hash": cfg.hash(),
               "pseudolabels": {k: v for k, v in json.loads(pl.read_text()).items()
                                if k in ("k", "nmi_vs_true_labels", "purity", "points")} if pl.exists() else None}
    atomic_write_text(layout.results("json"), json.dumps(results, indent=1))
    table = results_markdown(results)
    atomic_write_text(layout.results("md"), table)
    plot_accuracies(results, layout.results("png"))
    plot_losses({"pretrain": layout.history("pretrain"), "distill": layout.history("distill"),
                 "unfused_finetune": layout.history("finetune-unfused_finetune")}, layout.losses_plot)
    sys.stdout.write(table + "\n")  # the report itself: the command's output, not a log message
    return results


@torch.no_grad()
def _logmel_stats(cfg: Config, source: ShardSource) -> tuple[np.ndarray, np.ndarray]:
    logmel = LogMel(cfg.audio)
    stream = EvaluationStream(source, eval_transform(cfg.audio, cfg.data.task_seconds), 0, shuffle=False,
                              workers=cfg.data.num_workers)
    xs, ys = [], []
    for batch in make_loader(stream, 256):
        m = logmel(batch.wave)[:, 0]
        xs.append(torch.cat([m.mean(-1), m.std(-1)], 1).numpy())
        ys.append(batch.label.numpy())
    return np.concatenate(xs), np.concatenate(ys)


def simple_baseline(cfg: Config) -> dict:
    """DATA.md's reference: log-mel mean/std per band + logistic regression, trained on the same clips."""
    train = labelled_subset(ShardSource(split_dir(cfg, "train")), cfg.finetune.labels_per_class, cfg.run.seed)
    x, y = _logmel_stats(cfg, train)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x, y)
    scores = {}
    for split in ("val", "test"):
        xs, ys = _logmel_stats(cfg, ShardSource(split_dir(cfg, split)))
        scores[f"{split}_acc"] = float(model.score(xs, ys))
    return scores
