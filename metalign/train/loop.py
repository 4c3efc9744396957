"""Training loop (protocols §7): schedule-free AdamW, fixed validation episodes, selection score, early stopping.

Resumable: every `checkpoint_every` steps the full training state (weights, optimiser, best model so far, early-stop
counter, metric rows) goes to `<out_ckpt stem>.last.pt`. Episodes and dropout masks are seeded per step, so a rerun
that resumes from it ends with the same weights as an uninterrupted run. The outputs (`out_ckpt`, `out_metrics`) are
written only when training ends, so their existence means a finished run.

Saved weights are the schedule-free *x* sequence (the averaged weights that `optimizer.eval()` swaps in), i.e. the
weights that were evaluated (P-18).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager

import numpy as np
import pandas as pd
import torch
from schedulefree import AdamWScheduleFree
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from metalign.functions.codes import Codes
from metalign.io import DataContractError, library_versions, write_csv
from metalign.train.checkpoint import MODEL_FORMAT, STATE_FORMAT, load_checkpoint, plain_state_dict, save_checkpoint
from metalign.train.config import TrainConfig
from metalign.train.data import Features, aligned_features
from metalign.train.model import ModelConfig, build_model, hurdle_objective, parameter_groups
from metalign.train.sampler import EpisodeSampler

log = logging.getLogger(__name__)

METRIC_COLUMNS = ("step", "split", "loss", "bce", "mse", "acc", "r2", "score", "lr", "elapsed_s")
SAVED_PARAMS = "schedule-free x (averaged weights, optimizer.eval())"
GRAD_CLIP = 1.0
_DROPOUT_STREAM = 2  # seed streams 0 and 1 are the sampler's training and evaluation episodes


class MetricSums:
    """Token-level sums kept on the device and read back only when a metrics row is written (no per-step sync).

    Magnitudes are in sigma_m units; R2 is over positive tokens: 1 - SSE / sum (m - mean m)^2.
    """

    def __init__(self, device: torch.device):
        self.total = torch.zeros(7, dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, logits: torch.Tensor, mag_pred: torch.Tensor, labels: torch.Tensor, mags: torch.Tensor,
            sigma_m: torch.Tensor) -> None:
        logits, positive = logits.float(), labels > 0
        target = mags / sigma_m
        residual = mag_pred.float() / sigma_m - target
        parts = (labels.new_tensor(labels.numel()),
                 F.binary_cross_entropy_with_logits(logits, labels, reduction="sum"),
                 ((logits > 0) == positive).sum(), positive.sum(), (residual.square() * positive).sum(),
                 (target * positive).sum(), (target.square() * positive).sum())
        self.total += torch.stack([p.double() for p in parts])

    def reset(self) -> None:
        self.total.zero_()

    def summary(self, log_var: torch.Tensor) -> dict[str, float]:
        tokens, bce_sum, correct, n_pos, sse, m_sum, m2_sum = self.total.tolist()
        bce, mse, acc = bce_sum / tokens, sse / max(n_pos, 1.0), correct / tokens
        ss_tot = m2_sum - m_sum ** 2 / n_pos if n_pos else 0.0
        r2 = 1.0 - sse / ss_tot if ss_tot > 0 else math.nan
        loss = hurdle_objective(torch.tensor(bce), torch.tensor(mse), log_var.detach().double().cpu())
        return {"loss": float(loss), "bce": bce, "mse": mse, "acc": acc, "r2": r2, "score": 0.5 * acc + 0.5 * r2}


@dataclass
class _State:
    """Everything besides weights and optimiser that a resumed run needs."""

    step: int = 0
    best: dict[str, Any] | None = None       # {"state_dict", "step", "scores"} of the best evaluation
    best_score: float | None = None
    stale: int = 0                           # consecutive active evaluations without a min_delta improvement
    rows: list[dict[str, Any]] = field(default_factory=list)
    elapsed_s: float = 0.0


@dataclass(frozen=True)
class TrainResult:
    model: nn.Module                          # final weights (schedule-free x), eval mode, on the training device
    best_step: int
    best_scores: dict[str, float]
    last_step: int
    stopped_early: bool


def train(cfg: dict[str, Any], X_train: Features, codes_train: Codes, X_val: Features, codes_val: Codes,
          out_ckpt: Path, out_metrics: Path, device: str | torch.device = "cpu") -> TrainResult:
    """Train a meta-learner on episodes of the training functions; select on fixed validation episodes."""
    config = TrainConfig.from_dict(cfg)
    device = torch.device(device)
    out_ckpt, out_metrics = Path(out_ckpt), Path(out_metrics)
    x_train = aligned_features(X_train, codes_train, "training features vs codes")
    x_val = aligned_features(X_val, codes_val, "validation features vs codes")
    if x_train.shape[1] != x_val.shape[1]:
        raise DataContractError(f"training features have D={x_train.shape[1]}, validation features D={x_val.shape[1]}")
    sampler = EpisodeSampler.from_codes(codes_train, config.sl, config.seed, source="training codes")
    val_set = EpisodeSampler.from_codes(codes_val, config.sl, config.seed, source="validation codes") \
        .evaluation_set(config.n_eval_episodes_per_function, config.eval_seed)
    fingerprint = _fingerprint(x_train, x_val, codes_train, codes_val)

    torch.manual_seed(config.seed)
    model = build_model(ModelConfig.from_dict(config.model_dict(x_train.shape[1])), sampler.magnitude_std()).to(device)
    optimizer = AdamWScheduleFree(parameter_groups(model, config.weight_decay), lr=config.lr, warmup_steps=0)
    train_sums = MetricSums(device)
    last_path = out_ckpt.with_suffix(".last.pt")
    state = _resume(last_path, config, fingerprint, model, optimizer, train_sums)

    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    forward = torch.compile(model) if config.compile else model
    amp: Callable[[], ContextManager] = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) \
        if device.type == "cuda" else contextlib.nullcontext
    features_train = torch.from_numpy(x_train).to(device)
    features_val = torch.from_numpy(x_val).to(device)
    val_tensors = [torch.from_numpy(a).to(device) for a in (val_set.rows, val_set.labels, val_set.mags)]
    clock_start = time.perf_counter() - state.elapsed_s

    def row(step: int, split: str, scores: dict[str, float]) -> dict[str, Any]:
        return {"step": step, "split": split, **scores, "lr": optimizer.param_groups[0]["lr"],
                "elapsed_s": time.perf_counter() - clock_start}

    model.train()
    optimizer.train()
    stopped = False
    progress = tqdm(range(state.step + 1, config.steps + 1), initial=state.step, total=config.steps, desc="train",
                    disable=None)
    # The next step's episodes are drawn on a CPU thread while the device works on this step.
    with ThreadPoolExecutor(max_workers=1) as prefetch:
        upcoming = prefetch.submit(sampler.sample, config.batch_size, state.step + 1)
        for step in progress:
            batch = upcoming.result()
            if step < config.steps:
                upcoming = prefetch.submit(sampler.sample, config.batch_size, step + 1)
            torch.manual_seed(int(np.random.SeedSequence(config.seed, spawn_key=(_DROPOUT_STREAM, 0, step))
                                  .generate_state(1)[0]))
            rows, labels, mags = (torch.from_numpy(a).to(device) for a in batch)
            with amp():
                logits, mag_pred = forward(features_train[rows], mags)
            loss, _, _ = model.loss(logits, mag_pred, labels, mags)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            optimizer.step()
            train_sums.add(logits, mag_pred, labels, mags, model.sigma_m)
            state.step = step
            if step % config.log_every == 0:
                state.rows.append(row(step, "train", train_sums.summary(model.loss_log_var)))
                train_sums.reset()
            if step % config.eval_every == 0 or step == config.steps:
                model.eval()
                optimizer.eval()
                scores = _evaluate(model, forward, features_val, val_tensors, config.eval_batch, amp)
                state.rows.append(row(step, "val", scores))
                improved, stopped = _select(state, step, scores, config)
                if improved:
                    state.best = {"state_dict": plain_state_dict(model), "step": step, "scores": scores}
                optimizer.train()
                model.train()
                progress.set_postfix(acc=f"{scores['acc']:.3f}", r2=f"{scores['r2']:.3f}", best=state.best["step"])
            if stopped:
                log.info("early stopping at step %d: %d evaluations without improvement", step, state.stale)
                break
            if step % config.checkpoint_every == 0 and step < config.steps:
                state.elapsed_s = time.perf_counter() - clock_start
                _save_state(last_path, state, config, fingerprint, model, optimizer, train_sums)

    optimizer.eval()
    model.eval()
    write_csv(out_metrics, pd.DataFrame(state.rows, columns=list(METRIC_COLUMNS)))
    save_checkpoint(out_ckpt, {
        "format": MODEL_FORMAT, "state_dict": state.best["state_dict"], "model_config": model.config.to_dict(),
        "train_config": config.to_dict(), "sigma_m": float(model.sigma_m),
        "kept_latent_ids": torch.from_numpy(sampler.latent_id.copy()), "step": state.best["step"],
        "scores": state.best["scores"], "params": SAVED_PARAMS, "last_step": state.step, "stopped_early": stopped,
        "inputs_fingerprint": fingerprint, "library_versions": library_versions(),
    })
    last_path.unlink(missing_ok=True)
    return TrainResult(model, state.best["step"], state.best["scores"], state.step, stopped)


@torch.no_grad()
def _evaluate(model: nn.Module, forward: Callable, features: torch.Tensor, episodes: list[torch.Tensor],
              batch_size: int, amp: Callable[[], ContextManager]) -> dict[str, float]:
    sums = MetricSums(features.device)
    rows, labels, mags = episodes
    for start in range(0, len(rows), batch_size):
        part = slice(start, start + batch_size)
        with amp():
            logits, mag_pred = forward(features[rows[part]], mags[part])
        sums.add(logits, mag_pred, labels[part], mags[part], model.sigma_m)
    return sums.summary(model.loss_log_var)


def _select(state: _State, step: int, scores: dict[str, float], config: TrainConfig) -> tuple[bool, bool]:
    """Best-model and early-stopping bookkeeping (protocols §7); returns (save as best, stop).

    Any increase of S saves a new best. Early stopping is active only when step >= min_step and the current
    accuracy >= min_acc; then an evaluation that does not beat the best S by more than min_delta counts towards
    `patience` and one that does resets the count.
    """
    score = scores["score"] if math.isfinite(scores["score"]) else -math.inf
    first = state.best_score is None
    if step >= config.min_step and scores["acc"] >= config.min_acc:
        state.stale = 0 if first or score > state.best_score + config.min_delta else state.stale + 1
    improved = first or score > state.best_score
    if improved:
        state.best_score = score
    return improved, state.stale >= config.patience


def _fingerprint(x_train: np.ndarray, x_val: np.ndarray, codes_train: Codes, codes_val: Codes) -> str:
    """Hash of every input array: a `.last.pt` written for other inputs is never resumed."""
    digest = hashlib.blake2b(digest_size=16)
    for codes, features in ((codes_train, x_train), (codes_val, x_val)):
        digest.update("\n".join(codes.ids).encode())
        for array in (features, codes.indices, codes.values, codes.latent_id):
            digest.update(str(array.shape).encode())
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _save_state(path: Path, state: _State, config: TrainConfig, fingerprint: str, model: nn.Module,
                optimizer: torch.optim.Optimizer, train_sums: MetricSums) -> None:
    save_checkpoint(path, {
        "format": STATE_FORMAT, "config": config.to_dict(), "fingerprint": fingerprint,
        "model": plain_state_dict(model), "optimizer": optimizer.state_dict(), "train_sums": train_sums.total.cpu(),
        "step": state.step, "best": state.best, "best_score": state.best_score, "stale": state.stale,
        "rows": state.rows, "elapsed_s": state.elapsed_s,
    })


def _resume(path: Path, config: TrainConfig, fingerprint: str, model: nn.Module, optimizer: torch.optim.Optimizer,
            train_sums: MetricSums) -> _State:
    if not path.exists():
        return _State()
    last = load_checkpoint(path, STATE_FORMAT)
    if last["config"] != config.to_dict() or last["fingerprint"] != fingerprint:
        log.warning("not resuming from %s: it was written for another config or other inputs", path)
        return _State()
    model.load_state_dict(last["model"])
    optimizer.load_state_dict(last["optimizer"])
    train_sums.total.copy_(last["train_sums"])
    log.info("resuming from %s at step %d", path, last["step"])
    return _State(step=last["step"], best=last["best"], best_score=last["best_score"], stale=last["stale"],
                  rows=last["rows"], elapsed_s=last["elapsed_s"])
