"""The attacker's classifier: multinomial logistic regression, cross-validated, with a confidence interval.

Ours, on torch (a dependency already), not scikit-learn: `hearth privacy-audit` must run on a plain install,
and a softmax regression with an L2 penalty fitted by L-BFGS is a few lines. Features are standardised on each
training fold only, so nothing about a held-out sample reaches the model that predicts it. The L2 penalty is
fixed (1e-2 on the mean cross-entropy, about scikit-learn's default C=1 at these sample counts): choosing it
by an inner cross-validation cost minutes here and won nothing on the audit's features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

Z95 = 1.959963984540054


@dataclass
class Score:
    """Held-out accuracy over `n` predictions (each sample predicted once, by a model that never saw it)."""

    correct: int
    n: int
    classes: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def chance(self) -> float:
        return 1 / self.classes

    @property
    def ci(self) -> tuple[float, float]:
        return wilson(self.correct, self.n)

    @property
    def at_chance(self) -> bool:
        """The 95% interval contains chance: the attacker does no better than guessing, as far as n can tell."""
        lo, hi = self.ci
        return lo <= self.chance <= hi

    def __str__(self) -> str:
        lo, hi = self.ci
        return f"{self.accuracy:.0%} [{lo:.0%}, {hi:.0%}] (chance {self.chance:.0%}, n={self.n})"


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k/n (good at small n and near 0 or 1)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def fit(x: np.ndarray, y: np.ndarray, classes: int, l2: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax regression weights [F, C] and bias [C] for standardised features x [N, F], labels y [N]."""
    xt = torch.as_tensor(x, dtype=torch.float64)
    yt = torch.as_tensor(y, dtype=torch.long)
    w = torch.zeros(xt.shape[1], classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        opt.zero_grad()
        value = torch.nn.functional.cross_entropy(xt @ w + b, yt) + l2 * (w * w).sum()
        value.backward()
        return value

    opt.step(loss)
    return w.detach(), b.detach()


def folds(y: np.ndarray, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """k disjoint test index sets, each class spread evenly over them (stratified)."""
    out: list[list[int]] = [[] for _ in range(k)]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        for i, j in enumerate(idx):
            out[i % k].append(int(j))
    return [np.array(sorted(f)) for f in out if f]


def _accuracy(x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, classes: int, l2: float) -> int:
    """Correct predictions on `test` of a model fitted on `train` (standardised with train's statistics)."""
    mean, std = x[train].mean(0), x[train].std(0)
    std[std == 0] = 1.0  # a constant feature carries nothing; keep it at 0
    w, b = fit((x[train] - mean) / std, y[train], classes, l2)
    pred = (torch.as_tensor((x[test] - mean) / std) @ w + b).argmax(1).numpy()
    return int((pred == y[test]).sum())


def cross_validate(x: np.ndarray, y: np.ndarray, k: int = 5, seed: int = 0, l2: float = 1e-2) -> Score:
    """Stratified k-fold accuracy of the classifier on observations x [N, F] with labels y [N] (0..C-1)."""
    x = np.asarray(x, dtype=np.float64).reshape(len(y), -1)
    y = np.asarray(y)
    classes = int(y.max()) + 1
    if len(y) < 2 * classes:
        raise ValueError(f"{len(y)} samples for {classes} classes: give at least two per class")
    k = min(k, int(np.bincount(y).min()))
    correct = 0
    for test in folds(y, k, np.random.default_rng(seed)):
        correct += _accuracy(x, y, np.setdiff1d(np.arange(len(y)), test), test, classes, l2)
    return Score(correct, len(y), classes)
