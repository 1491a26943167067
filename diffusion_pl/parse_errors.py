"""One-line command-line parse errors: jsonargparse's multi-line reports, condensed.

jsonargparse reports a bad option of a LightningCLI model or data class as ~10 lines about Union subtypes, in which
the fact the user needs ("Option 'lrr' is not accepted") is buried. :func:`condense_parse_error` reduces the shapes
it knows to one line that names the key, the value, what is expected and (for typos) the closest valid name::

    model.init_args.lrr: DiffusionModule has no option 'lrr' (did you mean 'lr'?); list its options with
    `diffusion-pl fit --model.help DiffusionModule`

A message of any other shape is returned as None and printed as jsonargparse wrote it (nothing is lost). The parsers
run with ``exit_on_error=False`` (jsonargparse raises ArgumentError) and :func:`parse_error` turns the error into a
UserInputError; with ``DIFFUSION_PL_DEBUG=1`` jsonargparse prints its full report itself.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from collections.abc import Iterable

from jsonargparse import ArgumentParser

from diffusion_pl.errors import UserInputError
from diffusion_pl.lightning.checkpoints import RENAMED_HPARAMS
from diffusion_pl.utils.imports import import_object

# Where a short class name given as --model / --data is looked up (LightningCLI resolves names from these too).
CLASS_MODULES = ("diffusion_pl.lightning", "diffusion_pl.data")

_PARSER_KEY = re.compile(r'Parser key "(?P<key>[^"]+)":')
_CLASS_PROBLEM = re.compile(r"Problem with given class_path '(?P<path>[\w.]+)':")
_NOT_ACCEPTED = re.compile(r"Option '(?P<option>[^']+)' is not accepted")
_EXPECTED_GOT = re.compile(r"Expected a (?P<type>.+?)\. Got value: (?P<value>.*)$", re.M)
_UNION_EXPECTED = re.compile(r"^\s*- Expected a (?P<type>.+?)\s*$", re.M)
_GIVEN_VALUE = re.compile(r"^\s*Given value: (?P<value>.*)$", re.M)
_SUBTYPES = re.compile(r"Subtypes: \[<class '(?P<base>[\w.]+)'>")
_NOT_A_CLASS = re.compile(
    r"Expected a dot import path string: (?P<value>\S+)|Expected a path but (?P<value2>\S+) either"
)
_UNRECOGNIZED = re.compile(r"^unrecognized arguments: (?P<args>.+)$")
_REQUIRED = re.compile(r"^the following arguments are required: (?P<keys>.+)$")
_MISSING_FILE = re.compile(r'^Parser key "(?P<key>[^"]+)":\s*File does not exist: (?P<path>.+)$', re.S)


def _did_you_mean(word: str, choices: Iterable[str], quote: str = "'", cutoff: float = 0.6) -> str:
    """The suffix ``(did you mean 'x'?)`` for the closest of ``choices`` (case-insensitive; a choice that contains
    ``word``, e.g. Cifar10 -> CIFAR10DataModule, counts as close), or an empty string when none is close."""
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    key = word.lower()
    containing = [c for c in choices if len(key) >= 3 and key in c.lower()]
    match = difflib.get_close_matches(key, list(lowered), n=1, cutoff=cutoff)
    best = containing[0] if len(containing) == 1 else (lowered[match[0]] if match else None)
    return f" (did you mean {quote}{best}{quote}?)" if best else ""


def _init_options(cls) -> list[str]:
    """The options a config gives ``cls``, read as jsonargparse reads them (with those that ``**kwargs`` passes on to
    a base class, e.g. a DataModule's loader options); the constructor's own parameters if jsonargparse cannot."""
    parser = ArgumentParser(exit_on_error=False)
    try:
        parser.add_class_arguments(cls, "options")
        return list(parser.get_defaults().options.as_dict())
    except Exception:  # a class jsonargparse cannot read: fall back to the signature
        pass
    try:
        params = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _literal_values(type_text: str) -> list[str] | None:
    """``typing.Literal['a', 'b']`` / ``Literal[64, 32]`` -> ["'a'", "'b'"] / ["64", "32"]; None for other types."""
    m = re.fullmatch(r"(?:typing\.)?Literal\[(?P<values>.*)\]", type_text.strip())
    return [v.strip() for v in m.group("values").split(",")] if m else None


def _type_name(type_text: str) -> str:
    """``<class 'float'>`` -> float, ``typing.Optional[int]`` -> Optional[int], Literal -> one of ..."""
    values = _literal_values(type_text)
    if values is not None:
        return "one of " + ", ".join(values)
    text = re.sub(r"<class '(?:[\w]+\.)*(\w+)'>", r"\1", type_text)
    return text.replace("typing.", "")


def _expected(types: list[str], value: str) -> str:
    """``expected X, got 'v'`` (with a did-you-mean among literal values)."""
    literals = [v for t in types for v in (_literal_values(t) or [])]
    others = [_type_name(t) for t in types if _literal_values(t) is None and "NoneType" not in t]
    parts = (["one of " + ", ".join(dict.fromkeys(literals))] if literals else []) + others
    hint = _did_you_mean(value, [v.strip("'\"") for v in literals]) if literals else ""
    if any(p.split("[")[0] in ("list", "tuple", "Sequence") for p in others):
        numbers = re.fullmatch(r"\s*-?[\d.]+(\s*,\s*-?[\d.]+)*\s*", value)
        hint += f" (a list is written in brackets: [{value.strip()}])" if numbers else " (a list is written [1, 2])"
    return f"expected {' or '.join(parts) or 'another value'}, got {value!r}{hint}"


def _class_candidates(base_path: str) -> list[str]:
    base = import_object(base_path)
    names = []
    for module_name in CLASS_MODULES:
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name, None)
            if isinstance(obj, type) and isinstance(base, type) and issubclass(obj, base):
                names.append(name)
    return names


def _class_option_error(top: str, class_path: str, block: str, prog: str) -> str | None:
    cls_name = class_path.rpartition(".")[2]
    unknown = _NOT_ACCEPTED.search(block)
    if unknown:
        option = unknown.group("option")
        cls = import_object(class_path)
        options = _init_options(cls) if cls is not None else []
        renamed = RENAMED_HPARAMS.get(option)
        renamed_hint = f" (did you mean {renamed!r}? {option!r} was renamed)"
        hint = renamed_hint if renamed in options else _did_you_mean(option, options)
        return (
            f"{top}.init_args.{option}: {cls_name} has no option {option!r}{hint}; list its options with "
            f"`{prog} --{top}.help {cls_name}`"
        )
    keys = list(_PARSER_KEY.finditer(block))
    if keys:  # the innermost (last) key is the one at fault
        rest = block[keys[-1].end() :]
        got = _EXPECTED_GOT.search(rest)
        if got:
            key = f"{top}.init_args.{keys[-1].group('key')}"
            given = _GIVEN_VALUE.search(rest)
            where = f" (in {given.group('value').strip()})" if given and "NestedArg" not in given.group("value") else ""
            return f"{key}: {_expected([got.group('type')], got.group('value'))}{where}"
    return None


def condense_parse_error(
    message: str, prog: str = "diffusion-pl", options: Iterable[str] = (), key_prefix: str = ""
) -> str | None:
    """One line for a jsonargparse parse error of a known shape, else None (see the module docstring).

    ``prog`` is the command as typed (``diffusion-pl fit``); ``options`` the parser's option strings, for a
    did-you-mean after an unrecognized option; ``key_prefix`` is put before a key in the message ("--" where keys
    are only command-line options, "" where they are config keys too)."""
    message = message.strip()
    unrecognized = _UNRECOGNIZED.match(message)
    if unrecognized:
        first = unrecognized.group("args").split()[0]
        name = first.split("=", 1)[0]
        # a stricter cutoff: long dotted option names share much by chance (--optimizer vs --trainer)
        hint = _did_you_mean(name, [o for o in options if o.startswith("--")], quote="", cutoff=0.8)
        return f"unrecognized option {unrecognized.group('args')}{hint}; `{prog} --help` lists the options"
    required = _REQUIRED.match(message)
    if required:  # LightningCLI names them with the subcommand in front: validate.model
        command = prog.split()[-1]
        keys = ", ".join("--" + k.strip().removeprefix(f"{command}.") for k in required.group("keys").split(","))
        from_ckpt = " (or --ckpt_path: the checkpoint holds them)" if command in ("validate", "test") else ""
        return f"missing {keys}: give them on the command line or in a --config file{from_ckpt}"
    missing = _MISSING_FILE.match(message)
    if missing:
        return f"--{missing.group('key')} {missing.group('path').strip().strip(chr(39))}: no such file"
    top_match = _PARSER_KEY.match(message)
    if not top_match:
        return None
    top = key_prefix + top_match.group("key")
    problem = _CLASS_PROBLEM.search(message)
    if problem:
        block = message[problem.end() :]
        block = block.split("\n    - ", 1)[0]  # up to the next Union alternative
        return _class_option_error(top, problem.group("path"), block, prog)
    given = _GIVEN_VALUE.search(message)
    value = given.group("value").strip() if given else ""
    not_a_class = _NOT_A_CLASS.search(message)
    if not_a_class:
        wrong = not_a_class.group("value") or not_a_class.group("value2") or value
        base = _SUBTYPES.search(message)
        base_path = base.group("base") if base else ""
        candidates = _class_candidates(base_path) if base_path else []
        hint = _did_you_mean(wrong, candidates, quote="")
        base_name = base_path.rpartition(".")[2] or "class"
        if candidates:
            fix = f"give one of diffusion-pl's classes ({', '.join(candidates)}) or a full import path"
        else:
            fix = "give the class's full import path (package.module.ClassName)"
        return f"{top}: no {base_name} named {wrong!r}{hint}; {fix}"
    if "Does not validate against any of the Union subtypes" in message:
        types = _UNION_EXPECTED.findall(message)
        if types and len(types) == len(re.findall(r"^\s*- ", message, re.M)):
            return f"{top}: {_expected(types, value)}"
        return None
    got = _EXPECTED_GOT.search(message)
    if got and len(message.splitlines()) == 2:  # Parser key "k":\n  Expected a T. Got value: v
        return f"{top}: {_expected([got.group('type')], got.group('value'))}"
    return None


def parse_error(error: Exception, prog: str, options: Iterable[str] = (), key_prefix: str = "") -> UserInputError:
    """jsonargparse's parse error (ArgumentError) as a UserInputError: one line for a known shape (see
    condense_parse_error), jsonargparse's own message otherwise."""
    message = str(error)
    return UserInputError(condense_parse_error(message, prog, options, key_prefix) or message)
