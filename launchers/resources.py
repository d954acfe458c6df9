"""Per-job SLURM resources from configs/slurm/*.yaml: a `default` section, overridden per job name."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from unfused_dist.stage_table import STAGES, StageTable

from unfused_dist.config import ConfigError, _update


@dataclass
class Resources:
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 1
    cpus_per_task: int = 2
    mem_gb: float = 8
    time_min: int = 60
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    signal_seconds: int = 120
    extra: dict[str, Any] = field(default_factory=dict)

    def executor_parameters(self, name: str) -> dict[str, Any]:
        """submitit AutoExecutor parameters (slurm_* ones are ignored by the local executor)."""
        params: dict[str, Any] = {
            "name": name, "nodes": self.nodes, "tasks_per_node": self.tasks_per_node,
            "cpus_per_task": self.cpus_per_task, "gpus_per_node": self.gpus_per_node or None,
            "mem_gb": self.mem_gb, "timeout_min": self.time_min, "slurm_signal_delay_s": self.signal_seconds,
        }
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(self, key):
                params[f"slurm_{key}"] = getattr(self, key)
        if self.extra:
            params["slurm_additional_parameters"] = dict(self.extra)
        return {k: v for k, v in params.items() if v is not None}


@dataclass
class ClusterResources:
    default: Resources = field(default_factory=Resources)
    jobs: dict[str, dict] = field(default_factory=dict)  # job kind -> overrides
    array_parts: int = 4
    source: str = ""  # the resources file, for error messages ("" : the built-in defaults)

    def section_of(self, kind: str) -> str:
        """Where a job's resources come from, for error messages: "section 'pretrain' of FILE"."""
        section = kind if kind in self.jobs else "default"
        return f"section '{section}' of {self.source}" if self.source else "the built-in default resources"

    def for_job(self, kind: str) -> Resources:
        res = dataclasses.replace(self.default, extra=dict(self.default.extra))
        _update(res, self.jobs.get(kind, {}), prefix=f"{kind}.", where=f"resources for {kind}")
        return res


def load_resources(path: str | Path | None, table: StageTable = STAGES) -> ClusterResources:
    """A resources file's sections: default, array_parts and one per kind of job of the stage table."""
    sections = table.job_sections()
    if path is None:
        return ClusterResources()
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: resources file not found (see configs/slurm/ for examples)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a resources file is a mapping of sections (default:, pretrain:, ...), "
                          f"not a {type(raw).__name__}; see configs/slurm/default.yaml")
    out = ClusterResources(source=str(path))
    for key, value in raw.items():
        if key != "array_parts" and not isinstance(value or {}, dict):
            raise ConfigError(f"{path}: section '{key}' must be a mapping of keys (cpus_per_task: 4, ...), "
                              f"got {value!r}")
        if key == "default":
            _update(out.default, value or {}, prefix="default.", where=str(path))
            _check_values(out.default, value or {}, "default", path)
        elif key == "array_parts":
            # bool is an int to Python, but `array_parts: yes` is a mistake, not 1 part
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{path}: array_parts must be a whole number >= 1, got {value!r}")
            out.array_parts = value
        elif key in sections:
            section = Resources()
            _update(section, value or {}, prefix=f"{key}.", where=str(path))  # validate the keys now
            _check_values(section, value or {}, key, path)
            out.jobs[key] = value or {}
        else:
            raise ConfigError(f"{path}: unknown section '{key}'; use default, array_parts or one of "
                              f"{', '.join(sections)}")
    return out


# The least value of each numeric key that sbatch can be given (0 GPUs: a CPU job).
MINIMUM = {"nodes": 1, "gpus_per_node": 0, "tasks_per_node": 1, "cpus_per_task": 1, "time_min": 1,
           "signal_seconds": 0}


def _check_values(res: Resources, raw: dict, section: str, path) -> None:
    """Refuse here what sbatch would refuse (or worse, accept): a zero or negative count or time."""
    for key in raw:
        value = getattr(res, key)
        if key in MINIMUM and value < MINIMUM[key]:
            raise ConfigError(f"{path}: '{section}.{key}' must be >= {MINIMUM[key]}, got {value}")
        if key == "mem_gb" and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{path}: '{section}.mem_gb' must be > 0, got {value}")
