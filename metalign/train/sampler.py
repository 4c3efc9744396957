"""Episodes (protocols §4): one kept function j, sl images, n_pos ~ round(N(sl/2, sl/20)) of them positives of j.

Per-function positive lists are built once in CSR form (memory O(nnz), never a dense N x F matrix, P-41). An episode
costs O(sl): positives are drawn from j's list, negatives uniformly from all rows with rejection of j's positives, and
duplicates are redrawn (P-43); a batch is drawn in vectorised rounds over all of its still-open slots. Every draw
comes from a generator seeded by (seed, stream, rank, step, block), so episodes are reproducible, independent of call
order (resume) and of the number of sampler threads, and differ across ranks (P-15).

Dense targets (neurons, protocols §3) add an (N, F) magnitude matrix: negatives then carry magnitudes too
(x − median ≤ 0), membership is read from it in O(1), and the magnitude of a dense function is fitted on every token
(`mse_mask`), that of a sparse one on positives only (§6).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from metalign.functions.codes import Codes
from metalign.functions.select import max_episode_draw
from metalign.io import DataContractError

_TRAIN_STREAM, _EVAL_STREAM = 0, 1
CHUNK = 512  # episodes per independently seeded block of a training batch


class Batch(NamedTuple):
    rows: np.ndarray      # (B, sl) int64 image rows
    labels: np.ndarray    # (B, sl) float32, 1 = positive of the episode's function
    mags: np.ndarray      # (B, sl) float32 raw magnitudes (0 for negatives of sparse functions)
    mse_mask: np.ndarray  # (B, sl) float32, 1 = token whose magnitude is fitted (positives; every token if dense)


class EpisodeSet(NamedTuple):
    rows: np.ndarray
    labels: np.ndarray
    mags: np.ndarray
    mse_mask: np.ndarray
    functions: np.ndarray  # (B,) int64 function index j (column of `EpisodeSampler.latent_id`)


class EpisodeSampler:
    """Draws episodes over the kept functions of one split.

    offsets (F+1), rows (nnz), mags (nnz): CSR positive lists, rows ascending within each function.
    dense (N, F) float32, optional: magnitudes of every (row, function), with labels `dense_labels` (N, F) bool and
    per-function flags `mse_all` (F,) bool (fit the magnitude on every token).
    n_pos is clamped to [sl - max_draw, max_draw] (`max_episode_draw`), the bound that function selection guarantees
    both positives and negatives for; it is validated here again (P-16).
    """

    def __init__(self, offsets: np.ndarray, rows: np.ndarray, mags: np.ndarray, n_rows: int, latent_id: np.ndarray,
                 sl: int, seed: int, rank: int = 0, source: str = "codes", dense: np.ndarray | None = None,
                 dense_labels: np.ndarray | None = None, mse_all: np.ndarray | None = None):
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.mags = np.asarray(mags, dtype=np.float32)
        self.latent_id = np.asarray(latent_id, dtype=np.int64)
        self.n_rows, self.sl, self.seed, self.rank = int(n_rows), int(sl), int(seed), int(rank)
        self.max_draw = max_episode_draw(self.sl)
        self.nnz = np.diff(self.offsets)
        if (len(self.offsets) != len(self.latent_id) + 1 or self.offsets[-1] != len(self.rows)
                or len(self.rows) != len(self.mags)):
            raise DataContractError(f"{source}: CSR arrays disagree ({len(self.offsets)} offsets, "
                                    f"{len(self.latent_id)} functions, {len(self.rows)} rows, {len(self.mags)} mags)")
        if len(self.latent_id) == 0:
            raise DataContractError(f"{source}: no kept functions")
        short = np.flatnonzero((self.nnz < self.max_draw) | (self.n_rows - self.nnz < self.max_draw))
        if short.size:
            j = int(short[0])
            raise DataContractError(
                f"{source}: function (latent id {int(self.latent_id[j])}) has {int(self.nnz[j])} positives among "
                f"{self.n_rows} images; episodes with sl={self.sl} need >= {self.max_draw} positives and negatives")
        self.dense, self.dense_labels = dense, dense_labels
        self.mse_all = np.zeros(self.n_functions, bool) if mse_all is None else np.asarray(mse_all, dtype=bool)
        if dense is not None and (dense.shape != (self.n_rows, self.n_functions) or dense_labels is None
                                  or dense_labels.shape != dense.shape or len(self.mse_all) != self.n_functions):
            raise DataContractError(f"{source}: dense targets must be (N={self.n_rows}, F={self.n_functions}) with "
                                    f"labels of the same shape and one mse flag per function")
        if dense is None and self.mse_all.any():
            raise DataContractError(f"{source}: functions fitted on every token need dense targets")
        # Sorted (function, row) keys: membership of a row in j's positive list is one searchsorted (sparse targets).
        keys = np.repeat(np.arange(self.n_functions, dtype=np.int64), self.nnz) * self.n_rows + self.rows
        if len(keys) > 1 and not (np.diff(keys) > 0).all():
            raise DataContractError(f"{source}: positive rows must be unique and ascending within each function")
        self._keys = keys if dense is None else None

    @classmethod
    def from_codes(cls, codes: Codes, sl: int, seed: int, rank: int = 0, source: str = "codes") -> "EpisodeSampler":
        offsets, rows, mags = codes.by_function()
        dense = labels = None
        if codes.kind == "neurons":
            dense, column_dense = codes.dense_targets()
            labels = np.where(column_dense, dense > 0, dense != 0)
        return cls(offsets, rows, mags, codes.n_rows, codes.latent_id, sl, seed, rank, source, dense, labels,
                   codes.function_dense())

    @property
    def n_functions(self) -> int:
        return len(self.latent_id)

    def magnitude_std(self) -> float:
        """sigma_m (protocols §4): population std of the fitted magnitudes of the kept functions (positives of sparse
        functions, every row of dense ones)."""
        if self.dense is None:
            return float(np.std(self.mags, dtype=np.float64))
        fitted = self.dense[:, self.mse_all].ravel()
        positives = self.mags[~self.mse_all[np.repeat(np.arange(self.n_functions), self.nnz)]]
        return float(np.std(np.concatenate([fitted, positives]), dtype=np.float64))

    def sample(self, batch_size: int, step: int, threads: int = 1) -> Batch:
        """Training episodes of one step; functions uniform over the kept set, deterministic in (seed, rank, step).

        The batch is drawn in blocks of `CHUNK` episodes, each from its own generator (seed, stream, rank, step,
        block), so `threads` (numpy releases the GIL in its sorts and gathers) changes the speed, never the episodes.
        """
        def block(index: int) -> tuple[np.ndarray, ...]:
            rng = self._rng(_TRAIN_STREAM, self.rank, step, index)
            size = min(CHUNK, batch_size - index * CHUNK)
            return self._draw(rng, rng.integers(0, self.n_functions, size=size))

        blocks = range(-(-batch_size // CHUNK))
        if threads > 1 and len(blocks) > 1:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                parts = list(pool.map(block, blocks))
        else:
            parts = [block(index) for index in blocks]
        return Batch(*(np.concatenate(arrays) for arrays in zip(*parts)))

    def evaluation_set(self, n_per_function: int, seed: int) -> EpisodeSet:
        """The fixed evaluation episodes (P-17): n_per_function per kept function, ordered by function.

        Depends only on the codes, sl and `seed` (not on rank or on this sampler's training seed), so every model and
        backbone is evaluated on identical episodes.
        """
        functions = np.repeat(np.arange(self.n_functions, dtype=np.int64), n_per_function)
        rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(_EVAL_STREAM,)))
        return EpisodeSet(*self._draw(rng, functions), functions)

    def _rng(self, stream: int, rank: int, step: int, block: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(stream, rank, int(step), block)))

    def _draw(self, rng: np.random.Generator,
              functions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        batch, sl = len(functions), self.sl
        n_pos = np.rint(rng.normal(sl / 2, sl / 20, size=batch)).astype(np.int64)
        n_pos = n_pos.clip(sl - self.max_draw, self.max_draw)
        positive = np.arange(sl)[None, :] < n_pos[:, None]
        rows = np.zeros((batch, sl), dtype=np.int64)
        source = np.zeros((batch, sl), dtype=np.int64)  # CSR position of each positive (for its magnitude)
        flat_rows, flat_source, flat_positive = rows.reshape(-1), source.reshape(-1), positive.reshape(-1)
        todo = np.arange(batch * sl)  # flat slots still to fill, ascending
        while todo.size:
            pos = flat_positive[todo]
            filled, open_ = todo[pos], todo[~pos]
            j = functions[filled // sl]
            picked = self.offsets[j] + rng.integers(0, self.nnz[j])
            flat_source[filled] = picked
            flat_rows[filled] = self.rows[picked]
            negative = rng.integers(0, self.n_rows, size=open_.size)
            flat_rows[open_] = negative
            pending = np.zeros(batch * sl, dtype=bool)
            pending[open_[self._is_positive(functions[open_ // sl], negative)]] = True
            touched = np.zeros(batch, dtype=bool)
            touched[todo // sl] = True
            touched = np.flatnonzero(touched)
            pending = pending.reshape(batch, sl)
            pending[touched] |= self._repeats(rows[touched], pending[touched])
            todo = np.flatnonzero(pending)
        _, order = _sort_with_order(rng.integers(0, 1 << 31, size=(batch, sl)))  # a uniform shuffle of each episode
        positive = np.take_along_axis(positive, order, axis=1)
        rows = np.take_along_axis(rows, order, axis=1)
        labels = positive.astype(np.float32)
        if self.dense is not None:
            mags = self.dense[rows, functions[:, None]]
            mse_mask = np.where(self.mse_all[functions][:, None], np.float32(1), labels)
            return rows, labels, mags, mse_mask
        mags = np.where(positive, self.mags[np.take_along_axis(source, order, axis=1)], 0.0).astype(np.float32)
        return rows, labels, mags, labels.copy()

    def _is_positive(self, functions: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Whether each row is a positive of the paired function (sorted queries keep the binary search local)."""
        if self.dense_labels is not None:
            return self.dense_labels[rows, functions]
        keys = functions * self.n_rows + rows
        ordered, order = _sort_with_order(keys)
        found = np.empty(len(keys), dtype=np.int64)
        found[order] = np.searchsorted(self._keys, ordered)
        return self._keys[found.clip(max=len(self._keys) - 1)] == keys

    @staticmethod
    def _repeats(rows: np.ndarray, rejected: np.ndarray) -> np.ndarray:
        """Slots whose row already occurs in an earlier slot of the same episode (rejected slots are ignored)."""
        slots = np.arange(rows.shape[1])
        keys = np.where(rejected, slots, rows + len(slots))  # rejected slots get unique keys below every row
        ordered, order = _sort_with_order(keys)
        repeat = np.zeros(rows.shape, dtype=bool)
        np.put_along_axis(repeat, order[:, 1:], ordered[:, 1:] == ordered[:, :-1], axis=1)
        return repeat


def _sort_with_order(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted keys, argsort) of non-negative int64 keys along the last axis, ties in position order.

    One value sort of key·n + position: np.sort is several times faster than np.argsort on these sizes.
    """
    n = keys.shape[-1]
    if keys.size and keys.max() >= np.iinfo(np.int64).max // max(n, 1):
        raise OverflowError("sampler keys too large to sort with their positions")
    packed = np.sort(keys * n + np.arange(n), axis=-1)
    return packed // n, packed % n
