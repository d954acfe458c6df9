"""The one training engine: a DeepSpeed engine around a `TrainModule` (module.py: forward(*batch) returns
(loss, logs)) on this rank's device (device.py), in fp32 or bf16 autocast (precision.py); a train loop with
progress, checkpoints (every N steps, every M minutes, and on SIGTERM / SIGUSR2), and automatic, exact resume.

What a checkpoint holds beyond DeepSpeed's module/optimizer/scheduler state: the position (epoch, batches
into it, global step), the loss history, every rank's loader state, RNG states (python, numpy, torch, per
rank), the module's own per-rank state (`rank_state()` / `load_rank_state()`, e.g. an augmentation memory
bank), every rank's own buffers (BatchNorm statistics), the config hash and the world size. The
learning-rate schedule is ours (schedule.py), so its position is the optimizer step count and it continues
where it stopped.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm

from ..artefacts import atomic_write_text
from ..config import EngineConfig, OptimConfig
from ..errors import UnfusedError
from ..metrics.exporter import NULL, Metrics
from .device import place, rank_device, to_device
from .module import InMemoryData, TrainData, TrainModule
from .precision import autocast
from .checkpoint import Checkpoints, ResumeError, load_deepspeed_weights_only, rng_state, set_rng_state
from .distributed import all_gather_object, all_reduce_max, average_buffers, barrier, init_distributed, is_main
from .dsconfig import deepspeed_config
from .preemption import Preempted, PreemptionSignals
from .schedule import build_optimizer, build_scheduler, restart_schedule
from ..log import logger


class DivergedError(UnfusedError, RuntimeError):
    """A NaN or infinite loss: training stops before that step updates or saves anything."""


@dataclass
class Progress:
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    history: list[dict] = field(default_factory=list)


class Trainer:
    """`reshard` (default: engine.reshard): when the newest checkpoint was written by a different number of
    processes, start from its consolidated fp32 weights at the beginning of its epoch (optimizer moments
    restart) instead of refusing."""

    def __init__(self, module: nn.Module, engine_cfg: EngineConfig, optim_cfg: OptimConfig, micro_batch: int,
                 total_steps: int, ckpt_dir: Path, config_hash: str, desc: str, reshard: bool | None = None,
                 metrics: Metrics = NULL):
        import deepspeed

        if not isinstance(module, TrainModule):
            raise TypeError(f"Trainer trains a TrainModule (unfused_dist.engine.module); got {type(module).__name__}")
        self.rank, self.world = init_distributed()
        self.device = rank_device()
        place(module, self.device)  # before the optimizer is built on its parameters
        self.cfg, self.config_hash, self.desc = engine_cfg, config_hash, desc
        self.log = logger(desc)
        self.checkpoints = Checkpoints(ckpt_dir, engine_cfg.keep_checkpoints)
        self.progress = Progress()
        # Decide how to resume before DeepSpeed partitions anything: a resharded resume loads plain fp32
        # weights into the module (fit then restarts their epoch in the new layout's steps).
        self._resume_from = self.checkpoints.newest_complete()
        self._resharded_from: tuple[str, dict] | None = None  # re-based in fit, which knows the new epoch length
        self._saved_step, self._postponed = -1, False  # the step saved last; a save waiting for a boundary
        if self._resume_from:
            self._check_config(*self._resume_from)
        # A resharded run's schedule starts at an offset, which its own later checkpoints keep.
        self.schedule_start = self._resume_from[1].get("schedule_start", 0) if self._resume_from else 0
        if self._resume_from and self._resume_from[1]["world_size"] != self.world:
            if not (engine_cfg.reshard if reshard is None else reshard):
                self._refuse(*self._resume_from)
            self._reshard(module, *self._resume_from)
            self._resharded_from, self._resume_from = self._resume_from, None
        optimizer = build_optimizer([p for p in module.parameters() if p.requires_grad], optim_cfg, engine_cfg)
        scheduler = build_scheduler(optimizer, max(1, total_steps // engine_cfg.grad_accum), optim_cfg,
                                    start=lambda: self.schedule_start)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(engine_cfg, micro_batch, self.world))
        if torch.device(self.engine.device).type != self.device.type:
            raise UnfusedError(f"[{desc}] DeepSpeed placed the model on {self.engine.device} but this rank's device is "
                               f"{self.device}: set DS_ACCELERATOR={self.device.type} before starting, or run.device")
        load_deepspeed_weights_only(self.engine)
        self.signals = PreemptionSignals()
        self.metrics = metrics  # owned by the stage (metrics.exporter.stage_metrics); NULL: none

    @property
    def module(self) -> TrainModule:
        return self.engine.module

    def fit(self, data: TrainData | Callable[[int, int], Iterable], steps_per_epoch: int, epochs: int,
            clips_per_step: int, on_epoch_end: Callable[[int], dict] | None = None,
            max_steps: int = 0, seconds_per_clip: float = 0.0) -> Progress:
        """Train `epochs` x `steps_per_epoch` micro-steps (at most `max_steps` if set), resuming from the
        newest complete checkpoint if any. `data.batches(epoch, start)` yields the epoch's batches from batch
        `start` on, and `data`'s state goes into every checkpoint (a plain function of (epoch, start): batches
        in memory, with no state of their own). `on_epoch_end(epoch)` may return values to log with the
        epoch's last step. `seconds_per_clip`: the audio in each training clip (its crop), for the
        audio-seconds throughput metric. Raises Preempted (exit code 0) after saving, when SIGTERM or SIGUSR2
        arrived."""
        self.data = data if hasattr(data, "state_dict") else InMemoryData(data)
        self.seconds_per_clip = seconds_per_clip
        if self._resume_from:
            self._load(*self._resume_from)
        if self._resharded_from:
            self._rebase(steps_per_epoch, *self._resharded_from)
        p = self.progress
        total = min(steps_per_epoch * epochs, max_steps or steps_per_epoch * epochs)
        self.total_steps = total
        bar = tqdm(total=total, initial=p.global_step, desc=self.desc, unit="step", disable=not is_main(),
                   dynamic_ncols=True)
        self._last_save = time.monotonic()
        with self.signals:
            while p.global_step < total and p.epoch < epochs:
                self.module.train()
                waited = time.perf_counter()
                for i, batch in enumerate(self.data.batches(p.epoch, p.step_in_epoch), start=p.step_in_epoch):
                    if i >= steps_per_epoch or p.global_step >= total:
                        break
                    last = i + 1 >= steps_per_epoch or p.global_step + 1 >= total  # saved once, below
                    save, stop = self._step(batch, i, clips_per_step, time.perf_counter() - waited, last)
                    bar.update(1)
                    h = p.history[-1]
                    bar.set_postfix(loss=f"{h['loss']:.3f}", lr=f"{h['lr']:.2e}", clips_s=f"{h['clips_s']:.0f}")
                    if not last:
                        self._save_or_stop(save, stop, final=False)
                    waited = time.perf_counter()
                average_buffers(self.module)
                if p.step_in_epoch >= steps_per_epoch:  # a whole epoch (not a max_steps stop mid-epoch)
                    extra = on_epoch_end(p.epoch) if on_epoch_end else None
                    if extra:
                        p.history[-1].update(extra)
                    p.epoch, p.step_in_epoch = p.epoch + 1, 0
                self._maybe_save(final=p.global_step >= total or p.epoch >= epochs)
        bar.close()
        return p

    def _step(self, batch, index: int, clips_per_step: int, data_s: float, last: bool) -> tuple[bool, bool]:
        """One micro-step; returns whether every rank is to save and to stop after it (not asked on the
        epoch's last step, which `fit` saves once)."""
        t0 = time.perf_counter()
        with autocast(self.cfg.precision, self.device):
            batch = to_device(batch, self.device)
            # a batch kind (data.transforms) by field name; a plain tuple (batches in memory) by position
            loss, logs = self.engine(**batch._asdict()) if hasattr(batch, "_asdict") else self.engine(*batch)
        loss = loss.float()
        self.engine.backward(loss)
        # The step's one host sync and one collective: whether any rank's loss is not finite (read before the
        # optimizer step, so no weights, no checkpoint and no export ever carry it), whether to save, whether
        # to stop; this rank's loss and logs come back in the same transfer.
        nonfinite, save, stop, loss_value, *log_values = self._exchange(loss, logs, not last and self._wants_save())
        if nonfinite:
            p = self.progress
            raise DivergedError(f"[{self.desc}] the loss is not finite (NaN/inf) at epoch {p.epoch}, step "
                                f"{p.global_step + 1}; stopped before saving it, so the checkpoints in "
                                f"{self.checkpoints.dir} predate it: lower optim.lr or set engine.grad_clip, "
                                "move that directory away and run again")
        self.engine.step()
        self.module.after_step()
        step_s = time.perf_counter() - t0
        p = self.progress
        p.global_step += 1
        p.step_in_epoch = index + 1
        p.history.append({"step": p.global_step, "epoch": p.epoch, "loss": loss_value,
                          "lr": self.scheduler.get_last_lr()[0], "step_s": step_s, "data_s": data_s,
                          "clips_s": clips_per_step * self.world / max(step_s + data_s, 1e-9),
                          **{k: _finite_or_none(v) for k, v in zip(logs, log_values)}})
        h = p.history[-1]  # per rank: Prometheus sums over ranks
        self.metrics.step(samples=clips_per_step, audio_seconds=clips_per_step * self.seconds_per_clip,
                          step_s=step_s, data_s=data_s, loss=h["loss"], lr=h["lr"])
        return bool(save), bool(stop)

    def _exchange(self, loss: torch.Tensor, logs: dict, save: bool) -> list[float]:
        """[any rank's loss not finite, any rank saves, any rank stops] (max over ranks), then this rank's
        loss and log values: one all-reduce of three flags and one device-to-host copy."""
        loss = loss.detach()
        flags = torch.stack([(~torch.isfinite(loss)).float(),
                             torch.tensor(float(save), device=self.device),
                             torch.tensor(float(self.signals.received is not None), device=self.device)])
        if self.world > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        values = [torch.as_tensor(v, device=self.device).detach().float().reshape(()) for v in logs.values()]
        return torch.stack([*flags, loss, *values]).tolist()

    # --- checkpoints -------------------------------------------------------------------------------
    def _wants_save(self, step_ahead: int = 1) -> bool:
        """This rank's reasons to save after the step `step_ahead` steps from now: the step count, rank 0's
        clock (the time-based saves), a save postponed to the end of an accumulation window."""
        c = self.cfg
        step = self.progress.global_step + step_ahead
        due_step = bool(c.save_every_steps) and step % c.save_every_steps == 0
        due_time = is_main() and c.save_every_minutes > 0 and \
            time.monotonic() - self._last_save > 60 * c.save_every_minutes
        return due_step or due_time or self._postponed

    def _maybe_save(self, final: bool) -> None:
        """Every rank must join the same saves: one tiny all-reduce carries each rank's reasons (a signal
        may reach only some ranks). Within an epoch the step's own exchange carries them (`_step`)."""
        flags = all_reduce_max([float(final or self._wants_save(0)), float(self.signals.received is not None)])
        self._save_or_stop(bool(flags[0]), bool(flags[1]), final)

    def _save_or_stop(self, save: bool, stop: bool, final: bool) -> None:
        c, p = self.cfg, self.progress
        if self.engine.micro_steps % c.grad_accum and not final:
            # DeepSpeed saves no accumulated gradients: a save (a signal's too) waits for the window's end.
            # The window is the engine's own count: after a reshard it need not align with global_step.
            self._postponed = save
            return
        self._postponed = False
        if (save or stop) and p.global_step != self._saved_step:  # a step is saved once, never replaced
            self.save()
        if stop:
            if is_main():
                self.log.info(f"stopping on {self.signals.received or 'a signal to another rank'} after saving step "
                              f"{p.global_step}; run the same command again to resume")
            raise Preempted(p.global_step, self.signals.received)

    def save(self) -> None:
        """Collective. Rank 0's client_state holds what all ranks share; each rank's own RNG and module
        state go to its own file (loaded with weights_only=True)."""
        p = self.progress
        self.data.set_position(p.epoch, p.step_in_epoch)  # the next batch's place, whatever the loader has read
        loader = {"rank": self.rank, **self.data.state_dict()}
        client = {"epoch": p.epoch, "step_in_epoch": p.step_in_epoch, "global_step": p.global_step,
                  "history": p.history, "world_size": self.world, "config_hash": self.config_hash,
                  "loaders": all_gather_object(loader)}
        # Buffers too: BatchNorm statistics differ per rank until the epoch's end averages them, and DeepSpeed
        # saves rank 0's module only, so without them every other rank would resume with rank 0's.
        rank_state = {"rng": rng_state(), "module": self.module.rank_state(),
                      "buffers": {name: b.detach().cpu() for name, b in self.module.named_buffers()}}
        meta = {"world_size": self.world, "global_step": p.global_step, "epoch": p.epoch,
                "step_in_epoch": p.step_in_epoch, "optimizer_steps": p.global_step // self.cfg.grad_accum,
                "zero_stage": self.cfg.zero_stage, "config_hash": self.config_hash,
                "schedule_start": self.schedule_start, "total_steps": getattr(self, "total_steps", None)}
        self.checkpoints.save(self.engine, p.global_step, client, rank_state, meta)
        self._saved_step = p.global_step
        self._last_save = time.monotonic()
        self.metrics.checkpoint()

    def _load(self, tag: str, meta: dict) -> None:
        where = self.checkpoints.dir / tag
        path, state = self.engine.load_checkpoint(str(self.checkpoints.dir), tag=tag)
        if path is None:
            raise ResumeError(f"{where}: DeepSpeed could not load this checkpoint; move it away to use an older one")
        loaders = state.get("loaders") or []
        try:
            self.data.load_state_dict(loaders[self.rank] if self.rank < len(loaders) else {})
        except ValueError as e:  # the loader's own error (LoaderStateError), naming what changed
            raise ResumeError(f"{where}: {e}") from None
        p = self.progress
        p.epoch, p.step_in_epoch, p.global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        p.history = state["history"]
        self._saved_step = p.global_step
        mine = self.checkpoints.load_rank_state(tag, self.rank)
        set_rng_state(mine["rng"])
        self.module.load_rank_state(mine["module"])
        with torch.no_grad():
            for name, b in self.module.named_buffers():
                if name in mine.get("buffers", {}):  # checkpoints from before buffers were saved per rank lack them
                    b.copy_(mine["buffers"][name])
        if is_main():
            self.log.info(f"resumed from {where} (epoch {p.epoch}, step {p.global_step})")

    def _refuse(self, tag: str, meta: dict) -> None:
        raise ResumeError(f"{self.checkpoints.dir / tag}: saved by {meta['world_size']} processes, now {self.world}; "
                          f"run with {meta['world_size']} processes to resume exactly, or pass --reshard to start "
                          "from its fp32 weights at the beginning of its epoch (optimizer moments restart)")

    def _check_config(self, tag: str, meta: dict) -> None:
        if meta.get("config_hash", self.config_hash) != self.config_hash:
            raise ResumeError(f"{self.checkpoints.dir / tag}: saved under config hash {meta['config_hash']}, now "
                              f"{self.config_hash} (the config changed since); undo the change to resume, or move "
                              f"{self.checkpoints.dir} away to train this stage afresh")

    def _reshard(self, module: nn.Module, tag: str, meta: dict) -> None:
        """Load the checkpoint's consolidated fp32 weights into the plain module (fit restarts its epoch)."""
        state = self.checkpoints.fp32_weights(tag, meta.get("zero_stage", self.cfg.zero_stage))
        missing, unexpected = module.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ResumeError(f"{self.checkpoints.dir / tag}: its consolidated weights do not fit this model "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]}); was the config changed?")

    def _rebase(self, steps_per_epoch: int, tag: str, meta: dict) -> None:
        """Restart the resharded checkpoint's epoch in the new layout's steps (an epoch has another number
        of steps now), the schedule at the optimizer step where that epoch begins. The history keeps the
        earlier epochs' entries, numbered in the old layout's steps."""
        p = self.progress
        p.epoch, p.step_in_epoch, p.global_step = meta["epoch"], 0, meta["epoch"] * steps_per_epoch
        p.history = [h for h in self.checkpoints.history(tag) if h["epoch"] < p.epoch]
        self.schedule_start = p.global_step // self.cfg.grad_accum
        restart_schedule(self.scheduler)
        barrier()  # every rank has read `tag`
        if is_main():
            self.checkpoints.retag(tag, p.global_step)
            self.log.info(f"resharded {self.checkpoints.dir / tag} from {meta['world_size']} to {self.world} "
                          f"processes: restarting epoch {p.epoch} at step {p.global_step}")
        barrier()
        self._saved_step = p.global_step  # the retagged checkpoint's step


def _finite_or_none(v) -> float | None:
    """A logged value for history.json, which must stay valid JSON (no bare NaN)."""
    v = float(v.detach()) if torch.is_tensor(v) else float(v)
    return v if math.isfinite(v) else None


def write_history(progress: Progress, path: Path) -> None:
    if is_main():
        atomic_write_text(path, json.dumps(progress.history))

