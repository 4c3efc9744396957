"""Training loop (docs/methods.md §7): schedule-free AdamW, fixed validation episodes, selection score, early stopping.

Resumable: every `checkpoint_every` steps the full training state (weights, optimiser, best model so far, early-stop
counter, metric rows, step-1 batch hashes) goes to `<out_ckpt stem>.last.pt`. Episodes and dropout masks are seeded per
(rank, step), so a rerun that resumes from it ends with the same weights, checkpoint bytes and metric rows as an
uninterrupted run. `out_ckpt` is written only when training ends, so its existence means a finished run;
`out_metrics` grows while training runs (rows appended at each evaluation, so a long job can be watched) and is
rewritten atomically at the end.

Data-parallel (torchrun, `metalign.train.distributed`): `batch_size` is the global batch, split evenly over ranks;
rank 0 writes every file. The checkpoint records a hash of each rank's step-1 batch (distinct episodes,
docs/methods.md P-15).

Saved weights are the schedule-free *x* sequence (the averaged weights that `optimizer.eval()` swaps in), i.e. the
weights that were evaluated (docs/methods.md P-18).
"""

from __future__ import annotations

import contextlib
import datetime
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
from torch.nn.parallel import DistributedDataParallel

from metalign.config.model import TrainConfig
from metalign.functions.codes import Codes
from metalign.io import DataContractError, library_versions, write_csv
from metalign.progress import progress
from metalign.train.checkpoint import MODEL_FORMAT, STATE_FORMAT, plain_state_dict, save_checkpoint
from metalign.train.data import Features, aligned_features
from metalign.train.distributed import Context, all_sum, barrier, gather, setup, teardown
from metalign.train.model import ModelConfig, build_model, hurdle_objective, parameter_groups
from metalign.train.tasks import Step, make_task

log = logging.getLogger(__name__)

METRIC_COLUMNS = ("step", "split", "loss", "bce", "mse", "acc", "r2", "score", "lr", "elapsed_s")
SAVED_PARAMS = "schedule-free x (averaged weights, optimizer.eval())"
GRAD_CLIP = 1.0
_DROPOUT_STREAM = 2  # seed streams 0 and 1 are the sampler's training and evaluation episodes


class MetricSums:
    """Output-level sums kept on the device and read back only when a metrics row is written (no per-step sync).

    Magnitudes are in the loss's units (`mag_scale`: raw, or sigma_m units, docs/methods.md §6); MSE and R² are over
    the fitted outputs (positives of sparse functions, all outputs of dense ones). Accuracy is over all outputs.
    R² is either the study's positive-weighted mean of per-batch R² (`batch`: each batch's
    1 − SSE_b / Σ_b (m − mean_b m)², taken as 0 for a batch with fewer than 2 fitted outputs or Σ_b (m − mean_b m)² <
    1e-6, weighted by its fitted count) or pooled over all batches (`pooled`: 1 − SSE / Σ (m − mean m)²).
    """

    _R2_MIN_SS = 1e-6  # the study's threshold below which a batch's R² counts as 0

    def __init__(self, device: torch.device, r2_average: str = "batch"):
        self.r2_average = r2_average
        self.total = torch.zeros(9, dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, logits: torch.Tensor, mag_pred: torch.Tensor, step: Step, mag_scale: torch.Tensor) -> None:
        logits, labels, fitted = logits.float(), step.labels, step.mse_mask.double()
        target = (step.mags / mag_scale).double()
        residual = (mag_pred.float() / mag_scale).double() - target
        n_fit, sse = fitted.sum(), (residual.square() * fitted).sum()
        m_sum = (target * fitted).sum()
        ss_batch = ((target - m_sum / n_fit.clamp(min=1)).square() * fitted).sum()
        r2_batch = torch.where((n_fit >= 2) & (ss_batch >= self._R2_MIN_SS), 1 - sse / ss_batch.clamp(min=1e-300), 0.0)
        parts = (labels.new_tensor(labels.numel()),
                 F.binary_cross_entropy_with_logits(logits, labels, reduction="sum"),
                 ((logits > 0) == (labels > 0)).sum(), n_fit, sse, m_sum, (target.square() * fitted).sum(),
                 r2_batch * n_fit, n_fit)
        self.total += torch.stack([p.double() for p in parts])

    def reset(self) -> None:
        self.total.zero_()

    def summary(self, log_var: torch.Tensor) -> dict[str, float]:
        tokens, bce_sum, correct, n_pos, sse, m_sum, m2_sum, r2_weighted, r2_weight = self.total.tolist()
        bce, mse, acc = bce_sum / tokens, sse / max(n_pos, 1.0), correct / tokens
        if self.r2_average == "batch":
            r2 = r2_weighted / r2_weight if r2_weight > 0 else 0.0
        else:
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
    first_batch_sha256: list[object] = field(default_factory=list)  # per rank, of step 1's batch (also after a resume)


class _MetricsFile:
    """The metrics CSV while training runs, so that a long job shows its rows as they come.

    Started from the rows of the (resumed) state, which drops any row a killed run appended after its last `.last.pt`;
    rows are appended at each evaluation; `finish` rewrites the file atomically, with the same rows an uninterrupted
    run has. Only the main rank writes.
    """

    def __init__(self, path: Path, rows: list[dict[str, Any]], active: bool):
        self.path, self.active, self.written = path, active, len(rows)
        if active:
            write_csv(path, _metrics_frame(rows))

    def append(self, rows: list[dict[str, Any]]) -> None:
        if self.active and len(rows) > self.written:
            with open(self.path, "a", newline="") as handle:
                _metrics_frame(rows[self.written:]).to_csv(handle, header=False, index=False)
        self.written = len(rows)

    def finish(self, rows: list[dict[str, Any]]) -> None:
        if self.active:
            write_csv(self.path, _metrics_frame(rows))


def _metrics_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(METRIC_COLUMNS))


@dataclass(frozen=True)
class TrainResult:
    model: nn.Module                          # final weights (schedule-free x), eval mode, on the training device
    best_step: int
    best_scores: dict[str, float]
    last_step: int
    stopped_early: bool


def train(cfg: dict[str, Any], X_train: Features, codes_train: Codes, X_val: Features, codes_val: Codes,
          out_ckpt: Path, out_metrics: Path, device: str | torch.device = "cpu") -> TrainResult:
    """Train a meta-learner on the training functions; select on fixed validation episodes (or images)."""
    config = TrainConfig.from_dict(cfg)
    context = setup(torch.device(device))
    try:
        return _train(config, X_train, codes_train, X_val, codes_val, Path(out_ckpt), Path(out_metrics), context)
    finally:
        teardown(context)


def _train(config: TrainConfig, X_train: Features, codes_train: Codes, X_val: Features, codes_val: Codes,
           out_ckpt: Path, out_metrics: Path, context: Context) -> TrainResult:
    device, rank, world = context.device, context.rank, context.world
    if config.batch_size % world:
        raise ValueError(f"train config: batch_size {config.batch_size} is not divisible by the {world} ranks")
    local_batch = config.batch_size // world
    if config.gpus > 1 and not context.distributed:
        log.warning("gpus=%d requested but this is a single process: launch with torchrun --nproc_per_node %d",
                    config.gpus, config.gpus)
    x_train = aligned_features(X_train, codes_train, "training features vs codes")
    x_val = aligned_features(X_val, codes_val, "validation features vs codes")
    if x_train.shape[1] != x_val.shape[1]:
        raise DataContractError(f"training features have D={x_train.shape[1]}, validation features D={x_val.shape[1]}")
    task = make_task(config, x_train, codes_train, x_val, codes_val, rank, world, device)
    fingerprint = _fingerprint(x_train, x_val, codes_train, codes_val)

    torch.manual_seed(config.seed)
    model_config = ModelConfig.from_dict(config.model_dict(x_train.shape[1], task.n_functions))
    model = build_model(model_config, task.sigma_m).to(device)
    optimizer = AdamWScheduleFree(parameter_groups(model, config.weight_decay, config.decay_embed,
                                                   config.decay_loss_weights), lr=config.lr, warmup_steps=0)
    train_sums = MetricSums(device, config.r2_average)
    last_path = out_ckpt.with_suffix(".last.pt")
    state = _resume(last_path, config, fingerprint, model, optimizer, train_sums)

    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    wrapped = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if context.distributed else model
    forward = torch.compile(wrapped) if config.compile else wrapped
    # Evaluation shards differ in size across ranks, so it runs on the bare model (no DDP collectives).
    forward_eval = (torch.compile(model) if config.compile else model) if context.distributed else forward
    amp: Callable[[], ContextManager] = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) \
        if device.type == "cuda" else contextlib.nullcontext
    clock_start = time.perf_counter() - state.elapsed_s
    metrics_file = _MetricsFile(out_metrics, state.rows, context.is_main)

    def row(step: int, split: str, scores: dict[str, float]) -> dict[str, Any]:
        return {"step": step, "split": split, **scores, "lr": optimizer.param_groups[0]["lr"],
                "elapsed_s": time.perf_counter() - clock_start}

    model.train()
    optimizer.train()
    stopped = False
    steps = progress(range(state.step + 1, config.steps + 1), initial=state.step, total=config.steps, desc="train",
                     disable=not context.is_main)
    # The next step's rows are drawn on a CPU thread while the device works on this step.
    with ThreadPoolExecutor(max_workers=1) as prefetch:
        upcoming = prefetch.submit(task.sample, local_batch, state.step + 1)
        for step in steps:
            batch = upcoming.result()
            if step < config.steps:
                upcoming = prefetch.submit(task.sample, local_batch, step + 1)
            if step == 1:
                state.first_batch_sha256 = gather(_batch_hash(batch), context)
            _seed_dropout(int(np.random.SeedSequence(config.seed, spawn_key=(_DROPOUT_STREAM, rank, step))
                              .generate_state(1)[0]), device)
            current = task.to_device(batch)
            with amp():
                logits, mag_pred = task.predict(forward, current)
            loss, _, _ = model.loss(logits, mag_pred, current.labels, current.mags, current.mse_mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            optimizer.step()
            train_sums.add(logits, mag_pred, current, model.mag_scale)
            state.step = step
            if step % config.log_every == 0:
                all_sum(train_sums.total, context)
                state.rows.append(row(step, "train", train_sums.summary(model.loss_log_var)))
                train_sums.reset()
            if step % config.eval_every == 0 or step == config.steps:
                model.eval()
                optimizer.eval()
                scores = _evaluate(model, forward_eval, task, config.eval_batch, amp, context, config.r2_average)
                state.rows.append(row(step, "val", scores))
                improved, stopped = _select(state, step, scores, config)
                if improved:
                    state.best = {"state_dict": plain_state_dict(model), "step": step, "scores": scores}
                optimizer.train()
                model.train()
                metrics_file.append(state.rows)
                if context.is_main:
                    log.info("step %d/%d: val loss %.4f acc %.4f r2 %.4f score %.4f (best: step %d), elapsed %s", step,
                             config.steps, scores["loss"], scores["acc"], scores["r2"], scores["score"],
                             state.best["step"], datetime.timedelta(seconds=round(state.rows[-1]["elapsed_s"])))
                steps.set_postfix(acc=f"{scores['acc']:.3f}", r2=f"{scores['r2']:.3f}", best=state.best["step"])
            if stopped:
                log.info("early stopping at step %d: %d evaluations without improvement", step, state.stale)
                break
            if step % config.checkpoint_every == 0 and step < config.steps:
                state.elapsed_s = time.perf_counter() - clock_start
                if context.is_main:
                    _save_state(last_path, state, config, fingerprint, model, optimizer, train_sums)

    optimizer.eval()
    model.eval()
    metrics_file.finish(state.rows)
    if context.is_main:
        save_checkpoint(out_ckpt, {
            "format": MODEL_FORMAT, "state_dict": state.best["state_dict"], "model_config": model.config.to_dict(),
            "train_config": config.to_dict(), "sigma_m": model.sigma_m.tolist(),
            "kept_latent_ids": torch.from_numpy(task.latent_id.copy()), "step": state.best["step"],
            "scores": state.best["scores"], "params": SAVED_PARAMS, "last_step": state.step, "stopped_early": stopped,
            "world_size": world, "batch_per_rank": local_batch, "first_batch_sha256": state.first_batch_sha256,
            "inputs_fingerprint": fingerprint, "library_versions": library_versions(),
        })
        last_path.unlink(missing_ok=True)
    barrier(context)
    return TrainResult(model, state.best["step"], state.best["scores"], state.step, stopped)


def _seed_dropout(seed: int, device: torch.device) -> None:
    """Seed this step's dropout masks: the training device's generator only (torch.manual_seed would also queue a
    seed, with a stack trace, for every accelerator backend that is not initialised, ≈1 ms per step)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


def _batch_hash(batch: Any) -> str:
    """Hash of one rank's step-1 batch: equal hashes across ranks mean duplicated episodes (docs/methods.md P-15)."""
    digest = hashlib.sha256()
    for array in batch if isinstance(batch, tuple) else (batch,):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


@torch.no_grad()
def _evaluate(model: nn.Module, forward: Callable, task: Any, batch_size: int, amp: Callable[[], ContextManager],
              context: Context, r2_average: str = "batch") -> dict[str, float]:
    """Scores over the fixed validation set: each rank its shard in batches of `batch_size`, sums added over ranks."""
    sums = MetricSums(context.device, r2_average)
    for current in task.eval_steps(batch_size):
        with amp():
            logits, mag_pred = task.predict(forward, current, train=False)
        sums.add(logits, mag_pred, current, model.mag_scale)
    all_sum(sums.total, context)
    return sums.summary(model.loss_log_var)


def _select(state: _State, step: int, scores: dict[str, float], config: TrainConfig) -> tuple[bool, bool]:
    """Best-model and early-stopping bookkeeping (docs/methods.md §7); returns (save as best, stop). `step` is 1-based.

    The study's rule: early stopping is active once the 0-based step (step − 1) reaches min_step and the current
    accuracy ≥ min_acc. While active, only an evaluation that beats the best S by more than min_delta saves a new best
    and resets the count; any other counts towards `patience` (with save_rule "any", a smaller increase still saves).
    While inactive, any increase of S saves, and the count is left as it is.
    """
    score = scores["score"] if math.isfinite(scores["score"]) else -math.inf
    first = state.best_score is None
    increased = first or score > state.best_score
    if step - 1 >= config.min_step and scores["acc"] >= config.min_acc:
        if first or score > state.best_score + config.min_delta:
            state.stale, improved = 0, True
        else:
            state.stale, improved = state.stale + 1, config.save_rule == "any" and increased
    else:
        improved = increased
    if improved:
        state.best_score = score
    return improved, state.stale >= config.patience


def _fingerprint(x_train: np.ndarray, x_val: np.ndarray, codes_train: Codes, codes_val: Codes) -> str:
    """Hash of every input array: a `.last.pt` written for other inputs is never resumed."""
    digest = hashlib.blake2b(digest_size=16)
    for codes, features in ((codes_train, x_train), (codes_val, x_val)):
        digest.update("\n".join(codes.ids).encode())
        arrays = (codes.indices, codes.values) if codes.kind == "sparse" else (codes.targets, codes.column_dense)
        for array in (features, *arrays, codes.latent_id):
            digest.update(str(array.shape).encode())
            digest.update(np.ascontiguousarray(array).view(np.uint8))  # hashed in place, never copied
    return digest.hexdigest()


def _save_state(path: Path, state: _State, config: TrainConfig, fingerprint: str, model: nn.Module,
                optimizer: torch.optim.Optimizer, train_sums: MetricSums) -> None:
    save_checkpoint(path, {
        "format": STATE_FORMAT, "config": config.to_dict(), "fingerprint": fingerprint,
        "model": plain_state_dict(model), "optimizer": optimizer.state_dict(), "train_sums": train_sums.total.cpu(),
        "step": state.step, "best": state.best, "best_score": state.best_score, "stale": state.stale,
        "rows": state.rows, "elapsed_s": state.elapsed_s, "first_batch_sha256": state.first_batch_sha256,
    })


def _resume(path: Path, config: TrainConfig, fingerprint: str, model: nn.Module, optimizer: torch.optim.Optimizer,
            train_sums: MetricSums) -> _State:
    if not path.exists():
        return _State()
    last = torch.load(path, map_location="cpu", weights_only=True)
    if last.get("format") != STATE_FORMAT or last["config"] != config.to_dict() or last["fingerprint"] != fingerprint:
        log.warning("not resuming from %s: it was written by another version, for another config or other inputs", path)
        return _State()
    model.load_state_dict(last["model"])
    optimizer.load_state_dict(last["optimizer"])
    train_sums.total.copy_(last["train_sums"])
    log.info("resuming from %s at step %d", path, last["step"])
    return _State(step=last["step"], best=last["best"], best_score=last["best_score"], stale=last["stale"],
                  rows=last["rows"], elapsed_s=last["elapsed_s"], first_batch_sha256=last["first_batch_sha256"])
