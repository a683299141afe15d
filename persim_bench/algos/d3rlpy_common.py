"""The glue every d3rlpy baseline shares: Parquet rows -> MDPDataset, seeded fits, a batched policy, registry entries.

An algorithm file (bcq.py, cql.py, ...) only says how to build its d3rlpy algorithm from its
spec (``make(spec, discrete, device)``) and what its networks cost; ``offline_policy_entries``
turns that into a pooled ("-P": one policy on every agent's trajectory) and a per-agent ("-A":
one policy per test agent on its own single trajectory) registry entry.

d3rlpy is imported inside functions: importing it costs ~1.5 s and pulls in old ``gym``, which
the grid validation and ``--dry-run`` do not need. d3rlpy draws from the global ``random``,
NumPy and torch generators; every fit and every act call seeds them from our seed and restores
the caller's states afterwards.
"""
from __future__ import annotations

import functools
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import structlog
from pydantic import model_validator

from persim_bench.contracts import Algorithm, Checkpoints, Trial, TrialContext, TrialOutput
from persim_bench.costmodel import ACT_SECONDS, STEP_SECONDS, env_step_seconds, mlp_seconds
from persim_bench.data.dataset import Transitions
from persim_bench.data.formats import seeded, to_mdp_dataset
from persim_bench.envs import get_env
from persim_bench.evaluate import load_trial_data, score_policy
from persim_bench.specs import PositiveInt, Strict

if TYPE_CHECKING:
    from persim_bench.config import Grid

# d3rlpy logs through structlog to the console: dataset signatures, the whole config, every epoch's
# metrics. Keep its warnings only; the epoch metrics reach on_epoch and the CSVs under work_dir.
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

LOG_DIR = "d3rlpy"  # d3rlpy's metric CSVs and params.json go to <work_dir>/d3rlpy/<policy name>/

# (spec, discrete, device) -> an unfitted d3rlpy algorithm
MakeAlgo = Callable[[Any, bool, str], Any]


class OfflinePolicySpec(Strict):
    """What every d3rlpy baseline's grid section has: its gradient steps and reporting interval."""

    # Gradient steps per policy (BCQ in the paper: 5.5e5); progress is reported every steps_per_epoch.
    steps: PositiveInt = 550_000
    steps_per_epoch: PositiveInt = 5_000

    @model_validator(mode="after")
    def _whole_epochs(self):
        if self.steps % self.steps_per_epoch:
            raise ValueError(f"steps ({self.steps}) must be a multiple of steps_per_epoch ({self.steps_per_epoch})")
        return self


class D3rlpyPolicy:
    """Trained d3rlpy policies acting for a batch of agents: one shared policy (key None) or one per agent."""

    def __init__(self, env: str, algos: dict[int | None, Any], seed: int):
        self.env = env
        self.algos = algos
        family = get_env(env)
        self.discrete = family.discrete
        self.action_dims = () if family.discrete else (family.action_dim,)
        # Stochastic acting (BCQ's sampled VAE actions): each act call draws from a fresh seed of this stream.
        self.rng = np.random.default_rng(seed)

    def act(self, obs: np.ndarray, agent: np.ndarray) -> np.ndarray:
        """Actions for obs [E, D]: int64 [E] or float32 [E, A]; one predict call per policy and step."""
        obs, agent = np.asarray(obs, dtype=np.float32), np.asarray(agent)
        if None not in self.algos:
            unknown = np.setdiff1d(agent, list(self.algos))
            if unknown.size:
                raise ValueError(f"{self.env}: no per-agent policy for agent(s) {', '.join(map(str, unknown))} "
                                 f"(trained: {', '.join(map(str, self.algos))})")
        with seeded(int(self.rng.integers(2**32))):
            if None in self.algos:
                actions = self.algos[None].predict(obs)
            else:
                actions = np.empty((len(obs), *self.action_dims))
                for a in np.unique(agent):
                    mine = agent == a
                    actions[mine] = self.algos[int(a)].predict(obs[mine])
        return actions.astype(np.int64 if self.discrete else np.float32)


def fit_policies(data: Transitions, make: MakeAlgo, spec: OfflinePolicySpec, seed: int, work_dir: Path, name: str,
                 agents: list[int] | None = None, on_epoch: Callable[[int, dict], None] | None = None,
                 device: str = "cpu", before_acting: Callable[[Any, Any], None] | None = None,
                 checkpoint: Checkpoints | None = None) -> tuple[D3rlpyPolicy, dict]:
    """One policy on all rows (``agents`` None) or one per listed agent on its own rows.

    Policies train one after the other, spec.steps gradient steps each. ``on_epoch(epoch, metrics)``
    gets d3rlpy's epoch means (losses, step times) with a running epoch number across the
    policies and, per agent, the ``agent``. Every agent is checked for data before any training.
    A policy's training depends only on (seed, agent), not on which other agents are fitted.
    ``before_acting(algo, spec)`` adjusts a fitted algorithm for acting (BCQ's sample count).
    ``checkpoint`` gets the weights of the finished policies and of the one in training after each
    epoch; resumed from one, finished policies are restored and the current one continues from its
    epoch (d3rlpy's own sampling restarts from the seed there: close to, not bit for bit, the
    uninterrupted fit). Returns the policy and the final epoch's metrics (suffixed ``_agent<a>`` per
    agent), ``transitions`` and ``fit_seconds``.
    """
    started = time.perf_counter()
    if agents is not None and not agents:
        raise ValueError(f"{data.env}/{data.regime}: a per-agent policy needs at least one agent")
    groups = [None] if agents is None else list(dict.fromkeys(int(a) for a in agents))
    datasets = {key: to_mdp_dataset(data, None if key is None else [key]) for key in groups}
    discrete = get_env(data.env).discrete
    epochs = spec.steps // spec.steps_per_epoch
    resume = (checkpoint.resume if checkpoint else None) or {"done": {}, "metrics": {}}
    done, done_metrics = dict(resume["done"]), dict(resume["metrics"])
    algos, final = {}, {"transitions": sum(d.transition_count for d in datasets.values())}
    for k, key in enumerate(groups):
        label = policy_key(key)
        algo = make(spec, discrete, device)
        if label in done:  # finished before the restart
            load_weights(algo, datasets[key], done[label])
            metrics = done_metrics[label]
        else:
            first = 0
            if resume.get("policy") == label:
                load_weights(algo, datasets[key], resume["weights"])
                first = resume["epoch"] + 1  # epochs done (the state holds the last one's index, from 0)

            def offer(epoch: int, metrics: dict) -> None:
                if checkpoint:
                    checkpoint.offer(lambda: {"done": done, "metrics": done_metrics, "policy": label,
                                              "epoch": epoch - 1, "weights": weights_of(algo)})

            report = functools.partial(_report_epoch, on_epoch, k * epochs, key) if on_epoch else None
            seed_key = (1,) if key is None else (2, key)
            run_name = name if key is None else f"{name}_agent{key}"
            metrics = _fit_one(algo, datasets[key], spec, stream(seed, *seed_key), Path(work_dir) / LOG_DIR, run_name,
                               report, first, offer)
            done[label], done_metrics[label] = weights_of(algo), metrics
            if checkpoint:  # a restart after this point refits none of the policies so far
                checkpoint.offer(lambda: {"done": done, "metrics": done_metrics}, last=k == len(groups) - 1)
        if before_acting:
            before_acting(algo, spec)
        algos[key] = algo
        final.update(metrics if key is None else {f"{m}_agent{key}": v for m, v in metrics.items()})
    policy = D3rlpyPolicy(data.env, algos, stream(seed, 0))
    return policy, {**final, "fit_seconds": time.perf_counter() - started}


def save_policies(policy: D3rlpyPolicy, folder: Path) -> list[Path]:
    """Each trained policy's learnables as ``<folder>/<all|agent<a>>.d3rlpy`` (d3rlpy's own save)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, algo in policy.algos.items():
        path = folder / f"{policy_key(key)}.d3rlpy"
        path.write_bytes(weights_of(algo))
        paths.append(path)
    return paths


def load_policies(folder: Path, device: str) -> dict[str, bytes]:
    """What ``save_policies`` wrote: policy name -> its learnables (rebuilt by the entry's ``evaluate``)."""
    saved = {path.stem: path.read_bytes() for path in sorted(Path(folder).glob("*.d3rlpy"))}
    if not saved:
        raise FileNotFoundError(f"{folder}: no saved d3rlpy policies (*.d3rlpy)")
    return saved


def policy_key(key: int | None) -> str:
    """A policy's name in checkpoints and saved models: ``all`` (pooled) or ``agent<a>``."""
    return "all" if key is None else f"agent{key}"


def weights_of(algo) -> bytes:
    """A fitted d3rlpy algorithm's learnables (networks and optimisers), through d3rlpy's own save."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="persim-d3rlpy-") as folder:
        algo.save_model(str(Path(folder) / "weights.pt"))
        return (Path(folder) / "weights.pt").read_bytes()


def load_weights(algo, dataset, weights: bytes) -> None:
    """Build ``algo`` for the ``dataset`` it was fitted on (networks, and scalers fitted to it, as d3rlpy's
    fit does) and load saved learnables into it (d3rlpy's load)."""
    import tempfile

    from d3rlpy.algos.utility import build_scalers_with_transition_picker

    build_scalers_with_transition_picker(algo, dataset)  # as d3rlpy's fitter does, before the networks
    algo.build_with_dataset(dataset)
    with tempfile.TemporaryDirectory(prefix="persim-d3rlpy-") as folder:
        (Path(folder) / "weights.pt").write_bytes(weights)
        algo.load_model(str(Path(folder) / "weights.pt"))


def _report_epoch(on_epoch: Callable[[int, dict], None], offset: int, agent: int | None, epoch: int,
                  metrics: dict) -> None:
    """An epoch of one policy as a running epoch across the policies, tagged with its agent (per-agent fits)."""
    on_epoch(offset + epoch, metrics if agent is None else {**metrics, "agent": agent})


def stream(seed: int, *key: int) -> int:
    """An independent seed per purpose: (0,) acting, (1,) the pooled policy, (2, agent) a per-agent one."""
    return int(np.random.SeedSequence(seed, spawn_key=key).generate_state(1)[0])


def _fit_one(algo, dataset, spec: OfflinePolicySpec, seed: int, log_root: Path, name: str,
             on_epoch: Callable[[int, dict], None] | None, first_epoch: int = 0,
             after_epoch: Callable[[int, dict], None] | None = None) -> dict:
    """Fit ``algo`` from ``first_epoch`` (its weights already loaded when > 0) to spec.steps gradient steps."""
    from d3rlpy.logging import FileAdapterFactory

    epochs = spec.steps // spec.steps_per_epoch
    if first_epoch == 0:
        shutil.rmtree(log_root / name, ignore_errors=True)  # a rerun would append to the old CSVs
    metrics: dict = {}
    with seeded(seed if first_epoch == 0 else stream(seed, first_epoch)):
        for epoch, metrics in algo.fitter(
                dataset, n_steps=(epochs - first_epoch) * spec.steps_per_epoch, n_steps_per_epoch=spec.steps_per_epoch,
                experiment_name=name, with_timestamp=False, logger_adapter=FileAdapterFactory(root_dir=str(log_root)),
                show_progress=False, save_interval=epochs + 1):  # no weight files: they are saved as we need them
            if on_epoch:
                on_epoch(first_epoch + epoch, dict(metrics))
            if after_epoch:
                after_epoch(first_epoch + epoch, metrics)
    return {key: float(value) for key, value in metrics.items()}


def d3rlpy_device(device: str) -> str:
    """d3rlpy names devices "cpu:0" / "cuda:0"."""
    return device if ":" in device else f"{device}:0"


# ---------------------------------------------------------------- registry entries and cost


# [(net name, rows through it per batch row (or per acting state), forward passes)]: what one gradient
# step or one act call runs through a baseline's networks; costed with ``costmodel.mlp_seconds``.
NetCalls = list[tuple[str, float, float]]


@dataclass(frozen=True)
class PolicyCost:
    """What a d3rlpy baseline's networks are and what one gradient step and one act call run through them."""

    nets: Callable[["Grid", str], dict[str, tuple[int, ...]]]          # (grid, env) -> {name: layer sizes}
    train_calls: Callable[["Grid", str], tuple[NetCalls, int, float]]  # -> (calls, batch size, step overhead s)
    act_calls: Callable[["Grid", str], NetCalls]

    def trial_seconds(self, grid: "Grid", section: str, env: str, policies: int, rate: float) -> float:
        spec, sizes = getattr(grid, section), self.nets(grid, env)
        calls, batch, overhead = self.train_calls(grid, env)
        # A per-agent policy trains on one agent's rows only; the step count, not the rows, sets its cost.
        fit = spec.steps * overhead + sum(mlp_seconds(sizes[net], spec.steps * batch * n, spec.steps, rate, passes)
                                          for net, n, passes in calls)
        episodes = grid.evaluation.policy_reward_episodes * len(grid.evaluation.test_agents)
        act = sum(mlp_seconds(sizes[net], episodes * n, policies, rate, passes)
                  for net, n, passes in self.act_calls(grid, env))
        acting = grid.evaluation.episode_steps(env) * (env_step_seconds(env, episodes) + act + policies * ACT_SECONDS)
        return policies * fit + acting


def offline_policy_entries(prefix: str, label: str, spec: type, make: MakeAlgo, cost: PolicyCost, *,
                           action_spaces: tuple[str, ...] = ("discrete", "continuous"),
                           before_acting: Callable[[Any, Any], None] | None = None) -> list[Algorithm]:
    """Registry entries ``<prefix>_p`` (one policy on all agents) and ``<prefix>_a`` (one per test agent).

    Both read the grid section ``prefix``, whose class is ``spec`` (an ``OfflinePolicySpec``).
    """
    def entry(per_agent: bool) -> Algorithm:
        def run(trial: Trial, spec: OfflinePolicySpec, ctx: TrialContext) -> TrialOutput:
            costs: dict = {}
            agents = ctx.evaluation.test_agents if per_agent else None
            policy, fit_metrics = fit_policies(
                load_trial_data(trial, ctx, costs), make, spec, trial.seed, ctx.work_dir, trial.algo,
                agents, on_epoch=lambda epoch, m: ctx.report({"stage": "fit", "epoch": epoch, **m}),
                device=ctx.device, before_acting=before_acting, checkpoint=ctx.checkpoints)
            fitted = TrialOutput(fit_metrics, costs, models=save_policies(policy, ctx.work_dir / "model"))
            return fitted | score_policy(policy.act, trial, ctx, ctx.evaluation.policy_reward_episodes)

        def evaluate(saved: dict[str, bytes], trial: Trial, spec: OfflinePolicySpec, ctx: TrialContext) -> TrialOutput:
            """``persim-bench evaluate``: the saved policies rebuilt on their data (d3rlpy's load) and scored again."""
            costs: dict = {}
            data, algos = load_trial_data(trial, ctx, costs), {}
            for label, weights in saved.items():
                key = None if label == "all" else int(label.removeprefix("agent"))
                algos[key] = make(spec, get_env(trial.env).discrete, ctx.device)
                load_weights(algos[key], to_mdp_dataset(data, None if key is None else [key]), weights)
                if before_acting:
                    before_acting(algos[key], spec)
            policy = D3rlpyPolicy(trial.env, algos, stream(trial.seed, 0))
            return TrialOutput(costs=costs) | score_policy(policy.act, trial, ctx, ctx.evaluation.policy_reward_episodes)

        def seconds(grid: "Grid", trial: Trial, rows: int, rate: float) -> float:
            policies = len(grid.evaluation.test_agents) if per_agent else 1
            return cost.trial_seconds(grid, prefix, trial.env, policies, rate)

        suffix = "a" if per_agent else "p"
        return Algorithm(f"{prefix}_{suffix}", f"{label}-{suffix.upper()}", run, prefix, spec, reload=load_policies,
                         evaluate=evaluate,
                         action_spaces=action_spaces, cost=seconds)

    return [entry(False), entry(True)]


def step_overhead(discrete: bool) -> float:
    """Per gradient step beyond the layers: d3rlpy's Python and optimizer work (measured for BCQ)."""
    return STEP_SECONDS["bcq_discrete" if discrete else "bcq_continuous"]
