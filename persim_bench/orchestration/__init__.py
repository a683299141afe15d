"""The Ray Tune / MLflow layer: stages of a run, trials, rank cross-validation, tracking, cluster, estimates, tables.

Nothing in the science layer (envs, data, algos, planning, evaluate) imports this package.
"""
