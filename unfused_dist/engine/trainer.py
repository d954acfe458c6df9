"""The one training engine: a DeepSpeed engine around a module whose forward(*batch) returns
(loss, logs), a train loop with progress, periodic checkpoints, and automatic resume."""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..artefacts import atomic_write_text
from ..config import EngineConfig, OptimConfig
from ..errors import UnfusedError
from .distributed import all_gather_object, average_buffers, broadcast_object, init_distributed, is_main
from .schedule import build_optimizer, build_scheduler


class ResumeError(UnfusedError, RuntimeError):
    pass


@dataclass
class Progress:
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    history: list[dict] = field(default_factory=list)


def deepspeed_config(cfg: EngineConfig, micro_batch: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "zero_allow_untested_optimizer": True,  # our torch optimizers are fine under ZeRO 1-3
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


class Trainer:
    def __init__(self, module: nn.Module, engine_cfg: EngineConfig, optim_cfg: OptimConfig, micro_batch: int,
                 total_steps: int, ckpt_dir: Path, config_hash: str, desc: str):
        import deepspeed

        if engine_cfg.precision not in ("fp32", "bf16"):
            raise ValueError(f"engine.precision '{engine_cfg.precision}' is not one of fp32, bf16")
        self.rank, self.world = init_distributed()
        self.cfg, self.ckpt_dir, self.config_hash, self.desc = engine_cfg, Path(ckpt_dir), config_hash, desc
        optimizer = build_optimizer([p for p in module.parameters() if p.requires_grad], optim_cfg)
        scheduler = build_scheduler(optimizer, max(1, total_steps // engine_cfg.grad_accum), optim_cfg)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(engine_cfg, micro_batch))
        self.progress = Progress()
        self.data_layout: dict | None = None

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    def fit(self, batches: Callable[[int, int], Iterable], steps_per_epoch: int, epochs: int,
            clips_per_step: int, on_epoch_end: Callable[[int], dict] | None = None,
            max_steps: int = 0, data_layout: dict | None = None) -> Progress:
        """Train `epochs` x `steps_per_epoch` micro-steps (at most `max_steps` if set), resuming from the
        newest checkpoint if any. `batches(epoch, start)` yields the epoch's batches from batch `start` on;
        `data_layout` (world size, workers, batch size...) must be unchanged for a resume to be exact.
        `on_epoch_end(epoch)` may return values to log with the epoch's last step."""
        self.data_layout = data_layout
        self.resume()
        p = self.progress
        total = min(steps_per_epoch * epochs, max_steps or steps_per_epoch * epochs)
        bar = tqdm(total=total, initial=p.global_step, desc=self.desc, unit="step", disable=not is_main(),
                   dynamic_ncols=True)
        last_save = time.time()
        while p.global_step < total:
            self.module.train()
            for i, batch in enumerate(batches(p.epoch, p.step_in_epoch), start=p.step_in_epoch):
                if i >= steps_per_epoch or p.global_step >= total:
                    break
                self._step(batch, i, clips_per_step)
                bar.update(1)
                h = p.history[-1]
                bar.set_postfix(loss=f"{h['loss']:.3f}", lr=f"{h['lr']:.2e}", clips_s=f"{h['clips_s']:.0f}")
                if self.cfg.save_every_steps and p.global_step % self.cfg.save_every_steps == 0:
                    self.save()
                    last_save = time.time()
            average_buffers(self.module)
            if p.step_in_epoch >= steps_per_epoch:  # a whole epoch (not a max_steps stop mid-epoch)
                extra = on_epoch_end(p.epoch) if on_epoch_end else None
                if extra:
                    p.history[-1].update(extra)
                p.epoch, p.step_in_epoch = p.epoch + 1, 0
            # Rank 0's clock decides, so every rank joins the same (collective) save.
            final = p.global_step >= total
            if broadcast_object(final or time.time() - last_save > 60 * self.cfg.save_every_minutes):
                self.save()
                last_save = time.time()
        bar.close()
        return p

    def _step(self, batch, index: int, clips_per_step: int) -> None:
        t0 = time.time()
        loss, logs = self.engine(*batch)
        self.engine.backward(loss)
        self.engine.step()
        after = getattr(self.module, "after_step", None)
        if after is not None:
            after()
        p = self.progress
        p.global_step += 1
        p.step_in_epoch = index + 1
        p.history.append({"step": p.global_step, "epoch": p.epoch, "loss": loss.item(),
                          "lr": self.scheduler.get_last_lr()[0],
                          "clips_s": clips_per_step * self.world / (time.time() - t0),
                          **{k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in logs.items()}})

    # --- checkpoints -------------------------------------------------------------------------------
    def save(self) -> None:
        """All ranks call DeepSpeed's save; per-rank RNG states travel in client_state (rank 0 writes it)."""
        rng = all_gather_object({"python": random.getstate(), "numpy": np.random.get_state(),
                                 "torch": torch.get_rng_state()})
        p = self.progress
        state = {"epoch": p.epoch, "step_in_epoch": p.step_in_epoch, "global_step": p.global_step,
                 "history": p.history, "world_size": self.world, "config_hash": self.config_hash, "rng": rng,
                 "data_layout": self.data_layout}
        tag = f"step{p.global_step:08d}"
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state=state)
        if is_main():  # readable without unpickling, to refuse a changed world size before loading
            atomic_write_text(self.ckpt_dir / tag / "unfused.json",
                              json.dumps({"world_size": self.world, "global_step": p.global_step}))

    def resume(self) -> bool:
        if not (self.ckpt_dir / "latest").exists():
            return False
        tag = (self.ckpt_dir / "latest").read_text().strip()
        meta = self._peek_client_state(tag)
        if meta is not None and meta.get("world_size") != self.world:
            raise ResumeError(f"{self.ckpt_dir}/{tag}: saved with world size {meta.get('world_size')}, "
                              f"now {self.world}; run with the same number of processes")
        path, state = self.engine.load_checkpoint(str(self.ckpt_dir), tag=tag)
        if path is None:
            raise ResumeError(f"{self.ckpt_dir}/{tag}: checkpoint could not be loaded; delete it to restart")
        if state.get("data_layout") != self.data_layout:
            raise ResumeError(f"{self.ckpt_dir}/{tag}: data layout {state.get('data_layout')} differs from now "
                              f"({self.data_layout}); resume with the same data.num_workers and batch size")
        p = self.progress
        p.epoch, p.step_in_epoch, p.global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        p.history = state["history"]
        mine = state["rng"][self.rank]
        random.setstate(mine["python"])
        np.random.set_state(mine["numpy"])
        torch.set_rng_state(mine["torch"])
        if is_main():
            print(f"[{self.desc}] resumed from {self.ckpt_dir}/{tag} (epoch {p.epoch}, step {p.global_step})")
        return True

    def _peek_client_state(self, tag: str) -> dict | None:
        path = self.ckpt_dir / tag / "unfused.json"
        return json.loads(path.read_text()) if path.exists() else None


def write_history(progress: Progress, path: Path) -> None:
    if is_main():
        atomic_write_text(path, json.dumps(progress.history))
