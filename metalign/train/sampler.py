"""Episodes (docs/methods.md §4): one kept function j, sl images, n_pos ~ round(N(sl/2, sl/20)) of them positives of j.

Per-function positive lists are built once in CSR form (memory O(nnz), never a dense N x F matrix, docs/methods.md
P-41). An episode costs O(sl) (docs/methods.md P-43). The positives of a function with at most KEYED_NNZ·sl of them
are its list in the order of one random key each (a uniform subset in random order, no redraws), and its negative
candidates, uniform over all rows, are checked against its whole list and each other by one sort of both. Other
functions draw positives from their list and reject negatives by bisecting it. Rejected or repeated draws are
replaced by spare draws, and an episode still short redraws its missing slots, in vectorised rounds over all such
episodes. One random order of the sl slots then interleaves positives and negatives.

Every draw comes from a generator seeded by (seed, stream, rank, step, block of CHUNK episodes), so episodes are
reproducible, independent of call order (resume) and differ across ranks (docs/methods.md P-15). Several blocks are
computed in one vectorised pass (fewer numpy calls, which is what lets threads help), each block drawing from its own
generator exactly as it would alone: episodes do not depend on the number of sampler threads.

Dense targets (neurons, docs/methods.md §3) add an (N, F) magnitude matrix: negatives then carry magnitudes too
(x − median ≤ 0), membership is read from it in O(1), and the magnitude of a dense function is fitted on every token
(`mse_mask`), that of a sparse one on positives only (docs/methods.md §6).
"""

from __future__ import annotations

import queue
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from metalign.functions.codes import Codes
from metalign.functions.select import max_episode_draw
from metalign.io import DataContractError

_TRAIN_STREAM, _EVAL_STREAM = 0, 1
CHUNK = 512  # episodes per independently seeded block of a training batch
_PASS_BLOCKS = 4  # at most this many blocks in one vectorised pass (fewer numpy calls; temporaries near the cache)
KEYED_NNZ = 4  # functions with at most KEYED_NNZ·sl positives draw them by random keys, the others by rejection
_MARGIN = 8  # spare draws per episode: rejected negatives (or repeated positions) are replaced without a new round


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
        if len(self.rows) and (self.rows.min() < 0 or self.rows.max() >= min(self.n_rows, 1 << 32)):
            raise DataContractError(f"{source}: positive rows must lie in [0, {self.n_rows}) (at most 2^32 rows)")
        self._depth = int(self.nnz.max()).bit_length()  # bisection steps that find any row in any positive list
        # positive lists padded so that a window of the largest keyed list starts at each; row ids as uint32 (half
        # the bytes to gather); `mags` stays a view of its padded copy
        keyed = self.nnz[self.nnz <= KEYED_NNZ * self.sl]
        self._keyed_width = int(keyed.max(initial=1))  # functions with at most this many positives are keyed
        self._rows32 = np.concatenate([self.rows, np.zeros(self._keyed_width, np.int64)]).astype(np.uint32)
        self._mags = np.concatenate([self.mags, np.zeros(self._keyed_width, np.float32)])
        self.mags = self._mags[:len(self.mags)]
        self._lists = sliding_window_view(self._rows32, self._keyed_width)   # row i: the positives from CSR entry i
        self._mag_lists = sliding_window_view(self._mags, self._keyed_width)
        self._columns = np.arange(self._keyed_width, dtype=np.uint32)
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

        Blocks of `CHUNK` episodes draw from their own generators (seed, stream, rank, step, block); runs of whole
        blocks are computed by up to `threads` threads (numpy releases the GIL in its loops), which changes the speed,
        never the episodes.
        """
        out = Batch(np.empty((batch_size, self.sl), dtype=np.int64),
                    *(np.empty((batch_size, self.sl), dtype=np.float32) for _ in range(3)))
        n_blocks = -(-batch_size // CHUNK)
        # the blocks split evenly into one run per thread, or more where a run would exceed _PASS_BLOCKS
        n_runs = max(min(threads, n_blocks), -(-n_blocks // _PASS_BLOCKS))
        runs = queue.SimpleQueue()
        for run in range(n_runs):
            runs.put(range(run * n_blocks // n_runs, (run + 1) * n_blocks // n_runs))

        def work() -> None:
            while True:
                try:
                    indices = runs.get_nowait()
                except queue.Empty:
                    return
                rows = slice(indices[0] * CHUNK, min(batch_size, (indices[-1] + 1) * CHUNK))
                streams = _Streams([self._rng(_TRAIN_STREAM, self.rank, step, b) for b in indices],
                                   [min(CHUNK, batch_size - b * CHUNK) for b in indices])
                self._draw(streams, streams.integers(self.n_functions), tuple(array[rows] for array in out))

        helpers = min(threads, n_runs) - 1
        if helpers > 0:   # the calling thread works too; helpers take runs as they come (a late core does less)
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
        out = Batch(np.empty((len(functions), self.sl), dtype=np.int64),
                    *(np.empty((len(functions), self.sl), dtype=np.float32) for _ in range(3)))
        blocks = range(-(-len(functions) // CHUNK))
        for first in range(0, len(blocks), _PASS_BLOCKS):
            run = blocks[first:first + _PASS_BLOCKS]
            rows = slice(run[0] * CHUNK, (run[-1] + 1) * CHUNK)
            streams = _Streams([np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(_EVAL_STREAM, b)))
                                for b in run], [len(functions[b * CHUNK:(b + 1) * CHUNK]) for b in run])
            self._draw(streams, functions[rows], tuple(array[rows] for array in out))
        return EpisodeSet(*out, functions)

    def _rng(self, stream: int, rank: int, step: int, block: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(stream, rank, int(step), block)))

    def _draw(self, streams: _Streams, functions: np.ndarray, out: tuple[np.ndarray, ...]) -> None:
        """Episodes of `functions` into `out` (rows, labels, mags, mse_mask; (B, sl) each).

        Positives (their first n_pos columns) and negatives (their first sl - n_pos) are drawn as two (B, max_draw)
        blocks, each already in random order; one random order of the sl slots interleaves them, a uniform
        arrangement built without per-episode Python.
        """
        batch, sl, half = len(functions), self.sl, self.max_draw
        n_pos = np.rint(streams.normal(sl / 2, sl / 20)).astype(np.int64).clip(sl - half, half)
        source = np.empty((batch, 2 * half), dtype=np.uint32)   # row ids: positives | negatives
        weight = np.zeros((batch, 2 * half), dtype=np.float32)  # their magnitudes; 0 for negatives
        keyed = self.nnz[functions] <= self._keyed_width
        for part, draw in ((keyed, self._keyed_episodes), (~keyed, self._drawn_episodes)):
            if part.all():
                draw(streams, functions, n_pos, source, weight)
            elif part.any():
                rows, mags = source[part], weight[part]
                draw(streams.subset(part), functions[part], n_pos[part], rows, mags)
                source[part], weight[part] = rows, mags
        order = _random_order(streams, sl)                          # slot -> rank; ranks < n_pos are positives
        positive = order < n_pos.astype(np.uint32)[:, None]
        column = order + (~positive) * (half - n_pos).astype(np.uint32)[:, None]   # rank -> column of source
        column += np.arange(0, source.size, source.shape[1], dtype=np.uint32)[:, None]
        rows, labels, mags, mse_mask = out
        rows[...] = np.take(source, column)
        labels[...] = positive
        if self.dense is not None:
            mags[...] = self.dense[rows, functions[:, None]]
            mse_mask[...] = np.where(self.mse_all[functions][:, None], np.float32(1), labels)
        else:
            np.take(weight, column, out=mags, mode="wrap")
            mse_mask[...] = labels

    def _keyed_episodes(self, streams: _Streams, functions: np.ndarray, n_pos: np.ndarray, source: np.ndarray,
                        weight: np.ndarray) -> None:
        """Episodes of functions with at most KEYED_NNZ·sl positives: their positive lists are copied whole (and the
        entries after them), the positives are the list in the order of one random key each (a uniform subset, no
        redraws), and the negative candidates are checked against the list and each other by one sort of both."""
        half, starts = self.max_draw, self.offsets[functions]
        lists = self._lists[starts]                                                  # (B, keyed width)
        padding = self._columns >= self.nnz[functions].astype(np.uint32)[:, None]    # entries of other lists
        order = _random_order(streams, lists.shape[1], padding, half)
        order += np.arange(0, lists.size, lists.shape[1], dtype=np.uint32)[:, None]
        source[:, :half] = np.take(lists, order)
        weight[:, :half] = np.take(self._mag_lists[starts], order)
        candidates = streams.integers(self.n_rows, half + _MARGIN)
        rejected = _in_list_or_repeated(lists, padding, candidates, self.n_rows)
        source[:, half:] = self._settle(streams, candidates, *rejected, self.sl - n_pos, self.n_rows, functions)

    def _drawn_episodes(self, streams: _Streams, functions: np.ndarray, n_pos: np.ndarray, source: np.ndarray,
                        weight: np.ndarray) -> None:
        """Episodes of functions with many positives: positions in the list drawn with redraws of repeats,
        negatives rejected by a bisection of the list (or the dense labels)."""
        half, counts = self.max_draw, self.nnz[functions]
        positions = streams.integers(counts[:, None], half + _MARGIN)
        positions = self._settle(streams, positions, *np.nonzero(_repeats(positions, int(counts.max()))), n_pos,
                                 counts)
        positions = self.offsets[functions][:, None] + positions
        source[:, :half], weight[:, :half] = self._rows32[positions], self.mags[positions]
        candidates = streams.integers(self.n_rows, half + _MARGIN)
        rejected = np.nonzero(_repeats(candidates, self.n_rows) | self._is_positive(functions[:, None], candidates))
        source[:, half:] = self._settle(streams, candidates, *rejected, self.sl - n_pos, self.n_rows, functions)

    def _settle(self, streams: _Streams, values: np.ndarray, row: np.ndarray, column: np.ndarray, needed: np.ndarray,
                high: int | np.ndarray, functions: np.ndarray | None = None) -> np.ndarray:
        """(B, W - _MARGIN) of uniform draws `values` from [0, high) (one bound, or one per row; the draws at (row,
        column) are rejected: repeats of an earlier column and, given `functions`, positives of functions[b]) whose
        first needed[b] are accepted draws.

        Rows keep their accepted draws in column order, spare draws replacing rejected ones; a row short of
        accepted draws redraws its missing slots in rounds that revisit only such rows. Draws are judged by value
        alone (a rejected value is rejected in every slot, a repeat loses to its earliest copy), so the accepted
        values are a uniform draw without replacement, in random order.
        """
        width = values.shape[1] - _MARGIN
        short, at = np.unique(row, return_inverse=True)
        if short.size:
            rejected = np.zeros((len(short), values.shape[1]), dtype=bool)
            rejected[at, column] = True
            order = np.argsort(rejected, axis=1, kind="stable")
            values[short] = np.take_along_axis(values[short], order, axis=1)
            rejected = np.take_along_axis(rejected, order, axis=1)[:, :width]
            found, slots = np.nonzero(rejected & (np.arange(width) < needed[short, None]))
            episodes = short[found]
        else:
            episodes = slots = short
        while episodes.size:
            values[episodes, slots] = streams.redraw(episodes, high[episodes] if np.ndim(high) else high)
            touched, at = np.unique(episodes, return_inverse=True)
            rejected = _repeats(values[touched, :width], self.n_rows)
            if functions is not None:
                hit = self._is_positive(functions[episodes], values[episodes, slots])
                rejected[at[hit], slots[hit]] = True
            found, slots = np.nonzero(rejected & (np.arange(width) < needed[touched, None]))
            episodes = touched[found]
        return values[:, :width]

    def _is_positive(self, functions: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Whether each row is a positive of the paired (broadcast) function: the dense labels, else a bisection of
        the function's positive list."""
        if self.dense_labels is not None:
            return self.dense_labels[rows, functions]
        functions = np.broadcast_to(functions, rows.shape)
        lo, hi = self.offsets[functions], self.offsets[functions + 1]
        for _ in range(self._depth):
            mid = (lo + hi) >> 1
            below = self._rows32[mid.clip(max=len(self.rows) - 1)] < rows
            lo, hi = np.where(below & (lo < hi), mid + 1, lo), np.where(below, hi, mid)
        return (lo < self.offsets[functions + 1]) & (self._rows32[lo.clip(max=len(self.rows) - 1)] == rows)


class _Streams:
    """The generators of consecutive blocks of episodes (sizes[i] episodes draw from rngs[i]): every draw is made
    block by block, so a block's draws do not depend on the blocks computed with it."""

    def __init__(self, rngs: list[np.random.Generator], sizes: list[int]):
        self.rngs, self.sizes = rngs, sizes
        self.bounds = np.concatenate([[0], np.cumsum(sizes)])

    def subset(self, rows: np.ndarray) -> _Streams:
        """The same generators for the episodes flagged in `rows` (a boolean mask over all episodes)."""
        return _Streams(self.rngs, [int(rows[lo:hi].sum()) for lo, hi in zip(self.bounds[:-1], self.bounds[1:])])

    def _each(self, draw) -> np.ndarray:
        parts = [draw(rng, lo, hi) for rng, lo, hi in zip(self.rngs, self.bounds[:-1], self.bounds[1:])]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def integers(self, high: int | np.ndarray, width: int | None = None) -> np.ndarray:
        """Uniform integers in [0, high) (one bound, or one per episode of shape (B, 1)), (B,) or (B, width); uint32
        with a width, int64 without."""
        if width is None:
            return self._each(lambda rng, lo, hi: rng.integers(0, high, size=hi - lo))
        return self._each(lambda rng, lo, hi: rng.integers(0, high if np.ndim(high) == 0 else high[lo:hi],
                                                           size=(hi - lo, width), dtype=np.uint32))

    def normal(self, loc: float, scale: float) -> np.ndarray:
        return self._each(lambda rng, lo, hi: rng.normal(loc, scale, size=hi - lo))

    def words(self, width: int) -> np.ndarray:
        """(B, width) uniform uint32 words straight from the bit generators (two per 64-bit output; the full-range
        `integers` path returns the raw outputs, faster than `random_raw`)."""
        return self._each(lambda rng, lo, hi: rng.integers(0, 1 << 64, ((hi - lo) * width + 1) // 2, dtype=np.uint64)
                          .view(np.uint32)[:(hi - lo) * width].reshape(hi - lo, width))

    def redraw(self, episodes: np.ndarray, high: int | np.ndarray) -> np.ndarray:
        """One uniform integer in [0, high) per entry of `episodes` (ascending), drawn from each episode's generator
        in that order."""
        cuts = np.searchsorted(episodes, self.bounds)
        out = np.empty(len(episodes), dtype=np.int64)
        for rng, lo, hi in zip(self.rngs, cuts[:-1], cuts[1:]):
            if hi > lo:
                out[lo:hi] = rng.integers(0, high if np.ndim(high) == 0 else high[lo:hi], size=hi - lo)
        return out


def _in_list_or_repeated(lists: np.ndarray, padding: np.ndarray, candidates: np.ndarray,
                         n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) of the (B, W) candidates that occur in their row's positive list (`lists` where not `padding`)
    or in an earlier column: one sort per row of the list and the candidates, each value packed with a tag that
    orders equal values as list entry (0), candidates by column (1..W), then the list's padding (last, so it rejects
    nothing)."""
    width, listed = candidates.shape[1], lists.shape[1]
    dtype, shift = _packing(width + 2, n_rows)
    last = dtype(width + 1)
    packed = np.empty((len(lists), listed + width), dtype=dtype)
    np.left_shift(lists, dtype(shift), out=packed[:, :listed], dtype=dtype)
    packed[:, :listed] |= padding * last
    np.left_shift(candidates, dtype(shift), out=packed[:, listed:], dtype=dtype)
    packed[:, listed:] |= np.arange(1, width + 1, dtype=dtype)
    packed.sort(axis=1)
    flat = packed.ravel()                           # one pass over all rows; pairs across two rows are dropped
    later = np.flatnonzero((flat[1:] ^ flat[:-1]) < dtype(1 << shift)) + 1
    row, at = np.divmod(later, packed.shape[1])
    tag = flat[later] & dtype((1 << shift) - 1)
    keep = (at > 0) & (tag > 0) & (tag < last)
    return row[keep], tag[keep].astype(np.intp) - 1


def _repeats(values: np.ndarray, bound: int) -> np.ndarray:
    """(B, n) flags of slots whose value (non-negative, < bound) occurs in an earlier slot of the same row: one value
    sort of the values packed with their columns, so equal values sit together in column order."""
    n = values.shape[1]
    dtype, shift = _packing(n, bound)
    packed = np.sort((values.astype(dtype) << dtype(shift)) | np.arange(n, dtype=dtype), axis=-1)
    value = packed >> dtype(shift)
    row, at = np.nonzero(value[:, 1:] == value[:, :-1])
    repeat = np.zeros(values.shape, dtype=bool)
    repeat[row, (packed[row, at + 1] & dtype((1 << shift) - 1)).astype(np.intp)] = True
    return repeat


def _packing(n: int, bound: int) -> tuple[type, int]:
    """The narrowest unsigned dtype holding key·2^shift + position for keys < bound and positions < n (32-bit sorts
    are several times faster than 64-bit ones), and that shift."""
    shift = max(n - 1, 1).bit_length()
    if bound <= 1 << (32 - shift):
        return np.uint32, shift
    if bound <= 1 << (64 - shift):
        return np.uint64, shift
    raise OverflowError("sampler keys too large to sort with their positions")


def _random_order(streams: _Streams, width: int, last: np.ndarray | None = None,
                  first: int | None = None) -> np.ndarray:
    """The leading `first` columns of a uniform random permutation of each episode's `width` positions; positions
    flagged in `last` (if given) come after the others.

    Random 32-bit words carry the positions in their low bits and one (fast, 32-bit) sort orders them. Two positions
    share a key with probability ≈ width²/2^(33 − log2 width) per row (2e-4 for width 120); such a tie only keeps
    their original relative order.
    """
    shift = max(width - 1, 1).bit_length()
    if shift > 16:
        raise ValueError(f"random orders of {width} positions would leave too few key bits")
    low = np.uint32((1 << shift) - 1)
    packed = streams.words(width)
    packed &= ~low
    packed |= np.arange(width, dtype=np.uint32)
    if last is not None:  # the largest key: after every other position
        packed |= last * ~low
    packed.sort(axis=-1)
    return packed[:, :first] & low
