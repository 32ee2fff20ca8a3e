"""Transformer-block layouts, shared by every family that rewrites ViTs (token passes, poly-act,
the quantisers): finding the blocks of a torch-level Program, reading a block's parts through the
adapter of its layout, and multi-head attention that also returns its probabilities.

Blocks are the ``call_module`` nodes that :func:`sliver.ir.is_transformer_block` recognises
(tracing keeps them whole). A pass never reads a block's attributes itself: it asks the block's
:class:`BlockLayout` (``layout_of(block)``), chosen by structure (the names and types of the
children), never by class name. Each layout is one small adapter:

- :class:`TimmLayout`: timm's ``Block`` (sliver's zoo, timm 0.x and 1.0): ``norm1``, ``attn``
  (``qkv``, ``proj``, ``num_heads``; optional ``q_norm``/``k_norm`` and a scale ``norm`` before
  ``proj``), ``norm2``, ``mlp``, optional LayerScale ``ls1``/``ls2``. timm 1.0's attention is
  called with ``attn_mask``/``is_causal`` keywords and may take the fused path
  (``F.scaled_dot_product_attention``); the adapter computes the same attention step by step.
- :class:`TorchvisionLayout`: torchvision's ``EncoderBlock``: ``ln_1``, ``self_attention`` (an
  ``nn.MultiheadAttention`` with packed in-projection, batch first), ``dropout``, ``ln_2``,
  ``mlp``.

Children are read by their role, not their class: a linear role (``qkv``, ``proj``,
``out_proj``, the MLP's first layer) is filled by an ``nn.Linear`` or by a replacement one of
sliver's passes installed that declares ``replaces = nn.Linear`` (:func:`plays`: rapq's
``QLinear``, appmul's linear ``AppMulLayer``); rapq's ``QAttention`` keeps timm's ``qkv``/``proj``/
``num_heads``, and the norms are only read through ``normalized_shape`` or ``weight``, which
``QLayerNorm`` keeps. Quantising or approximating a block's layers leaves its structure as it
was, so the blocks the token passes and poly-act build are still read by the same adapter
afterwards (evit's block calls :func:`attention_step` at run time, after rapq swapped its
children).

A block that no layout fits gets a one-line error naming its children. Modules a pass builds
around a block own the block's children under the same names, so the adapter of the original
block also reads them (and checkpoints of the dense model still load).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..ir.errors import OptionValueError, UnsupportedOpError
from ..ir.torch_level import is_transformer_block


def _maybe(module: nn.Module, name: str):
    sub = getattr(module, name, None)
    return sub if isinstance(sub, nn.Module) else None


def plays(module, role: type) -> bool:
    """Whether ``module`` fills the role of a ``role`` layer (``nn.Linear``, ``nn.LayerNorm``): it
    is one, or it declares with a ``replaces`` attribute that it stands in for one (sliver's
    quantised and approximate layers, which keep the replaced layer's ``in_features``/
    ``out_features``). A declaration rather than a looser structural test, so a
    block of a truly unknown layout still gets the one-line error."""
    replaced = getattr(module, "replaces", None)
    return isinstance(module, role) or (isinstance(replaced, type) and issubclass(replaced, role))


def _apply(module: nn.Module, name: str, value: torch.Tensor) -> torch.Tensor:
    sub = _maybe(module, name)
    return sub(value) if sub is not None else value


# -- attention modules ----------------------------------------------------------------------------
class AttentionLayout:
    """How one kind of multi-head attention module projects its inputs and output."""

    name = ""

    def fits(self, attn: nn.Module) -> bool:
        raise NotImplementedError

    def num_heads(self, attn: nn.Module) -> int:
        return int(attn.num_heads)

    def qkv(self, attn: nn.Module, x: torch.Tensor):
        """(q, k, v), each (B, heads, N, head_dim), q not yet scaled."""
        raise NotImplementedError

    def scale(self, attn: nn.Module, head_dim: int) -> float:
        return head_dim ** -0.5

    def out(self, attn: nn.Module, context: torch.Tensor) -> torch.Tensor:
        """The output projection of the merged heads (B, N, C)."""
        raise NotImplementedError

    def call(self, module: nn.Module, compute, args: tuple, kwargs: dict):
        """Run ``compute(x, mask)`` with the arguments and return value of this module kind's
        ``forward`` (so a replacement attention drops into the unchanged block)."""
        raise NotImplementedError


class FusedQKVAttention(AttentionLayout):
    """timm's ``Attention`` (and sliver's zoo): ``qkv`` Linear (C -> 3C), ``proj``, ``num_heads``;
    ``forward(x, attn_mask=None, is_causal=False) -> out``."""

    name = "qkv"

    def fits(self, attn):
        return (isinstance(getattr(attn, "num_heads", None), int) and plays(_maybe(attn, "qkv"), nn.Linear)
                and plays(_maybe(attn, "proj"), nn.Linear))

    def qkv(self, attn, x):
        b, n, c = x.shape
        heads = attn.num_heads
        qkv = attn.qkv(x).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        return _apply(attn, "q_norm", q), _apply(attn, "k_norm", k), v

    def scale(self, attn, head_dim):
        return getattr(attn, "scale", None) or head_dim ** -0.5

    def out(self, attn, context):
        return attn.proj(_apply(attn, "norm", context))

    def call(self, module, compute, args, kwargs):
        x = args[0]
        mask = kwargs.get("attn_mask", args[1] if len(args) > 1 else None)
        if kwargs.get("is_causal", False):
            raise UnsupportedOpError(f"{type(module).__name__} is called with is_causal=True; vision models attend to every token")
        return compute(x, mask)


class PackedMultiheadAttention(AttentionLayout):
    """``nn.MultiheadAttention`` with one packed ``in_proj_weight`` (3C x C), batch first:
    ``forward(query, key, value, ..., need_weights=True, attn_mask=None) -> (out, weights)``.
    Self-attention only (query, key and value are the same tensor)."""

    name = "nn.MultiheadAttention"

    def fits(self, attn):
        return (isinstance(getattr(attn, "num_heads", None), int)
                and isinstance(getattr(attn, "in_proj_weight", None), torch.Tensor)
                and plays(_maybe(attn, "out_proj"), nn.Linear)
                and getattr(attn, "batch_first", False) is True
                and getattr(attn, "bias_k", None) is None and not getattr(attn, "add_zero_attn", False))

    def qkv(self, attn, x):
        b, n, c = x.shape
        heads = attn.num_heads
        qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
        qkv = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def out(self, attn, context):
        return attn.out_proj(context)

    def call(self, module, compute, args, kwargs):
        names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask")
        given = dict(zip(names, args), **kwargs)
        query = given["query"]
        if given.get("key") is not query or given.get("value") is not query:
            raise UnsupportedOpError(f"{type(module).__name__} is called with different query/key/value; "
                                     "sliver rewrites self-attention only")
        if given.get("key_padding_mask") is not None:
            raise UnsupportedOpError(f"{type(module).__name__} is called with a key_padding_mask; "
                                     "vision models attend to every token")
        return compute(query, given.get("attn_mask")), None


ATTENTION_LAYOUTS: tuple = (FusedQKVAttention(), PackedMultiheadAttention())


def attention_layout(attn: nn.Module) -> AttentionLayout:
    for layout in ATTENTION_LAYOUTS:
        if layout.fits(attn):
            return layout
    children = ", ".join(f"{n}: {type(c).__name__}" for n, c in attn.named_children()) or "none"
    raise UnsupportedOpError(
        f"sliver does not know the attention layout of {type(attn).__name__} (children {children}); it reads "
        "timm's Attention (qkv, proj, num_heads) and nn.MultiheadAttention (packed in_proj, batch_first=True)"
    )


# -- blocks ---------------------------------------------------------------------------------------
class BlockLayout:
    """Where a pre-norm transformer block keeps its parts: the names of the first norm, the
    attention, the second norm, the MLP, and how the attention branch ends before the residual."""

    name = ""
    norm1 = attn = norm2 = mlp = ""

    def fits(self, block: nn.Module) -> bool:
        parts = (_maybe(block, self.norm1), _maybe(block, self.attn), _maybe(block, self.norm2), _maybe(block, self.mlp))
        if any(p is None for p in parts):
            return False
        return any(a.fits(parts[1]) for a in ATTENTION_LAYOUTS)

    def attention(self, block):
        return getattr(block, self.attn)

    def attn_branch_end(self, block, out):
        """What the block applies to the attention output before adding the residual."""
        return out

    def mlp_branch(self, block, x):
        """The MLP branch before the residual: mlp(norm2(x)) and whatever the block applies after."""
        return getattr(block, self.mlp)(getattr(block, self.norm2)(x))

    def dim(self, block) -> int:
        norm = getattr(block, self.norm1)
        shape = getattr(norm, "normalized_shape", None)
        if shape:
            return int(shape[0])
        return int(getattr(block, self.norm1).weight.shape[0])

    def mlp_hidden(self, block) -> int:
        first = next((m for m in getattr(block, self.mlp).modules() if plays(m, nn.Linear)), None)
        return int(first.out_features) if first is not None else 4 * self.dim(block)


class TimmLayout(BlockLayout):
    name = "timm Block"
    norm1, attn, norm2, mlp = "norm1", "attn", "norm2", "mlp"

    def attn_branch_end(self, block, out):
        return _apply(block, "ls1", out)

    def mlp_branch(self, block, x):
        return _apply(block, "ls2", block.mlp(block.norm2(x)))


class TorchvisionLayout(BlockLayout):
    name = "torchvision EncoderBlock"
    norm1, attn, norm2, mlp = "ln_1", "self_attention", "ln_2", "mlp"

    def attn_branch_end(self, block, out):
        return _apply(block, "dropout", out)


BLOCK_LAYOUTS: tuple = (TimmLayout(), TorchvisionLayout())


def layout_of(block: nn.Module, pass_name: str | None = None) -> BlockLayout:
    """The adapter whose layout ``block`` has; a one-line error naming what was found otherwise."""
    for layout in BLOCK_LAYOUTS:
        if layout.fits(block):
            return layout
    children = ", ".join(f"{n}: {type(c).__name__}" for n, c in block.named_children()) or "none"
    who = f"pass {pass_name!r}" if pass_name else "sliver"
    known = "; ".join(f"{l.name} ({l.norm1}, {l.attn}, {l.norm2}, {l.mlp})" for l in BLOCK_LAYOUTS)
    raise UnsupportedOpError(
        f"{who} does not know the block layout of {type(block).__name__} (children {children}); "
        f"known layouts: {known}"
    )


def transformer_blocks(gm: torch.fx.GraphModule) -> list:
    """The transformer-block nodes of ``gm`` in execution order."""
    return [
        n for n in gm.graph.nodes
        if n.op == "call_module" and is_transformer_block(gm.get_submodule(n.target))
    ]


def check_blocks(pass_name: str, gm: torch.fx.GraphModule, indices) -> list:
    """The block nodes at ``indices``; one-line errors for a model without blocks, an index
    past the depth, or a block whose layout no adapter fits."""
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
        layout_of(gm.get_submodule(block.target), pass_name)
    return [blocks[i] for i in sorted(indices)]


def tokens_in(node: torch.fx.Node) -> int:
    """Token count entering a block node (from the traced shapes)."""
    meta = node.args[0].meta.get("tensor_meta")
    return int(meta.shape[1])


def block_dims(block: nn.Module) -> tuple:
    """(embedding dim, heads, MLP ratio) of a block."""
    layout = layout_of(block)
    dim = layout.dim(block)
    attn = layout.attention(block)
    return dim, attention_layout(attn).num_heads(attn), layout.mlp_hidden(block) / dim


# -- attention with probabilities -----------------------------------------------------------------
def attention_parts(attn: nn.Module, x: torch.Tensor, policy: torch.Tensor | None = None,
                    mask: torch.Tensor | None = None, connections: torch.Tensor | None = None):
    """Multi-head self-attention computed step by step, returning (output, probabilities, context).

    probabilities: (B, heads, N, N); context: the per-head A.V before the output projection,
    (B, heads, N, head_dim). The probabilities come from ``attn.attention_probs(scores)`` when the
    module has that method (poly-act's PolyAttention, the quantisers' attention do), else from
    softmax; the two activation products from ``attn.score_product(q, k^T)`` and
    ``attn.context_product(probs, v)`` when it has them (the quantisers' attention: integer
    matmuls), so a block that computes its attention through this function (evit's) runs the
    attention module's own ops whatever pass swapped it. ``mask``: an additive (float) or boolean
    (True = attend) attention mask, as ``F.scaled_dot_product_attention`` takes.

    ``policy`` (B, N), 1 = kept, is the training-time token mask of the pruning passes: pruned keys
    get no weight and every token still attends to itself (DynamicViT's masked softmax).
    ``connections`` (B, N, N), 0/1, masks query-key pairs the same way (Tri-Level E-ViT's
    attention-level mask; the exponentials are multiplied by it before normalising)."""
    layout = attention_layout(attn)
    b, n, c = x.shape
    q, k, v = layout.qkv(attn, x)
    scale = layout.scale(attn, q.shape[-1])
    product = getattr(attn, "score_product", None)
    scores = product(q * scale, k.transpose(-2, -1)) if product is not None else (q * scale) @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
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
    product = getattr(attn, "context_product", None)
    context = product(probs, v) if product is not None else probs @ v
    return layout.out(attn, context.transpose(1, 2).reshape(b, n, c)), probs, context


def attention_with_probs(attn: nn.Module, x: torch.Tensor):
    """(output, probabilities) of :func:`attention_parts`."""
    out, probs, _ = attention_parts(attn, x)
    return out, probs


def attention_step(block: nn.Module, x: torch.Tensor, policy: torch.Tensor | None = None):
    """The attention half of a block: ``x + branch(attn(norm1(x)))``, with the attention's
    probabilities and context. Returns (x, probabilities, context)."""
    layout = layout_of(block)
    out, probs, context = attention_parts(layout.attention(block), getattr(block, layout.norm1)(x), policy)
    return x + layout.attn_branch_end(block, out), probs, context


def mlp_step(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The MLP half of a block: ``x + branch(mlp(norm2(x)))``."""
    return x + layout_of(block).mlp_branch(block, x)


class ProbsAttention(nn.Module):
    """An attention module computed by :func:`attention_parts` with its probabilities from
    its :meth:`attention_probs` (softmax here; poly-act's subclass uses its polynomial softmax). It owns the original module's parameters and
    children under the same names and answers the original's call convention, so it replaces
    the attention inside an unchanged block (timm 1.0 calls it with ``attn_mask=``, torchvision's
    block as ``self_attention(x, x, x, need_weights=False)``)."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.layout = attention_layout(attn)
        for name, p in attn.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, child in attn.named_children():
            self.add_module(name, child)
        for name in ("num_heads", "head_dim", "scale", "batch_first", "embed_dim", "bias_k", "bias_v",
                     "add_zero_attn", "_qkv_same_embed_dim"):
            if name in attn.__dict__:
                setattr(self, name, attn.__dict__[name])

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, layout={self.layout.name}"

    def attention_probs(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.softmax(dim=-1)

    def forward(self, *args, **kwargs):
        return self.layout.call(self, lambda x, mask: attention_parts(self, x, mask=mask)[0], args, kwargs)


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
    replay = _REPLAY
    if replay is not None and replay.forcing:
        index = replay.forced(scores.shape[0], k).to(scores.device)
        kept_scores = torch.gather(scores, -1, index)
    else:
        kept_scores, index = OnnxTopK.apply(scores, k)
        if replay is not None:
            replay.keep(index)
    record_selection(index)
    kept = torch.gather(patches, 1, index.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
    return kept, index, kept_scores


# -- the reference's selections, replayed (calibration) -----------------------------------------
_REPLAY: "SelectionReplay | None" = None


class SelectionReplay:
    """Record the token selections a model makes, then make it repeat them.

    A calibration that fits each layer of a quantised model to the float model's output of that
    layer compares tokens position by position. After a top-k stage the kept tokens are in score
    order, and the quantised model's scores differ a little from the float ones: its kept tokens
    come in another order and at the margin are other tokens, so the layers after the stage would
    be fitted to the outputs of other tokens. Inside :meth:`replaying`, every
    :func:`select_tokens` keeps the indices the float model chose on the same images (recorded
    inside :meth:`recording`), so input and target are the same tokens.

    Forwards are counted by a pre-hook on ``model``: the n-th forward inside :meth:`replaying`
    repeats the selections of forward ``n mod F``, F being the number of forwards recorded, so the
    model must be run over the same batches in the same order both times (a forward stopped
    early by an exception is still counted)."""

    def __init__(self, model: nn.Module):
        self.model, self.forwards, self.forcing = model, [], False
        self._count, self._stage = -1, 0

    def keep(self, index: torch.Tensor) -> None:
        if self.forwards:
            self.forwards[-1].append(index.detach().clone())

    def forced(self, batch: int, k: int) -> torch.Tensor:
        stages = self.forwards[self._count % len(self.forwards)]
        if self._stage >= len(stages) or tuple(stages[self._stage].shape) != (batch, k):
            raise RuntimeError(f"selection replay: stage {self._stage} of forward {self._count} was not recorded "
                               f"with shape ({batch}, {k}); run the same batches in the same order")
        self._stage += 1
        return stages[self._stage - 1]

    @contextlib.contextmanager
    def _active(self, replaying: bool):
        global _REPLAY

        def start(module, args):
            if replaying:
                self._count, self._stage = self._count + 1, 0
            else:
                self.forwards.append([])

        if replaying and not any(self.forwards):
            yield self  # the model selects no tokens: nothing to replay
            return
        saved, _REPLAY = _REPLAY, self
        self.forcing, self._count = replaying, -1
        handle = self.model.register_forward_pre_hook(start)
        try:
            yield self
        finally:
            handle.remove()
            _REPLAY, self.forcing = saved, False

    def recording(self):
        """Inside the ``with``, each forward of the model records its selections."""
        self.forwards = []
        return self._active(False)

    def replaying(self):
        """Inside the ``with``, the forwards repeat the recorded selections (see the class)."""
        return self._active(True)


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
