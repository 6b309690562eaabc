"""SPARO CLIP on OpenCLIP's own towers, and the plain OpenCLIP baseline with the same API.

``SparoCLIP`` is an ``open_clip.model.CLIP``: its towers are built by OpenCLIP
(``_build_vision_tower``/``_build_text_tower`` via ``CLIP.__init__``), then

* image tower: the projection is removed and ``pool_type`` set to ``'none'`` so that OpenCLIP's
  ``VisionTransformer.forward`` returns ``ln_post`` of every token (CLS included); the tower's
  class is switched to ``SparoVisionTransformer`` (a subclass whose ``forward`` feeds those
  tokens to ``visual.sparo``), the way FSDP2's ``fully_shard`` re-classes modules;
* text tower: ``text_projection`` is removed and the pooling set to ``'none'`` so that
  OpenCLIP's ``CLIP.encode_text`` returns ``ln_final`` of every token; ``text_sparo`` reads them
  out with ``eos_indices = tokens.argmax(-1)``.

State-dict keys are the published ones: OpenCLIP's CLIP layout plus ``visual.sparo.*`` and
``text_sparo.*``, without ``visual.proj`` and ``text_projection``.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import open_clip
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn

from .. import backends
from ..normalize import extra_channels, normalize_slots
from ..readout import SparoReadout
from .slots import SlotsArg, check_slots, select_slots


def run_readout(readout: SparoReadout, tokens: Tensor, eos: Optional[Tensor], return_attn: bool):
    return readout(tokens, eos, need_weights=bool(return_attn))


class SparoVisionTransformer(VisionTransformer):
    """OpenCLIP's ``VisionTransformer`` whose head is a SPARO read-out (``self.sparo``).

    Not constructed directly: ``SparoCLIP`` builds the tower with OpenCLIP and re-classes it.
    ``forward(x, return_attn=False)`` returns ``(slots [B, L, V'], attn [B, L, N] or None)``
    with the raw (un-normalised) read-out; V' = V (+1 with a softmax ``sparo_type``).
    """

    def forward(self, x: Tensor, return_attn: bool = False):
        tokens = VisionTransformer.forward(self, x)  # pool_type 'none', no proj: ln_post(all tokens)
        return run_readout(self.sparo, tokens, None, return_attn)

    def lock(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False):
        """LiT-style locking as OpenCLIP's, with the read-out as the last group (instead of proj)."""
        for param in self.parameters():
            param.requires_grad = False
        if unlocked_groups:
            groups = [
                [self.conv1, self.class_embedding, self.positional_embedding, self.ln_pre],
                *self.transformer.resblocks[:-1],
                [self.transformer.resblocks[-1], self.ln_post],
                [self.sparo],
            ]
            for group in groups[-unlocked_groups:]:
                for item in (group if isinstance(group, list) else [group]):
                    params = [item] if isinstance(item, nn.Parameter) else item.parameters()
                    for p in params:
                        p.requires_grad = True


def _tower_heads(vision_cfg: Mapping[str, Any], text_cfg: Mapping[str, Any]) -> Tuple[int, int]:
    v = CLIPVisionCfg(**vision_cfg)
    t = CLIPTextCfg(**text_cfg)
    return v.width // v.head_width, t.heads


def _reduced(cfg: Mapping[str, Any], reduce_depth: int, kind: str) -> Dict[str, Any]:
    out = dict(cfg)
    if reduce_depth:
        layers = out.get("layers", (CLIPVisionCfg if kind == "vision" else CLIPTextCfg).layers)
        if not isinstance(layers, int) or layers - reduce_depth < 1:
            raise ValueError(f"reduce_depth={reduce_depth} leaves no block in the {kind} tower "
                             f"(layers={layers!r})")
        out["layers"] = layers - reduce_depth
    return out


class SparoCLIP(open_clip.model.CLIP):
    """CLIP with SPARO read-outs on both towers (published sparo-clip model on OpenCLIP 3.x).

    Build it with ``sparo_fast.clip.create_model``. ``vision_cfg``/``text_cfg`` are OpenCLIP 3.x
    tower configs (already translated from the published format); ``reduce_depth`` blocks are
    removed from each tower. ``backend`` picks the read-out implementation (see
    ``SparoReadout``); ``set_backend`` changes it later.
    """

    use_sparo = True

    def __init__(
            self,
            embed_dim: int,
            vision_cfg: Mapping[str, Any],
            text_cfg: Mapping[str, Any],
            *,
            L: int,
            V: int,
            sparo_type: str = "cont:const",
            share_kv: bool = True,
            share_queries: bool = False,
            sparo_heads: Optional[int] = None,
            sparo_attn_dim: Optional[int] = None,
            sparo_value_dim: Optional[int] = None,
            reduce_depth: int = 0,
            quick_gelu: bool = False,
            init_logit_scale: float = float(np.log(1 / 0.07)),
            init_logit_bias: Optional[float] = None,
            nonscalar_logit_scale: bool = False,
            cast_dtype: Optional[torch.dtype] = None,
            output_dict: bool = False,
            backend: str = "auto",
    ):
        vision_cfg = _reduced(vision_cfg, reduce_depth, "vision")
        text_cfg = _reduced(text_cfg, reduce_depth, "text")
        if vision_cfg.get("timm_model_name") or not isinstance(vision_cfg.get("layers", 12), int):
            raise ValueError("SPARO needs a ViT image tower (OpenCLIP VisionTransformer); timm and "
                             "ModifiedResNet towers are not supported")
        if vision_cfg.get("attentional_pool"):
            raise ValueError("SPARO replaces the pooling: vision_cfg.attentional_pool must be off")
        if text_cfg.get("hf_model_name"):
            raise ValueError("SPARO needs OpenCLIP's TextTransformer; HF text towers are not supported")
        if text_cfg.get("embed_cls"):
            raise ValueError("text_cfg.embed_cls is not supported by OpenCLIP's CLIP (use a plain text tower)")
        text_cfg["proj_type"] = "none"  # no text_projection at all (the published model deletes it)
        super().__init__(embed_dim, vision_cfg, text_cfg, quick_gelu=quick_gelu,
                         init_logit_scale=init_logit_scale, init_logit_bias=init_logit_bias,
                         nonscalar_logit_scale=nonscalar_logit_scale, cast_dtype=cast_dtype,
                         output_dict=output_dict)
        self.L = L
        self.V = V
        self.sparo_type = sparo_type
        self.model_V = V + extra_channels(sparo_type)
        self.embed_dim = L * V  # the flat embedding's width (the config's embed_dim is unused, as published)
        self.reduce_depth = reduce_depth
        self.active_slots: Optional[tuple] = None

        v_heads, t_heads = _tower_heads(vision_cfg, text_cfg)
        v_width = self.visual.conv1.out_channels
        t_width = self.transformer.width

        def readout(width: int, heads: int) -> SparoReadout:
            attn_dim = sparo_attn_dim if sparo_attn_dim is not None else width // heads
            return SparoReadout(width, L, self.model_V, attn_dim, sparo_value_dim, sparo_heads, share_kv,
                                backend=backend, need_weights=False)

        visual = self.visual
        visual.proj = None
        visual.pool_type = "none"
        visual.output_tokens = False
        visual.sparo = readout(v_width, v_heads)
        visual.__class__ = SparoVisionTransformer

        self.text_pool_type = "none"
        self.text_sparo = readout(t_width, t_heads)
        # eos_indices come from argmax over the token ids: always in range, no host sync needed
        self.text_sparo.check_inputs = False
        if share_queries:
            if self.text_sparo.q_emb.shape != visual.sparo.q_emb.shape:
                raise ValueError("share_queries needs the same attention width and heads in both read-outs, got "
                                 f"{tuple(visual.sparo.q_emb.shape)} and {tuple(self.text_sparo.q_emb.shape)}")
            self.text_sparo.q_emb = visual.sparo.q_emb

    # ----------------------------------------------------------------------------- read-outs
    @property
    def readouts(self) -> Tuple[SparoReadout, SparoReadout]:
        """(image read-out ``visual.sparo``, text read-out ``text_sparo``)."""
        return self.visual.sparo, self.text_sparo

    def set_backend(self, backend: str) -> None:
        """Switch both read-outs' backend: 'auto', 'reference', 'torch' or 'triton'."""
        backends.check_backend(backend)
        for r in self.readouts:
            r.backend = backend

    def set_active_slots(self, slots: SlotsArg) -> None:
        """Default slot selection for every encode call that passes no ``slots`` (None: all slots).

        Lets helpers that only call ``encode_image``/``encode_text``/``forward`` (e.g.
        ``open_clip.build_zero_shot_classifier``) use a concept selection.
        """
        self.active_slots = check_slots(slots, self.L)

    # ----------------------------------------------------------------------------- encoders
    def _finish(self, out: Tensor, attn: Optional[Tensor], normalize: bool, return_sparo: bool,
                return_attn: bool, slots: SlotsArg):
        sel = check_slots(slots, self.L) if slots is not None else self.active_slots
        if out.dtype not in (torch.float32, torch.float64):
            out = out.float()  # normalise in float32: the embedding is a sum over L*V terms
        weighted = select_slots(normalize_slots(out, self.sparo_type), sel)
        # the flat embedding is returned as its own tensor, not a view: FSDP2 warns about (and
        # in-place ops on a view would skip) the pre-backward hooks it attaches to outputs
        res = weighted if return_sparo else weighted.flatten(-2).clone()
        return (res, attn) if return_attn else res

    @staticmethod
    def _check_normalize(normalize: bool) -> None:
        if not normalize:
            raise ValueError("SPARO embeddings are normalised by construction (sparo_type); "
                             "encode_image/encode_text need normalize=True")

    def encode_image(self, image: Tensor, normalize: bool = True, return_sparo: bool = False,
                     return_attn: bool = False, slots: SlotsArg = None):
        """Image embedding: flat unit-norm [B, L*V] (default), or the weighted slots [B, L, V]
        with ``return_sparo``; with ``return_attn`` also each slot's attention [B, L, 1 + patches]
        (token 0 is CLS). ``slots`` keeps only those slots (the others zeroed) and re-normalises."""
        self._check_normalize(normalize)
        out, attn = self.visual(image, return_attn)
        return self._finish(out, attn, normalize, return_sparo, return_attn, slots)

    def encode_text(self, text: Tensor, normalize: bool = True, return_sparo: bool = False,
                    return_attn: bool = False, slots: SlotsArg = None):
        """Text embedding, as ``encode_image``; attention [B, L, context] is zero after each EOS."""
        self._check_normalize(normalize)
        tokens = open_clip.model.CLIP.encode_text(self, text, normalize=False)  # ln_final(all tokens)
        out, attn = run_readout(self.text_sparo, tokens, text.argmax(dim=-1), return_attn)
        return self._finish(out, attn, normalize, return_sparo, return_attn, slots)

    def forward_intermediates(self, *args, **kwargs):
        raise NotImplementedError("forward_intermediates is not implemented for SPARO models; use "
                                  "encode_image/encode_text(return_sparo=True, return_attn=True)")

    def extra_repr(self) -> str:
        return f"L={self.L}, V={self.V}, sparo_type={self.sparo_type!r}, reduce_depth={self.reduce_depth}"


class BaselineCLIP(open_clip.model.CLIP):
    """OpenCLIP's CLIP, unchanged, with the SPARO model's extra arguments (rejected when used)."""

    use_sparo = False

    def __init__(self, embed_dim: int, vision_cfg: Mapping[str, Any], text_cfg: Mapping[str, Any], *,
                 reduce_depth: int = 0, **kwargs):
        super().__init__(embed_dim, _reduced(vision_cfg, reduce_depth, "vision"),
                         _reduced(text_cfg, reduce_depth, "text"), **kwargs)
        self.reduce_depth = reduce_depth

    @staticmethod
    def _check(return_sparo: bool, return_attn: bool, slots: SlotsArg) -> None:
        if return_sparo or return_attn or slots is not None:
            raise ValueError("return_sparo, return_attn and slots need a SPARO model; this is the "
                             "plain OpenCLIP baseline")

    def set_backend(self, backend: str) -> None:
        """No read-out to switch (kept so that callers can treat both kinds alike)."""
        backends.check_backend(backend)

    def encode_image(self, image: Tensor, normalize: bool = False, return_sparo: bool = False,
                     return_attn: bool = False, slots: SlotsArg = None):
        self._check(return_sparo, return_attn, slots)
        return super().encode_image(image, normalize=normalize)

    def encode_text(self, text: Tensor, normalize: bool = False, return_sparo: bool = False,
                    return_attn: bool = False, slots: SlotsArg = None):
        self._check(return_sparo, return_attn, slots)
        return super().encode_text(text, normalize=normalize)
