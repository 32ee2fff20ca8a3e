"""Transformer-block layouts, shared by every family that rewrites ViTs (token passes, poly-act,
the quantisers): finding the blocks of a torch-level Program, checking a block's layout, and
multi-head attention that also returns its probabilities.

Blocks are the ``call_module`` nodes that :func:`sliver.ir.is_transformer_block` recognises
(tracing keeps them whole). A block must have timm's layout: ``norm1``, ``attn`` (with ``qkv``,
``proj`` and ``num_heads``), ``norm2`` and ``mlp``; optional ``ls1``/``ls2`` (LayerScale) and
``q_norm``/``k_norm`` are honoured.
"""

from __future__ import annotations

import contextlib
import math

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


def attention_parts(attn: nn.Module, x: torch.Tensor, policy: torch.Tensor | None = None):
    """Multi-head self-attention as timm computes it, returning (output, probabilities, context).

    probabilities: (B, heads, N, N); context: the per-head A.V before the output projection,
    (B, heads, N, head_dim). The probabilities come from ``attn.attention_probs(scores)`` when the
    module has that method (poly-act's PolyAttention, the quantisers' attention do), else from
    softmax; the two activation products from ``attn.score_product(q, k^T)`` and
    ``attn.context_product(probs, v)`` when it has them (the quantisers' attention: integer
    matmuls), so a block that computes its attention through this function (evit's) runs the
    attention module's own ops whatever pass swapped it.

    ``policy`` (B, N), 1 = kept, is the training-time token mask of the pruning passes: pruned keys
    get no weight and every token still attends to itself (DynamicViT's masked softmax)."""
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
    product = getattr(attn, "score_product", None)
    scores = product(q * scale, k.transpose(-2, -1)) if product is not None else (q * scale) @ k.transpose(-2, -1)
    if policy is not None:
        allowed = policy.reshape(b, 1, 1, n)
        eye = torch.eye(n, dtype=x.dtype, device=x.device).reshape(1, 1, n, n)
        allowed = allowed + (1.0 - allowed) * eye
        e = torch.exp(scores - scores.amax(dim=-1, keepdim=True)) * allowed
        probs = (e + 1e-6 / n) / (e.sum(dim=-1, keepdim=True) + 1e-6)
    elif hasattr(attn, "attention_probs"):
        probs = attn.attention_probs(scores)
    else:
        probs = scores.softmax(dim=-1)
    product = getattr(attn, "context_product", None)
    context = product(probs, v) if product is not None else probs @ v
    return attn.proj(context.transpose(1, 2).reshape(b, n, c)), probs, context


def attention_with_probs(attn: nn.Module, x: torch.Tensor):
    """(output, probabilities) of :func:`attention_parts`."""
    out, probs, _ = attention_parts(attn, x)
    return out, probs


def residual_branch(block: nn.Module, scale_name: str, value: torch.Tensor) -> torch.Tensor:
    """Apply a block's optional LayerScale (``ls1``/``ls2``) to a residual branch."""
    ls = _maybe(block, scale_name)
    return ls(value) if ls is not None else value


def block_with_probs(block: nn.Module, x: torch.Tensor):
    """One pre-norm block of timm's layout (norm1, attn, optional ls1; norm2, mlp, optional ls2)
    on ``x``, returning (output, attention probabilities (B, heads, N, N))."""
    attn_out, probs = attention_with_probs(block.attn, block.norm1(x))
    x = x + residual_branch(block, "ls1", attn_out)
    return x + residual_branch(block, "ls2", block.mlp(block.norm2(x))), probs


# ------------------------------------------------------------------------------------------------
# static token selection (shared by the token passes and the quantisers that rewrite their selectors)

def keep_count(keep: float, patch_tokens: int) -> int:
    """Number of patch tokens kept: ceil(keep * N) (EViT's rule), at least 1."""
    return max(1, min(patch_tokens, math.ceil(keep * patch_tokens - 1e-9)))


def select_tokens(patches: torch.Tensor, scores: torch.Tensor, k: int):
    """Static top-k selection of patch tokens.

    patches: (B, N, C) (CLS excluded); scores: (B, N). Returns the kept tokens (B, k, C), their
    indices (B, k) and scores (B, k). ``k`` is a Python int, so the exported graph has ``TopK``
    with a constant k followed by ``GatherElements``.

    Ties go to the lower token index, as ONNX defines ``TopK``: :class:`OnnxTopK` gives the same
    choice in PyTorch, ONNX Runtime and TVM (``torch.topk`` leaves ties unspecified, and
    quantised scores, e.g. under poly-act, tie often)."""
    kept_scores, index = OnnxTopK.apply(scores, k)
    record_selection(index)
    kept = torch.gather(patches, 1, index.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
    return kept, index, kept_scores


# -- which tokens were kept (for keep maps) -----------------------------------------------------
_SELECTIONS: list | None = None


@contextlib.contextmanager
def recording_selections():
    """Inside the ``with``, every token selection a pruning stage makes is appended, in execution
    order, to the yielded list as an index tensor (B, k): the positions, within the stage's own
    patch tokens (CLS excluded), of the tokens it kept. ``sliver.passes.keep_maps`` composes them
    into keep maps on the patch grid."""
    global _SELECTIONS
    saved, _SELECTIONS = _SELECTIONS, []
    try:
        yield _SELECTIONS
    finally:
        _SELECTIONS = saved


def record_selection(index: torch.Tensor) -> None:
    """Called by every stage with the (B, k) positions it kept; a no-op unless recording."""
    if _SELECTIONS is not None:
        _SELECTIONS.append(index.detach().clone())


def weighted_rest(tokens: torch.Tensor, weights: torch.Tensor, kept: torch.Tensor, kept_weights: torch.Tensor):
    """Weighted average of the tokens NOT kept, without a scatter:
    (sum_all w x - sum_kept w x) / (sum_all w - sum_kept w). The sums are matrix products, so a
    selector's own multiply-accumulates are counted. Returns (B, 1, C)."""
    total = weights.unsqueeze(1) @ tokens
    kept_sum = kept_weights.unsqueeze(1) @ kept
    rest = (weights.sum(dim=1) - kept_weights.sum(dim=1)).clamp_min(1e-12)
    return (total - kept_sum) / rest.reshape(-1, 1, 1)


class OnnxTopK(torch.autograd.Function):
    """Top-k along the last axis with ONNX's tie rule (equal values: lower index first), in eager
    PyTorch and in the exported graph (one ``TopK`` node with a constant k), so that PyTorch, ONNX
    Runtime and TVM choose the same tokens. Gradients flow to the selected values."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, k: int):
        values, order = torch.sort(scores, dim=-1, descending=True, stable=True)
        index = order[..., :k].contiguous()
        ctx.save_for_backward(index)
        ctx.shape = scores.shape
        return values[..., :k].contiguous(), index

    @staticmethod
    def backward(ctx, grad_values, grad_index):
        (index,) = ctx.saved_tensors
        grad = torch.zeros(ctx.shape, dtype=grad_values.dtype, device=grad_values.device)
        return grad.scatter(-1, index, grad_values), None

    @staticmethod
    def symbolic(g, scores, k: int):
        k_const = g.op("Constant", value_t=torch.tensor([k], dtype=torch.int64))
        return g.op("TopK", scores, k_const, axis_i=-1, largest_i=1, sorted_i=1, outputs=2)




class TokenFusion(nn.Module):
    """The static selection stage every fusing token pass ends with: keep the top-``keep_tokens``
    patch tokens by score and fuse the others into one token, their score-weighted average
    (EViT's fused token, HeatViT's package token).

    ``forward(x, scores)``: ``x`` (B, T, C) with the class token first; ``scores`` (B, T - 1), one
    per token of ``x[:, 1:]``. With ``absorbs_last`` the last token of ``x`` (a package token of an
    earlier stage) is not a candidate for keeping but is fused with its score. Returns
    ``cat(cls, kept, fused)``, (B, keep_tokens + 2, C).

    One module, so that a quantiser can swap it for its integer version (top-k on integer scores,
    a gather of integer tokens, the fused token as an integer matmul and a rounding division)."""

    def __init__(self, keep_tokens: int, absorbs_last: bool = False):
        super().__init__()
        self.keep_tokens, self.absorbs_last = int(keep_tokens), bool(absorbs_last)

    def extra_repr(self) -> str:
        return f"keep_tokens={self.keep_tokens}, absorbs_last={self.absorbs_last}"

    def forward(self, x: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        others = x[:, 1:]
        end = others.shape[1] - 1 if self.absorbs_last else others.shape[1]
        kept, _, kept_scores = select_tokens(others[:, :end], scores[:, :end], self.keep_tokens)
        fused = weighted_rest(others, scores, kept, kept_scores)
        return torch.cat([x[:, :1], kept, fused], dim=1)
