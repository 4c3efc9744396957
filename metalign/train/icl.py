"""In-context learning curves: how well a trained sequence model predicts held-out functions, position by position.

Episodes come from the evaluation split's function file (functions never trained on), drawn once from a fixed seed
(`EpisodeSampler.evaluation_set`): they depend only on that file, sl and the seed, so every backbone and every model
trained on the same function set sees identical episodes (the file records their hash). Per position t: accuracy of
1[σ(ℓ_t) > 0.5] against b_t, MSE over positive tokens, and MSE over all tokens, separately (docs/methods.md P-26); episodes are
never padded. Models run in fp32, evaluation mode.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import h5py
import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import torch  # noqa: E402

from metalign.functions.codes import Codes  # noqa: E402
from metalign.io import atomic_path, library_versions, set_attrs  # noqa: E402
from metalign.train.data import Features, aligned_features  # noqa: E402
from metalign.train.model import model_from_checkpoint  # noqa: E402
from metalign.train.sampler import EpisodeSampler  # noqa: E402

CURVES = ("acc", "mse_pos", "mse_all")


@torch.no_grad()
def icl_curves(ckpt: dict[str, Any], features: Features, codes: Codes, n_per_function: int, seed: int,
               batch_size: int = 1024, device: str | torch.device = "cpu", source: str = "checkpoint") -> dict[str, Any]:
    """Episodes, model outputs and per-position curves (acc, mse_pos, mse_all, n_pos) of one checkpoint."""
    model = model_from_checkpoint(ckpt).to(device)
    if not model.config.episodic:
        raise ValueError(f"{source}: model_type {model.config.model_type!r} sees no episodes, so it has no "
                         "in-context-learning curve; ICL is defined for sequence models (transformer, lstm)")
    sl = int(ckpt["train_config"]["sl"])
    x = torch.from_numpy(aligned_features(features, codes, f"{source}: ICL features vs codes")).to(device)
    episodes = EpisodeSampler.from_codes(codes, sl, seed=0, source="ICL codes").evaluation_set(n_per_function, seed)
    prob = np.empty(episodes.rows.shape, dtype=np.float32)
    mag_pred = np.empty(episodes.rows.shape, dtype=np.float32)
    for start in range(0, len(episodes.rows), batch_size):
        part = slice(start, start + batch_size)
        rows, mags = torch.from_numpy(episodes.rows[part]).to(device), torch.from_numpy(episodes.mags[part]).to(device)
        logits, magnitude = model(x[rows], mags)
        prob[part] = torch.sigmoid(logits.float()).cpu().numpy()
        mag_pred[part] = magnitude.float().cpu().numpy()
    labels = episodes.labels
    squared = (mag_pred - episodes.mags) ** 2
    n_pos = labels.sum(axis=0)
    return {
        "episodes": episodes, "prob": prob, "mag_pred": mag_pred, "n_pos": n_pos.astype(np.int64),
        "acc": ((prob > 0.5) == (labels > 0)).mean(axis=0),
        "mse_pos": np.where(n_pos > 0, (squared * labels).sum(axis=0) / np.maximum(n_pos, 1), np.nan),
        "mse_all": squared.mean(axis=0),
        "latent_id": codes.latent_id[episodes.functions],
    }


def episodes_hash(rows: np.ndarray, latent_id: np.ndarray, labels: np.ndarray, ids: list[str]) -> str:
    """Identity of an episode set: which images, in which order, for which function, with which labels."""
    digest = hashlib.sha256()
    for array in (rows.astype(np.int64), latent_id.astype(np.int64), labels.astype(np.int8)):
        digest.update(np.ascontiguousarray(array).tobytes())
    digest.update("\n".join(ids).encode())
    return digest.hexdigest()


def write_icl(path: str | Path, result: dict[str, Any], ids: list[str], attrs: dict[str, Any]) -> None:
    episodes = result["episodes"]
    with atomic_path(path, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as handle:
            handle.create_dataset("ids", data=np.asarray(ids, dtype=object), dtype=h5py.string_dtype())
            for name in (*CURVES, "n_pos"):
                handle.create_dataset(name, data=result[name])
            group = handle.create_group("episodes")
            for name, data in (("rows", episodes.rows.astype(np.int32)), ("latent_id", result["latent_id"]),
                               ("labels", episodes.labels.astype(np.int8)), ("mags", episodes.mags)):
                group.create_dataset(name, data=data, compression="gzip")
            outputs = handle.create_group("outputs")
            outputs.create_dataset("prob", data=result["prob"], compression="gzip")
            outputs.create_dataset("mag_pred", data=result["mag_pred"], compression="gzip")
            set_attrs(handle, {**attrs, "episodes_sha256": episodes_hash(episodes.rows, result["latent_id"],
                                                                         episodes.labels, ids),
                               "n_episodes": len(episodes.rows), "sl": int(episodes.rows.shape[1]),
                               "library_versions": library_versions()})
