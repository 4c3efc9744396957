"""Checkpoints as plain data (docs/methods.md P-19): dicts of tensors, numbers, strings and lists, loadable with weights_only=True."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from metalign.io import DataContractError, atomic_path

MODEL_FORMAT = "metalign.metalearner/1"   # the selected model (out_ckpt)
STATE_FORMAT = "metalign.train_state/3"   # the resumable training state (`.last.pt`)
_COMPILE_PREFIX = "_orig_mod."


def plain_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the state dict, with torch.compile's `_orig_mod.` prefix stripped."""
    return {key.replace(_COMPILE_PREFIX, ""): value.detach().cpu().clone()
            for key, value in module.state_dict().items()}


def save_checkpoint(path: str | os.PathLike, payload: Mapping[str, Any]) -> None:
    """Write atomically, with bytes that depend only on `payload`, so hashes of a checkpoint survive a retrain.

    torch.save names the zip archive's inner folder after the file it writes to: saving straight to the random
    temporary file would put that name into the bytes. Saved to a buffer, the folder is always `archive`.
    """
    buffer = io.BytesIO()
    torch.save(dict(payload), buffer)
    with atomic_path(path, suffix=".pt") as tmp:
        tmp.write_bytes(buffer.getbuffer())


def load_checkpoint(path: str | os.PathLike, expected_format: str = MODEL_FORMAT) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise DataContractError(f"checkpoint not found: {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != expected_format:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise DataContractError(f"{path}: expected a {expected_format!r} checkpoint, found {found!r}")
    return ckpt
