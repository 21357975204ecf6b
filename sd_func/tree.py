"""Pytree helpers: nested dicts of tensors, addressed by "/"-joined paths.

Built on torch.utils._pytree so that torch.func and torch.compile see the same
structure. Paths mirror the module names of diffusers/transformers state dicts
("down_blocks/0/resnets/0/conv1/weight"), which makes weight import a rename of
"." to "/" and nothing else. Regex rules over paths (big_vision style) pick
frozen parameters, weight-decay masks and learning-rate groups.
"""

import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.utils._pytree as pytree

SEP = "/"


def tree_map(fn: Callable, tree: Any, *rest: Any) -> Any:
    """Map fn over the leaves of one or more trees of the same structure."""
    return pytree.tree_map(fn, tree, *rest)


def leaves(tree: Any) -> list:
    return pytree.tree_leaves(tree)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> flat {"a/b/c": leaf}, in insertion order."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        path = f"{prefix}{SEP}{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, path))
        else:
            out[path] = v
    return out


def unflatten(flat: dict[str, Any], sep: str = SEP) -> dict:
    """Flat {"a/b/c": leaf} (or any separator, e.g. "." for state dicts) -> nested dict."""
    out: dict = {}
    for path, v in flat.items():
        node = out
        parts = path.split(sep)
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"path {path!r} conflicts with a leaf at {p!r}")
        node[parts[-1]] = v
    return out


def from_state_dict(state_dict: dict[str, torch.Tensor]) -> dict:
    """A torch state dict ("a.b.weight") as a params tree."""
    return unflatten(dict(state_dict), sep=".")


def to_state_dict(tree: dict) -> dict[str, torch.Tensor]:
    """A params tree as a torch state dict ("a.b.weight")."""
    return {k.replace(SEP, "."): v for k, v in flatten(tree).items()}


def map_with_path(fn: Callable[[str, Any], Any], tree: dict) -> dict:
    """Map fn(path, leaf) over a nested dict, keeping its structure."""
    return unflatten({p: fn(p, v) for p, v in flatten(tree).items()})


def match(rules: Iterable[tuple[str, Any]], path: str, default: Any = None) -> Any:
    """The value of the first (regex, value) rule whose regex fully matches path."""
    for pattern, value in rules:
        if re.fullmatch(pattern, path):
            return value
    return default


def map_with_rules(fn: Callable[[Any, Any], Any], tree: dict, rules, default=None) -> dict:
    """fn(leaf, rule_value) for each leaf, the rule value found by `match`."""
    return map_with_path(lambda p, v: fn(v, match(rules, p, default)), tree)


def cast(tree: Any, dtype: torch.dtype) -> Any:
    """Floating-point leaves to dtype; integer leaves untouched."""
    return tree_map(lambda x: x.to(dtype) if torch.is_tensor(x) and x.is_floating_point() else x, tree)


def to(tree: Any, device=None, dtype=None) -> Any:
    def move(x):
        if not torch.is_tensor(x):
            return x
        if dtype is not None and x.is_floating_point():
            return x.to(device=device, dtype=dtype)
        return x.to(device=device)
    return tree_map(move, tree)


def num_params(tree: Any) -> int:
    return sum(x.numel() for x in leaves(tree) if torch.is_tensor(x))


def global_norm(tree: Any) -> torch.Tensor:
    """sqrt(sum of squares) over all leaves, in float32."""
    sq = [x.float().pow(2).sum() for x in leaves(tree)]
    return torch.stack(sq).sum().sqrt() if sq else torch.zeros(())


def diff(expected: dict, got: dict) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, wrong_shape) paths between two trees or flat dicts."""
    e = expected if all(not isinstance(v, dict) for v in expected.values()) else flatten(expected)
    g = got if all(not isinstance(v, dict) for v in got.values()) else flatten(got)
    missing = [k for k in e if k not in g]
    unexpected = [k for k in g if k not in e]
    wrong = [f"{k}: expected {tuple(e[k].shape)}, got {tuple(g[k].shape)}"
             for k in e if k in g and tuple(e[k].shape) != tuple(g[k].shape)]
    return missing, unexpected, wrong
