"""Recovery after compression without retraining: refit small per-channel parameters so the
compressed model's intermediate outputs match the original's on calibration data. See
`norms.RefitNorms` (`refit-norms`)."""

from .norms import REFERENCE_KEY, AffineFit, RefitNorms, find_norms, refit_norms

__all__ = ["RefitNorms", "refit_norms", "find_norms", "AffineFit", "REFERENCE_KEY"]
