"""The keyed random perturbations of the paper (Sec. IV-B) and Gaussian noise.

Noise is not fresh: row i's generator is splitmix64 seeded with SipHash-2-4 of the row's
values (their raw bits) under a 128-bit key derived from the server secret, the defense
name and its parameters. The same query therefore always gets the same answer, and
averaging repeated answers gains an attacker nothing; without the secret the noise cannot
be predicted. All arithmetic is float64 (these defenses are baselines, not the hot path).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
from numba import njit, prange

from ._base import Defense, positive
from ._fastmath import siphash24, uniform01
from ._rows import guard_top1, normalise_row, row_sum
from ._validation import check_row

UNIFORM, CONCAVE, CONVEX, GAUSSIAN, RANKED = 0, 1, 2, 3, 4
BLOCK_VALUES = 1 << 13


def key_bytes(secret: bytes, name: str, params: dict[str, float], size: int = 16,
              purpose: bytes = b"") -> bytes:
    """`size` secret bytes for a defense: blake2b(name + params) keyed by the server secret.

    `purpose` separates independent keys of one defense (blake2b's personalisation);
    sizes above 64 bytes are blake2b in counter mode, so a longer key extends a shorter one.
    """
    if isinstance(secret, str):
        secret = secret.encode()
    if not isinstance(secret, (bytes, bytearray)):
        raise ValueError(f"secret must be bytes or str, got {type(secret).__name__}")
    if len(secret) > 64:  # blake2b keys are at most 64 bytes
        secret = hashlib.blake2b(secret).digest()
    message = repr((name, sorted(params.items()))).encode()
    if size <= 64:
        return hashlib.blake2b(message, key=bytes(secret), digest_size=size,
                               person=purpose).digest()
    blocks = (hashlib.blake2b(message + i.to_bytes(4, "little"), key=bytes(secret),
                              person=purpose).digest() for i in range((size + 63) // 64))
    return b"".join(blocks)[:size]


def row_key(secret: bytes, name: str, params: dict[str, float]) -> tuple[np.uint64, np.uint64]:
    """The 128-bit SipHash key of a defense (`key_bytes`, no purpose)."""
    digest = key_bytes(secret, name, params)
    return (np.uint64(int.from_bytes(digest[:8], "little")),
            np.uint64(int.from_bytes(digest[8:], "little")))


@njit(inline="always")
def _noise(kind, seed, j, v, beta, rho):
    """The perturbation r_j subtracted from value v (class j) of a row."""
    if kind == GAUSSIAN:  # Box-Muller; r = -beta * N(0, 1) so that q = v + noise
        u1 = 1.0 - uniform01(seed, 2 * j)  # in (0, 1]
        u2 = uniform01(seed, 2 * j + 1)
        return -beta * math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)
    r = beta * (2.0 * uniform01(seed, j) - 1.0)
    if kind == CONCAVE:
        r *= math.exp(-0.5 * (v / rho) ** 2)
    elif kind == CONVEX:
        r *= 1.0 - math.exp(-0.5 * (v / rho) ** 2)
    return r


@njit(inline="always")
def _rows(y, out, k, first, last, check, kind, beta, rho, k0, k1):
    for i in range(first, last):
        base = i * k
        valid, top = check_row(y, base, k)
        if check and not valid:
            return i
        seed = siphash24(k0, k1, y, base, k)
        for j in range(k):
            v = np.float64(y[base + j])
            out[base + j] = max(v - _noise(kind, seed, j, v, beta, rho), 0.0)
        if kind == RANKED:  # hand the perturbed values out in the input's class order
            order = np.argsort(-y[base:base + k], kind="mergesort")
            values = np.sort(out[base:base + k])
            for rank in range(k):
                out[base + order[rank]] = values[k - 1 - rank]
        normalise_row(out, base, k, row_sum(out, base, k), top)
        if kind == RANKED:  # equal perturbed values can tie with the top class
            guard_top1(out, base, k, top)
    return -1


@njit(cache=True, error_model="numpy")
def noise_serial(y, out, n, k, check, kind, beta, rho, k0, k1):
    """Keyed additive noise of kind `kind` for the flat (n, k) batch y, on this thread."""
    return _rows(y, out, k, 0, n, check, kind, beta, rho, k0, k1)


@njit(cache=True, error_model="numpy", parallel=True)
def noise_parallel(y, out, n, k, check, kind, beta, rho, k0, k1):
    """Keyed additive noise of kind `kind`, blocks of rows in parallel."""
    rows_per_block = max(1, BLOCK_VALUES // k)
    blocks = (n + rows_per_block - 1) // rows_per_block
    bad = np.empty(blocks, np.int64)
    for b in prange(blocks):
        first = b * rows_per_block
        bad[b] = _rows(y, out, k, first, min(n, first + rows_per_block), check,
                       kind, beta, rho, k0, k1)
    for b in range(blocks):
        if bad[b] >= 0:
            return bad[b]
    return -1


class _KeyedNoise(Defense):
    """Base of the keyed noise defenses: subclasses set `name`, `_kind` and parameters."""

    _kind = UNIFORM
    keyed = True
    _serial = staticmethod(noise_serial)
    _parallel = staticmethod(noise_parallel)

    def __init__(self, secret: bytes = b"") -> None:
        self._key = row_key(secret, self.name, self.params)
        super().__init__()

    def _kernel_args(self, dtype) -> tuple:
        beta, rho = self._amplitude_and_width()
        return (self._kind, beta, rho, self._key[0], self._key[1])

    def _amplitude_and_width(self) -> tuple[float, float]:
        return self.beta, 1.0


class UniformRandom(_KeyedNoise):
    """r = beta * U(-1, 1), keyed per row (paper IV-B, "Uniform Random")."""

    name = "uniform_random"

    def __init__(self, beta: float = 0.5, *, secret: bytes = b""):
        self.beta = positive("beta", beta)
        super().__init__(secret)

    @property
    def params(self) -> dict[str, float]:
        return {"beta": self.beta}


class UniformRandomConcave(_KeyedNoise):
    """r = beta * U(-1, 1) * exp(-(y / rho)^2 / 2): noise strongest on small values."""

    name = "uniform_random_concave"
    _kind = CONCAVE

    def __init__(self, beta: float = 0.5, rho: float = 0.3, *, secret: bytes = b""):
        self.beta = positive("beta", beta)
        self.rho = positive("rho", rho)
        super().__init__(secret)

    @property
    def params(self) -> dict[str, float]:
        return {"beta": self.beta, "rho": self.rho}

    def _amplitude_and_width(self) -> tuple[float, float]:
        return self.beta, self.rho


class UniformRandomConvex(UniformRandomConcave):
    """r = beta * U(-1, 1) * (1 - exp(-(y / rho)^2 / 2)): noise strongest on large values."""

    name = "uniform_random_convex"
    _kind = CONVEX


class RankingPreservingUniformRandom(UniformRandom):
    """Uniform Random whose perturbed values are handed back in the input's class order.

    The largest perturbed value goes to the input's top class (numpy.argmax order for
    ties), the second largest to the second, and so on, so every row keeps its ranking and
    its top-1 class.
    """

    name = "ranking_preserving_uniform_random"
    preserves_top1 = True
    _kind = RANKED


class GaussianNoise(_KeyedNoise):
    """y + N(0, scale) per value, clipped at 0 and renormalised; keyed per row."""

    name = "gaussian_noise"
    _kind = GAUSSIAN

    def __init__(self, scale: float = 0.1, *, secret: bytes = b""):
        self.scale = positive("scale", scale)
        super().__init__(secret)

    @property
    def params(self) -> dict[str, float]:
        return {"scale": self.scale}

    def _amplitude_and_width(self) -> tuple[float, float]:
        return self.scale, 1.0
