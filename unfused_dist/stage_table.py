"""The stages of a run, declared once. The local pipeline, the SLURM launcher, `unfused status`, `evaluate`,
config validation and the run layout all read this table: adding a stage or a fine-tune row is one entry
here plus the module that runs it.

A stage runs `runner(cfg)` in every one of its processes: `run.nproc` ranks (torchrun here, SLURM tasks on
a cluster) when `ranked`, else one process. It writes `done.json` into its directory under the run
(`out`; None: it runs every time, as the cheap report does) and needs the stages in `after` done first.
On SLURM a stage is one job, or the `jobs` listed (pseudo-labelling: an array of embedding tasks, one
k-means job, an array of assignment tasks, one job that writes the label shards).

A project of one's own extends the table in its own module (`STAGES.with_row(Row(...))`,
`STAGES.with_stage(Stage(...))`) and names it in the config: `run.stages=mypackage.stages:TABLE`.
Nothing here imports a stage's module until that stage runs (scikit-learn, FAISS and DeepSpeed take
seconds to import, in every process).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from importlib import import_module
from typing import TYPE_CHECKING, Callable

from .errors import ConfigError, UnfusedError

if TYPE_CHECKING:
    from .config import Config

EVERY_ROW = "finetune-*"  # in `after`: every fine-tune row of the run


@dataclass(frozen=True)
class Row:
    """A row of the results table: fine-tuning (all weights, as ranks) or a linear probe (one process, on
    frozen embeddings) of the encoder that stage `init` exported, or of a random one (init None)."""
    name: str
    init: str | None
    mode: str  # "finetune" | "probe"

    def __post_init__(self):
        if self.mode not in ("finetune", "probe"):
            raise ValueError(f"row {self.name}: mode must be 'finetune' or 'probe', not {self.mode!r}")


@dataclass(frozen=True)
class Job:
    """One SLURM job (or job array) of a stage."""
    name: str
    runner: str  # "module:function", called as function(cfg, part, parts) for an array, else function(cfg)
    ranked: bool  # its tasks form one torch.distributed process group; else it runs as one process
    array: bool = False  # one task per part of the stage's shards (resources' array_parts), each on its own
    section: str = ""  # its resources section (configs/slurm/*.yaml); empty: its name


@dataclass(frozen=True)
class Stage:
    name: str
    runner: str  # "module:function", called as function(cfg) in every process of the stage
    out: str | None  # its directory under the run dir; None: no done.json, it runs every time
    ranked: bool
    after: tuple[str, ...] = ()
    jobs: tuple[Job, ...] = ()  # on SLURM; empty: one job named and run like the stage
    row: Row | None = None

    def load(self) -> Callable[[Config], None]:
        """The function that runs the stage (importing its module now, and only its module)."""
        fn = resolve(self.runner)
        return partial(fn, row=self.row) if self.row is not None else fn

    def slurm_jobs(self) -> tuple[Job, ...]:
        return self.jobs or (Job(self.name, self.runner, self.ranked, section="finetune" if self.row else ""),)


def row_stage(row: Row) -> Stage:
    return Stage(f"finetune-{row.name}", "unfused_dist.stages.finetune:run", f"finetune/{row.name}",
                 ranked=row.mode == "finetune", after=(row.init,) if row.init else (), row=row)


class StageTable:
    """An ordered set of stages; rows are stages too (`finetune-<row>`), run in the order the config's
    `finetune.rows` names them, between the stages declared before and after them."""

    def __init__(self, stages: list[Stage]):
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage table: a stage is declared twice: {names}")
        self.stages = list(stages)
        self._by_name = {s.name: s for s in stages}

    @property
    def rows(self) -> dict[str, Row]:
        return {s.row.name: s.row for s in self.stages if s.row is not None}

    def with_row(self, row: Row) -> StageTable:
        """A new table with `row` after the existing rows."""
        last = max(i for i, s in enumerate(self.stages) if s.row is not None)
        return StageTable([*self.stages[:last + 1], row_stage(row), *self.stages[last + 1:]])

    def with_stage(self, stage: Stage, before: str | None = None) -> StageTable:
        """A new table with `stage` inserted before stage `before` (default: at the end)."""
        i = len(self.stages) if before is None else [s.name for s in self.stages].index(before)
        return StageTable([*self.stages[:i], stage, *self.stages[i:]])

    def stage(self, name: str) -> Stage:
        if name not in self._by_name:
            raise UnfusedError(f"unknown stage '{name}'; stages: {', '.join(self._by_name)}, or 'pipeline'")
        return self._by_name[name]

    def for_run(self, cfg: Config) -> list[Stage]:
        """The stages of a run of `cfg`, in order: its rows are those `finetune.rows` names, and a stage
        after EVERY_ROW waits for exactly those."""
        chosen = [f"finetune-{r}" for r in cfg.finetune.rows]
        out, rows_placed = [], False
        for s in self.stages:
            if s.row is not None:
                if not rows_placed:
                    out += [self._by_name[name] for name in chosen]
                    rows_placed = True
                continue
            if EVERY_ROW in s.after:
                after = tuple(a for a in s.after if a != EVERY_ROW) + tuple(chosen)
                s = dataclasses.replace(s, after=after)
            out.append(s)
        return out

    def names(self, cfg: Config) -> list[str]:
        return [s.name for s in self.for_run(cfg)]

    def job_sections(self) -> tuple[str, ...]:
        """The resources sections its SLURM jobs read (configs/slurm/*.yaml)."""
        return tuple(dict.fromkeys(j.section or j.name for s in self.stages for j in s.slurm_jobs()))


def resolve(spec: str):
    module, _, attr = spec.partition(":")
    return getattr(import_module(module), attr)


_PSEUDOLABEL = "unfused_dist.stages.pseudolabel"
_ROWS = [Row("scratch", None, "finetune"), Row("teacher_probe", "pretrain", "probe"),
         Row("teacher_finetune", "pretrain", "finetune"), Row("unfused_probe", "distill", "probe"),
         Row("unfused_finetune", "distill", "finetune")]

STAGES = StageTable([
    Stage("pretrain", "unfused_dist.stages.pretrain:run", "pretrain", ranked=True),
    # Locally one stage (every rank embeds its shards, k-means over all ranks, labels written by rank 0); on
    # SLURM four jobs, so the embedding and the assignment spread over as many array tasks as resources say.
    Stage("pseudolabel", f"{_PSEUDOLABEL}:run", "pseudolabel", ranked=True, after=("pretrain",),
          jobs=(Job("pseudolabel-embed", f"{_PSEUDOLABEL}:embed", ranked=False, array=True),
                Job("pseudolabel-fit", f"{_PSEUDOLABEL}:fit", ranked=True),
                Job("pseudolabel-assign", f"{_PSEUDOLABEL}:assign", ranked=False, array=True),
                Job("pseudolabel-finish", f"{_PSEUDOLABEL}:finish", ranked=False))),
    Stage("distill", "unfused_dist.stages.distill:run", "distill", ranked=True, after=("pseudolabel",)),
    *[row_stage(r) for r in _ROWS],
    Stage("evaluate", "unfused_dist.stages.evaluate:run", None, ranked=False, after=(EVERY_ROW,)),
])


def load_table(spec: str) -> StageTable:
    """The table a config names in run.stages ("module:attribute"); empty: the built-in STAGES."""
    if not spec:
        return STAGES
    try:
        table = resolve(spec)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"run.stages={spec}: cannot load a stage table from it ({e}); give module:attribute "
                          "of a StageTable importable here (on PYTHONPATH), or leave it empty") from None
    if not isinstance(table, StageTable):
        raise ConfigError(f"run.stages={spec}: {type(table).__name__} is not a StageTable")
    return table


def table_of(cfg: Config) -> StageTable:
    return load_table(cfg.run.stages)
