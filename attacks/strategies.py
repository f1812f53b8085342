"""Model-stealing strategies (Sec. IV-A, IV-D, and Tramèr et al. for logistic regression).

A strategy takes an oracle, a query budget and what the attacker has (`Attacker`: unlabeled
samples, the architecture they train, the data range) and returns a trained stolen model
(a torch module returning logits). It never asks the oracle for more than `budget` inputs.

    sample       query the attacker's samples, train on the returned probabilities
                 (distilled at the attacker's temperature, `TrainConfig.temperature`)
    argmax       the same, but train on the top-1 label only (ArgmaxSample)
    random       uniform random queries in the data range
    jacobian     Papernot et al.'s Jacobian-based augmentation, lambda = 0.1
  defense-aware (Sec. IV-D; the attacker knows the defense and its parameters):
    same-layer   the Reverse Sigmoid layer on the stolen model's output
    mse          mean-squared-error loss instead of cross entropy
    inversion    an MLP (K -> 5K -> 3K -> K) trained on (y, y_hat) pairs maps the protected
                 answers back before training
  Kerckhoffs (the attacker knows the algorithm and its published parameters, not the secret;
  attacks/kerckhoffs.py):
    contract-floor    train on what the utility contract discloses: label and served top
                 probability, the other classes uniform
    label-smoothed    the label only, at a fixed confidence (the strongest label-only thief
                 here: hard one-hot labels train a weaker copy at small budgets)
    argmax-rounded    ArgmaxSample on answers rounded to 2 decimals
    closed-form  invert the known formula with the published parameters, then distil
    estimated    the same with the parameters estimated from the answers
    learned      D-DAE-style recovery: a shadow model trained on the answers' labels, the
                 attacker's own copy of the defense (its own secret) on the shadow's
                 outputs, and an MLP trained from those protected answers back to clean
                 ones maps the real answers before distilling
  tabular:
    equation-solving  Tramèr et al.: solve the softmax equations of a multiclass logistic
                 regression from random queries

When the budget exceeds the number of samples, the extra queries are shifted (and, except
on MNIST, flipped) copies of the samples, as the paper's 50,000-query budget with a few
hundred samples implies. Tabular samples, and images smaller than 16 pixels (where a
one-pixel shift moves an 8x8 digit by an eighth of its frame and the extra queries made
Sample's agreement fall as the budget grew), get small Gaussian jitter instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from stealguard.attacks import kerckhoffs
from stealguard.attacks.oracles import Oracle
from stealguard.attacks.training import (
    TrainConfig,
    augment,
    predict,
    soft_cross_entropy,
    train,
)
from stealguard.modelserver.architectures import LogReg, build_model
from stealguard.modelserver.datasets import Dataset
from torch import nn

JACOBIAN_LAMBDA = 0.1
JACOBIAN_ROUNDS = 3  # augmentation rounds; the set doubles each round
LABEL_CONFIDENCE = 0.98  # label-smoothed thief: about a confident model's mean top


@dataclass
class Attacker:
    """What the attacker has: unlabeled samples, the architecture they train, the range
    of valid inputs, and how they train."""

    samples: np.ndarray
    input_shape: tuple[int, ...]
    num_classes: int
    input_low: np.ndarray
    input_high: np.ndarray
    architecture: str = "allconv"
    flip: bool = False
    train_config: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0

    @classmethod
    def from_dataset(
        cls, ds: Dataset, architecture: str, train_config: TrainConfig, seed: int = 0
    ) -> Attacker:
        low, high = ds.input_range
        return cls(ds.attacker_x, ds.input_shape, ds.num_classes, low, high,
                   architecture, ds.flip, train_config, seed)

    def new_model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return build_model(self.architecture, self.input_shape, self.num_classes)

    def fit(self, x: np.ndarray, targets: np.ndarray, **kwargs) -> nn.Module:
        """Train a fresh stolen model on (x, targets); kwargs go to training.train."""
        return train(self.new_model(), x, targets, self.train_config,
                     flip=self.flip, seed=self.seed, **kwargs)

    def distil(self, x: np.ndarray, probs: np.ndarray) -> nn.Module:
        """Train a fresh stolen model on probability rows, at the configured temperature."""
        return self.fit(x, probs, temperature=self.train_config.temperature)


def query_inputs(attacker: Attacker, budget: int) -> np.ndarray:
    """`budget` query inputs from the attacker's samples: the samples themselves (a random
    subset if the budget is smaller), then augmented copies of random samples."""
    rng = np.random.default_rng(attacker.seed)
    samples = attacker.samples
    n = len(samples)
    if budget <= n:
        return samples[rng.choice(n, budget, replace=False)]
    extra = samples[rng.integers(0, n, budget - n)]
    if extra.ndim == 4 and min(extra.shape[2:]) >= 16:
        gen = torch.Generator().manual_seed(attacker.seed)
        max_shift = attacker.train_config.max_shift
        extra = augment(torch.from_numpy(extra), flip=attacker.flip, max_shift=max_shift,
                        gen=gen).numpy()
    else:
        scale = 0.05 * samples.std(axis=0, keepdims=True)
        extra = np.clip(extra + rng.normal(size=extra.shape) * scale,
                        attacker.input_low, attacker.input_high)
    return np.concatenate([samples, extra.astype(np.float32)])


def one_hot(probs: np.ndarray) -> np.ndarray:
    """Top-1 labels of probability rows as one-hot rows."""
    out = np.zeros_like(probs)
    out[np.arange(len(probs)), probs.argmax(1)] = 1.0
    return out


def sample_attack(oracle: Oracle, budget: int, attacker: Attacker) -> nn.Module:
    """Sample: query the attacker's samples, train on the returned probabilities."""
    x = query_inputs(attacker, budget)
    return attacker.distil(x, oracle.query(x))


def argmax_attack(oracle: Oracle, budget: int, attacker: Attacker) -> nn.Module:
    """ArgmaxSample: as Sample, but keep only the top-1 class of each answer."""
    x = query_inputs(attacker, budget)
    return attacker.fit(x, one_hot(oracle.query(x)))


def random_attack(oracle: Oracle, budget: int, attacker: Attacker) -> nn.Module:
    """Random: uniform random queries in the known input range, no real samples."""
    rng = np.random.default_rng(attacker.seed)
    shape = (budget, *attacker.input_shape)
    x = rng.uniform(attacker.input_low, attacker.input_high, size=shape).astype(np.float32)
    return attacker.distil(x, oracle.query(x))


def contract_floor_attack(oracle: Oracle, budget: int, attacker: Attacker) -> nn.Module:
    """Distil on the contract view of the answers: label and served top, rest uniform."""
    x = query_inputs(attacker, budget)
    return attacker.distil(x, kerckhoffs.contract_view(oracle.query(x)))


def label_smoothed_attack(oracle: Oracle, budget: int, attacker: Attacker, *,
                          confidence: float = LABEL_CONFIDENCE) -> nn.Module:
    """Distil on the labels alone, each at the same `confidence`, the rest uniform."""
    x = query_inputs(attacker, budget)
    return attacker.distil(x, kerckhoffs.label_view(oracle.query(x), confidence))


def argmax_rounded_attack(oracle: Oracle, budget: int, attacker: Attacker, *,
                          decimals: int = 2) -> nn.Module:
    """ArgmaxSample on answers rounded to `decimals`, as a client that rounds sees them."""
    x = query_inputs(attacker, budget)
    return attacker.fit(x, one_hot(np.round(oracle.query(x), decimals)))


def closed_form_attack(oracle: Oracle, budget: int, attacker: Attacker, *, defense: str,
                       params: dict) -> nn.Module:
    """Invert the defense `defense` with its published `params`, then distil."""
    x = query_inputs(attacker, budget)
    return attacker.distil(x, kerckhoffs.invert(oracle.query(x), defense, params))


def estimated_attack(oracle: Oracle, budget: int, attacker: Attacker, *,
                     defense: str) -> nn.Module:
    """Estimate the parameters of `defense` from the answers, invert, then distil."""
    x = query_inputs(attacker, budget)
    served = oracle.query(x)
    params = kerckhoffs.estimate(served, defense)
    return attacker.distil(x, kerckhoffs.invert(served, defense, params))


def learned_recovery_attack(oracle: Oracle, budget: int, attacker: Attacker, *,
                            defense: str, params: dict, pairs: int = 4000,
                            steps: int = 3000) -> nn.Module:
    """D-DAE-style learned recovery (Chen et al., S&P 2023) with the attacker's own secret.

    The shadow model is the attacker's: trained on the labels of its answered queries. Its
    outputs on `pairs` of the attacker's own inputs (not queried: no budget) go through
    the attacker's copy of the defense, keyed by a secret of its own; the inversion MLP
    learns protected -> clean on those pairs and maps the real answers before distilling.
    """
    from stealguard.server.defenses import make_defense

    x = query_inputs(attacker, budget)
    served = oracle.query(x)
    shadow = attacker.fit(x, one_hot(served))
    own = replace(attacker, seed=attacker.seed + 1000)
    x_pairs = query_inputs(own, pairs)
    clean = predict(shadow, x_pairs)
    copy = make_defense(defense, secret=b"the attacker's own secret", **params)
    inverter = train_inverter(np.asarray(copy(clean), np.float64), clean, steps=steps,
                              seed=attacker.seed)
    with torch.no_grad():
        recovered = inverter(torch.as_tensor(served, dtype=torch.float32)).softmax(1)
    return attacker.distil(x, recovered.double().numpy())


def _jacobian_step(model: nn.Module, x: np.ndarray, labels: np.ndarray, attacker: Attacker):
    """x + lambda * sign(d softmax(model(x))[label] / dx), clipped to the input range."""
    xt = torch.from_numpy(np.ascontiguousarray(x)).requires_grad_(True)
    picked = model(xt).softmax(1)[torch.arange(len(x)), torch.from_numpy(labels)]
    (grad,) = torch.autograd.grad(picked.sum(), xt)
    moved = x + JACOBIAN_LAMBDA * np.sign(grad.numpy())
    return np.clip(moved, attacker.input_low, attacker.input_high).astype(np.float32)


def jacobian_attack(oracle: Oracle, budget: int, attacker: Attacker) -> nn.Module:
    """Jacobian-based dataset augmentation (Papernot et al.): start from a few samples,
    train a substitute, add x + lambda*sign(J(x)) for each point, query, retrain; the set
    doubles each round until the budget is spent."""
    rng = np.random.default_rng(attacker.seed)
    n0 = max(1, min(len(attacker.samples), budget >> JACOBIAN_ROUNDS))
    x = attacker.samples[rng.choice(len(attacker.samples), n0, replace=False)]
    y = oracle.query(x)
    model = attacker.distil(x, y)
    while oracle.remaining > 0:
        take = rng.permutation(len(x))[: oracle.remaining]
        new_x = _jacobian_step(model, x[take], y[take].argmax(1), attacker)
        x, y = np.concatenate([x, new_x]), np.concatenate([y, oracle.query(new_x)])
        model = attacker.distil(x, y)
    return model


class ReverseSigmoidLayer(nn.Module):
    """The defense-aware attacker's differentiable copy of eq. (4), appended to the stolen
    model's softmax: y_hat = normalise(max(y - beta*(sigmoid(gamma*logit(y)) - 1/2), 0)).
    (The attacker's layer, not the product's defense: the tests check it matches
    stealguard.server.defenses' reverse_sigmoid without the top-1 guard.)"""

    LOGIT_CLIP = 20.723265836946411  # ln((1 - 1e-9) / 1e-9), as the defense

    def __init__(self, beta: float, gamma: float):
        super().__init__()
        self.beta, self.gamma = float(beta), float(gamma)

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        z = torch.logit(probs.double().clamp(1e-300, 1.0)).clamp(-self.LOGIT_CLIP, self.LOGIT_CLIP)
        q = (probs - self.beta * (torch.sigmoid(self.gamma * z) - 0.5)).clamp_min(0.0)
        return (q / q.sum(1, keepdim=True).clamp_min(1e-12)).to(probs.dtype)


def same_layer_attack(
    oracle: Oracle, budget: int, attacker: Attacker, *, beta: float, gamma: float
) -> nn.Module:
    """Train the stolen model with the same Reverse Sigmoid layer on its output, so that
    layer(softmax(model(x))) matches the protected answers (Sec. IV-D)."""
    x = query_inputs(attacker, budget)
    return attacker.fit(x, oracle.query(x), output_layer=ReverseSigmoidLayer(beta, gamma))


def mse_attack(oracle: Oracle, budget: int, attacker: Attacker) -> nn.Module:
    """Train on the protected answers with mean-squared-error loss (Sec. IV-D)."""
    x = query_inputs(attacker, budget)
    return attacker.fit(x, oracle.query(x), loss="mse")


def train_inverter(
    protected: np.ndarray, base: np.ndarray, *, steps: int = 3000, seed: int = 0
) -> nn.Module:
    """The inversion MLP of Sec. IV-D: K inputs, hidden 5K and 3K, K outputs (logits),
    trained on (protected y_hat, base y) pairs to minimise KL(base || softmax(out))."""
    k = protected.shape[1]
    torch.manual_seed(seed)
    inverter = nn.Sequential(nn.Linear(k, 5 * k), nn.ReLU(), nn.Linear(5 * k, 3 * k), nn.ReLU(),
                             nn.Linear(3 * k, k))
    x = torch.as_tensor(protected, dtype=torch.float32)
    y = torch.as_tensor(base, dtype=torch.float32)
    opt = torch.optim.Adam(inverter.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (min(128, len(x)),), generator=gen)
        loss = soft_cross_entropy(inverter(x[idx]).softmax(1), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return inverter.eval()


def inversion_attack(
    oracle: Oracle, budget: int, attacker: Attacker, *, inverter: nn.Module
) -> nn.Module:
    """Map each protected answer through the inversion MLP, then train as Sample."""
    x = query_inputs(attacker, budget)
    with torch.no_grad():
        recovered = inverter(torch.as_tensor(oracle.query(x), dtype=torch.float32)).softmax(1)
    return attacker.distil(x, recovered.double().numpy())


def equation_solving_attack(oracle: Oracle, budget: int, attacker: Attacker) -> nn.Module:
    """Tramèr et al.'s equation-solving attack on multiclass logistic regression.
    softmax gives log(p_j / p_0) = (w_j - w_0) . x + (b_j - b_0): each random query yields
    K-1 linear equations in the (K-1)(F+1) identifiable parameters, solved by least
    squares. Needs budget >= F+1 (the model has K(F+1) parameters)."""
    features = int(np.prod(attacker.input_shape))
    if budget < features + 1:
        raise ValueError(f"equation solving needs at least {features + 1} queries "
                         f"(features + 1), got a budget of {budget}")
    rng = np.random.default_rng(attacker.seed)
    shape = (budget, *attacker.input_shape)
    x = rng.uniform(attacker.input_low, attacker.input_high, size=shape).astype(np.float32)
    probs = oracle.query(x)
    log_p = np.log(np.clip(probs, 1e-300, 1.0))  # a defense may answer exact zeros
    a = np.concatenate([x.reshape(budget, -1).astype(np.float64), np.ones((budget, 1))], 1)
    solution, *_ = np.linalg.lstsq(a, log_p[:, 1:] - log_p[:, :1], rcond=None)
    stolen = LogReg(attacker.input_shape, attacker.num_classes)
    weight = np.zeros((attacker.num_classes, features + 1))
    weight[1:] = solution.T
    with torch.no_grad():
        stolen.linear.weight.copy_(torch.as_tensor(weight[:, :-1]))
        stolen.linear.bias.copy_(torch.as_tensor(weight[:, -1]))
    return stolen.eval()


Strategy = Callable[..., nn.Module]
STRATEGIES: dict[str, Strategy] = {
    "sample": sample_attack,
    "argmax": argmax_attack,
    "random": random_attack,
    "jacobian": jacobian_attack,
    "same-layer": same_layer_attack,
    "mse": mse_attack,
    "inversion": inversion_attack,
    "equation-solving": equation_solving_attack,
    "contract-floor": contract_floor_attack,
    "label-smoothed": label_smoothed_attack,
    "argmax-rounded": argmax_rounded_attack,
    "closed-form": closed_form_attack,
    "estimated": estimated_attack,
    "learned": learned_recovery_attack,
}
DEFENSE_AWARE = ("same-layer", "mse", "inversion")
