"""Branch-free float32 log/exp, bit casts and a keyed PRF for the defense kernels.

numba here is built without SVML, so `math.log`/`math.exp` inside a loop are scalar libm
calls that stop LLVM from vectorising the loop. The float32 functions below are
polynomials (Cephes `logf`/`expf` coefficients, musl-style range reduction) made only of
adds, multiplies, min/max and integer bit operations, so a loop that calls them compiles
to AVX2/AVX-512 code. Measured error against float64 (`python bench/kernels.py`):
`log_f32` 9.8e-7 absolute on [1e-9, 1e9] (8.1e-8 relative: under one ulp of the result),
`exp_f32` 8.1e-8 relative on [-87, 88] (1.35 ulp).

float64 callers use `math.log`/`math.exp`: the 1e-6 output contract for float64 input is
checked against a float64 evaluation, and float64 is not on the throughput-critical path.

`siphash24` keys the random defenses: a PRF designed for short messages, so the noise for a
row is unpredictable without the server secret but identical for identical rows.
`nh_siphash24` is the same PRF for the default defense's hot path, at a fraction of the
cost: the row's bytes are first compressed by NH (UMAC's universal hash, one 32 x 32-bit
multiply per 8 bytes) under a secret key, and SipHash-2-4 runs over the 8-byte digests, one
per 256 bytes of row, instead of over every 8 bytes of the row.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core.extending import intrinsic, overload

#: numba fastmath flags of the kernels: only "contract" (fused multiply-add), which makes
#: the polynomials faster and slightly more accurate and keeps every result deterministic.
FASTMATH = {"contract"}

# ---------------------------------------------------------------------------- bit casts


def _bitcast_intrinsic(src, dst, llvm_type):
    """An intrinsic reinterpreting the bits of a `src` scalar as `dst` (no conversion).

    Integer sources of another width are first truncated or sign-extended to the width of
    `dst` (numba widens int32 arithmetic to int64).
    """

    @intrinsic
    def cast(typingctx, x):
        if isinstance(src, types.Integer) and isinstance(x, types.Integer):
            arg = x
        elif x == src:
            arg = src
        else:
            return None

        def codegen(context, builder, signature, args):
            value = args[0]
            if isinstance(arg, types.Integer) and arg.bitwidth != src.bitwidth:
                if arg.bitwidth > src.bitwidth:
                    value = builder.trunc(value, ir.IntType(src.bitwidth))
                else:
                    value = builder.sext(value, ir.IntType(src.bitwidth))
            return builder.bitcast(value, llvm_type)

        return dst(arg), codegen

    return cast


f32_as_i32 = _bitcast_intrinsic(types.float32, types.int32, ir.IntType(32))
i32_as_f32 = _bitcast_intrinsic(types.int32, types.float32, ir.FloatType())
f64_as_u64 = _bitcast_intrinsic(types.float64, types.uint64, ir.IntType(64))
f64_as_i64 = _bitcast_intrinsic(types.float64, types.int64, ir.IntType(64))
i64_as_f64 = _bitcast_intrinsic(types.int64, types.float64, ir.DoubleType())


def like(x, v):
    """v converted to the float type of x."""


@overload(like, inline="always")
def _like_impl(x, v):
    if x == types.float32:
        return lambda x, v: np.float32(v)
    if x == types.float64:
        return lambda x, v: np.float64(v)
    return None


def next_below(t):
    """The largest float of t's type below t, for finite t > 0 (one unit in the last place)."""


@overload(next_below, inline="always")
def _next_below_impl(t):
    if t == types.float32:
        return lambda t: i32_as_f32(f32_as_i32(t) - np.int32(1))
    if t == types.float64:
        return lambda t: i64_as_f64(f64_as_i64(t) - np.int64(1))
    return None

# ----------------------------------------------------------------------- float32 log/exp

_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_FHALF = np.float32(0.5)
_SQRT_HALF_BITS = np.int32(0x3F3504F3)  # float32 bits of sqrt(0.5)
_ONE_BITS = np.int32(0x3F800000)
_MANT_MASK = np.int32(0x007FFFFF)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_LOG2E = np.float32(1.44269504088896341)
_EXP_LO = np.float32(-87.0)  # keeps 2**n a normal float32
_EXP_HI = np.float32(88.0)
_L0 = np.float32(7.0376836292e-2)
_L1 = np.float32(-1.1514610310e-1)
_L2 = np.float32(1.1676998740e-1)
_L3 = np.float32(-1.2420140846e-1)
_L4 = np.float32(1.4249322787e-1)
_L5 = np.float32(-1.6668057665e-1)
_L6 = np.float32(2.0000714765e-1)
_L7 = np.float32(-2.4999993993e-1)
_L8 = np.float32(3.3333331174e-1)
_E0 = np.float32(1.9875691500e-4)
_E1 = np.float32(1.3981999507e-3)
_E2 = np.float32(8.3334519073e-3)
_E3 = np.float32(4.1665795894e-2)
_E4 = np.float32(1.6666665459e-1)
_E5 = np.float32(5.0000001201e-1)


@njit(inline="always")
def log_f32(x):
    """ln(x) for positive normal float32 x (0 and subnormals give about -88; inf about 89).

    Reduces x = 2**k * m with m in [sqrt(1/2), sqrt(2)) by integer arithmetic on the bits,
    then ln(m) = f - f^2/2 + f^3 P(f) with f = m - 1.
    """
    ix = f32_as_i32(x) + (_ONE_BITS - _SQRT_HALF_BITS)
    k = np.float32((ix >> np.int32(23)) - np.int32(127))
    f = i32_as_f32((ix & _MANT_MASK) + _SQRT_HALF_BITS) - _F1
    z = f * f
    p = _L0 * f + _L1
    p = p * f + _L2
    p = p * f + _L3
    p = p * f + _L4
    p = p * f + _L5
    p = p * f + _L6
    p = p * f + _L7
    p = p * f + _L8
    y = p * f * z + k * _LN2_LO - _FHALF * z
    return f + y + k * _LN2_HI


@njit(inline="always")
def exp_f32(x):
    """e**x for float32 x, clamped to [-87, 88] so the result is a finite normal float32."""
    x = min(max(x, _EXP_LO), _EXP_HI)
    n = np.floor(x * _LOG2E + _FHALF)
    r = x - n * _LN2_HI - n * _LN2_LO
    z = r * r
    p = _E0 * r + _E1
    p = p * r + _E2
    p = p * r + _E3
    p = p * r + _E4
    p = p * r + _E5
    y = p * z + r + _F1
    return y * i32_as_f32((np.int32(n) + np.int32(127)) << np.int32(23))


def fast_log(x):
    """ln(x) in the precision of x: the float32 polynomial or float64 libm."""


def fast_exp(x):
    """e**x in the precision of x: the float32 polynomial or float64 libm."""


@overload(fast_log, inline="always")
def _fast_log_impl(x):
    if x == types.float32:
        return lambda x: log_f32(x)
    if x == types.float64:
        return lambda x: math.log(x)
    return None


@overload(fast_exp, inline="always")
def _fast_exp_impl(x):
    if x == types.float32:
        return lambda x: exp_f32(x)
    if x == types.float64:
        return lambda x: math.exp(x)
    return None


# ---------------------------------------------------------------------- keyed PRF (rows)

_U0 = np.uint64(0)
_U8 = np.uint64(8)
_C_SOMEPSEU = np.uint64(0x736F6D6570736575)
_C_DORANDOM = np.uint64(0x646F72616E646F6D)
_C_LYGENERA = np.uint64(0x6C7967656E657261)
_C_TEDBYTES = np.uint64(0x7465646279746573)
_FF = np.uint64(0xFF)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_TWO_M53 = 1.0 / 9007199254740992.0


@njit(inline="always")
def _rotl(x, b):
    return (x << np.uint64(b)) | (x >> np.uint64(64 - b))


@njit(inline="always")
def _sipround(v0, v1, v2, v3):
    v0 += v1
    v1 = _rotl(v1, 13)
    v1 ^= v0
    v0 = _rotl(v0, 32)
    v2 += v3
    v3 = _rotl(v3, 16)
    v3 ^= v2
    v0 += v3
    v3 = _rotl(v3, 21)
    v3 ^= v0
    v2 += v1
    v1 = _rotl(v1, 17)
    v1 ^= v2
    v2 = _rotl(v2, 32)
    return v0, v1, v2, v3


def bits64(v):
    """The raw bits of a float as one 64-bit word (float32 bits zero-extended)."""


@overload(bits64, inline="always")
def _bits64_impl(v):
    if v == types.float32:
        return lambda v: np.uint64(np.uint32(f32_as_i32(v)))
    if v == types.float64:
        return lambda v: f64_as_u64(v)
    return None


@njit(inline="always")
def _finish(v0, v1, v2, v3, length):
    """SipHash-2-4's last block (the message length in bytes, mod 256) and finalisation."""
    last = length << np.uint64(56)
    v3 ^= last
    v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
    v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
    v0 ^= last
    v2 ^= _FF
    for _ in range(4):
        v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
    return v0 ^ v1 ^ v2 ^ v3


@njit
def siphash24(k0, k1, row, start, count):
    """SipHash-2-4 keyed by (k0, k1) of the words row[start:start+count] (one word each)."""
    v0 = k0 ^ _C_SOMEPSEU
    v1 = k1 ^ _C_DORANDOM
    v2 = k0 ^ _C_LYGENERA
    v3 = k1 ^ _C_TEDBYTES
    for j in range(start, start + count):
        m = bits64(row[j])
        v3 ^= m
        v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
        v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
        v0 ^= m
    return _finish(v0, v1, v2, v3, np.uint64(count) * _U8)


@njit(inline="always")
def splitmix64(seed, i):
    """Output i (0, 1, 2, ...) of the splitmix64 stream that starts at `seed`."""
    z = seed + (np.uint64(i) + np.uint64(1)) * _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@njit(inline="always")
def uniform01(seed, i):
    """A float64 in [0, 1) from output i of the stream (its top 53 bits)."""
    return np.float64(splitmix64(seed, i) >> np.uint64(11)) * _TWO_M53


NH_WORDS = 64  # 32-bit words per NH chunk: the NH key's length
_M32 = np.uint64(0xFFFFFFFF)


@njit(inline="always")
def _nh_pair(u, i, key, j):
    """One NH term: ((u[i] + key[j]) mod 2^32) * ((u[i + 1] + key[j + 1]) mod 2^32)."""
    a = (np.uint64(u[i]) + np.uint64(key[j])) & _M32
    b = (np.uint64(u[i + 1]) + np.uint64(key[j + 1])) & _M32
    return a * b


@njit(inline="always")
def nh_siphash24(y, start, count, key, k0, k1):
    """SipHash-2-4 keyed by (k0, k1) of the NH digests of the bytes of y[start:start+count].

    The bytes are read as little-endian 32-bit words, NH_WORDS to a chunk; each chunk's NH
    digest under `key` (NH_WORDS 32-bit words; an odd last word is paired with a zero
    word) is one 64-bit SipHash message word. NH is universal (two different chunks collide
    with probability 2^-32 over the key) and its digests never leave SipHash, whose output
    is the PRF: `tests/test_defenses_confidence.py` checks both against a Python reference.
    """
    u = y[start:start + count].view(np.uint32)
    words = u.size
    v0 = k0 ^ _C_SOMEPSEU
    v1 = k1 ^ _C_DORANDOM
    v2 = k0 ^ _C_LYGENERA
    v3 = k1 ^ _C_TEDBYTES
    chunks = 0
    for first in range(0, words, NH_WORDS):
        end = min(words, first + NH_WORDS)
        m = _U0
        i = first
        while i + 2 <= end:
            m += _nh_pair(u, i, key, i - first)
            i += 2
        if i < end:  # the odd last word, paired with a zero word
            m += ((np.uint64(u[i]) + np.uint64(key[i - first])) & _M32) * np.uint64(
                key[i - first + 1])
        v3 ^= m
        v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
        v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
        v0 ^= m
        chunks += 1
    return _finish(v0, v1, v2, v3, np.uint64(chunks) * _U8)
