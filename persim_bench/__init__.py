"""persim-bench: the PerSim (NeurIPS 2021) experiments on Ray, Tune and MLflow."""
__version__ = "0.1.0"
