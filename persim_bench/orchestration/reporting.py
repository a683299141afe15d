"""How much a run prints: the verbosity of ``-q``/``-v``, Tune's output at it, one line per finished trial.

The CLI sets the verbosity once (``configure``); it lives in the environment variable
``PERSIM_BENCH_VERBOSITY`` so that the science layer (the data stages' progress bars) can read it
without importing this module, and so that a user may set it instead of passing ``-q``/``-v``.

=========  ===================================================  ==============================
level      prints                                               Tune ``RunConfig(verbose=)``
=========  ===================================================  ==============================
quiet      warnings and each command's one-line result; a       0, Tune's own output off
           failed trial as a warning; no progress bars
normal     + progress bars on a terminal, one line per          0, plus a short box per stage
           finished trial (``[main 3/107] name: done, ...``),
           and a fit's epoch at most once a minute per trial
verbose    + Tune's per-trial tables and status tables (-v)     1
debug      + every intermediate result Tune sees (-vv)          2
=========  ===================================================  ==============================
"""
from __future__ import annotations

import logging
import os
import sys

ENV = "PERSIM_BENCH_VERBOSITY"
LEVELS = ("quiet", "normal", "verbose", "debug")
_LOGGER_LEVELS = {"quiet": logging.WARNING, "normal": logging.INFO, "verbose": logging.DEBUG, "debug": logging.DEBUG}
_TUNE_VERBOSE = {"quiet": 0, "normal": 0, "verbose": 1, "debug": 2}
_HANDLER_NAME = "persim-bench-cli"

log = logging.getLogger("persim_bench")


def level_of(quiet: bool, verbose: int) -> str:
    """The level of ``-q`` (quiet) or ``-v`` counted ``verbose`` times (0: normal)."""
    if quiet:
        return "quiet"
    return LEVELS[1 + min(verbose, 2)]


def verbosity() -> str:
    """The level in force: ``$PERSIM_BENCH_VERBOSITY`` if it names one, else ``normal``."""
    value = os.environ.get(ENV, "normal").strip().lower()
    return value if value in LEVELS else "normal"


def configure(level: str | None = None) -> str:
    """Set the verbosity (None: keep the environment's) for this process and the Ray workers it starts.

    Sets the ``persim_bench`` logger's level (with a stderr handler if logging is unconfigured)
    and, at ``quiet``, MLflow's log level to WARNING and Tune's legacy output engine, whose
    ``verbose=0`` prints nothing (the new one still prints a box per stage). Returns the level.
    """
    if level is not None:
        if level not in LEVELS:
            raise ValueError(f"verbosity {level!r}: expected one of {', '.join(LEVELS)}")
        os.environ[ENV] = level
    level = verbosity()
    log.setLevel(_LOGGER_LEVELS[level])
    # A handler of our own only where nobody configured logging (the CLI): under an application or
    # pytest, records propagate to the root's handlers as before, and no line is printed twice.
    if not logging.getLogger().handlers and not any(h.get_name() == _HANDLER_NAME for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.set_name(_HANDLER_NAME)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
    if level in ("quiet", "normal"):  # MLflow's download bars (the report's figures) are not progress of ours
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        # Tune warns at every snapshot its checkpoints force (num_to_keep=1, on purpose: stages.run_stage)
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if level == "quiet":  # set before Ray starts: its workers (the trials) inherit them
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    return level


def quiet() -> bool:
    return verbosity() == "quiet"


def ray_logging_level() -> int:
    """``ray.init(logging_level=)``: Ray's own INFO lines (cluster started, ...) only with -v."""
    return logging.INFO if verbosity() in ("verbose", "debug") else logging.WARNING


def tune_verbosity() -> int:
    """``tune.RunConfig(verbose=)``: Tune's per-trial tables only with -v, its intermediate results with -vv."""
    return _TUNE_VERBOSE[verbosity()]


def main_metric(result: dict) -> str:
    """The number a finished trial is judged by: mean reward, else mean RMSE, else rank_cv's val_loss."""
    for prefix, label in (("reward_agent", "reward"), ("rmse_agent", "rmse")):
        values = [v for k, v in result.items() if k.startswith(prefix) and isinstance(v, (int, float))]
        if values:
            return f"{label} {sum(values) / len(values):.4g} (mean of {len(values)} agents)"
    if isinstance(result.get("val_loss"), (int, float)):
        return f"val_loss {result['val_loss']:.4g}"
    return ""


def trial_line(stage: str, done: int, total: int | None, name: str, result: dict, errored: str | None = None) -> str:
    """``[main 3/107] persim-cartpole-random-r2-s0: done, reward 178.4 (mean of 10 agents), 12.3 s``."""
    count = f"{done}/{total}" if total else str(done)
    seconds = result.get("time_total_s")
    took = f", {seconds:.1f} s" if isinstance(seconds, (int, float)) else ""
    if errored is not None:
        return f"[{stage} {count}] {name}: FAILED (Tune gave up): {errored}{took}"
    if result.get("stage") == "failed":
        return f"[{stage} {count}] {name}: FAILED: {result.get('error', '?')}{took}"
    reused = " (reused: finished in an earlier attempt)" if result.get("reused") else ""
    metric = main_metric(result)
    return f"[{stage} {count}] {name}: {result.get('stage', 'ended')}{reused}{', ' + metric if metric else ''}{took}"


FIT_LINE_EVERY_S = 60.0  # a fit's progress line at most this often per trial: long fits show they move, short stay quiet
FIT_METRICS = ("train_loss", "val_loss")


def fit_line(stage: str, name: str, result: dict) -> str:
    """``[main] persim-halfcheetah-random-r20-s0: fitting, epoch 3, train_loss 0.0123, 212 s per epoch, 640 s``."""
    where = [f"{key} {result[key]}" for key in ("iteration", "epoch") if key in result]
    losses = [f"{key} {result[key]:.4g}" for key in FIT_METRICS if isinstance(result.get(key), (int, float))]
    per_epoch = result.get("epoch_seconds")
    pace = [f"{per_epoch:.0f} s per epoch"] if isinstance(per_epoch, (int, float)) else []
    seconds = result.get("time_total_s")
    took = [f"{seconds:.0f} s"] if isinstance(seconds, (int, float)) else []
    return f"[{stage}] {name}: " + ", ".join(["fitting", *where, *losses, *pace, *took])


def stage_and_name(trial) -> tuple[str, str]:
    """The stage and name our trainable's config gives a Tune trial."""
    config = trial.config.get("trial", {}) if isinstance(trial.config, dict) else {}
    return config.get("stage", "trial"), config.get("name", str(trial))


def trial_lines() -> list:
    """Tune callbacks printing one line per finished trial (a failed one as a warning when quiet), and a line
    per fit epoch of a trial that has run a minute since its last one (``fit_line``; not when quiet).

    The level is read when a trial finishes, so a restored experiment follows the current ``-q``/``-v``.
    """
    from ray.tune import Callback

    class TrialLines(Callback):
        def __init__(self):
            self.total = None
            self.fit_printed_at: dict[str, float] = {}  # trial id -> its time_total_s at its last fit line

        def setup(self, stop=None, num_samples=None, total_num_samples=None, **info):
            self.total = total_num_samples

        def _line(self, trials, trial, errored: str | None = None) -> None:
            # Tune calls these hooks before it sets the trial's final status: count the trial itself.
            done = len({t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")} | {trial.trial_id})
            total = self.total if self.total and self.total < sys.maxsize else len(trials)
            stage, name = stage_and_name(trial)
            result = trial.last_result or {}
            line = trial_line(stage, done, total, name, result, errored)
            failed = errored is not None or result.get("stage") == "failed"
            if verbosity() == "quiet":
                if failed:
                    log.warning(line)
            else:
                print(line, flush=True)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            """A fit's epoch, printed once a trial has run FIT_LINE_EVERY_S since its last such line (or its start)."""
            seconds = result.get("time_total_s")
            if result.get("stage") != "fit" or verbosity() not in ("normal", "verbose") or \
                    not isinstance(seconds, (int, float)):
                return
            if seconds - self.fit_printed_at.get(trial.trial_id, 0.0) >= FIT_LINE_EVERY_S:
                self.fit_printed_at[trial.trial_id] = seconds
                print(fit_line(*stage_and_name(trial), result), flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._line(trials, trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            try:
                lines = [line for line in (trial.get_error() or "").splitlines() if line.strip()]
            except (OSError, UnicodeDecodeError):  # the error file is Tune's; a line without it beats no line
                lines = []
            self._line(trials, trial, errored=lines[-1].strip()[:300] if lines else "see Tune's error file")

    return [TrialLines()]
