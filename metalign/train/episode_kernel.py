"""The compiled inner loop of the episode sampler (docs/methods.md §4): one episode at a time, O(sl) each (P-43).

An episode is a handful of small, data-dependent steps (a partial shuffle, a few rejected draws, a shuffle of sl
slots). numpy can only batch those through sorts of padded (B, width) arrays; compiled, one episode's working set
(its list and a row bitmap) stays in cache and no step is done for a whole padded width.

Randomness comes in as a stream of uniform 32-bit words from the block's numpy generator. Every integer in [0, n) is
Lemire's multiply-shift of one word, with the biased products rejected, so draws are exactly uniform. The words are
consumed in order; when they run out inside an episode the kernel returns that episode and its first word, the
caller appends more words from the same generator and resumes there, so an episode never depends on how the stream
was cut.

Bounds: every read is guaranteed before it is made. A loop of d <= sl draws first checks that d words remain; a
rejected product reads another word only while sl words would still remain after it, else the draw fails (-1).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(nogil=True, cache=True, inline="always")
def _below(words: np.ndarray, at: int, n: int, headroom: int) -> tuple[int, int]:
    """(uniform integer in [0, n), next word position): Lemire's nearly-divisionless method. The caller guarantees
    words[at]; a (rare) rejected product reads another word only while `headroom` words would remain, else the draw
    fails with (-1, at)."""
    product = np.uint64(words[at]) * np.uint64(n)
    at += 1
    low = np.uint32(product & np.uint64(0xFFFFFFFF))
    if low < n:
        threshold = np.uint32((np.uint64(1 << 32) - np.uint64(n)) % np.uint64(n))
        while low < threshold:  # the 2^32 mod n products that would favour small values
            if at + headroom >= len(words):
                return -1, at
            product = np.uint64(words[at]) * np.uint64(n)
            at += 1
            low = np.uint32(product & np.uint64(0xFFFFFFFF))
    return np.int64(product >> np.uint64(32)), at


@njit(nogil=True, cache=True, inline="always")
def _is_listed(rows: np.ndarray, lo: int, count: int, value: int) -> bool:
    """Whether `value` is in the ascending rows[lo:lo + count]: a branchless bisection (no mispredicted jumps)."""
    base, n = lo, count
    while n > 1:
        half = n >> 1
        base = base + half if rows[base + half] < value else base
        n -= half
    base += rows[base] < value  # the first entry >= value, or the end of the list
    return base < lo + count and rows[base] == value


@njit(nogil=True, cache=True)
def fill_episodes(words: np.ndarray, first: int, functions: np.ndarray, n_pos: np.ndarray, offsets: np.ndarray,
                  rows: np.ndarray, mags: np.ndarray, n_rows: int, keyed: int, labels: np.ndarray,
                  out_rows: np.ndarray, out_labels: np.ndarray, out_mags: np.ndarray, picked: np.ndarray,
                  seen: np.ndarray, token_rows: np.ndarray, token_mags: np.ndarray, slots: np.ndarray,
                  sink: np.ndarray) -> tuple[int, int]:
    """Episodes first.. of `functions` into out_* (B, sl); returns (the first episode not drawn, its first word).

    offsets/rows/mags: CSR positive lists (rows ascending). Lists of at most `keyed` rows are partially shuffled
    and marked in `seen`; longer ones draw positions with rejection of repeats, and negatives are checked by a
    bisection of the list, or in `labels` ((N, F) bool) when it is not empty. Scratch: picked (>= max(keyed, sl)),
    seen (n_rows, all zero on entry and on return), token_rows, token_mags and slots (sl each), sink (1,).
    """
    sl = out_rows.shape[1]
    dense = labels.shape[0] > 0
    touched = 0
    at = 0
    for b in range(first, len(functions)):
        if b + 2 < len(functions):  # touch the list two episodes ahead: its cache lines load while this one runs
            ahead, ahead_end = offsets[functions[b + 2]], offsets[functions[b + 2] + 1]
            if ahead_end - ahead <= keyed:
                for q in range(ahead, ahead_end, 8):
                    touched += rows[q] + (mags[q] != 0)
        start = at
        j = functions[b]
        lo, count, k = offsets[j], offsets[j + 1] - offsets[j], n_pos[b]
        short = count <= keyed
        n_picked = 0
        if short:  # partial Fisher-Yates over the list positions; the whole list marked as taken
            for q in range(count):
                picked[q] = lo + q
                seen[rows[lo + q]] = 1
            while n_picked < k and start + k <= len(words):  # no draw yet in this episode: at == start
                r, at = _below(words, at, count - n_picked, sl)
                if r < 0:
                    break
                r += n_picked
                picked[n_picked], picked[r] = picked[r], picked[n_picked]
                n_picked += 1
        else:  # positions with rejection of repeats (distinct positions are distinct rows)
            while n_picked < k and at < len(words):
                r, at = _below(words, at, count, sl)
                if r < 0:
                    break
                if seen[rows[lo + r]]:
                    continue
                seen[rows[lo + r]] = 1
                picked[n_picked] = lo + r
                n_picked += 1
        for q in range(n_picked):
            token_rows[q], token_mags[q] = rows[picked[q]], mags[picked[q]]
        i = k
        while i < sl and n_picked == k and at < len(words):
            c, at = _below(words, at, n_rows, sl)
            if c < 0:
                break
            if seen[c] or (not short and (labels[c, j] if dense else _is_listed(rows, lo, count, c))):
                continue
            seen[c] = 1
            token_rows[i], token_mags[i] = c, 0.0
            i += 1
        for q in range(k, i):
            seen[token_rows[q]] = 0
        if short:
            for q in range(count):
                seen[rows[lo + q]] = 0
        else:
            for q in range(n_picked):
                seen[token_rows[q]] = 0
        if n_picked < k or i < sl or at + sl > len(words):
            sink[0] = touched
            return b, start  # the words ran out: this episode is redone from its first word once more are appended
        for s in range(sl):  # inside-out Fisher-Yates: slot s gets token slots[s]
            r, at = _below(words, at, s + 1, sl)
            if r < 0:
                sink[0] = touched
                return b, start
            slots[s] = slots[r]
            slots[r] = s
        for s in range(sl):
            t = slots[s]
            out_rows[b, s], out_labels[b, s], out_mags[b, s] = token_rows[t], np.float32(t < k), token_mags[t]
    sink[0] = touched
    return len(functions), at
