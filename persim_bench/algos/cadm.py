"""CaDM (Lee et al. 2020), the paper's model-based baseline, ported from the public TF code.

A context encoder reads an agent's last K real transitions (state delta, action) and outputs
a context vector c. Forward dynamics f(s, a, c) predict the normalised next-state delta and
backward dynamics b(s', a, c) the normalised previous-state delta; both read the same c, so
the encoder has to capture what makes this agent's dynamics differ. Each context is trained
on the next M transitions of its trajectory. Vanilla CaDM is one deterministic model; PE-TS
CaDM is an ensemble of probabilistic models (Gaussian, soft-bounded log-variance) planned with
trajectory sampling: particle p follows member p // (P / members) and draws a fresh sample
every step (TS-inf).

CaDM knows agents only through their recent transitions: after ``condition(obs, actions)`` on
E real episodes, the third argument of ``step`` indexes those episodes, not agent ids.
"""
from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Annotated, Callable, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from persim_bench.algos.nets import STEP_CHUNK, EnsembleMLP, SavedModel, in_row_chunks, register_data_box, set_data_box
from persim_bench.contracts import Algorithm, Checkpoints, Trial, TrialContext, TrialOutput
from persim_bench.costmodel import (CADM_STEP_SECONDS, LAYER_SECONDS, STEP_SECONDS, TRAIN, Dynamics, mlp_seconds,
                                    evaluation_seconds)
from persim_bench.data.dataset import Transitions
from persim_bench.envs import get_env
from persim_bench.evaluate import evaluate_model, load_trial_data, save_model, saved_model_loader
from persim_bench.specs import NonEmptyList, PositiveInt, Strict

if TYPE_CHECKING:
    from persim_bench.config import Grid

VALID_WINDOWS_CAP = 5000  # the public code validates on at most this many context windows
ROLLING_PERSISTENCY = 0.99


class CadmSpec(Strict):
    """CaDM (Lee et al. 2020) as the paper ran it (App. D.2); sizes as in the public code (younggyoseo/CaDM)."""

    # Past transitions the context encoder reads (K) and future transitions each context
    # is trained to predict (M).
    history: PositiveInt = 10
    future: PositiveInt = 10
    context_dim: PositiveInt = 10
    context_hidden: list[PositiveInt] = [256, 128, 64]
    hidden: list[PositiveInt] = [200, 200, 200, 200]
    # L2 penalty wd * 1/2 sum W^2: hidden layer i uses entry i, the output layer the last entry (so at
    # least one entry, even for [] hidden layers: the nets are then linear).
    weight_decay: NonEmptyList[Annotated[float, Field(ge=0)]] = [2.5e-5, 5e-5, 7.5e-5, 7.5e-5, 1e-4]
    context_weight_decay: NonEmptyList[Annotated[float, Field(ge=0)]] = [2.5e-5, 5e-5, 7.5e-5]
    back_coeff: Annotated[float, Field(ge=0)] = 0.5
    # PE-TS: probabilistic members and trajectory-sampling particles (a multiple of the members).
    pets_members: PositiveInt = 5
    pets_particles: PositiveInt = 20
    # Planning over particles: CaDM's mean return (public code); "min" would be PerSim's pessimism.
    aggregate: Literal["min", "mean"] = "mean"
    lr: Annotated[float, Field(gt=0)] = 1e-3
    batch_size: PositiveInt = 256
    # The paper's 100 training iterations; in the public code each is up to 5 epochs with early
    # stopping on a rolling validation loss over a fresh 10% split (at most 5000 windows).
    iterations: PositiveInt = 100
    epochs_per_iteration: PositiveInt = 5
    valid_split: Annotated[float, Field(ge=0, lt=1)] = 0.1

    @model_validator(mode="after")
    def _consistent(self) -> "CadmSpec":
        if self.pets_particles % self.pets_members:
            raise ValueError(f"pets_particles ({self.pets_particles}) must be a multiple of pets_members "
                             f"({self.pets_members})")
        for decays, hidden, name in ((self.weight_decay, self.hidden, "weight_decay"),
                                     (self.context_weight_decay, self.context_hidden, "context_weight_decay")):
            if len(decays) < len(hidden):
                raise ValueError(f"{name} needs an entry per hidden layer ({len(hidden)}), got {len(decays)}")
        return self


class CadmModel(SavedModel, nn.Module):
    """Context encoder + forward and backward dynamics, ``members`` copies; implements ``ContextualModel``."""

    FORMAT = "persim-cadm/1"

    def __init__(self, env: str, members: int, particles: int, probabilistic: bool, history: int = 10,
                 context_dim: int = 10, context_hidden: list[int] = (256, 128, 64),
                 hidden: list[int] = (200, 200, 200, 200), seed: int = 0):
        super().__init__()
        if particles % members:
            raise ValueError(f"particles ({particles}) must be a multiple of members ({members})")
        family = get_env(env)
        self.config = dict(env=env, members=int(members), particles=int(particles), probabilistic=bool(probabilistic),
                           history=int(history), context_dim=int(context_dim), context_hidden=list(context_hidden),
                           hidden=list(hidden), seed=int(seed))
        self.env, self.discrete, self.history = env, family.discrete, history
        self.members, self.n_members, self.probabilistic = members, particles, probabilistic
        self.obs_dim = d = family.obs_dim
        self.action_width = a = family.n_actions if family.discrete else family.action_dim
        gen = torch.Generator().manual_seed(seed)
        self.encoder = EnsembleMLP(members, [history * (d + a), *context_hidden, context_dim], gen)
        heads = 2 * d if probabilistic else d  # mean and log-variance
        self.forward_net = EnsembleMLP(members, [d + a + context_dim, *hidden, heads], gen, activation="swish")
        self.backward_net = EnsembleMLP(members, [d + a + context_dim, *hidden, d], gen, activation="swish")
        # Soft bounds of the log-variance, learned (PETS): start at 0.5 and -10.
        self.max_logvar = nn.Parameter(torch.full((d,), 0.5))
        self.min_logvar = nn.Parameter(torch.full((d,), -10.0))
        for name, width, fill in (("obs_mean", d, 0.0), ("obs_std", d, 1.0), ("delta_mean", d, 0.0),
                                  ("delta_std", d, 1.0), ("back_mean", d, 0.0), ("back_std", d, 1.0),
                                  ("act_mean", a, 0.0), ("act_std", a, 1.0),
                                  ("history_act_mean", history * a, 0.0), ("history_act_std", history * a, 1.0)):
            self.register_buffer(name, torch.full((width,), fill))
        register_data_box(self, d)
        # PE-TS sampling noise: a generator on the device the model computes on (remade there when it moves).
        self.noise_seed = seed + 1
        self.noise = torch.Generator().manual_seed(self.noise_seed)
        self.context: torch.Tensor | None = None  # [members, E, context_dim] after ``condition``

    @classmethod
    def from_spec(cls, spec: CadmSpec, env: str, probabilistic: bool, seed: int) -> "CadmModel":
        members, particles = (spec.pets_members, spec.pets_particles) if probabilistic else (1, 1)
        return cls(env, members, particles, probabilistic, spec.history, spec.context_dim, spec.context_hidden,
                   spec.hidden, seed)

    # --- features -----------------------------------------------------------------------------

    def action_features(self, action: torch.Tensor) -> torch.Tensor:
        """One-hot (discrete) or the raw vector (continuous): what histories store."""
        return nn.functional.one_hot(action.long(), self.action_width).float() if self.discrete else action.float()

    def dynamics_action(self, features: torch.Tensor) -> torch.Tensor:
        """Dynamics input from action features: z-scored when continuous (one-hot stays as is, as in the public code)."""
        return features if self.discrete else (features - self.act_mean) / self.act_std

    def context_input(self, delta: torch.Tensor, action: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Past deltas [..., K, D], action features [..., K, A], valid [..., K] -> encoder input [..., K * (D + A)].

        Missing history (before the episode start) is zero, as in the public code's padded
        buffers; deltas stay unnormalised there too (its ``state_diff`` mode), continuous
        actions are z-scored over whole windows, padding included.
        """
        mask = valid.unsqueeze(-1).to(delta.dtype)
        past_actions = (action * mask).flatten(-2)
        if not self.discrete:
            past_actions = (past_actions - self.history_act_mean) / self.history_act_std
        return torch.cat([(delta * mask).flatten(-2), past_actions], dim=-1)

    def predict(self, net: EnsembleMLP, obs: torch.Tensor, action: torch.Tensor, context: torch.Tensor):
        """(mean, bounded log-variance or None) of a normalised delta; obs [members, R, D] raw."""
        z = (obs - self.obs_mean) / self.obs_std
        out = net(torch.cat([z, action.expand(z.shape[0], *action.shape[-2:]), context], dim=-1))
        if net is self.backward_net or not self.probabilistic:
            return out, None
        mean, logvar = out.chunk(2, dim=-1)
        logvar = self.max_logvar - nn.functional.softplus(self.max_logvar - logvar)
        return mean, self.min_logvar + nn.functional.softplus(logvar - self.min_logvar)

    def set_normalizer(self, obs, delta, action_features, history_actions) -> None:
        """Mean/std of dynamics inputs and targets (and, continuous, of actions and action windows)."""
        stats = [("obs", obs), ("delta", delta), ("back", -delta)]
        if not self.discrete:
            stats += [("act", action_features), ("history_act", history_actions)]
        for prefix, values in stats:
            std = values.std(dim=0)
            getattr(self, f"{prefix}_mean").copy_(values.mean(dim=0))
            getattr(self, f"{prefix}_std").copy_(torch.where(std > 1e-8, std, torch.ones_like(std)))

    # --- the DynamicsModel / ContextualModel interface ------------------------------------------

    @torch.no_grad()
    def condition(self, obs: torch.Tensor, action: torch.Tensor) -> None:
        """Contexts of E episodes from their real past: obs [E, T+1, D], actions [E, T(, A)]; uses the last K."""
        device = self.obs_mean.device
        obs = torch.as_tensor(obs, dtype=torch.float32, device=device)
        features = self.action_features(torch.as_tensor(action, device=device))
        e, t, k = obs.shape[0], obs.shape[1] - 1, self.history
        delta = torch.zeros(e, k, self.obs_dim, device=device)
        past = torch.zeros(e, k, self.action_width, device=device)
        valid = torch.zeros(e, k, dtype=torch.bool, device=device)
        n = min(t, k)  # the newest n transitions fill the window's right end
        if n:
            delta[:, k - n:] = obs[:, t - n + 1:] - obs[:, t - n:t]
            past[:, k - n:] = features[:, t - n:].reshape(e, n, self.action_width)
            valid[:, k - n:] = True
        self.context = self.encoder(self.context_input(delta, past, valid))

    @torch.no_grad()
    def step(self, obs: torch.Tensor, action: torch.Tensor, episode: torch.Tensor) -> torch.Tensor:
        """obs [P, B, D] (P = particles), action [B], episode [B] (rows of the last ``condition``) -> [P, B, D]."""
        if self.context is None:
            raise RuntimeError("CaDM needs condition(obs, actions) on the real episodes before step()")
        p, b, d = obs.shape
        per = p // self.members
        state = obs.reshape(self.members, per * b, d)  # particle-major: member m owns particles m*per..
        action = self.dynamics_action(self.action_features(action)).repeat(per, 1)
        context = self.context[:, episode].repeat(1, per, 1)
        delta = in_row_chunks(lambda rows: self.sample_delta(state[:, rows], action[rows], context[:, rows]), per * b)
        return obs + (self.delta_mean + self.delta_std * delta).reshape(p, b, d)

    def sample_delta(self, state: torch.Tensor, action: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Normalised next-state delta: the forward net's mean, plus (PE-TS) a draw from its predicted variance."""
        mean, logvar = self.predict(self.forward_net, state, action, context)
        if logvar is None:
            return mean
        if self.noise.device != mean.device:  # the model moved since the generator was made
            self.noise = torch.Generator(device=mean.device).manual_seed(self.noise_seed)
        return mean + torch.randn(mean.shape, generator=self.noise, device=mean.device) * torch.exp(0.5 * logvar)


def episode_starts(data: Transitions) -> np.ndarray:
    """Index of the first row of each row's trajectory (rows are sorted by agent, t)."""
    n = len(data)
    first = np.ones(n, dtype=bool)
    first[1:] = (data.agent[1:] != data.agent[:-1]) | (data.t[1:] != data.t[:-1] + 1)
    return np.maximum.accumulate(np.where(first, np.arange(n), 0))


def history_windows(starts: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows t-K..t-1 of row t's own trajectory (oldest first) and which of them exist: both [N, K]."""
    index = np.arange(len(starts))[:, None] - k + np.arange(k)[None]
    valid = index >= starts[:, None]
    return np.where(valid, index, 0), valid


def context_pairs(starts: np.ndarray, future: int) -> tuple[np.ndarray, np.ndarray]:
    """(context row t, target row t + j) for j < M within one trajectory: each context predicts M transitions."""
    n = len(starts)
    target = np.arange(n)[:, None] + np.arange(future)[None]
    source = np.broadcast_to(np.arange(n)[:, None], target.shape)
    inside = target < n
    inside[inside] = starts[target[inside]] == starts[source[inside]]
    return source[inside], target[inside]


def fit_cadm(data: Transitions, spec: CadmSpec, seed: int, probabilistic: bool,
             on_epoch: Callable[[int, dict], None] | None = None,
             device: str | torch.device = "cpu", checkpoint: Checkpoints | None = None) -> tuple[CadmModel, dict]:
    """Train Vanilla (``probabilistic=False``) or PE-TS CaDM offline on ``data``, as the public code.

    ``spec.iterations`` times: draw a fresh validation split of context windows and fresh
    bootstrap samples per member (PE-TS), then up to ``epochs_per_iteration`` epochs, stopping
    early when the rolling validation loss rises. ``on_epoch(epoch, metrics)`` gets every epoch's
    losses, wall seconds and iteration: at paper size an iteration is minutes to hours (HalfCheetah: about
    96k gradient steps), an epoch a fifth of it. Every draw comes from ``seed`` (through a
    generator on ``device``, where the model trains and stays). ``checkpoint`` gets the state after
    every iteration and may hold one to resume from, continuing exactly as if never stopped.
    """
    if len(data) == 0:
        raise ValueError(f"{data.env}/{data.regime}: no transitions to train CaDM on")
    started = time.perf_counter()
    init_seed, data_seed = np.random.SeedSequence(seed).generate_state(2)
    model = CadmModel.from_spec(spec, data.env, probabilistic, int(init_seed))
    tensors = training_tensors(model, data, spec.future)  # on the CPU, then all moved once
    model.to(device)
    tensors = {name: tensor.to(device) for name, tensor in tensors.items()}
    source = tensors["source"]

    optimizer = torch.optim.Adam(model.parameters(), lr=spec.lr, fused=True)
    gen = torch.Generator(device=device).manual_seed(int(data_seed))
    n_windows, members = len(data), model.members
    metrics: dict = {}
    epochs_run = first = 0
    if checkpoint and checkpoint.resume:
        state = checkpoint.resume
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        first, epochs_run, metrics = state["iteration"] + 1, state["epochs_run"], state["metrics"]
    for iteration in range(first, spec.iterations):
        n_valid = min(int(n_windows * spec.valid_split), VALID_WINDOWS_CAP)
        held_out = torch.zeros(n_windows, dtype=torch.bool, device=device)
        held_out[torch.randperm(n_windows, generator=gen, device=device)[:n_valid]] = True
        train_pairs = torch.nonzero(~held_out[source]).squeeze(1)
        valid_pairs = torch.nonzero(held_out[source]).squeeze(1)
        n_train = len(train_pairs)
        # PE-TS members each see a bootstrap resample; a single model sees every pair.
        sample = (torch.randint(n_train, (members, n_train), generator=gen, device=device) if members > 1
                  else torch.arange(n_train, device=device)[None])
        rolling = previous = None
        for _ in range(spec.epochs_per_iteration):
            epoch_started = time.perf_counter()
            sample = sample.gather(1, torch.argsort(torch.rand(sample.shape, generator=gen, device=device), dim=1))
            total = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no sync per step
            model.train()
            for begin in range(0, n_train, spec.batch_size):
                pairs = train_pairs[sample[:, begin:begin + spec.batch_size]]
                total += train_step(model, optimizer, tensors, pairs, spec).double() * pairs.shape[1]
            epochs_run += 1
            metrics = {"train_loss": total.item() / (n_train * members)}
            rising = False
            if n_valid:
                with torch.no_grad():
                    recon, forward_mse = _losses(model, tensors, valid_pairs.expand(members, -1), spec.back_coeff)
                loss_now = recon.item() / members
                metrics.update(val_loss=loss_now, val_forward_mse=forward_mse.item() / members)
                # The public code's early stop: a rolling average of the validation loss that rises.
                if rolling is None:
                    rolling, previous = ((1.5 * loss_now, 2 * loss_now) if loss_now >= 0
                                         else (loss_now / 1.5, loss_now / 2))
                rolling = ROLLING_PERSISTENCY * rolling + (1 - ROLLING_PERSISTENCY) * loss_now
                rising, previous = previous < rolling, rolling
            if on_epoch:
                on_epoch(epochs_run - 1, {**metrics, "iteration": iteration + 1,
                                          "epoch_seconds": time.perf_counter() - epoch_started})
            if rising:
                break
        if checkpoint:
            checkpoint.offer(lambda: {"iteration": iteration, "epochs_run": epochs_run, "metrics": metrics,
                                      "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                      "generator": gen.get_state()}, last=iteration == spec.iterations - 1)
    model.eval()
    return model, {**metrics, "epochs": epochs_run, "fit_seconds": time.perf_counter() - started}


def training_tensors(model: CadmModel, data: Transitions, future: int) -> dict[str, torch.Tensor]:
    """The dataset as tensors plus its history windows and (context, target) pairs; sets the model's normaliser."""
    starts = episode_starts(data)
    window, window_valid = (torch.as_tensor(x) for x in history_windows(starts, model.history))
    source, target = (torch.as_tensor(x) for x in context_pairs(starts, future))
    obs = torch.as_tensor(data.obs, dtype=torch.float32)
    next_obs = torch.as_tensor(data.next_obs, dtype=torch.float32)
    delta = next_obs - obs
    features = model.action_features(torch.as_tensor(data.action))
    model.set_normalizer(obs, delta, features, (features[window] * window_valid.unsqueeze(-1)).flatten(1))
    set_data_box(model, obs, next_obs)
    return dict(obs=obs, next_obs=next_obs, delta=delta, features=features, window=window,
                window_valid=window_valid, source=source, target=target)


def row_contexts(model: CadmModel, tensors: dict, rows: torch.Tensor) -> torch.Tensor:
    """Contexts of dataset rows (index tensor [members, B] or [B]) from their trajectory's K previous transitions."""
    window = tensors["window"][rows]
    return model.encoder(model.context_input(tensors["delta"][window], tensors["features"][window],
                                             tensors["window_valid"][rows]))


def _losses(model: CadmModel, tensors: dict, pairs: torch.Tensor, back_coeff: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(forward loss + back_coeff * backward MSE, forward MSE), each summed over members; pairs [members, B]."""
    target = tensors["target"][pairs]
    context = row_contexts(model, tensors, tensors["source"][pairs])
    obs, next_obs = tensors["obs"][target], tensors["next_obs"][target]
    action = model.dynamics_action(tensors["features"][target])
    mean, logvar = model.predict(model.forward_net, obs, action, context)
    error = (mean - (tensors["delta"][target] - model.delta_mean) / model.delta_std).square()
    forward_mse = error.mean(dim=(1, 2)).sum()
    forward = forward_mse if logvar is None else (error * torch.exp(-logvar) + logvar).mean(dim=(1, 2)).sum()
    back, _ = model.predict(model.backward_net, next_obs, action, context)
    back_target = (-tensors["delta"][target] - model.back_mean) / model.back_std
    backward = (back - back_target).square().mean(dim=(1, 2)).sum()
    return forward + back_coeff * backward, forward_mse


def train_step(model: CadmModel, optimizer: torch.optim.Optimizer, tensors: dict, pairs: torch.Tensor,
               spec: CadmSpec) -> torch.Tensor:
    """One gradient step on (context, target) pairs [members, batch]; returns the reconstruction loss (detached)."""
    recon, _ = _losses(model, tensors, pairs, spec.back_coeff)
    loss = recon + _weight_penalty(model, spec)
    if model.probabilistic:
        loss = loss + 0.01 * (model.max_logvar.sum() - model.min_logvar.sum())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return recon.detach()


def _weight_penalty(model: CadmModel, spec: CadmSpec) -> torch.Tensor:
    """wd * 1/2 sum W^2 per layer: hidden layer i uses decay i, the output layer the last decay."""
    total = torch.zeros(())
    for net, decays in ((model.forward_net, spec.weight_decay), (model.backward_net, spec.weight_decay),
                        (model.encoder, spec.context_weight_decay)):
        for i, layer in enumerate(net.layers):
            decay = decays[-1] if i == len(net.layers) - 1 else decays[i]
            total = total + 0.5 * decay * layer.weight.square().sum()
    return total


# ---------------------------------------------------------------- trials


def run_cadm(trial: Trial, spec: CadmSpec, ctx: TrialContext) -> TrialOutput:
    """Vanilla or PE-TS CaDM: fit offline, then the shared evaluation with CaDM's particle aggregation."""
    costs: dict = {}
    data = load_trial_data(trial, ctx, costs)
    model, fit_metrics = fit_cadm(
        data, spec, trial.seed, probabilistic=trial.algo == "cadm_pets", device=ctx.device,
        on_epoch=lambda epoch, m: ctx.report({"stage": "fit", "epoch": epoch + 1, **m}), checkpoint=ctx.checkpoints)
    fitted = TrialOutput(fit_metrics, costs, models=[save_model(model, ctx)])
    return fitted | evaluate_cadm(model, trial, spec, ctx)


def evaluate_cadm(model: CadmModel, trial: Trial, spec: CadmSpec, ctx: TrialContext) -> TrialOutput:
    """The shared evaluation, planned with CaDM's particle aggregation."""
    return evaluate_model(model, trial, ctx, ctx.planner.model_copy(update={"aggregate": spec.aggregate}))


# ---------------------------------------------------------------- cost (--dry-run)


def cadm_nets(grid: "Grid", env: str, probabilistic: bool) -> tuple[tuple[int, ...], ...]:
    """(context encoder (ReLU), forward dynamics, backward dynamics (both swish))."""
    family, spec = get_env(env), grid.cadm
    d = family.obs_dim
    a = family.n_actions if family.discrete else family.action_dim
    inputs = d + a + spec.context_dim
    return ((spec.history * (d + a), *spec.context_hidden, spec.context_dim),
            (inputs, *spec.hidden, 2 * d if probabilistic else d), (inputs, *spec.hidden, d))


def cadm_step_seconds(grid: "Grid", env: str, probabilistic: bool, rate: float) -> float:
    """One gradient step: a batch of (context, target) pairs through every member's nets, forward and backward."""
    spec = grid.cadm
    members = spec.pets_members if probabilistic else 1
    nets = cadm_nets(grid, env, probabilistic)
    # The weight penalty touches every layer once more per step (forward and backward).
    seconds = STEP_SECONDS["cadm"] + TRAIN * sum(len(net) - 1 for net in nets) * LAYER_SECONDS
    return seconds + sum(mlp_seconds(net, spec.batch_size * members, 1, rate, TRAIN, swish)
                         for net, swish in zip(nets, (False, True, True)))


def cadm_fit_seconds(grid: "Grid", env: str, rows: int, probabilistic: bool, rate: float) -> float:
    spec = grid.cadm
    members = spec.pets_members if probabilistic else 1
    n_valid = min(int(rows * spec.valid_split), VALID_WINDOWS_CAP)
    train_pairs, valid_pairs = (rows - n_valid) * spec.future, n_valid * spec.future
    epochs = spec.iterations * spec.epochs_per_iteration
    seconds = epochs * math.ceil(train_pairs / spec.batch_size) * cadm_step_seconds(grid, env, probabilistic, rate)
    for net, swish in zip(cadm_nets(grid, env, probabilistic), (False, True, True)):
        seconds += mlp_seconds(net, epochs * valid_pairs * members, epochs, rate, swish=swish)
    return seconds


def cadm_dynamics(grid: "Grid", env: str, probabilistic: bool) -> Dynamics:
    """What one model step costs: every particle's row through the forward net, the context encoder per decision."""
    encoder, forward, _ = cadm_nets(grid, env, probabilistic)
    particles = grid.cadm.pets_particles if probabilistic else 1
    members = grid.cadm.pets_members if probabilistic else 1
    # CaDM's step chunks STEP_CHUNK rows per net member, i.e. particles / members rows per state.
    chunk = max(1, STEP_CHUNK * members // particles)
    return Dynamics(env, (forward,), particles, chunk, encoder=encoder, swish=True, call_seconds=CADM_STEP_SECONDS)


def cadm_trial_seconds(grid: "Grid", trial: Trial, rows: int, rate: float) -> float:
    probabilistic = trial.algo == "cadm_pets"
    fit = cadm_fit_seconds(grid, trial.env, rows, probabilistic, rate)
    return fit + evaluation_seconds(grid, trial.env, cadm_dynamics(grid, trial.env, probabilistic), rate)


ALGORITHMS = [
    Algorithm("cadm_vanilla", "Vanilla CaDM", run_cadm, "cadm", CadmSpec, learns_dynamics=True, plans=True,
              cost=cadm_trial_seconds, reload=saved_model_loader(CadmModel), evaluate=evaluate_cadm),
    Algorithm("cadm_pets", "PE-TS CaDM", run_cadm, "cadm", CadmSpec, learns_dynamics=True, plans=True,
              cost=cadm_trial_seconds, reload=saved_model_loader(CadmModel), evaluate=evaluate_cadm),
]
