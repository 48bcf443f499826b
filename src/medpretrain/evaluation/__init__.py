"""Evaluation: per-case metrics (MONAI), summaries, figures and written reports."""

from medpretrain.evaluation.metrics import (
    HIGHER_IS_BETTER,
    METRIC_NAMES,
    case_metrics,
    summarize,
    volume_diagonal_mm,
)
from medpretrain.evaluation.plots import save_label_efficiency_plot, save_overlay, save_training_curve
from medpretrain.evaluation.report import EMPTY_CASE_NOTE, PER_CASE_COLUMNS, write_evaluation

__all__ = [
    "EMPTY_CASE_NOTE",
    "HIGHER_IS_BETTER",
    "METRIC_NAMES",
    "PER_CASE_COLUMNS",
    "case_metrics",
    "save_label_efficiency_plot",
    "save_overlay",
    "save_training_curve",
    "summarize",
    "volume_diagonal_mm",
    "write_evaluation",
]
