"""Evaluating explanations: localisation against annotations, faithfulness to the model,
sanity checks under model randomisation, and complexity/robustness. All batched and torch-native,
on (B, *S) maps in 2D and 3D."""

from medlens.metrics.complexity import entropy, gini, max_sensitivity, method_explainer
from medlens.metrics.faithfulness import (
    Curve, confidence_change, faithfulness_metrics, noisy_linear_imputation, perturbation_curve, road,
)
from medlens.metrics.localisation import (
    PAPER_PERCENTAGES, auroc, average_precision, box_iou, boxes_to_masks, dice, empty_annotations,
    energy_pointing_game, localisation_metrics, mask_iou, pointing_game, relevance_mass,
    relevance_rank_accuracy, topk_box_iou,
)
from medlens.metrics.sanity import SanityResult, model_randomisation, spearman, ssim
from medlens.metrics.faithfulness_extra import (
    faithfulness_correlation, faithfulness_estimate, monotonicity_arya, monotonicity_nguyen, region_perturbation,
    selectivity, sensitivity_n,
)
from medlens.metrics.map_metrics import attribution_localisation, effective_complexity, top_k_intersection
from medlens.metrics.axiomatic import completeness, non_sensitivity
from medlens.metrics.randomisation import random_logit
from medlens.metrics.faithfulness_more import infidelity, irof, slic_segments, sufficiency
from medlens.metrics.mosaics import focus, make_mosaics
from medlens.metrics.mprt import efficient_mprt, model_explainer, smooth_mprt
from medlens.metrics.stability import consistency, continuity, relative_representation_stability
from medlens.metrics.axiomatic import input_invariance
from medlens.metrics.robustness import (
    avg_sensitivity, local_lipschitz_estimate, relative_input_stability, relative_output_stability,
)

__all__ = [
    "Curve", "PAPER_PERCENTAGES", "SanityResult", "auroc", "average_precision", "box_iou", "boxes_to_masks",
    "confidence_change", "dice", "empty_annotations", "energy_pointing_game", "entropy", "faithfulness_metrics",
    "gini", "localisation_metrics", "mask_iou", "max_sensitivity", "method_explainer", "model_randomisation",
    "noisy_linear_imputation", "perturbation_curve", "pointing_game", "relevance_mass",
    "relevance_rank_accuracy", "road", "spearman", "ssim", "topk_box_iou",
    "attribution_localisation", "avg_sensitivity", "completeness", "effective_complexity", "faithfulness_correlation",
    "faithfulness_estimate", "local_lipschitz_estimate", "monotonicity_arya", "monotonicity_nguyen",
    "non_sensitivity", "random_logit", "region_perturbation", "relative_input_stability", "relative_output_stability", "selectivity", "sensitivity_n", "top_k_intersection",
    "consistency", "continuity", "efficient_mprt", "focus", "infidelity", "input_invariance", "irof", "make_mosaics",
    "model_explainer", "relative_representation_stability", "slic_segments", "smooth_mprt", "sufficiency",
]
