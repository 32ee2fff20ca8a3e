"""Dependency-aware channel groups on the torch.fx graph: the one mechanism every channel-pruning
pass uses (after Torch-Pruning's DepGraph, Fang et al., CVPR 2023, "DepGraph: Towards Any
Structural Pruning").

Every channel of every tensor in the graph is labelled with an *atom*: the output channels of a
prunable layer (a dense ``Conv2d`` or a ``Linear`` on 2-D input) are fresh atoms, and the labels
flow through the graph:

- BatchNorm, activations, pooling, dropout and depthwise convolutions pass their input's labels
  through (a depthwise conv and a BN *follow* their input: they lose the same channels);
- an elementwise add/sub/mul/div of two tensors with the same channel count *unites* the labels
  channel by channel: a residual add makes the two branches one channel set;
- ``cat`` along channels concatenates the label lists, ``split`` along channels cuts them (the
  split sizes are rewritten after pruning), ``flatten(x, 1)`` repeats each channel's label once per
  spatial position, so the next ``Linear`` loses the right columns;
- a layer's *input* channels carry the labels of the tensor it reads: the next layer's input
  channels follow automatically.

United atoms form a *unit* (the smallest thing that can be removed) and units whose atoms come
from the same producers form a :class:`ChannelGroup`. A group is prunable when each of its units
holds exactly one channel of each member producer. Anything the analysis does not understand is
*frozen*, never guessed: the graph inputs and outputs, grouped (non-depthwise) convolutions,
unknown modules and functions, and any group touching them keep all their channels; the reason is
kept in :attr:`ChannelGraph.frozen`.

:meth:`ChannelGraph.macs` counts the MACs of a keep-mask analytically (exact: the tests compare it
with :func:`sliver.ir.stats` on the sliced program), and :meth:`ChannelGraph.apply` slices the
modules physically (weights, biases, BN statistics, channel counts, split sizes).
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...ir.errors import PassError

# modules and functions that keep channel i of their input as channel i of their output
_PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU,
    nn.ELU, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)
_PASS_FUNCTIONS = {
    F.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.hardsigmoid, torch.sigmoid, torch.tanh, torch.relu,
    F.sigmoid, F.leaky_relu, F.dropout, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.max_pool2d,
    F.avg_pool2d,
}
_PASS_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "float", "detach"}
_ELEMENTWISE = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul,
                torch.add, torch.sub, torch.mul, torch.div}
_ELEMENTWISE_METHODS = {"add", "sub", "mul", "div", "add_", "mul_"}
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d)


def _shape(node) -> tuple | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list = []
        self.frozen: list = []

    def new(self, count: int, frozen: bool = False) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + count))
        self.frozen.extend([frozen] * count)
        return np.arange(start, start + count)

    def find(self, a: int) -> int:
        parent = self.parent
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:
            parent[a], a = root, parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
            self.frozen[ra] = self.frozen[ra] or self.frozen[rb]

    def freeze(self, atoms) -> None:
        for a in np.asarray(atoms).ravel().tolist():
            self.frozen[self.find(a)] = True


@dataclass
class ChannelGroup:
    """Coupled channels that are pruned together.

    ``members`` maps each producer (module target) to ``index[u]``: the producer's output channel
    that unit ``u`` of this group holds. ``offset`` is the group's first unit in the global unit
    numbering the keep-masks use.
    """

    id: int
    size: int
    offset: int
    members: dict = field(default_factory=dict)
    bns: list = field(default_factory=list)  # (bn target, channel index of each unit)

    @property
    def name(self) -> str:
        return next(iter(self.members))

    @property
    def units(self) -> slice:
        return slice(self.offset, self.offset + self.size)


@dataclass
class _Layer:
    """One call of a layer whose MACs or weights depend on the channels kept."""

    kind: str  # "dense" (conv groups=1 / linear), "depthwise", "bn"
    target: str
    node: str
    inputs: np.ndarray  # atom of each input channel (flattened positions for a Linear after flatten)
    outputs: np.ndarray | None  # atom of each output channel ("dense" only)
    macs_per_pair: int = 0  # MACs per (kept input, kept output) pair, or per kept channel (depthwise)


class ChannelGraph:
    """The channel dependencies of a torch-level GraphModule (see the module notes)."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.gm = gm
        self.uf = _UnionFind()
        self.frozen: dict = {}  # reason -> count of frozen inputs it caused
        self.layers: list = []
        self.producers: dict = {}  # target -> atoms of its output channels
        self.splits: dict = {}  # node name -> list of atom arrays (one per piece)
        self._build()
        self._group()

    # -- analysis ---------------------------------------------------------------------------
    def _freeze(self, labels, reason: str) -> None:
        if labels is None:
            return
        if isinstance(labels, list):
            for item in labels:
                self._freeze(item, reason)
            return
        self.uf.freeze(labels)
        self.frozen[reason] = self.frozen.get(reason, 0) + 1

    def _fresh(self, node, reason: str):
        shape = _shape(node)
        if shape is None or len(shape) < 2:
            return None
        atoms = self.uf.new(shape[1], frozen=True)
        self.frozen[reason] = self.frozen.get(reason, 0) + 1
        return atoms

    def _unite(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            self.uf.union(x, y)

    def _build(self) -> None:
        gm, labels = self.gm, {}
        self._labels_during_build = labels
        calls: dict = {}
        for node in gm.graph.nodes:
            ins = [labels.get(a.name) if isinstance(a, torch.fx.Node) else None for a in node.args]
            first = ins[0] if ins else None
            out = None
            if node.op in ("placeholder", "get_attr"):
                out = self._fresh(node, f"{node.op} {node.target}")
            elif node.op == "output":
                for a in node.all_input_nodes:
                    self._freeze(labels.get(a.name), "graph output")
            elif node.op == "call_module":
                out = self._module(node, gm.get_submodule(node.target), first, calls)
            elif node.op in ("call_function", "call_method"):
                out = self._function(node, ins, first)
            labels[node.name] = out
        self.labels = labels

    def _module(self, node, mod, first, calls):
        target = node.target
        if isinstance(mod, nn.Conv2d) and first is not None:
            shape = _shape(node)
            if mod.groups == 1:
                out = self.producers.get(target)
                if out is None:
                    out = self.producers[target] = self.uf.new(mod.out_channels)
                k = int(np.prod(mod.kernel_size))
                per = shape[0] * shape[2] * shape[3] * k
                self._layer("dense", node, first, out, per, calls)
                return out
            if mod.groups == mod.in_channels == mod.out_channels:
                k = int(np.prod(mod.kernel_size))
                self._layer("depthwise", node, first, None, shape[0] * shape[2] * shape[3] * k, calls)
                return first
            self._freeze(first, f"grouped conv {target}")
            return self._fresh(node, f"grouped conv {target}")
        if isinstance(mod, nn.Linear) and first is not None:
            in_shape = _shape(node.args[0])
            if in_shape is not None and len(in_shape) == 2:
                out = self.producers.get(target)
                if out is None:
                    out = self.producers[target] = self.uf.new(mod.out_features)
                self._layer("dense", node, first, out, in_shape[0], calls)
                return out
            self._freeze(first, f"linear on {len(in_shape or ())}-d input {target}")
            return self._fresh(node, f"linear {target}")
        if isinstance(mod, _BNS) and first is not None:
            self._layer("bn", node, first, None, 0, calls)
            return first
        if isinstance(mod, _PASS_MODULES):
            return first
        if isinstance(mod, nn.Flatten) and first is not None:
            return self._flatten(node, first, mod.start_dim, mod.end_dim)
        for a in node.all_input_nodes:
            self._freeze(self.labels_of(a), f"module {type(mod).__name__} {target}")
        return self._fresh(node, f"module {type(mod).__name__} {target}")

    def labels_of(self, node):
        return getattr(self, "_labels_during_build", {}).get(node.name)

    def _layer(self, kind, node, first, out, per, calls) -> None:
        target = node.target
        if target in calls:  # a module called twice: both calls read the same weight columns
            prev = calls[target]
            if len(prev.inputs) != len(first):
                self._freeze(first, f"{target} called on inputs of different widths")
                self._freeze(prev.inputs, f"{target} called on inputs of different widths")
            else:
                self._unite(prev.inputs, first)
        layer = _Layer(kind, target, node.name, first, out, per)
        calls.setdefault(target, layer)
        self.layers.append(layer)

    def _flatten(self, node, first, start, end):
        shape = _shape(node.args[0])
        if shape is None:
            return None
        end = end % len(shape)
        if start >= 2:
            return first
        if start == 1 and end == len(shape) - 1:
            return np.repeat(first, int(np.prod(shape[2:], dtype=np.int64)))
        self._freeze(first, f"flatten over the batch dimension at {node.name}")
        return self._fresh(node, f"flatten {node.name}")

    def _function(self, node, ins, first):
        target = node.target
        method = node.op == "call_method"
        tensor_ins = [(a, l) for a, l in zip(node.args, ins) if l is not None]
        if (not method and target in _PASS_FUNCTIONS) or (method and target in _PASS_METHODS):
            return first
        if (not method and target in _ELEMENTWISE) or (method and target in _ELEMENTWISE_METHODS):
            if len(tensor_ins) == 1:
                other = [a for a in node.args if a is not tensor_ins[0][0]]
                other_shape = _shape(other[0]) if other and isinstance(other[0], torch.fx.Node) else None
                if other_shape is not None and len(other_shape) >= 2 and other_shape[1] != 1:
                    self._freeze(tensor_ins[0][1], f"elementwise with an unlabelled tensor at {node.name}")
                    return self._fresh(node, f"elementwise {node.name}")
                return tensor_ins[0][1]
            if len(tensor_ins) == 2:
                (_, a), (_, b) = tensor_ins
                if len(a) == len(b):
                    self._unite(a, b)
                    return a
                if len(b) == 1:
                    self._freeze(b, f"channel broadcast at {node.name}")
                    return a
                if len(a) == 1:
                    self._freeze(a, f"channel broadcast at {node.name}")
                    return b
            self._freeze(list(ins), f"elementwise {node.name}")
            return self._fresh(node, f"elementwise {node.name}")
        if (not method and target is torch.flatten) or (method and target == "flatten"):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            if first is not None:
                return self._flatten(node, first, start, end)
        if method and target in ("view", "reshape") and first is not None:
            shape, out_shape = _shape(node.args[0]), _shape(node)
            if shape and out_shape and len(out_shape) == 2 and out_shape[0] == shape[0]:
                return self._flatten(node, first, 1, -1)
        if (method and target in ("mean", "sum", "amax")) or (not method and target in (torch.mean, torch.sum)):
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            dims = (dims,) if isinstance(dims, int) else dims
            shape = _shape(node.args[0])
            if first is not None and dims and shape and all(d % len(shape) >= 2 for d in dims):
                return first
        if not method and target is torch.cat:
            tensors = node.args[0]
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            parts = [self._labels_during_build.get(t.name) for t in tensors]
            shape = _shape(node)
            if all(p is not None for p in parts) and shape is not None:
                if dim % len(shape) == 1:
                    return np.concatenate(parts)
                if dim % len(shape) >= 2:
                    for p in parts[1:]:
                        self._unite(parts[0], p)
                    return parts[0]
            self._freeze(parts, f"cat {node.name}")
            return self._fresh(node, f"cat {node.name}")
        if (not method and target is torch.split) or (method and target == "split"):
            sizes = node.args[1] if len(node.args) > 1 else node.kwargs.get("split_size_or_sections")
            dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
            shape = _shape(node.args[0])
            if first is not None and shape and dim % len(shape) == 1 and isinstance(sizes, (list, tuple)):
                pieces = np.split(first, np.cumsum(sizes)[:-1])
                self.splits[node.name] = pieces
                return list(pieces)
            self._freeze(first, f"split {node.name}")
            return None
        if not method and target is operator.getitem:
            source = ins[0]
            if isinstance(source, list) and isinstance(node.args[1], int):
                return source[node.args[1]]
            self._freeze(source, f"indexing {node.name}")
            return self._fresh(node, f"indexing {node.name}")
        if method and target in ("size", "dim") and (len(node.args) > 1 and node.args[1] in (0, -4)):
            return None
        # anything else: freeze what it reads, label what it makes as frozen
        for _, labels in tensor_ins:
            self._freeze(labels, f"{node.op} {getattr(target, '__name__', target)}")
        return self._fresh(node, f"{node.op} {getattr(target, '__name__', target)}")

    # -- groups -----------------------------------------------------------------------------
    def _group(self) -> None:
        uf = self.uf
        root_members: dict = {}  # root -> list of (producer, channel)
        for target, atoms in self.producers.items():
            for c, a in enumerate(atoms.tolist()):
                root_members.setdefault(uf.find(a), []).append((target, c))
        # producers sharing a unit belong to one group
        parent = {t: t for t in self.producers}

        def find(t):
            while parent[t] != t:
                parent[t] = parent[parent[t]]
                t = parent[t]
            return t

        for members in root_members.values():
            for (t, _) in members[1:]:
                a, b = find(members[0][0]), find(t)
                if a != b:
                    parent[b] = a
        by_group: dict = {}
        for t in self.producers:
            by_group.setdefault(find(t), []).append(t)
        self.groups: list = []
        self.unit_of_atom = np.full(len(uf.parent) + 1, -1, dtype=np.int64)
        offset = 0
        for lead, targets in by_group.items():
            roots = sorted({uf.find(a) for t in targets for a in self.producers[t].tolist()},
                           key=lambda r: [c for (tt, c) in root_members[r] if tt == targets[0]] or [0])
            reason = None
            if any(uf.frozen[r] for r in roots):
                reason = "touches a frozen tensor"
            elif any(sorted(tt for tt, _ in root_members[r]) != sorted(targets) for r in roots):
                reason = "channels are not aligned one-to-one across its layers"
            if reason is not None:
                self.frozen[f"group {lead}: {reason}"] = 1
                continue
            group = ChannelGroup(len(self.groups), len(roots), offset)
            for t in targets:
                index = np.empty(len(roots), dtype=np.int64)
                for u, r in enumerate(roots):
                    index[u] = next(c for (tt, c) in root_members[r] if tt == t)
                group.members[t] = index
            self.groups.append(group)
            root_unit = {r: offset + u for u, r in enumerate(roots)}
            for t in targets:
                for a in self.producers[t].tolist():
                    self.unit_of_atom[a] = root_unit[uf.find(a)]
            offset += len(roots)
        self.num_units = offset
        # atoms that are not a producer's (frozen or not) map onto units through their roots
        root_unit_all = {}
        for a in range(len(uf.parent)):
            if self.unit_of_atom[a] >= 0:
                root_unit_all[uf.find(a)] = self.unit_of_atom[a]
        for a in range(len(uf.parent)):
            if self.unit_of_atom[a] < 0:
                self.unit_of_atom[a] = root_unit_all.get(uf.find(a), offset)  # offset = always kept
        self.unit_of_atom[-1] = offset
        self._units = {}
        for layer in self.layers:
            self._units[id(layer)] = (
                self.unit_of_atom[layer.inputs],
                None if layer.outputs is None else self.unit_of_atom[layer.outputs],
            )
        for layer in self.layers:
            if layer.kind == "bn":
                units = self._units[id(layer)][0]
                for g in self.groups:
                    local = units - g.offset
                    hit = (local >= 0) & (local < g.size)
                    if hit.all():
                        channel = np.empty(g.size, dtype=np.int64)
                        channel[local] = np.arange(len(units))
                        g.bns.append((layer.target, channel))
        self.split_units = {name: [self.unit_of_atom[p] for p in pieces] for name, pieces in self.splits.items()}

    # -- masks, MACs, slicing ----------------------------------------------------------------
    def full_mask(self) -> np.ndarray:
        """Keep-mask over all units (True = keep); the extra last entry stands for frozen channels."""
        return np.ones(self.num_units + 1, dtype=bool)

    def macs(self, keep: np.ndarray) -> int:
        """MACs of the prunable layers under ``keep`` (dense convs, linears, depthwise convs)."""
        total = 0
        for layer in self.layers:
            units_in, units_out = self._units[id(layer)]
            if layer.kind == "dense":
                total += layer.macs_per_pair * int(keep[units_in].sum()) * int(keep[units_out].sum())
            elif layer.kind == "depthwise":
                total += layer.macs_per_pair * int(keep[units_in].sum())
        return total

    def channels(self, keep: np.ndarray) -> dict:
        """Kept output channels of every producer: target -> count."""
        return {t: int(keep[self.unit_of_atom[atoms]].sum()) for t, atoms in self.producers.items()}

    def apply(self, gm: torch.fx.GraphModule, keep: np.ndarray) -> torch.fx.GraphModule:
        """Slice the modules of ``gm`` (a copy of the analysed module with the same targets) to
        the channels in ``keep``; returns ``gm`` edited in place (call ``retrace`` after)."""
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != (self.num_units + 1,) or not keep[-1]:
            raise PassError(f"a keep-mask has {self.num_units + 1} entries, the last True; got shape {keep.shape}")
        for g in self.groups:
            if not keep[g.units].any():
                raise PassError(f"channel group {g.name} would lose all {g.size} channels; keep at least one")
        done = set()
        for layer in self.layers:
            if layer.target in done:
                continue
            done.add(layer.target)
            units_in, units_out = self._units[id(layer)]
            idx_in = torch.as_tensor(np.flatnonzero(keep[units_in]))
            mod = gm.get_submodule(layer.target)
            with torch.no_grad():
                if layer.kind == "bn":
                    _slice_bn(mod, idx_in)
                elif layer.kind == "depthwise":
                    mod.weight = nn.Parameter(mod.weight.data[idx_in].clone())
                    if mod.bias is not None:
                        mod.bias = nn.Parameter(mod.bias.data[idx_in].clone())
                    mod.in_channels = mod.out_channels = mod.groups = len(idx_in)
                else:
                    idx_out = torch.as_tensor(np.flatnonzero(keep[units_out]))
                    w = mod.weight.data[idx_out][:, idx_in].clone()
                    mod.weight = nn.Parameter(w)
                    if mod.bias is not None:
                        mod.bias = nn.Parameter(mod.bias.data[idx_out].clone())
                    if isinstance(mod, nn.Conv2d):
                        mod.out_channels, mod.in_channels = len(idx_out), len(idx_in)
                    else:
                        mod.out_features, mod.in_features = len(idx_out), len(idx_in)
        for node in gm.graph.nodes:
            if node.name in self.split_units:
                sizes = [int(keep[u].sum()) for u in self.split_units[node.name]]
                if any(s == 0 for s in sizes):
                    raise PassError(f"split {node.name} would get an empty piece; keep at least one channel in each")
                args = list(node.args)
                if len(args) > 1:
                    args[1] = sizes
                    node.args = tuple(args)
                else:
                    node.kwargs = {**node.kwargs, "split_size_or_sections": sizes}
        return gm

    def sliced(self, gm: torch.fx.GraphModule, keep: np.ndarray) -> torch.fx.GraphModule:
        """A pruned deep copy of ``gm`` (recompiled; shapes not propagated)."""
        out = self.apply(copy.deepcopy(gm), keep)
        out.recompile()
        return out

    def summary(self) -> dict:
        return {
            "groups": len(self.groups),
            "prunable_channels": int(self.num_units),
            "frozen": sorted(self.frozen)[:20],
        }


def _slice_bn(bn: nn.Module, idx: torch.Tensor) -> None:
    if bn.weight is not None:
        bn.weight = nn.Parameter(bn.weight.data[idx].clone())
        bn.bias = nn.Parameter(bn.bias.data[idx].clone())
    if bn.running_mean is not None:
        bn.running_mean = bn.running_mean[idx].clone()
        bn.running_var = bn.running_var[idx].clone()
    bn.num_features = len(idx)


# -- channel scores (per unit) -----------------------------------------------------------------
def _filters(gm, graph: ChannelGraph, group: ChannelGroup):
    """(target, filters (units x fan-in)) of each member producer of ``group``."""
    for target, index in group.members.items():
        w = gm.get_submodule(target).weight.detach()
        yield target, w[torch.as_tensor(index)].reshape(group.size, -1).double()


def unit_scores(gm: torch.fx.GraphModule, graph: ChannelGraph, criterion: str, seed: int = 0) -> np.ndarray:
    """A score per unit (higher = more worth keeping) under a weight-inheritance ``criterion``:

    - ``l1-norm``: L1 norm of the unit's output filters (Li et al., ICLR 2017), summed over the
      group's producers, each producer's norms divided by their mean so that layers of different
      fan-in weigh alike;
    - ``bn-scale``: mean |gamma| over the group's BatchNorms (network slimming, Liu et al. 2017);
    - ``geometric-median``: FPGM (He et al., CVPR 2019): the distance of the filter to the others
      (sum of L2 distances, a proxy of the distance to the geometric median); filters near the
      median are replaceable, so a large distance means keep; normalised per producer like l1;
    - ``random``: a seeded uniform draw (the baseline every inheritance study keeps).
    """
    scores = np.zeros(graph.num_units + 1)
    rng = np.random.default_rng(seed)
    for g in graph.groups:
        if criterion == "bn-scale":
            if not g.bns:
                raise PassError(f"criterion bn-scale needs a BatchNorm on every channel group; {g.name} has none")
            s = np.mean([gm.get_submodule(t).weight.detach().abs().double().numpy()[ch] for t, ch in g.bns], axis=0)
        elif criterion == "random":
            s = rng.random(g.size)
        elif criterion in ("l1-norm", "geometric-median"):
            s = np.zeros(g.size)
            for _, filters in _filters(gm, graph, g):
                if criterion == "l1-norm":
                    part = filters.abs().sum(dim=1)
                else:
                    part = torch.cdist(filters[None], filters[None])[0].sum(dim=1)
                s += (part / part.mean().clamp_min(1e-12)).numpy()
        else:
            raise PassError(f"unknown criterion {criterion!r}; use l1-norm, bn-scale, geometric-median or random")
        scores[g.units] = s
    return scores


def has_bn_everywhere(graph: ChannelGraph) -> bool:
    return bool(graph.groups) and all(g.bns for g in graph.groups)


# -- fitting a MACs budget ---------------------------------------------------------------------
@dataclass
class BudgetFit:
    keep: np.ndarray
    macs: int
    ratio: float
    evaluations: int
    position: int  # how many chunks the global threshold drops (in the importance order)
    widths: np.ndarray  # every group's width
    threshold: float  # importance of the last chunk dropped by the global threshold
    skipped: tuple = ()  # groups held at their width by the refinement step (see WidthPlan.fit)


class WidthPlan:
    """Maps a global threshold to a keep-mask, as AdaPruner's bisection needs.

    Pruning moves in *chunks*: each group's units, sorted by ``importance`` (ties by
    ``tie_break``), are cut into chunks of ``round_to`` units, the odd remainder (``size mod
    round_to``) being the group's least important chunk, so every width a group can take is a
    multiple of ``round_to`` (or its full size). Chunks a group needs to keep ``min_channels``
    (rounded up to ``round_to``) are never dropped. A chunk's importance is the mean of its
    units' (made non-decreasing along the group, so a group always loses its weakest chunk
    first). Dropping the ``p`` least important chunks of the whole network gives every group its
    width; *which* of its units survive is decided by ``inherit`` (higher = kept).

    Widths only shrink as ``p`` grows and the surviving sets are nested, so the MACs are monotone
    in ``p``, and each step removes one chunk, so they fall in small steps even with a large
    ``round_to``. The threshold is bisected over the sorted chunk importances (rank space), which
    takes at most ceil(log2(chunks + 1)) + 1 evaluations of the MAC count, however the importance
    values cluster.
    """

    def __init__(self, graph: ChannelGraph, importance: np.ndarray, tie_break: np.ndarray, inherit: np.ndarray,
                 round_to: int = 1, min_channels: int = 1) -> None:
        self.graph, self.round_to, self.min_channels = graph, int(round_to), int(min_channels)
        self.sizes = np.array([g.size for g in graph.groups], dtype=np.int64)
        keys, chunk_group, chunk_size = [], [], []
        r = self.round_to
        for g in graph.groups:
            imp, tie = importance[g.units], tie_break[g.units]
            order = np.lexsort((tie, imp))
            min_width = min(g.size, -(-max(self.min_channels, 1) // r) * r)
            cuts, start = [], 0
            first = g.size % r
            if first:
                cuts.append((0, first))
                start = first
            while start + r <= g.size:
                cuts.append((start, start + r))
                start += r
            dropped, best_imp, best_tie = 0, -np.inf, -np.inf
            for local, (lo, hi) in enumerate(cuts):
                if g.size - dropped - (hi - lo) < min_width:
                    break
                dropped += hi - lo
                best_imp = max(best_imp, float(imp[order[lo:hi]].mean()))
                best_tie = max(best_tie, float(tie[order[lo:hi]].mean()))
                keys.append((best_imp, best_tie, local))
                chunk_group.append(g.id)
                chunk_size.append(hi - lo)
        keys = np.array(keys, dtype=float).reshape(-1, 3)
        self.order = np.lexsort((keys[:, 2], keys[:, 1], keys[:, 0])) if len(keys) else np.zeros(0, np.int64)
        self.chunk_importance = keys[:, 0]
        self.chunk_group = np.array(chunk_group, dtype=np.int64)
        self.chunk_size = np.array(chunk_size, dtype=np.int64)
        self.ranked = [g.offset + np.argsort(-inherit[g.units], kind="stable") for g in graph.groups]

    @property
    def chunks(self) -> int:
        return len(self.order)

    def widths(self, p: int, order=None) -> np.ndarray:
        taken = (self.order if order is None else order)[:p]
        dropped = np.bincount(self.chunk_group[taken], weights=self.chunk_size[taken], minlength=len(self.sizes))
        return self.sizes - dropped.astype(np.int64)

    def mask(self, p: int = 0, widths=None, order=None) -> np.ndarray:
        keep = np.zeros(self.graph.num_units + 1, dtype=bool)
        keep[-1] = True
        widths = self.widths(p, order) if widths is None else widths
        for ranked, w in zip(self.ranked, widths):
            keep[ranked[:w]] = True
        return keep

    def fit(self, budget_macs: float, fixed_macs: int, dense_macs: int, tolerance: float,
            what: str = "budget") -> BudgetFit:
        """The widest keep-mask with MACs <= budget, by bisection on the threshold position.

        When the chunk that crosses the budget is so expensive that the network without it lands
        more than ``tolerance`` below the budget (one channel of a residual-coupled set feeds many
        layers: on the 32 px tiny MobileNetV2 one such channel is ~1.5% of the MACs), one
        refinement follows: that chunk's group keeps its width, and a second bisection goes on
        dropping the next chunks of the *other* groups in the same importance order. This is
        sliver's choice (AdaPruner, arXiv 2109.06397, bisects one global threshold and does not
        say what to do when its steps are coarser than the tolerance). The second search gallops
        from the crossing point (1, 2, 4, ... chunks further) and bisects the last step, so it
        costs about 2 log2(k) + 1 MAC evaluations for the k chunks it drops.

        Raises :class:`PassError` if even the narrowest network is over budget (naming the
        smallest reachable ratio) or if rounding leaves the result further than ``tolerance``
        (relative) below the budget."""
        evaluations = 0

        def cost(p, order=None):
            nonlocal evaluations
            evaluations += 1
            return fixed_macs + self.graph.macs(self.mask(p, order=order))

        def bisect(lo, hi, hi_cost, order=None):
            # cost(lo) > budget, cost(hi) <= budget
            while hi - lo > 1:
                mid = (lo + hi) // 2
                c = cost(mid, order)
                if c <= budget_macs:
                    hi, hi_cost = mid, c
                else:
                    lo = mid
            return hi, hi_cost

        n = self.chunks
        smallest = cost(n)
        if smallest > budget_macs * (1 + 1e-12):
            reachable = math.ceil(smallest / dense_macs * 1e4) / 1e4
            raise PassError(
                f"{what} {budget_macs / dense_macs:.4g} of the dense MACs cannot be met: the smallest reachable "
                f"is {reachable:.4f} (every prunable group at min_channels={self.min_channels}, "
                f"round_to={self.round_to}; stem, classifier and other frozen layers stay whole); "
                f"ask for flops >= {reachable:.4f}")
        if dense_macs <= budget_macs:
            hi, hi_cost = 0, dense_macs
        else:
            hi, hi_cost = bisect(0, n, smallest)
        target = budget_macs / dense_macs
        order, position, skipped = self.order, hi, ()
        if (target - hi_cost / dense_macs) > tolerance * target and hi > 0:
            crossing = int(self.chunk_group[self.order[hi - 1]])
            rest = [c for c in self.order[hi - 1:] if self.chunk_group[c] != crossing]
            refined = np.concatenate([self.order[:hi - 1], np.asarray(rest, dtype=self.order.dtype)])
            # dropping the first hi - 1 chunks is over budget (the bisection's invariant); the
            # budget is usually a few chunks further, so gallop (1, 2, 4, ... chunks) and bisect
            # the last step rather than bisect the whole remaining order
            lo, step, found = hi - 1, 1, None
            while lo < len(refined):
                p = min(lo + step, len(refined))
                c = cost(p, refined)
                if c <= budget_macs:
                    found = bisect(lo, p, c, refined)
                    break
                lo, step = p, 2 * step
            if found is not None:
                p, c = found
                if c > hi_cost:
                    order, position, hi_cost, skipped = refined, p, c, (crossing,)
        ratio = hi_cost / dense_macs
        if abs(ratio - target) > tolerance * target:
            raise PassError(
                f"the closest network under the {what} has {ratio:.4f} of the dense MACs, more than "
                f"{tolerance:.0%} below the asked {target:.4f}: one chunk of round_to={self.round_to} channels "
                f"moves the MACs by more than that; lower round_to or raise the tolerance")
        threshold = float(self.chunk_importance[order[position - 1]]) if position > 0 else float("-inf")
        return BudgetFit(self.mask(position, order=order), int(hi_cost), ratio, evaluations, position,
                         self.widths(position, order), threshold, skipped)
