"""Vision Transformers: DeiT-style classifiers and a Segmenter-style segmentation ViT.

Parameter and module names follow timm's ``VisionTransformer`` so that a timm checkpoint loads with
``load_state_dict(strict=True)``::

    patch_embed.proj                      Conv2d(in_chans, D, kernel=stride=patch_size)
    cls_token (1, 1, D), pos_embed (1, 1 + num_patches, D)
    blocks.{i}.norm1 / .attn.qkv / .attn.proj / .norm2 / .mlp.fc1 / .mlp.fc2
    norm, head

timm's parameterless members (dropouts, drop-path, layer-scale and ``fc_norm`` identities) are left
out: they own no state, so the state_dict keys are the same.

Defaults (timm/DeiT): patch 16, depth 12, mlp_ratio 4, LayerNorm eps 1e-6, 224x224 input,
1000 classes; DeiT-Tiny / Small / Base use D / heads = 192/3, 384/6, 768/12.

:class:`Segmenter` is the ViT encoder above (same keys, without ``head``) followed by Segmenter's
linear decoder (``decoder.head``): per-patch class logits, laid out on the token grid and
bilinearly upsampled to the input size. Default: ViT-Tiny/16 at 512x512 with 150 classes (ADE20K).

Every forward is plain tensor code that ``torch.fx.symbolic_trace`` and the TorchScript-based
``torch.onnx.export`` handle; :class:`Attention` is written out explicitly (no fused
``scaled_dot_product_attention``) so that compiler passes can see and rewrite its parts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ir.errors import ModelInputError

__all__ = ["PatchEmbed", "Attention", "Mlp", "Block", "VisionTransformer", "LinearDecoder", "Segmenter"]


def _to_pair(value: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ModelInputError(
                f"expected an int or a pair (height, width), got {value!r}; pass e.g. 224 or (224, 224)")
        return int(value[0]), int(value[1])
    return int(value), int(value)


class PatchEmbed(nn.Module):
    """Split the image into non-overlapping patches and project each one to ``embed_dim``.

    (B, C, H, W) -> (B, num_patches, embed_dim), patches in row-major order.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768):
        super().__init__()
        img_h, img_w = _to_pair(img_size)
        if patch_size <= 0 or img_h % patch_size or img_w % patch_size:
            raise ModelInputError(
                f"img_size {img_h}x{img_w} is not a multiple of patch_size {patch_size}; "
                "choose an img_size divisible by patch_size")
        self.img_size = (img_h, img_w)
        self.patch_size = patch_size
        self.grid_size = (img_h // patch_size, img_w // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, written out step by step.

    softmax((q * scale) @ k^T) @ v per head, then the output projection. Nothing is stored on the
    module during forward.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True):
        super().__init__()
        if num_heads <= 0 or dim % num_heads:
            raise ModelInputError(
                f"embed_dim {dim} is not divisible by num_heads {num_heads}; pick num_heads dividing embed_dim")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # each (B, heads, N, head_dim)
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)  # (B, heads, N, N)
        attn = attn.softmax(dim=-1)
        x = attn @ v  # (B, heads, N, head_dim)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Mlp(nn.Module):
    """Transformer feed-forward: fc1 -> GELU -> fc2."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class _ViTEncoder(nn.Module):
    """The shared ViT trunk: patch embedding, CLS token, learned position embedding, blocks, norm."""

    def __init__(self, img_size: int | tuple[int, int], patch_size: int, in_chans: int, embed_dim: int,
                 depth: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, norm_eps: float):
        super().__init__()
        if depth < 0:
            raise ModelInputError(f"depth must be >= 0, got {depth}; pass a non-negative number of blocks")
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.img_size = self.patch_embed.img_size
        self.patch_size = patch_size
        self.grid_size = self.patch_embed.grid_size
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, embed_dim))
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, norm_eps=norm_eps)
            for _ in range(depth)
        ])
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)

    def _init_weights(self) -> None:
        # timm's default ViT init: small truncated-normal embeddings and linear weights, zero biases.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> normalized tokens (B, 1 + num_patches, D); token 0 is the CLS token."""
        x = self.patch_embed(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)
        x = x + self.pos_embed
        x = self.blocks(x)
        return self.norm(x)


class VisionTransformer(_ViTEncoder):
    """ViT / DeiT image classifier in timm's layout; the head reads the CLS token after ``norm``.

    Defaults are ViT-Base/16 (DeiT-B): 224x224, patch 16, D 768, depth 12, 12 heads, mlp_ratio 4,
    1000 classes. ``num_classes=0`` makes ``head`` an identity (the model returns CLS features).
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, norm_eps: float = 1e-6):
        super().__init__(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, qkv_bias,
                         norm_eps)
        self.num_classes = num_classes
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        return self.head(x[:, 0])


class LinearDecoder(nn.Module):
    """Segmenter's linear decoder: per-patch logits laid out on the token grid.

    (B, num_patches, D) -> (B, num_classes, grid_h, grid_w).
    """

    def __init__(self, embed_dim: int, num_classes: int, grid_size: tuple[int, int]):
        super().__init__()
        self.num_classes = num_classes
        self.grid_size = tuple(grid_size)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(x)  # (B, N, classes)
        grid_h, grid_w = self.grid_size
        return x.transpose(1, 2).reshape(x.shape[0], self.num_classes, grid_h, grid_w)


class Segmenter(_ViTEncoder):
    """Segmenter-style semantic segmentation: ViT encoder + linear decoder + bilinear upsampling.

    Encoder keys are timm's (``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks``,
    ``norm``); the decoder is ``decoder.head``. The CLS token is dropped before decoding and the
    logits are upsampled (bilinear, align_corners=False) to the input size, which is fixed at
    construction (``img_size``). Defaults: ViT-Tiny/16 (D 192, depth 12, 3 heads) at 512x512,
    150 classes (ADE20K). Output: (B, num_classes, H, W).
    """

    def __init__(self, img_size: int | tuple[int, int] = 512, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 150, embed_dim: int = 192, depth: int = 12, num_heads: int = 3,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, norm_eps: float = 1e-6):
        super().__init__(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, qkv_bias,
                         norm_eps)
        if num_classes <= 0:
            raise ModelInputError(f"num_classes must be > 0 for segmentation, got {num_classes}")
        self.num_classes = num_classes
        self.decoder = LinearDecoder(embed_dim, num_classes, self.grid_size)
        self._init_weights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.decoder(x[:, 1:])  # drop CLS -> (B, classes, H/p, W/p)
        return F.interpolate(x, size=self.img_size, mode="bilinear", align_corners=False)
