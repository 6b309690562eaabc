"""sparo-fast: a fast, faithful SPARO read-out (ECCV 2024) for CLIP models."""
from .functional import absorbed_query, sparo_absorbed, sparo_reference
from .params import ReadoutParams
from .normalize import SPARO_TYPES, extra_channels, normalize_slots
from .readout import SparoReadout, convert, is_published_sparo

__all__ = [
    "SparoReadout", "ReadoutParams", "convert", "is_published_sparo", "normalize_slots", "extra_channels",
    "SPARO_TYPES", "sparo_reference", "sparo_absorbed", "absorbed_query",
]
__version__ = "0.1.0"
