"""coarse_confidence, the default defense: the utility contract, the keyed rest, parameters."""

from __future__ import annotations

import numpy as np
import pytest
from _defenses_helpers import digits_softmax_rows
from stealguard.attacks.contract import contract_holds, utility
from stealguard.server.defenses import make_defense
from stealguard.server.defenses.confidence import default_values


@pytest.fixture(scope="module")
def digits_rows() -> np.ndarray:
    return digits_softmax_rows()


def _served(probs, secret=b"one", **params):
    return make_defense("coarse_confidence", secret=secret, **params)(probs)


def test_label_survives_rounding_and_float32_with_the_margin_on_every_row(digits_rows):
    served = _served(digits_rows)
    u = utility(served, digits_rows)
    assert contract_holds(u)
    ordered = np.sort(served, axis=1)
    assert (ordered[:, -1] - ordered[:, -2]).min() >= 0.02 - 1e-6
    assert (served.argmax(axis=1) == digits_rows.argmax(axis=1)).all()
    np.testing.assert_allclose(served.sum(axis=1), 1.0, atol=1e-6)


def test_top_probability_is_the_level_value_of_the_raw_top():
    rows = np.array([[0.5, 0.3, 0.2], [0.9995, 0.0004, 0.0001], [0.999995, 4e-6, 1e-6]])
    served = _served(rows, edges=[0.999, 0.99999], values=[0.6, 0.99, 0.999])
    np.testing.assert_allclose(served.max(axis=1), [0.6, 0.99, 0.999])


def test_confidence_order_is_kept_between_levels(digits_rows):
    raw_top = digits_rows.max(axis=1)
    served_top = _served(digits_rows).max(axis=1)
    order = np.argsort(raw_top)
    assert (np.diff(served_top[order]) >= 0).all()


def test_rest_does_not_depend_on_the_other_classes_only_on_bytes_and_key():
    a = np.array([[0.7, 0.2, 0.05, 0.05]])
    b = np.array([[0.7, 0.05, 0.05, 0.2]])  # same label and top, other rest
    # same label and level: the served top is identical, the rest is a keyed draw
    assert _served(a)[0, 0] == _served(b)[0, 0]
    assert not np.array_equal(_served(a), _served(a, secret=b"two"))
    np.testing.assert_array_equal(_served(a), _served(a.copy()))  # deterministic


def test_rest_averages_to_uniform_over_near_duplicate_queries():
    rng = np.random.default_rng(0)
    base = np.array([0.9, 0.06, 0.03, 0.01])
    rows = base + rng.uniform(-1e-9, 1e-9, (4000, 4))
    rows /= rows.sum(axis=1, keepdims=True)
    rest = _served(rows)[:, 1:]
    means = rest.mean(axis=0)
    # the raw rest is ordered 0.06 > 0.03 > 0.01; the served one averages to equal shares
    np.testing.assert_allclose(means, means.mean(), rtol=0.05)


def test_binary_column_is_answered_as_one_column():
    column = np.array([[0.3], [0.9999]])
    served = _served(column, edges=[0.99], values=[0.8, 0.995])
    np.testing.assert_allclose(served[:, 0], [0.2, 0.995])


def test_low_level_values_are_raised_so_the_margin_fits():
    rows = np.full((1, 10), 0.1)
    rows[0, 0] += 0.05
    rows[0, 1:] -= 0.05 / 9
    served = _served(rows, edges=[0.999], values=[0.1, 0.99])
    ordered = np.sort(served[0])
    assert ordered[-1] - ordered[-2] >= 0.02 - 1e-12
    assert served[0].argmax() == 0


def test_default_values_are_midpoints_in_nines():
    values = default_values([0.99, 0.9999])
    np.testing.assert_allclose(values, [1 - 10 ** -1, 1 - 10 ** -3, 1 - 10 ** -4.5])


@pytest.mark.parametrize("params, message", [
    ({"edges": [0.99, 0.9]}, "edges must increase"),
    ({"edges": [1.0]}, "edges must lie strictly between 0 and 1"),
    ({"edges": "0.9"}, "edges must be a list of numbers"),
    ({"values": [0.5]}, "values must have one entry per level"),
    ({"edges": [0.9, 0.99, 0.999], "values": [0.9, 0.8, 0.99, 0.999]},
     "values must not decrease"),
    ({"margin": 0.5}, "margin must be a number in [0.005, 0.25]"),
])
def test_bad_parameters_name_the_parameter(params, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        make_defense("coarse_confidence", **params)


def test_params_are_flat_numbers_for_list_policies():
    params = make_defense("coarse_confidence", edges=[0.9]).params
    assert params == {"edge_1": 0.9, "value_1": pytest.approx(1 - 10 ** -0.5),
                      "value_2": pytest.approx(1 - 10 ** -1.5), "margin": 0.02}


def test_the_defense_and_the_config_agree_on_the_default_levels():
    from stealguard.server.config import DEFAULT_POLICY
    from stealguard.server.defenses.confidence import DEFAULT_EDGES

    assert list(DEFAULT_EDGES) == DEFAULT_POLICY["edges"]
    assert make_defense("coarse_confidence").edges == DEFAULT_EDGES


# -------------------------------------------------- the keyed rest, against a Python reference

M64 = (1 << 64) - 1


def _rotl(x, b):
    return ((x << b) | (x >> (64 - b))) & M64


def _siphash24(k0: int, k1: int, message: bytes) -> int:
    """SipHash-2-4 as its paper specifies it, in plain Python."""
    v = [k0 ^ 0x736F6D6570736575, k1 ^ 0x646F72616E646F6D,
         k0 ^ 0x6C7967656E657261, k1 ^ 0x7465646279746573]

    def rounds(count):
        for _ in range(count):
            v[0] = (v[0] + v[1]) & M64
            v[1] = _rotl(v[1], 13) ^ v[0]
            v[0] = _rotl(v[0], 32)
            v[2] = (v[2] + v[3]) & M64
            v[3] = _rotl(v[3], 16) ^ v[2]
            v[0] = (v[0] + v[3]) & M64
            v[3] = _rotl(v[3], 21) ^ v[0]
            v[2] = (v[2] + v[1]) & M64
            v[1] = _rotl(v[1], 17) ^ v[2]
            v[2] = _rotl(v[2], 32)

    tail = len(message) % 8
    blocks = [int.from_bytes(message[i:i + 8], "little")
              for i in range(0, len(message) - tail, 8)]
    blocks.append(int.from_bytes(message[len(message) - tail:], "little")
                  | ((len(message) & 0xFF) << 56))
    for m in blocks:
        v[3] ^= m
        rounds(2)
        v[0] ^= m
    v[2] ^= 0xFF
    rounds(4)
    return v[0] ^ v[1] ^ v[2] ^ v[3]


def _nh_siphash24(k0, k1, nh_key, row: np.ndarray) -> int:
    words = np.frombuffer(row.tobytes(), "<u4").tolist()
    digests = b""
    for first in range(0, len(words), 64):
        chunk = words[first:first + 64]
        chunk += [0] * (len(chunk) % 2)
        key = [int(x) for x in nh_key[:len(chunk)]]
        d = sum(((chunk[i] + key[i]) & 0xFFFFFFFF) * ((chunk[i + 1] + key[i + 1]) & 0xFFFFFFFF)
                for i in range(0, len(chunk), 2))
        digests += (d & M64).to_bytes(8, "little")
    return _siphash24(k0, k1, digests)


def test_the_siphash_reference_gives_the_papers_test_vector():
    key = bytes(range(16))
    k0, k1 = int.from_bytes(key[:8], "little"), int.from_bytes(key[8:], "little")
    assert _siphash24(k0, k1, bytes(range(15))) == 0xA129CA6149BE45E5


@pytest.mark.parametrize("dtype, k", [(np.float32, 2), (np.float32, 3), (np.float32, 10),
                                      (np.float32, 129), (np.float64, 10), (np.float64, 33)])
def test_rest_is_the_published_construction_on_the_row_bytes(dtype, k):
    """The served rest is exponential draws seeded by NH-then-SipHash-2-4 of the row bytes."""
    from numba import njit
    from stealguard.server.defenses._fastmath import nh_siphash24

    defense = make_defense("coarse_confidence", secret=b"reference")
    _, _, margin, nh_key, k0, k1 = defense._kernel_args(dtype)

    @njit
    def seed(y, key, a, b):
        return nh_siphash24(y, 0, y.size, key, a, b)

    rng = np.random.default_rng(k)
    row = rng.dirichlet(np.ones(k)).astype(dtype)
    want = _nh_siphash24(int(k0), int(k1), nh_key, row)
    assert int(seed(row, nh_key, k0, k1)) == want

    # the weights: -log u of two 23-bit uniforms from each splitmix64 output, top skipped
    def splitmix(i):
        z = (want + (i + 1) * 0x9E3779B97F4A7C15) & M64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return z ^ (z >> 31)

    top = int(row.argmax())
    u = [((((splitmix(j // 2) >> (32 * (j % 2))) & 0xFFFFFFFF) >> 9) + 0.5) * 2.0 ** -23
         for j in range(k)]
    w = np.array([0.0 if j == top else -np.log(u[j]) for j in range(k)])
    served = defense(row).astype(np.float64)
    t = served[top]
    rest = 1.0 - t
    share = rest / (k - 1)
    peak = rest * w.max() / w.sum()
    lam = 1.0 if peak <= t - margin else (t - margin - share) / (peak - share)
    want_rest = lam * rest * w / w.sum() + (1.0 - lam) * share
    others = np.arange(k) != top
    # the kernel's log is the float32 polynomial (under 1e-6 absolute): so is the agreement
    np.testing.assert_allclose(served[others], want_rest[others], rtol=0, atol=2e-6)
