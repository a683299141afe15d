"""Uncertainty for the reproduction report: a two-level bootstrap for one cell, and the field's
aggregate metrics (Agarwal et al. 2021, ``rliable``) over all cells.

Why the stratified bootstrap is a numpy port and not ``rliable.library``: rliable 1.2.0 pins
``arch<8`` and arch 7.x fails to import under pandas 3 (which MLflow pulls in), so
``rliable.library`` cannot be imported in this environment; its ``StratifiedBootstrap`` also draws
from numpy's global RNG, ignoring ``random_state``. The point statistics themselves are
``rliable.metrics``' functions (IQM, optimality gap, mean, median) and the profile figure is drawn
by ``rliable.plot_utils``; the resampling (runs with replacement, independently per task; percentile
intervals) is rliable's, seeded by a ``numpy.random.Generator``.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from persim_bench.analysis.tabular import method_colours, save_figure

DEFAULT_BOOT = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap confidence interval."""

    point: float
    low: float
    high: float


def _groups(samples) -> list[np.ndarray]:
    """Seeds x episodes as a list of 1-D arrays; a flat sequence of numbers is one value per seed."""
    if isinstance(samples, np.ndarray) and samples.ndim == 1 or (
            len(samples) and all(np.isscalar(s) for s in samples)):
        samples = [[s] for s in samples]
    groups = [np.asarray(g, dtype=np.float64).ravel() for g in samples]
    if not groups or any(g.size == 0 for g in groups):
        raise ValueError("bootstrap_ci: need at least one seed, and at least one episode per seed")
    if not all(np.isfinite(g).all() for g in groups):
        raise ValueError("bootstrap_ci: samples contain NaN or infinity")
    return groups


def bootstrap_ci(samples, n_boot: int = DEFAULT_BOOT, seed: int = 0,
                 level: float = LEVEL) -> tuple[float, float, float]:
    """(mean, low, high) of the mean over seeds of per-seed mean returns, by a two-level bootstrap.

    Why two levels: seeds are the repeats of the experiment and episodes are noisy measurements
    within one seed, so both vary. Each replicate draws seeds with replacement, then for every
    drawn seed draws its episodes with replacement (independently each time a seed is drawn),
    and averages per-seed means with equal weight per seed (the paper's mean over repeats).
    ``samples``: a sequence of per-seed episode sequences (ragged allowed) or a [seeds, episodes]
    array; a flat sequence of numbers is one value per seed (a plain bootstrap over seeds).
    """
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError(f"bootstrap_ci: need 0 < level < 1 and n_boot >= 1, got {level}, {n_boot}")
    groups = _groups(samples)
    mean = float(np.mean([g.mean() for g in groups]))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(groups), size=(n_boot, len(groups)))
    seed_means = np.empty(picks.shape)
    for index, group in enumerate(groups):
        slots = picks == index
        draws = rng.integers(0, group.size, size=(int(slots.sum()), group.size))
        seed_means[slots] = group[draws].mean(axis=1)
    low, high = np.quantile(seed_means.mean(axis=1), [(1 - level) / 2, (1 + level) / 2])
    return mean, float(low), float(high)


def normalise(score: float | np.ndarray, random_score: float, reference_score: float) -> float | np.ndarray:
    """0 = a uniformly random policy, 1 = the reference (True env + MPC): comparable across envs and agents."""
    if reference_score == random_score:
        raise ValueError(f"normalise: reference and random score are equal ({reference_score}); the scale is undefined")
    return (np.asarray(score, dtype=np.float64) - random_score) / (reference_score - random_score)


def _aggregates() -> dict[str, Callable[[np.ndarray], float]]:
    from rliable import metrics

    return {"median": metrics.aggregate_median, "iqm": metrics.aggregate_iqm, "mean": metrics.aggregate_mean,
            "optimality_gap": metrics.aggregate_optimality_gap}


def _rng(seed: int, method: str) -> np.random.Generator:
    """One stream per method, independent of the dict's order."""
    return np.random.default_rng([seed, zlib.crc32(method.encode())])


def stratified_bootstrap(scores: np.ndarray, statistic: Callable[[np.ndarray], np.ndarray | float], n_boot: int,
                         rng: np.random.Generator) -> np.ndarray:
    """``statistic`` on ``n_boot`` resamples of a [runs, tasks] matrix, runs drawn with replacement per task."""
    scores = _matrix(scores)
    runs, tasks = scores.shape
    draws = rng.integers(0, runs, size=(n_boot, runs, tasks))
    resampled = scores[draws, np.arange(tasks)]
    return np.asarray([statistic(sample) for sample in resampled])


def _matrix(scores) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or 0 in scores.shape:
        raise ValueError(f"scores must be a non-empty [runs, tasks] matrix, got shape {scores.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity")
    return scores


def _percentiles(boot: np.ndarray, level: float) -> np.ndarray:
    return np.quantile(boot, [(1 - level) / 2, (1 + level) / 2], axis=0)


def aggregate_metrics(score_dict: Mapping[str, np.ndarray], n_boot: int = DEFAULT_BOOT, seed: int = 0,
                      level: float = LEVEL) -> dict[str, dict[str, Interval]]:
    """{method: {median, iqm, mean, optimality_gap: Interval}} of normalised [runs, tasks] scores.

    Why these: IQM (the mean of the middle 50% of all run x task scores) is robust to the few
    outlier tasks a small benchmark has, and the optimality gap (how far below 1 = the reference
    the scores fall, above-reference scores clipped) does not reward overshooting on one task.
    Intervals are stratified-bootstrap percentile CIs (runs resampled within each task).
    """
    result = {}
    for method, scores in score_dict.items():
        scores = _matrix(scores)
        result[method] = {}
        for name, function in _aggregates().items():
            boot = stratified_bootstrap(scores, function, n_boot, _rng(seed, f"{method}/{name}"))
            low, high = _percentiles(boot, level)
            result[method][name] = Interval(float(function(scores)), float(low), float(high))
    return result


def score_distribution(scores: np.ndarray, taus: np.ndarray) -> np.ndarray:
    """Fraction of all run x task scores above each threshold (rliable's performance profile)."""
    return (np.asarray(scores)[..., None] > np.asarray(taus)).reshape(-1, len(taus)).mean(axis=0)


def performance_profiles(score_dict: Mapping[str, np.ndarray], taus: Sequence[float], n_boot: int = DEFAULT_BOOT,
                         seed: int = 0, level: float = LEVEL) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(profiles, cis): per method the score distribution at ``taus`` and its [2, len(taus)] bootstrap band."""
    taus = np.asarray(taus, dtype=np.float64)
    profiles, cis = {}, {}
    for method, scores in score_dict.items():
        scores = _matrix(scores)
        profiles[method] = score_distribution(scores, taus)
        boot = stratified_bootstrap(scores, lambda s: score_distribution(s, taus), n_boot,
                                    _rng(seed, f"{method}/profile"))
        cis[method] = _percentiles(boot, level)
    return profiles, cis


def performance_profile_figure(score_dict: Mapping[str, np.ndarray], path: str | Path,
                               taus: Sequence[float] | None = None, n_boot: int = DEFAULT_BOOT, seed: int = 0,
                               level: float = LEVEL,
                               title: str = "Performance profiles (normalised score: 0 = random, 1 = True env + MPC)",
                               colours: Mapping[str, str] | None = None) -> Path:
    """PNG (and a PDF beside it) of every method's score distribution with its CI band, drawn by rliable's plot
    utils; each method in ``colours[method]``, by default ``tabular.method_colours`` of the method names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rliable import plot_utils

    if taus is None:
        top = max(1.0, max(float(np.max(s)) for s in score_dict.values()))
        taus = np.linspace(min(0.0, min(float(np.min(s)) for s in score_dict.values())), top, 101)
    profiles, cis = performance_profiles(score_dict, taus, n_boot, seed, level)
    colours = {**method_colours(score_dict), **(colours or {})}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    plot_utils.plot_performance_profiles(profiles, np.asarray(taus), performance_profile_cis=cis, ax=ax,
                                         colors={m: colours[m] for m in profiles},
                                         xlabel=r"normalised score $\tau$",
                                         ylabel=r"fraction of runs x tasks with score $> \tau$",
                                         labelsize="medium", ticklabelsize="medium")
    ax.legend(fontsize="small", loc="upper right")
    ax.set_title(title, fontsize="medium")
    return save_figure(fig, path)
