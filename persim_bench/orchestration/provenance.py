"""Where a run's numbers came from: package version, git commit, the resolved grid, the datasets read, saved models.

Every MLflow run carries ``provenance_tags``; a trial that read a dataset logs it as an MLflow
dataset input whose digest is the manifest's fingerprint; a trial's trained model is a MLflow
LoggedModel (``mlflow.search_logged_models`` finds it) that ``persim-bench evaluate`` reloads.
"""
from __future__ import annotations

import functools
import subprocess
from pathlib import Path

import persim_bench
from persim_bench.data.dataset import MANIFEST, dataset_dir, read_manifest

PACKAGE_DIR = Path(persim_bench.__file__).parent


@functools.cache
def git_commit() -> dict[str, str]:
    """The commit of the checkout the package runs from (and whether it has uncommitted changes); {} outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(PACKAGE_DIR), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"persim_bench.git_commit": commit, "persim_bench.git_dirty": str(dirty).lower()}


def provenance_tags() -> dict[str, str]:
    return {"persim_bench.version": persim_bench.__version__, **git_commit()}


def dataset_input(data_root: Path, grid_name: str, env: str, regime: str):
    """The dataset a trial read, as an MLflow dataset input (digest: the manifest's fingerprint); None without one."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    folder = dataset_dir(data_root, env, regime)
    if not (folder / MANIFEST).exists():
        return None
    manifest = read_manifest(folder)
    dataset = Dataset(name=f"{grid_name}/{env}/{regime}", digest=manifest["fingerprint"], source_type="local",
                      source=str(folder), schema=None,
                      profile=f'{{"transitions": {manifest["rows"]}, "agents": {manifest["n_agents"]}}}')
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])


def log_dataset_input(client, run_id: str, read) -> None:
    """Log ``read`` on ``run_id``; trials that start together race to insert the same dataset row.

    MLflow looks a dataset up by (experiment, name, digest) and inserts it when missing; two
    concurrent trials both miss it and one insert fails on the UNIQUE constraint. Its retry finds the
    row the other inserted.
    """
    from mlflow.exceptions import MlflowException

    for attempt in range(3):
        try:
            client.log_inputs(run_id, datasets=[read])
            return
        except MlflowException as err:
            if "UNIQUE constraint failed" not in str(err) or attempt == 2:
                raise


def log_trained_model(client, experiment_id: str, run_id: str, trial_name: str, algo: str, files: list[Path]) -> str:
    """The trial's saved model files as a LoggedModel produced by ``run_id``; returns its model id."""
    from mlflow.entities import LoggedModelOutput

    model = client.create_logged_model(experiment_id, name=trial_name, source_run_id=run_id, model_type=algo,
                                       tags={"algo": algo, **provenance_tags()})
    for folder in sorted({Path(path).parent for path in files}):  # MLflow uploads folders, not files
        client.log_model_artifacts(model.model_id, str(folder))
    client.finalize_logged_model(model.model_id, "READY")
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    return model.model_id
