"""The command line of a command function: one flat option per field of its option groups (one --help section per
group, see diffusion_pl.commands.options) and per plain parameter, plus -c/--config and --print_config (jsonargparse).

    def sample(model: ModelSource, launch: Launch, out_dir: str = "samples") -> ...
    ->  diffusion-pl sample [-c CONFIG] [--ckpt ...] ... [--devices ...] ... [--out_dir ...]
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser


def option_groups(function: Callable) -> dict[str, type]:
    """The parameters of ``function`` typed as an option group (a dataclass): name -> class."""
    hints = typing.get_type_hints(function)
    return {
        name: hints[name]
        for name in inspect.signature(function).parameters
        if dataclasses.is_dataclass(hints.get(name)) and isinstance(hints[name], type)
    }


def description(function: Callable) -> str:
    """The docstring of ``function`` up to its parameter list: the whole description, every paragraph."""
    text = inspect.getdoc(function) or ""
    for marker in ("\nArgs:", "\n:param"):
        text = text.split(marker)[0]
    return text.strip()


def build_parser(function: Callable, prog: str, parser_class: type[ArgumentParser] = ArgumentParser) -> ArgumentParser:
    """A parser with the options of ``function``: its option groups' fields, then its own parameters."""
    parser = parser_class(prog=prog, usage=f"{prog} [options]", description=description(function))
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="a YAML file of options (as --print_config)")
    groups = option_groups(function)
    for cls in groups.values():
        parser.add_class_arguments(cls, None, as_group=True)
    parser.add_function_arguments(function, None, as_group=False, skip=set(groups))
    return parser


def grouped(function: Callable, values: Any) -> dict[str, Any]:
    """Keyword arguments of ``function`` from flat option values (a dict or a parsed namespace, named as on the
    command line): each option group built from its fields; what is not given keeps its default."""
    groups = option_groups(function)
    names = set(inspect.signature(function).parameters) - set(groups)
    known = names | {f.name for cls in groups.values() for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in dict(values) if k not in known and k != "config")
    if unknown:
        raise TypeError(f"{function.__name__}() has no options {unknown}")
    kwargs: dict[str, Any] = {
        name: cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})
        for name, cls in groups.items()
    }
    kwargs.update((name, values[name]) for name in names if name in values)
    return kwargs


def call_with_args(function: Callable, args: list[str], parser: ArgumentParser) -> Any:
    """Parse ``args`` with ``parser`` (:func:`build_parser` of ``function``) and call ``function`` with its option
    groups built from them."""
    return function(**grouped(function, parser.parse_args(args).as_dict()))
