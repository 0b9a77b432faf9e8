"""Option defaults read from the functions and model classes the commands call.

A command never restates a default: ``scale --max-iter`` defaults to ``SCALE.max_iter``,
``--help`` shows that value, and a change in the model is a change in the CLI. A model
parameter whose default is ``None`` ("the model decides") shows no default and passes
``None``. The target is named as ``"module:qualname"`` and imported only when a default is
needed (the command runs or its ``--help`` is shown), so ``scatac-dist info`` does not
import torch.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable
from typing import Any

import click

__all__ = ["default_of", "resolve", "option_from", "DefaultFrom"]


def resolve(target: Any) -> Any:
    """``target`` itself, or the object a ``"package.module:Qual.name"`` string names."""
    if not isinstance(target, str):
        return target
    module, _, qualname = target.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def default_of(target: Any, name: str) -> Any:
    """The default of parameter (or dataclass field) ``name`` of ``target``.

    Parameters
    ----------
    target
        A class (a dataclass's fields, or its ``__init__``'s parameters), a function, a
        dataclass instance (its field's value: a preset such as ``scatac_dist.demo.DEMO_ATLAS``),
        or a ``"module:qualname"`` string naming one.
    name
        The parameter.

    Raises
    ------
    TypeError
        When ``target`` has no parameter ``name`` or it has no default: a renamed model
        parameter breaks the CLI loudly (and its tests), never silently.
    """
    obj = resolve(target)
    where = getattr(obj, "__qualname__", repr(obj))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        if name not in {f.name for f in dataclasses.fields(obj)}:
            raise TypeError(f"{type(obj).__qualname__} has no field {name!r}")
        return getattr(obj, name)
    if isinstance(obj, type) and dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            if f.name == name:
                if f.default is not dataclasses.MISSING:
                    return f.default
                if f.default_factory is not dataclasses.MISSING:
                    return f.default_factory()
                raise TypeError(f"{where}.{name} has no default")
        raise TypeError(f"{where} has no field {name!r}")
    param = inspect.signature(obj).parameters.get(name)
    if param is None:
        raise TypeError(f"{where} has no parameter {name!r}")
    if param.default is inspect.Parameter.empty:
        raise TypeError(f"{where}({name}) has no default")
    return param.default


class DefaultFrom(click.Option):
    """A click option whose default is ``default_of(target, param)``, read when needed.

    ``param`` defaults to the option's own name (``--max-iter`` -> ``max_iter``);
    ``show_default`` defaults to true.
    """

    def __init__(self, *args: Any, target: Any, param: str | None = None, **kwargs: Any):
        kwargs.setdefault("show_default", True)
        super().__init__(*args, **kwargs)
        self.target = target
        self.param = param or self.name

    @property
    def model_default(self) -> Any:
        return default_of(self.target, self.param)

    def get_default(self, ctx: click.Context, call: bool = True) -> Any:
        if ctx.default_map is not None and self.name in ctx.default_map:
            return super().get_default(ctx, call=call)
        return self.model_default


def option_from(target: Any) -> Callable[..., Callable]:
    """A ``click.option`` factory whose options take their defaults from ``target``.

    ``option_from("scatac_dist.models:SCALE")("--max-iter", type=int, help=...)`` is
    ``--max-iter`` with default ``SCALE.max_iter``; pass ``param=`` when the option's name
    differs from the parameter's. Give ``type=`` for non-string options: it cannot be
    inferred from a default that is not read yet.
    """

    def option(*decls: str, **kwargs: Any) -> Callable:
        return click.option(*decls, cls=DefaultFrom, target=target, **kwargs)

    return option
