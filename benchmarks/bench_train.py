"""Training: peak host memory at COCO scale, and training steps per second on the CPU at demo scale.

Peak RAM: a subprocess trains (`metalign.train.train`, the real loop) on synthetic COCO-scale inputs, 118,287
images × 768-d features, top-64 of 49,152 latents (≈7k functions), 5,000 validation images, with the global batch of
4,096 episodes × 120 tokens, for `RAM_STEPS` steps, and reports its peak resident set (VmHWM; ru_maxrss where /proc is absent). On the
CPU every device tensor is host memory, so this over-counts a GPU run: the 4,096 × 120 × 768 input batch alone is
1.5 GB here. The model is therefore small (hidden 16) and attention dropout is 0, which lets CPU attention use its
fused kernel instead of materialising the (B, heads, 120, 120) weights (as CUDA's kernels avoid with dropout). Baseline: upstream's dense (N, d_sae) float32 code
matrix (docs/methods.md P-41), computed, not allocated: 118,287 × 49,152 × 4 bytes.

Steps/s: the demo's training step (EfficientNet's 1280-d features, 1,200 images, 64 latents with k = 8, batch 64 ×
32 tokens, hidden 64, one block, 4 heads) with our sampler vs the same loop with upstream's per-episode sampling
(torch.where over the episode's dense column, permutations of positives and negatives), on the CPU.

    python -m benchmarks train
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_codes import D_SAE, K, N_IMAGES, synthetic_codes
from benchmarks.common import report
from metalign.functions.codes import Codes
from metalign.functions.select import function_stats, select_functions
from metalign.train.data import Features
from metalign.train.loop import train
from metalign.train.tasks import EpisodeTask

D, RAM_STEPS, GIB = 768, 3, 1 << 30
RAM_CONFIG = dict(sl=120, batch_size=4096, steps=RAM_STEPS, eval_every=RAM_STEPS, checkpoint_every=RAM_STEPS,
                  log_every=1, n_eval_episodes_per_function=1, eval_batch_size=512, hidden=16, n_heads=2, min_step=0,
                  dropout=0.0)
DEMO_CONFIG = dict(sl=32, batch_size=64, steps=60, eval_every=60, checkpoint_every=1000, log_every=10,
                   n_eval_episodes_per_function=4, hidden=64, n_heads=4, lr=1e-3, min_step=0)


def synthetic_split(n: int, d: int, k: int, d_sae: int, min_nonzero: int, sl: int, prefix: str,
                    seed: int) -> tuple[Features, Codes]:
    indices, values = synthetic_codes(n, k, d_sae, seed=seed)
    stats = function_stats(indices, values, d_sae)
    kept = select_functions(stats.nnz, min_nonzero, sl, n).latent_id
    ids = [f"{prefix}{i:012d}" for i in range(n)]
    codes = Codes(ids=ids, latent_id=kept, nnz=stats.nnz[kept], mean=stats.mean[kept], std=stats.std[kept],
                  attrs={"d_sae": d_sae, "n_columns": d_sae}, indices=indices, values=values)
    features = np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)
    return Features(ids, features), codes


def _peak_ram_child() -> None:
    """Runs in the subprocess: train at COCO scale, print the peak resident set in bytes."""
    import resource

    torch.manual_seed(0)
    x_train, c_train = synthetic_split(N_IMAGES, D, K, D_SAE, 120, 120, "train", seed=0)
    x_val, c_val = synthetic_split(5000, D, K, 2048, 120, 120, "val", seed=1)  # ≈156 positives per latent
    with tempfile.TemporaryDirectory() as folder:
        train(RAM_CONFIG, x_train, c_train, x_val, c_val, Path(folder) / "m.pt", Path(folder) / "m.csv")
    print(json.dumps({"maxrss_bytes": _peak_rss_bytes(resource), "n_functions": c_train.n_functions}))


def _peak_rss_bytes(resource) -> int:
    """This process's own peak: Linux keeps ru_maxrss across exec, so after `make bench`'s earlier benchmarks grew the
    parent, the child would report the parent's peak; VmHWM belongs to the exec'd address space alone."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _upstream_sample(task: EpisodeTask, dense: torch.Tensor, batch_size: int, step: int) -> tuple[np.ndarray, ...]:
    """Per-episode draw as upstream did it: scan the episode's dense column, permute positives and negatives."""
    generator = torch.Generator().manual_seed(step)
    sl = task.sampler.sl
    rows, labels, mags = [], [], []
    for j in torch.randint(0, dense.shape[1], (batch_size,), generator=generator).tolist():
        column = dense[:, j]
        positives, negatives = torch.where(column != 0)[0], torch.where(column == 0)[0]
        n_pos = int(round(float(torch.normal(sl / 2, sl / 20, (1,), generator=generator))))
        n_pos = min(max(n_pos, sl - task.sampler.max_draw), task.sampler.max_draw)
        chosen = torch.cat([positives[torch.randperm(len(positives), generator=generator)[:n_pos]],
                            negatives[torch.randperm(len(negatives), generator=generator)[:sl - n_pos]]])
        chosen = chosen[torch.randperm(sl, generator=generator)]
        rows.append(chosen.numpy())
        labels.append((column[chosen] != 0).float().numpy())
        mags.append(column[chosen].numpy())
    rows_, labels_, mags_ = np.stack(rows), np.stack(labels), np.stack(mags)
    return rows_, labels_, mags_, labels_.copy()


def _steps_per_second(x_train, c_train, x_val, c_val, upstream: bool) -> float:
    original = EpisodeTask.sample
    if upstream:
        columns = c_train.kept_columns()
        dense = torch.zeros(c_train.n_rows, c_train.n_functions)
        hit = columns >= 0
        dense[np.nonzero(hit)[0], columns[hit]] = torch.from_numpy(c_train.values[hit])
        EpisodeTask.sample = lambda self, batch_size, step: _upstream_sample(self, dense, batch_size, step)
    try:
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            train(DEMO_CONFIG, x_train, c_train, x_val, c_val, Path(folder) / "m.pt", Path(folder) / "m.csv")
            return DEMO_CONFIG["steps"] / (time.perf_counter() - start)
    finally:
        EpisodeTask.sample = original


def main() -> None:
    child = subprocess.run([sys.executable, "-c", "from benchmarks.bench_train import _peak_ram_child as f; f()"],
                           capture_output=True, text=True, check=True)
    peak = json.loads(child.stdout.strip().splitlines()[-1])["maxrss_bytes"] / GIB
    dense = N_IMAGES * D_SAE * 4 / GIB
    report("train_peak_host_ram_coco_scale", peak, dense, "< 4 GiB peak host RAM (baseline: upstream's dense code "
           "matrix alone)", unit="GiB")

    torch.manual_seed(0)
    demo = [synthetic_split(n, 1280, 8, 64, 32, 32, prefix, seed) for n, prefix, seed in ((1200, "t", 0), (600, "v", 1))]
    args = (*demo[0], *demo[1])
    _steps_per_second(*args, upstream=False)  # warm-up (thread pools, allocator)
    ours = _steps_per_second(*args, upstream=False)
    baseline = _steps_per_second(*args, upstream=True)
    report("train_steps_per_s_cpu_demo", ours, baseline, "report (CPU, demo scale, our sampler vs per-episode "
           "sampling)", unit=" steps/s", higher_is_better=True)


if __name__ == "__main__":
    main()
