"""The demo's small ViT, saved in Hugging Face format so that it loads through `from_pretrained(<local dir>)`,
exactly the code path of the real hub models."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch


def save_tiny_vit(out_dir: str | Path, image_size: int = 64, patch_size: int = 8, hidden_size: int = 64,
                  layers: int = 2, heads: int = 4, seed: int = 0) -> None:
    """Random-init ViT (no registry ships ViT weights); deterministic in `seed`. Written to a temp dir, then renamed."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(image_size=image_size, patch_size=patch_size, hidden_size=hidden_size, num_hidden_layers=layers,
                       num_attention_heads=heads, intermediate_size=4 * hidden_size)
    model = ViTModel(config)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
