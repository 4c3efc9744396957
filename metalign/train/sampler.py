"""Episodes (docs/methods.md §4): one kept function j, sl images, n_pos ~ round(N(sl/2, sl/20)) of them positives of j.

Per-function positive lists are built once in CSR form (memory O(nnz), never a dense N x F matrix, docs/methods.md P-41). An episode
costs O(sl): the positives of a function with at most KEYED_NNZ·sl of them are its n_pos smallest under one random key
each (a uniform subset, no redraws); other positives are drawn from j's list and negatives uniformly from all rows with
rejection of j's positives, and duplicates are redrawn (docs/methods.md P-43), in vectorised rounds over all still-open slots of a
batch. Rejection looks a row up in a hashed bitmap of all (function, row) pairs (4–8 bytes per nnz) and bisects j's
list only on a hit. Every draw comes from a generator seeded by (seed, stream, rank, step, block), so episodes are
reproducible, independent of call order (resume) and of the number of sampler threads, and differ across ranks (docs/methods.md P-15).

Dense targets (neurons, docs/methods.md §3) add an (N, F) magnitude matrix: negatives then carry magnitudes too
(x − median ≤ 0), membership is read from it in O(1), and the magnitude of a dense function is fitted on every token
(`mse_mask`), that of a sparse one on positives only (docs/methods.md §6).
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
KEYED_NNZ = 4  # functions with at most KEYED_NNZ·sl positives draw them by random keys, the others by rejection
_BITMAP_BITS_PER_PAIR = 32  # false-hit rate of the rejection bitmap ≈ 1/32: few lookups reach the bisection
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing multiplier


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
    both positives and negatives for; it is validated here again (docs/methods.md P-16).
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
        keys = np.repeat(np.arange(self.n_functions, dtype=np.int64), self.nnz) * self.n_rows + self.rows
        if len(keys) > 1 and not (np.diff(keys) > 0).all():
            raise DataContractError(f"{source}: positive rows must be unique and ascending within each function")
        self._depth = int(self.nnz.max()).bit_length()  # bisection steps that find any row in any positive list
        self._bitmap, self._hash_shift = (None, None) if dense is not None else _bitmap(keys)

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
        """sigma_m (docs/methods.md §4): population std of the fitted magnitudes of the kept functions (positives of sparse
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
        """The fixed evaluation episodes (docs/methods.md P-17): n_per_function per kept function, ordered by function.

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
        positive = (np.arange(sl)[None, :] < n_pos[:, None]).reshape(-1)  # positives first; the shuffle mixes them
        rows = np.zeros(batch * sl, dtype=np.int64)
        mags = np.zeros(batch * sl, dtype=np.float32)  # unshuffled; stays 0 for negatives of sparse functions
        keyed = np.flatnonzero(self.nnz[functions] <= KEYED_NNZ * sl)
        done = np.zeros((batch, sl), dtype=bool)
        done[keyed, :self.max_draw] = positive.reshape(batch, sl)[keyed, :self.max_draw]
        filled = np.flatnonzero(done)
        picked = self._keyed_positions(rng, functions[keyed])[done[keyed, :self.max_draw]]
        rows[filled], mags[filled] = self.rows[picked], self.mags[picked]
        todo = np.flatnonzero(~done)  # flat slots still to fill, ascending: negatives and unkeyed positives
        while todo.size:
            pos = positive[todo]
            filled, open_ = todo[pos], todo[~pos]
            j = functions[filled // sl]
            picked = self.offsets[j] + rng.integers(0, self.nnz[j])
            rows[filled], mags[filled] = self.rows[picked], self.mags[picked]
            negative = rng.integers(0, self.n_rows, size=open_.size)
            rows[open_] = negative
            pending = np.zeros(batch * sl, dtype=bool)
            pending[open_[self._is_positive(functions[open_ // sl], negative)]] = True
            touched = np.zeros(batch, dtype=bool)
            touched[todo // sl] = True
            touched = np.flatnonzero(touched)
            pending = pending.reshape(batch, sl)
            pending[touched] |= self._repeats(rows.reshape(batch, sl)[touched], pending[touched])
            todo = np.flatnonzero(pending)
        shuffle = _random_order(rng, batch, sl) + np.arange(0, batch * sl, sl)[:, None]
        rows, positive = rows[shuffle], positive[shuffle]
        labels = positive.astype(np.float32)
        if self.dense is not None:
            mags = self.dense[rows, functions[:, None]]
            mse_mask = np.where(self.mse_all[functions][:, None], np.float32(1), labels)
            return rows, labels, mags, mse_mask
        return rows, labels, mags[shuffle], labels.copy()

    def _keyed_positions(self, rng: np.random.Generator, functions: np.ndarray) -> np.ndarray:
        """(B, max_draw) CSR positions: each episode's positives in the order of one random key each, so the first
        n_pos form a uniform n_pos-subset without redraws (nnz ≤ KEYED_NNZ·sl keeps this O(sl) per episode)."""
        counts = self.nnz[functions]
        order = _random_order(rng, len(functions), int(counts.max(initial=self.max_draw)), counts, self.max_draw)
        return self.offsets[functions][:, None] + order

    def _is_positive(self, functions: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Whether each row is a positive of the paired function: the bitmap rules out most pairs in O(1), a
        bisection of j's positive list decides the rest."""
        if self.dense_labels is not None:
            return self.dense_labels[rows, functions]
        hashed = ((functions * self.n_rows + rows).astype(np.uint64) * _GOLDEN) >> self._hash_shift
        hit = np.flatnonzero((self._bitmap[hashed >> np.uint64(6)] >> (hashed & np.uint64(63))) & np.uint64(1))
        found = np.zeros(len(rows), dtype=bool)
        found[hit] = self._in_list(functions[hit], rows[hit])
        return found

    def _in_list(self, functions: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Exact membership of each row in its function's ascending positive list, by a vectorised bisection."""
        lo, hi = self.offsets[functions], self.offsets[functions + 1]
        for _ in range(self._depth):
            mid = (lo + hi) >> 1
            below = self.rows[mid.clip(max=len(self.rows) - 1)] < rows
            lo, hi = np.where(below & (lo < hi), mid + 1, lo), np.where(below, hi, mid)
        return (lo < self.offsets[functions + 1]) & (self.rows[lo.clip(max=len(self.rows) - 1)] == rows)

    def _repeats(self, rows: np.ndarray, rejected: np.ndarray) -> np.ndarray:
        """Slots whose row already occurs in an earlier slot of the same episode (rejected slots are ignored)."""
        n = rows.shape[1]
        keys = np.where(rejected, np.arange(n), rows + n)  # rejected slots get unique keys below every row
        ordered, order = _sort_with_order(keys, self.n_rows + n)
        repeat = np.zeros(rows.size, dtype=bool)
        repeat[order[:, 1:] + np.arange(0, rows.size, n)[:, None]] = ordered[:, 1:] == ordered[:, :-1]
        return repeat.reshape(rows.shape)


def _bitmap(keys: np.ndarray) -> tuple[np.ndarray, np.uint64]:
    """A one-hash Bloom filter of the (function, row) keys: uint64 words of 32–64 bits per key, and the shift that
    maps a key's Fibonacci hash to a bit."""
    bits = max(len(keys) * _BITMAP_BITS_PER_PAIR - 1, 63).bit_length()
    shift = np.uint64(64 - bits)
    hashed = (keys.astype(np.uint64) * _GOLDEN) >> shift
    bitmap = np.zeros(1 << (bits - 6), dtype=np.uint64)
    np.bitwise_or.at(bitmap, hashed >> np.uint64(6), np.uint64(1) << (hashed & np.uint64(63)))
    return bitmap, shift


def _packing(n: int, bound: int) -> tuple[type, int]:
    """The narrowest unsigned dtype holding key·2^shift + position for keys < bound and positions < n (32-bit sorts
    are several times faster than 64-bit ones), and that shift."""
    shift = max(n - 1, 1).bit_length()
    if bound <= 1 << (32 - shift):
        return np.uint32, shift
    if bound <= 1 << (64 - shift):
        return np.uint64, shift
    raise OverflowError("sampler keys too large to sort with their positions")


def _sort_with_order(keys: np.ndarray, bound: int) -> tuple[np.ndarray, np.ndarray]:
    """(sorted keys, argsort) of non-negative integer keys < bound along the last axis, ties in position order: one
    value sort of the keys packed with their positions (np.sort is several times faster than np.argsort)."""
    n = keys.shape[-1]
    dtype, shift = _packing(n, bound)
    packed = np.sort((keys.astype(dtype) << dtype(shift)) | np.arange(n, dtype=dtype), axis=-1)
    return packed >> dtype(shift), (packed & dtype((1 << shift) - 1)).astype(np.intp)


def _random_order(rng: np.random.Generator, batch: int, width: int, counts: np.ndarray | None = None,
                  first: int | None = None) -> np.ndarray:
    """The leading `first` columns of a uniform random permutation of each row's `width` positions (batch rows);
    positions ≥ counts (if given) come last.

    Random 32-bit words carry the positions in their low bits and one (fast, 32-bit) sort orders them. Two positions
    share a key with probability ≈ width²/2^(33 − log2 width) per row (2e-4 for width 120); such a tie only keeps
    their original relative order.
    """
    shift = max(width - 1, 1).bit_length()
    if shift > 16:
        raise ValueError(f"random orders of {width} positions would leave too few key bits")
    low = np.uint32((1 << shift) - 1)
    packed = (rng.integers(0, 1 << 32, size=(batch, width), dtype=np.uint32) & ~low) | np.arange(width, dtype=np.uint32)
    if counts is not None:  # the largest key: after every real position
        np.bitwise_or(packed, ~low, out=packed, where=np.arange(width)[None, :] >= counts[:, None])
    return (np.sort(packed, axis=-1)[:, :first] & low).astype(np.intp)
