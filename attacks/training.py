"""Training loops for base and stolen models, with the paper's shift/flip augmentation.

"Basic data augmentation (shift/flip) is applied in all training" (Sec. IV); flipping is not
applied on MNIST. Every model here is trained the same way: minibatches of 64, Adam, a
loss between the model's softmax output and the target probability rows.

An attacker who trains on probabilities can distil at a temperature T > 1 (Hinton et al.):
the targets become softmax(log(y) / T) and the model's output softmax(logits / T), which
brings out the small probabilities that a confident model's answers carry.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-7  # Keras' epsilon: log() of probabilities is taken of max(p, EPS)


@dataclass(frozen=True)
class TrainConfig:
    """How long and how hard to train: `epochs` passes over the data, but never fewer than
    `min_steps` minibatches (small budgets still get a trained model)."""

    epochs: float = 10.0
    min_steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    max_shift: int = 2  # pixels, for 28x28 images; 8x8 images shift by 1
    # Distillation temperature for probability targets under cross-entropy (1: plain).
    temperature: float = 1.0

    def steps(self, n: int) -> int:
        return max(self.min_steps, math.ceil(self.epochs * n / self.batch_size))


def augment(x: torch.Tensor, *, flip: bool, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Randomly shift each image by up to `max_shift` pixels (zero fill) and, if `flip`,
    mirror half of them left-right. Non-image (2-D) batches are returned unchanged."""
    if x.dim() != 4:
        return x
    n, _, h, w = x.shape
    s = max_shift if min(h, w) >= 16 else min(max_shift, 1)  # 1 px is a lot on 8x8
    if s > 0:
        padded = F.pad(x, (s, s, s, s))
        dy = torch.randint(0, 2 * s + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * s + 1, (n,), generator=gen)
        rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]
        samples = torch.arange(n)[:, None, None, None]
        channels = torch.arange(x.shape[1])[None, :, None, None]
        x = padded[samples, channels, rows, cols]
    if flip:
        mirror = torch.rand(n, generator=gen) < 0.5
        x = torch.where(mirror[:, None, None, None], x.flip(3), x)
    return x


def soft_cross_entropy(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Eq. (1): -sum_j y_j log f(x)_j, averaged over the batch."""
    return -(targets * probs.clamp_min(EPS).log()).sum(1).mean()


def soften(targets: np.ndarray, temperature: float) -> np.ndarray:
    """Probability rows softened for distillation: softmax(log(max(y, EPS)) / T)."""
    z = np.log(np.clip(np.asarray(targets, np.float64), EPS, 1.0)) / temperature
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def mse(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return ((probs - targets) ** 2).sum(1).mean()


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cross_entropy": soft_cross_entropy,
    "mse": mse,
}


def train(
    model: nn.Module,
    x: np.ndarray,
    targets: np.ndarray,
    config: TrainConfig,
    *,
    flip: bool = False,
    loss: str = "cross_entropy",
    output_layer: Callable[[torch.Tensor], torch.Tensor] | None = None,
    temperature: float = 1.0,
    seed: int = 0,
) -> nn.Module:
    """Train `model` (which returns logits) so that softmax(model(x)) — passed through
    `output_layer` if given (the defense-aware attacker's copy of the defense) — matches the
    probability rows `targets` under `loss` ("cross_entropy" or "mse"). Images are shifted
    (and flipped if `flip`) afresh in every minibatch. `temperature` > 1 distils (see the
    module docstring); it needs cross-entropy and no output layer. Returns the model in
    eval mode."""
    if temperature != 1.0:
        if loss != "cross_entropy" or output_layer is not None:
            raise ValueError("a distillation temperature needs cross-entropy and no output layer")
        targets = soften(targets, temperature)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    xs = torch.as_tensor(np.asarray(x, np.float32))
    ys = torch.as_tensor(np.asarray(targets, np.float32))
    loss_fn = LOSSES[loss]
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    model.train()
    n = len(xs)
    order = torch.randperm(n, generator=gen)
    pos = 0
    for _ in range(config.steps(n)):
        if pos >= n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos : pos + config.batch_size]
        pos += config.batch_size
        xb = augment(xs[idx], flip=flip, max_shift=config.max_shift, gen=gen)
        probs = (model(xb) / temperature).softmax(1)
        if output_layer is not None:
            probs = output_layer(probs)
        loss_value = loss_fn(probs, ys[idx])
        opt.zero_grad(set_to_none=True)
        loss_value.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Softmax outputs of `model` on `x` as a float64 array (N, K)."""
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        xb = torch.as_tensor(np.asarray(x[i : i + batch_size], np.float32))
        out.append(model(xb).double().softmax(1).numpy())
    if not out:
        return np.zeros((0, 0))
    return np.concatenate(out)
