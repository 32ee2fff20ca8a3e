"""Facts: what a pass establishes about a program (``provides``), what it needs before it can run
(``requires``) and what it breaks (``invalidates``). A pipeline is validated against them before
anything runs (:meth:`sliver.passes.Pipeline.validate`).

Every fact any pass names is declared here, once, so that families never import each other for a
fact's name.
"""

#: batch norms folded into the convolutions before them (fold-bn)
BN_FOLDED = "bn-folded"
#: ONNX graph cleaned (cleanup)
CLEAN = "clean"
#: weights pruned in regular blocks (block-prune)
BLOCK_SPARSE = "block-sparse"
#: channels removed (adapruner, ofa-prune)
CHANNEL_PRUNED = "channel-pruned"
#: tokens removed inside the transformer (evit, heatvit, asvit, lvtp)
TOKEN_PRUNED = "token-pruned"
#: a second, local pass of the same encoder over an attention-selected crop (aftrans)
TWO_SCALE = "two-scale"
#: a token pass whose selection scores come from float ops with no integer form (heatvit's
#: selector MLP with its softmax and sigmoid, asvit's context norms): pot-shift cannot make them
#: integer (evit's class-attention scores and its fused token it can)
FLOAT_TOKEN_SCORES = "float-token-scores"
#: nonlinear functions replaced by polynomial / piecewise-linear approximations (poly-act)
POLY_ACT = "poly-act"
#: weights and activations quantised to power-of-two scales (rapq, pot-naive)
QUANTIZED_POT = "quantized:pot"
#: approximate multipliers substituted (appmul)
APPMUL = "appmul"
#: every op between the input quantiser and the output dequantiser computes on integers (pot-shift)
INTEGER_ONLY = "integer-only"
#: programs that round values inside (fake-quantised or fixed-point activations): a level
#: conversion may move a value across a rounding boundary, so its output change is reported only
ROUNDING_FACT = "rounds-activations"
