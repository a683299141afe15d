"""Ensembles as one batched module: every weight has a leading member dimension.

M members then train and predict in one matmul per layer instead of M small ones, which
is what makes a 5-model ensemble cost about as much as one model on a CPU. Each member is
initialised like ``torch.nn.Linear`` (uniform in +-1/sqrt(fan_in)), from a caller's
generator so a seed fixes every member.

Weights are stored [M, out, in] and activations computed as W @ x^T, i.e. feature-major
[M, out, B] underneath the [M, B, out] views callers see: on CPU (MKL) this is 2-4x faster
than x @ W for the skinny output layers (D x r columns) these models end with.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class SavedModel:
    """save/load for a model module whose JSON-able ``config`` holds its constructor's arguments.

    The file is a header plus a dict of tensors, loadable with ``weights_only=True``: no pickled
    objects. Normalisers and the data box are buffers, so they travel with the weights.
    """

    FORMAT: str
    config: dict

    def save(self, path) -> None:
        state = {name: tensor.detach().cpu() for name, tensor in self.state_dict().items()}
        torch.save({"format": self.FORMAT, "config": self.config, "state": state}, path)

    @classmethod
    def load(cls, path, device: str | torch.device = "cpu"):
        saved = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(saved, dict) or saved.get("format") != cls.FORMAT:
            found = saved.get("format") if isinstance(saved, dict) else None
            raise ValueError(f"{path}: not a saved {cls.__name__} (format {found!r}, expected {cls.FORMAT!r})")
        model = cls(**saved["config"]).to(device)
        model.load_state_dict(saved["state"])
        return model.eval()


def register_data_box(module: nn.Module, obs_dim: int) -> None:
    """Buffers ``data_low``/``data_high`` [D]: the range of states the training data saw (unbounded until fitted).

    Saved with the weights; the evaluation can hold predictions to it (``evaluation.clip_to_data_box``).
    """
    module.register_buffer("data_low", torch.full((obs_dim,), -math.inf))
    module.register_buffer("data_high", torch.full((obs_dim,), math.inf))


def set_data_box(module: nn.Module, obs: torch.Tensor, next_obs: torch.Tensor) -> None:
    """Record the per-dimension min and max over the training rows' states and next states."""
    module.data_low.copy_(torch.minimum(obs.amin(0), next_obs.amin(0)))
    module.data_high.copy_(torch.maximum(obs.amax(0), next_obs.amax(0)))


class EnsembleLinear(nn.Module):
    """M independent affine maps: x [M, B, in] (or [B, in], shared by all members) -> [M, B, out]."""

    def __init__(self, n_members: int, in_features: int, out_features: int, generator: torch.Generator | None = None):
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(n_members, out_features, in_features).uniform_(-bound, bound, generator=generator))
        self.bias = nn.Parameter(torch.empty(n_members, out_features, 1).uniform_(-bound, bound, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_major(x.transpose(-2, -1)).transpose(1, 2)

    def with_bias_column(self) -> torch.Tensor:
        """[M, out, in + 1]: the weight with the bias appended as a last input column (for inputs with a row of ones)."""
        return torch.cat([self.weight, self.bias], dim=2)

    def feature_major(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [M, in, B] (or [in, B], shared by all members) -> [M, out, B], written into ``out`` when given."""
        if x.dim() == 2:  # a single [M*out, in] @ [in, B] product
            return torch.matmul(self.weight, x, out=out).add_(self.bias)
        return torch.baddbmm(self.bias, self.weight, x, out=out)


class Workspace:
    """Scratch tensors reused across no-gradient forward passes (planner steps, open-loop rollouts).

    A fresh multi-MB activation per layer and row chunk costs page faults and cache misses: here a
    [5, 512, 512] layer output allocated per call made the layer about 25 % slower than writing into a
    reused one. ``get`` returns a contiguous view of a flat buffer that grows to the largest size
    asked for; a view is only valid until the same key is asked for again. Not thread-safe: one
    workspace per model, used by one thread at a time.
    """

    def __init__(self):
        self._buffers: dict[tuple, torch.Tensor] = {}

    def get(self, key, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A [shape] tensor with ``like``'s dtype and device, stored under ``key`` (contents undefined)."""
        size = math.prod(shape)
        # Inference-mode tensors refuse in-place updates outside it: separate buffers for each mode.
        slot = (key, like.dtype, like.device, torch.is_inference_mode_enabled())
        buffer = self._buffers.get(slot)
        if buffer is None or buffer.numel() < size:
            buffer = self._buffers[slot] = torch.empty(size, dtype=like.dtype, device=like.device)
        return buffer[:size].view(shape)

    def clear(self) -> None:
        self._buffers.clear()


def swish(x: torch.Tensor) -> torch.Tensor:
    """SiLU, in place when no gradient is recorded (planning): its backward needs the input, and a fresh
    [M, hidden, B] output per layer made it 40 % of a CaDM planner step here (in place: 1.5-1.9x faster step)."""
    return torch.nn.functional.silu(x, inplace=not torch.is_grad_enabled())


# Rows per model call in planner steps: [M, hidden, chunk] activations then stay in cache, which made
# the planner's 5 x 5000-row MountainCar step about 1.5x faster here (PerSim and CaDM). 256 rows
# measured the same within noise for PerSim's small models and 3-6 % slower at HalfCheetah sizes.
STEP_CHUNK = 512


def in_row_chunks(predict, rows: int) -> torch.Tensor:
    """``predict(slice)`` -> [M, r, ...] over consecutive STEP_CHUNK-row slices of ``rows``, joined along rows."""
    parts = [predict(slice(start, start + STEP_CHUNK)) for start in range(0, rows, STEP_CHUNK)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

# ReLU runs in place always (its backward needs only the output).
ACTIVATIONS = {"relu": torch.relu_, "swish": swish}


class EnsembleMLP(nn.Module):
    """M independent MLPs with the same layer sizes (ReLU, or swish as CaDM); no activation after the last layer."""

    def __init__(self, n_members: int, sizes: list[int], generator: torch.Generator | None = None,
                 activation: str = "relu"):
        super().__init__()
        self.layers = nn.ModuleList(
            EnsembleLinear(n_members, fan_in, fan_out, generator) for fan_in, fan_out in zip(sizes[:-1], sizes[1:]))
        self.activation = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, B, in] (or [B, in]) -> [M, B, out]."""
        return self.feature_major(x.transpose(-2, -1)).transpose(1, 2)

    def feature_major(self, x: torch.Tensor, workspace: Workspace | None = None,
                      first_weight: torch.Tensor | None = None) -> torch.Tensor:
        """x [M, in, B] (or [in, B]) -> [M, out, B]; hidden activations stay contiguous in this layout.

        With a ``workspace`` (no gradient) the layers write into two reused buffers in turn, and the
        result is one of them: use it before this MLP runs on the same workspace again.
        ``first_weight`` [M, out, in + 1]: the first layer's weight with its bias as a last column
        (``EnsembleLinear.with_bias_column``), for x [M, in + 1, B] whose last row is ones: that layer
        then writes its output once (baddbmm first copies the bias into it, as costly as the product
        itself when in is 2-4: 1.2x on a MountainCar planner decision).
        """
        members, rows = self.layers[0].weight.shape[0], x.shape[-1]
        for i, layer in enumerate(self.layers):
            out = None if workspace is None else workspace.get((id(self), i % 2), (members, layer.weight.shape[1], rows), x)
            if i == 0 and first_weight is not None:
                x = torch.bmm(first_weight, x, out=out)
            else:
                x = layer.feature_major(x, out)
            if i < len(self.layers) - 1:
                x = self.activation(x)  # in place (ReLU always, swish without gradient): no fresh [M, hidden, B]
        return x

    # Hand-written gradients (ReLU MLPs, no autograd): a small model's training step is per-op overhead
    # and memory traffic, and autograd's graph costs both (PerSim's MountainCar step: 1.6-1.7x faster by hand).

    def forward_keeping_inputs(self, x: torch.Tensor, workspace: Workspace) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``feature_major`` without autograd for x [M, in, B]; also returns each layer's input for ``backward``.
        Hidden activations live in ``workspace``: valid until this MLP's next call on it."""
        if self.activation is not torch.relu_:
            raise NotImplementedError("hand-written gradients are for ReLU MLPs")
        # A transposed view of the batch makes every product with it take a slow path (up to 10x at CartPole's sizes).
        inputs, rows, x = [], x.shape[-1], x.contiguous()
        for i, layer in enumerate(self.layers):
            inputs.append(x)
            hidden = i < len(self.layers) - 1
            out = workspace.get((id(self), "train", i), (*layer.weight.shape[:2], rows), x) if hidden else None
            x = torch.baddbmm(layer.bias.detach(), layer.weight.detach(), x, out=out)
            if hidden:
                x = x.relu_()
        return x, inputs

    def backward(self, inputs: list[torch.Tensor], grad: torch.Tensor, workspace: Workspace) -> None:
        """Set every layer's ``.grad`` from the gradient [M, out, B] of the output ``forward_keeping_inputs`` gave
        for these ``inputs`` (the inputs themselves need none)."""
        for i in reversed(range(len(self.layers))):
            layer, x = self.layers[i], inputs[i]
            # W's gradient g x^T [M, out, in]: MKL runs these skinny products 2-3x faster with the narrow
            # side as the output's rows (2 in-features: 26 us against 78 us at MountainCar's sizes).
            if layer.weight.shape[1] <= layer.weight.shape[2]:
                layer.weight.grad = torch.bmm(grad, x.transpose(1, 2))
            else:
                layer.weight.grad = torch.bmm(x, grad.transpose(1, 2)).transpose(1, 2).contiguous()
            layer.bias.grad = grad.sum(2, keepdim=True)
            if i == 0:
                return
            out = workspace.get((id(self), "grad", i % 2), x.shape, x)
            grad = torch.bmm(layer.weight.detach().transpose(1, 2), grad, out=out)
            # through the ReLU whose output is this layer's input, in place
            grad = torch.ops.aten.threshold_backward.grad_input(grad, x, 0.0, grad_input=grad)
