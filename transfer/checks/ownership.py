"""Can the optimizer move every weight? Each place the architecture has a weight (every block, router, expert,
norm) must hold its own trainable nn.Parameter: not frozen (requires_grad=False), not a buffer or plain tensor,
not one tensor shared with another place (a block reusing its source's parameter objects, one router for every
layer, experts that are views of one tensor), except the tie the config declares (tie_embeddings: the LM head is
the embedding). The checks take gradients on detached copies, so they cannot see any of this by differentiating:
it is read off the model itself, here, and judged by the trainability check.

    owner = measure_ownership(model)     # Ownership: frozen, shared, not_parameters, overlapping
    fixed = own_tensors(copy)            # the copy's places untied, so the other checks can measure it
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from models import build_model

FIX_OWNERSHIP = ("give every place its own trainable tensor: requires_grad_(True) on frozen weights; register "
                 "weights as nn.Parameter, not buffers; build a copied block, router or expert from .clone()d "
                 "tensors (load_state_dict into a fresh model), never by assigning the source's module or "
                 "parameter; the only tie allowed is the declared embedding/LM-head tie (tie_embeddings)")


@dataclass
class Ownership:
    """What stops the optimizer from moving some weight, by parameter name."""

    frozen: list[str] = field(default_factory=list)  # requires_grad=False
    shared: list[list[str]] = field(default_factory=list)  # places one storage serves (undeclared ties)
    not_parameters: list[str] = field(default_factory=list)  # places the architecture has a weight but no Parameter
    overlapping: list[str] = field(default_factory=list)  # one parameter whose elements alias (stride 0: expand)
    weights: dict[str, int] = field(default_factory=dict)  # name -> numel, for the ones listed

    def problems(self) -> list[str]:
        """One phrase per kind of problem, naming the parameters."""
        out = []
        if self.frozen:
            out.append(f"frozen (requires_grad=False): {_names(self.frozen)}")
        for group in self.shared:
            out.append(f"one tensor shared by {len(group)} places that should each own theirs: {_names(group)}")
        if self.not_parameters:
            out.append(f"not a trainable nn.Parameter (a buffer or plain tensor the optimizer never sees): "
                       f"{_names(self.not_parameters)}")
        if self.overlapping:
            out.append(f"elements aliasing one another (a stride-0 view: experts or rows sharing memory): "
                       f"{_names(self.overlapping)}")
        return out

    def names(self) -> list[str]:
        return sorted(set(self.frozen) | {n for g in self.shared for n in g} | set(self.not_parameters)
                      | set(self.overlapping))


def _names(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


_REFERENCES: dict[str, nn.Module] = {}  # repr(config) -> a model built on the meta device


def reference_model(cfg) -> nn.Module:
    """A model of `cfg` on the meta device (no memory), built once per config: building one runs the weight init
    through torch's Python reference ops, ~0.1 s a model, which the checks would otherwise pay several times."""
    key = repr(cfg)
    if key not in _REFERENCES:
        if len(_REFERENCES) > 16:
            _REFERENCES.clear()
        with torch.device("meta"):
            _REFERENCES[key] = build_model(cfg)
    return _REFERENCES[key]


_EXPECTED: dict[str, tuple[list[str], list[tuple[str, str]]]] = {}


def expected_parameters(cfg) -> tuple[list[str], list[tuple[str, str]]]:
    """The parameter names a model of `cfg` has, and the ties it declares, from a model built on the meta device
    (once per config; callers must not modify the lists)."""
    key = repr(cfg)
    if key not in _EXPECTED:
        if len(_EXPECTED) > 16:
            _EXPECTED.clear()
        _EXPECTED[key] = _expected(reference_model(cfg))
    return _EXPECTED[key]


def _expected(ref: nn.Module) -> tuple[list[str], list[tuple[str, str]]]:
    by_storage: dict[int, str] = {}
    ties, names = [], []
    for name, p in ref.named_parameters(remove_duplicate=False):
        names.append(name)
        if id(p) in by_storage:
            ties.append((by_storage[id(p)], name))
        by_storage.setdefault(id(p), name)
    return names, ties


def lookup(model: nn.Module, name: str) -> Tensor | None:
    """The tensor at a dotted name, parameter, buffer or plain attribute; None when absent."""
    obj = model
    for part in name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, Tensor) else None


def measure_ownership(model: nn.Module) -> Ownership:
    """Every expected place of `model`'s architecture: is it its own trainable, non-aliasing Parameter?"""
    names, ties = expected_parameters(model.config)
    declared = {frozenset(t) for t in ties}
    out, places = Ownership(), {}
    for name in names:
        t = lookup(model, name)
        if t is None:
            continue  # a missing weight is a state-dict error, not the optimizer's
        out.weights[name] = t.numel()
        if not isinstance(t, nn.Parameter):
            out.not_parameters.append(name)
        elif not t.requires_grad:
            out.frozen.append(name)
        if t.numel() > 1 and any(st == 0 and sz > 1 for st, sz in zip(t.stride(), t.shape)):
            out.overlapping.append(name)
        places.setdefault(t.untyped_storage().data_ptr(), []).append((name, t))
    for group in places.values():
        for names_sharing in _overlapping_groups(group):
            if frozenset(names_sharing) not in declared:
                out.shared.append(names_sharing)
    return out


def _elements(t: Tensor) -> Tensor:
    """The storage elements a tensor view covers, as indices into its storage."""
    size = t.untyped_storage().nbytes() // t.element_size()
    return torch.arange(size).as_strided(t.shape, t.stride(), t.storage_offset()).flatten()


def _span(t: Tensor) -> tuple[int, int]:
    """[first, last] storage element a view can touch."""
    last = t.storage_offset() + sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if n > 0)
    return t.storage_offset(), last


def _overlap(a: Tensor, b: Tensor) -> bool:
    """Do two views of one storage share an element? Same object: yes; disjoint spans: no; else exactly."""
    if a is b:
        return True
    (a0, a1), (b0, b1) = _span(a), _span(b)
    if a1 < b0 or b1 < a0:
        return False
    return bool(torch.isin(_elements(a), _elements(b)).any())


def _overlapping_groups(group: list[tuple[str, Tensor]]) -> list[list[str]]:
    """Names whose views of one storage share elements, grouped; disjoint slices of one tensor (a fused qkv
    split into q, k, v) own their memory and are fine. The same object counts as overlapping with itself."""
    if len(group) < 2:
        return []
    parent = list(range(len(group)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i
    for a in range(len(group)):
        for b in range(a + 1, len(group)):
            if _overlap(group[a][1], group[b][1]):
                parent[root(b)] = root(a)
    out: dict[int, list[str]] = {}
    for i, (name, _) in enumerate(group):
        out.setdefault(root(i), []).append(name)
    return [names for names in out.values() if len(names) > 1]


def _own_modules(model: nn.Module, paths: list[str] | None = None) -> None:
    """A module object serving two places (a block reusing its source's q_proj) becomes two modules."""
    paths = paths if paths is not None else [n for n, _ in reference_model(model.config).named_modules() if n]
    seen: set[int] = set()
    for path in paths:  # parents before children: a copied parent brings its own children
        parent_name, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, attr, None)
        if not isinstance(module, nn.Module):
            continue
        if id(module) in seen:
            module = copy.deepcopy(module)
            setattr(parent, attr, module)
        seen.add(id(module))


@torch.no_grad()
def own_tensors(model: nn.Module) -> nn.Module:
    """Give every expected place of `model` (a private copy) its own Parameter holding the same values, keeping
    declared ties: the function is unchanged and every check can measure every place separately."""
    names, ties = expected_parameters(model.config)
    _own_modules(model)
    return _own(model, names, {b: a for a, b in ties})


@torch.no_grad()
def own_block_tensors(block: nn.Module, cfg) -> nn.Module:
    """own_tensors for one block of a model of `cfg` (a private copy of it): every place its own Parameter."""
    prefix = "blocks.0."
    names = [n[len(prefix):] for n in expected_parameters(cfg)[0] if n.startswith(prefix)]
    paths = [n[len(prefix):] for n, _ in reference_model(cfg).named_modules() if n.startswith(prefix)]
    _own_modules(block, paths)
    return _own(block, names, {})


def _own(model: nn.Module, names: list[str], tied: dict[str, str]) -> nn.Module:
    seen: set[int] = set()
    for name in names:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        t = getattr(module, attr, None)
        if not isinstance(t, Tensor):
            continue
        if name in tied:
            setattr(module, attr, lookup(model, tied[name]))
            continue
        ptr = t.untyped_storage().data_ptr()
        if isinstance(t, nn.Parameter) and ptr not in seen and t.requires_grad and all(st for st in t.stride()):
            seen.add(ptr)
            continue
        seen.add(ptr)
        if attr in module._buffers:
            del module._buffers[attr]
        elif attr in module.__dict__ and not isinstance(t, nn.Parameter):
            delattr(module, attr)
        module._parameters[attr] = nn.Parameter(t.detach().clone().contiguous())
    return model
