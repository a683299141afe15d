"""Analysis: the grid's tables and figures, and the reproduction report (the paper's numbers against ours,
bootstrap and rliable statistics, Figure 1), all built from plain records.

Pure numpy / matplotlib / scikit-learn / rliable: no Ray, Tune, MLflow, persim_bench.config or algorithm registry
(method labels come in as arguments), so it runs on exported records anywhere. sklearn, matplotlib and rliable load only when a function needs them.
"""
from persim_bench.analysis.factors import agent_matrix, probe_r2, tsne_embedding, tsne_figure
from persim_bench.analysis.paper import PaperValue, PaperValuesError, canonical, load_paper_values, lookup
from persim_bench.analysis.reproduction import Report, build_report, our_cells, reproduction_tables
from persim_bench.analysis.stats import (Interval, aggregate_metrics, bootstrap_ci, normalise,
                                         performance_profile_figure, performance_profiles)

__all__ = ["PaperValue", "PaperValuesError", "load_paper_values", "lookup", "canonical", "bootstrap_ci", "normalise",
           "Interval", "aggregate_metrics", "performance_profiles", "performance_profile_figure", "agent_matrix",
           "tsne_embedding", "tsne_figure", "probe_r2", "Report", "build_report", "reproduction_tables", "our_cells"]
