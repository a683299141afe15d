"""PerSim (paper Sec. 5, App. D.1): personalised simulators from a low-rank latent factor model.

The next-state delta of agent n in state s under action a is modelled as

    delta_d = sum_l u_l(n) * v_l(s, d) * w_l(a),    l = 1..r

with three encoders that share no edges: u = agent factors (one linear layer on the one-hot
agent id, i.e. a table), v = state MLP -> D x r, w = action factors (a table on the one-hot
action when discrete, an MLP when continuous). Data of all agents trains v and w; each agent
only has to pin down its r numbers u(n), which is what makes one trajectory per agent enough.

The M ensemble members are one batched module (weights [M, ...]) trained in one
forward/backward per step; each member sees its own minibatch order, as in the authors' code.
"""
from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Annotated, Callable, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from torch import nn

from persim_bench.algos.nets import (
    STEP_CHUNK, EnsembleMLP, SavedModel, Workspace, in_row_chunks, register_data_box, set_data_box,
)
from persim_bench.contracts import AgentFactors, Algorithm, Checkpoints, PreStage, Trial, TrialContext, TrialOutput
from persim_bench.costmodel import PERSIM_CHUNK_SECONDS, STEP_SECONDS, TRAIN, Dynamics, evaluation_seconds, mlp_seconds
from persim_bench.data.dataset import Transitions
from persim_bench.envs import get_env
from persim_bench.evaluate import evaluate_model, load_trial_data, save_model, saved_model_loader
from persim_bench.specs import DistinctList, PositiveInt, Strict, known_env_keys, per_env

if TYPE_CHECKING:
    from persim_bench.config import Grid

class PersimSpec(Strict):
    """PerSim's model and training (paper App. D.1). Defaults are the paper's."""

    per_env_fields: ClassVar[tuple[str, ...]] = ("rank", "state_hidden", "normalize", "lr_halving_epochs", "bootstrap")
    # "cv": the rank_cv stage picks it per env x regime from rank_grid (the paper); or pin it,
    # once for all envs or per env (the paper's picks: 3 / 5 / 20).
    rank: Literal["cv"] | PositiveInt | dict[str, PositiveInt] = "cv"
    rank_grid: DistinctList[PositiveInt] = [3, 5, 10, 15, 20, 30]
    # Share of transitions (random rows) held out to score each rank.
    cv_holdout: Annotated[float, Field(gt=0, lt=1)] = 0.2
    # The pick: the smallest rank whose held-out loss is within (1 + cv_tolerance) x the lowest.
    # Past the true rank the curve is flat and its minimum is noise; 0 takes the plain minimum.
    cv_tolerance: Annotated[float, Field(ge=0)] = 0.5
    # Cross-validate once per env x regime (with the grid's first seed) or once per seed.
    cv_per_seed: bool = False
    # The main stage also trains and evaluates PerSim at every rank of rank_grid (the full grid).
    sweep_ranks: bool = False
    ensemble: PositiveInt = 5
    epochs: PositiveInt = 300
    batch_size: PositiveInt = 256
    lr: Annotated[float, Field(gt=0)] = 1e-3
    # State encoder hidden layers (paper: one layer of 256 for MountainCar/CartPole, (256, 512, 512) for HalfCheetah);
    # [] = a linear encoder (EnsembleMLP), as [] for action_hidden.
    state_hidden: list[PositiveInt] | dict[str, list[PositiveInt]] = {
        "mountaincar": [256], "cartpole": [256], "halfcheetah": [256, 512, 512]}
    # Action encoder hidden layers for continuous actions (discrete actions: one linear layer on the one-hot).
    action_hidden: list[PositiveInt] = [256, 256]
    # z-score states and deltas before fitting (authors' code: HalfCheetah only; paper: silent).
    normalize: bool | dict[str, bool] = True
    # Halve the learning rate every this many epochs, once for all envs or per env (null: constant)
    # (authors' code: 150; paper: no schedule).
    lr_halving_epochs: PositiveInt | None | dict[str, PositiveInt | None] = None
    # Each member trains on its own bootstrap resample of the transitions, as PE-TS CaDM's members do,
    # so that members may disagree where the data are thin and the planner's minimum sees it
    # (paper and authors' code: every member sees every transition; beyond the paper, off by default).
    bootstrap: bool | dict[str, bool] = False

    @field_validator("rank", "state_hidden", "normalize", "lr_halving_epochs", "bootstrap")
    @classmethod
    def _env_keys(cls, value):
        return known_env_keys(value)


class PerSimEnsemble(SavedModel, nn.Module):
    """M PerSim simulators over one env's agents; implements ``DynamicsModel``.

    ``agent_factor=False`` replaces u(n) by one learned vector shared by all agents: the
    same network without personalisation (the ablation "a model without the agent factor").
    """

    FORMAT = "persim-ensemble/1"

    def __init__(self, env: str, n_agents: int, rank: int, n_members: int = 5, state_hidden: list[int] = (256,),
                 action_hidden: list[int] = (256, 256), normalize: bool = True, agent_factor: bool = True, seed: int = 0):
        super().__init__()
        family = get_env(env)
        self.config = dict(env=env, n_agents=int(n_agents), rank=int(rank), n_members=int(n_members),
                           state_hidden=list(state_hidden), action_hidden=list(action_hidden),
                           normalize=bool(normalize), agent_factor=bool(agent_factor), seed=int(seed))
        self.env, self.n_members, self.rank, self.obs_dim = env, n_members, rank, family.obs_dim
        self.discrete = family.discrete
        gen = torch.Generator().manual_seed(seed)
        # One-hot tables initialised like nn.Linear on a one-hot input (authors' code: Linear(n_agents -> r)).
        self.agent_table = nn.Parameter(_uniform((n_members, n_agents if agent_factor else 1, rank), n_agents, gen))
        self.state_encoder = EnsembleMLP(n_members, [family.obs_dim, *state_hidden, family.obs_dim * rank], gen)
        if self.discrete:
            self.action_table = nn.Parameter(_uniform((n_members, family.n_actions, rank), family.n_actions, gen))
        else:
            self.action_encoder = EnsembleMLP(n_members, [family.action_dim, *action_hidden, rank], gen)
        # z-scoring statistics (identity unless ``set_normalizer`` is called); saved with the weights.
        for name, fill in (("obs_mean", 0.0), ("obs_std", 1.0), ("delta_mean", 0.0), ("delta_std", 1.0)):
            self.register_buffer(name, torch.full((family.obs_dim,), fill))
        register_data_box(self, family.obs_dim)

    @classmethod
    def from_spec(cls, spec: PersimSpec, env: str, n_agents: int, seed: int, agent_factor: bool = True) -> "PerSimEnsemble":
        return cls(env, n_agents, per_env(spec.rank, env), spec.ensemble, per_env(spec.state_hidden, env),
                   spec.action_hidden, per_env(spec.normalize, env), agent_factor, seed)

    def set_normalizer(self, obs: torch.Tensor, delta: torch.Tensor) -> None:
        """Use these rows' mean/std for inputs and targets; constant columns keep scale 1."""
        for prefix, values in (("obs", obs), ("delta", delta)):
            std = values.std(dim=0)
            getattr(self, f"{prefix}_mean").copy_(values.mean(dim=0))
            getattr(self, f"{prefix}_std").copy_(torch.where(std > 1e-8, std, torch.ones_like(std)))

    def normalized(self, obs: torch.Tensor, delta: torch.Tensor | None = None):
        """Raw states (and deltas) -> the scale the network works in."""
        obs_z = (obs - self.obs_mean) / self.obs_std
        return obs_z if delta is None else (obs_z, (delta - self.delta_mean) / self.delta_std)

    def forward(self, obs_z: torch.Tensor, action: torch.Tensor, agent: torch.Tensor) -> torch.Tensor:
        """Normalised delta [M, B, D] from normalised states [M, B, D] or [B, D] (shared by members).

        ``action`` / ``agent`` are [B] (shared) or [M, B] (per member, as in training).
        """
        v = self.state_encoder.feature_major(obs_z.transpose(-2, -1))     # [M, D * r, B]
        u = self._lookup(self.agent_table, agent)                          # [M, B, r] or [M, 1, r]
        w = self._lookup(self.action_table, action) if self.discrete else self.action_encoder(action)
        coef = (u * w).transpose(1, 2).unsqueeze(1)                        # [M, 1, r, B]
        return (v.unflatten(1, (self.obs_dim, self.rank)) * coef).sum(2).transpose(1, 2)

    def loss_and_gradients(self, obs_z: torch.Tensor, action: torch.Tensor, agent: torch.Tensor,
                           target: torch.Tensor) -> torch.Tensor:
        """The training loss on member-batched rows, with every parameter's ``.grad`` set by hand (no autograd).

        obs_z / target (normalised) [M, B, D], agent [M, B], action [M, B] (discrete) or [M, B, A]: member m's
        rows in row m. The loss is the sum over members of each one's mean squared error, so each member gets
        exactly the gradient of its own fit. Equal to autograd's (``autograd_train_step``) up to floating-point
        reordering (tested); 1.6-1.7x faster per MountainCar step here, 1.1-1.35x CartPole (docs/benchmarks.md).
        """
        m, b, d = target.shape
        ws = self.__dict__.setdefault("_workspace", Workspace())
        v, state_inputs = self.state_encoder.forward_keeping_inputs(obs_z.transpose(1, 2), ws)  # [M, D * r, B]
        u, agent_rows = self._rows(self.agent_table, agent)                                    # [M, B, r]
        if self.discrete:
            w, action_rows = self._rows(self.action_table, action)
        else:
            w, action_inputs = self.action_encoder.forward_keeping_inputs(action.transpose(1, 2), ws)
            w = w.transpose(1, 2)
        coef = (u * w).transpose(1, 2).contiguous()                                             # [M, r, B]
        v = v.view(m, d, self.rank, b)
        error = (v * coef.unsqueeze(1)).sum(2).sub_(target.transpose(1, 2))                    # [M, D, B]
        loss = error.square().sum() / (b * d)
        grad_delta = error.mul_(2.0 / (b * d))
        self.state_encoder.backward(state_inputs, (grad_delta.unsqueeze(2) * coef.unsqueeze(1)).view(m, -1, b), ws)
        grad_coef = (grad_delta.unsqueeze(2) * v).sum(1).transpose(1, 2)                       # [M, B, r]
        self.agent_table.grad = _table_gradient(self.agent_table, agent_rows, grad_coef * w)
        if self.discrete:
            self.action_table.grad = _table_gradient(self.action_table, action_rows, grad_coef * u)
        else:
            self.action_encoder.backward(action_inputs, (grad_coef * u).transpose(1, 2), ws)
        return loss

    @staticmethod
    def _rows(table: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [M, B, r] of a per-member table [M, n, r] for ids [M, B], and their flat row numbers in it."""
        members, n, r = table.shape
        flat = (torch.arange(members, device=index.device)[:, None] * n + (index if n > 1 else 0 * index)).view(-1)
        return table.detach().view(-1, r).index_select(0, flat).view(members, -1, r), flat

    @staticmethod
    def _lookup(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if table.shape[1] == 1:  # the shared vector of the no-agent-factor ablation
            return table
        if index.dim() == 1:
            return table[:, index]
        return table[torch.arange(len(table), device=table.device)[:, None], index]

    def step(self, obs: torch.Tensor, action: torch.Tensor, agent: torch.Tensor) -> torch.Tensor:
        """obs [M, B, D] raw, action [B] long or [B, A], agent [B] long -> next obs [M, B, D] raw.

        Without gradient (planning, prediction) every intermediate lives in a reused workspace and
        the result is the only fresh tensor: the same arithmetic, without a page-faulting
        allocation per layer and chunk (``nets.Workspace``). Only the state encoder runs in chunks
        of ``step_chunk`` rows (and a continuous action encoder), so their [M, hidden, chunk] activations
        stay in cache; normalisation, table lookups and the output's scaling run once for all rows
        (a MountainCar chunk is small enough that per-op overhead counts).
        """
        if torch.is_grad_enabled():
            delta = in_row_chunks(lambda rows: self(self.normalized(obs[:, rows]), action[rows], agent[rows]),
                                  obs.shape[1])
            return obs + self.delta_mean + self.delta_std * delta
        ws = self.__dict__.setdefault("_workspace", Workspace())  # not a module attribute: never saved or moved
        m, b, d = obs.shape
        # Normalised states, feature-major, with a row of ones that carries the first layer's bias.
        obs_z = ws.get("obs", (m, d + 1, b), obs)
        torch.sub(obs.transpose(1, 2), self.obs_mean[:, None], out=obs_z[:, :d]).div_(self.obs_std[:, None])
        obs_z[:, d].fill_(1.0)
        first_weight = self.state_encoder.layers[0].with_bias_column()                     # [M, hidden, D + 1]
        # Table lookups are cheap once for all rows; the continuous action encoder is an MLP, run per chunk.
        coef = self._coefficients(action, agent, ws) if self.discrete else None            # [M, r, B]
        delta = ws.get("delta", (m, d, b), obs)
        chunk = step_chunk(self.config["state_hidden"])
        for start in range(0, b, chunk):
            rows = slice(start, start + chunk)
            chunk_coef = coef[..., rows] if self.discrete else self._coefficients(action[rows], agent[rows], ws)
            v = self.state_encoder.feature_major(obs_z[..., rows], ws, first_weight)       # [M, D * r, chunk]
            products = v.view(m, d, self.rank, -1).mul_(chunk_coef.unsqueeze(1))
            torch.sum(products, 2, out=delta[..., rows])
        return (obs + self.delta_mean).add_(delta.mul_(self.delta_std[:, None]).transpose(1, 2))

    def _coefficients(self, action: torch.Tensor, agent: torch.Tensor, ws: Workspace) -> torch.Tensor:
        """u(agent) * w(action), feature-major [M, r, B], in the workspace (valid until it is asked for again)."""
        m, b = self.n_members, len(agent)
        if self.discrete:
            w = torch.index_select(self.action_table, 1, action, out=ws.get("w", (m, b, self.rank), self.action_table))
            w = w.transpose(1, 2)
        else:
            w = self.action_encoder.feature_major(action.transpose(0, 1), ws)             # [M, r, B]
        if self.agent_table.shape[1] == 1:  # the no-agent-factor ablation: one shared u
            return w.mul_(self.agent_table.transpose(1, 2))
        u = torch.index_select(self.agent_table, 1, agent, out=ws.get("u", (m, b, self.rank), self.agent_table))
        return w.mul_(u.transpose(1, 2))

    def __getstate__(self):  # pickles and deep copies leave the scratch workspace behind
        state = self.__dict__.copy()
        state.pop("_workspace", None)
        return state

    def agent_factors(self) -> np.ndarray:
        """Learned u(n) for every member and agent, [M, n_agents, r] (Figure 1's t-SNE input)."""
        table = self.agent_table.detach().cpu()
        return table.expand(-1, self.config["n_agents"], -1).numpy().copy()


def step_chunk(state_hidden: list[int]) -> int:
    """Rows per state-encoder call in a planner step, for a state encoder with these hidden layer widths.

    256 rows keep a small model's [5, 256, chunk] activation (1.3 MB) in the 2 MB L2: MountainCar's
    planner at 0.47 of its roofline against 0.36 at 512 rows (`persim-bench bench small`, one thread);
    HalfCheetah's 512-wide layers are 3-6 % faster at 512.
    """
    return STEP_CHUNK // 2 if max(state_hidden, default=0) <= 256 else STEP_CHUNK


def _table_gradient(table: torch.Tensor, flat_rows: torch.Tensor, grad_rows: torch.Tensor) -> torch.Tensor:
    """Gradient of a lookup table from its looked-up rows' gradients [M, B, r] (repeated rows add up)."""
    r = table.shape[-1]
    return torch.zeros_like(table).view(-1, r).index_add_(0, flat_rows, grad_rows.reshape(-1, r)).view_as(table)


def _uniform(shape: tuple[int, ...], fan_in: int, gen: torch.Generator) -> torch.Tensor:
    bound = fan_in ** -0.5
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


def fit_persim(data: Transitions, spec: PersimSpec, seed: int, *, holdout: float = 0.0,
               on_epoch: Callable[[int, dict], None] | None = None, device: str | torch.device = "cpu",
               agent_factor: bool = True, checkpoint: Checkpoints | None = None) -> tuple[PerSimEnsemble, dict]:
    """Train spec.ensemble PerSim members on ``data`` (paper Algorithm 1), all in one batched model.

    ``holdout`` keeps that fraction of transitions out of training (random rows, as in the
    paper's rank cross-validation) and reports ``val_loss`` on them. Losses are mean squared
    errors of the (normalised) delta, averaged over members. ``on_epoch(epoch, metrics)`` gets
    train_loss, lr (of that epoch), val_loss and the epoch's wall seconds after every epoch. With
    ``spec.bootstrap`` each member trains on its own resample (with replacement) of the training
    rows. Every random draw derives from ``seed``. Returns the model in eval mode and the final
    metrics (+ fit_seconds).
    ``checkpoint`` gets the training state after every epoch and may hold one to resume from:
    the fit then continues after that epoch exactly as if it had never stopped.
    """
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    if len(data) and not 0 <= data.agent.min() <= data.agent.max() < data.n_agents:
        raise ValueError(f"{data.env}/{data.regime}: agent ids must lie in [0, {data.n_agents}) (one covariate row per agent)")
    started = time.perf_counter()
    split_seed, init_seed, shuffle_seed, bootstrap_seed = np.random.SeedSequence(seed).generate_state(4)
    order = np.random.default_rng(split_seed).permutation(len(data))
    n_val = int(round(holdout * len(data)))
    val_rows, train_rows = torch.as_tensor(order[:n_val], device=device), torch.as_tensor(order[n_val:], device=device)
    if len(train_rows) == 0:
        raise ValueError("no transitions left to train on")

    model = PerSimEnsemble.from_spec(spec, data.env, data.n_agents, int(init_seed), agent_factor).to(device)
    obs = torch.as_tensor(data.obs, dtype=torch.float32, device=device)
    delta = torch.as_tensor(data.next_obs, dtype=torch.float32, device=device) - obs
    if model.config["normalize"]:
        model.set_normalizer(obs[train_rows], delta[train_rows])
    set_data_box(model, obs[train_rows], obs[train_rows] + delta[train_rows])
    obs_z, target = model.normalized(obs, delta)  # once for the whole dataset, not per step
    action = torch.as_tensor(data.action, device=device)
    action = action.long() if model.discrete else action.float()
    agent = torch.as_tensor(data.agent, dtype=torch.long, device=device)

    optimizer = torch.optim.Adam(model.parameters(), lr=spec.lr, fused=True)  # one kernel: ~10% per step on CPU
    halving_epochs = per_env(spec.lr_halving_epochs, data.env)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, halving_epochs, gamma=0.5) if halving_epochs else None
    shuffle = torch.Generator(device=device).manual_seed(int(shuffle_seed))
    members, n_train = model.n_members, len(train_rows)
    member_rows = train_rows.expand(members, -1)  # [M, n_train]: the rows each member trains on
    if per_env(spec.bootstrap, data.env):
        resample = torch.Generator(device=device).manual_seed(int(bootstrap_seed))
        member_rows = train_rows[torch.randint(n_train, (members, n_train), generator=resample, device=device)]
    metrics: dict = {}
    first = 0
    if checkpoint and checkpoint.resume:
        state = checkpoint.resume
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if schedule:
            schedule.load_state_dict(state["schedule"])
        shuffle.set_state(state["shuffle"])
        first, metrics = state["epoch"] + 1, state["metrics"]
    model.train()
    for epoch in range(first, spec.epochs):
        epoch_started = time.perf_counter()
        # An independent permutation per member: row perm[m, i] is member m's i-th sample.
        draws = torch.rand(members, n_train, generator=shuffle, device=device)
        perm = member_rows.gather(1, torch.argsort(draws, dim=1))
        shuffled = [values[perm] for values in (obs_z, action, agent, target)]  # one gather per epoch, not per step
        total, lr = torch.zeros((), device=device), optimizer.param_groups[0]["lr"]
        for start in range(0, n_train, spec.batch_size):
            batch = [values[:, start:start + spec.batch_size] for values in shuffled]
            total += train_step(model, optimizer, *batch) * batch[0].shape[1]
        if schedule:
            schedule.step()
        metrics = {"train_loss": total.item() / (n_train * members), "lr": lr}
        if n_val:
            metrics["val_loss"] = _loss(model, obs_z[val_rows], action[val_rows], agent[val_rows], target[val_rows])
        if on_epoch:
            on_epoch(epoch, {**metrics, "epoch_seconds": time.perf_counter() - epoch_started})
        if checkpoint:
            checkpoint.offer(lambda: {"epoch": epoch, "metrics": metrics, "model": model.state_dict(),
                                      "optimizer": optimizer.state_dict(), "shuffle": shuffle.get_state(),
                                      "schedule": schedule.state_dict() if schedule else None},
                             last=epoch == spec.epochs - 1)
    model.eval()
    return model, {**metrics, "fit_seconds": time.perf_counter() - started}


def train_step(model: PerSimEnsemble, optimizer: torch.optim.Optimizer, obs_z: torch.Tensor, action: torch.Tensor,
               agent: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One gradient step of every member on its own rows (inputs [M, batch, ...]); returns the loss."""
    with torch.no_grad():
        loss = model.loss_and_gradients(obs_z, action, agent, target)
        optimizer.step()
    return loss


def autograd_train_step(model: PerSimEnsemble, optimizer: torch.optim.Optimizer, obs_z: torch.Tensor,
                        action: torch.Tensor, agent: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``train_step`` through autograd: the reference its hand-written gradients are tested and benchmarked against."""
    loss = (model(obs_z, action, agent) - target).square().mean(dim=(1, 2)).sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


@torch.no_grad()
def _loss(model: PerSimEnsemble, obs_z, action, agent, target, chunk: int = 16384) -> float:
    """Mean squared normalised-delta error over rows and members, in chunks to bound memory."""
    total = 0.0
    for start in range(0, len(target), chunk):
        part = slice(start, start + chunk)
        total += (model(obs_z[part], action[part], agent[part]) - target[part]).square().mean(dim=2).sum().item()
    return total / (len(target) * model.n_members)


# ---------------------------------------------------------------- trials


def fit_at_trial_rank(data: Transitions, trial: Trial, spec: PersimSpec, ctx: TrialContext, holdout: float = 0.0,
                      agent_factor: bool = True):
    """``fit_persim`` as a trial runs it: at the trial's rank and seed, reporting epochs, checkpointing."""
    if trial.rank is None:
        raise ValueError(f"{trial.env}/{trial.regime}: rank_cv chose no rank (all its trials failed)")
    return fit_persim(data, spec.model_copy(update={"rank": trial.rank}), trial.seed, holdout=holdout,
                      on_epoch=lambda epoch, m: ctx.report({"stage": "fit", "epoch": epoch + 1, **m}),
                      device=ctx.device, agent_factor=agent_factor, checkpoint=ctx.checkpoints)


def run_persim(trial: Trial, spec: PersimSpec, ctx: TrialContext) -> TrialOutput:
    """Fit the ensemble at the trial's rank (rank_cv's pick or a pinned one), then the shared evaluation.

    Returns the agent factors too: the paper's Figure 1 (probe R^2 and t-SNE, drawn by ``analysis``).
    """
    costs: dict = {}
    data = load_trial_data(trial, ctx, costs)
    model, fit_metrics = fit_at_trial_rank(data, trial, spec, ctx)
    factors = AgentFactors(model.agent_factors(), data.covariates, tuple(get_env(trial.env).covariate_names),
                           f"PerSim agent factors, {trial.env} / {trial.regime} (rank {trial.rank}, seed {trial.seed})")
    fitted = TrialOutput(fit_metrics, costs, models=[save_model(model, ctx)], factors=factors)
    return fitted | evaluate_model(model, trial, ctx)


def run_persim_without_factors(trial: Trial, spec: PersimSpec, ctx: TrialContext) -> TrialOutput:
    """The ablation: PerSim with one learned factor vector shared by all agents instead of u(n) per agent
    (the same networks, rank and training), i.e. one simulator for every agent. What it loses against
    PerSim is the value of personalisation, measured instead of assumed."""
    costs: dict = {}
    data = load_trial_data(trial, ctx, costs)
    model, fit_metrics = fit_at_trial_rank(data, trial, spec, ctx, agent_factor=False)
    return TrialOutput(fit_metrics, costs, models=[save_model(model, ctx)]) | evaluate_model(model, trial, ctx)


# ---------------------------------------------------------------- the rank_cv stage (paper App. D.1)


def cross_validate_rank(trial: Trial, spec: PersimSpec, ctx: TrialContext) -> TrialOutput:
    """One candidate rank of the paper's cross-validation: PerSim fitted with a share of transitions held out.

    Its held-out loss per epoch is the curve ``fit/val_loss`` the trial logs as it trains.
    """
    costs: dict = {}
    data = load_trial_data(trial, ctx, costs)
    _, metrics = fit_at_trial_rank(data, trial, spec, ctx, holdout=spec.cv_holdout)
    return TrialOutput(metrics, costs)


# The algorithms whose rank rank_cv picks (with agent factors, for both: the ablation keeps PerSim's rank).
RANKED_BY_CV = ("persim", "persim_no_factors")


def rank_cv_trials(grid: "Grid") -> list[Trial]:
    """The rank_cv stage: PerSim per env x regime (x seed if cv_per_seed) x rank of the rank grid."""
    spec = grid.persim
    if not set(RANKED_BY_CV) & set(grid.algos) or spec.rank != "cv":
        return []
    seeds = grid.seeds if spec.cv_per_seed else grid.seeds[:1]
    return [Trial.named(stage="rank_cv", algo="persim", env=env, regime=regime, seed=seed, rank=rank)
            for env in grid.envs for regime in grid.regimes for seed in seeds for rank in spec.rank_grid]


def smallest_good_rank(losses: dict[int, float], tolerance: float) -> int:
    """The paper's pick from held-out loss per rank: the smallest rank within (1 + tolerance) x the lowest loss."""
    return min(rank for rank, loss in losses.items() if loss <= (1 + tolerance) * min(losses.values()))


def pick_ranks(results: list[tuple[Trial, dict]], grid: "Grid") -> dict[tuple[str, str, int], int]:
    """rank_cv's pick per (env, regime, seed) from its finished trials' held-out losses."""
    losses: dict[tuple[str, str, int], dict[int, float]] = {}
    for trial, metrics in results:
        losses.setdefault((trial.env, trial.regime, trial.seed), {})[trial.rank] = metrics["val_loss"]
    return {key: smallest_good_rank(per_rank, grid.persim.cv_tolerance) for key, per_rank in losses.items()}


def persim_main_trials(grid: "Grid", fields: dict, chosen: dict[tuple[str, str, int], int]) -> list[Trial]:
    """PerSim's main trials of one (env, regime, seed): at the pinned rank or rank_cv's pick (None when it
    picked none, which the trial reports as its failure), and with ``sweep_ranks`` one per other rank."""
    spec, env, regime, seed = grid.persim, fields["env"], fields["regime"], fields["seed"]
    if spec.rank == "cv":
        rank, source = chosen.get((env, regime, seed if spec.cv_per_seed else grid.seeds[0])), "cv"
    else:
        rank, source = per_env(spec.rank, env), "pinned"
    trials = [Trial.named(**fields, rank=rank, rank_source=source)]
    if spec.sweep_ranks and not trials[0].in_data_size_cell:
        trials += [Trial.named(**fields, rank=other, rank_source="sweep") for other in spec.rank_grid if other != rank]
    return trials


# ---------------------------------------------------------------- cost (--dry-run)


def persim_nets(grid: "Grid", env: str, rank: int) -> tuple[tuple[int, ...], ...]:
    family, spec = get_env(env), grid.persim
    state = (family.obs_dim, *per_env(spec.state_hidden, env), family.obs_dim * rank)
    return (state,) if family.discrete else (state, (family.action_dim, *spec.action_hidden, rank))


def persim_step_seconds(grid: "Grid", env: str, rank: int, rate: float) -> float:
    """One gradient step: batch rows through every member's nets, forward and backward, plus the step's own work."""
    spec = grid.persim
    return STEP_SECONDS["persim"] + sum(mlp_seconds(net, spec.batch_size * spec.ensemble, 1, rate, TRAIN)
                                      for net in persim_nets(grid, env, rank))


def persim_fit_seconds(grid: "Grid", env: str, rows: int, rank: int, holdout: float, rate: float) -> float:
    spec = grid.persim
    n_val = round(holdout * rows)
    n_train = rows - n_val
    seconds = spec.epochs * math.ceil(n_train / spec.batch_size) * persim_step_seconds(grid, env, rank, rate)
    if n_val:  # val_loss after every epoch, in chunks of 16384 rows
        chunks = spec.epochs * math.ceil(n_val / 16384)
        seconds += sum(mlp_seconds(net, spec.epochs * n_val * spec.ensemble, chunks, rate)
                       for net in persim_nets(grid, env, rank))
    return seconds


def persim_dynamics(grid: "Grid", env: str, rank: int) -> Dynamics:
    """What one model step costs: the planner's and the prediction test's calls, in ``step_chunk``-row chunks."""
    return Dynamics(env, persim_nets(grid, env, rank), grid.persim.ensemble,
                    step_chunk(per_env(grid.persim.state_hidden, env)), call_seconds=PERSIM_CHUNK_SECONDS)


def persim_trial_seconds(grid: "Grid", trial: Trial, rows: int, rate: float) -> float:
    return (persim_fit_seconds(grid, trial.env, rows, trial.rank, 0.0, rate)
            + evaluation_seconds(grid, trial.env, persim_dynamics(grid, trial.env, trial.rank), rate))


def evaluate_persim(model: PerSimEnsemble, trial: Trial, spec: PersimSpec, ctx: TrialContext) -> TrialOutput:
    """``persim-bench evaluate``: a reloaded model through the shared evaluation."""
    return evaluate_model(model, trial, ctx)


def rank_cv_trial_seconds(grid: "Grid", trial: Trial, rows: int, rate: float) -> float:
    return persim_fit_seconds(grid, trial.env, rows, trial.rank, grid.persim.cv_holdout, rate)


RANK_CV = PreStage("rank_cv", rank_cv_trials, cross_validate_rank, rank_cv_trial_seconds, pick_ranks, picks="rank",
                   dearest=lambda grid: max(grid.persim.rank_grid), metric="val_loss", mode="min")
ALGORITHMS = [Algorithm("persim", "PerSim", run_persim, "persim", PersimSpec, learns_dynamics=True, plans=True,
                        cost=persim_trial_seconds, reload=saved_model_loader(PerSimEnsemble), evaluate=evaluate_persim,
                        pre_stage=RANK_CV, main_trials=persim_main_trials),
              Algorithm("persim_no_factors", "PerSim w/o agent factors", run_persim_without_factors, "persim",
                        PersimSpec, learns_dynamics=True, plans=True, cost=persim_trial_seconds,
                        reload=saved_model_loader(PerSimEnsemble), evaluate=evaluate_persim, pre_stage=RANK_CV,
                        main_trials=persim_main_trials)]
