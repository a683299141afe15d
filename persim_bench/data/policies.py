"""Trained behaviour and test policies: the network, its plain weight file, and who uses which.

A policy file holds a JSON-able header and a dict of tensors, written atomically with
``torch.save`` and read back with ``torch.load(weights_only=True)``: no pickled objects. The
header says what made the policy (env, covariates, algorithm, budget, seed) and what it
achieved; ``load_policy`` refuses a file whose header or tensors do not match what is asked.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import ray
import torch
from torch import nn
from tqdm.auto import tqdm

import persim_bench
from persim_bench.config import MODEL_ALGOS, Grid, per_env
from persim_bench.data.dataset import atomic_write
from persim_bench.envs import get_env
from persim_bench.envs.base import EnvFamily

FORMAT = "persim-policy/1"


class PolicyError(RuntimeError):
    """A policy file that is missing, corrupt or not the one asked for."""


class PolicyNet(nn.Module):
    """An MLP acting for a batch of agents: Q-values -> argmax (DQN) or tanh action (TD3 actor)."""

    def __init__(self, obs_dim: int, out_dim: int, hidden: list[int], discrete: bool):
        super().__init__()
        sizes = [obs_dim, *hidden, out_dim]
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        self.body = nn.Sequential(*layers[:-1])
        self.discrete = discrete

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        out = self.body(obs)
        return out if self.discrete else torch.tanh(out)

    @torch.no_grad()
    def act(self, obs: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Greedy actions for observations [N, D]: int64 [N] or float32 [N, A]. (``rng`` unused: deterministic.)"""
        out = self(torch.tensor(obs, dtype=torch.float32))
        return out.argmax(dim=1).numpy() if self.discrete else out.numpy().astype(np.float32)


def policy_key(env: str, role: str, covariates, algorithm: str, budget: int, seed: int, hidden: list[int]) -> str:
    """Content hash of everything that determines a trained policy: its cache file name."""
    spec = {"env": env, "role": role, "covariates": [round(float(c), 10) for c in covariates],
            "algorithm": algorithm, "budget": int(budget), "seed": int(seed), "hidden": list(hidden),
            "version": persim_bench.__version__}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def save_policy(net: PolicyNet, header: dict, path: Path) -> None:
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in net.state_dict().items()}
    atomic_write(Path(path), lambda tmp: torch.save({"format": FORMAT, "header": header, "state": state}, tmp))


def load_policy(path: Path, expect: dict | None = None) -> tuple[PolicyNet, dict]:
    """Load a policy file; every key of ``expect`` must equal the header's (e.g. env, key)."""
    path = Path(path)
    if not path.exists():
        raise PolicyError(f"{path}: missing policy file")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged zip/pickle stream
        raise PolicyError(f"{path}: unreadable policy file ({type(err).__name__})") from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise PolicyError(f"{path}: not a persim-bench policy file")
    header = saved["header"]
    for key, value in (expect or {}).items():
        if header.get(key) != value:
            raise PolicyError(f"{path}: header {key}={header.get(key)!r}, expected {value!r}")
    family = get_env(header["env"])
    out_dim = family.n_actions if family.discrete else family.action_dim
    net = PolicyNet(family.obs_dim, out_dim, header["hidden"], family.discrete)
    try:
        net.load_state_dict(saved["state"])
    except (RuntimeError, KeyError) as err:
        raise PolicyError(f"{path}: weights do not fit a {header['env']} policy ({str(err).splitlines()[0]})") from None
    return net.eval(), header


def nearest_policy_agent(family: EnvFamily, covariates: np.ndarray) -> np.ndarray:
    """Index of the nearest policy-training agent for each agent, distances scaled by each covariate's range.

    Scaling matters for CartPole, whose force range (16) would otherwise swamp its length range (0.7).
    Rounding first makes ties independent of float noise.
    """
    low, high = np.asarray(family.covariate_low), np.asarray(family.covariate_high)
    scaled = (np.asarray(covariates) - low) / (high - low)
    anchors = (np.asarray(family.policy_agents) - low) / (high - low)
    distance = ((scaled[:, None, :] - anchors[None]) ** 2).sum(-1)
    return np.argmin(distance.round(12), axis=1)  # exact ties (HalfCheetah's (1, 1)) go to the first agent


class NearestAgentPolicy:
    """The paper's ``pure`` policy: each agent acts with the policy of its nearest policy-training agent.

    Actions are computed with one batched call per logging policy, not per agent.
    """

    def __init__(self, family: EnvFamily, nets: list[PolicyNet], covariates: np.ndarray):
        self.nets = nets
        self.assignment = nearest_policy_agent(family, covariates)

    def act(self, obs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        actions = None
        for index, net in enumerate(self.nets):
            rows = self.assignment == index
            if rows.any():
                chosen = net.act(obs[rows])
                if actions is None:
                    actions = np.zeros((len(obs), *chosen.shape[1:]), dtype=chosen.dtype)
                actions[rows] = chosen
        return actions


# ---------------------------------------------------------------- the policies stage


@dataclass(frozen=True)
class PolicyJob:
    """One policy to train: a logging policy of a policy-training agent, or an env's test policy."""

    env: str
    role: str                      # "logging" or "test"
    index: int                     # which policy-training agent (0 for the test policy)
    covariates: tuple[float, ...]
    algorithm: str                 # "dqn" or "td3"
    budget: int
    seed: int
    hidden: tuple[int, ...]
    n_envs: int

    @property
    def key(self) -> str:
        return policy_key(self.env, self.role, self.covariates, self.algorithm, self.budget, self.seed, list(self.hidden))

    def path(self, root: Path) -> Path:
        return Path(root) / self.env / f"{self.role}-{self.index}-{self.key}.pt"


def policy_jobs(grid: Grid) -> list[PolicyJob]:
    """The logging policies the grid's pure* regimes need and the test policies its prediction test needs."""
    spec, jobs = grid.policies, []
    needs_logging = any(regime != "random" for regime in grid.regimes)
    needs_test = grid.evaluation.prediction_policy == "trained" and any(a in MODEL_ALGOS for a in grid.algos)
    for env in grid.envs:
        family = get_env(env)
        algorithm = "dqn" if family.discrete else "td3"
        # Seeds differ per policy so no two policies share exploration noise.
        common = dict(env=env, algorithm=algorithm, hidden=tuple(spec.hidden), n_envs=spec.n_envs)
        if needs_logging:
            for i, covariates in enumerate(family.policy_agents):
                jobs.append(PolicyJob(role="logging", index=i, covariates=tuple(covariates),
                                      budget=per_env(spec.budget, env), seed=spec.seed + i, **common))
        if needs_test:
            jobs.append(PolicyJob(role="test", index=0, covariates=tuple(family.default_covariates),
                                  budget=per_env(spec.test_budget, env), seed=spec.seed + 100, **common))
    return jobs


@ray.remote(num_cpus=1)
def _train_task(job: PolicyJob, path: str) -> dict:
    from persim_bench.data.rl import train_policy

    torch.set_num_threads(1)
    net, metrics = train_policy(job.env, job.covariates, job.algorithm, job.budget, job.seed, list(job.hidden),
                                n_envs=job.n_envs)
    header = {**asdict(job), "covariates": list(job.covariates), "hidden": list(job.hidden), "key": job.key,
              "package_version": persim_bench.__version__, **metrics}
    save_policy(net, header, Path(path))
    return header


def train_policies(grid: Grid, root: Path, progress: bool = True) -> dict[PolicyJob, dict]:
    """Train every missing policy of the grid as parallel Ray tasks; reuse cached ones. Returns headers."""
    headers, todo = {}, []
    for job in policy_jobs(grid):
        path = job.path(root)
        if path.exists():
            headers[job] = load_policy(path, expect={"key": job.key, "env": job.env})[1]
        else:
            todo.append(job)
    if todo:
        futures = {_train_task.remote(job, str(job.path(root))): job for job in todo}
        with tqdm(total=len(todo), desc="policies", unit="policy", disable=not progress) as bar:
            pending = list(futures)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                job = futures[done[0]]
                headers[job] = ray.get(done[0])
                bar.set_postfix_str(f"{job.env} {job.role}-{job.index}: {headers[job]['achieved_return']:.1f}")
                bar.update()
    return headers


def logging_policy_paths(root: Path, grid: Grid, env: str) -> list[Path]:
    """Paths of an env's logging policies, in policy-agent order (they must have been trained)."""
    return [job.path(root) for job in policy_jobs(grid) if job.env == env and job.role == "logging"]


def prediction_policy_path(root: Path, grid: Grid, env: str) -> Path:
    return next(job.path(root) for job in policy_jobs(grid) if job.env == env and job.role == "test")
