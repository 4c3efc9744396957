"""Episodes (docs/methods.md §4): one kept function j, sl images, n_pos ~ round(N(sl/2, sl/20)) of them positives of j.

Per-function positive lists are built once in CSR form (memory O(nnz), never a dense N x F matrix, docs/methods.md
P-41), and each episode costs O(sl) (docs/methods.md P-43), drawn one at a time by the compiled loop of
`episode_kernel`: a partial Fisher-Yates shuffle of the list of a function with at most KEYED_NNZ·sl positives
(whose rows are then marked, so that a negative is checked in O(1)), positions with rejection of repeats for longer
lists, negatives uniform over all rows with rejection of positives and repeats, and a Fisher-Yates shuffle of the sl
tokens.

Every draw comes from a generator seeded by (seed, stream, rank, step, block of CHUNK episodes): it draws the block's
functions and positive counts, then the stream of words the kernel consumes. Episodes are therefore reproducible,
independent of call order (resume), of the number of sampler threads (which take whole blocks) and of how the word
stream is cut, and they differ across ranks (docs/methods.md P-15).

Dense targets (neurons, docs/methods.md §3) add an (N, F) magnitude matrix: negatives then carry magnitudes too
(x − median ≤ 0), membership of a long list is read from the labels in O(1), and the magnitude of a dense function is
fitted on every token (`mse_mask`), that of a sparse one on positives only (docs/methods.md §6).
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from metalign.functions.codes import Codes
from metalign.functions.select import max_episode_draw
from metalign.io import DataContractError
from metalign.train.episode_kernel import fill_episodes

_TRAIN_STREAM, _EVAL_STREAM = 0, 1
CHUNK = 512  # episodes per independently seeded block of a training batch
KEYED_NNZ = 4  # functions with at most KEYED_NNZ·sl positives shuffle their list, the others draw with rejection
WORDS_PER_TOKEN = 2  # 32-bit words drawn ahead per episode token (about 1.9 are used); more are drawn when short


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
        self.dense = dense
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
        if self.n_rows > 1 << 32 or len(self.rows) and (self.rows.min() < 0 or self.rows.max() >= self.n_rows):
            raise DataContractError(f"{source}: positive rows must lie in [0, {self.n_rows}) (at most 2^32 rows)")
        if dense is not None and not (np.array_equal(np.count_nonzero(dense_labels, axis=0), self.nnz)
                                      and dense_labels[self.rows, np.repeat(np.arange(self.n_functions), self.nnz)]
                                      .all()):
            raise DataContractError(f"{source}: dense labels disagree with the positive lists")
        # the kernel reads membership of long lists from the labels when there are any ((0, 0): bisect the list)
        self._labels = np.zeros((0, 0), bool) if dense is None else np.ascontiguousarray(dense_labels, dtype=bool)
        self._keyed = KEYED_NNZ * self.sl  # lists at most this long are shuffled whole (and size the scratch)
        self._scratch = threading.local()  # per-thread kernel scratch, kept across steps
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0

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

        Blocks of `CHUNK` episodes draw from their own generators (seed, stream, rank, step, block); up to `threads`
        threads take blocks as they come (the compiled loop releases the GIL), which changes the speed, never the
        episodes.
        """
        out = _empty_batch(batch_size, self.sl)
        blocks = queue.SimpleQueue()
        for block in range(-(-batch_size // CHUNK)):
            blocks.put(block)

        def work() -> None:
            while True:
                try:
                    block = blocks.get_nowait()
                except queue.Empty:
                    return
                rows = slice(block * CHUNK, min(batch_size, (block + 1) * CHUNK))
                rng = self._rng(_TRAIN_STREAM, self.rank, step, block)
                self._draw(rng, rng.integers(0, self.n_functions, size=rows.stop - rows.start),
                           tuple(array[rows] for array in out))

        helpers = min(threads, -(-batch_size // CHUNK)) - 1
        if helpers > 0:   # the calling thread works too
            if self._pool is None or self._pool_size != helpers:
                if self._pool is not None:
                    self._pool.shutdown()
                self._pool, self._pool_size = ThreadPoolExecutor(max_workers=helpers), helpers  # kept across steps
            done = [self._pool.submit(work) for _ in range(helpers)]
            work()
            for future in done:
                future.result()
        else:
            work()
        return out

    def evaluation_set(self, n_per_function: int, seed: int) -> EpisodeSet:
        """The fixed evaluation episodes (docs/methods.md P-17): n_per_function per kept function, ordered by function.

        Depends only on the codes, sl and `seed` (not on rank or on this sampler's training seed), so every model and
        backbone is evaluated on identical episodes. Blocks of `CHUNK` episodes draw from generators seeded by
        (seed, stream, block).
        """
        functions = np.repeat(np.arange(self.n_functions, dtype=np.int64), n_per_function)
        out = _empty_batch(len(functions), self.sl)
        for block in range(-(-len(functions) // CHUNK)):
            rows = slice(block * CHUNK, (block + 1) * CHUNK)
            rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(_EVAL_STREAM, block)))
            self._draw(rng, functions[rows], tuple(array[rows] for array in out))
        return EpisodeSet(*out, functions)

    def _rng(self, stream: int, rank: int, step: int, block: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(stream, rank, int(step), block)))

    def _draw(self, rng: np.random.Generator, functions: np.ndarray, out: tuple[np.ndarray, ...]) -> None:
        """Episodes of `functions` into `out` (rows, labels, mags, mse_mask; (B, sl) each): their positive counts,
        then the kernel over words from the same generator, with more words appended whenever it runs short."""
        sl, half, size = self.sl, self.max_draw, len(functions)
        n_pos = np.rint(rng.normal(sl / 2, sl / 20, size=size)).astype(np.int64).clip(sl - half, half)
        rows, labels, mags, mse_mask = out
        scratch = self._thread_scratch()
        words, first = self._words(rng, size), 0
        while True:
            first, at = fill_episodes(words, first, functions, n_pos, self.offsets, self.rows, self.mags, self.n_rows,
                                      self._keyed, self._labels, rows, labels, mags, *scratch)
            if first == size:
                break
            words = np.concatenate([words[at:], self._words(rng, size - first)])
        if self.dense is not None:
            mags[...] = self.dense[rows, functions[:, None]]
            mse_mask[...] = np.where(self.mse_all[functions][:, None], np.float32(1), labels)
        else:
            mse_mask[...] = labels

    def _words(self, rng: np.random.Generator, episodes: int) -> np.ndarray:
        """Uniform 32-bit words for about `episodes` episodes, two per 64-bit output of the generator."""
        return rng.integers(0, 1 << 64, (episodes * WORDS_PER_TOKEN * self.sl + 1) // 2 + 8,
                            dtype=np.uint64).view(np.uint32)

    def _thread_scratch(self) -> tuple[np.ndarray, ...]:
        """This thread's kernel scratch: picked positions, the row marks (all zero between episodes), the sl tokens'
        rows and magnitudes, the slot order and a sink for the look-ahead reads."""
        scratch = getattr(self._scratch, "arrays", None)
        if scratch is None:
            scratch = (np.empty(max(self._keyed, self.sl), np.int64), np.zeros(self.n_rows, np.uint8),
                       np.empty(self.sl, np.int64), np.empty(self.sl, np.float32), np.empty(self.sl, np.int64),
                       np.zeros(1, np.int64))
            self._scratch.arrays = scratch
        return scratch


def _empty_batch(size: int, sl: int) -> Batch:
    return Batch(np.empty((size, sl), dtype=np.int64), *(np.empty((size, sl), dtype=np.float32) for _ in range(3)))
