"""Trained behaviour and test policies: the network, its plain weight file, and who uses which.

A policy file holds a JSON-able header and a dict of tensors, written atomically with
``torch.save`` and read back with ``torch.load(weights_only=True)``: no pickled objects. The
header says what made the policy (env, covariates, algorithm, budget, seed, checkpoint
settings) and what it achieved: its return, and every checkpoint evaluated while training as
[env steps, return] with the index of the one kept (``chosen_checkpoint``); returns are greedy
unless the header's ``score_epsilon`` says the policy was scored acting as a pure-eps-* regime.
``load_policy`` refuses a file whose header or tensors do not match what is asked.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

import persim_bench
from persim_bench.specs import REGIME_EPSILON, per_env
from persim_bench.data.dataset import atomic_write
from persim_bench.data.policy_net import PolicyNet  # re-exported: its old home
from persim_bench.data.rl import train_policy
from persim_bench.envs import get_env
from persim_bench.envs.base import EnvFamily
from persim_bench.errors import BenchError

if TYPE_CHECKING:
    from persim_bench.config import Grid

FORMAT = "persim-policy/1"


class PolicyError(BenchError):
    """A policy file that is missing, corrupt or not the one asked for."""


def policy_key(env: str, role: str, covariates, algorithm: str, budget: int, seed: int, hidden: list[int],
               eval_every: int | None = None, eval_episodes: int = 10, target_return: float | None = None,
               target_rule: str = "nearest", score_epsilon: float = 0.0, retrain_misses: int = 0) -> str:
    """Content hash of everything that determines a trained policy: its cache file name.

    The checkpoint settings enter only when checkpoints are taken, and ``score_epsilon`` and
    ``retrain_misses`` only when not 0, so a policy keeps the key it had before these settings existed.
    """
    spec = {"env": env, "role": role, "covariates": [round(float(c), 10) for c in covariates],
            "algorithm": algorithm, "budget": int(budget), "seed": int(seed), "hidden": list(hidden),
            "version": persim_bench.__version__}
    if eval_every is not None or target_return is not None:
        spec["checkpoints"] = {"eval_every": eval_every, "eval_episodes": int(eval_episodes),
                               "target_return": None if target_return is None else float(target_return),
                               "target_rule": target_rule if target_return is not None else None}
        if score_epsilon:
            spec["checkpoints"]["score_epsilon"] = float(score_epsilon)
        if retrain_misses:
            spec["checkpoints"]["retrain_misses"] = int(retrain_misses)
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


def policy_label(role: str, regime: str | None, index: int) -> str:
    """A policy's role, its regime if it has one of its own, and its index: ``logging-pure-eps-40-2``."""
    return "-".join(str(part) for part in (role, regime, index) if part is not None)


@dataclass(frozen=True)
class PolicyJob:
    """One policy to train: a logging policy of a policy-training agent, or an env's test policy.

    A logging policy with a ``regime`` is that pure* regime's own (``PolicySpec.regime_targets``),
    scored acting as the regime acts; without one it serves every other pure* regime of its env.
    """

    env: str
    role: str                      # "logging" or "test"
    index: int                     # which policy-training agent (0 for the test policy)
    covariates: tuple[float, ...]
    algorithm: str                 # "dqn" or "td3"
    budget: int
    seed: int
    hidden: tuple[int, ...]
    n_envs: int
    eval_every: int | None = None          # env steps between checkpoints (None: the final policy only)
    eval_episodes: int = 10
    target_return: float | None = None     # keep the checkpoint nearest it (None: the best); logging only
    target_rule: str = "nearest"           # or "first" / "first-held": early stopping (rl.meets_target)
    regime: str | None = None              # the pure* regime whose own policy this is (logging only)
    score_epsilon: float = 0.0             # checkpoints scored with this chance of a random action
    retrain_misses: int = 0                # more runs, from derived seeds, while the target is missed

    @property
    def key(self) -> str:
        return policy_key(self.env, self.role, self.covariates, self.algorithm, self.budget, self.seed, list(self.hidden),
                          self.eval_every, self.eval_episodes, self.target_return, self.target_rule, self.score_epsilon,
                          self.retrain_misses)

    @property
    def label(self) -> str:
        """``logging-2``, ``logging-pure-eps-40-2``, ``test-0``: the policy in file names and tables."""
        return policy_label(self.role, self.regime, self.index)

    def path(self, root: Path) -> Path:
        return Path(root) / self.env / f"{self.label}-{self.key}.pt"


def policy_jobs(grid: Grid) -> list[PolicyJob]:
    """The logging policies the grid's pure* regimes need and the test policies its prediction test needs."""
    spec, jobs = grid.policies, []
    noisy_regimes = [regime for regime in grid.regimes if regime in REGIME_EPSILON]
    needs_test = grid.evaluation.prediction_policy == "trained" and grid.tests_predictions()
    for env in grid.envs:
        family = get_env(env)
        algorithm = "dqn" if family.discrete else "td3"
        # Seeds differ per policy so no two policies share exploration noise.
        common = dict(env=env, algorithm=algorithm, hidden=tuple(spec.hidden), n_envs=spec.n_envs,
                      eval_every=spec.checkpoint_every(env), eval_episodes=spec.eval_episodes)
        own = {regime: spec.regime_target(env, regime) for regime in noisy_regimes}
        # (regime, target, score epsilon) of each set of logging policies: shared ones first.
        sets = [(None, spec.target(env), 0.0)] if None in own.values() else []
        sets += [(regime, target, REGIME_EPSILON[regime]) for regime, target in own.items() if target is not None]
        for regime, target, score_epsilon in sets:
            for i, covariates in enumerate(family.policy_agents):
                jobs.append(PolicyJob(role="logging", index=i, covariates=tuple(covariates),
                                      budget=per_env(spec.budget, env), seed=spec.seed + i,
                                      target_return=target, target_rule=spec.rule(env), regime=regime,
                                      score_epsilon=score_epsilon,
                                      retrain_misses=spec.retrains(env) if target is not None else 0, **common))
        if needs_test:  # the test policy keeps its best checkpoint: no target
            jobs.append(PolicyJob(role="test", index=0, covariates=tuple(family.default_covariates),
                                  budget=per_env(spec.test_budget, env), seed=spec.seed + 100, **common))
    return jobs


class ProgressLines:
    """``train_policy``'s progress callback for one job: a line at most every ``every`` seconds.

    Ray forwards a task's prints to the driver, so a user watching a 45-minute HalfCheetah policy
    sees it move; a policy trained in seconds prints nothing.
    """

    def __init__(self, job: PolicyJob, every: float = 60.0, clock=time.monotonic):
        self.job, self.every, self.clock = job, every, clock
        self.last = clock()

    def __call__(self, steps: int, metrics: dict) -> None:
        now = self.clock()
        if now - self.last >= self.every:
            self.last = now
            print(f"{self.job.env} {self.job.label}: {steps:,} of {self.job.budget:,} env steps, "
                  f"greedy return {metrics['greedy_return']:.1f}, {metrics['seconds']:.0f} s", flush=True)


def _train_task(job: PolicyJob, path: str) -> dict:
    """One policy trained and saved: a Ray task of ``train_policies``."""
    torch.set_num_threads(1)
    # A task that Ray gave no GPU sees none (CUDA_VISIBLE_DEVICES is emptied): the CPU then.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    runs = []  # (best checkpoint score, seed, net, metrics) per run
    for attempt in range(job.retrain_misses + 1):
        # The first run uses the job's seed; a retrain one derived from it, so no two runs share one.
        seed = job.seed if attempt == 0 else int(np.random.SeedSequence([job.seed, attempt]).generate_state(1)[0])
        net, metrics = train_policy(job.env, job.covariates, job.algorithm, job.budget, seed, list(job.hidden),
                                    n_envs=job.n_envs, eval_episodes=job.eval_episodes, eval_every=job.eval_every,
                                    target_return=job.target_return, target_rule=job.target_rule,
                                    score_epsilon=job.score_epsilon, on_progress=ProgressLines(job), device=device)
        runs.append((max(score for _, score in metrics["checkpoints"]), seed, net, metrics))
        reached = job.target_return is None or metrics["target_met"]
        if reached:
            break
    # The run that reached the target (the last one), else the one whose best checkpoint scored highest.
    _, seed, net, metrics = runs[-1] if reached else max(runs, key=lambda run: run[0])
    metrics = {**metrics, "run_seed": seed, "runs": [[s, best] for best, s, _, _ in runs]}
    header = {**asdict(job), "covariates": list(job.covariates), "hidden": list(job.hidden), "key": job.key,
              "package_version": persim_bench.__version__, **metrics}
    save_policy(net, header, Path(path))
    return header


def longest_first(jobs: list[PolicyJob]) -> list[PolicyJob]:
    """Jobs in the order to submit them: the ones that run their whole budget first, larger budgets first.

    A job with a target return stops at its first checkpoint reaching it (HalfCheetah's logging
    policies: 45k-75k of 300k env steps); one without (every test policy) runs its whole budget.
    Ray starts tasks in submission order, so on a few cores the long ones go first and the short
    ones fill the other cores beside them, instead of a 300k-step test policy starting last
    (HalfCheetah on 2 cores, from the policies' own times: about 80 instead of 110 minutes).
    """
    return sorted(jobs, key=lambda job: (job.target_return is not None, -job.budget))


def train_policies(grid: Grid, root: Path, progress: bool = True) -> dict[PolicyJob, dict]:
    """Train every missing policy of the grid as parallel Ray tasks; reuse cached ones. Returns headers."""
    import ray  # here, not at the top: reading a policy (evaluation, the GPU check) needs no Ray
    from tqdm.auto import tqdm

    headers, todo = {}, []
    for job in policy_jobs(grid):
        path = job.path(root)
        if path.exists():
            headers[job] = load_policy(path, expect={"key": job.key, "env": job.env})[1]
        else:
            todo.append(job)
    if todo:
        wanted = grid.trial_resources("policies")  # a GPU reservation lets the trainers use it
        task = ray.remote(_train_task).options(num_cpus=wanted.cpu, num_gpus=wanted.gpu)
        futures = {task.remote(job, str(job.path(root))): job for job in longest_first(todo)}
        # disable=None: a bar only when stderr is a terminal; none under `persim-bench -q`
        show = progress and os.environ.get("PERSIM_BENCH_VERBOSITY") != "quiet"
        with tqdm(total=len(todo), desc="policies", unit="policy", disable=None if show else True) as bar:
            pending = list(futures)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                job = futures[done[0]]
                headers[job] = ray.get(done[0])
                bar.set_postfix_str(f"{job.env} {job.label}: {headers[job]['achieved_return']:.1f}")
                bar.update()
    return headers


def logging_policy_paths(root: Path, grid: Grid, env: str, regime: str) -> list[Path]:
    """Paths of the logging policies of an env's pure* regime, in policy-agent order (they must have been trained)."""
    own = regime if grid.policies.regime_target(env, regime) is not None else None
    return [job.path(root) for job in policy_jobs(grid)
            if job.env == env and job.role == "logging" and job.regime == own]


def prediction_policy_path(root: Path, grid: Grid, env: str) -> Path:
    return next(job.path(root) for job in policy_jobs(grid) if job.env == env and job.role == "test")
