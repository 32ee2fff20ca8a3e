"""CPU schedule rules of sliver's own, applied without tuning (the way TVM's DLight works for GPUs).

After Relax fuses the model into PrimFuncs (one per fused group: ``matmul + bias + GELU``,
``conv2d + bias + residual add + relu6``, ``layer_norm``, ``softmax``...), :func:`schedule_module`
gives every PrimFunc a schedule from five rules:

- **GEMM-like** functions (one reduction block ``C += A * B``: dense, batched attention matmuls,
  conv2d in NHWC/HWIO layout incl. depthwise): the output's innermost axis ``j`` (features /
  channels, contiguous in the output and the weights) is split into one or two SIMD vectors and
  vectorised; the next axis ``i`` (tokens / output width) is split into a register block and
  unrolled; the reduction loops go between them. Each reduction step loads the weight vector(s),
  broadcasts one activation per row and does ``rows x vectors`` FMAs on accumulators that stay in
  registers (6x16 floats on AVX2; 14 accumulators spilled). Extents that do not tile (197 tokens,
  197 keys) are padded with ``pad_einsum``. When the weights are the bigger operand the weight
  panel is the outer loop and the rows stream past it, in L2-sized chunks. The outer loops are
  fused and run in parallel; the epilogue (bias, GELU, residual add, ReLU/ReLU6) is computed per
  register tile while it is hot (blocks read several times, like GELU's, are not inlined, which
  would copy their expression).
- **depthwise + 1x1** functions (:func:`fuse_depthwise_pointwise` merges a depthwise conv group
  into the 1x1 conv that alone consumes it): the 1x1 conv is register-tiled as above with pixel
  tiles outermost; each tile first computes its pixels' depthwise outputs (all channels, in
  vectors) into a stack buffer, so they never go to memory. A single-row GEMM (a classifier at
  batch 1) reads ``GEMV_PANELS`` weight panels per tile; RGB stems read the NCHW input directly
  (:func:`fold_input_transpose`).
- **window** functions (max / average pooling, channels last): padding inlined, the window loops
  outside a vector of channels, rows in parallel.
- **row-wise** functions (softmax, layer norm, mean): every block is computed per row, rows in
  parallel.
- **everything else** (transposes, padding, pooling): each block's leading spatial loops run in
  parallel (only when big enough to pay for a thread wake-up) and the innermost loop is
  vectorised when it divides by the SIMD width.

Before the rules, constant weights of convolutions and matmuls are packed at build time into
column panels of the rule's vector block (:func:`packed_legalizers`, evaluated by
``FoldConstant``), so the weight stream of a register tile is contiguous and column counts that
do not tile (1000 classes, 24 channels) are zero-padded once, at build time, instead of per call.
On AVX-512 CPUs (detected from LLVM's CPU features) the vectors are 16 float32 lanes with 32
registers.

The rules change loop order only, never what is computed, so results match ONNX Runtime up to
float reassociation (tests/test_tvm_fast.py). A rule that fails on a function falls back to the
next one; the last one always applies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import s_tir, tirx


@dataclass(frozen=True)
class CpuParams:
    """Tile sizes for one CPU: the SIMD width in float32 lanes and the register-block shape."""

    lanes: int = 8  # AVX2: 8 float32 in a ymm register; NEON: 4
    vector_regs: int = 16  # AVX2 and SSE: 16; AVX-512 and NEON (aarch64): 32
    threads: int = 1

    @property
    def j_block(self) -> int:
        return 2 * self.lanes

    @property
    def i_block(self) -> int:
        # accumulators i_block * 2 registers + 2 for B + 1 broadcast <= vector_regs
        return max(1, min(8, (self.vector_regs - 3) // 2))


def cpu_params(target: dict) -> CpuParams:
    """Tile sizes from a TVM target dict (x86 with AVX2 / AVX-512, or aarch64 NEON)."""
    triple = target.get("mtriple", "")
    arm = triple.startswith("aarch64") or triple.startswith("arm")
    # a device's core count is unknown when cross-compiling: parallel loops cost little on one core
    threads = int(target.get("num-cores", 4 if arm else 1) or 1)
    if arm:
        return CpuParams(lanes=4, vector_regs=32, threads=threads)
    mcpu = str(target.get("mcpu", ""))
    attrs = " ".join(target.get("mattr", []) or [])
    avx512 = "avx512" in attrs or mcpu in {"skylake-avx512", "cascadelake", "icelake-server", "sapphirerapids", "znver4", "znver5"}
    if not avx512 and mcpu:
        try:  # ask LLVM (rocketlake, tigerlake, graniterapids, ... have AVX-512 too)
            from tvm.target import codegen

            avx512 = bool(codegen.llvm_cpu_has_features(["avx512f"], tvm.target.Target({"kind": "llvm", "mcpu": mcpu})))
        except Exception:
            pass
    if avx512:
        # 512-bit vectors and 32 registers: measured on this machine's AVX-512 Xeon, ResNet-18's
        # convolutions took 26 ms with 16 lanes against 33 ms with 8 (sum of per-call minima)
        return CpuParams(lanes=16, vector_regs=32, threads=threads)
    return CpuParams(lanes=8, vector_regs=16, threads=threads)


#: blocks with fewer loop iterations than this are not parallelised
PARALLEL_MIN_ELEMENTS = 1 << 16
#: fuse depthwise convolutions into the 1x1 convolution that consumes them (see fuse_depthwise_pointwise)
FUSE_DW_PW = True
#: weight panels one single-row (GEMV) register tile reads at once
GEMV_PANELS = 4

# ------------------------------------------------------------------------------------------------
# analysis helpers


def _iter_kinds(sch, block) -> list:
    return ["R" if iv.iter_type == tirx.IterVar.CommReduce else "S" for iv in sch.get(block).iter_vars]


def _extent(sch, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def _loops_match_iters(sch, block) -> bool:
    """True when the block's loops are its iter vars one to one, in order (fresh TE output)."""
    loops = sch.get_loops(block)
    iters = sch.get(block).iter_vars
    if len(loops) != len(iters):
        return False
    for loop, iv in zip(loops, iters):
        if _extent(sch, loop) is None or _extent(sch, loop) != int(iv.dom.extent):
            return False
    return True


def _is_multiply_reduction(sch, block) -> bool:
    """A reduction block whose update is ``C = C + A * B`` with A and B two different tensors."""
    b = sch.get(block)
    if "R" not in _iter_kinds(sch, block) or len(b.reads) < 2 or len(b.writes) != 1:
        return False
    body = b.body
    if not isinstance(body, tirx.BufferStore):
        return False
    value = body.value
    if isinstance(value, tirx.Add):
        terms = [value.a, value.b]
        for t in terms:
            while isinstance(t, tirx.Cast):
                t = t.value
            if isinstance(t, tirx.Mul):
                return True
    return False


def _divisor(n: int, candidates) -> int | None:
    for c in candidates:
        if c <= n and n % c == 0:
            return c
    return None


# ------------------------------------------------------------------------------------------------
# rules


def _schedule_gemm(sch, main, params: CpuParams, keep=frozenset()):
    """Register-tile the multiply-reduction block ``main`` (see the module docstring).

    Blocks named in ``keep`` are left unscheduled (the caller schedules them); returns the
    parallel loop over register tiles and whether it walks weight panels (True) or pixel / row
    tiles (False) outermost.
    """
    kinds = _iter_kinds(sch, main)
    n_spatial = kinds.index("R")
    if kinds[n_spatial:] != ["R"] * (len(kinds) - n_spatial) or n_spatial < 1:
        raise ValueError("iterators are not spatial-then-reduction")
    main = _pad_awkward_extents(sch, main, n_spatial, params)
    root = sch.get_sblock("root")
    blocks = sch.get_child_blocks(root)
    names = [sch.get(b).name_hint for b in blocks]
    main_name = sch.get(main).name_hint
    pos = names.index(main_name)
    # prologue: identity copies (1x1 convs' pad_temp) are inlined; so is the zero padding of a
    # depthwise convolution, whose every input load feeds one FMA (materialising the padded input
    # doubled its memory traffic: 0.78 ms -> see README); the rest stay materialised
    depthwise = _data_bytes(sch, main) == 0
    # likewise a convolution over fewer input channels than a vector (an RGB stem): its padding
    # pass was a scalar copy of the whole image per call (MobileNetV2: 226x226x3)
    few_channels = (_extent(sch, sch.get_loops(main)[-1]) or params.lanes) < params.lanes
    for name in names[:pos]:
        blk = sch.get_sblock(name)
        try:
            if _is_plain_copy(sch, blk) or depthwise or few_channels or name == "rows_clamp":
                sch.compute_inline(blk)
        except Exception:
            pass
    # epilogue: inline elementwise blocks read once into their consumer; blocks read several
    # times (GELU reads its input three times, erf's polynomial many more) stay blocks of their
    # own, computed per register tile, since inlining them copies their expression each time
    epilogue = names[pos + 1 :]
    for name in epilogue[:-1]:
        blk = sch.get_sblock(name)
        try:
            if _reads_per_consumer(sch, blk) <= 1:
                sch.compute_inline(blk)
        except Exception:
            pass
    remaining = [n for n in epilogue if _has_block(sch, n)]
    epi = sch.get_sblock(remaining[-1]) if remaining else None
    extra_epi = remaining[:-1]

    loops = sch.get_loops(main)
    spatial, reduction = loops[:n_spatial], loops[n_spatial:]
    j = spatial[-1]
    nj = _extent(sch, j)
    i_loops = spatial[:-1]
    ni = _extent(sch, i_loops[-1]) if i_loops else 1
    ib, jb = _register_block(ni, nj, params)
    writer = None
    if epi is None:
        writer = sch.cache_write(main, 0, "local")
    else:
        sch.set_scope(main, 0, "local")  # the accumulator tile: a stack array LLVM keeps in registers
    j0, j1 = sch.split(j, [None, jb])
    weights_first = _weights_bigger(sch, main)
    if i_loops:
        i0, i1 = sch.split(i_loops[-1], [None, ib])
        outer = list(i_loops[:-1])
        if weights_first:
            # a weight column panel stays in cache while the rows / pixels pass by; when the
            # rows are too big for L2 (fc2 of a ViT: 197 x 1536), they pass by in L2-sized chunks
            n_i0 = _extent(sch, i0)
            per_block = _data_bytes(sch, main) / max(1, n_i0 * _product(sch, outer))
            fit = max(1, int(L2_BUDGET_BYTES // max(1.0, per_block)))
            if not outer and fit < n_i0:
                chunk = max(d for d in range(1, fit + 1) if n_i0 % d == 0)
                ia, i0 = sch.split(i0, [None, chunk])
                sch.reorder(ia, j0, i0, *reduction, i1, j1)
                par_loops = [ia, j0, i0]
            elif ni == 1 and ib == 1 and GEMV_PANELS > 1 and (_extent(sch, j0) or 1) % GEMV_PANELS == 0:
                # one row (a classifier at batch 1): the weights stream from memory once and
                # two accumulators leave the core waiting on one stream; GEMV_PANELS panels per
                # tile read as many streams at once
                j0, jp = sch.split(j0, [None, GEMV_PANELS])
                sch.reorder(j0, *outer, i0, *reduction, jp, i1, j1)
                sch.unroll(jp)
                par_loops = [j0] + outer + [i0]
            elif chunk := _rblock_chunk(sch, reduction, jb, n_i0 * _product(sch, outer), _extent(sch, j0) or 1, params):
                r0, r1 = sch.split(reduction[-1], [None, chunk])
                sch.reorder(j0, r0, *outer, i0, *reduction[:-1], r1, i1, j1)
                reduction = [r0] + list(reduction[:-1]) + [r1]
                par_loops = [j0]
            else:
                sch.reorder(j0, *outer, i0, *reduction, i1, j1)
                par_loops = [j0] + outer + [i0]
        else:
            sch.reorder(*outer, i0, j0, *reduction, i1, j1)
            par_loops = outer + [i0]
    else:
        i1 = None
        sch.reorder(j0, *reduction, j1)
        par_loops = [j0]
    fused = sch.fuse(*par_loops) if len(par_loops) > 1 else par_loops[0]
    # consumer of the register tile, computed right after the reduction over the tile
    tile_loop = fused if (weights_first or not i_loops) else j0
    consumer = epi if epi is not None else writer
    tile_blocks = [sch.get_sblock(n) for n in extra_epi] + [consumer]
    for blk in tile_blocks:
        sch.reverse_compute_at(blk, tile_loop, preserve_unit_loops=True)
        try:
            sch.vectorize(sch.get_loops(blk)[-1])
        except Exception:
            pass
    for blk in tile_blocks[:-1]:
        try:
            sch.set_scope(blk, 0, "local")
        except Exception:
            pass
    if i1 is not None:
        sch.unroll(i1)
    sch.vectorize(j1)
    if params.threads > 1:
        sch.parallel(fused)
    init = sch.decompose_reduction(main, reduction[0])
    done = {main_name, sch.get(init).name_hint} | {sch.get(b).name_hint for b in tile_blocks}
    _schedule_rest(sch, params, skip=done | set(keep))
    return fused, weights_first


#: bytes of a weight chunk that should stay in L1 while every register tile of a panel uses it
L1_BUDGET_BYTES = 40 * 1024


def _rblock_chunk(sch, reduction, jb: int, tiles: int, panels: int, params: CpuParams) -> int:
    """Input channels per reduction chunk when a weight panel should be swept in L1-sized chunks
    (0: not chunked).

    A register tile reduces over the whole panel (a 3x3x512 convolution: 4608 x 32 weights, 590
    KB), so with the panel walked tile by tile, each of the panel's tiles reads it from L2 again,
    and the first from memory. Chunked, the loop over a panel's tiles runs inside the loop over
    chunks of the innermost reduction axis (input channels): a chunk (<= 40 KiB) is read from
    memory once and from L1 by every tile, and each tile's partial sums wait in a stack buffer
    between chunks. Only for convolutions with a window (3x3, 7x7), where a panel has several
    tiles to share it and there are panels enough for every thread (the panels are then the only
    parallel loop); matmuls (a ViT's fc2 over 1536 inputs) measured no better. Measured in the
    ResNet-18 model, one thread: its 7x7x512 3x3 convolutions 5.1 -> 4.3 ms (2 calls), the model's
    kernels 28.3-29.1 -> 26.8-27.4 ms (sum of minima).
    """
    if tiles < 2 or not reduction:
        return 0
    if panels < 2 * max(1, params.threads):
        return 0
    inner = _extent(sch, reduction[-1]) or 0
    window = _product(sch, reduction[:-1])
    per_channel = jb * 4 * window
    if window < 2 or inner * per_channel <= 48 * 1024:  # convolutions with a window only
        return 0
    fits = [d for d in range(1, inner) if inner % d == 0 and d * per_channel <= L1_BUDGET_BYTES]
    return max(fits) if fits and max(fits) >= 8 else 0


def _schedule_dw_pw(sch, dw, pw, params: CpuParams) -> None:
    """A depthwise convolution feeding a 1x1 convolution in one function
    (:func:`fuse_depthwise_pointwise`): the 1x1 convolution is register-tiled as usual with
    pixel tiles outermost; the depthwise outputs of a tile's pixels (all channels) are computed
    into a stack buffer at the start of the tile, channels in vectors, with its padding, bias
    and ReLU6 inlined (the latter two into the 1x1 convolution's loads)."""
    root = sch.get_sblock("root")
    names = [sch.get(b).name_hint for b in sch.get_child_blocks(root)]
    dw_name, pw_name = sch.get(dw).name_hint, sch.get(pw).name_hint
    i_dw, i_pw = names.index(dw_name), names.index(pw_name)
    if i_dw >= i_pw:
        raise ValueError("the depthwise convolution does not come first")
    between = names[i_dw + 1 : i_pw]
    for name in names[:i_dw] + between[:-1]:
        sch.compute_inline(sch.get_sblock(name))
    act = between[-1] if between else None  # bias + ReLU6 of the depthwise output, one vector pass
    keep = {dw_name} | ({act} if act else set())
    tile, weights_first = _schedule_gemm(sch, sch.get_sblock(pw_name), params, keep=keep)
    if weights_first:
        raise ValueError("the 1x1 convolution walks weight panels outermost")
    if act:
        blk = sch.get_sblock(act)
        sch.compute_at(blk, tile, preserve_unit_loops=True)
        sch.set_scope(blk, 0, "local")
        last = sch.get_loops(blk)[-1]
        if (_extent(sch, last) or 0) % params.lanes == 0:
            sch.vectorize(sch.split(last, [None, params.lanes])[1])
    dw = sch.get_sblock(dw_name)
    sch.compute_at(dw, tile, preserve_unit_loops=True)
    sch.set_scope(dw, 0, "local")
    tile_stmt = sch.get(tile)
    loops = sch.get_loops(dw)
    at = [k for k, l in enumerate(loops) if sch.get(l).same_as(tile_stmt)][0]
    inner = loops[at + 1 :]
    kinds = _iter_kinds(sch, dw)
    n_spatial = kinds.index("R")
    spatial, reduction = inner[: n_spatial], inner[n_spatial:]
    if len(inner) != len(kinds):
        raise ValueError("unexpected depthwise loop nest")
    c = spatial[-1]
    if (_extent(sch, c) or 0) % params.lanes:
        raise ValueError("depthwise channels are not a multiple of the vector width")
    c0, c1 = sch.split(c, [None, params.lanes])
    sch.reorder(*spatial[:-1], c0, *reduction, c1)
    sch.vectorize(c1)
    sch.decompose_reduction(dw, reduction[0])


def _reads_per_consumer(sch, block) -> int:
    """How many times the consumers of ``block`` load its output (max over consumers)."""
    buf = sch.get(block).writes[0].source
    name = buf.name
    worst = 0
    for consumer in sch.get_consumers(block):
        text = str(sch.get(consumer).body)
        worst = max(worst, len(re.findall(r"(?<![\w.])" + re.escape(name) + r"\[", text)))
    return worst


def _pad_awkward_extents(sch, main, n_spatial: int, params: CpuParams):
    """Pad a matmul whose rows or columns do not tile (197 tokens) to the next multiple.

    ``pad_einsum`` adds a producer block that zero-pads the inputs and a consumer block that crops
    the output; the padded block then gets full register tiles with no tail predicate.
    """
    b = sch.get(main)
    extents = [int(iv.dom.extent) for iv in b.iter_vars]
    ni = extents[n_spatial - 2] if n_spatial >= 2 else 1
    nj = extents[n_spatial - 1]
    padding = [1] * len(extents)
    if nj % params.lanes:
        padding[n_spatial - 1] = params.j_block
        nj = -(-nj // params.j_block) * params.j_block
    if n_spatial >= 2:
        ib, jb = _register_block(ni, nj, params)
        if ib * (jb // params.lanes) < 4 or ni % ib:
            padding[n_spatial - 2] = max(1, (params.vector_regs - 3) // 2) if jb // params.lanes == 2 else params.vector_regs // 2
    if all(p == 1 for p in padding):
        return main
    name = b.name_hint
    try:
        sch.pad_einsum(main, padding)
    except Exception:
        return main
    # the crop block pad_einsum adds is a plain copy: inline it into the epilogue
    main = sch.get_sblock(name)
    for consumer in sch.get_consumers(main):
        try:
            sch.reverse_compute_inline(consumer)
        except Exception:
            pass
    return sch.get_sblock(name)


def _register_block(ni: int, nj: int, params: CpuParams) -> tuple:
    """(rows, columns) of the register tile: as many FMAs per reduction step as registers allow.

    Rows must divide ``ni`` (no tail predicate in the hot loop) unless none does; columns are one
    or two SIMD vectors and must divide ``nj``.
    """
    best = None
    for jv in (2, 1):
        jb = jv * params.lanes
        if nj % jb:
            continue
        # half the registers hold accumulators: LLVM unrolls the reduction loop by two and
        # needs the other half (measured: 14 accumulators spill, 8 do not)
        max_rows = max(1, (params.vector_regs - 3) // 2) if jv == 2 else params.vector_regs // 2
        for ib in range(min(max_rows, ni), 0, -1):
            if ni % ib == 0:
                score = ib * jv * (1.0 if jv == 2 else 0.6)
                if best is None or score > best[0]:
                    best = (score, ib, jb)
                break
    if best is not None and best[1] * (best[2] // params.lanes) >= 4:
        return best[1], best[2]
    # no good divisor (e.g. 197 tokens): a tail predicate on the rows
    jb = params.j_block if nj % params.j_block == 0 else (params.lanes if nj % params.lanes == 0 else min(nj, params.j_block))
    jv = max(1, jb // params.lanes)
    ib = min(ni, max(1, (params.vector_regs // 2) // jv))
    if best is not None and best[0] >= ib * jv * 0.75:
        return best[1], best[2]
    return ib, jb


#: bytes of the data operand a weight panel should sweep while it stays in L2
L2_BUDGET_BYTES = 192 * 1024


def _product(sch, loops) -> int:
    n = 1
    for loop in loops:
        n *= _extent(sch, loop) or 1
    return n


def _data_bytes(sch, main) -> int:
    """Bytes of the operand not indexed by the vector axis (activations)."""
    b = sch.get(main)
    j_var = b.iter_vars[[k for k, kind in enumerate(_iter_kinds(sch, main)) if kind == "S"][-1]].var
    reads = [r for r in b.reads if not r.source.same_as(b.writes[0].source)]
    for r in reads:
        if not any(_uses_var(rg.min, j_var) for rg in r.region):
            return _buffer_bytes(r.source)
    return 0


def _buffer_bytes(buf) -> int:
    n = 1
    for d in buf.shape:
        n *= int(d)
    return n * 4


def _weights_bigger(sch, main) -> bool:
    """True when the operand indexed by the vector axis (weights) is larger than the other one."""
    b = sch.get(main)
    j_var = b.iter_vars[[k for k, kind in enumerate(_iter_kinds(sch, main)) if kind == "S"][-1]].var
    reads = [r for r in b.reads if not r.source.same_as(b.writes[0].source)]
    if len(reads) != 2:
        return False
    uses_j = [any(_uses_var(rg.min, j_var) for rg in r.region) for r in reads]
    if uses_j.count(True) != 1:
        return False
    weight = reads[uses_j.index(True)]
    data = reads[uses_j.index(False)]
    return _buffer_bytes(weight.source) > _buffer_bytes(data.source)


def _uses_var(expr, var) -> bool:
    import re

    return re.search(r"(?<![\w.])" + re.escape(var.name) + r"(?!\w)", str(expr)) is not None


def _has_block(sch, name: str) -> bool:
    try:
        sch.get_sblock(name)
        return True
    except Exception:
        return False


#: the class of TIR buffer loads (``tirx.BufferLoad`` is a constructor function in TVM 0.27)
_BUFFER_LOAD = tirx.BufferLoad if isinstance(tirx.BufferLoad, type) else tvm.ir.expr.TensorLoad


def _is_plain_copy(sch, block) -> bool:
    b = sch.get(block)
    if len(b.reads) != 1 or len(b.writes) != 1 or not isinstance(b.body, tirx.BufferStore):
        return False
    if not isinstance(b.body.value, _BUFFER_LOAD):
        return False
    rshape = [int(x) for x in b.reads[0].source.shape]
    wshape = [int(x) for x in b.writes[0].source.shape]
    return rshape == wshape


def _schedule_block_generic(sch, block, params: CpuParams) -> None:
    loops = sch.get_loops(block)
    if not loops:
        return
    kinds = _iter_kinds(sch, block)
    if len(kinds) != len(loops):
        return
    spatial = []
    for loop, kind in zip(loops, kinds):
        if kind != "S":
            break
        spatial.append(loop)
    if not spatial:
        return
    all_spatial = len(spatial) == len(loops)
    size = 1  # (before the split below: it replaces the last loop)
    for loop in loops:
        size *= _extent(sch, loop) or 1
    vec = None
    if all_spatial:
        last = spatial[-1]
        n = _extent(sch, last)
        if n is not None and n % params.lanes == 0 and n >= params.lanes:
            lo, vec = sch.split(last, [None, params.lanes])
            spatial = spatial[:-1] + [lo]
    # small blocks run serially: a parallel region costs a thread-pool wake-up, and on a busy
    # machine a wait for a descheduled worker (MobileNetV2 has ~100 small blocks)
    if params.threads > 1 and size >= PARALLEL_MIN_ELEMENTS:
        par = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
        ext = _extent(sch, par)
        if ext is None or ext > 1:
            sch.parallel(par)
    if vec is not None:
        sch.vectorize(vec)


def _loads_of(sch, block) -> int:
    """How many loads of ``block``'s output the other blocks of the function hold (counted in
    their printed bodies: TVM 0.27's Python API has no TIR visitor)."""
    import re

    names = [w.source.name for w in sch.get(block).writes]
    count = 0
    this = sch.get(block)
    for other in sch.get_child_blocks(sch.get_sblock("root")):
        if sch.get(other).same_as(this):
            continue
        text = sch.get(other).body.script()
        count += sum(len(re.findall(rf"(?<![\w.]){re.escape(n)}\[", text)) for n in names)
    return count


def _inline_read_once(sch) -> None:
    """Inline every block but the last whose output is read once. Only those: the integer
    LayerNorm's unrolled Newton steps read each iterate twice, and inlining them doubles the
    expression per step (its build did not finish)."""
    for blk in sch.get_child_blocks(sch.get_sblock("root"))[:-1]:
        if _loads_of(sch, blk) == 1:
            try:
                sch.compute_inline(blk)
            except Exception:
                pass


def _schedule_rest(sch, params: CpuParams, skip=frozenset()) -> None:
    root = sch.get_sblock("root")
    blocks = sch.get_child_blocks(root)
    if len(blocks) > 1 and not skip and all("R" not in _iter_kinds(sch, b) for b in blocks):
        # an elementwise chain (e.g. a requantisation after a residual sum that has two
        # consumers): one loop nest instead of one per op, so no intermediate tensor is written
        _inline_read_once(sch)
    for blk in sch.get_child_blocks(root):
        name = sch.get(blk).name_hint
        if name in skip:
            continue
        try:
            _schedule_block_generic(sch, blk, params)
        except Exception:
            pass


def _schedule_elementwise(sch, params: CpuParams) -> None:
    """An elementwise chain of several blocks (no reduction): values read once are inlined, the
    others are computed per tile of the last block (``compute_at``), so the chain is one loop
    nest over small per-tile buffers: rows (fused) in parallel, the last axis in vectors of the
    rule's width, or a plain loop LLVM vectorises when the width does not divide it (DeiT-S's
    197-token rows of the integer softmax ran one element per parallel iteration, op by op).
    Raises when a block cannot follow (the caller then tries the next rule)."""
    root = sch.get_sblock("root")
    _inline_read_once(sch)
    blocks = sch.get_child_blocks(root)
    if len(blocks) < 2:
        raise ValueError("one block: the generic rule")
    last = blocks[-1]
    loops = sch.get_loops(last)
    if len(loops) < 2 or "R" in _iter_kinds(sch, last):
        raise ValueError("not a multi-axis elementwise block")
    shape = [int(d) for d in sch.get(last).writes[0].source.shape]

    def local(b):  # the output's shape, or one value per row of it (a row sum's cast)
        return all([int(d) for d in w.source.shape] in (shape, shape[:-1] + [1]) for w in sch.get(b).writes)

    if not all(local(b) for b in blocks):
        # a gather or another broadcast: a tile of the output may need all of a producer
        raise ValueError("blocks of different shapes")
    size = _product(sch, loops)
    outer_loops, inner = list(loops[:-1]), loops[-1]
    n = _extent(sch, inner) or 0
    per_row = [b for b in blocks[:-1] if [int(d) for d in sch.get(b).writes[0].source.shape] != shape]
    vec = None
    rows = None
    if n % params.lanes == 0:
        io, vec = sch.split(inner, [None, params.lanes])
        if per_row and n > params.lanes:
            # values of one row (the integer LayerNorm's Newton steps for its square root) are
            # computed once per row, not once per vector tile of the row
            rows = sch.fuse(*outer_loops) if len(outer_loops) > 1 else outer_loops[0]
        else:
            outer_loops.append(io)
    outer = rows if rows is not None else (sch.fuse(*outer_loops) if len(outer_loops) > 1 else outer_loops[0])
    for blk in reversed(blocks[:-1]):
        sch.compute_at(blk, outer if rows is None or blk in per_row else io)
    if params.threads > 1 and size >= PARALLEL_MIN_ELEMENTS:
        sch.parallel(outer)
    if vec is not None:
        sch.vectorize(vec)
    for blk in blocks[:-1]:
        inner_loops = sch.get_loops(blk)
        if len(inner_loops) > 1:
            m = _extent(sch, inner_loops[-1]) or 0
            if m and m % params.lanes == 0:
                _, v = sch.split(inner_loops[-1], [None, params.lanes])
                sch.vectorize(v)


def schedule_func(func: tirx.PrimFunc, params: CpuParams, intrin: str | None = None):
    """A scheduled copy of ``func`` (or None when no rule applies)."""
    sch = s_tir.Schedule(func)
    try:
        root = sch.get_sblock("root")
        blocks = sch.get_child_blocks(root)
    except Exception:
        return None
    mains = [b for b in blocks if _is_multiply_reduction(sch, b)]
    reducing = [b for b in blocks if "R" in _iter_kinds(sch, b)]
    # the rules that apply, most specific first; each is tried on a fresh schedule and the first
    # that succeeds wins (a rule that raises leaves nothing behind)
    rules = []
    int8 = [b for b in blocks if _is_int8_dot(sch, b)]
    if int8:
        flat = _flat_int8_epilogue(func)
        if flat is None:  # the tiled rules would compute a wrong epilogue (see there): plain loops
            sch = s_tir.Schedule(func)
            _schedule_rest(sch, params)
            return sch.mod["main"]
        func = flat
    if len(int8) == 1 and intrin is not None:
        rules.append(lambda t: _schedule_int8_dot(t, t.get_sblock("int8_dot"), params, intrin))
    if any(sch.get(b).name_hint == "int8_conv" for b in blocks) and intrin is not None:
        rules.append(lambda t: _schedule_int8_conv(t, t.get_sblock("int8_conv"), params, intrin))
    if len(mains) == 1 and _loops_match_iters(sch, mains[0]):
        name = sch.get(mains[0]).name_hint
        rules.append(lambda t, n=name: _schedule_gemm(t, t.get_sblock(n), params))
    if len(mains) == 2 and sch.get(mains[0]).name_hint.startswith("group_conv2d"):
        names2 = [sch.get(b).name_hint for b in mains]
        rules.append(lambda t, n=names2: _schedule_dw_pw(t, t.get_sblock(n[0]), t.get_sblock(n[1]), params))
    if len(reducing) == 1 and not mains:
        name = sch.get(reducing[0]).name_hint
        rules.append(lambda t, n=name: _schedule_window(t, t.get_sblock(n), params))
    if reducing and len(blocks) > 1:
        rules.append(lambda t: _schedule_rowwise(t, params))
    if not reducing and len(blocks) > 1:
        rules.append(lambda t: _schedule_elementwise(t, params))
    if [sch.get(b).name_hint for b in blocks] == ["int8_weight_pack"]:
        rules.append(lambda t: _schedule_pack(t, params))
    for rule in rules:
        trial = s_tir.Schedule(func)
        try:
            rule(trial)
            return trial.mod["main"]
        except Exception:
            pass
    sch = s_tir.Schedule(func)
    _schedule_rest(sch, params)
    return sch.mod["main"]


def _schedule_window(sch, block, params: CpuParams) -> None:
    """Window reductions over channels-last tensors (max / average pooling): the window loops go
    outside a vector of channels, so every window step is one vector max/add.

    TVM's legalisation leaves ``pool[n, y, x, c] = max over (ry, rx)`` with the window innermost
    and the padding as a block of its own; scheduled generically that ran one scalar element at a
    time (ResNet-18's 3x3/2 max pool: 0.53 ms against ONNX Runtime's 0.08). Here the padding is
    inlined (its condition is the same for every channel of a vector), the channel axis is split
    into vectors, the rows run in parallel and an epilogue (the average's division) is computed
    per tile.
    """
    loops = sch.get_loops(block)
    kinds = _iter_kinds(sch, block)
    n_spatial = kinds.index("R")
    if kinds[n_spatial:] != ["R"] * (len(kinds) - n_spatial) or len(loops) != len(kinds) or n_spatial < 2:
        raise ValueError("not spatial-then-reduction")
    channels = _extent(sch, loops[n_spatial - 1])
    if channels is None or channels % params.lanes:
        raise ValueError("channel axis does not split into vectors")
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    names = [sch.get(b).name_hint for b in blocks]
    pos = names.index(sch.get(block).name_hint)
    for name in names[:pos]:
        sch.compute_inline(sch.get_sblock(name))
    epilogue = names[pos + 1:]
    for name in epilogue[:-1]:
        sch.compute_inline(sch.get_sblock(name))
    block = sch.get_sblock(names[pos])
    loops = sch.get_loops(block)
    spatial, reduction = loops[:n_spatial], loops[n_spatial:]
    c0, c1 = sch.split(spatial[-1], [None, params.lanes])
    rows = list(spatial[:-1])
    sch.reorder(*rows, c0, *reduction, c1)
    par = sch.fuse(*rows) if len(rows) > 1 else rows[0]
    if epilogue:  # the average's division: per vector of channels, right after its window
        out = sch.get_sblock(epilogue[-1])
        sch.reverse_compute_at(out, c0, preserve_unit_loops=True)
        sch.vectorize(sch.get_loops(out)[-1])
    sch.vectorize(c1)
    if params.threads > 1 and (_extent(sch, par) or 2) > 1:
        sch.parallel(par)
    init = sch.decompose_reduction(block, reduction[0])
    try:
        sch.vectorize(sch.get_loops(init)[-1])
    except Exception:
        pass


def _schedule_rowwise(sch, params: CpuParams) -> None:
    """Row-wise functions (softmax, layer norm, mean): every block computed per row.

    The last block's leading loops (all but the innermost) are the rows; each earlier block
    (row max, exp, row sum, mean, variance...) is moved under that loop, so a row's
    intermediates stay in L1 and the rows run in parallel.
    """
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    last = blocks[-1]
    kinds = _iter_kinds(sch, last)
    loops = sch.get_loops(last)
    if "R" in kinds or len(loops) < 2 or len(loops) != len(kinds):
        raise ValueError("not a row-wise function")
    inline = _rowwise_inlinable(sch, blocks)
    lanes = [sch.get(b).name_hint for b in blocks[:-1] if _is_lane_extremum(sch, b, params)]
    row = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
    for blk in reversed(blocks[:-1]):
        sch.compute_at(blk, row, preserve_unit_loops=True)
    for name in inline:
        try:
            sch.compute_inline(sch.get_sblock(name))
        except Exception:
            pass
    for name in lanes:
        # per row, a lane softmax's partial maxima (:func:`lane_softmax`) have one loop over the
        # lanes, then the reduction: the lanes go innermost, on a vector
        try:
            blk = sch.get_sblock(name)
            under = sch.get_loops(blk)[-2:]
            sch.reorder(under[1], under[0])
            sch.vectorize(under[0])
        except Exception:
            pass
    rows = _extent(sch, row) or 1
    size = rows * (_extent(sch, sch.get_loops(last)[-1]) or 1)
    if params.threads > 1 and rows > 1 and size >= PARALLEL_MIN_ELEMENTS // 4:
        sch.parallel(row)


def _rowwise_inlinable(sch, blocks) -> list:
    """Names of the per-element blocks of a row-wise function worth inlining into their consumer.

    A block qualifies when it iterates over the same domain as the one block that reads it, that
    reader is no reduction, and it reads no other per-element intermediate. softmax's
    ``x - max(x)`` then becomes part of the exponential instead of a row buffer written and read
    back (DeiT-S's 1x6x197x197 softmax: 0.126 -> 0.105 ms with the maximum below). Per-row values
    (a LayerNorm's reciprocal) are never inlined into per-element blocks, where they would be
    recomputed for every element, and chains of intermediates (the integer LayerNorm's Newton
    steps, each read twice by the next) are not collapsed, which would double the expression per
    step. The set is decided on the function as given, before any block is inlined.
    """
    writers = {}
    for blk in blocks:
        for w in sch.get(blk).writes:
            writers[w.source.name] = blk
    names = []
    for blk in blocks[:-1]:
        node = sch.get(blk)
        if "R" in _iter_kinds(sch, blk):
            continue
        consumers = sch.get_consumers(blk)
        if len(consumers) != 1 or "R" in _iter_kinds(sch, consumers[0]):
            continue
        extents = [int(iv.dom.extent) for iv in node.iter_vars]
        if extents != [int(iv.dom.extent) for iv in sch.get(consumers[0]).iter_vars]:
            continue
        reads_spatial = any(
            r.source.name in writers and "R" not in _iter_kinds(sch, writers[r.source.name]) for r in node.reads
        )
        if not reads_spatial:
            names.append(node.name_hint)
    return names


def _is_lane_extremum(sch, block, params: CpuParams) -> bool:
    """A float max/min reduction over its last iteration variable, whose last spatial one spans
    exactly the vector lanes (the partial maxima of :func:`lane_softmax`)."""
    node = sch.get(block)
    body = node.body
    kinds = _iter_kinds(sch, block)
    if not isinstance(body, tirx.BufferStore) or not isinstance(body.value, (tirx.Max, tirx.Min)):
        return False
    if "float" not in str(body.buffer.dtype) or kinds[-2:] != ["S", "R"]:
        return False
    return int(node.iter_vars[-2].dom.extent) == params.lanes


# ------------------------------------------------------------------------------------------------
# weight packing at build time


def pack_block(out_channels: int, params: CpuParams) -> int:
    """Output channels per packed weight panel: the column block the rule will choose.

    Two vectors when they divide the channels, else one vector when it does, else two vectors
    with the channels zero-padded (the rule then vectorises the padded extent by two vectors; a
    smaller panel would turn its weight loads into gathers across panels).
    """
    if out_channels % params.j_block == 0:
        return params.j_block
    if out_channels % params.lanes == 0:
        return params.lanes
    return params.j_block


def conv2d_legalizer(params: CpuParams):
    """A ``relax.nn.conv2d`` legalisation that reads its weights from a packed layout.

    In HWIO layout the weight vector for one reduction step (16 output channels) is a 64-byte
    slice of a row ``KW*IC*OC`` floats apart from the next one: a 3x3x512x512 panel touches its
    4608 cache lines at a 2 KiB stride, which maps them onto 1/32 of the L2 sets, so the panel
    does not stay cached (measured: ResNet-18's 7x7x512 convolutions ran at 5 GMAC/s, and at
    ~45 GMAC/s once packed). The weights are
    re-laid out as ``[OC/b, KH, KW, IC, b]`` (``b`` = the rule's column block; the layout TVM's
    x86 schedules call ``OIHW{i}i{o}o`` up to the order of the reduction axes), so each panel is
    one contiguous stream. The packing is a TE compute on the constant weights that
    ``FoldConstant`` evaluates at build time; weights that are model inputs are not packed.
    Output channels that are no multiple of the SIMD width are zero-padded to whole panels and
    the result is cropped. Grouped and depthwise convolutions (their HWIO weights are already
    contiguous per pixel), integer convolutions and other layouts keep TVM's legalisation.
    """
    import tvm
    from tvm import relax, te, topi

    default = tvm.ir.Op.get("relax.nn.conv2d").get_attr("FLegalize")

    def fallback(bb, call):
        # TVM's own legalisation; a stem that fold_input_transpose gave NCHW data gets its
        # transpose back first (TVM cannot legalise NCHW data with an NHWC output)
        a = call.attrs
        if a.data_layout == "NCHW" and a.out_layout == "NHWC":
            data = bb.emit(relax.op.permute_dims(call.args[0], [0, 2, 3, 1]))
            call = bb.normalize(relax.op.nn.conv2d(
                data, call.args[1], strides=[int(v) for v in a.strides], padding=[int(v) for v in a.padding],
                dilation=[int(v) for v in a.dilation], groups=int(a.groups), data_layout="NHWC",
                kernel_layout=a.kernel_layout, out_layout="NHWC", out_dtype=a.out_dtype))
        return default(bb, call)

    def legalize(bb, call):
        attrs = call.attrs
        data, weight = call.args
        wshape = [int(d) for d in weight.ty.shape] if weight.ty.shape is not None else None
        if (
            attrs.data_layout not in ("NHWC", "NCHW")
            or attrs.kernel_layout != "HWIO"
            or attrs.out_layout != "NHWC"
            or int(attrs.groups) != 1
            or wshape is None
            or len(wshape) != 4
            or any(not isinstance(d, tvm.tirx.IntImm) for d in data.ty.shape)
        ):
            return fallback(bb, call)
        kh, kw, ic, oc = wshape
        nchw = attrs.data_layout == "NCHW"  # set by fold_input_transpose (few-channel stems only)
        if oc < params.lanes or str(data.ty.dtype) != "float32" or str(weight.ty.dtype) != "float32" or not _is_constant(bb, weight):
            return fallback(bb, call)
        block = pack_block(oc, params)
        panels = -(-oc // block)
        out_dtype = str(attrs.out_dtype) if attrs.out_dtype is not None and str(attrs.out_dtype) not in ("", "void") else str(data.ty.dtype)
        strides = [int(s) for s in attrs.strides]
        dilation = [int(d) for d in attrs.dilation]
        pad_top, pad_left, pad_bottom, pad_right = [int(p) for p in attrs.padding]

        def pack(w):
            return te.compute(
                (panels, kh, kw, ic, block),
                lambda o, y, x, i, b: tvm.tirx.if_then_else(
                    o * block + b < oc, w[y, x, i, tvm.tirx.min(o * block + b, oc - 1)], tvm.tirx.const(0.0, "float32")
                ),
                name="weight_pack",
            )

        packed = bb.emit(bb.call_te(pack, weight, primfunc_name_hint="weight_pack"))

        def conv(x, wp):
            if nchw:
                n, _, h, w = [int(d) for d in x.shape]
            else:
                n, h, w, _ = [int(d) for d in x.shape]
            if pad_top or pad_left or pad_bottom or pad_right:
                before, after = ([0, 0, pad_top, pad_left], [0, 0, pad_bottom, pad_right]) if nchw else (
                    [0, pad_top, pad_left, 0], [0, pad_bottom, pad_right, 0])
                x = topi.nn.pad(x, before, after, name="pad_temp")

            def pixel(b, y, x_, c):
                return x[b, c, y, x_] if nchw else x[b, y, x_, c]

            oh = (h + pad_top + pad_bottom - dilation[0] * (kh - 1) - 1) // strides[0] + 1
            ow = (w + pad_left + pad_right - dilation[1] * (kw - 1) - 1) // strides[1] + 1
            ry = te.reduce_axis((0, kh), name="ry")
            rx = te.reduce_axis((0, kw), name="rx")
            rc = te.reduce_axis((0, ic), name="rc")
            full = te.compute(
                (n, oh, ow, panels * block),
                lambda b, y, x_, f: te.sum(
                    pixel(b, y * strides[0] + ry * dilation[0], x_ * strides[1] + rx * dilation[1], rc).astype(out_dtype)
                    * wp[f // block, ry, rx, rc, f % block].astype(out_dtype),
                    axis=[ry, rx, rc],
                ),
                name="conv2d_nhwc",
            )
            if panels * block == oc:
                return full
            return te.compute((n, oh, ow, oc), lambda *idx: full[idx], name="conv2d_crop")

        return bb.call_te(conv, data, packed, primfunc_name_hint="conv2d")

    return legalize


def _rewrite_pass(mutator, name: str):
    """A Relax module pass that runs ``mutator`` (a ``PyExprMutator`` class) over every Relax
    function, then drops the bindings it left unused. The mutator is built on the module, so its
    builder can add functions too (``call_te``)."""
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pass(mod, _ctx):
        rewriter = mutator(mod)
        for gv, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        return relax.transform.DeadCodeElimination()(rewriter.builder_.get())

    return _pass


def fold_input_transpose(lanes: int):
    """A Relax pass: a convolution over fewer channels than a vector reads its NCHW input directly.

    ``ConvertLayout`` puts a ``permute_dims`` (NCHW -> NHWC) in front of the stem of every CNN and
    ViT: a separate kernel that gathers the whole image one scalar at a time (MobileNetV2:
    77 us of its 7 ms on one thread, measured). The register-tiled convolution broadcasts its
    input one scalar at a time anyway, so when the transposed tensor feeds only convolutions
    over fewer than ``lanes`` channels (RGB stems), they take the NCHW tensor with
    ``data_layout="NCHW"`` (output still NHWC; :func:`conv2d_legalizer` indexes it so) and the
    transpose is dead code. Anything else is left alone.
    """
    import tvm
    from tvm import relax
    from tvm.ir import expr as ir_expr

    conv_op = tvm.ir.Op.get("relax.nn.conv2d")
    permute_op = tvm.ir.Op.get("relax.permute_dims")

    def _stem_source(bound):
        if not (isinstance(bound, ir_expr.Call) and bound.op == permute_op):
            return None
        axes = bound.attrs.axes
        if axes is None or [int(a) for a in axes] != [0, 2, 3, 1]:
            return None
        shape = bound.args[0].ty.shape
        if str(bound.args[0].ty.dtype) != "float32":  # integer stems keep TVM's own legalisation
            return None
        if shape is None or len(shape) != 4 or not isinstance(shape[1], tvm.tirx.IntImm) or int(shape[1]) >= lanes:
            return None
        return bound.args[0]

    @relax.expr_functor.mutator
    class _Fold(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op != conv_op or call.attrs.data_layout != "NHWC" or int(call.attrs.groups) != 1:
                return call
            data = call.args[0]
            if not isinstance(data, ir_expr.Var):
                return call
            try:
                src = _stem_source(self.lookup_binding(data))
            except Exception:
                src = None
            if src is None:
                return call
            a = call.attrs
            return relax.op.nn.conv2d(
                src, call.args[1], strides=[int(v) for v in a.strides], padding=[int(v) for v in a.padding],
                dilation=[int(v) for v in a.dilation], groups=1, data_layout="NCHW",
                kernel_layout=a.kernel_layout, out_layout=a.out_layout or "NHWC", out_dtype=a.out_dtype)

    return _rewrite_pass(_Fold, "SliverFoldInputTranspose")


def integer_relu_min():
    """A Relax pass: ``r - relu(r - c)`` with ``r = relu(x)`` and a constant ``c >= 0`` (pot-shift's
    integer upper clip, e.g. ReLU6's 6 at the value's scale) becomes ``minimum(r, c)``.

    Equal in integers: ``r - c`` cannot overflow for ``0 <= r``, ``0 <= c``, and ``r - relu(r - c)``
    is ``c`` where ``r >= c`` and ``r`` elsewhere. The epilogue of an integer kernel then runs one
    vector op instead of three (MobileNetV2 has 35 ReLU6)."""
    import tvm
    from tvm import relax
    from tvm.ir import expr as ir_expr

    sub = tvm.ir.Op.get("relax.subtract")
    relu = tvm.ir.Op.get("relax.nn.relu")

    def _bound(mutator, expr):
        if not isinstance(expr, ir_expr.Var):
            return expr
        try:
            return mutator.lookup_binding(expr)
        except Exception:
            return None

    @relax.expr_functor.mutator
    class _Rewrite(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op != sub or len(call.args) != 2 or not str(call.args[0].ty.dtype).startswith("int"):
                return call
            r, over = call.args
            over_v = _bound(self, over)
            if not (isinstance(over_v, ir_expr.Call) and over_v.op == relu):
                return call
            diff = _bound(self, over_v.args[0])
            if not (isinstance(diff, ir_expr.Call) and diff.op == sub and diff.args[0].same_as(r)
                    and isinstance(diff.args[1], ir_expr.Constant)):
                return call
            c = diff.args[1].value.numpy()
            r_v = _bound(self, r)
            if not (isinstance(r_v, ir_expr.Call) and r_v.op == relu) or (c < 0).any():
                return call
            return relax.op.minimum(r, diff.args[1])

    return _rewrite_pass(_Rewrite, "SliverIntegerReluMin")


def take_before_permute():
    """A Relax pass: ``take(permute_dims(y, axes), i, axis)`` with one constant index becomes
    ``permute_dims(y[..., i, ...], axes')``, the index taken first, as a slice; any other ``take``
    of one constant index becomes a slice too.

    A ViT splits its fused ``qkv`` projection as ``reshape -> permute_dims -> take(0 / 1 / 2)``:
    the permuted tensor has three readers, so ``FuseOps`` leaves the permutation a kernel of its
    own that copies all of ``qkv``, and each ``take`` copies its third again (DeiT-S: 4 kernels
    and two full copies per block, plus the ``q`` scaling and the ``k`` transposition as kernels
    of their own). Taken first, the reshape has only ``take`` readers and becomes a view, and
    each of ``q``, ``k``, ``v`` is one injective chain that fuses with what follows it (the
    scaling, the transposition and the column packing of :func:`_activation_matmul`).
    """
    import tvm
    from tvm import relax
    from tvm.ir import expr as ir_expr

    take = tvm.ir.Op.get("relax.take")
    permute = tvm.ir.Op.get("relax.permute_dims")

    @relax.expr_functor.mutator
    class _Rewrite(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op != take or not isinstance(call.args[1], ir_expr.Constant):
                return call
            index = call.args[1].value.numpy()
            shape = getattr(call.args[0].ty, "shape", None)
            if index.ndim != 0 or call.attrs.axis is None or not isinstance(shape, relax.ShapeExpr):
                return call
            i = int(index)
            axis = int(call.attrs.axis) % len(shape.values)
            if not 0 <= i < int(shape.values[axis]):
                return call
            try:
                src = self.lookup_binding(call.args[0])
            except Exception:
                src = None
            if isinstance(src, ir_expr.Call) and src.op == permute and src.attrs.axes is not None:
                axes = [int(a) for a in src.attrs.axes]
                removed = axes[axis]
                rest = [a - (a > removed) for k, a in enumerate(axes) if k != axis]
                return relax.op.permute_dims(self.builder_.emit(_slice(src.args[0], removed, i)), rest)
            return _slice(call.args[0], axis, i)

    def _slice(x, axis, i):
        # one index of one axis as a slice and a squeeze: both injective, so FuseOps fuses them
        # with the ops around them (a take reads its index from a tensor: an opaque kernel)
        return relax.op.squeeze(relax.op.strided_slice(x, axes=[axis], begin=[i], end=[i + 1]), axis=[axis])

    return _rewrite_pass(_Rewrite, "SliverTakeBeforePermute")


def lane_softmax(lanes: int):
    """A Relax pass (in place of ``FastMathTransform``'s softmax): a float32 softmax over its last
    axis, when that axis spans at least two vectors, becomes ``topi``'s fast softmax with its row
    maximum taken in two steps that vector lanes can run.

    LLVM vectorises a float ``max`` reduction only under no-NaN semantics, which the build does
    not assume (``fast-math-reassoc`` covers sums only), so softmax's maximum over 197 keys ran as
    one scalar compare chain per row. Here ``lanes`` partial maxima are taken first, lane ``l``
    over the elements ``l, l + lanes, ...`` of the row's whole vectors (no tail, so no predicate),
    then the row's maximum over those and the tail's elements: every element is compared once, and
    a maximum does not depend on the order, so the result is the same number. The row-wise rule
    (:func:`_schedule_rowwise`) computes both steps per row and puts the lanes on a vector.
    TVM 0.27's ``rfactor`` would produce the same partial maxima, but only outside the row loop
    (a second parallel region per call): ``compute_at`` drops the predicate of its split tail and
    reads past the row. DeiT-S's 1x6x197x197 softmax: 0.20 -> 0.08 ms per call (ONNX Runtime
    0.10-0.12 ms, same process, 2 threads; Intel Xeon, 2026-12-07).
    """
    from tvm import relax, te, topi
    from tvm.ir import expr as ir_expr

    softmax = tvm.ir.Op.get("relax.nn.softmax")

    def _te(x):
        shape = list(x.shape)
        n = int(shape[-1])
        whole, tail = n // lanes, n % lanes
        rows = shape[:-1]
        ko = te.reduce_axis((0, whole), name="k")
        partial = te.compute(rows + [lanes], lambda *i: te.max(x[i[:-1] + (ko * lanes + i[-1],)], axis=ko),
                             name="T_softmax_maxlanes")
        j = te.reduce_axis((0, lanes + tail), name="j")

        def _row_max(*i):
            last, zero = tvm.tirx.const(lanes - 1, "int32"), tvm.tirx.const(0, "int32")  # j: int32
            lane = partial[i + (tvm.tirx.min(j, last),)]
            rest = x[i + (whole * lanes + tvm.tirx.max(j - lanes, zero),)]
            return te.max(tvm.tirx.Select(j < lanes, lane, rest), axis=j)

        max_elem = te.compute(rows, _row_max, name="T_softmax_maxelem")
        delta = te.compute(shape, lambda *i: x[i] - max_elem[i[:-1]], name="T_softmax_delta")
        exp = topi.math.fast_exp(delta)
        k = te.reduce_axis((0, n), name="k")
        expsum = te.compute(rows, lambda *i: te.sum(exp[i + (k,)], axis=k), name="T_softmax_expsum")
        return te.compute(shape, lambda *i: exp[i] / expsum[i[:-1]], name="T_softmax_norm", attrs={"axis": len(shape) - 1})

    @relax.expr_functor.mutator
    class _Rewrite(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op != softmax:
                return call
            ty = call.args[0].ty
            shape = getattr(ty, "shape", None)
            if str(ty.dtype) != "float32" or shape is None or not isinstance(shape, relax.ShapeExpr):
                return call
            if any(not isinstance(d, tvm.tirx.IntImm) for d in shape.values):
                return call
            rank = len(shape.values)
            if int(call.attrs.axis) not in (-1, rank - 1) or int(shape.values[-1]) < 2 * lanes:
                return call
            return self.builder_.call_te(_te, call.args[0], primfunc_name_hint="fast_softmax")

    return _rewrite_pass(_Rewrite, "SliverLaneSoftmax")


def _block_names(prim) -> set:
    """Names of the top-level blocks of a PrimFunc."""
    try:
        sch = s_tir.Schedule(prim)
        return {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
    except Exception:
        return set()


def fuse_depthwise_pointwise(lanes: int):
    """A Relax pass (after ``FuseOps``, before ``FuseTIR``): a depthwise convolution group (conv,
    bias, ReLU/ReLU6) and the 1x1 convolution that alone consumes it become one function.

    Scheduled by :func:`_schedule_dw_pw`, the depthwise outputs of one register tile's pixels are
    computed into a stack buffer right before the 1x1 convolution reads them, instead of being
    written to memory by one kernel and read back by the next (MobileNetV2's inverted residual
    blocks: the depthwise output is up to 1.6 MB per image). Only 1x1 convolutions whose
    activations are larger than their weights qualify: the rule walks pixel tiles in its outer
    loop, so each depthwise output is computed once; the depthwise channel count must be a
    multiple of the vector width ``lanes`` (the rule computes whole vectors of channels).
    """
    from tvm import relax
    from tvm.ir import expr as ir_expr

    call_tir = tvm.ir.Op.get("relax.call_tir")

    def bindings(func):
        blocks = func.body.blocks
        return list(blocks[0].bindings) if len(blocks) == 1 else None

    def prim_of(mod, binding):
        v = binding.value
        if not (isinstance(v, ir_expr.Call) and v.op == call_tir):
            return None
        return mod[v.args[0]]

    def is_depthwise_group(mod, func) -> bool:
        bs = bindings(func)
        if not bs:
            return False
        first = prim_of(mod, bs[0])
        if first is None or "group_conv2d_nhwc" not in _block_names(first) or any(prim_of(mod, b) is None for b in bs):
            return False
        out = bs[0].value.ty_args[0]
        return str(out.dtype) == "float32" and int(out.shape[-1]) % lanes == 0

    def is_pointwise_data_first(mod, func) -> bool:
        bs = bindings(func)
        if not bs or len(func.params) < 2:
            return False
        first = prim_of(mod, bs[0])
        if first is None or "conv2d_nhwc" not in _block_names(first) or any(prim_of(mod, b) is None for b in bs):
            return False
        args = list(bs[0].value.args[1].fields)
        if len(args) != 2 or not args[0].same_as(func.params[0]):
            return False
        wshape = [int(d) for d in args[1].ty.shape]
        dshape = [int(d) for d in args[0].ty.shape]
        if len(wshape) != 5 or wshape[1] != 1 or wshape[2] != 1:
            return False
        prod = lambda xs: int(np.prod(xs))
        return prod(dshape) >= prod(wshape)

    def merged(mod, a_func, b_func, name):
        bb = relax.BlockBuilder(mod)
        params = [relax.Var(p.name, p.ty) for p in a_func.params] + [
            relax.Var(p.name, p.ty) for p in b_func.params[1:]]
        with bb.function(name, params, attrs={"Primitive": True}, private=True):
            with bb.dataflow():
                env = dict(zip(a_func.params, params[: len(a_func.params)]))
                env.update(zip(b_func.params[1:], params[len(a_func.params):]))

                def replay(func):
                    for b in bindings(func):
                        v = b.value
                        args = [env.get(x, x) for x in v.args[1].fields]
                        env[b.var] = bb.emit(relax.call_tir(v.args[0], args, out_ty=v.ty_args[0]))
                    return env[func.body.body]

                env[b_func.params[0]] = replay(a_func)
                out = bb.emit_output(replay(b_func))
            bb.emit_func_output(out)
        return bb.get()[name]

    @tvm.transform.module_pass(opt_level=0, name="SliverFuseDepthwisePointwise")
    def _pass(mod, _ctx):
        if not FUSE_DW_PW:
            return mod
        main_gv = mod.get_global_var("main")
        main = mod[main_gv]
        uses = {}

        def count(node):
            if isinstance(node, ir_expr.Var):
                uses[node] = uses.get(node, 0) + 1

        relax.analysis.post_order_visit(main.body, count)
        bound = {}
        for block in main.body.blocks:
            for b in block.bindings:
                bound[b.var] = b.value
        new_funcs = {}

        @relax.expr_functor.mutator
        class _Rewrite(relax.PyExprMutator):
            def visit_call_(self, call):
                call = super().visit_call_(call)
                if not isinstance(call.op, ir_expr.GlobalVar) or not call.args:
                    return call
                b_func = mod[call.op]
                src = call.args[0]
                if not isinstance(b_func, relax.Function) or not isinstance(src, ir_expr.Var) or uses.get(src, 0) != 1:
                    return call
                producer = bound.get(src)
                if not (isinstance(producer, ir_expr.Call) and isinstance(producer.op, ir_expr.GlobalVar)):
                    return call
                a_func = mod[producer.op]
                if not (isinstance(a_func, relax.Function) and is_depthwise_group(mod, a_func)
                        and is_pointwise_data_first(mod, b_func)):
                    return call
                key = (producer.op.name_hint, call.op.name_hint)
                if key not in new_funcs:
                    new_funcs[key] = merged(mod, a_func, b_func, f"{key[0]}_{key[1]}")
                gv = self.builder_.add_func(new_funcs[key], f"{key[0]}_{key[1]}")
                return relax.Call(gv, list(producer.args) + list(call.args[1:]))

        rewriter = _Rewrite(mod)
        new_main = rewriter.visit_expr(main)
        out = rewriter.builder_.get()
        out[main_gv] = new_main
        return relax.transform.DeadCodeElimination()(out)

    return _pass


def _is_constant(bb, expr, depth: int = 8) -> bool:
    """True when ``expr`` is a constant or computed from constants only (foldable at build time)."""
    from tvm.ir import expr as ir_expr

    if isinstance(expr, ir_expr.Constant):
        return True
    if depth <= 0 or not isinstance(expr, ir_expr.Var):
        return False
    try:
        bound = bb.lookup_binding(expr)
    except Exception:
        return False
    if not isinstance(bound, ir_expr.Call):
        return False
    args = []
    for a in bound.args:  # call_tir(f, (args...)) holds its arguments in a tuple
        args += list(a.fields) if isinstance(a, ir_expr.Tuple) else [a]
    args = [a for a in args if isinstance(a, (ir_expr.Var, ir_expr.Constant))]
    return bool(args) and all(_is_constant(bb, a, depth - 1) for a in args)


def matmul_legalizer(params: CpuParams):
    """A ``relax.matmul`` legalisation for ``x @ W`` with constant 2-D weights ``W [K, N]``.

    Same reason as :func:`conv2d_legalizer`: ``W`` is re-laid out at build time as
    ``[ceil(N/b), K, b]`` (column panels, contiguous), zero-padded to a whole number of panels,
    so that a column count like 1000 classes needs no per-call padding copy of the weights (the
    rule's ``pad_einsum`` copied MobileNetV2's 5 MB classifier on every call: 9.5 ms for a
    1.3 MMAC GEMV). The product is computed on the padded columns and cropped. Batched matmuls
    of two activations (attention) keep TVM's legalisation.
    """
    import tvm
    from tvm import te

    default = tvm.ir.Op.get("relax.matmul").get_attr("FLegalize")

    def legalize(bb, call):
        a, b = call.args
        a_shape = _static_shape(a)
        b_shape = _static_shape(b)
        out_dtype = str(call.ty.dtype)
        if (
            a_shape is None
            or b_shape is None
            or len(b_shape) != 2
            or len(a_shape) < 2
            or a_shape[-1] != b_shape[0]
            or str(a.ty.dtype) != "float32"
            or out_dtype != "float32"
            or b_shape[1] < params.lanes
            or not _is_constant(bb, b)
        ):
            if _activation_pair(a_shape, b_shape, a, b, call, params):
                return _activation_matmul(bb, a, b, a_shape, b_shape, params)
            return default(bb, call)
        k, n = b_shape
        block = params.j_block
        panels = -(-n // block)

        packed = bb.emit(bb.call_te(lambda w: _column_panels(w, block, "weight_pack"), b, primfunc_name_hint="weight_pack"))
        rows = a_shape[-2]
        padded_rows = _padded_rows(rows, panels * block, params)

        def matmul(x, wp):
            lead = [int(d) for d in x.shape[:-2]]
            if padded_rows != rows:
                # rows that do not tile (197 tokens) are zero-padded here, since the rule's
                # pad_einsum cannot pad a block that reads packed weights
                src = x
                x = te.compute(
                    (*lead, padded_rows, k),
                    lambda *idx: tvm.tirx.if_then_else(
                        idx[-2] < rows, src[(*idx[:-2], tvm.tirx.min(idx[-2], rows - 1), idx[-1])], tvm.tirx.const(0.0, "float32")
                    ),
                    name="rows_pad",
                )
            r = te.reduce_axis((0, k), name="k")
            full = te.compute(
                (*lead, padded_rows, panels * block),
                lambda *idx: te.sum(x[(*idx[:-1], r)] * wp[idx[-1] // block, r, idx[-1] % block], axis=r),
                name="matmul",
            )
            if panels * block == n and padded_rows == rows:
                return full
            return te.compute((*lead, rows, n), lambda *idx: full[idx], name="matmul_crop")

        return bb.call_te(matmul, a, packed, primfunc_name_hint="matmul")

    return legalize


def _column_panels(w, block: int, name: str):
    """``w [..., K, N]`` as column panels ``[..., ceil(N/block), K, block]``, zero-padded past N
    (a TE compute: evaluated at build time for constant weights, per call for activations)."""
    from tvm import te

    *lead, k, n = [int(d) for d in w.shape]

    def value(*idx):
        o, r, c = idx[-3:]
        col = o * block + c
        return tvm.tirx.if_then_else(col < n, w[(*idx[:-3], r, tvm.tirx.min(col, n - 1))], tvm.tirx.const(0.0, "float32"))

    return te.compute((*lead, -(-n // block), k, block), value, name=name)


def _activation_pair(a_shape, b_shape, a, b, call, params: CpuParams) -> bool:
    """A float32 batched product of two activations with the same leading dimensions (attention's
    ``q k^T`` and ``P v``) whose rows or columns do not tile."""
    if a_shape is None or b_shape is None or len(a_shape) < 3 or len(a_shape) != len(b_shape):
        return False
    if a_shape[:-2] != b_shape[:-2] or a_shape[-1] != b_shape[-2] or b_shape[-1] < params.lanes:
        return False
    if any(str(t.ty.dtype) != "float32" for t in (a, b)) or str(call.ty.dtype) != "float32":
        return False
    rows, n = a_shape[-2], b_shape[-1]
    return n % params.j_block != 0 or _padded_rows(rows, n, params) != rows


def _activation_matmul(bb, a, b, a_shape, b_shape, params: CpuParams):
    """``a @ b`` for two activations (attention), legalised without the rule's padding copies.

    The rule's ``pad_einsum`` zero-pads both operands on every call (DeiT-S's ``P v``: a scalar
    copy of the 6x197x197 probabilities to 210 rows, in a parallel region of its own). Here the
    rows past the end read the last row instead (``min(i, M - 1)``: an address computed once per
    register-tile row, inlined into the product) and their results are cropped; columns that do
    not fill whole vectors (197 keys) are packed per call into column panels ``[..., N/b, K, b]``,
    zero-padded, which ``FuseOps`` fuses with the transpose that produces ``k^T``.
    """
    from tvm import te

    lead = list(a_shape[:-2])
    rows, k = a_shape[-2:]
    n = b_shape[-1]
    block = params.j_block
    panels = -(-n // block)
    padded_rows = _padded_rows(rows, panels * block, params)

    packed = None
    if n % block:
        packed = bb.emit(bb.call_te(lambda w: _column_panels(w, block, "activation_pack"), b,
                                    primfunc_name_hint="activation_pack"))

    def matmul(x, w):
        if padded_rows != rows:
            src = x
            x = te.compute((*lead, padded_rows, k), lambda *i: src[(*i[:-2], tvm.tirx.min(i[-2], rows - 1), i[-1])],
                           name="rows_clamp")
        r = te.reduce_axis((0, k), name="k")
        if packed is not None:
            def term(*i):
                return x[(*i[:-1], r)] * w[(*i[:-2], i[-1] // block, r, i[-1] % block)]
        else:
            def term(*i):
                return x[(*i[:-1], r)] * w[(*i[:-2], r, i[-1])]
        full = te.compute((*lead, padded_rows, panels * block), lambda *i: te.sum(term(*i), axis=r), name="matmul")
        if panels * block == n and padded_rows == rows:
            return full
        return te.compute((*lead, rows, n), lambda *i: full[i], name="matmul_crop")

    return bb.call_te(matmul, a, packed if packed is not None else b, primfunc_name_hint="matmul")


def _padded_rows(rows: int, cols: int, params: CpuParams) -> int:
    """Rows padded to a whole number of register tiles when no good tile height divides them."""
    ib, jb = _register_block(rows, cols, params)
    if rows % ib == 0 and ib * (jb // params.lanes) >= 4:
        return rows
    tile = max(1, (params.vector_regs - 3) // 2) if cols % params.j_block == 0 else params.vector_regs // 2
    tile = min(tile, rows)
    return -(-rows // tile) * tile


def _static_shape(expr):
    import tvm

    shape = getattr(expr.ty, "shape", None)
    if shape is None or not all(isinstance(d, tvm.tirx.IntImm) for d in shape):
        return None
    return [int(d) for d in shape]


def packed_legalizers(target: dict) -> dict:
    """LegalizeOps overrides that pack constant weights at build time (conv2d, matmul)."""
    params = cpu_params(target)
    matmul = matmul_legalizer(params)
    intrin = int8_dot_intrinsic(target)
    conv = conv2d_legalizer(params)
    if intrin is not None:
        matmul = int8_matmul_legalizer(params, intrin, matmul)
        conv = int8_conv2d_legalizer(params, intrin, conv)
    return {"relax.nn.conv2d": conv, "relax.matmul": matmul}


def schedule_module(target: dict):
    """A Relax module pass that schedules every unscheduled PrimFunc with sliver's CPU rules."""
    params = cpu_params(target)
    intrin = int8_dot_intrinsic(target)

    @tvm.transform.module_pass(opt_level=0, name="SliverCpuSchedule")
    def _pass(mod, _ctx):
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            if func.attrs is not None and "tirx.is_scheduled" in func.attrs and int(func.attrs["tirx.is_scheduled"]):
                continue
            new = schedule_func(func, params, intrin)
            if new is not None:
                updates[gv] = new.with_attr("tirx.is_scheduled", True)
        if not updates:
            return mod
        out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        for gv, func in updates.items():
            out[gv] = func
        return out

    return _pass


# ------------------------------------------------------------------------------------------------
# integer matmuls on dot-product instructions (issue #18)
#
# ``x @ W`` with int8/uint8 activations and constant int8 weights W [K, N] (pot-shift's
# MatMulInteger, imported by ``lowering.MatMulIntegerAsRelaxOp``) is legalised into
#
#   Xa[m, k]  = x[m, k] + off as the instruction's activation type, rows padded to the register
#               tile, K to 4
#   C[m, n]   = sum_k Xa[m, k] * Wp[n / G, k / 4, n % G, k % 4]        (int32)
#   out[m, n] = C[m, n] + corr[n],  corr = -off * sum_k W[k, n]
#
# with Wp (weights packed in the layout of the Gx4 dot-product intrinsic: G output columns by 4
# consecutive k per instruction) and corr computed at build time (FoldConstant). Two intrinsics,
# one mechanism (:func:`dot_layout` reads G and the activation type from the intrinsic's
# description):
#
# - x86 with AVX-512 VNNI: ``vpdpbusd``, u8 x s8 -> s32, G = 16 (64 MACs per instruction): int8
#   activations are shifted to uint8 (off = +128, corr = -128 sum W; uint8 ones: off = 0). CPUs
#   without VNNI keep the generic integer rule: TVM's ``dot_16x4_avx512`` (vpmaddubsw + vpmaddwd)
#   saturates a pair of u8 * s8 products at 32767, so it is not exact for 8-bit operands.
# - aarch64 with the dot-product extension (``+dotprod``: Cortex-A55, A76 and later): ``sdot``,
#   s8 x s8 -> s32, G = 4 (16 MACs per instruction, TVM's ``dot_4x4_i8i8s32_sdot``): int8
#   activations stay as they are (off = 0); uint8 ones are shifted to int8 (off = -128,
#   corr = +128 sum W). Cores without it (Cortex-A53, the ``arm`` target) keep the generic rule.
#
# The ``C`` block is tensorised with the intrinsic. The epilogue (offset correction, bias,
# requantisation shift, clip, narrowing: the elementwise ops FuseOps put after the product) runs
# per register tile while the accumulators are hot, so the int32 product never goes to memory.

#: register tile of the integer kernel: rows x (vectors of G int32 columns, G of the intrinsic)
INT8_ROWS, INT8_VECTORS = 4, 4
VNNI_INTRIN = "sliver_dot_16x4_vnni"
AVX512_INTRIN = "dot_16x4_avx512"
#: TVM 0.27's own (``tvm.s_tir.tensor_intrin.arm_cpu``), used as registered
SDOT_INTRIN = "dot_4x4_i8i8s32_sdot"
#: the modules of ``tvm.s_tir.tensor_intrin`` a module imports relatively (loaded first, see below)
_INTRIN_MODULE_DEPS = {"arm_cpu": ("dot_product_common",)}


def _load_tvm_intrinsics(arch: str):
    """TVM's ``tvm.s_tir.tensor_intrin.<arch>`` module, loaded on its own: importing the package
    runs its CUDA intrinsics too, which took 54 s on this machine (measured); the module is
    registered under its own name, so a later import of the package reuses it. The sibling
    modules it imports relatively (``arm_cpu`` imports ``dot_product_common``) are loaded the same
    way first, since importing them by name would import the package."""
    import importlib.util
    import os
    import sys

    name = f"tvm.s_tir.tensor_intrin.{arch}"
    if name in sys.modules:
        return sys.modules[name]
    for dep in _INTRIN_MODULE_DEPS.get(arch, ()):
        _load_tvm_intrinsics(dep)
    path = os.path.join(os.path.dirname(s_tir.__file__), "tensor_intrin", f"{arch}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules[name]
        raise
    return module


def _register_vnni() -> None:
    """TVM 0.27's ``dot_16x4_vnni`` passes ``vpdpbusd`` int32x16 operands, which the LLVM it links
    rejects ("Call parameter type does not match function signature": the intrinsic now takes
    <64 x i8>); sliver registers the same description with the operands as int8x64."""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    x86 = _load_tvm_intrinsics("x86")
    try:
        TensorIntrin.get(VNNI_INTRIN)
        return
    except Exception:
        pass

    @T.prim_func(s_tir=True)
    def vnni_impl(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((16, 4), "int8", offset_factor=1),
                  C: T.Buffer((16,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            a = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"), T.reinterpret(T.broadcast(a, 16), dtype="int8x64"),
                B.vload([0, 0], dtype="int8x64"), dtype="int32x16")

    TensorIntrin.register(VNNI_INTRIN, x86.dot_product_16x4_u8i8i32_desc, vnni_impl)


def _register_sdot() -> None:
    """TVM 0.27's ``dot_4x4_i8i8s32_sdot`` (registered when ``arm_cpu`` is imported). Unlike the
    VNNI one its operand types match what the linked LLVM (22) declares for
    ``llvm.aarch64.neon.sdot.v4i32.v16i8`` (<4 x i32>, <16 x i8>, <16 x i8>), so it is used as is."""
    _load_tvm_intrinsics("arm_cpu")


def cpu_has_feature(target: dict, feature: str) -> bool:
    """Whether ``target`` has the LLVM CPU feature ``feature``: named in its mattr, or (no mattr
    entry) a feature of its mcpu as LLVM knows it."""
    mcpu = str(target.get("mcpu", ""))
    attrs = [str(a) for a in (target.get("mattr", []) or [])]
    if f"+{feature}" in attrs:
        return True
    if not mcpu:
        return False
    query = {"kind": "llvm", "mcpu": mcpu}
    if target.get("mtriple"):
        query["mtriple"] = target["mtriple"]
    try:
        from tvm.target import codegen

        return bool(codegen.llvm_cpu_has_features([feature], tvm.target.Target(query)))
    except Exception:
        return False


def int8_dot_intrinsic(target: dict) -> str | None:
    """The exact 8-bit dot-product intrinsic of a target, or None (the generic integer rule):

    - x86: the 16x4 u8 x s8 VNNI one where the CPU has AVX-512 VNNI (``dot_16x4_avx512``'s
      vpmaddubsw saturates a pair of u8 * s8 products at 32767, so it is not exact for 8-bit
      weights: not used);
    - aarch64: the 4x4 s8 x s8 ``sdot`` one where the CPU has the dot-product extension
      (``+dotprod`` in mattr, or an mcpu LLVM says has it: Cortex-A55, A76, ...; not Cortex-A53).
    """
    triple = target.get("mtriple", "")
    if triple.startswith("aarch64"):
        if not cpu_has_feature(target, "dotprod"):
            return None
        _register_sdot()
        return SDOT_INTRIN
    if triple and not triple.startswith("x86_64"):
        return None
    if not cpu_has_feature(target, "avx512vnni"):
        return None
    _register_vnni()
    return VNNI_INTRIN


def dot_layout(intrin: str) -> tuple[int, str]:
    """``(G, activation dtype)`` of a registered Gx4 dot-product intrinsic, read from its
    description (``A [4]`` activations, ``B [G, 4]`` int8 weights, ``C [G]`` int32): the packing
    and the activation offset of the integer kernels follow it, so they always match the block
    that is tensorised. VNNI: (16, "uint8"); sdot: (4, "int8")."""
    from tvm.s_tir import TensorIntrin

    root = TensorIntrin.get(intrin).desc.body.block  # reads C, A, B; writes C
    c = root.writes[0].source
    reads = [r.source for r in root.reads if not r.source.same_as(c)]
    a = next(buf for buf in reads if len(buf.shape) == 1)
    b = next(buf for buf in reads if len(buf.shape) == 2)
    cols = int(b.shape[0])
    if (len(a.shape), int(a.shape[0]), [int(d) for d in b.shape], str(b.dtype), str(c.dtype)) != (1, 4, [cols, 4], "int8", "int32") \
            or str(a.dtype) not in ("int8", "uint8"):
        raise ValueError(f"{intrin} is not a Gx4 8-bit dot product with int8 weights and int32 out")
    return cols, str(a.dtype)


def _activation_offset(src: str, act: str) -> int:
    """What is added to ``src`` (int8/uint8) activations to make them the intrinsic's ``act`` type
    (the same 8 bits read as the other type): +128 int8 -> uint8, -128 uint8 -> int8, else 0."""
    if src == act:
        return 0
    return 128 if act == "uint8" else -128


def int8_matmul_legalizer(params: CpuParams, intrin: str | None, fallback):
    """``relax.matmul`` of int8/uint8 activations and int8 ``W [K, N]`` with int32 out -> the
    packed dot-product kernel described above (layout and offset of ``intrin``, see
    :func:`dot_layout`); anything else -> ``fallback``.

    Constant weights are packed (and their offset correction summed) at build time. A right
    operand that is itself an activation (attention's ``k^T`` and ``v``, ``[*batch, K, N]`` beside
    ``x [*batch, M, K]``) is packed per call by the same kernels, one panel set per batch entry;
    the product then reads row ``m``'s panels at batch ``m // M`` of the flat rows (a register
    tile of rows may cross from one batch entry to the next: each row's dot products address
    their own panels)."""
    import tvm
    from tvm import te

    cols, act = dot_layout(intrin) if intrin is not None else (0, "")

    def legalize(bb, call):
        a, b = call.args
        a_shape, b_shape = _static_shape(a), _static_shape(b)
        if (intrin is None or a_shape is None or b_shape is None or len(b_shape) < 2 or len(a_shape) < 2
                or a_shape[-1] != b_shape[-2] or str(a.ty.dtype) not in ("int8", "uint8") or str(b.ty.dtype) != "int8"
                or str(call.ty.dtype) != "int32"):
            return fallback(bb, call)
        batch = b_shape[:-2]
        if batch and (len(a_shape) != len(b_shape) or a_shape[:-2] != batch):
            return fallback(bb, call)  # broadcasting batches: TVM's own legalisation
        if not batch and not _is_constant(bb, b):
            return fallback(bb, call)
        k, n = b_shape[-2:]
        nb = int(np.prod(batch)) if batch else 1
        offset = _activation_offset(str(a.ty.dtype), act)
        kp = -(-k // 4) * 4
        panels = _int8_panels(-(-n // cols))
        lead = a_shape[:-1]
        rows = int(np.prod(lead))
        per_batch = a_shape[-2] if batch else rows  # rows of one batch entry
        rows_p = -(-rows // INT8_ROWS) * INT8_ROWS
        zero8 = tvm.tirx.const(0, "int8")

        def unflat_batch(t):  # flat batch index -> the batch indices of b
            idx, rest = [], t
            for d in reversed(batch):
                idx.append(tvm.tirx.floormod(rest, d) if d != 1 else 0)
                rest = tvm.tirx.floordiv(rest, d)
            return list(reversed(idx))

        def pack(w):
            def value(t, o, r, c, q):
                src = (*unflat_batch(t), tvm.tirx.min(r * 4 + q, k - 1), tvm.tirx.min(o * cols + c, n - 1))
                return tvm.tirx.if_then_else(tvm.tirx.all(o * cols + c < n, r * 4 + q < k), w[src], zero8)

            return te.compute((nb, panels, kp // 4, cols, 4), value, name="int8_weight_pack")

        def correction(w):
            r = te.reduce_axis((0, k), name="k")
            return te.compute((nb, n), lambda t, j: te.sum(w[(*unflat_batch(t), r, j)].astype("int32") * (-offset), axis=r),
                              name="int8_offset_correction")

        packed = bb.emit(bb.call_te(pack, b, primfunc_name_hint="int8_weight_pack"))
        corr = bb.emit(bb.call_te(correction, b, primfunc_name_hint="int8_offset_correction"))

        def matmul(x, wp, cr):
            def unflat(m):  # flat row -> leading indices (extents of 1 get a plain 0)
                idx, rest = [], m
                for pos, d in enumerate(reversed(lead)):
                    last = all(e == 1 for e in lead[: len(lead) - 1 - pos])
                    idx.append(0 if d == 1 else rest if last else tvm.tirx.floormod(rest, d))
                    rest = tvm.tirx.floordiv(rest, d)
                return list(reversed(idx))

            def load(m, q):
                v = x[(*unflat(tvm.tirx.min(m, rows - 1)), tvm.tirx.min(q, k - 1))]
                v = (v.astype("int32") + offset).astype(act) if offset else v
                return tvm.tirx.if_then_else(tvm.tirx.all(m < rows, q < k), v, tvm.tirx.const(0, act))

            def panel_set(m):  # the batch entry whose panels row m multiplies
                return tvm.tirx.floordiv(tvm.tirx.min(m, rows - 1), per_batch) if nb > 1 else 0

            xa = te.compute((rows_p, kp), load, name="int8_activation")
            r = te.reduce_axis((0, kp), name="k")
            acc = te.compute((rows_p, panels * cols), lambda m, j: te.sum(
                xa[m, r].astype("int32") * wp[panel_set(m), j // cols, r // 4, j % cols, r % 4].astype("int32"), axis=r),
                name="int8_dot")

            def out(*idx):
                m = None
                for d, i in zip(lead, idx[:-1]):
                    if d != 1:  # (an index of extent 1 is 0)
                        m = i if m is None else m * d + i
                m = 0 if m is None else m
                return acc[m, idx[-1]] + cr[panel_set(m), idx[-1]]

            return te.compute((*lead, n), out, name="int8_dot_out")

        return bb.call_te(matmul, a, packed, corr, primfunc_name_hint="int8_matmul")

    return legalize


def _int8_panels(panels: int) -> int:
    """Column panels of the integer kernel: padded with zero panels to a multiple of
    ``INT8_VECTORS`` when no tile width of 2 or more divides them (197 keys = 13 panels of 16:
    one vector per register tile reloaded its activations for every 16 columns; 16 panels in
    tiles of 4 do 23% more products in a quarter of the activation loads)."""
    if panels > INT8_VECTORS and _divisor(panels, [INT8_VECTORS, 3, 2]) is None:
        return -(-panels // INT8_VECTORS) * INT8_VECTORS
    return panels


def _schedule_pack(sch, params: CpuParams) -> None:
    """The per-call packing of an activation operand (``int8_weight_pack`` of
    :func:`int8_matmul_legalizer`, ``[batch, panel, k/4, G, 4]``): batch and panel loops in
    parallel, the ``G x 4`` bytes of one ``k`` step as the inner loop LLVM vectorises (the
    default rule fused all five loops into one, a division and a modulo per byte)."""
    block = sch.get_sblock("int8_weight_pack")
    t, o, r, c, q = sch.get_loops(block)
    outer = sch.fuse(t, o)
    if params.threads > 1:
        sch.parallel(outer)
    sch.unroll(q)


def _is_int8_dot(sch, block) -> bool:
    return sch.get(block).name_hint == "int8_dot"


def _flat_rows_map(extents: list):
    """``(i0, i1, ..., n) -> (i0 * e1 * ... + i1 * ... + ..., n)`` for leading extents ``extents``."""

    def flat(*idx):
        m = idx[0]
        for i, d in zip(idx[1:-1], extents[1:]):
            m = m * d + i
        return [m, idx[-1]]

    return flat


def _flat_int8_epilogue(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` (an integer matmul, :func:`int8_matmul_legalizer`) with its last block (the output
    the epilogue is inlined into) on one row axis: its iterators ``(*lead, n)`` become ``(m, n)``,
    ``m`` the flat row of the ``int8_dot`` accumulator.

    The output block reads ``acc[b * T + t, n]`` (``T`` rows per image). Computed per register
    tile of flat rows (``reverse_compute_at``, in the integer rule and in the GEMM rule it falls
    back to), TVM 0.27 derives the tile's range of ``t`` from ``r % T`` and ``(r + 3) % T`` (a
    min / max), which is wrong when the tile crosses from one image to the next: at batch > 1 the
    epilogue did not write the tile's rows (tiny DeiT's integer graph differed from ONNX Runtime
    on all but the last image; at batch 1 no tile crosses). On a flat row axis the read is
    ``acc[m, n]`` and a tile's region is exact. The index map is a bijection, so nothing computed
    changes. None when the block does not flatten: the caller then must not compute the epilogue
    per tile.
    """
    sch = s_tir.Schedule(func)
    try:
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        names = [sch.get(b).name_hint for b in blocks]
        if names.index("int8_dot") + 1 < len(names):
            block = sch.get_sblock(names[-1])
            ivs = sch.get(block).iter_vars
            if len(ivs) <= 2:
                return func
            flat = _flat_rows_map([int(iv.dom.extent) for iv in ivs[:-1]])
            sch.transform_block_layout(block, tirx.IndexMap.from_func(flat, ndim=len(ivs),
                                                                       index_dtype=str(ivs[0].var.ty)))
    except Exception:
        return None
    return sch.mod["main"]


def _schedule_int8_dot(sch, main, params: CpuParams, intrin: str) -> None:
    """Register-tile (``INT8_ROWS`` rows x up to ``INT8_VECTORS`` groups of the intrinsic's G
    columns) and tensorise the ``int8_dot`` block; the epilogue per tile (see above) when the
    tiles divide the output's columns, else after the product, row by row."""
    cols = dot_layout(intrin)[0]
    root = sch.get_sblock("root")
    names = [sch.get(b).name_hint for b in sch.get_child_blocks(root)]
    pos = names.index("int8_dot")
    for name in names[pos + 1 : -1]:  # elementwise epilogue: into the last block
        sch.compute_inline(sch.get_sblock(name))
    last = sch.get_sblock(names[-1]) if pos + 1 < len(names) else None
    i, j, k = sch.get_loops(main)
    vectors = _divisor(_extent(sch, j) // cols, [INT8_VECTORS, 3, 2, 1])
    io, ii = sch.split(i, [None, INT8_ROWS])
    jo, jv, ji = sch.split(j, [None, vectors, cols])
    ko, ki = sch.split(k, [None, 4])
    sch.reorder(jo, io, ko, ii, jv, ji, ki)
    outer = sch.fuse(jo, io)
    if last is not None:
        width = [int(d) for d in sch.get(last).writes[0].source.shape][-1]
        if width % (vectors * cols) == 0:
            sch.reverse_compute_at(last, outer)
            loops = sch.get_loops(last)
            inner = loops[-1]
            if (_extent(sch, inner) or 0) % 16 == 0:
                _, v = sch.split(inner, [None, 16])
                sch.vectorize(v)
        else:
            # a column tile would cross the output's last column (197 keys): per tile, the
            # column bound is a per-lane condition and TVM scalarises the whole epilogue
            # (measured: DeiT-S's q k^T requantisation one element at a time). After the
            # product instead, rows in parallel, each row a plain loop LLVM vectorises.
            loops = sch.get_loops(last)
            rows = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
            if params.threads > 1:
                sch.parallel(rows)
    if params.threads > 1:
        sch.parallel(outer)
    init = sch.decompose_reduction(main, ko)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(ji, intrin)
    xa = sch.get_sblock("int8_activation")
    xl = sch.get_loops(xa)
    if (_extent(sch, xl[-1]) or 0) % 16 == 0:
        _, v = sch.split(xl[-1], [None, 16])
        sch.vectorize(v)


def int8_conv2d_legalizer(params: CpuParams, intrin: str | None, fallback):
    """``relax.nn.conv2d`` (groups 1, HWIO weights, NHWC out) of int8/uint8 data and constant int8
    weights with int32 out -> the dot-product kernel as an implicit GEMM (G, activation type and
    offset of ``intrin`` as for the matmul):

        Xa[n, y, x, c]  = data + off as the activation type, spatially padded with off (the
                          original 0: every window then carries the same offset; VNNI on int8
                          data: 128, sdot on uint8 data: -128) and channels padded to 4
        C[n, oy, ox, f] = sum_{ry, rx, rc} Xa[n, oy s + ry d, ox s + rx d, rc] * Wp[f/G, ry, rx, rc/4, f%G, rc%4]
        out             = C + corr[f],  corr = -off * sum W[:, :, :, f]

    the weights packed and the correction computed at build time; anything else -> ``fallback``."""
    import tvm
    from tvm import te

    cols, act = dot_layout(intrin) if intrin is not None else (0, "")

    def legalize(bb, call):
        attrs = call.attrs
        data, weight = call.args
        wshape = _static_shape(weight)
        dshape = _static_shape(data)
        out_dtype = str(attrs.out_dtype) if attrs.out_dtype is not None else ""
        if (intrin is None or wshape is None or dshape is None or attrs.kernel_layout != "HWIO"
                or attrs.out_layout != "NHWC" or attrs.data_layout not in ("NHWC", "NCHW") or int(attrs.groups) != 1
                or str(data.ty.dtype) not in ("int8", "uint8") or str(weight.ty.dtype) != "int8" or out_dtype != "int32"
                or not _is_constant(bb, weight)):
            return fallback(bb, call)
        kh, kw, ic, oc = wshape
        nchw = attrs.data_layout == "NCHW"
        n, h, w = (dshape[0], dshape[2], dshape[3]) if nchw else dshape[:3]
        offset = _activation_offset(str(data.ty.dtype), act)
        icp, panels = -(-ic // 4) * 4, -(-oc // cols)
        strides = [int(s) for s in attrs.strides]
        dil = [int(d) for d in attrs.dilation]
        top, left, bottom, right = [int(p) for p in attrs.padding]
        oh = (h + top + bottom - dil[0] * (kh - 1) - 1) // strides[0] + 1
        ow = (w + left + right - dil[1] * (kw - 1) - 1) // strides[1] + 1
        zero8 = tvm.tirx.const(0, "int8")

        def pack(wt):
            return te.compute((panels, kh, kw, icp // 4, cols, 4), lambda o, y, x, r, c, q: tvm.tirx.if_then_else(
                tvm.tirx.all(o * cols + c < oc, r * 4 + q < ic),
                wt[y, x, tvm.tirx.min(r * 4 + q, ic - 1), tvm.tirx.min(o * cols + c, oc - 1)], zero8),
                name="int8_weight_pack")

        def correction(wt):
            ry, rx, rc = (te.reduce_axis((0, e), name=nm) for e, nm in ((kh, "ry"), (kw, "rx"), (ic, "rc")))
            return te.compute((oc,), lambda f: te.sum(wt[ry, rx, rc, f].astype("int32") * (-offset),
                                                      axis=[ry, rx, rc]), name="int8_offset_correction")

        packed = bb.emit(bb.call_te(pack, weight, primfunc_name_hint="int8_weight_pack"))
        corr = bb.emit(bb.call_te(correction, weight, primfunc_name_hint="int8_offset_correction"))
        pad_value = tvm.tirx.const(offset, act)

        def conv(x, wp, cr):
            def load(b, y, x_, c):
                yy, xx = y - top, x_ - left
                inside = tvm.tirx.all(yy >= 0, yy < h, xx >= 0, xx < w, c < ic)
                yc, xc, cc = (tvm.tirx.max(tvm.tirx.min(v, e - 1), 0) for v, e in ((yy, h), (xx, w), (c, ic)))
                v = x[b, cc, yc, xc] if nchw else x[b, yc, xc, cc]
                v = (v.astype("int32") + offset).astype(act) if offset else v
                return tvm.tirx.if_then_else(inside, v, tvm.tirx.if_then_else(c < ic, pad_value, tvm.tirx.const(0, act)))

            xa = te.compute((n, h + top + bottom, w + left + right, icp), load, name="int8_activation")
            ry, rx, rc = te.reduce_axis((0, kh), name="ry"), te.reduce_axis((0, kw), name="rx"), te.reduce_axis((0, icp), name="rc")
            acc = te.compute((n, oh, ow, panels * cols), lambda b, y, x_, f: te.sum(
                xa[b, y * strides[0] + ry * dil[0], x_ * strides[1] + rx * dil[1], rc].astype("int32")
                * wp[f // cols, ry, rx, rc // 4, f % cols, rc % 4].astype("int32"), axis=[ry, rx, rc]), name="int8_conv")
            return te.compute((n, oh, ow, oc), lambda b, y, x_, f: acc[b, y, x_, f] + cr[f], name="int8_conv_out")

        return bb.call_te(conv, data, packed, corr, primfunc_name_hint="int8_conv2d")

    return legalize


def _schedule_int8_conv(sch, main, params: CpuParams, intrin: str) -> None:
    """Register-tile (output pixels of a row x groups of the intrinsic's G channels) and tensorise
    ``int8_conv``; the epilogue per tile, as for the integer matmul."""
    cols = dot_layout(intrin)[0]
    root = sch.get_sblock("root")
    names = [sch.get(b).name_hint for b in sch.get_child_blocks(root)]
    pos = names.index("int8_conv")
    for name in names[pos + 1 : -1]:
        sch.compute_inline(sch.get_sblock(name))
    last = sch.get_sblock(names[-1]) if pos + 1 < len(names) else None
    b, y, x, f, ry, rx, rc = sch.get_loops(main)
    rows = _divisor(_extent(sch, x), [4, 7, 2, 1])
    vectors = _divisor(_extent(sch, f) // cols, [INT8_VECTORS, 3, 2, 1])
    xo, xi = sch.split(x, [None, rows])
    fo, fv, fi = sch.split(f, [None, vectors, cols])
    rco, rci = sch.split(rc, [None, 4])
    sch.reorder(b, fo, y, xo, ry, rx, rco, xi, fv, fi, rci)
    outer = sch.fuse(b, fo, y, xo)
    if last is not None:
        sch.reverse_compute_at(last, outer)
        inner = sch.get_loops(last)[-1]
        if (_extent(sch, inner) or 0) % 16 == 0:
            _, v = sch.split(inner, [None, 16])
            sch.vectorize(v)
    if params.threads > 1:
        sch.parallel(outer)
    init = sch.decompose_reduction(main, ry)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(fi, intrin)
    xa = sch.get_sblock("int8_activation")
    xl = sch.get_loops(xa)
    # a parallel region costs a wake-up of the sleeping workers (tens of microseconds on a VM
    # with passive waiting): the activation copy of a small image is cheaper done serially
    if params.threads > 1 and _product(sch, xl) >= PARALLEL_MIN_ELEMENTS:
        sch.parallel(xl[1])
