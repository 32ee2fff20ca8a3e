"""Transformer-block layouts, shared by every family that rewrites ViTs (token passes, poly-act,
the quantisers): finding the blocks of a torch-level Program, checking a block's layout, and
multi-head attention that also returns its probabilities.

Blocks are the ``call_module`` nodes that :func:`sliver.ir.is_transformer_block` recognises
(tracing keeps them whole). A block must have timm's layout: ``norm1``, ``attn`` (with ``qkv``,
``proj`` and ``num_heads``), ``norm2`` and ``mlp``; optional ``ls1``/``ls2`` (LayerScale) and
``q_norm``/``k_norm`` are honoured.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import nn

from ..ir.errors import OptionValueError, UnsupportedOpError
from ..ir.torch_level import is_transformer_block


def transformer_blocks(gm: torch.fx.GraphModule) -> list:
    """The transformer-block nodes of ``gm`` in execution order."""
    return [
        n for n in gm.graph.nodes
        if n.op == "call_module" and is_transformer_block(gm.get_submodule(n.target))
    ]


def check_blocks(pass_name: str, gm: torch.fx.GraphModule, indices) -> list:
    """The block nodes at ``indices``; one-line errors for a model without blocks or an index
    past the depth."""
    blocks = transformer_blocks(gm)
    if not blocks:
        raise UnsupportedOpError(
            f"pass {pass_name!r} needs a vision transformer, but the model has no attention blocks"
        )
    for i in indices:
        if not 0 <= i < len(blocks):
            raise OptionValueError(
                f"pass {pass_name!r}: block index {i} is past the model's depth; "
                f"it has {len(blocks)} blocks (0..{len(blocks) - 1})"
            )
    if len(set(indices)) != len(indices):
        raise OptionValueError(f"pass {pass_name!r}: block indices {list(indices)} repeat")
    for block in blocks:
        _check_layout(pass_name, gm.get_submodule(block.target))
    return [blocks[i] for i in sorted(indices)]


def _check_layout(pass_name: str, block: nn.Module) -> None:
    missing = [name for name in ("norm1", "attn", "norm2", "mlp") if not hasattr(block, name)]
    attn = getattr(block, "attn", None)
    if attn is not None:
        missing += [f"attn.{name}" for name in ("qkv", "proj", "num_heads") if not hasattr(attn, name)]
    if missing:
        raise UnsupportedOpError(
            f"pass {pass_name!r} does not know the block layout of {type(block).__name__} "
            f"(missing {', '.join(missing)}); it needs timm's Block layout"
        )


def tokens_in(node: torch.fx.Node) -> int:
    """Token count entering a block node (from the traced shapes)."""
    meta = node.args[0].meta.get("tensor_meta")
    return int(meta.shape[1])


def _maybe(module: nn.Module, name: str):
    sub = getattr(module, name, None)
    return sub if isinstance(sub, nn.Module) else None


def attention_parts(attn: nn.Module, x: torch.Tensor, policy: torch.Tensor | None = None,
                    connections: torch.Tensor | None = None):
    """Multi-head self-attention as timm computes it, returning (output, probabilities, context).

    probabilities: (B, heads, N, N); context: the per-head A.V before the output projection,
    (B, heads, N, head_dim). The probabilities come from ``attn.attention_probs(scores)`` when the
    module has that method (poly-act's PolyAttention does), else from softmax.

    ``policy`` (B, N), 1 = kept, is the training-time token mask of the pruning passes: pruned keys
    get no weight and every token still attends to itself (DynamicViT's masked softmax).
    ``connections`` (B, N, N), 0/1, masks query-key pairs the same way (Tri-Level E-ViT's
    attention-level mask; the exponentials are multiplied by it before normalising)."""
    b, n, c = x.shape
    heads = attn.num_heads
    head_dim = c // heads
    scale = getattr(attn, "scale", None) or head_dim ** -0.5
    qkv = attn.qkv(x).reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q_norm, k_norm = _maybe(attn, "q_norm"), _maybe(attn, "k_norm")
    if q_norm is not None:
        q = q_norm(q)
    if k_norm is not None:
        k = k_norm(k)
    scores = (q * scale) @ k.transpose(-2, -1)
    if policy is not None or connections is not None:
        if connections is not None:
            allowed = connections.unsqueeze(1)
        else:
            allowed = policy.reshape(b, 1, 1, n)
            eye = torch.eye(n, dtype=x.dtype, device=x.device).reshape(1, 1, n, n)
            allowed = allowed + (1.0 - allowed) * eye
        e = torch.exp(scores - scores.amax(dim=-1, keepdim=True)) * allowed
        probs = (e + 1e-6 / n) / (e.sum(dim=-1, keepdim=True) + 1e-6)
    elif hasattr(attn, "attention_probs"):
        probs = attn.attention_probs(scores)
    else:
        probs = scores.softmax(dim=-1)
    context = probs @ v
    return attn.proj(context.transpose(1, 2).reshape(b, n, c)), probs, context


def attention_with_probs(attn: nn.Module, x: torch.Tensor):
    """(output, probabilities) of :func:`attention_parts`."""
    out, probs, _ = attention_parts(attn, x)
    return out, probs


def residual_branch(block: nn.Module, scale_name: str, value: torch.Tensor) -> torch.Tensor:
    """Apply a block's optional LayerScale (``ls1``/``ls2``) to a residual branch."""
    ls = _maybe(block, scale_name)
    return ls(value) if ls is not None else value
