"""Nested data-size subsets of a dataset (grid ``data_sizes``, docs/efficiency.md).

A subset of N agents is the paper's test agents 0-4 plus the first N - 5 agents of one fixed
permutation of the others, drawn from the grid's seed and the env alone: the same agents for
every regime, algorithm and trial seed, and every smaller subset inside every larger one, so a
curve over N measures the amount of data, not the luck of the draw. Each agent may keep only the
first k transitions of its trajectory; the cut is marked ``truncated`` (like a time limit).
Agents are renumbered 0..N-1 in id order, so the test agents keep ids 0-4.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from typing import Protocol

import numpy as np

from persim_bench.data.dataset import Transitions
from persim_bench.envs import get_env

# The DatasetPlan.rng stream of the permutation: () draws the covariates, (regime + 1, shard) the shards.
SUBSET_STREAM = 0


class PlanLike(Protocol):
    env: str
    n_agents: int
    fingerprint: str

    def rng(self, *stream: int) -> np.random.Generator: ...


def subset_agents(plan: PlanLike, agents: int | None) -> np.ndarray:
    """Sorted ids of the first ``agents`` agents of the nested order (all agents when None)."""
    if agents is None:
        return np.arange(plan.n_agents)
    n_test = len(get_env(plan.env).test_agents)
    if not n_test <= agents <= plan.n_agents:
        raise ValueError(f"{plan.env}: a subset of {agents} agents needs {n_test} <= agents <= {plan.n_agents}")
    others = n_test + plan.rng(SUBSET_STREAM).permutation(plan.n_agents - n_test)
    return np.sort(np.concatenate([np.arange(n_test), others[:agents - n_test]]))


def take_subset(data: Transitions, agent_ids: np.ndarray, steps_per_agent: int | None) -> Transitions:
    """The transitions of ``agent_ids`` (renumbered 0..N-1), each agent's first ``steps_per_agent`` (None: all)."""
    renumber = np.full(data.n_agents, -1)
    renumber[agent_ids] = np.arange(len(agent_ids))
    keep = renumber[data.agent] >= 0
    truncated = data.truncated.copy()
    if steps_per_agent is not None:
        keep &= data.t < steps_per_agent
        truncated |= (data.t == steps_per_agent - 1) & ~data.terminated
    return replace(data, agent=renumber[data.agent[keep]], t=data.t[keep], obs=data.obs[keep],
                   action=data.action[keep], reward=data.reward[keep], next_obs=data.next_obs[keep],
                   terminated=data.terminated[keep], truncated=truncated[keep], covariates=data.covariates[agent_ids])


def subset_record(plan: PlanLike, agents: int | None, steps_per_agent: int | None) -> dict:
    """What identifies a subset, as its trial records it in MLflow (``data_subset.json``): the agents' ids,
    the cut, the dataset's fingerprint and a fingerprint of all three."""
    ids = subset_agents(plan, agents).tolist()
    key = {"dataset": plan.fingerprint, "agent_ids": ids, "steps_per_agent": steps_per_agent}
    fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return {"agents": len(ids), "steps_per_agent": steps_per_agent, "agent_ids": ids,
            "dataset_fingerprint": plan.fingerprint, "fingerprint": fingerprint}
