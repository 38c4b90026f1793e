"""Split a model into ordered HiFT units and those into groups.

Unit 0 holds the input embeddings, then one unit per transformer block, and the last unit the
final norm and the head. Discovery finds the block list as the largest ``nn.ModuleList`` of
same-class modules; users of other architectures pass one name pattern per unit instead.
"""
from __future__ import annotations

import fnmatch
import random
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Unit:
    """One unit: a name for logs and its trainable parameters, in model order."""

    name: str
    params: list[tuple[str, nn.Parameter]] = field(default_factory=list)

    @property
    def numel(self) -> int:
        """Number of scalar parameters in the unit."""
        return sum(param_numel(p) for _, p in self.params)


def param_numel(p: nn.Parameter) -> int:
    """Elements of a parameter, also when ZeRO-3 has partitioned it (its data is then empty)."""
    return getattr(p, "ds_numel", None) or p.numel()


FROZEN_BY_HIFT = "_hift_frozen"  # set on parameters HiFT froze, so a new wrapper still trains them


def freeze(params: list[nn.Parameter]) -> None:
    """Freeze parameters HiFT trains group by group (marked, so a new wrapper still finds them trainable)."""
    for p in params:
        setattr(p, FROZEN_BY_HIFT, True)
        p.requires_grad_(False)
        p.grad = None


def shared_device_and_dtype(params: list[nn.Parameter]) -> tuple[torch.device, torch.dtype]:
    """The one device and float dtype every trainable parameter shares (ZeRO-3: of its partition)."""
    devices = {p.device for p in params}
    if len(devices) != 1:
        raise ValueError(f"HiFT needs every trainable parameter on one device, found {sorted(map(str, devices))}")
    dtypes = {p.dtype for p in params}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise ValueError(f"trainable parameters must share one float dtype, found {sorted(map(str, dtypes))}")
    return devices.pop(), dtypes.pop()


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) pairs of the model that train, each shared parameter listed once."""
    named = list(model.named_parameters())
    if not named:
        raise ValueError(f"{type(model).__name__} has no parameters, so HiFT has nothing to train; pass the model to "
                         "fine-tune (its weights loaded), not an empty or parameter-free module")
    params = [(n, p) for n, p in named if p.requires_grad or getattr(p, FROZEN_BY_HIFT, False)]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters (every requires_grad is False); "
                         "unfreeze the parameters HiFT should train before building the optimizer")
    return params


def _find_block_list(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    stacks = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) < 1:
            continue
        if len({type(c) for c in mod}) != 1:
            continue
        size = sum(param_numel(p) for p in mod.parameters())
        if size:
            stacks.append((size, name, mod))
    if not stacks:
        return None
    size, name, mod = max(stacks, key=lambda t: t[0])
    # A second stack of comparable size (an encoder-decoder's encoder, a vision tower) would
    # otherwise land whole in the head unit: the split would be silently lopsided.
    rivals = [(n, m) for s, n, m in stacks if s >= size / 2 and n != name
              and not n.startswith(name + ".") and not name.startswith(n + ".")]
    if rivals:
        found = ", ".join(f"{n} ({len(m)} blocks)" for n, m in [(name, mod), *rivals])
        raise ValueError(f"{type(model).__name__} has several stacks of transformer blocks: {found} (an "
                         "encoder-decoder?); automatic unit discovery handles one stack. Pass units=[...] (hift "
                         "config 'units'), one module-name pattern per unit in bottom-to-top order, e.g. "
                         "['shared|*embed*', 'encoder.block.0', ..., 'decoder.block.0', ..., '*final_layer_norm|lm_head']")
    return name, mod


def _is_embedding(module_name: str, module: nn.Module) -> bool:
    # nn.Embedding covers token/position tables (and their subclasses such as OPT's positional
    # table); BERT-style models keep the embedding LayerNorm inside an "embeddings" module.
    return isinstance(module, nn.Embedding) or any(part.endswith("embeddings") for part in module_name.split("."))


def discover_units(model: nn.Module) -> list[Unit]:
    """Units of a transformer model: embeddings, one per block, then final norm + head."""
    params = trainable_parameters(model)  # first: a model without parameters has no blocks to find either
    found = _find_block_list(model)
    if found is None:
        raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}: no nn.ModuleList of "
                         "identical blocks; pass units=[...] (hift config 'units'), one module-name pattern per "
                         "unit in bottom-to-top order, e.g. ['embed', 'layers.0', 'layers.1', 'norm|head']")
    block_prefix, blocks = found
    owner = {}
    for mod_name, mod in model.named_modules():
        for p_name, _ in mod.named_parameters(recurse=False):
            owner.setdefault(f"{mod_name}.{p_name}" if mod_name else p_name, (mod_name, mod))
    embed = Unit("embeddings")
    layer_units = [Unit(f"{block_prefix}.{i}") for i in range(len(blocks))]
    head = Unit("head")
    for name, p in params:
        if name.startswith(block_prefix + "."):
            idx = int(name[len(block_prefix) + 1:].split(".", 1)[0])
            layer_units[idx].params.append((name, p))
        elif _is_embedding(*owner[name]):
            embed.params.append((name, p))
        else:
            head.params.append((name, p))
    return [u for u in [embed, *layer_units, head] if u.params]


def _matches(pattern: str, name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, alt) or fnmatch.fnmatchcase(name, alt + ".*")
               for alt in pattern.split("|"))


def units_from_patterns(model: nn.Module, patterns: list[str]) -> list[Unit]:
    """Units given by one glob pattern per unit ("a|b" for alternatives), matched on parameter names."""
    if not isinstance(patterns, (list, tuple)) or not patterns or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"units must be a non-empty list of name patterns (strings), got {patterns!r}")
    units = [Unit(p) for p in patterns]
    missing, doubled = [], []
    for name, p in trainable_parameters(model):
        hits = [u for u in units if _matches(u.name, name)]
        if not hits:
            missing.append(name)
        elif len(hits) > 1:
            doubled.append(f"{name} (matched by {', '.join(repr(u.name) for u in hits)})")
        else:
            hits[0].params.append((name, p))
    if missing:
        raise ValueError(f"units patterns leave {len(missing)} trainable parameter(s) out, e.g. {missing[:5]}; "
                         "add a pattern for them or freeze them (requires_grad=False) before building HiFT")
    if doubled:
        raise ValueError(f"parameters matched by more than one units pattern: {doubled[:5]}; "
                         "make the patterns disjoint so every parameter belongs to exactly one unit")
    empty = [u.name for u in units if not u.params]
    if empty:
        raise ValueError(f"units pattern(s) {empty} match no trainable parameter; remove or fix them")
    return units


def model_groups(model: nn.Module, patterns: list[str] | None, group_size: int | None, num_groups: int | None,
                 shuffle_seed: int | None = None) -> tuple[list[Unit], list[list[Unit]]]:
    """The model's units (discovered, or one per name pattern) and their groups (``group_size`` 1 if neither is set).

    ``shuffle_seed`` (strategy "shuffled"): the groups are cut from the units in ``shuffled_units`` order; the
    units returned stay in model order.
    """
    units = units_from_patterns(model, patterns) if patterns is not None else discover_units(model)
    ordered = units if shuffle_seed is None else shuffled_units(units, shuffle_seed)
    return units, group_units(ordered, None if num_groups else group_size or 1, num_groups)


def shuffled_units(units: list[Unit], seed: int) -> list[Unit]:
    """The units shuffled once by a generator seeded with ``seed``: the official HiFT code's "random" order."""
    # Official HiFT shuffles its unit list once for the whole run and groups consecutive units of that list
    # (neighbours in the list, not in the model). A string seed hashes the same in every process and rank.
    out = list(units)
    random.Random(f"hift-units-{seed}").shuffle(out)
    return out


def group_units(units: list[Unit], group_size: int | None = 1, num_groups: int | None = None) -> list[list[Unit]]:
    """Consecutive units split into groups of ``group_size``, or into ``num_groups`` near-equal groups."""
    n = len(units)
    if group_size is not None and num_groups is not None:
        raise ValueError(f"set either group_size ({group_size}) or num_groups ({num_groups}), not both")
    if num_groups is not None:
        if not isinstance(num_groups, int) or not 1 <= num_groups <= n:
            raise ValueError(f"num_groups={num_groups!r} must be an integer between 1 and the unit count {n}")
        bounds = [round(i * n / num_groups) for i in range(num_groups + 1)]
        return [units[bounds[i]:bounds[i + 1]] for i in range(num_groups)]
    if group_size is None:
        group_size = 1
    if not isinstance(group_size, int) or not 1 <= group_size <= n:
        raise ValueError(f"group_size={group_size!r} must be an integer between 1 and the unit count {n} "
                         "(units: embeddings, each block, head)")
    return [units[i:i + group_size] for i in range(0, n, group_size)]
