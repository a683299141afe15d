"""Ensembles as one batched module: every weight has a leading member dimension.

M members then train and predict in one matmul per layer instead of M small ones, which
is what makes a 5-model ensemble cost about as much as one model on a CPU. Each member is
initialised like ``torch.nn.Linear`` (uniform in +-1/sqrt(fan_in)), from a caller's
generator so a seed fixes every member.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class EnsembleLinear(nn.Module):
    """M independent affine maps: x [M, B, in] (or [B, in], shared by all members) -> [M, B, out]."""

    def __init__(self, n_members: int, in_features: int, out_features: int, generator: torch.Generator | None = None):
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(n_members, in_features, out_features).uniform_(-bound, bound, generator=generator))
        self.bias = nn.Parameter(torch.empty(n_members, 1, out_features).uniform_(-bound, bound, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # one input for every member: broadcasting matmul, no copy per member
            return torch.matmul(x, self.weight) + self.bias
        return torch.baddbmm(self.bias, x, self.weight)


class EnsembleMLP(nn.Module):
    """M independent ReLU MLPs with the same layer sizes; no activation after the last layer."""

    def __init__(self, n_members: int, sizes: list[int], generator: torch.Generator | None = None):
        super().__init__()
        self.layers = nn.ModuleList(
            EnsembleLinear(n_members, fan_in, fan_out, generator) for fan_in, fan_out in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x)
