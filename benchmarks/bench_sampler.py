"""Episode sampling at training scale: a batch of 4,096 episodes × 120 tokens over 118,287 images.

Codes: synthetic top-64 of 49,152 latents (benchmarks/bench_codes.py); min_nonzero = 120 keeps ≈49k functions of
120–204 positives each.

ours      `EpisodeSampler.sample`: one episode at a time in a numba-compiled loop (partial Fisher-Yates of each
          function's list, marked rows or a bisection for the negatives, Fisher-Yates of the tokens), fed with words
          from each block's numpy generator.
baseline  the plain numpy loop a competent user writes from the same precomputed per-function positive lists (CSR,
          rows ascending): per episode, n_pos ~ round(N(sl/2, sl/20)) clamped as ours, a permutation of the
          function's list for the positives, uniformly drawn negatives rejected by a `searchsorted` membership test
          and de-duplicated, a shuffle; written into preallocated (B, sl) arrays. No dense matrix, no O(N) scan.
Lines: (1) both single-threaded (ours threads=1); (2) both with 2 workers (ours threads=2; the baseline's batch
split in two halves over a warm 2-process fork pool that inherits the lists and writes into shared output arrays, as
our threads write in place, since its per-episode Python loop holds the GIL; that is 7 % faster than pickling the
halves back). Best of REPEATS (9) each, ours and baseline alternated (a batch takes 10 ms and 150 ms, so nine rounds
cost seconds and steady the minimum of both; the kernel is compiled, or loaded from its cache, in the warm-up). The
gather of the 768-d inputs is identical work for both and is not timed. Outputs are checked inside the benchmark
(asserts): every episode of both samplers has sl distinct rows, labels equal to true membership of the episode's
function, magnitudes equal to the codes' values on positives and 0 on negatives, and the mean n_pos of both within
0.5 of sl/2 (4,096 draws of sd 6: 0.5 is > 5 standard errors).

    python -m benchmarks sampler
"""

from __future__ import annotations

import mmap
import multiprocessing
import time

import numpy as np

from benchmarks.bench_codes import D_SAE, N_IMAGES, synthetic_codes
from benchmarks.common import report, unmet
from metalign.functions.codes import Codes
from metalign.functions.select import function_stats, select_functions
from metalign.train.sampler import CHUNK, EpisodeSampler

BATCH, SL = 4096, 120
REPEATS = 9


def synthetic_sampler(seed: int = 0) -> tuple[Codes, EpisodeSampler]:
    indices, values = synthetic_codes(seed=seed)
    stats = function_stats(indices, values, D_SAE)
    kept = select_functions(stats.nnz, 120, SL, N_IMAGES).latent_id
    codes = Codes(ids=[str(i) for i in range(N_IMAGES)], latent_id=kept, nnz=stats.nnz[kept],
                  mean=stats.mean[kept], std=stats.std[kept], attrs={"d_sae": D_SAE}, indices=indices, values=values)
    return codes, EpisodeSampler.from_codes(codes, SL, seed=1)


def numpy_loop(offsets: np.ndarray, rows: np.ndarray, mags: np.ndarray, n_rows: int, sl: int, max_draw: int,
               batch: int, seed: int, out: tuple[np.ndarray, ...] | None = None) -> tuple[np.ndarray, ...]:
    """The fair baseline: one episode at a time over precomputed positive lists, rejection-sampled negatives; into
    `out` (rows, labels, mags, functions) when given."""
    rng = np.random.default_rng(seed)
    n_functions = len(offsets) - 1
    if out is None:
        out = (np.empty((batch, sl), dtype=np.int64), np.empty((batch, sl), dtype=np.float32),
               np.empty((batch, sl), dtype=np.float32), np.empty(batch, dtype=np.int64))
    out_rows, out_labels, out_mags, functions = out
    functions[:] = rng.integers(0, n_functions, size=batch)
    n_pos_all = np.rint(rng.normal(sl / 2, sl / 20, size=batch)).astype(np.int64).clip(sl - max_draw, max_draw)
    out_labels[:] = 0
    out_mags[:] = 0
    for b in range(batch):
        j, n_pos = functions[b], n_pos_all[b]
        lo, hi = offsets[j], offsets[j + 1]
        plist = rows[lo:hi]
        pick = lo + rng.permutation(hi - lo)[:n_pos]
        n_neg = sl - n_pos
        negatives = np.empty(0, dtype=np.int64)
        while len(negatives) < n_neg:
            cand = rng.integers(0, n_rows, size=n_neg + 8)
            at = np.searchsorted(plist, cand).clip(max=len(plist) - 1)
            cand = cand[plist[at] != cand]
            cand = np.concatenate([negatives, cand])
            _, first = np.unique(cand, return_index=True)
            negatives = cand[np.sort(first)][:n_neg]
        order = rng.permutation(sl)
        episode = np.concatenate([rows[pick], negatives])[order]
        out_rows[b] = episode
        label = order < n_pos
        out_labels[b] = label
        out_mags[b, label] = mags[pick][order[label]]
    return out


_SHARED: dict = {}  # the CSR lists and the shared output arrays, inherited by the forked workers (never pickled)


def _shared_outputs() -> tuple[np.ndarray, ...]:
    """(rows, labels, mags, functions) of one batch in anonymous shared memory: the forked workers write their halves
    in place, as our threads do, so no result is pickled back."""
    shapes = (((BATCH, SL), np.int64), ((BATCH, SL), np.float32), ((BATCH, SL), np.float32), ((BATCH,), np.int64))
    return tuple(np.frombuffer(mmap.mmap(-1, int(np.prod(shape)) * np.dtype(dtype).itemsize), dtype=dtype)
                 .reshape(shape) for shape, dtype in shapes)


def _half(job: tuple[int, int]) -> None:
    seed, part = job
    half = slice(part * (BATCH // 2), (part + 1) * (BATCH // 2))
    numpy_loop(*_SHARED["csr"], *_SHARED["args"], BATCH // 2, seed, tuple(a[half] for a in _SHARED["out"]))


def _baseline_parallel(pool, seed: int) -> tuple[np.ndarray, ...]:
    pool.map(_half, [(seed * 2, 0), (seed * 2 + 1, 1)])
    return _SHARED["out"]


def _our_functions(sampler: EpisodeSampler, step: int) -> np.ndarray:
    """The functions `sample` drew for `step` (its first draw of each block's generator)."""
    return np.concatenate([sampler._rng(0, sampler.rank, step, b).integers(0, sampler.n_functions,
                                                                          size=min(CHUNK, BATCH - b * CHUNK))
                           for b in range(-(-BATCH // CHUNK))])


def check_episodes(name: str, csr: tuple, rows: np.ndarray, labels: np.ndarray, mags: np.ndarray,
                   functions: np.ndarray) -> None:
    offsets, positive_rows, positive_mags, n_rows = csr
    assert rows.shape == labels.shape == mags.shape == (BATCH, SL), name
    keys = np.repeat(np.arange(len(offsets) - 1, dtype=np.int64), np.diff(offsets)) * n_rows + positive_rows
    query = (functions[:, None] * n_rows + rows).ravel()
    at = np.searchsorted(keys, query).clip(max=len(keys) - 1)
    member = keys[at] == query
    assert np.array_equal(member, labels.ravel() == 1), f"{name}: labels disagree with membership"
    assert np.array_equal(np.where(member, positive_mags[at], 0), mags.ravel()), f"{name}: magnitudes wrong"
    ordered = np.sort(rows, axis=1)
    assert not (ordered[:, 1:] == ordered[:, :-1]).any(), f"{name}: repeated rows within an episode"
    assert abs(labels.sum(1).mean() - SL / 2) < 0.5, f"{name}: mean n_pos {labels.sum(1).mean()} off sl/2"


def _best(run, repeats: int = REPEATS) -> tuple[float, tuple]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> None:
    codes, sampler = synthetic_sampler()
    csr = (sampler.offsets, sampler.rows, sampler.mags, sampler.n_rows)
    args = (sampler.sl, sampler.max_draw)
    sampler.sample(BATCH, 0, threads=1)  # warm-up
    numpy_loop(*csr, *args, 64, 0)

    times = {"ours1": [], "base1": [], "ours2": [], "base2": []}
    _SHARED.update(csr=csr, args=args, out=_shared_outputs())
    with multiprocessing.get_context("fork").Pool(2) as pool:
        _baseline_parallel(pool, 0)  # start the workers
        for step in range(1, REPEATS + 1):  # alternated, best of REPEATS
            for key, run in (("ours1", lambda: sampler.sample(BATCH, step, threads=1)),
                             ("base1", lambda: numpy_loop(*csr, *args, BATCH, step)),
                             ("ours2", lambda: sampler.sample(BATCH, step, threads=2)),
                             ("base2", lambda: _baseline_parallel(pool, step))):
                start = time.perf_counter()
                out = run()
                times[key].append(time.perf_counter() - start)
                if step == 1:
                    functions = _our_functions(sampler, step) if key.startswith("ours") else out[3]
                    check_episodes(key, csr, out[0], out[1], out[2], functions)
    best = {key: min(value) for key, value in times.items()}
    for threads in (1, 2):
        ours, baseline = best[f"ours{threads}"], best[f"base{threads}"]
        met = unmet(baseline / ours >= 10)
        how = "single-threaded" if threads == 1 else "2 threads vs loop over 2 forked processes"
        report(f"sampler_batch_4096x120_{threads}worker", ours, baseline,
               f">=10x vs plain numpy per-episode loop, {how}, episodes checked valid, best of {REPEATS}{met}")


if __name__ == "__main__":
    main()
