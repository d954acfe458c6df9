"""Submit a run's stages as submitit jobs: on SLURM, every job at once, chained with afterok dependencies;
locally, the same jobs one after another. What was submitted goes to RUN/launch.json (for status/cancel).

The job graph of `pipeline`:

    pretrain -> pseudolabel-embed [array] -> pseudolabel-fit -> pseudolabel-assign [array]
             -> pseudolabel-finish -> distill
    finetune-scratch; finetune-teacher_* after pretrain; finetune-unfused_* after distill
    evaluate after every finetune row

Stages already done (done.json) are not submitted, and dependencies on them are dropped. A launch is refused
while jobs of an earlier launch of the run are still pending or running (they would train into the same
directories, and the new jobs would not wait for them). A job whose dependency failed is cancelled by SLURM
(kill-on-invalid-dep), not left pending; a submission sbatch refuses cancels the jobs this launch had queued.
"""
from __future__ import annotations

import json
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import submitit

from unfused_dist.artefacts import atomic_write_text, exclusive_lock, is_done
from unfused_dist.config import Config
from unfused_dist.errors import UnfusedError
from unfused_dist.pipeline import stage_dir, stage_names

from .jobs import StageJob, job_kind
from .queue import describe_failures, live_ids, scancel
from .resources import ClusterResources

LAUNCH_FILE = "launch.json"
LOCK_FILE = ".launch.lock"  # held while a launch checks the queue and submits
PSEUDOLABEL_JOBS = ["pseudolabel-embed", "pseudolabel-fit", "pseudolabel-assign", "pseudolabel-finish"]
ARRAYS = {"pseudolabel-embed", "pseudolabel-assign"}


@dataclass
class JobSpec:
    name: str
    after: list[str] = field(default_factory=list)
    array: int = 0  # > 0: an array job of that many parts


@dataclass
class Submitted:
    name: str
    job_ids: list[str]
    after: list[str]
    array: int
    folder: str
    submitted: float


def job_graph(cfg: Config, target: str, parts: int) -> list[JobSpec]:
    """The jobs for `target` (a stage name or 'pipeline'), in submission order."""
    stages = stage_names(cfg) if target == "pipeline" else [target]
    unknown = [s for s in stages if s not in stage_names(cfg)]
    if unknown:
        raise UnfusedError(f"unknown stage '{unknown[0]}'; stages: {', '.join(stage_names(cfg))}, or 'pipeline'")
    done = {s for s in stages if (d := stage_dir(cfg, s)) is not None and is_done(d)}
    wanted = [s for s in stages if s not in done]
    last = {"pretrain": "pretrain", "pseudolabel": "pseudolabel-finish", "distill": "distill"}
    row_after = {"scratch": [], "teacher_probe": ["pretrain"], "teacher_finetune": ["pretrain"],
                 "unfused_probe": ["distill"], "unfused_finetune": ["distill"]}

    def deps(*stages_needed: str) -> list[str]:  # only stages submitted in this launch
        return [last.get(s, s) for s in stages_needed if s in wanted]

    jobs: list[JobSpec] = []
    for stage in wanted:
        if stage == "pseudolabel":
            chain = deps("pretrain")
            for name in PSEUDOLABEL_JOBS:
                jobs.append(JobSpec(name, chain, parts if name in ARRAYS else 0))
                chain = [name]
        elif stage == "distill":
            jobs.append(JobSpec(stage, deps("pseudolabel")))
        elif stage.startswith("finetune-"):
            jobs.append(JobSpec(stage, deps(*row_after.get(stage.split("-", 1)[1], []))))
        elif stage == "evaluate":
            jobs.append(JobSpec(stage, [s for s in wanted if s.startswith("finetune-")]))
        else:
            jobs.append(JobSpec(stage))
    return jobs


def launch(cfg: Config, config_path: Path, target: str, cluster: str, resources: ClusterResources) -> list[Submitted]:
    """Submit the jobs; on SLURM returns at once, locally when the last job has finished."""
    with _only_launch(cfg.run.path):
        specs = job_graph(cfg, target, resources.array_parts)
        if not specs:
            print(f"[launch] {target}: every stage is done already ({cfg.run.path})")
            return []
        _refuse_if_live(cfg.run.path)
        return _submit_all(cfg, config_path, cluster, resources, specs)


def _only_launch(run: Path):
    """One `unfused launch` of a run at a time: two started together would both pass _refuse_if_live and
    queue two pipelines into the same directories."""
    return exclusive_lock(run / LOCK_FILE, unlocked="start one launch of a run at a time",
                          busy=f"{run}: another `unfused launch` of this run is still submitting (or running it "
                               "locally); wait for it to return, then check `unfused status`")


def _submit_all(cfg: Config, config_path: Path, cluster: str, resources: ClusterResources,
                specs: list[JobSpec]) -> list[Submitted]:
    (Path(cfg.metrics.targets_dir or cfg.run.path / "metrics" / "targets")).mkdir(parents=True, exist_ok=True)
    ids: dict[str, str] = {}  # job name -> SLURM job id (an array's base id covers all its tasks)
    submitted = []
    launch_id = time.strftime("%Y%m%dT%H%M%S") + f"-{time.time_ns() % 10**6:06d}"
    for spec in specs:
        res = resources.for_job(job_kind(spec.name))
        if spec.name.endswith("_probe") or spec.name in ARRAYS or spec.name in ("pseudolabel-finish", "evaluate"):
            # one process, as in the local pipeline, with the CPUs the section gives all of its tasks
            res.cpus_per_task *= res.nodes * res.tasks_per_node
            res.nodes, res.tasks_per_node = 1, 1
        folder = cfg.run.path / "slurm" / spec.name
        executor = submitit.AutoExecutor(folder=folder / "%j", cluster=None if cluster == "slurm" else cluster)
        params = res.executor_parameters(f"{cfg.run.name}-{spec.name}")
        after = [ids[a] for a in spec.after if a in ids]
        if after and cluster == "slurm":
            # kill-on-invalid-dep: when a job it waits for fails, SLURM cancels this one instead of leaving
            # it pending forever (DependencyNeverSatisfied)
            params["slurm_additional_parameters"] = {**params.get("slurm_additional_parameters", {}),
                                                     "dependency": "afterok:" + ":".join(after),
                                                     "kill-on-invalid-dep": "yes"}
        executor.update_parameters(**params)
        try:
            jobs = _submit(executor, spec, str(config_path))
        except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError) as e:
            raise _refused(cfg.run.path, spec.name, resources.section_of(job_kind(spec.name)), e, submitted) from None
        ids[spec.name] = jobs[0].job_id.split("_")[0]
        submitted.append(Submitted(spec.name, [j.job_id for j in jobs], spec.after, spec.array, str(folder),
                                   time.time()))
        print(f"[launch] {spec.name}: job {ids[spec.name]}" + (f" (array of {spec.array})" if spec.array else "")
              + (f", after {', '.join(spec.after)}" if spec.after else ""), flush=True)
        if cluster != "slurm":  # no scheduler to hold the dependents: wait here
            for job in jobs:
                job.results()  # every task of a multi-task job
        _record(cfg.run.path, launch_id, cluster, submitted)
    return submitted


def _refuse_if_live(run: Path) -> None:
    """Refuse to launch while jobs of an earlier launch of the run are pending or running."""
    live = live_ids([j for job in launched_jobs(run) if job["cluster"] == "slurm" for j in job["job_ids"]])
    if live:
        raise UnfusedError(f"{run}: jobs {', '.join(live)} of an earlier launch are still pending or running; "
                           f"wait for them to finish, or `unfused cancel {shlex.quote(str(run))}`, then launch again")


def _refused(run: Path, name: str, section: str, error: Exception, submitted: list[Submitted]) -> UnfusedError:
    """sbatch refused job `name`: cancel what this launch already queued (a relaunch would queue it again),
    and say what was refused, why, and where its resources come from."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    why = next((line for line in reversed(lines) if "error" in line.lower()), lines[-1] if lines else "")
    queued = [s.job_ids[0].split("_")[0] for s in submitted]  # an array's base id cancels all its tasks
    failed = scancel(queued)
    if not queued:
        done = "no job of this launch was queued"
    elif failed:
        done = (f"could not cancel the jobs this launch had queued: {describe_failures(failed)}; "
                f"`unfused cancel {shlex.quote(str(run))}`")
    else:
        done = f"cancelled the jobs this launch had queued ({', '.join(queued)})"
    return UnfusedError(f"sbatch refused job {name} (resources: {section}): {why.strip()}; {done}")


def _submit(executor: submitit.AutoExecutor, spec: JobSpec, config_path: str) -> list[submitit.Job]:
    if spec.array:
        n = spec.array
        return executor.map_array(StageJob(), [config_path] * n, [spec.name] * n, list(range(n)), [n] * n)
    return [executor.submit(StageJob(), config_path, spec.name)]


def _record(run: Path, launch_id: str, cluster: str, submitted: list[Submitted]) -> None:
    """Write this launch into RUN/launch.json (earlier launches of the same run stay, for the record)."""
    path = run / LAUNCH_FILE
    launches = [entry for entry in (json.loads(path.read_text()) if path.exists() else []) if entry["id"] != launch_id]
    launches.append({"id": launch_id, "cluster": cluster, "jobs": [asdict(s) for s in submitted]})
    atomic_write_text(path, json.dumps(launches, indent=1))


def launched_jobs(run: Path) -> list[dict]:
    """Every job of every launch of the run, oldest launch first (with its launch's "cluster")."""
    path = Path(run) / LAUNCH_FILE
    if not path.exists():
        return []
    return [{**job, "cluster": launch_["cluster"]} for launch_ in json.loads(path.read_text())
            for job in launch_["jobs"]]


def latest_jobs(run: Path) -> dict[str, dict]:
    """Job name -> its most recent submission (from every launch of the run)."""
    return {job["name"]: job for job in launched_jobs(run)}
