"""The published comparison models of the SPARO paper, on OpenCLIP's towers.

Selected like the published ``scripts/*.sh`` (``--override-model-config`` on a plain CLIP config):

* global-average-pool: ``{"vision_cfg": {"global_average_pool": true}}``. As published (sparo-clip
  ``VisionTransformer._global_pool``), the image embedding is ``ln_post(mean over ALL tokens,
  CLS included) @ proj``: the mean comes first, the LayerNorm after it. This differs from
  OpenCLIP 3.x's ``pool_type='avg'`` (CLS excluded, LayerNorm before the mean).
* bottleneck: ``{"bottleneck_dim": 512, "embed_dim": 4096}``: the towers project to
  ``bottleneck_dim`` and ``vision_bottleproj`` / ``text_bottleproj`` (``nn.Linear``) map that to
  ``embed_dim``, so the embedding has SPARO's width but passes through a narrow layer.
* codebook: ``{"use_codebook": true}`` (``num_codes``, default 16384): learnable finite discrete
  tokens (FDT). The towers lose their pooling, final LayerNorm and projection; each patch/text
  token is mapped by ``img_query_model`` / ``txt_query_model`` (``q_map``: LayerNorm, Linear,
  GELU, LayerNorm, Linear) to a query, its scaled dot products with the codes ``space_dict``
  [num_codes, D] are divided by a temperature (1000), max-pooled over tokens and turned into
  code weights by sparsemax; the embedding is those weights times ``space_dict``.

State-dict keys are the published ones (OpenCLIP's CLIP layout plus ``vision_bottleproj.*``,
``text_bottleproj.*``, ``space_dict``, ``img_query_model.q_map.*``, ``txt_query_model.q_map.*``;
the codebook model has no ``visual.ln_post``, ``visual.proj``, ``ln_final``, ``text_projection``).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Tuple

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import LayerNormFp32, VisionTransformer
from torch import Tensor, nn

from .model import BaselineCLIP

FDT_TEMPERATURE = 1000.0  # the published FDTQueryModel default


def sparsemax(z: Tensor, dim: int = -1) -> Tensor:
    """Euclidean projection of ``z`` onto the probability simplex along ``dim`` (Martins & Astudillo
    2016). Differentiable by autograd (the gradient is sparsemax's Jacobian almost everywhere)."""
    z = z.transpose(dim, -1)
    z = z - z.max(dim=-1, keepdim=True).values  # shift-invariant; keeps the cumulative sums small
    zs = z.sort(dim=-1, descending=True).values
    ranks = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
    cums = zs.cumsum(dim=-1)
    # the support is the largest prefix of the sorted values with 1 + k z_(k) > sum_{j<=k} z_(j)
    size = (1 + ranks * zs > cums).sum(dim=-1, keepdim=True)
    tau = (cums.gather(-1, size - 1) - 1) / size.to(z.dtype)
    return torch.clamp(z - tau, min=0).transpose(dim, -1)


class CodebookQuery(nn.Module):
    """The published ``FDTQueryModel`` (sparsemax, max pooling): tokens [B, N, ft_dim] and codes
    [num_codes, D] to an embedding [B, D]."""

    def __init__(self, ft_dim: int, code_dim: int, norm_layer=nn.LayerNorm):
        super().__init__()
        self.code_dim = code_dim
        self.temperature = FDT_TEMPERATURE
        # indices 0..4 are the published state-dict names (q_map.0, .1, .3, .4 hold weights)
        self.q_map = nn.Sequential(norm_layer(ft_dim), nn.Linear(ft_dim, code_dim), nn.GELU(),
                                   norm_layer(code_dim), nn.Linear(code_dim, code_dim))

    def forward(self, tokens: Tensor, codes: Tensor, eos_pos: Optional[Tensor] = None) -> Tensor:
        q = self.q_map(tokens)  # B, N, D
        logits = q @ codes.to(q.dtype).t() / math.sqrt(self.code_dim)  # B, N, num_codes
        if eos_pos is not None:
            # as published: tokens after the end token get logits 0 (not -inf), and still take
            # part in the max below
            keep = torch.arange(q.shape[1], device=q.device)[None, :] <= eos_pos[:, None]
            logits = logits * keep.unsqueeze(-1).to(logits.dtype)
        pooled = (logits / self.temperature).max(dim=1).values  # B, num_codes
        return sparsemax(pooled, dim=-1) @ codes.to(pooled.dtype)


class GapVisionTransformer(VisionTransformer):
    """OpenCLIP's ``VisionTransformer`` with the published global average pool: every token
    (CLS included) is averaged, then ``ln_post`` (``final_ln_after_pool``) and ``proj``."""

    def _global_pool(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        return x.mean(dim=1), x


class CodebookVisionTransformer(VisionTransformer):
    """OpenCLIP's ``VisionTransformer`` returning the last block's patch tokens [B, N-1, width]
    (CLS dropped, no ``ln_post``, no projection), as the published codebook tower."""

    def forward(self, x: Tensor) -> Tensor:
        return self.transformer(self._embeds(x))[:, 1:]


def _positive_int(name: str, v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"model config {name} must be a positive integer, got {v!r}")
    return v


class ComparisonCLIP(BaselineCLIP):
    """OpenCLIP's CLIP with the published comparison options: ``global_average_pool`` (image
    tower), ``bottleneck_dim``, ``use_codebook``/``num_codes``. Build it with
    ``sparo_fast.clip.create_model`` (e.g. ``"ViT-Tiny-Codebook"``, or ``"ViT-B-32"`` with
    ``override={"use_codebook": True}``)."""

    def __init__(self, embed_dim: int, vision_cfg: Mapping[str, Any], text_cfg: Mapping[str, Any], *,
                 global_average_pool: bool = False, bottleneck_dim: Optional[int] = None,
                 use_codebook: bool = False, num_codes: int = 16384, reduce_depth: int = 0,
                 cast_dtype: Optional[torch.dtype] = None, **kwargs):
        embed_dim = _positive_int("embed_dim", embed_dim)
        if bottleneck_dim is not None:
            _positive_int("bottleneck_dim", bottleneck_dim)
        num_codes = _positive_int("num_codes", num_codes)
        vision_cfg, text_cfg = dict(vision_cfg), dict(text_cfg)
        if use_codebook:
            if vision_cfg.get("timm_model_name") or not isinstance(vision_cfg.get("layers", 12), int):
                raise ValueError("use_codebook needs a ViT image tower (OpenCLIP VisionTransformer)")
            if vision_cfg.get("attentional_pool"):
                raise ValueError("use_codebook replaces the pooling: vision_cfg.attentional_pool must be off")
            text_cfg["proj_type"] = "none"  # the codebook text tower has no text_projection
        tower_dim = bottleneck_dim or embed_dim  # as published: the towers project to the bottleneck
        super().__init__(tower_dim, vision_cfg, text_cfg, reduce_depth=reduce_depth, cast_dtype=cast_dtype,
                         **kwargs)
        self.embed_dim = embed_dim
        self.bottleneck_dim = bottleneck_dim
        self.use_codebook = bool(use_codebook)
        self.global_average_pool = bool(global_average_pool) and not use_codebook  # published: ignored
        if self.global_average_pool:
            if not isinstance(self.visual, VisionTransformer):
                raise ValueError("vision_cfg.global_average_pool needs a ViT image tower")
            self.visual.final_ln_after_pool = True
            self.visual.__class__ = GapVisionTransformer
        if use_codebook:
            visual = self.visual
            visual.proj = None
            visual.ln_post = nn.Identity()  # no parameters: absent from the state dict, as published
            visual.__class__ = CodebookVisionTransformer
            self.ln_final = nn.Identity()
            self.text_pool_type = "none"  # encode_text's OpenCLIP path then returns every token
            norm = LayerNormFp32 if cast_dtype in (torch.float16, torch.bfloat16) else nn.LayerNorm
            self.space_dict = nn.Parameter(torch.randn(num_codes, tower_dim))
            self.img_query_model = CodebookQuery(visual.conv1.out_channels, tower_dim, norm)
            self.txt_query_model = CodebookQuery(self.transformer.width, tower_dim, norm)
        if bottleneck_dim is not None:
            self.vision_bottleproj = nn.Linear(bottleneck_dim, embed_dim)
            self.text_bottleproj = nn.Linear(bottleneck_dim, embed_dim)

    def encode_image(self, image: Tensor, normalize: bool = False, return_sparo: bool = False,
                     return_attn: bool = False, slots=None):
        self._check(return_sparo, return_attn, slots)
        x = self.visual(image)
        if self.use_codebook:
            x = self.img_query_model(x, self.space_dict)
        if self.bottleneck_dim is not None:
            x = self.vision_bottleproj(x)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, text: Tensor, normalize: bool = False, return_sparo: bool = False,
                    return_attn: bool = False, slots=None):
        self._check(return_sparo, return_attn, slots)
        x = open_clip.model.CLIP.encode_text(self, text, normalize=False)
        if self.use_codebook:  # x: the last block's tokens [B, context, width], no ln_final
            x = self.txt_query_model(x, self.space_dict, eos_pos=text.argmax(dim=-1))
        if self.bottleneck_dim is not None:
            x = self.text_bottleproj(x)
        return F.normalize(x, dim=-1) if normalize else x

    def forward_intermediates(self, *args, **kwargs):
        raise NotImplementedError("forward_intermediates is not implemented for the comparison models")

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, global_average_pool={self.global_average_pool}, "
                f"bottleneck_dim={self.bottleneck_dim}, use_codebook={self.use_codebook}")
