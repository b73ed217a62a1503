"""Language guidance: ``LanguageGuided`` (the wrapper), the code–text transformer, the
alignment losses (gsa, mtp, ras) and caption masking."""

from lgvq_plugins.guidance.model import REFERENCE_LOSS_WEIGHTS, LanguageGuided

__all__ = ["LanguageGuided", "REFERENCE_LOSS_WEIGHTS"]
