"""Reproduction analysis: the paper's numbers, bootstrap and rliable statistics, Figure 1 and the report.

Pure numpy / matplotlib / scikit-learn / rliable: no Ray, Tune, MLflow or persim_bench.config, so it
runs on exported records anywhere. sklearn, matplotlib and rliable load only when a function needs them.
"""
from persim_bench.analysis.factors import agent_matrix, probe_r2, tsne_embedding, tsne_figure
from persim_bench.analysis.paper import PaperValue, PaperValuesError, canonical, load_paper_values, lookup
from persim_bench.analysis.report import Report, build_report, build_tables, our_cells
from persim_bench.analysis.stats import (Interval, aggregate_metrics, bootstrap_ci, normalise,
                                         performance_profile_figure, performance_profiles)

__all__ = ["PaperValue", "PaperValuesError", "load_paper_values", "lookup", "canonical", "bootstrap_ci", "normalise",
           "Interval", "aggregate_metrics", "performance_profiles", "performance_profile_figure", "agent_matrix",
           "tsne_embedding", "tsne_figure", "probe_r2", "Report", "build_report", "build_tables", "our_cells"]
