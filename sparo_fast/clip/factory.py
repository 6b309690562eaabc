"""``create_model``, ``create_model_and_transforms`` and ``get_tokenizer`` (OpenCLIP-style)."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional, Union

import open_clip
import torch
from open_clip.model import convert_weights_to_lp, get_cast_dtype, set_model_preprocess_cfg
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transform import PreprocessCfg, image_transform_v2
from torch import nn

from . import configs
from .checkpoint import load_checkpoint
from .baselines import ComparisonCLIP
from .model import BaselineCLIP, SparoCLIP

PRECISIONS = ("fp32", "amp", "amp_bf16", "amp_bfloat16", "bf16", "fp16", "pure_bf16", "pure_fp16")

ConfigArg = Union[str, Mapping[str, Any]]


def _lowp_dtype(precision: str) -> torch.dtype:
    return torch.float16 if "fp16" in precision else torch.bfloat16


def _set_precision(model: nn.Module, device: torch.device, precision: str) -> None:
    """OpenCLIP's precision handling; "bf16"/"fp16" also cast the read-outs' queries (q_emb is a
    bare parameter that OpenCLIP's ``convert_weights_to_lp`` would leave in float32)."""
    if precision in ("fp16", "bf16"):
        dtype = _lowp_dtype(precision)
        model.to(device=device)
        convert_weights_to_lp(model, dtype=dtype)
        for r in getattr(model, "readouts", ()):
            r.q_emb.data = r.q_emb.data.to(dtype)
        if getattr(model, "space_dict", None) is not None:  # the codebook, a bare parameter too
            model.space_dict.data = model.space_dict.data.to(dtype)
    elif precision in ("pure_fp16", "pure_bf16"):
        model.to(device=device, dtype=_lowp_dtype(precision))
    else:
        model.to(device=device)


def build_model(cfg: Mapping[str, Any], *, backend: str = "auto", cast_dtype: Optional[torch.dtype] = None,
                output_dict: Optional[bool] = None) -> nn.Module:
    """Instantiate (on CPU, float32 unless ``cast_dtype``'s LayerNormFp32) from a published-format config."""
    cfg = dict(cfg)
    baseline = configs.baseline_settings(cfg)
    if cfg.get("custom_text"):
        raise ValueError("custom_text configs (CustomTextCLIP / HF text towers) are not supported here; "
                         "use open_clip.create_model for those")
    vision_cfg = configs.translate_tower_cfg(cfg["vision_cfg"], "vision")
    text_cfg = configs.translate_tower_cfg(cfg["text_cfg"], "text")
    common = dict(
        quick_gelu=bool(cfg.get("quick_gelu", False)),
        init_logit_bias=cfg.get("init_logit_bias"),
        nonscalar_logit_scale=bool(cfg.get("nonscalar_logit_scale", False)),
        cast_dtype=cast_dtype,
        output_dict=bool(cfg.get("output_dict", False) if output_dict is None else output_dict),
    )
    if "init_logit_scale" in cfg:
        common["init_logit_scale"] = cfg["init_logit_scale"]
    reduce_depth = configs.reduce_depth_of(cfg)
    if configs.is_sparo_config(cfg):
        if baseline["use_codebook"]:
            raise ValueError("use_sparo and use_codebook cannot be combined (as in the published code)")
        if baseline["bottleneck_dim"] is not None:
            raise ValueError("bottleneck_dim applies to the CLIP baseline only (the published SPARO model "
                             "leaves the bottleneck layers unused)")
        s = configs.sparo_settings(cfg)
        return SparoCLIP(cfg["embed_dim"], vision_cfg, text_cfg, L=s["L"], V=s["V"], sparo_type=s["sparo_type"],
                         share_kv=s["share_kv"], share_queries=s["share_queries"], sparo_heads=s["sparo_heads"],
                         sparo_attn_dim=s["sparo_attn_dim"], sparo_value_dim=s["sparo_value_dim"],
                         reduce_depth=reduce_depth, backend=backend, **common)
    if baseline["global_average_pool"] or baseline["use_codebook"] or baseline["bottleneck_dim"] is not None:
        return ComparisonCLIP(cfg["embed_dim"], vision_cfg, text_cfg, reduce_depth=reduce_depth, **baseline, **common)
    return BaselineCLIP(cfg["embed_dim"], vision_cfg, text_cfg, reduce_depth=reduce_depth, **common)


def create_model(
        name_or_config: ConfigArg,
        *,
        fused: bool = True,
        precision: str = "fp32",
        device: Union[str, torch.device] = "cpu",
        override: Optional[Mapping[str, Any]] = None,
        pretrained: Optional[str] = None,
        output_dict: Optional[bool] = None,
        backend: Optional[str] = None,
) -> nn.Module:
    """Build a SPARO CLIP (or the OpenCLIP baseline) from a name or a published-format config.

    ``name_or_config``: a name from ``list_models()`` (or any ``open_clip.list_models()`` name,
    which gives the baseline), or a config dict such as the published ``model_configs/*.json``.
    A config with ``use_sparo`` true (or, without ``use_sparo``, with ``L``) gives a
    ``SparoCLIP``; with ``vision_cfg.global_average_pool``, ``bottleneck_dim`` or ``use_codebook``
    the published comparison model (``ComparisonCLIP``); otherwise a ``BaselineCLIP`` (OpenCLIP's CLIP).
    ``fused``: read-out backend "auto" (Triton kernels where they can run, else the absorbed
    PyTorch formulation) or, when False, "reference" (the published computation); ``backend``
    names one explicitly instead. ``precision``: as OpenCLIP ("fp32", "amp", "amp_bf16",
    "bf16", "fp16", "pure_bf16", "pure_fp16"). ``override``: config updates like the published
    ``--override-model-config`` (nested dicts merge). ``pretrained``: a checkpoint path loaded
    with ``load_checkpoint`` (strict).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    if backend is None:
        backend = "auto" if fused else "reference"
    name, cfg = configs.resolve_config(name_or_config, override)
    model = build_model(cfg, backend=backend, cast_dtype=get_cast_dtype(precision), output_dict=output_dict)
    model.model_name = name
    model.config = cfg
    if pretrained is not None:
        load_checkpoint(model, pretrained, strict=True)
    _set_precision(model, torch.device(device), precision)
    set_model_preprocess_cfg(model, dataclasses.asdict(PreprocessCfg(size=model.visual.image_size)))
    return model


def create_model_and_transforms(name_or_config: ConfigArg, *, aug_cfg: Optional[Union[Dict[str, Any], Any]] = None,
                                **kwargs):
    """``(model, preprocess_train, preprocess_val)`` with OpenCLIP's image transforms; the other
    keyword arguments are :func:`create_model`'s, ``aug_cfg`` OpenCLIP's training augmentation."""
    model = create_model(name_or_config, **kwargs)
    pp = PreprocessCfg(**model.visual.preprocess_cfg)
    return model, image_transform_v2(pp, is_train=True, aug_cfg=aug_cfg), image_transform_v2(pp, is_train=False)


def get_tokenizer(name_or_config: ConfigArg, context_length: Optional[int] = None):
    """OpenCLIP's ``SimpleTokenizer`` with the model's context length (``text_cfg.context_length``).

    OpenCLIP model names with their own (e.g. HF) tokenizer get ``open_clip.get_tokenizer``'s.
    """
    _, cfg = configs.resolve_config(name_or_config)
    text_cfg = cfg.get("text_cfg", {})
    if isinstance(name_or_config, str) and (text_cfg.get("hf_tokenizer_name") or text_cfg.get("tokenizer_mode")):
        return open_clip.get_tokenizer(name_or_config, context_length=context_length)
    return SimpleTokenizer(context_length=context_length or text_cfg.get("context_length", 77))


def tokenizer_for(model: nn.Module):
    """The tokenizer matching a built model (its ``context_length``)."""
    return SimpleTokenizer(context_length=model.context_length)
