"""What one optimiser step sees, per model family: episodes (sequence models) or images × all functions (static).

Both tasks keep the features (and static targets) on the training device, draw the step's rows on the CPU from a
generator seeded by (seed, stream, rank, step) (static_linear: by (seed, stream, epoch), one permutation shared by the
ranks), and yield (logits, magnitudes, labels, true magnitudes, MSE mask)
with one meaning of each for the loss and the metrics.
"""

from __future__ import annotations

import os
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch

from metalign.config.model import TrainConfig
from metalign.functions.codes import Codes
from metalign.io import DataContractError
from metalign.train.sampler import EpisodeSampler

_TRAIN_STREAM = 0
SAMPLER_THREADS = min(8, len(os.sched_getaffinity(0)))  # speed only: episodes do not depend on it


class Step(NamedTuple):
    """One batch on the device: inputs for `predict` and the targets of every output."""

    rows: torch.Tensor
    labels: torch.Tensor
    mags: torch.Tensor
    mse_mask: torch.Tensor


class EpisodeTask:
    """Sequence models: B episodes of sl tokens, each of one function (docs/methods.md §4)."""

    def __init__(self, config: TrainConfig, x_train: np.ndarray, codes_train: Codes, x_val: np.ndarray,
                 codes_val: Codes, rank: int, world: int, device: torch.device):
        self.sampler = EpisodeSampler.from_codes(codes_train, config.sl, config.seed, rank, source="training codes")
        val = EpisodeSampler.from_codes(codes_val, config.sl, config.seed, source="validation codes") \
            .evaluation_set(config.n_eval_episodes_per_function, config.eval_seed)
        self.val = [torch.from_numpy(np.ascontiguousarray(a[rank::world])).to(device) for a in val[:4]]
        self.features = torch.from_numpy(x_train).to(device)
        self.val_features = torch.from_numpy(x_val).to(device)
        self.device = device
        self.n_functions, self.latent_id = self.sampler.n_functions, self.sampler.latent_id
        self.sigma_m: float | np.ndarray = self.sampler.magnitude_std()

    def sample(self, batch_size: int, step: int) -> tuple[np.ndarray, ...]:
        return tuple(self.sampler.sample(batch_size, step, threads=SAMPLER_THREADS))

    def to_device(self, batch: tuple[np.ndarray, ...]) -> Step:
        return Step(*(torch.from_numpy(a).to(self.device, non_blocking=True) for a in batch))

    def predict(self, forward: Callable, step: Step, train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features if train else self.val_features
        return forward(features[step.rows], step.mags)

    def eval_steps(self, batch_size: int) -> Iterator[Step]:
        for start in range(0, len(self.val[0]), batch_size):
            yield Step(*(a[start:start + batch_size] for a in self.val))


class StaticTask:
    """static_linear: a batch of images with the labels and magnitudes of every training function (dense (B, F)).

    As in the study (a distributed sampler over the finite image set, docs/methods.md §7), every step's global batch
    is `batch_size` distinct images: epochs are seeded permutations of the training images cut into
    floor(N / batch_size) global batches (the remainder is dropped), and rank r takes every world-th image of the
    step's global batch.

    Validation images are scored on the *training* functions, read from the validation split's own codes (any latent
    active there, kept by that split's selection or not); a training function absent from that file is all-negative.
    """

    def __init__(self, config: TrainConfig, x_train: np.ndarray, codes_train: Codes, x_val: np.ndarray,
                 codes_val: Codes, rank: int, world: int, device: torch.device):
        if codes_train.kind != codes_val.kind or codes_train.attrs.get("n_columns") != codes_val.attrs.get("n_columns"):
            raise DataContractError(
                f"static_linear needs training and validation functions over the same columns: {codes_train.kind} "
                f"with {codes_train.attrs.get('n_columns')} vs {codes_val.kind} with {codes_val.attrs.get('n_columns')}")
        self.seed, self.rank, self.world, self.device = config.seed, rank, world, device
        self.n_functions, self.latent_id = codes_train.n_functions, codes_train.latent_id
        self.n_rows = codes_train.n_rows
        self.steps_per_epoch = self.n_rows // config.batch_size
        if self.steps_per_epoch < 1:
            raise DataContractError(f"static_linear: a step draws batch_size={config.batch_size} distinct training "
                                    f"images, but there are only {self.n_rows}")
        self._epoch: tuple[int, np.ndarray] | None = None
        self.features = torch.from_numpy(x_train).to(device)
        self.val_features = torch.from_numpy(x_val).to(device)
        self.train_targets = self._targets(codes_train)
        self.val_targets = self._targets(codes_val)
        self.val_rows = torch.arange(rank, codes_val.n_rows, world, device=device)
        std = codes_train.std.astype(np.float32)
        self.sigma_m = np.where(std > 0, std, 1.0).astype(np.float32)  # per function (docs/methods.md §5); constant ones: 1

    def _targets(self, codes: Codes) -> tuple[torch.Tensor, ...]:
        if codes.kind == "sparse":
            columns = codes.columns_for(self.latent_id)
            columns[columns < 0] = self.n_functions  # one spare column collects dropped latents and zeros
            return torch.from_numpy(columns).to(self.device), torch.from_numpy(codes.values).to(self.device)
        targets, dense = codes.dense_targets(self.latent_id)
        labels = np.where(dense, targets > 0, targets != 0)
        return (torch.from_numpy(targets).to(self.device), torch.from_numpy(labels).to(self.device),
                torch.from_numpy(dense).to(self.device))

    def sample(self, batch_size: int, step: int) -> np.ndarray:
        """This rank's `batch_size` rows of 1-based `step`: distinct within the step and within its epoch."""
        epoch, position = divmod(int(step) - 1, self.steps_per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:  # one permutation per epoch, shared by every rank
            rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(_TRAIN_STREAM, epoch)))
            self._epoch = (epoch, rng.permutation(self.n_rows))
        size = batch_size * self.world
        return self._epoch[1][position * size:(position + 1) * size][self.rank::self.world].copy()

    def to_device(self, rows: np.ndarray, targets: tuple[torch.Tensor, ...] | None = None) -> Step:
        rows_t = torch.as_tensor(rows, device=self.device)
        targets = targets or self.train_targets
        if len(targets) == 2:
            columns, values = (t[rows_t] for t in targets)
            shape = (len(rows_t), self.n_functions + 1)
            labels = torch.zeros(shape, device=self.device).scatter_(1, columns, 1.0)[:, :-1]
            mags = torch.zeros(shape, device=self.device).scatter_(1, columns, values)[:, :-1]
            return Step(rows_t, labels, mags, labels)
        magnitudes, positive, dense = targets
        labels = positive[rows_t].float()
        return Step(rows_t, labels, magnitudes[rows_t], torch.where(dense, 1.0, labels))

    def predict(self, forward: Callable, step: Step, train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        return forward((self.features if train else self.val_features)[step.rows])

    def eval_steps(self, batch_size: int) -> Iterator[Step]:
        for start in range(0, len(self.val_rows), batch_size):
            yield self.to_device(self.val_rows[start:start + batch_size], self.val_targets)


def make_task(config: TrainConfig, *args, **kwargs) -> EpisodeTask | StaticTask:
    return (StaticTask if config.model_type == "static_linear" else EpisodeTask)(config, *args, **kwargs)
