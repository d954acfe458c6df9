"""Consolidated fp32 encoder weights (safetensors + JSON) that the next stage loads; never raw ZeRO shards."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..models.encoder import AudioNTT, count_parameters
from ..artefacts import atomic_write_text
from ..errors import MissingArtefactError

WEIGHTS, META = "encoder.safetensors", "encoder.json"


def export_encoder(encoder: AudioNTT, directory: Path, meta: dict[str, Any],
                   state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write DIR/encoder.safetensors and DIR/encoder.json (architecture, normalisation, checksum).
    `state`: the full state dict when the module's own is partitioned (ZeRO-3, see full_state_dict)."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in (state or encoder.state_dict()).items()}
    tmp = directory / (WEIGHTS + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(directory / WEIGHTS)
    info = {"n_fc": encoder.n_fc, "n_mels": encoder.n_mels, "parameters": count_parameters(encoder),
            "sha256": sha256_of(directory / WEIGHTS), **meta}
    atomic_write_text(directory / META, json.dumps(info, indent=1))
    return directory / WEIGHTS


def load_encoder(directory: Path) -> tuple[AudioNTT, dict[str, Any]]:
    meta_path = directory / META
    if not meta_path.exists():
        # the stage dir is named after the stage that exports into it (pretrain, distill)
        raise MissingArtefactError(f"{meta_path}: no exported encoder; run `unfused run {directory.name}` (or the "
                                   "pipeline) with this config first")
    meta = json.loads(meta_path.read_text())
    encoder = AudioNTT(n_fc=meta["n_fc"], n_mels=meta["n_mels"])
    encoder.load_state_dict(load_file(str(directory / WEIGHTS)))
    return encoder, meta


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def full_state_dict(module: nn.Module, zero_stage: int) -> dict[str, torch.Tensor]:
    """Under ZeRO-3 parameters are partitioned: gather them before reading; stages 0-2 hold full copies."""
    if zero_stage < 3:
        return module.state_dict()
    # Collective: every rank must call this.
    import deepspeed
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        return {k: v.clone() for k, v in module.state_dict().items()}
