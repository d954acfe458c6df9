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
from unfused_dist.run_layout import RunLayout
from unfused_dist.stage_table import table_of

from .jobs import StageJob
from .queue import describe_failures, live_ids, scancel
from .resources import ClusterResources



@dataclass
class JobSpec:
    name: str
    after: list[str] = field(default_factory=list)
    array: int = 0  # > 0: an array job of that many parts
    ranked: bool = False  # its tasks form one process group (else: one process with all the CPUs)
    section: str = ""  # its resources section


@dataclass
class Submitted:
    name: str
    job_ids: list[str]
    after: list[str]
    array: int
    folder: str
    submitted: float


def job_graph(cfg: Config, target: str, parts: int) -> list[JobSpec]:
    """The jobs for `target` (a stage name or 'pipeline'), in submission order, from the run's stage table:
    each stage's SLURM jobs in a chain, the first after the last job of every stage it needs."""
    table, layout = table_of(cfg), RunLayout.of(cfg)
    stages = table.for_run(cfg)
    if target != "pipeline":
        if target not in [s.name for s in stages]:
            table.stage(target)  # an unknown name: the table's error
            raise UnfusedError(f"stage '{target}' is not in this run (finetune.rows: {', '.join(cfg.finetune.rows)})")
        stages = [s for s in stages if s.name == target]
    wanted = [s for s in stages if (d := layout.stage(s.name)) is None or not is_done(d)]
    last_job = {s.name: s.slurm_jobs()[-1].name for s in wanted}  # only stages submitted in this launch
    jobs: list[JobSpec] = []
    for stage in wanted:
        chain = [last_job[a] for a in stage.after if a in last_job]
        for job in stage.slurm_jobs():
            jobs.append(JobSpec(job.name, chain, parts if job.array else 0, job.ranked, job.section or job.name))
            chain = [job.name]
    return jobs


def launch(cfg: Config, config_path: Path, target: str, cluster: str, resources: ClusterResources) -> list[Submitted]:
    """Submit the jobs; on SLURM returns at once, locally when the last job has finished."""
    layout = RunLayout.of(cfg)
    with _only_launch(layout):
        specs = job_graph(cfg, target, resources.array_parts)
        if not specs:
            print(f"[launch] {target}: every stage is done already ({layout.root})")
            return []
        _refuse_if_live(layout.root)
        return _submit_all(cfg, config_path, cluster, resources, specs)


def _only_launch(layout: RunLayout):
    """One `unfused launch` of a run at a time: two started together would both pass _refuse_if_live and
    queue two pipelines into the same directories."""
    return exclusive_lock(layout.launch_lock, unlocked="start one launch of a run at a time",
                          busy=f"{layout.root}: another `unfused launch` of this run is still submitting (or running it "
                               "locally); wait for it to return, then check `unfused status`")


def _submit_all(cfg: Config, config_path: Path, cluster: str, resources: ClusterResources,
                specs: list[JobSpec]) -> list[Submitted]:
    layout = RunLayout.of(cfg)
    layout.metrics_targets(cfg.metrics.targets_dir).mkdir(parents=True, exist_ok=True)
    ids: dict[str, str] = {}  # job name -> SLURM job id (an array's base id covers all its tasks)
    submitted = []
    launch_id = time.strftime("%Y%m%dT%H%M%S") + f"-{time.time_ns() % 10**6:06d}"
    for spec in specs:
        res = resources.for_job(spec.section)
        if not spec.ranked:
            # one process, as in the local pipeline, with the CPUs the section gives all of its tasks
            res.cpus_per_task *= res.nodes * res.tasks_per_node
            res.nodes, res.tasks_per_node = 1, 1
        folder = layout.slurm(spec.name)
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
            raise _refused(layout.root, spec.name, resources.section_of(spec.section), e, submitted) from None
        ids[spec.name] = jobs[0].job_id.split("_")[0]
        submitted.append(Submitted(spec.name, [j.job_id for j in jobs], spec.after, spec.array, str(folder),
                                   time.time()))
        print(f"[launch] {spec.name}: job {ids[spec.name]}" + (f" (array of {spec.array})" if spec.array else "")
              + (f", after {', '.join(spec.after)}" if spec.after else ""), flush=True)
        if cluster != "slurm":  # no scheduler to hold the dependents: wait here
            for job in jobs:
                job.results()  # every task of a multi-task job
        _record(layout, launch_id, cluster, submitted)
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


def _record(layout: RunLayout, launch_id: str, cluster: str, submitted: list[Submitted]) -> None:
    """Write this launch into RUN/launch.json (earlier launches of the same run stay, for the record)."""
    path = layout.launch_file
    launches = [entry for entry in (json.loads(path.read_text()) if path.exists() else []) if entry["id"] != launch_id]
    launches.append({"id": launch_id, "cluster": cluster, "jobs": [asdict(s) for s in submitted]})
    atomic_write_text(path, json.dumps(launches, indent=1))


def launched_jobs(run: Path) -> list[dict]:
    """Every job of every launch of the run, oldest launch first (with its launch's "cluster")."""
    path = RunLayout(Path(run)).launch_file
    if not path.exists():
        return []
    return [{**job, "cluster": launch_["cluster"]} for launch_ in json.loads(path.read_text())
            for job in launch_["jobs"]]


def latest_jobs(run: Path) -> dict[str, dict]:
    """Job name -> its most recent submission (from every launch of the run)."""
    return {job["name"]: job for job in launched_jobs(run)}
