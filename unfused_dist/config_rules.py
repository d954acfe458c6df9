"""What a config's values may be: the choices and ranges of single keys (CHOICES, RANGES), the rows of the
run's stage table, and the few rules that tie two keys together. load_config calls validate()."""
from __future__ import annotations

import dataclasses
import difflib
import math
import operator
import typing
from dataclasses import dataclass
from typing import Any

from .audio.frontend import FrontendConfig
from .config import (Config, DataConfig, DistillConfig, EngineConfig, FinetuneConfig, MetricsConfig, OptimConfig,
                     PretrainConfig, PseudoLabelConfig, RunConfig)
from .errors import ConfigError

# Keys that take one of a few words, per dataclass (so every OptimConfig section is checked). finetune.rows
# takes the rows of the run's stage table (run.stages), item by item.
CHOICES: dict[type, dict[str, tuple]] = {
    RunConfig: {"device": ("auto", "cpu", "cuda")},
    DataConfig: {"bad_samples": ("skip", "fail")},
    OptimConfig: {"name": ("sgd", "adam", "adamw"), "schedule": ("cosine", "constant")},
    EngineConfig: {"zero_stage": (0, 1, 2, 3), "precision": ("fp32", "bf16", "fp16"), "offload": ("none", "cpu")},
    PretrainConfig: {"n_fc": (2, 3)},
    PseudoLabelConfig: {"layer": ("final", "block1"), "backend": ("cpu", "gpu", "distributed"),
                        "init": ("kmeans++", "sampled")},
    DistillConfig: {"n_fc": (2, 3)},
}


@dataclass(frozen=True)
class Range:
    """Allowed numeric values: low <= x (low < x when low_open) and x <= high; floats must be finite."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False

    def allows(self, x: float) -> bool:
        if isinstance(x, float) and not math.isfinite(x):
            return False
        if self.low is not None and (x <= self.low if self.low_open else x < self.low):
            return False
        return self.high is None or x <= self.high

    def describe(self, is_float: bool) -> str:
        kind = "a finite number" if is_float else "an integer"
        if self.low is not None and self.high is not None:
            return f"{kind} from {self.low} to {self.high}"
        return f"{kind} {'>' if self.low_open else '>='} {self.low}" if self.low is not None else kind


AT_LEAST_0, AT_LEAST_1, POSITIVE, FRACTION = Range(0), Range(1), Range(0, low_open=True), Range(0, 1)

# Ranges per dataclass field. Every number a stage would otherwise only trip over later (a division by a
# batch size, an empty epoch loop, a k-means with one cluster, a port the socket refuses) is checked here,
# when the config loads, instead of hours into a run. Float fields not listed must still be finite.
RANGES: dict[type, dict[str, Range]] = {
    RunConfig: {"seed": Range(0, 2 ** 32 - 1), "nproc": AT_LEAST_1},  # k-means++ (sklearn) takes 32 bits
    DataConfig: {"task_seconds": POSITIVE, "num_workers": AT_LEAST_0, "shuffle_buffer": AT_LEAST_1,
                 "eval_batch_size": AT_LEAST_1},
    FrontendConfig: {"sample_rate": AT_LEAST_1, "n_fft": Range(2), "hop_length": AT_LEAST_1,
                     "n_mels": Range(8),  # the encoder pools frequency by 8
                     "f_min": AT_LEAST_0, "f_max": POSITIVE, "crop_seconds": POSITIVE, "eps": POSITIVE,
                     "norm_clips": AT_LEAST_1},
    OptimConfig: {"lr": POSITIVE, "momentum": FRACTION, "weight_decay": AT_LEAST_0, "warmup_steps": AT_LEAST_0},
    EngineConfig: {"grad_accum": AT_LEAST_1, "grad_clip": AT_LEAST_0, "save_every_steps": AT_LEAST_0,
                   "save_every_minutes": AT_LEAST_0, "keep_checkpoints": AT_LEAST_1},
    PretrainConfig: {"batch_size": AT_LEAST_1, "epochs": AT_LEAST_1, "max_steps": AT_LEAST_0, "ema": FRACTION,
                     "proj_dim": AT_LEAST_1, "n_clusters": Range(2), "temperature": POSITIVE,
                     "cluster_temperature": POSITIVE, "cluster_weight": AT_LEAST_0, "mixup_ratio": FRACTION},
    PseudoLabelConfig: {"k": Range(2), "pca_dim": AT_LEAST_1, "gpus": AT_LEAST_0,
                        "init_points": AT_LEAST_1, "pca_points": Range(2), "fit_points": AT_LEAST_0,
                        "iterations": AT_LEAST_1, "max_points_per_centroid": AT_LEAST_1},
    DistillConfig: {"batch_size": AT_LEAST_1, "epochs": AT_LEAST_1, "max_steps": AT_LEAST_0, "head_ce": AT_LEAST_0,
                    "kl": AT_LEAST_0, "cosine": AT_LEAST_0, "mixup_ratio": FRACTION},
    FinetuneConfig: {"labels_per_class": AT_LEAST_0, "batch_size": AT_LEAST_1, "epochs": AT_LEAST_1,
                     "probe_epochs": AT_LEAST_1},
    MetricsConfig: {"port": Range(0, 65535)},
}


# ---- validation ----------------------------------------------------------------------------------------

def validate(cfg: Config, sources: dict[str, str]) -> None:
    """Every choice and range, then the few rules that tie two keys together."""
    for key, owner, name, value in _leaves(cfg):
        where = sources.get(key, "defaults")
        allowed = CHOICES.get(type(owner), {}).get(name)
        if allowed is not None:
            _check_choice(key, value, allowed, where)
        rng = RANGES.get(type(owner), {}).get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            rng = rng or (Range() if isinstance(value, float) else None)  # any float: finite
            if rng is not None and not rng.allows(value):
                raise ConfigError(f"{where}: '{key}' is {value!r}; use {rng.describe(isinstance(value, float))}")
    from .stage_table import table_of

    _check_choice("finetune.rows", cfg.finetune.rows, tuple(table_of(cfg).rows), sources.get("finetune.rows", "defaults"))
    _check_pairs(cfg, sources)


def _check_choice(key: str, value: Any, allowed: tuple, where: str) -> None:
    for item in value if isinstance(value, list) else [value]:
        if item not in allowed:
            near = difflib.get_close_matches(str(item), [str(a) for a in allowed], n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            what = f"has {item!r}" if isinstance(value, list) else f"is {item!r}"
            raise ConfigError(f"{where}: '{key}' {what}; use one of {', '.join(map(repr, allowed))}{hint}")


def _check_pairs(cfg: Config, sources: dict[str, str]) -> None:
    def fail(key: str, message: str) -> typing.NoReturn:
        raise ConfigError(f"{sources.get(key, 'defaults')}: '{key}' is {operator.attrgetter(key)(cfg)!r}; {message}")

    a, p = cfg.audio, cfg.pseudolabel
    if not a.f_min < a.f_max <= a.sample_rate / 2:
        fail("audio.f_max", f"use more than audio.f_min ({a.f_min:g}) and at most half of audio.sample_rate "
                            f"({a.sample_rate / 2:g})")
    if p.init_points < p.k:  # k-means++ needs at least k points to start from
        fail("pseudolabel.init_points", f"use at least pseudolabel.k ({p.k})")
    if 0 < p.fit_points < p.k:
        fail("pseudolabel.fit_points", f"use 0 (all clips) or at least pseudolabel.k ({p.k})")


def _leaves(obj, prefix: str = ""):
    """(dotted key, owning dataclass, field name, value) of every value in the config."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, prefix + f.name + ".")
        else:
            yield prefix + f.name, obj, f.name, value
