"""Exact and near-duplicate detection for training rows.

Exact duplicates are found by hashing normalized text (:func:`exact_key`); near duplicates by
MinHash signatures over character n-grams (:class:`MinHasher`) looked up through LSH banding
(:class:`NearDuplicateIndex`); :meth:`MinHasher.signatures` and
:meth:`NearDuplicateIndex.find_or_add_many` do the same for many texts at once, with identical
results (about twice as fast on two cores; the per-text numpy overhead is gone, and what is left
is the exact minimum over every shingle and permutation, ~0.7 ns per pair at best in numpy).

Everything here is deterministic: the same inputs in the same order give the same keys,
signatures and answers in every process (nothing depends on Python's per-process hash seed or
on numpy's random streams).
"""

from __future__ import annotations

import hashlib
import os
import unicodedata
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache
from queue import SimpleQueue

import numpy as np
from numpy.typing import NDArray

Signature = NDArray[np.uint64]
Signatures = NDArray[np.uint64]  # one signature per row

# The Mersenne prime 2**61 - 1: 2**61 = 1 (mod P), so reducing mod P takes shifts and masks,
# which numpy does exactly on uint64 (division would be slow, Python ints slower still).
_P_INT = (1 << 61) - 1
_P = np.uint64(_P_INT)
_M30 = np.uint64((1 << 30) - 1)
_M31 = np.uint64((1 << 31) - 1)
_M21 = np.uint64((1 << 21) - 1)
_S21 = np.uint64(21)
_S29 = np.uint64(29)
_S30 = np.uint64(30)
_S31 = np.uint64(31)
_S32 = np.uint64(32)
_S33 = np.uint64(33)
_S42 = np.uint64(42)
_S61 = np.uint64(61)
# Above every value (a*x + b) mod P can take, so it marks "no shingles" without colliding.
_EMPTY = np.uint64(np.iinfo(np.uint64).max)

# Shingle hash constants: a 64-bit polynomial over code points, then MurmurHash3's fmix64
# finalizer (a bijection) to spread it. Fixed forever: signatures must not change between runs.
_POLY_START = np.uint64(0x243F6A8885A308D3)
_POLY_BASE = np.uint64(0x9E3779B97F4A7C15)
_FMIX_1 = np.uint64(0xFF51AFD7ED558CCD)
_FMIX_2 = np.uint64(0xC4CEB9FE1A85EC53)

# Shingles per block of the (permutations x shingles) grid, times num_perm: big enough that
# numpy's per-call overhead is small, small enough to bound scratch memory for long texts.
_BLOCK_ELEMENTS = 1 << 16

# Tolerance of the float64 pre-selection in MinHasher._min_over, as a fraction of P. The float
# estimate of (a*x + b) / P is off by less than 2**-28 (see there); this is 4x that.
_MARGIN = 2.0**-26

# The batched path (MinHasher.signatures). A text's shingle hashes are deduplicated in value
# ranges of about _BUCKET, sorted as rows of _PIECE (numpy sorts rows of up to 256 uint64 several
# times faster than longer ones), then cut into pieces of at most _WIDE. Pieces of about equal
# length share a padded (pieces x length) layout, in matrix products of at most _GEMM_COLS
# columns (below OpenBLAS's threading threshold), reduced _PASS_COLS columns at a time (the grid
# stays in cache), set up _SUPER_COLS at a time (fewer numpy calls).
_BUCKET = 192
_PIECE = 256
_WIDE = 512
_GEMM_COLS = 1024
_PASS_COLS = 2048
_SUPER_COLS = 8192
# Chunks (units of work) end at this many characters or texts: small enough that their
# temporary arrays come from malloc's heap (larger ones are mapped afresh, and page faults then
# cost more than the work), large enough that numpy's per-call costs are spread thin.
_CHUNK_CHARS = 1 << 16
_CHUNK_TEXTS = 4096
_MAX_WORKERS = 8
# The float64 estimate is computed as 2**23 + F, which fixes its exponent: the low _Q_BITS bits of
# the mantissa are then F's fractional part in fixed point, read with one bitwise and.
_Q_BITS = 29
_Q_MASK = np.uint64((1 << _Q_BITS) - 1)
_MAGIC_EXP = 23
# Tolerance of that estimate, as a fraction of P: its error is below 2**-27 (see _block_minima).
_BATCH_MARGIN_Q = 1 << (_Q_BITS - 24)  # 2**-24, in units of 2**-Q_BITS
_SENTINEL = np.uint64(np.iinfo(np.uint64).max)  # a padding slot; shingle hashes are below P


def normalize(text: str) -> str:
    """Return ``text`` in the form duplicates are compared in.

    Unicode NFKC (full-width letters, ligatures and compatibility forms become their plain
    equivalents), casefold, every whitespace run collapsed to one space, ends stripped. Rows
    that differ only in case, spacing or Unicode presentation carry the same training signal,
    so they must count as duplicates.
    """
    # str.split() with no argument splits on every Unicode whitespace run and drops the ends.
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


class NormalizedText(str):
    """A text already in :func:`normalize`'s form, which the batched MinHash paths hash as
    it is (a caller that normalized its parts need not have the whole text normalized again;
    normalizing twice need not even give the same text)."""

    __slots__ = ()


def exact_key(*parts: str) -> str:
    """Hex SHA-256 of the normalized ``parts``, joined by U+001F (unit separator).

    The separator keeps ``("ab", "c")`` and ``("a", "bc")`` apart; it can never occur inside a
    normalized part, because Python counts it as whitespace and :func:`normalize` turns it
    into a space.
    """
    return normalized_key(*(normalize(part) for part in parts))


def normalized_key(*normalized: str) -> str:
    """:func:`exact_key` of parts already normalized (a caller may normalize each distinct
    text once)."""
    joined = "\x1f".join(normalized)
    return hashlib.sha256(joined.encode("utf-8", "surrogatepass")).hexdigest()


def jaccard(sig_a: Signature, sig_b: Signature) -> float:
    """Estimated Jaccard similarity of two MinHash signatures: the fraction of equal positions."""
    if sig_a.ndim != 1 or sig_a.shape != sig_b.shape or sig_a.size == 0:
        raise ValueError(f"signatures must be non-empty and alike: {sig_a.shape} vs {sig_b.shape}")
    return int(np.count_nonzero(sig_a == sig_b)) / sig_a.size


def _seeded_ints(seed: int, label: str, count: int, modulus: int) -> list[int]:
    """``count`` integers in ``[0, modulus)`` derived from ``seed`` with BLAKE2b.

    Derived by hand rather than drawn from numpy's generators, whose streams numpy does not
    promise to keep across releases.
    """
    return [
        int.from_bytes(
            hashlib.blake2b(f"flywheel.dedup:{seed}:{label}:{i}".encode(), digest_size=8).digest(),
            "little",
        )
        % modulus
        for i in range(count)
    ]


def _over_p(value: int) -> float:
    """``(value mod P) / P``, correctly rounded (Python's int / int is)."""
    return (value % _P_INT) / _P_INT


def _fmix64(h: NDArray[np.uint64]) -> None:
    """MurmurHash3's 64-bit finalizer, in place (uint64 multiplication wraps, as it should)."""
    h ^= h >> _S33
    h *= _FMIX_1
    h ^= h >> _S33
    h *= _FMIX_2
    h ^= h >> _S33


def _affine_mod(a: NDArray[np.uint64], x: NDArray[np.uint64], b: NDArray[np.uint64]) -> Signature:
    """Exact ``(a * x + b) mod P`` elementwise (with broadcasting), for uint64 values below P.

    ``a * x`` needs 122 bits, so both factors are split into 31-bit limbs, whose products fit
    in uint64, and the high parts are folded back using ``2**61 = 1 (mod P)``.
    """
    a_lo, a_hi = a & _M31, a >> _S31
    x_lo, x_hi = x & _M31, x >> _S31
    # a*x = a_hi*x_hi*2**62 + (a_hi*x_lo + a_lo*x_hi)*2**31 + a_lo*x_lo
    mid = a_hi * x_lo + a_lo * x_hi  # < 2**62
    total = a_lo * x_lo  # < 2**62
    total += (a_hi * x_hi) << np.uint64(1)  # 2**62 = 2 (mod P); < 2**61
    # mid * 2**31 = (mid >> 30) * 2**61 + (mid & M30) * 2**31, and 2**61 = 1 (mod P)
    total += mid >> _S30  # < 2**32
    total += (mid & _M30) << _S31  # < 2**61
    total = total + b  # < 2**63 + 2**61 + 2**32: no uint64 overflow anywhere
    total = (total & _P) + (total >> _S61)  # the same residue, now below P + 6
    # One conditional subtraction of P, branch-free: when total < P, total - P wraps around
    # to something larger than total, and the minimum keeps total.
    return np.minimum(total, total - _P)


class MinHasher:
    """MinHash signatures over the set of character n-grams of normalized text.

    Each shingle gets a stable 64-bit hash, reduced mod ``P = 2**61 - 1``; permutation ``i``
    maps it to ``(a[i] * x + b[i]) mod P``, and the signature keeps each permutation's minimum
    over the shingles, computed exactly (:func:`_affine_mod`).

    Shingles are hashed in numpy (a polynomial over code points, then a 64-bit mixer) rather than
    with ``hashlib``: one BLAKE2b call per shingle costs about 0.3 ms for a 500-character text in
    CPython, as much as everything else together.

    :meth:`signatures` does the same for many texts at once, much faster (see there).

    :meth:`signature` is not thread-safe (it reuses scratch buffers between calls; use one
    instance per thread); :meth:`signatures` keeps its scratch per call and worker.
    """

    def __init__(self, num_perm: int = 128, ngram: int = 5, seed: int = 1) -> None:
        if num_perm < 1:
            raise ValueError(f"num_perm must be at least 1, got {num_perm}")
        if ngram < 1:
            raise ValueError(f"ngram must be at least 1, got {ngram}")
        self.num_perm = num_perm
        self.ngram = ngram
        self.seed = seed
        a = [1 + v for v in _seeded_ints(seed, "a", num_perm, _P_INT - 1)]
        b = _seeded_ints(seed, "b", num_perm, _P_INT)
        self._a = np.array(a, np.uint64)
        self._b = np.array(b, np.uint64)
        # Row i of weights @ [x2; x1; x0; 1], where x = x2*2**42 + x1*2**21 + x0, estimates
        # (a_i*x + b_i) / P + 2*margin up to an integer: the weights are a_i * 2**42, a_i * 2**21
        # and a_i, each mod P, over P.
        self._weights = np.array(
            [
                [_over_p(ai << 42), _over_p(ai << 21), _over_p(ai), _over_p(bi) + 2 * _MARGIN]
                for ai, bi in zip(a, b, strict=True)
            ],
            np.float64,
        )
        # The batched path's weights (see _block_minima): the same three limb weights, then
        # 2**23 + b/P + 2*margin rounded to the 2**-29 grid (a real slot's constant), then the
        # value whose fractional bits are all ones (a padding slot's constant).
        q = 1 << _Q_BITS
        self._batch_weights = np.array(
            [
                [
                    _over_p(ai << 42),
                    _over_p(ai << 21),
                    _over_p(ai),
                    (1 << _MAGIC_EXP)
                    + ((bi * q + _P_INT // 2) // _P_INT + 2 * _BATCH_MARGIN_Q) / q,
                    (1 << _MAGIC_EXP) + (q - 1) / q,
                ]
                for ai, bi in zip(a, b, strict=True)
            ],
            np.float64,
        )
        self._block = max(16, _BLOCK_ELEMENTS // num_perm)
        self._grid = np.empty(num_perm * self._block, np.float64)
        self._floor = np.empty(num_perm * self._block, np.float64)
        self._perms = np.arange(num_perm)
        self._empty = np.full(num_perm, _EMPTY, np.uint64)

    def shingle_hashes(self, text: str) -> NDArray[np.uint64]:
        """The sorted, distinct hashes (each below ``2**61 - 1``) of ``text``'s shingles.

        Shingles are the character n-grams of ``normalize(text)``; a text shorter than
        ``ngram`` is one shingle; an empty text has none.
        """
        norm = normalize(text)
        if not norm:
            return np.empty(0, np.uint64)
        # surrogatepass: a lone surrogate (e.g. from a badly decoded file) must not crash dedup.
        codes = np.frombuffer(norm.encode("utf-32-le", "surrogatepass"), "<u4").astype(np.uint64)
        width = min(self.ngram, codes.size)
        count = codes.size - width + 1
        h = np.full(count, _POLY_START, np.uint64)
        for offset in range(width):
            h *= _POLY_BASE
            h += codes[offset : offset + count]
        _fmix64(h)
        h %= _P
        # Sort and drop repeats by hand: np.unique costs several times more on short arrays.
        h.sort()
        distinct = np.empty(count, np.bool_)
        distinct[0] = True
        np.not_equal(h[1:], h[:-1], out=distinct[1:])
        return h[distinct]

    def signature(self, text: str) -> Signature:
        """The MinHash signature of ``text``: ``num_perm`` uint64 values.

        An empty (or all-whitespace) text gets a fixed signature of all-max values, so empty
        texts match each other and nothing else.
        """
        hashes = self.shingle_hashes(text)
        if hashes.size == 0:
            return self._empty.copy()
        return self._min_over(hashes)

    def _min_over(self, x: NDArray[np.uint64]) -> Signature:
        """Per permutation, the exact minimum of ``(a * x + b) mod P`` over distinct ``x`` < P.

        Computing every value exactly takes ~20 uint64 passes over the (permutations x
        shingles) grid. Instead one float64 matrix product estimates every value as a fraction
        of P, which picks each permutation's minimising shingle; only that one is computed
        exactly, unless the estimate cannot be trusted to have picked right, and then the whole
        column is. The result is exact either way; the estimate only decides where to look.

        Why a trusted pick is right. Let u = ((a*x + b) mod P) / P + 2m, m the margin, so
        2m <= u < 1 + 2m. With 21-bit limbs the product F equals an integer plus u, give or
        take less than 2**-28 < m, and F < 2**23: each correctly rounded weight (< 1) is off by
        at most 2**-54, times a limb < 2**21; each of three products (< 2**21) rounds by at
        most 2**-33, each of three sums (< 2**23) by at most 2**-30. So the fractional part G
        of F is u give or take m, except where the error carries F past the next integer,
        which needs u > 1 - m and leaves G < 3m. Hence when G >= 3m throughout a column, G
        ranks its values correctly wherever two differ by more than 2m, and its smallest entry
        is the minimum if the runner-up exceeds it by more than 2m. The other columns (for a
        500-character text, one in about 20,000) are computed exactly in full.
        """
        result = self._empty.copy()
        perms = self._perms
        for start in range(0, x.size, self._block):
            chunk = x[start : start + self._block]
            n = chunk.size
            limbs = np.empty((4, n), np.float64)
            limbs[0] = chunk >> _S42
            limbs[1] = (chunk >> _S21) & _M21
            limbs[2] = chunk & _M21
            limbs[3] = 1.0
            grid = self._grid[: self.num_perm * n].reshape(self.num_perm, n)
            floor = self._floor[: self.num_perm * n].reshape(self.num_perm, n)
            np.matmul(self._weights, limbs, out=grid)
            np.floor(grid, out=floor)
            grid -= floor
            best = grid.argmin(axis=1)
            first = grid[perms, best]
            grid[perms, best] = 2.0  # above every fraction, to find the runner-up
            second = grid.min(axis=1)
            block_min = _affine_mod(self._a, chunk[best], self._b)
            unsure = np.flatnonzero((first < 3 * _MARGIN) | (second - first <= 2 * _MARGIN))
            if unsure.size:
                exact = _affine_mod(self._a[unsure, None], chunk[None, :], self._b[unsure, None])
                block_min[unsure] = exact.min(axis=1)
            np.minimum(result, block_min, out=result)
        return result

    def signatures(self, texts: Sequence[str], *, workers: int | None = None) -> Signatures:
        """The signatures of ``texts``, one row each: row ``i`` equals ``signature(texts[i])``.

        Faster than calling :meth:`signature` in a loop: texts are processed in chunks,
        each in a few large numpy operations (see :meth:`_chunk_signatures`), on up to
        ``workers`` threads (default: the usable CPUs, at most 8; numpy and BLAS release the GIL
        for the heavy parts). Memory beyond the result stays bounded (tens of MiB per worker).
        """
        result = np.empty((len(texts), self.num_perm), np.uint64)
        for start, stop, block in self._signature_chunks(texts, workers):
            result[start:stop] = block
        return result

    def _signature_chunks(
        self, texts: Sequence[str], workers: int | None
    ) -> Iterator[tuple[int, int, Signatures]]:
        """``(start, stop, signatures of texts[start:stop])`` for consecutive chunks, in order.

        With several workers, a few chunks ahead are computed while the caller consumes one.
        """
        bounds = _chunk_bounds(texts)
        workers = _worker_count(workers, len(bounds))
        if workers == 1:
            scratch = _Scratch(self.num_perm)
            for start, stop in bounds:
                yield start, stop, self._chunk_signatures(texts[start:stop], scratch)
            return
        spare: SimpleQueue[_Scratch] = SimpleQueue()
        for _ in range(workers):
            spare.put(_Scratch(self.num_perm))

        def work(chunk: Sequence[str]) -> Signatures:
            scratch = spare.get()
            try:
                return self._chunk_signatures(chunk, scratch)
            finally:
                spare.put(scratch)

        pool = ThreadPoolExecutor(workers, thread_name_prefix="minhash")
        pending: deque[tuple[int, int, Future[Signatures]]] = deque()
        upcoming = iter(bounds)

        def submit() -> None:
            for start, stop in upcoming:
                pending.append((start, stop, pool.submit(work, texts[start:stop])))
                return

        try:
            for _ in range(2 * workers):
                submit()
            while pending:
                start, stop, job = pending.popleft()
                block = job.result()
                submit()
                yield start, stop, block
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _chunk_signatures(self, texts: Sequence[str], scratch: _Scratch) -> Signatures:
        """:meth:`signatures` for one chunk, on the calling thread.

        Every text's shingle hashes are computed together over the concatenated texts, then
        deduplicated per text and cut into pieces of at most _WIDE; per piece and permutation
        the minimum is found by :meth:`_piece_minima`, and a text's signature is the elementwise
        minimum over its pieces (the minimum over a union is the minimum of the minima).
        """
        result = np.empty((len(texts), self.num_perm), np.uint64)
        hashes, counts = self._chunk_shingle_hashes(texts)
        rows, lengths, per_text = _pieces(*_distinct_hashes(hashes, counts))
        has = counts > 0
        result[~has] = _EMPTY
        if rows.shape[0]:
            minima = self._piece_minima(rows, lengths, scratch)
            first = np.cumsum(per_text) - per_text
            result[has] = np.minimum.reduceat(minima, first[has], axis=0)
        return result

    def _chunk_shingle_hashes(
        self, texts: Sequence[str]
    ) -> tuple[NDArray[np.uint64], NDArray[np.int64]]:
        """Every text's shingle hashes (those of :meth:`shingle_hashes`, but in text order and
        with repeats), concatenated, and how many each text has."""
        ngram = self.ngram
        norms = [text if type(text) is NormalizedText else normalize(text) for text in texts]
        lengths = np.fromiter(map(len, norms), np.int64, len(norms))
        counts = np.where(lengths >= ngram, lengths - ngram + 1, np.minimum(lengths, 1))
        total = int(lengths.sum())
        if total == 0:
            return np.empty(0, np.uint64), counts
        # len() counts code points, as utf-32 encodes them (a lone surrogate is one of each).
        codes = np.zeros(total + ngram, np.uint64)
        codes[:total] = np.frombuffer("".join(norms).encode("utf-32-le", "surrogatepass"), "<u4")
        starts = np.cumsum(lengths) - lengths
        # After step w, h[p] hashes the w+1 code points from p on, for every position p. A text
        # shorter than ngram is one shingle of its own length, taken at the step that reaches it.
        short = np.flatnonzero((lengths > 0) & (lengths < ngram))
        short_hashes = np.empty(short.size, np.uint64)
        h = np.full(total, _POLY_START, np.uint64)
        for offset in range(ngram):
            h *= _POLY_BASE
            h += codes[offset : offset + total]
            done = lengths[short] == offset + 1
            if done.any():
                short_hashes[done] = h[starts[short[done]]]
        # Keep the positions whose shingle lies inside its text: all but a text's last
        # ngram - 1, and for a short text its first only.
        keep = np.ones(total, np.bool_)
        tails = np.maximum(starts + lengths - ngram + 1, starts + 1)
        tail_pos = tails[:, None] + np.arange(ngram - 1)
        keep[tail_pos[tail_pos < (starts + lengths)[:, None]]] = False
        hashes = h[keep]
        hashes[(np.cumsum(counts) - counts)[short]] = short_hashes
        _fmix64(hashes)
        # hashes mod P, as 2**61 = 1 (mod P): fold the top 3 bits in, subtract P once if needed.
        folded = (hashes & _P) + (hashes >> _S61)
        return np.minimum(folded, folded - _P), counts

    def _piece_minima(
        self, rows: NDArray[np.uint64], lengths: NDArray[np.int64], scratch: _Scratch
    ) -> Signatures:
        """Per piece (a row of distinct hashes, padded with the sentinel after ``lengths[i]``
        entries) and permutation, the exact minimum of ``(a * x + b) mod P``.

        Pieces are taken longest first, so each group padded to the length of its first piece
        wastes little; :meth:`_block_minima` picks each minimising shingle, which is then
        computed exactly, or, where the pick cannot be trusted, the whole piece is.
        """
        count = rows.shape[0]
        chosen = np.empty((count, self.num_perm), np.uint64)
        unsure_pieces: list[NDArray[np.intp]] = []
        unsure_perms: list[NDArray[np.intp]] = []
        order = np.argsort(-lengths, kind="stable")
        at = 0
        while at < count:
            width = int(lengths[order[at]])
            per_product = max(1, _GEMM_COLS // width)
            per_pass = per_product * max(1, _PASS_COLS // (per_product * width))
            group = per_pass * max(1, _SUPER_COLS // (per_pass * width))
            taken = order[at : at + group]
            at += taken.size
            picked, unsure = self._block_minima(rows[taken, :width], per_product, per_pass, scratch)
            chosen[taken] = picked.T
            perms, slots = np.nonzero(unsure)
            unsure_pieces.append(taken[slots])
            unsure_perms.append(perms)
        minima = _affine_mod(self._a[None, :], chosen, self._b[None, :])
        pieces = np.concatenate(unsure_pieces)
        perms = np.concatenate(unsure_perms)
        for piece in np.unique(pieces).tolist():
            which = perms[pieces == piece]
            x = rows[piece, : lengths[piece]]
            exact = _affine_mod(self._a[which, None], x[None, :], self._b[which, None])
            minima[piece, which] = exact.min(axis=1)
        return minima

    def _block_minima(
        self, x: NDArray[np.uint64], per_product: int, per_pass: int, scratch: _Scratch
    ) -> tuple[Signatures, NDArray[np.bool_]]:
        """For pieces ``x`` (pieces x width, padded with the sentinel), per permutation and
        piece: the shingle whose ``(a * x + b) mod P`` is smallest according to a float64
        estimate, and whether that pick is uncertain (then the piece needs an exact look).

        As in :meth:`_min_over`, one matrix product of weights with 21-bit limbs estimates
        F = integer + u, u = ((a*x + b) mod P) / P + 2m (m = 2**-24 here), but the constant
        column adds 2**23 (F < 2**23, so 2**23 + F has a fixed exponent and its mantissa's low 29
        bits are the fractional part G of F in fixed point, read by one bitwise and instead of a
        floor and a subtraction), and a padding slot gets only its own constant, whose G is
        all ones, the largest there is. The error bound: weights off by at most 2**-54 (times a
        limb < 2**21), the constant by 2**-30, and each product or sum, all in [0, 2**24),
        rounded by at most 2**-30: less than 2**-27 < m / 8 in all, however BLAS orders the
        sums. The argument of :meth:`_min_over` then holds unchanged: when G >= 3m for the
        smallest entry of a column and the runner-up exceeds it by more than 2m, the smallest
        entry is the exact minimiser. (The runner-up is the minimum after the smallest entry
        is overwritten with the sentinel.)
        """
        pieces, width = x.shape
        num_perm = self.num_perm
        passes = -(-pieces // per_pass)
        slots = passes * per_pass
        if slots > pieces:
            x = np.concatenate([x, np.full((slots - pieces, width), _SENTINEL, np.uint64)])
        valid = (x != _SENTINEL).reshape(-1)
        flat = np.where(valid, x.reshape(-1), np.uint64(0))
        limbs = scratch.limbs[: 5 * flat.size].reshape(5, flat.size)
        limbs[0] = flat >> _S42
        limbs[1] = (flat >> _S21) & _M21
        limbs[2] = flat & _M21
        limbs[3] = valid
        limbs[4] = ~valid
        # A pass covers per_pass pieces, each product per_product of them (its columns are
        # permutation-major); the grid of a pass stays in cache through the reductions.
        cols = per_product * width
        products = per_pass // per_product
        grid = scratch.grid[: num_perm * per_pass * width].reshape(products, num_perm, cols)
        q = grid.view(np.uint64).reshape(-1)
        by_row = q.reshape(-1, width)  # one row per (product, permutation, piece)
        base = np.arange(by_row.shape[0]) * width
        best = np.empty((passes, by_row.shape[0]), np.intp)
        first = np.empty((passes, by_row.shape[0]), np.uint64)
        second = np.empty((passes, by_row.shape[0]), np.uint64)
        for i in range(passes):
            for j in range(products):
                at = (i * products + j) * cols
                np.matmul(self._batch_weights, limbs[:, at : at + cols], out=grid[j])
            np.bitwise_and(q, _Q_MASK, out=q)
            where = np.add(base, by_row.argmin(axis=1), out=best[i])
            first[i] = q[where]
            q[where] = _SENTINEL
            second[i] = q[base + by_row.argmin(axis=1)]
        unsure = (first < 3 * _BATCH_MARGIN_Q) | (second - first <= 2 * _BATCH_MARGIN_Q)
        # (pass, product, permutation, piece) -> (permutation, piece index in x)
        shape = (passes, products, num_perm, per_product)
        best = best.reshape(shape).transpose(2, 0, 1, 3).reshape(num_perm, slots) % width
        unsure = unsure.reshape(shape).transpose(2, 0, 1, 3).reshape(num_perm, slots)
        picked = x.reshape(-1)[np.arange(slots) * width + best]
        return picked[:, :pieces], unsure[:, :pieces]


class _Scratch:
    """A worker's reusable buffers for :meth:`MinHasher._block_minima` (fresh ones per chunk
    would cost page faults)."""

    def __init__(self, num_perm: int) -> None:
        self.grid = np.empty(num_perm * (_PASS_COLS + _GEMM_COLS), np.float64)
        self.limbs = np.empty(5 * (_SUPER_COLS + _PASS_COLS + _GEMM_COLS), np.float64)


def _chunk_bounds(texts: Sequence[str]) -> list[tuple[int, int]]:
    """Consecutive ``(start, stop)`` ranges of ``texts``: _CHUNK_CHARS characters or
    _CHUNK_TEXTS texts, whichever comes first (a longer text is a chunk of its own)."""
    bounds: list[tuple[int, int]] = []
    start = chars = 0
    for i, text in enumerate(texts):
        chars += len(text)
        if chars >= _CHUNK_CHARS or i + 1 - start >= _CHUNK_TEXTS:
            bounds.append((start, i + 1))
            start, chars = i + 1, 0
    if start < len(texts):
        bounds.append((start, len(texts)))
    return bounds


def _worker_count(workers: int | None, chunks: int) -> int:
    if workers is None:
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        workers = min(usable or os.cpu_count() or 1, _MAX_WORKERS)
    elif workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    return max(1, min(workers, chunks))


def _distinct_hashes(
    hashes: NDArray[np.uint64], counts: NDArray[np.int64]
) -> tuple[NDArray[np.uint64], NDArray[np.int64]]:
    """Each text's distinct hashes (of ``counts[i]`` hashes each, concatenated), concatenated
    (in no particular order within a text), and how many each text has.

    A text's hashes are split by value into ceil(count / _BUCKET) ranges, so repeats meet in
    one range, sorted as a row of at most _PIECE: numpy sorts rows of up to 256 uint64 several
    times faster than longer ones. (A text with a range of more than _PIECE hashes, which takes
    many repeats or rare luck, is deduplicated on its own instead.)
    """
    buckets = -(-counts // _BUCKET)
    first_row = np.cumsum(buckets) - buckets
    count = int(buckets.sum())
    if count == 0:
        return hashes, counts
    # Range of a hash: its top 32 bits (of 61) scaled to [0, buckets). A stable sort by row
    # groups the rows: a radix sort on 16-bit keys (chunks have fewer than 2**16 rows).
    text = np.repeat(np.arange(counts.size), counts)
    scaled = (hashes >> _S29) * buckets[text].astype(np.uint64)
    row = first_row[text] + (scaled >> _S32).astype(np.int64)
    order = np.argsort(row.astype(np.uint16) if count <= 1 << 16 else row, kind="stable")
    sizes = np.bincount(row, minlength=count)
    starts = np.cumsum(sizes) - sizes
    # Element order[k] goes to slot k - starts[row] of its row; a range over _PIECE is redone.
    target = np.arange(order.size) + (np.arange(count) * _PIECE - starts).repeat(sizes)
    rows = np.full((count, _PIECE), _SENTINEL, np.uint64)
    overfull = np.flatnonzero(sizes > _PIECE)
    if overfull.size:
        fits = target < (np.arange(count) * _PIECE + _PIECE).repeat(sizes)
        rows.reshape(-1)[target[fits]] = hashes[order[fits]]
    else:
        rows.reshape(-1)[target] = hashes[order]
    rows.sort(axis=1)
    repeat = rows[:, 1:] == rows[:, :-1]
    rows[:, 1:][repeat] = _SENTINEL  # the sentinel is no hash, so repeats of it do no harm
    keep = rows != _SENTINEL
    distinct = np.add.reduceat(np.count_nonzero(keep, axis=1), first_row[counts > 0])
    result = np.zeros(counts.size, np.int64)
    result[counts > 0] = distinct
    out = rows[keep]
    if overfull.size == 0:
        return out, result
    # Redo the texts with an overfull range alone, then splice them back in text order.
    owners = np.unique(np.searchsorted(first_row, overfull, side="right") - 1)
    redone = {
        int(t): np.unique(hashes[int(at) : int(at) + int(counts[t])])
        for t, at in zip(owners, (np.cumsum(counts) - counts)[owners], strict=True)
    }
    ends = np.cumsum(result)
    parts: list[NDArray[np.uint64]] = []
    at = 0
    for t in owners.tolist():
        parts += [out[at : ends[t] - result[t]], redone[t]]
        at = int(ends[t])
    parts.append(out[at:])
    for t, values_of_text in redone.items():
        result[t] = values_of_text.size
    return np.concatenate(parts), result


def _pieces(
    values: NDArray[np.uint64], counts: NDArray[np.int64]
) -> tuple[NDArray[np.uint64], NDArray[np.int64], NDArray[np.int64]]:
    """Cut each text's values (``counts[i]`` each, concatenated) into near-equal pieces of at
    most _WIDE, one row each, padded with the sentinel. Returns the rows, their lengths, and
    how many pieces each text has (a text's pieces are consecutive rows)."""
    per_text = -(-counts // _WIDE)
    size = -(-counts // np.maximum(per_text, 1))
    count = int(per_text.sum())
    rows = np.full((count, _WIDE), _SENTINEL, np.uint64)
    text = np.repeat(np.arange(counts.size), per_text)
    index = np.arange(count) - np.repeat(np.cumsum(per_text) - per_text, per_text)
    within = index * size[text]
    lengths = np.minimum(size[text], counts[text] - within)
    start = (np.cumsum(counts) - counts)[text] + within
    offset = np.repeat(np.arange(count) * _WIDE - start, lengths)
    rows.reshape(-1)[offset + np.arange(values.size)] = values
    return rows, lengths, per_text


@lru_cache(maxsize=64)
def _choose_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """LSH bands ``b`` and rows per band ``r`` (``b * r <= num_perm``) for ``threshold``.

    Minimises the weighted areas under the candidate probability ``1 - (1 - s**r)**b`` below
    the threshold (false positives) and above 1 minus it above the threshold (false negatives),
    the usual choice (as in datasketch) except for the weights: every candidate is verified
    against its full signature, so a false positive costs one vectorised comparison, while a
    false negative is a duplicate that slips into the dataset. Missing one weighs 9 times more.
    """
    below = np.linspace(0.0, threshold, 201)
    above = np.linspace(threshold, 1.0, 201)
    best: tuple[float, int, int] | None = None
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            false_pos = np.trapezoid(1.0 - (1.0 - below**rows) ** bands, below)
            false_neg = np.trapezoid((1.0 - above**rows) ** bands, above)
            error = float(0.1 * false_pos + 0.9 * false_neg)
            if best is None or error < best[0]:
                best = (error, bands, rows)
    assert best is not None  # num_perm >= 1 gives at least (1, 1)
    return best[1], best[2]


class NearDuplicateIndex:
    """Finds, for each text added in turn, an earlier text that is a near duplicate of it.

    Signatures are split into LSH bands; texts sharing a band are candidates, and a candidate
    counts only if the estimated Jaccard similarity of the full signatures reaches the
    threshold. Not thread-safe.
    """

    def __init__(self, threshold: float = 0.85, num_perm: int = 128, seed: int = 1) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.hasher = MinHasher(num_perm=num_perm, seed=seed)
        self.bands, self.rows = _choose_bands(threshold, num_perm)
        # Band values are combined into one int key (a wrapping dot product with odd
        # constants): far smaller in memory than the bands' bytes, and a rare collision only
        # adds a candidate, which verification then rejects.
        self._band_mix = np.array(
            [v | 1 for v in _seeded_ints(seed, "band", self.rows, 1 << 64)], np.uint64
        )
        # Per band, the rows holding each band key: an int while there is one (most keys),
        # which keeps the index at about a third of the memory of a list per key.
        self._buckets: list[dict[int, int | list[int]]] = [{} for _ in range(self.bands)]
        self._keys: list[str] = []
        self._signatures = np.empty((16, num_perm), np.uint64)

    def __len__(self) -> int:
        """How many texts have been added (near duplicates are not added)."""
        return len(self._keys)

    def find_or_add(self, key: str, text: str) -> str | None:
        """Return the key of an earlier-added near duplicate of ``text``, else add it.

        Among candidates whose estimated Jaccard similarity reaches the threshold, the most
        similar wins, the earliest added among equals. When there is none, ``text`` is added
        under ``key`` and None is returned.
        """
        signature = self.hasher.signature(text)
        return self._find_or_add(key, signature, self._band_keys(signature))

    def find_or_add_many(
        self, keys: Sequence[str], texts: Sequence[str], *, workers: int | None = None
    ) -> list[str | None]:
        """:meth:`find_or_add` for each ``(key, text)`` in order, with the same answers, fast.

        Signatures come from :meth:`MinHasher.signatures` (chunks computed on ``workers``
        threads while earlier ones are looked up), band keys a chunk at a time; texts later in
        the batch see the ones added earlier in it, exactly as with one call per text.
        """
        if len(keys) != len(texts):
            raise ValueError(f"got {len(keys)} keys for {len(texts)} texts")
        answers: list[str | None] = []
        buckets = self._buckets
        contains = dict.__contains__
        # Room for every text at once: one allocation, where doubling would briefly hold
        # the old rows and twice as many new ones.
        self._reserve(len(self._keys) + len(texts))
        for start, _, signatures in self.hasher._signature_chunks(texts, workers):
            band_keys = self._band_keys_many(signatures)
            # Rows added by the fast path below, whose signatures are copied in one go (before
            # anything reads them): they take consecutive indices from `base` on.
            pending: list[int] = []
            base = len(self._keys)
            for row, keys_of_bands in enumerate(band_keys):
                key = keys[start + row]
                if any(map(contains, buckets, keys_of_bands)):
                    if pending:
                        self._signatures[base : base + len(pending)] = signatures[pending]
                        pending = []
                    answers.append(self._find_or_add(key, signatures[row], keys_of_bands))
                    base = len(self._keys)
                else:  # a new text, alone in every bucket it lands in (as in _find_or_add)
                    index = len(self._keys)
                    self._keys.append(key)
                    pending.append(row)
                    for bucket, band_key in zip(buckets, keys_of_bands, strict=True):
                        bucket[band_key] = index
                    answers.append(None)
            if pending:
                self._signatures[base : base + len(pending)] = signatures[pending]
        return answers

    def _find_or_add(self, key: str, signature: Signature, band_keys: list[int]) -> str | None:
        buckets = self._buckets
        found = [
            rows
            for bucket, band_key in zip(buckets, band_keys, strict=True)
            if (rows := bucket.get(band_key)) is not None
        ]
        if not found:  # the usual case: a new text, alone in every bucket it lands in
            index = self._store(key, signature)
            for bucket, band_key in zip(buckets, band_keys, strict=True):
                bucket[band_key] = index
            return None
        candidates: set[int] = set()
        for rows in found:
            if isinstance(rows, int):
                candidates.add(rows)
            else:
                candidates.update(rows)
        # Sorted so that argmax's first-maximum rule picks the earliest among equals.
        indices = np.array(sorted(candidates), np.intp)
        equal = np.count_nonzero(self._signatures[indices] == signature, axis=1)
        best = int(np.argmax(equal))
        if int(equal[best]) / self.hasher.num_perm >= self.threshold:
            return self._keys[int(indices[best])]
        self._append(key, signature, band_keys)
        return None

    def _band_keys(self, signature: Signature) -> list[int]:
        """One int per band, equal for equal bands."""
        bands = signature[: self.bands * self.rows].reshape(self.bands, self.rows)
        mixed: list[int] = (bands * self._band_mix).sum(axis=1, dtype=np.uint64).tolist()
        return mixed

    def _band_keys_many(self, signatures: Signatures) -> list[list[int]]:
        """:meth:`_band_keys` of each row (uint64 arithmetic wraps alike in any order)."""
        bands = signatures[:, : self.bands * self.rows].reshape(-1, self.bands, self.rows)
        mixed: list[list[int]] = (bands * self._band_mix).sum(axis=2, dtype=np.uint64).tolist()
        return mixed

    def _append(self, key: str, signature: Signature, band_keys: list[int]) -> None:
        index = self._store(key, signature)
        for bucket, band_key in zip(self._buckets, band_keys, strict=True):
            rows = bucket.get(band_key)
            if rows is None:
                bucket[band_key] = index
            elif isinstance(rows, int):
                bucket[band_key] = [rows, index]
            else:
                rows.append(index)

    def _store(self, key: str, signature: Signature) -> int:
        """Keep ``key`` and ``signature`` as the next row; return its index."""
        index = len(self._keys)
        self._reserve(index + 1)
        self._signatures[index] = signature
        self._keys.append(key)
        return index

    def _reserve(self, rows: int) -> None:
        """Make room for ``rows`` signatures (at least doubling, so appends cost O(1) on
        average)."""
        have = self._signatures.shape[0]
        if rows > have:
            grown = np.empty((max(rows, 2 * have), self.hasher.num_perm), np.uint64)
            grown[: len(self._keys)] = self._signatures[: len(self._keys)]
            self._signatures = grown
