"""Grid specs: load a YAML grid from tune_configs/, validate it, fail early with a clear line.

A grid names the envs, data regimes and everything the stages need. Every error names the
file and the field (``tune_configs/smoke.yaml: data.n_agents: ...``) and is raised before
Ray starts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from persim_bench.envs import ENVS

REGIMES = ("pure", "random", "pure-eps-20", "pure-eps-40")
# Algorithms this version runs; "true_env_mpc" needs no data, so it runs once per env x seed.
ALGOS = ("persim", "cadm_vanilla", "cadm_pets", "bcq_p", "bcq_a", "true_env_mpc")
# Algorithms that learn a dynamics model and so get the prediction-error test.
MODEL_ALGOS = ("persim", "cadm_vanilla", "cadm_pets")
CONFIG_DIR = Path(__file__).resolve().parent.parent / "tune_configs"

PositiveInt = Annotated[int, Field(gt=0)]


class GridError(ValueError):
    """A grid file that cannot be used; the message is one line naming file and field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSpec(Strict):
    n_agents: Annotated[int, Field(ge=5)] = 500
    agents_per_shard: PositiveInt = 100
    # Episode cap per env; the paper's horizon when absent. Small grids shorten HalfCheetah.
    max_steps: dict[str, PositiveInt] = {}
    # Ray actors generating shards; None = one per CPU of the cluster.
    num_workers: PositiveInt | None = None

    @field_validator("max_steps")
    @classmethod
    def _known_envs_within_horizon(cls, caps: dict[str, int]) -> dict[str, int]:
        check_known("env", caps, ENVS)
        for env, cap in caps.items():
            if cap > ENVS[env].horizon:
                raise ValueError(f"{env}: {cap} exceeds the paper's horizon {ENVS[env].horizon}")
        return caps

    def episode_steps(self, env: str) -> int:
        return self.max_steps.get(env, ENVS[env].horizon)


def per_env(value, env: str):
    """A setting given once for all envs or as {env: value}."""
    if isinstance(value, dict):
        if env not in value:
            raise GridError(f"no value for env {env!r} in {value}")
        return value[env]
    return value


def check_known(kind: str, names, allowed) -> list:
    for name in names:
        if name not in allowed:
            raise ValueError(f"unknown {kind} {name!r}; known: {', '.join(allowed)}")
    return names


def known_env_keys(value):
    """A per-env setting may only name known envs."""
    if isinstance(value, dict):
        check_known("env", value, ENVS)
    return value


class PersimSpec(Strict):
    """PerSim's model and training (paper App. D.1). Defaults are the paper's."""

    # "cv": the rank_cv stage picks it per env x regime from rank_grid (the paper); or pin it,
    # once for all envs or per env (the paper's picks: 3 / 5 / 20).
    rank: Literal["cv"] | PositiveInt | dict[str, PositiveInt] = "cv"
    rank_grid: list[PositiveInt] = [3, 5, 10, 15, 20, 30]
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
    # State encoder hidden layers (paper: one layer of 256 for MountainCar/CartPole, (256, 512, 512) for HalfCheetah).
    state_hidden: list[PositiveInt] | dict[str, list[PositiveInt]] = {
        "mountaincar": [256], "cartpole": [256], "halfcheetah": [256, 512, 512]}
    # Action encoder hidden layers for continuous actions (discrete actions: one linear layer on the one-hot).
    action_hidden: list[PositiveInt] = [256, 256]
    # z-score states and deltas before fitting (authors' code: HalfCheetah only; paper: silent).
    normalize: bool | dict[str, bool] = True
    # Halve the learning rate every this many epochs (authors' code: 150; paper: no schedule).
    lr_halving_epochs: PositiveInt | None = None

    @field_validator("rank", "state_hidden", "normalize")
    @classmethod
    def _env_keys(cls, value):
        return known_env_keys(value)


class CadmSpec(Strict):
    """CaDM (Lee et al. 2020) as the paper ran it (App. D.2); sizes as in the public code (younggyoseo/CaDM)."""

    # Past transitions the context encoder reads (K) and future transitions each context
    # is trained to predict (M).
    history: PositiveInt = 10
    future: PositiveInt = 10
    context_dim: PositiveInt = 10
    context_hidden: list[PositiveInt] = [256, 128, 64]
    hidden: list[PositiveInt] = [200, 200, 200, 200]
    # L2 penalty wd * 1/2 sum W^2: hidden layer i uses entry i, the output layer the last entry.
    weight_decay: list[Annotated[float, Field(ge=0)]] = [2.5e-5, 5e-5, 7.5e-5, 7.5e-5, 1e-4]
    context_weight_decay: list[Annotated[float, Field(ge=0)]] = [2.5e-5, 5e-5, 7.5e-5]
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


class BCQSpec(Strict):
    """BCQ through d3rlpy (paper App. D.2). Defaults follow the original BCQ code (sfujim/BCQ) where d3rlpy's differ.

    Continuous BCQ (HalfCheetah) and discrete BCQ (MountainCar, CartPole) have their own fields;
    the original code's gamma 0.99, tau 0.005, lambda 0.75, phi 0.05 and VAE KL weight 0.5 are
    also d3rlpy's defaults and are left to it.
    """

    # Gradient steps per policy (the paper: 5.5e5); progress is reported every steps_per_epoch.
    steps: PositiveInt = 550_000
    steps_per_epoch: PositiveInt = 5_000
    # Continuous: hidden layers of the perturbation actor and of each twin critic (d3rlpy: 256-256).
    actor_hidden: list[PositiveInt] = [400, 300]
    critic_hidden: list[PositiveInt] = [400, 300]
    # Continuous: VAE encoder and decoder hidden layers (d3rlpy: 256-256).
    vae_hidden: list[PositiveInt] = [750, 750]
    # Continuous: Adam learning rate of actor, critic and VAE (original and d3rlpy: 1e-3).
    lr: Annotated[float, Field(gt=0)] = 1e-3
    # Continuous: minibatch size (original and d3rlpy: 100).
    batch_size: PositiveInt = 100
    # Continuous: VAE actions sampled per next state for the Q target (original 10) and per state
    # when acting (original 100); d3rlpy uses one number, 100, for both.
    target_samples: PositiveInt = 10
    act_samples: PositiveInt = 100
    # Discrete: hidden layers of the Q network and of the separate imitation network (d3rlpy: 256-256, shared).
    discrete_hidden: list[PositiveInt] = [256, 256]
    # Discrete: Adam learning rate (d3rlpy: 6.25e-5, the original's Atari setting).
    discrete_lr: Annotated[float, Field(gt=0)] = 3e-4
    # Discrete: minibatch size (d3rlpy: 32, the original's Atari setting).
    discrete_batch_size: PositiveInt = 64
    # Discrete: actions whose imitation probability is below threshold x the likeliest one's are never taken
    # (original and d3rlpy: 0.3).
    discrete_threshold: Annotated[float, Field(gt=0, lt=1)] = 0.3
    # Discrete: Polyak target update per step (d3rlpy: a hard copy every 8000 steps, the original's Atari setting).
    discrete_tau: Annotated[float, Field(gt=0, le=1)] = 0.005
    # Discrete: weight of the mean squared imitation logits added to the loss (d3rlpy's beta: 0.5).
    discrete_logit_penalty: Annotated[float, Field(ge=0)] = 0.01

    @model_validator(mode="after")
    def _whole_epochs(self) -> "BCQSpec":
        if self.steps % self.steps_per_epoch:
            raise ValueError(f"steps ({self.steps}) must be a multiple of steps_per_epoch ({self.steps_per_epoch})")
        return self


class PlannerSpec(Strict):
    """The one MPC planner (paper Sec. 5, App. D.1): random shooting for discrete actions, CEM for continuous."""

    horizon: PositiveInt | dict[str, PositiveInt] = {"mountaincar": 50, "cartpole": 30, "halfcheetah": 30}
    candidates: PositiveInt | dict[str, PositiveInt] = {"mountaincar": 1000, "cartpole": 1000, "halfcheetah": 200}
    # Paper: gamma 0.93 and the pessimistic minimum over ensemble members; authors' final code: 1.0 and mean.
    gamma: Annotated[float, Field(gt=0, le=1)] = 0.93
    aggregate: Literal["min", "mean"] = "min"
    # CEM (authors' code): elites, refinement iterations after the first sample, smoothing of mean/std.
    elites: PositiveInt = 50
    iterations: Annotated[int, Field(ge=0)] = 5
    smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.1
    init_std: Annotated[float, Field(gt=0)] = 0.5
    # Largest members x episodes x candidates batch scored in one tensor op (memory bound).
    max_rows: PositiveInt = 100_000

    @model_validator(mode="after")
    def _elites_fit(self) -> "PlannerSpec":
        smallest = min(self.candidates.values()) if isinstance(self.candidates, dict) else self.candidates
        if self.elites > smallest:
            raise ValueError(f"elites ({self.elites}) must not exceed candidates ({smallest})")
        return self


class PolicySpec(Strict):
    """Online-trained policies (paper Sec. 6.1, App. E): DQN for discrete envs, TD3 for HalfCheetah.

    Logging policies (one per policy-training agent) make the pure* regimes; test policies
    (default agent) drive the prediction-error test. Budgets are environment steps.
    """

    budget: PositiveInt | dict[str, PositiveInt] = {"mountaincar": 100_000, "cartpole": 5_000, "halfcheetah": 300_000}
    test_budget: PositiveInt | dict[str, PositiveInt] = {"mountaincar": 100_000, "cartpole": 5_000,
                                                         "halfcheetah": 300_000}
    hidden: list[PositiveInt] = [256, 256]
    seed: Annotated[int, Field(ge=0)] = 0
    # Parallel copies of the agent stepped together while training.
    n_envs: PositiveInt = 8

    @field_validator("budget", "test_budget")
    @classmethod
    def _env_keys(cls, value):
        return known_env_keys(value)


class EvaluationSpec(Strict):
    """Shared evaluation (paper Sec. 6.2-6.3, App. F)."""

    test_agents: list[Annotated[int, Field(ge=0, le=4)]] = [0, 1, 2, 3, 4]
    prediction_trajectories: PositiveInt = 200
    prediction_steps: PositiveInt = 50
    # One-step burn-in before the open-loop window (authors' code: 10).
    burn_in: Annotated[int, Field(ge=0)] = 10
    reward_episodes: PositiveInt = 20
    # Episodes per test agent for model-free policies (BCQ), cheap to run (paper: 100).
    policy_reward_episodes: PositiveInt = 100
    # Actions of the prediction test: the trained test policy (paper) or a hand-written controller.
    prediction_policy: Literal["trained", "heuristic"] = "trained"
    # Episode cap for reward episodes; the paper's horizon when absent.
    max_steps: dict[str, PositiveInt] = {}

    def episode_steps(self, env: str) -> int:
        return self.max_steps.get(env, ENVS[env].horizon)


class Resources(Strict):
    """What one trial of an algorithm reserves on the Ray cluster."""

    cpu: Annotated[float, Field(gt=0)] = 1.0
    gpu: Annotated[float, Field(ge=0)] = 0.0


STAGE_KEYS = (*ALGOS, "rank_cv")


class Grid(Strict):
    name: str
    seed: Annotated[int, Field(ge=0)] = 0
    envs: list[str]
    regimes: list[str]
    algos: list[str] = list(ALGOS)
    # Repeats of every experiment (the paper: 5); each seed drives training, planning and evaluation.
    seeds: list[Annotated[int, Field(ge=0)]] = [0, 1, 2, 3, 4]
    data: DataSpec = DataSpec()
    policies: PolicySpec = PolicySpec()
    persim: PersimSpec = PersimSpec()
    cadm: CadmSpec = CadmSpec()
    bcq: BCQSpec = BCQSpec()
    planner: PlannerSpec = PlannerSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    # Per algorithm (or "rank_cv"): CPUs/GPUs per trial; 1 CPU when absent.
    resources: dict[str, Resources] = {}
    # Times Tune restarts a trial whose worker or node died; errors of the trial's own code are
    # recorded once and not retried (they would fail again).
    max_failures: Annotated[int, Field(ge=0)] = 2

    @field_validator("resources")
    @classmethod
    def _known_resource_keys(cls, value: dict) -> dict:
        return check_known("algorithm or stage", value, STAGE_KEYS) and value

    def trial_resources(self, key: str) -> Resources:
        return self.resources.get(key, Resources())

    @field_validator("envs", "regimes", "algos")
    @classmethod
    def _known_names(cls, names: list[str], info: ValidationInfo) -> list[str]:
        kind, allowed = {"envs": ("env", ENVS), "regimes": ("regime", REGIMES), "algos": ("algorithm", ALGOS)}[info.field_name]
        return check_known(kind, names, allowed)

    @model_validator(mode="after")
    def _non_empty(self) -> "Grid":
        for key in ("envs", "regimes", "algos", "seeds"):
            if not getattr(self, key):
                raise ValueError(f"{key} must name at least one entry")
        return self

    def narrowed(self, envs: list[str] | None = None, regimes: list[str] | None = None,
                 algos: list[str] | None = None, seeds: list[int] | None = None) -> "Grid":
        """The same grid restricted from the command line (``--env``, ``--regime``, ``--algo``, ``--seed``)."""
        update = {"envs": envs or self.envs, "regimes": regimes or self.regimes,
                  "algos": algos or self.algos, "seeds": seeds or self.seeds}
        for key, chosen in update.items():
            extra = sorted(set(chosen) - set(getattr(self, key)))
            if extra:
                raise GridError(f"--{key[:-1]} {', '.join(map(str, extra))}: not in grid {self.name!r} "
                               f"({', '.join(map(str, getattr(self, key)))})")
        return self.model_copy(update=update)


def grid_path(name_or_path: str | Path) -> Path:
    """A grid given by name (``smoke`` -> tune_configs/smoke.yaml) or by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        return path
    for candidate in (Path.cwd() / "tune_configs" / f"{path}.yaml", CONFIG_DIR / f"{path}.yaml"):
        if candidate.exists():
            return candidate
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise GridError(f"unknown grid {str(name_or_path)!r}; known: {', '.join(known)} (or a path to a .yaml)")


def deep_merge(base: dict, override: dict) -> dict:
    """``override`` on top of ``base``; nested mappings merge, anything else replaces."""
    merged = dict(base)
    for key, value in override.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(
            merged.get(key), dict) else value
    return merged


def load_grid(name_or_path: str | Path) -> Grid:
    """A grid file, validated. ``extends: <grid>`` starts from another grid's YAML and overrides parts of it."""
    path = grid_path(name_or_path)
    raw = _load_raw(path, ())
    try:
        return Grid.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "(top level)"
        message = first["msg"].removeprefix("Value error, ")
        more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
        raise GridError(f"{path}: {field}: {message}{more}") from None


def _load_raw(path: Path, seen: tuple[Path, ...]) -> dict:
    if path.resolve() in seen:
        raise GridError(f"{path}: extends itself ({' -> '.join(map(str, seen))})")
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise GridError(f"{path}: no such grid file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise GridError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    if not isinstance(raw, dict):
        raise GridError(f"{path}: a grid must be a YAML mapping, got {type(raw).__name__}")
    base = raw.pop("extends", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise GridError(f"{path}: extends: expected a grid name or path, got {base!r}")
    base_path = path.parent / base if base.endswith((".yaml", ".yml")) else grid_path(base)
    return deep_merge(_load_raw(base_path, (*seen, path.resolve())), raw)
