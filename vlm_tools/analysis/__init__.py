"""Analysis tools: what pruning does to a model (text dominance: MDI / AEI per decoder layer and stage)."""

from vlm_tools.analysis.collector import DominanceCollector
from vlm_tools.analysis.dominance import dominance
from vlm_tools.analysis.metrics import DominanceStats, compute_stats, stage_layers
from vlm_tools.analysis.report import DominanceReport, plot_comparison

__all__ = ["DominanceCollector", "DominanceReport", "DominanceStats", "compute_stats", "dominance",
           "plot_comparison", "stage_layers"]
