"""What a module call takes and returns, walked one way everywhere: arguments by name, tensors inside containers.

One set of rules for nested values, used by every part of the package that looks inside a call's arguments or
outputs (cutting a batch's rows, merging outputs made in parts, copying arguments for a watched call, measuring):

- a tensor is a leaf that the function sees;
- tuples and lists are walked item by item and rebuilt as their own type; a named tuple is rebuilt field by field
  (`type(value)(*items)`), so it stays a named tuple;
- dicts are walked value by value and rebuilt as their own type (diffusers' `BaseOutput`, a dict subclass taking
  its fields as keywords, stays a `BaseOutput`);
- anything else (numbers, strings, None, other objects) passes unchanged and is never looked inside.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import torch


def rebuild(container: Any, items: list[Any] | dict[Any, Any]) -> Any:
    """A container of `container`'s type holding `items` (a list for tuples and lists, a dict for dicts)."""
    if isinstance(container, dict):
        try:
            return type(container)(**items)  # BaseOutput and other dataclass-like dicts take keywords
        except TypeError:  # a plain dict (or subclass) with keys that are not identifiers
            return type(container)(items)
    if hasattr(container, "_fields"):  # a named tuple
        return type(container)(*items)
    return type(container)(items)


def map_tensors(function: Callable[[torch.Tensor], Any], value: Any) -> Any:
    """`value` with `function` applied to every tensor in it (see the module docstring for the rules)."""
    if isinstance(value, torch.Tensor):
        return function(value)
    if isinstance(value, dict):
        return rebuild(value, {key: map_tensors(function, item) for key, item in value.items()})
    if isinstance(value, (list, tuple)):
        return rebuild(value, [map_tensors(function, item) for item in value])
    return value


def tensors_in(value: Any) -> list[torch.Tensor]:
    """The tensors in `value`, in order (depth first, dicts in their key order)."""
    found: list[torch.Tensor] = []
    map_tensors(found.append, value)
    return found


def map_together(function: Callable[[list[Any]], Any], values: Sequence[Any]) -> Any:
    """One value of the structure that every one of `values` shares, each leaf `function(the values' leaves at that
    place)`. Leaves are tensors and the plain values the rules pass unchanged (numbers, strings, None); `function`
    sees all of them. A container of another kind than the rules know is a TypeError naming it."""
    first = values[0]
    if isinstance(first, dict):
        return rebuild(first, {key: map_together(function, [value[key] for value in values]) for key in first})
    if isinstance(first, (list, tuple)):
        return rebuild(first, [map_together(function, [value[i] for value in values]) for i in range(len(first))])
    if first is None or isinstance(first, (torch.Tensor, str, int, float, bool)):
        return function(list(values))
    raise TypeError(f"a {type(first).__name__} is none of the containers map_together knows (tuples, lists, dicts)")


def parameter_names(function: Callable[..., Any]) -> list[str]:
    """The names of a callable's parameters, in order (a bound method's without `self`); [] where Python cannot
    tell (some builtins)."""
    try:
        return list(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return []


def argument(name: str | None, parameters: Sequence[str], args: tuple, kwargs: dict, default: Any = None) -> Any:
    """The argument `name` of a call made with `args` and `kwargs` to a function whose parameters are `parameters`:
    by keyword, else by position; `default` where the call does not pass it (or `name` is None)."""
    if name is None:
        return default
    if name in kwargs:
        return kwargs[name]
    if name in parameters:
        position = list(parameters).index(name)
        if position < len(args):
            return args[position]
    return default
