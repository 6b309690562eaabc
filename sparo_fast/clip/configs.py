"""Model configs in the published (sparo-clip / OpenCLIP) JSON format, and their translation to OpenCLIP 3.x.

A config is a dict with ``embed_dim``, ``vision_cfg`` and ``text_cfg`` plus, for SPARO models,
``use_sparo``, ``L``, ``V``, ``sparo_type``, ``share_kv``, ``reduce_depth``, ``sparo_heads``,
``sparo_attn_dim``, ``sparo_value_dim`` (and ``share_queries``); for the published comparison models
``bottleneck_dim``, ``use_codebook``, ``num_codes`` and ``vision_cfg.global_average_pool`` (see
``baselines.py``). Registered configs live in ``model_configs/*.json`` next to this file.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import open_clip
from open_clip.model import CLIPTextCfg, CLIPVisionCfg

from ..normalize import parse_sparo_type

CONFIG_DIR = Path(__file__).parent / "model_configs"

# Top-level keys of the published CLIP constructor (and OpenCLIP 3.x's) that a config may hold.
SPARO_KEYS = ("use_sparo", "L", "V", "sparo_type", "share_kv", "share_queries", "reduce_depth",
              "sparo_heads", "sparo_attn_dim", "sparo_value_dim")
CLIP_KEYS = ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "output_dict", "init_logit_scale",
             "init_logit_bias", "nonscalar_logit_scale", "custom_text")
BASELINE_KEYS = ("use_codebook", "num_codes", "bottleneck_dim")  # published comparison models (baselines.py)
KNOWN_KEYS = frozenset(SPARO_KEYS + CLIP_KEYS + BASELINE_KEYS)

_REGISTRY: Dict[str, Dict[str, Any]] = {}


def _scan() -> None:
    _REGISTRY.clear()
    for path in sorted(CONFIG_DIR.glob("*.json")):
        with open(path, "r", encoding="utf-8") as f:
            cfg = json.load(f)
        if all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
            _REGISTRY[path.stem] = cfg


_scan()


def list_models() -> List[str]:
    """Names registered here (SPARO models and the tiny baseline). Any ``open_clip.list_models()``
    name is accepted too, and builds the plain OpenCLIP baseline."""
    return sorted(_REGISTRY)


def add_model_config(name: str, config: Mapping[str, Any]) -> None:
    """Register a config (published format) under ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError("add_model_config: name must be a non-empty string")
    validate_keys(config)
    _REGISTRY[name] = copy.deepcopy(dict(config))


def get_model_config(name: str) -> Optional[Dict[str, Any]]:
    """A copy of a registered config; OpenCLIP's own configs as a fallback; None if unknown."""
    if name in _REGISTRY:
        return copy.deepcopy(_REGISTRY[name])
    cfg = open_clip.get_model_config(name.replace("/", "-"))
    return copy.deepcopy(cfg) if cfg is not None else None


def is_sparo_config(cfg: Mapping[str, Any]) -> bool:
    """SPARO when ``use_sparo`` is true, or when it is absent and ``L`` is given."""
    if "use_sparo" in cfg:
        return bool(cfg["use_sparo"])
    return cfg.get("L") is not None


def validate_keys(cfg: Mapping[str, Any]) -> None:
    if not isinstance(cfg, Mapping):
        raise TypeError(f"model config must be a dict, got {type(cfg).__name__}")
    unknown = sorted(set(cfg) - KNOWN_KEYS)
    if unknown:
        raise ValueError(f"unknown model config key(s) {unknown}; known keys: {sorted(KNOWN_KEYS)}")
    for key in ("vision_cfg", "text_cfg"):
        if key in cfg and not isinstance(cfg[key], Mapping):
            raise ValueError(f"model config {key!r} must be a dict, got {type(cfg[key]).__name__}")
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
    if missing:
        raise ValueError(f"model config lacks required key(s) {missing}")


def apply_override(cfg: Dict[str, Any], override: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """Update ``cfg`` like the published ``--override-model-config``; nested dicts merge recursively.

    Unlike the published code, a key absent from the config is accepted when it is a known
    config key (e.g. ``sparo_heads`` on a config that leaves it out); unknown keys raise.
    """
    if override is None:
        return cfg
    if isinstance(override, str):
        override = json.loads(override)
    if not isinstance(override, Mapping):
        raise TypeError(f"override must be a dict (or a JSON string), got {type(override).__name__}")

    def merge(dst: Dict[str, Any], src: Mapping[str, Any]) -> None:
        for k, v in src.items():
            if isinstance(v, Mapping) and isinstance(dst.get(k), Mapping):
                sub = dict(dst[k])
                merge(sub, v)
                dst[k] = sub
            else:
                dst[k] = copy.deepcopy(v)

    unknown = sorted(set(override) - KNOWN_KEYS)
    if unknown:
        raise ValueError(f"override: unknown model config key(s) {unknown}; known keys: {sorted(KNOWN_KEYS)}")
    merge(cfg, override)
    return cfg


def resolve_config(name_or_config: Union[str, Mapping[str, Any]],
                   override: Optional[Mapping[str, Any]] = None) -> Tuple[str, Dict[str, Any]]:
    """(name, config) for a registered/OpenCLIP name or a config dict, with ``override`` applied."""
    if isinstance(name_or_config, str):
        cfg = get_model_config(name_or_config)
        if cfg is None:
            raise ValueError(f"unknown model {name_or_config!r}; registered here: {', '.join(list_models())} "
                             "(or any open_clip.list_models() name, which builds the OpenCLIP baseline)")
        name = name_or_config
    elif isinstance(name_or_config, Mapping):
        cfg = copy.deepcopy(dict(name_or_config))
        name = "custom"
    else:
        raise TypeError(f"create_model: expected a model name or a config dict, got {type(name_or_config).__name__}")
    cfg = apply_override(cfg, override)
    validate_keys(cfg)
    return name, cfg


# ---------------------------------------------------------------------------------------------
# Tower configs: the published format targeted OpenCLIP 2.20; OpenCLIP 3.x renamed a few keys.

def _tower_fields(kind: str) -> frozenset:
    cls = CLIPVisionCfg if kind == "vision" else CLIPTextCfg
    return frozenset(f.name for f in dataclasses.fields(cls))


def translate_tower_cfg(cfg: Mapping[str, Any], kind: str) -> Dict[str, Any]:
    """A published-format ``vision_cfg``/``text_cfg`` as OpenCLIP 3.x keyword arguments."""
    out = dict(cfg)
    where = f"{kind}_cfg"

    def drop_if_false(key: str, why: str) -> None:
        if key in out:
            if out.pop(key):
                raise ValueError(f"{where}.{key}=True is not supported: {why}")

    if kind == "vision":
        drop_if_false("input_patchnorm", "OpenCLIP 3.x has no dual patchnorm")
        # the published mean over all tokens (CLS included) is not OpenCLIP 3.x's pool_type='avg':
        # build_model reads the flag and builds baselines.GapVisionTransformer
        out.pop("global_average_pool", None)
        if "n_queries" in out:
            out.setdefault("attn_pooler_queries", out.pop("n_queries"))
    else:
        for old, new in (("proj", "hf_proj_type"), ("pooler_type", "hf_pooler_type")):
            if old in out:
                out.setdefault(new, out.pop(old))
        drop_if_false("global_average_pool", "OpenCLIP 3.x's text tower has no average pooling")
        drop_if_false("attentional_pool", "OpenCLIP 3.x's text tower has no attentional pooler")
        for key in ("n_queries", "attn_pooler_heads"):
            out.pop(key, None)
    unknown = sorted(set(out) - _tower_fields(kind))
    if unknown:
        raise ValueError(f"unknown {where} key(s) {unknown}")
    return out


def sparo_settings(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """The SPARO keys of a config with the published defaults filled in, validated."""
    s = {
        "L": cfg.get("L"),
        "V": cfg.get("V"),
        "sparo_type": cfg.get("sparo_type", "cont:const"),
        "share_kv": bool(cfg.get("share_kv", True)),
        "share_queries": bool(cfg.get("share_queries", False)),
        "sparo_heads": cfg.get("sparo_heads"),
        "sparo_attn_dim": cfg.get("sparo_attn_dim"),
        "sparo_value_dim": cfg.get("sparo_value_dim"),
    }
    for key in ("L", "V"):
        v = s[key]
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"SPARO config: {key} must be a positive integer, got {v!r}")
    for key in ("sparo_heads", "sparo_attn_dim", "sparo_value_dim"):
        v = s[key]
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise ValueError(f"SPARO config: {key} must be a positive integer or null, got {v!r}")
    parse_sparo_type(s["sparo_type"])
    return s


def baseline_settings(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """The comparison-model options of a config (published defaults), for ``ComparisonCLIP``."""
    return {
        "global_average_pool": bool(cfg["vision_cfg"].get("global_average_pool", False)),
        "bottleneck_dim": cfg.get("bottleneck_dim"),
        "use_codebook": bool(cfg.get("use_codebook", False)),
        "num_codes": cfg.get("num_codes", 16384),
    }


def reduce_depth_of(cfg: Mapping[str, Any]) -> int:
    r = cfg.get("reduce_depth", 0) or 0
    if not isinstance(r, int) or isinstance(r, bool) or r < 0:
        raise ValueError(f"reduce_depth must be a non-negative integer, got {r!r}")
    return r
