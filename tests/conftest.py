"""Shared fixtures: a tiny local ViT in Hugging Face format and small image folders, all offline."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("NILEARN_DATA", str(tmp_path_factory.mktemp("nilearn_data")))


@pytest.fixture
def single_thread():
    """Tiny models and matrices: intra-op threads only add contention on a shared 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory) -> Path:
    from metalign.demo.models import save_tiny_vit

    out = tmp_path_factory.mktemp("models") / "vit_tiny"
    save_tiny_vit(out, image_size=32, patch_size=8, hidden_size=32, layers=2, heads=4, seed=0)
    return out


def write_images(folder: Path, n: int, size: int = 32, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{i:012d}.jpg"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def pytest_collection_modifyitems(config, items):
    """The demo DAG's tests (`slow`) first, in their module's order: under `make test` (`-n 2 --dist loadfile`) one
    worker builds the demo while the other runs every other file, rather than the demo starting halfway through."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
