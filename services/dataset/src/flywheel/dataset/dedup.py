"""Exact and near-duplicate detection for training rows.

Exact duplicates are found by hashing normalized text (:func:`exact_key`); near duplicates by
MinHash signatures over character n-grams (:class:`MinHasher`) looked up through LSH banding
(:class:`NearDuplicateIndex`). Everything here is deterministic: the same inputs in the same
order give the same keys, signatures and answers in every process (nothing depends on Python's
per-process hash seed or on numpy's random streams).
"""

from __future__ import annotations

import hashlib
import unicodedata
from functools import lru_cache

import numpy as np
from numpy.typing import NDArray

Signature = NDArray[np.uint64]

# The Mersenne prime 2**61 - 1: 2**61 = 1 (mod P), so reducing mod P takes shifts and masks,
# which numpy does exactly on uint64 (division would be slow, Python ints slower still).
_P_INT = (1 << 61) - 1
_P = np.uint64(_P_INT)
_M30 = np.uint64((1 << 30) - 1)
_M31 = np.uint64((1 << 31) - 1)
_M21 = np.uint64((1 << 21) - 1)
_S21 = np.uint64(21)
_S30 = np.uint64(30)
_S31 = np.uint64(31)
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


def normalize(text: str) -> str:
    """Return ``text`` in the form duplicates are compared in.

    Unicode NFKC (full-width letters, ligatures and compatibility forms become their plain
    equivalents), casefold, every whitespace run collapsed to one space, ends stripped. Rows
    that differ only in case, spacing or Unicode presentation carry the same training signal,
    so they must count as duplicates.
    """
    # str.split() with no argument splits on every Unicode whitespace run and drops the ends.
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def exact_key(*parts: str) -> str:
    """Hex SHA-256 of the normalized ``parts``, joined by U+001F (unit separator).

    The separator keeps ``("ab", "c")`` and ``("a", "bc")`` apart; it can never occur inside a
    normalized part, because Python counts it as whitespace and :func:`normalize` turns it
    into a space.
    """
    joined = "\x1f".join(normalize(part) for part in parts)
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

    Not thread-safe: an instance reuses scratch buffers between calls; use one per thread.
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
        band_keys = self._band_keys(signature)
        candidates: set[int] = set()
        for bucket, band_key in zip(self._buckets, band_keys, strict=True):
            rows = bucket.get(band_key)
            if isinstance(rows, int):
                candidates.add(rows)
            elif rows is not None:
                candidates.update(rows)
        if candidates:
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

    def _append(self, key: str, signature: Signature, band_keys: list[int]) -> None:
        index = len(self._keys)
        if index == self._signatures.shape[0]:
            grown = np.empty((2 * index, self.hasher.num_perm), np.uint64)
            grown[:index] = self._signatures
            self._signatures = grown
        self._signatures[index] = signature
        self._keys.append(key)
        for bucket, band_key in zip(self._buckets, band_keys, strict=True):
            rows = bucket.get(band_key)
            if rows is None:
                bucket[band_key] = index
            elif isinstance(rows, int):
                bucket[band_key] = [rows, index]
            else:
                rows.append(index)
