"""Typed configuration: dataclasses per component, YAML load, dotted `key=value` overrides, validation.

Every key a user can write is a field below. An unknown key is a one-line error naming the key and the
nearest valid one; a value of the wrong type, or outside its choices (CHOICES) or range (RANGES), is a
one-line error naming the key, the value, where it came from (file or command line) and what to use.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .artefacts import atomic_write_text
from .audio.frontend import FrontendConfig
from .config_yaml import Scalar, parse_yaml, plain, read_yaml, yaml_problem
from .errors import ConfigError


@dataclass
class RunConfig:
    name: str = "demo"
    dir: str = ""  # empty: runs/<name>
    seed: int = 0
    nproc: int = 1  # processes per training stage when run locally (torchrun on this machine)
    # auto: cuda:LOCAL_RANK when torch sees CUDA, else the CPU; cuda: refuse to run without one; cpu: stay on it
    device: str = "auto"
    # The stage table (stage_table.py), as module:attribute; empty: the built-in stages and rows
    stages: str = ""

    @property
    def path(self) -> Path:
        return Path(self.dir or f"runs/{self.name}")


@dataclass
class DataConfig:
    pool: str = "data/demo/shards/pool/train"  # unlabelled pre-training dataset (one split dir)
    target: str = "data/demo/shards/kws"  # labelled target dataset: a folder with train/ val/ test/ splits
    task: str = "kws"  # name shown in the report
    # The task's crop length (METHOD.md: 1 s keyword spotting ... 8 s speaker ID): fine-tuning trains on random
    # crops of it; embedding and evaluation use its centre crop (padded if shorter).
    task_seconds: float = 1.0
    num_workers: int = 1  # DataLoader workers per rank
    shuffle_buffer: int = 1000
    eval_batch_size: int = 128  # clips per batch wherever a frozen model embeds or scores clips
    # A sample that cannot be decoded: "skip" (logged by shard and key, replaced by the next good one so
    # every rank still takes the same number of steps) or "fail" (stop the run, naming shard and key).
    bad_samples: str = "skip"
    # Workers draw shards with replacement instead of splitting them: allows fewer shards than
    # ranks x workers, at the cost of samples repeating (and others missing) within an epoch.
    resampled: bool = False


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | constant


@dataclass
class EngineConfig:
    zero_stage: int = 1  # 0 (plain data parallel), 1 (optimizer states), 2 (+ gradients), 3 (+ parameters)
    # fp32, or bf16 mixed precision (autocast; weights, optimizer, frontend, losses and BatchNorm in fp32).
    # fp16 is refused: use bf16 (dsconfig.check says why).
    precision: str = "fp32"
    offload: str = "none"  # none | cpu: optimizer states (and, at stage 3, parameters) in host memory
    grad_accum: int = 1
    grad_clip: float = 0.0  # 0: off
    # Resume from a checkpoint written by a different number of processes (its fp32 weights, from the start of
    # its epoch) instead of refusing; `unfused run --reshard` sets it for that command only.
    reshard: bool = False
    save_every_steps: int = 200  # 0: off
    save_every_minutes: float = 10.0  # 0: off; checked every step, rank 0's clock decides
    keep_checkpoints: int = 2  # the newest complete checkpoints kept; older ones are deleted


@dataclass
class PretrainConfig:
    n_fc: int = 3
    batch_size: int = 64
    epochs: int = 2
    max_steps: int = 0  # 0: epochs decide
    ema: float = 0.999
    proj_dim: int = 128
    n_clusters: int = 128
    temperature: float = 0.1
    cluster_temperature: float = 1.0
    cluster_weight: float = 1.0
    mixup_ratio: float = 0.4
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(name="adamw", lr=1e-3, weight_decay=1e-4,
                                                                   warmup_steps=20))


@dataclass
class PseudoLabelConfig:
    k: int = 32
    pca_dim: int = 128
    layer: str = "final"  # final (clip embedding) | block1 (x1, as in the authors' code)
    backend: str = "cpu"  # cpu (faiss) | gpu (faiss-gpu, or torch on the GPU) | distributed (every rank its points)
    gpus: int = 0  # gpu backend: GPUs of this node to use, 0 = all
    init: str = "kmeans++"  # kmeans++ | sampled
    init_points: int = 30000  # points the initialisation sees (k-means++ costs init_points x k)
    pca_points: int = 100000  # points PCA-whitening is fitted on
    fit_points: int = 200000  # points Lloyd iterates over (0: all); every point is assigned afterwards
    iterations: int = 20
    max_points_per_centroid: int = 100000  # a cap on fit points (k x this), logged; never a silent subsample


@dataclass
class DistillConfig:
    n_fc: int = 2
    batch_size: int = 64
    epochs: int = 5
    max_steps: int = 0
    head_ce: float = 0.7
    kl: float = 0.3
    cosine: float = 0.003
    mixup_ratio: float = 0.4
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(name="sgd", lr=0.03, warmup_steps=10))


@dataclass
class FinetuneConfig:
    rows: list[str] = field(default_factory=lambda: ["scratch", "teacher_probe", "teacher_finetune",
                                                     "unfused_probe", "unfused_finetune"])
    labels_per_class: int = 0  # 0: every labelled training clip; N: a seeded budget of N clips per class
    batch_size: int = 32
    epochs: int = 10
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(name="adam", lr=1e-3, weight_decay=0.0))
    probe_epochs: int = 100
    probe_optim: OptimConfig = field(default_factory=lambda: OptimConfig(name="adam", lr=1e-3,
                                                                         weight_decay=0.0, schedule="constant"))


@dataclass
class MetricsConfig:
    """Prometheus exporter of each rank (metrics/exporter.py)."""
    enabled: bool = True
    addr: str = "127.0.0.1"  # bind address; 0.0.0.0 (or the node's address) to be scraped from other hosts
    port: int = 0  # rank r serves on port + local rank; 0: a free port chosen by the OS
    targets_dir: str = ""  # Prometheus file_sd target files, one per rank; empty: RUN/metrics/targets


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    audio: FrontendConfig = field(default_factory=FrontendConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    pseudolabel: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """What the run computes, as a dict: without how it runs (RUNTIME_KEYS) or where its outputs go
        (run.dir: the run dir is the identity, so a moved run dir still resumes), and with the data paths
        normalised, so that `d`, `d/`, `./d` and `/abs/d` are the same run."""
        d = self.to_dict()
        for dotted in (*RUNTIME_KEYS, "run.dir"):
            section, key = dotted.split(".")
            d[section].pop(key)
        for dotted in DATA_PATH_KEYS:
            section, key = dotted.split(".")
            d[section][key] = normalise_path(d[section][key])
        return d

    def hash(self) -> str:
        """Identity of what the run computes (see identity()): checkpoints and results store it, and a
        resume compares it. A changed process count is caught by the checkpoint (refused, or --reshard)."""
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]


# Keys that moved to the section that owns them: an old config gets a one-line error naming the new key.
MOVED = {"pretrain.norm_clips": "audio.norm_clips", "pseudolabel.batch_size": "data.eval_batch_size"}
RUNTIME_KEYS = ("run.nproc", "run.device", "engine.reshard", "engine.save_every_steps", "engine.save_every_minutes", "engine.keep_checkpoints",
                "metrics.enabled", "metrics.addr", "metrics.port", "metrics.targets_dir")
DATA_PATH_KEYS = ("data.pool", "data.target")


def normalise_path(path: str) -> str:
    """One spelling per directory (relative to the working directory, as the stages read it)."""
    return os.path.realpath(path) if path else path


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- `a.b=value` overrides (values parsed as YAML, except for string keys, which
    take the text as written), then every value checked against its choices and range."""
    sources: dict[str, str] = {}  # dotted key -> where its value came from, for the error messages
    cfg = Config()
    if path is not None:
        _update(cfg, read_yaml(Path(path)), prefix="", where=str(path), sources=sources)
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override '{item}': expected key=value, e.g. run.dir=runs/x")
        _set_dotted(cfg, key, _override_value(key, value, item), where="command line", sources=sources)
    from .config_rules import validate  # the rules need the dataclasses above

    validate(cfg, sources)
    return cfg


def save_config(cfg: Config, path: Path) -> None:
    """Written whole or not at all: every stage's rank 0 saves it again while the other ranks read it."""
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _override_value(key: str, text: str, item: str) -> Any:
    """A string key takes the text as written (`run.name=12:30` is not 750), without surrounding spaces,
    and unquoted as YAML when quoted whole (`'run.name="a b"'`); others parse it as YAML."""
    if _leaf_type(key) is str:
        text = text.strip()
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            try:
                unquoted = parse_yaml(text)
            except yaml.YAMLError as e:
                raise ConfigError(f"override '{item}': not a valid quoted string ({yaml_problem(e)})") from None
            return unquoted if isinstance(unquoted, str) else text
        return text
    if not text.strip():
        return ""
    try:
        return parse_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{item}': not a valid value ({yaml_problem(e)})") from None


def _leaf_type(dotted: str) -> Any:
    """The declared type of a dotted key (None: unknown key or a section; _set_dotted names the error)."""
    cls: Any = Config
    for part in dotted.split("."):
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            return None
        cls = hints[part]
    return None if dataclasses.is_dataclass(cls) else cls


# ---- setting keys --------------------------------------------------------------------------------------

def _update(obj, raw: Any, prefix: str, where: str, sources: dict[str, str] | None = None) -> None:
    raw = plain(raw)
    if raw is None:  # a section whose keys are all commented out
        return
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: '{prefix.rstrip('.')}' must be a mapping, got {type(raw).__name__}")
    for key, value in raw.items():
        _set_dotted(obj, str(key), value, where=where, prefix=prefix, sources=sources)


def _set_dotted(obj, dotted: str, value: Any, where: str, prefix: str = "",
                sources: dict[str, str] | None = None) -> None:
    head, _, rest = dotted.partition(".")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    full = prefix + head
    if head not in fields:
        if full in MOVED:
            raise ConfigError(f"{where}: '{full}' has moved: write '{MOVED[full]}' instead (same meaning)")
        valid = [prefix + n for n in fields]
        near = difflib.get_close_matches(full, valid, n=1) or difflib.get_close_matches(full, _all_keys(), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else f" (valid: {', '.join(valid)})"
        raise ConfigError(f"{where}: unknown key '{full}'{hint}")
    ftype = typing.get_type_hints(type(obj))[head]
    current = getattr(obj, head)
    if dataclasses.is_dataclass(current):
        if rest:
            _set_dotted(current, rest, value, where, prefix=full + ".", sources=sources)
        else:  # a mapping updates the section in place, keeping the section's own defaults
            _update(current, value, prefix=full + ".", where=where, sources=sources)
        return
    if rest:
        raise ConfigError(f"{where}: '{full}' is a value, not a section; cannot set '{prefix + dotted}'")
    setattr(obj, head, _coerce(value, ftype, full, where))
    if sources is not None:
        sources[full] = where


def _coerce(value: Any, ftype, key: str, where: str):
    if ftype is str and isinstance(value, Scalar):
        return value.text  # what the user wrote, not YAML 1.1's reading of it (010 -> 8, 12:30 -> 750)
    if isinstance(value, Scalar):
        value = _number_as_written(value, key, where)
    origin = typing.get_origin(ftype)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(ftype) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], key, where)
    if origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{where}: '{key}' expects a mapping, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(ftype)
        if not isinstance(value, list):
            value = [value]
        return [_coerce(v, item, key, where) for v in value]
    if ftype is float and not isinstance(value, bool):
        try:  # YAML 1.1 reads '1e-3' as a string
            return float(value)
        except (TypeError, ValueError):
            pass
    if ftype is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # from callers that parse YAML themselves (launchers/resources.py)
    if isinstance(value, ftype) and not (ftype is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where}: '{key}' expects {ftype.__name__}, got {value!r}")


def _number_as_written(scalar: Scalar, key: str, where: str) -> Any:
    """YAML 1.1 reads `010` as octal 8 and `1:30` as 90 (base 60): refuse both rather than guess."""
    text = scalar.text.lstrip("+-")
    if isinstance(scalar.value, (int, float)) and not isinstance(scalar.value, bool) and (
            ":" in text or (len(text) > 1 and text[0] == "0" and text[1].isdigit())):
        raise ConfigError(f"{where}: '{key}' is written {scalar.text}, which YAML reads as {scalar.value}; "
                          "write the number without leading zeros or colons")
    return scalar.value


def _all_keys(cls=Config, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        t = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(t):
            keys += _all_keys(t, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys
