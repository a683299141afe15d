"""The paper's reported numbers, transcribed once into ``paper_values.csv`` and validated on load.

What the CSV holds (one row per printed cell, the value exactly as printed so its precision is known):

- ``rmse`` and ``r2`` (mean RMSE and median R^2 of 50-step open-loop predictions): main-text
  Tables 2-4 (three test agents each) and appendix Tables 9-11 (all five agents);
- ``reward`` (mean +- std over 5 repeats): Tables 5-7 (three agents) and 12-14 (five agents),
  True env + MPC under regime ``none`` (it uses no data);
- Table 8 (method ``data``): ``data_return_test_agent`` (agents 0-4), ``data_mean_return`` and
  ``data_mean_length`` (over all 500 agents, ``agent`` empty).

Agents are our indices 0-4 = the paper's "Agent 1".."Agent 5" (appendix column order). The main
text shows a subset: Tables 2, 3, 5, 6 show agents 0, 3, 4 (MountainCar 0.0001, 0.0025, 0.0035;
CartPole (2/0.5), (10/0.85), (10/0.15)); Tables 4 and 7 (HalfCheetah) show agents 0, 1, 2.
Every main-text cell is also in the appendix (except item 2 below); the two transcriptions agree
to the printed rounding (checked by the tests: a double entry against transcription slips), and
lookups without a table prefer the main text.

Ambiguities in the paper's text (``shared/paper/persim-neurips2021.txt``) and what the CSV does:

1. Table 2 lost its "Pure-eps-40" label and its PerSim row in the text; the two unlabelled rows
   equal Table 9's Pure-eps-40 CaDM rows, so they are recorded as ``pure-eps-40``. PerSim's
   MountainCar Pure-eps-40 prediction error comes from Table 9 only.
2. Table 9, Random, PerSim prints a single cell "0.001 (1.000)" for the row (probably one merged
   cell for all agents): recorded for agent 0 only; agents 3 and 4 come from Table 2 (same value);
   agents 1 and 2 have no recorded prediction error for PerSim / Random / MountainCar.
3. Table 9, Pure-eps-20, Vanilla CaDM, agent 1 prints RMSE "0.67-" (last digit unreadable): not
   recorded (its R^2, -2.491, is).
4. Table 10, Pure-eps-40, Vanilla CaDM, agent 0 prints R^2 "21.912"; R^2 cannot exceed 1 and
   Table 3 prints -21.912: recorded as -21.912.
5. Rounding differences between main text and appendix: PE-TS CaDM / Pure / MountainCar agent 4
   R^2 -11.44 (Table 2) vs -11.438 (Table 9); Vanilla CaDM / Random / HalfCheetah agent 1 reward
   std 151 (Table 7) vs 150.5 (Table 14).
6. Repeated values that may be copy errors in the paper: Table 11 Vanilla CaDM agent 3 RMSE 81.66
   in both Pure-eps-20 and Pure-eps-40 (R^2 differ); Table 13 PerSim / Random agents 2 and 3 both
   175.9, BCQ-A / Pure agents 2 and 3 both 79.20; Table 14 PE-TS CaDM / Pure-eps-20 agents 2 and 3
   both -323.1 (stds differ each time). Recorded as printed.
7. True env + MPC on HalfCheetah (Tables 7, 14): 7459, 42893, 66675, 1746, 36344 -- 3-100x any
   learned method's, i.e. a mean forward velocity of up to about 67 m/s over 1000 steps, and agent 3
   (1.7/1.7) is 4-38x below the other agents. Recorded as printed; the reward scale or episode
   length behind them is unclear, so the report normalises by our own True env + MPC runs.
8. Table 8 labels "Pure-eps-2" / "Pure-eps-4" are Pure-eps-20 / Pure-eps-40. MountainCar's mean
   length exceeds minus the mean return by 0.988 (pure), 0.020 (random), 0.962, 0.902: the authors'
   episodes apparently give 0 reward on the goal step (or count one more state), so return and
   length are not interchangeable there. CartPole: return = length. HalfCheetah: length 1000.
9. Rewards are "mean and standard deviation" over 5 repeats; the paper does not say whether the
   std is the sample (ddof=1) or population std.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

CSV_NAME = "paper_values.csv"
COLUMNS = ["table", "quantity", "env", "regime", "method", "agent", "value", "std"]
ENVS = ("mountaincar", "cartpole", "halfcheetah")
REGIMES = ("pure", "random", "pure-eps-20", "pure-eps-40", "none")
METHODS = ("persim", "cadm_vanilla", "cadm_pets", "bcq_p", "bcq_a", "true_env_mpc", "data")
PREDICTION = ("rmse", "r2")
DATA_QUANTITIES = ("data_return_test_agent", "data_mean_return", "data_mean_length")
QUANTITIES = (*PREDICTION, "reward", *DATA_QUANTITIES)
N_TEST_AGENTS = 5
# Main-text table -> the appendix table repeating it with all five agents.
APPENDIX_OF = {"Table 2": "Table 9", "Table 3": "Table 10", "Table 4": "Table 11",
               "Table 5": "Table 12", "Table 6": "Table 13", "Table 7": "Table 14"}
MAIN_TEXT_TABLES = frozenset({*APPENDIX_OF, "Table 8"})

Key = tuple[str, str, str, str, "int | None"]  # (quantity, env, regime, method, agent)


class PaperValuesError(ValueError):
    """A malformed paper-values CSV; the message names the file and line."""


@dataclass(frozen=True)
class PaperValue:
    """One printed cell of the paper. ``decimals`` is the printed precision (for tolerances)."""

    table: str
    quantity: str
    env: str
    regime: str
    method: str
    agent: int | None
    value: float
    std: float | None
    decimals: int
    line: int

    @property
    def key(self) -> Key:
        return self.quantity, self.env, self.regime, self.method, self.agent

    @property
    def resolution(self) -> float:
        """Half a unit of the last printed digit: the paper's value lies within +- this."""
        return 0.5 * 10.0 ** -self.decimals


def default_path() -> Path:
    return Path(str(resources.files("persim_bench.analysis") / CSV_NAME))


def load_paper_values(path: str | Path | None = None) -> list[PaperValue]:
    """Read and validate the CSV (the packaged one by default); any bad row raises with file:line."""
    path = Path(path) if path is not None else default_path()
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != COLUMNS:
            raise PaperValuesError(f"{path}:1: header must be {','.join(COLUMNS)}, got {header}")
        values = [_parse_row(row, path, line) for line, row in enumerate(reader, start=2)]
    seen: dict[tuple, int] = {}
    for v in values:
        full = (v.table, *v.key)
        if full in seen:
            raise PaperValuesError(f"{path}:{v.line}: duplicate of line {seen[full]} ({', '.join(map(str, full))})")
        seen[full] = v.line
    return values


def _parse_row(row: list[str], path: Path, line: int) -> PaperValue:
    def fail(message: str) -> PaperValuesError:
        return PaperValuesError(f"{path}:{line}: {message}")

    if len(row) != len(COLUMNS):
        raise fail(f"expected {len(COLUMNS)} fields, got {len(row)}")
    table, quantity, env, regime, method, agent, value, std = (cell.strip() for cell in row)
    if not (table.startswith("Table ") and table[6:].isdigit()):
        raise fail(f"table must look like 'Table 2', got {table!r}")
    for name, got, allowed in (("quantity", quantity, QUANTITIES), ("env", env, ENVS), ("regime", regime, REGIMES),
                               ("method", method, METHODS)):
        if got not in allowed:
            raise fail(f"{name} {got!r} is not one of {', '.join(allowed)}")
    if (method == "data") != (quantity in DATA_QUANTITIES):
        raise fail(f"quantity {quantity!r} does not go with method {method!r}")
    if (method == "true_env_mpc") != (regime == "none"):
        raise fail("regime 'none' is for true_env_mpc only, and true_env_mpc has no other regime")
    per_agent = quantity not in ("data_mean_return", "data_mean_length")
    if per_agent != (agent != ""):
        raise fail(f"agent must be {'0-4' if per_agent else 'empty'} for {quantity}, got {agent!r}")
    if agent and agent not in {str(a) for a in range(N_TEST_AGENTS)}:
        raise fail(f"agent must be 0-{N_TEST_AGENTS - 1}, got {agent!r}")
    number = _number(value, "value", fail)
    spread = _number(std, "std", fail) if std else None
    if spread is not None and spread < 0:
        raise fail(f"std must be >= 0, got {std}")
    if quantity == "r2" and number > 1:
        raise fail(f"R^2 cannot exceed 1, got {value}")
    decimals = len(value.partition(".")[2])
    return PaperValue(table, quantity, env, regime, method, int(agent) if agent else None, number, spread, decimals,
                      line)


def _number(text: str, name: str, fail) -> float:
    try:
        number = float(text)
    except ValueError:
        raise fail(f"{name} {text!r} is not a number") from None
    if not math.isfinite(number):
        raise fail(f"{name} {text!r} is not finite")
    return number


def _preference(value: PaperValue) -> tuple[bool, int]:
    """Main text before appendix, then by table number: the order lookups pick cells in."""
    return value.table not in MAIN_TEXT_TABLES, int(value.table.removeprefix("Table "))


def lookup(values: list[PaperValue], quantity: str, env: str, regime: str, method: str, agent: int | None,
           table: str | None = None) -> PaperValue | None:
    """The paper's cell, from ``table`` if given, else the main text's when printed there, else the appendix's."""
    matches = [v for v in values if v.key == (quantity, env, regime, method, agent)
               and (table is None or v.table == table)]
    return min(matches, key=_preference) if matches else None


def canonical(values: list[PaperValue]) -> dict[Key, PaperValue]:
    """One value per cell (main text preferred), keyed by (quantity, env, regime, method, agent)."""
    best: dict[Key, PaperValue] = {}
    for v in sorted(values, key=_preference):
        best.setdefault(v.key, v)
    return best


def tables_of(values: list[PaperValue], key: Key) -> list[str]:
    """Every table printing this cell, main text first (e.g. ['Table 5', 'Table 12'])."""
    return [v.table for v in sorted((v for v in values if v.key == key), key=_preference)]
