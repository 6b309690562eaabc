"""SPARO CLIP models on OpenCLIP: published configs, checkpoints and concept selection.

    from sparo_fast.clip import create_model_and_transforms, get_tokenizer, load_checkpoint
    model, _, preprocess = create_model_and_transforms("ViT-B-16-SPARO")
    load_checkpoint(model, "epoch_25.pt")
"""
from .baselines import ComparisonCLIP
from .checkpoint import CheckpointError, load_checkpoint, read_state_dict
from .concepts import SlotRanking, rank_slots, slot_alignment
from .configs import add_model_config, get_model_config, list_models
from .factory import build_model, create_model, create_model_and_transforms, get_tokenizer, tokenizer_for
from .model import BaselineCLIP, SparoCLIP, SparoVisionTransformer
from .slots import check_slots, select_slots

__all__ = [
    "create_model", "create_model_and_transforms", "get_tokenizer", "load_checkpoint", "list_models",
    "get_model_config", "add_model_config", "build_model", "tokenizer_for", "read_state_dict",
    "CheckpointError", "SparoCLIP", "BaselineCLIP", "SparoVisionTransformer", "ComparisonCLIP", "rank_slots",
    "slot_alignment", "SlotRanking", "check_slots", "select_slots",
]
