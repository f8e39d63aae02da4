"""RanPAC (McDonnell et al., "RanPAC: Random Projections and Pre-trained Models for Continual
Learning", NeurIPS 2023; PILOT's models/ranpac.py).

Frozen features f (d) go through a fixed random projection W (d x M, Gaussian) and a ReLU:
h = relu(f W). Two matrices accumulate over tasks, the Gram matrix G = sum h^T h (M x M)
and C = sum h^T y (M x classes, one-hot labels); the classifier is the ridge solution
W_o = (G + lambda I)^-1 C, recomputed in closed form after every task, so the order of the
tasks does not matter. lambda is chosen, as in the reference, on the current task's data
alone: the first 80% (here in a seeded random order) fit, the last 20% score the mean
squared error of the one-hot targets, over the reference's grid 10^-8 ... 10^8.
Nothing trains and no exemplar is kept; the memory is W, G and C.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.cil.frozen import FROZEN_PARAMS, FrozenFeatureMethod
from harness.params import Param
from harness.registry import register_method

RIDGE_GRID = tuple(10.0 ** k for k in range(-8, 9))  # the reference's np.arange(-8, 9)


def ridge_solve(gram: torch.Tensor, targets: torch.Tensor, ridge: float) -> torch.Tensor:
    """(G + ridge I)^-1 C, by a linear solve (steadier than an explicit inverse)."""
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram + ridge * eye, targets)


def choose_ridge(h: torch.Tensor, y: torch.Tensor, grid=RIDGE_GRID) -> float:
    """The ridge of lowest validation MSE: fit on the first 80% of rows, score on the rest."""
    n_fit = int(len(h) * 0.8)
    gram, cross = h[:n_fit].T @ h[:n_fit], h[:n_fit].T @ y[:n_fit]
    losses = [F.mse_loss(h[n_fit:] @ ridge_solve(gram, cross, r), y[n_fit:]).item() for r in grid]
    return grid[min(range(len(grid)), key=losses.__getitem__)]


@register_method("ranpac")
class RanPAC(FrozenFeatureMethod):
    description = "random projection of frozen pretrained features + closed-form ridge classifier (exemplar-free)"
    params = {
        **FROZEN_PARAMS,
        "projection": Param(2000, "M, the random projection's size (the reference: 10,000; 0 = no projection, "
                            "ridge on the features themselves)", low=0),
    }

    def __init__(self, **kwargs):
        self.gram = self.cross = self.projection = self.readout = None
        self.ridges: list[float] = []  # lambda chosen after each task
        super().__init__(**kwargs)

    def _lift(self, f: torch.Tensor) -> torch.Tensor:
        f = f.double()
        return F.relu(f @ self.projection) if self.projection is not None else f

    def fit(self, features: torch.Tensor, labels: torch.Tensor, classes: list[int]) -> None:
        m = self.hp["projection"]
        if self.gram is None:
            g = torch.Generator().manual_seed(self.context.seed)  # the run's seed draws W
            self.projection = torch.randn(features.shape[1], m, generator=g, dtype=torch.float64) if m else None
            width = m or features.shape[1]
            self.gram = torch.zeros(width, width, dtype=torch.float64)
            self.cross = torch.zeros(width, 0, dtype=torch.float64)
        n_classes = max(self.cross.shape[1], max(classes) + 1)
        self.cross = F.pad(self.cross, (0, n_classes - self.cross.shape[1]))
        h = self._lift(features)
        y = F.one_hot(labels, n_classes).double()
        self.gram += h.T @ h
        self.cross += h.T @ y
        order = torch.randperm(len(h), generator=torch.Generator().manual_seed(self.context.seed * 1009 + len(self.ridges)))
        ridge = choose_ridge(h[order], y[order])
        self.ridges.append(ridge)
        self.readout = ridge_solve(self.gram, self.cross, ridge).float()

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        return self._lift(features).float() @ self.readout

    def state_bytes(self) -> int:
        return self.nbytes(self.projection, self.gram, self.cross)

    def run_info(self):
        return {**super().run_info(), "ridge_grid": list(RIDGE_GRID)}
