"""The one error type for user mistakes, and the checks that raise it where a value enters.

A `UserError` is bad input (a flag, a config field, a file): the command line prints its message as
one line and exits with status 2. Anything else is a bug and keeps its traceback. Messages name the
place (file, flag or field), the bad value and what is accepted.
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from contextlib import contextmanager
from dataclasses import fields

MAX_SEED = 2**63 - 1  # seeds are signed 64-bit integers, as in OpenAI's API


class UserError(ValueError):
    """Bad input: the CLI shows the message (no traceback) and exits 2; a ValueError for library callers."""


def read_json(path, missing: str | None = None):
    """The JSON in file `path`: malformed JSON is a UserError naming the file; a missing file a
    FileNotFoundError saying `missing` (default: the OS's message)."""
    import json

    return _read_config(path, json.loads, json.JSONDecodeError, "not valid JSON", missing)


def read_toml(path, missing: str | None = None) -> dict:
    """The TOML in file `path`, with read_json's errors."""
    import tomllib

    return _read_config(path, tomllib.loads, tomllib.TOMLDecodeError, "invalid TOML", missing)


@contextmanager
def naming(path):
    """A UserError raised inside names the file the bad value came from: `with naming(path): cfg = ...`."""
    try:
        yield
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def _read_config(path, parse, syntax_error, problem: str, missing: str | None):
    """The one way a config file is read: config.json, run.toml, pipeline.toml, meta.json, tokenizer_config.json."""
    from pathlib import Path

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if missing is None:
            raise
        raise FileNotFoundError(missing) from None
    try:
        return parse(text)
    except syntax_error as e:
        raise UserError(f"{path}: {problem} ({e})") from None


def _accepts(kind, value) -> bool:
    """isinstance against an annotation: int, float, bool, str, list, tuple, dict and `X | Y | None` unions."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        return any(_accepts(k, value) for k in typing.get_args(kind))
    kind = typing.get_origin(kind) or kind
    if kind is type(None):
        return value is None
    if isinstance(value, bool):  # bool is an int subclass, but `true` is never a size
        return kind is bool
    if kind is float:  # an integer is a fine float (`lr = 1`)
        return isinstance(value, (int, float))
    if kind in (list, tuple):  # TOML and JSON have only arrays
        return isinstance(value, (list, tuple))
    return isinstance(value, kind)


def _type_name(kind) -> str:
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        return " or ".join(_type_name(k) for k in typing.get_args(kind))
    kind = typing.get_origin(kind) or kind
    return {type(None): "none", list: "a list", tuple: "a list", dict: "a table", int: "an integer", float: "a number",
            bool: "true or false", str: "a string"}.get(kind, getattr(kind, "__name__", str(kind)))


def check_types(obj, where: str) -> None:
    """Every field of dataclass `obj` holds a value of its annotated type, else a UserError naming it."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        if not _accepts(hints[f.name], value):
            raise UserError(f"{where}: {f.name} = {value!r} is not {_type_name(hints[f.name])}")


def check_keys(where: str, given, known, what: str = "key") -> None:
    """No key of `given` outside `known`; a typo gets the closest known name as a hint."""
    unknown = sorted(set(given) - set(known))
    if unknown:
        named = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(str(k), known, 1)) else repr(k)
                 for k in unknown]
        raise UserError(f"{where}: unknown {what} {', '.join(named)}; known: {', '.join(sorted(known))}")


def check_range(where: str, name: str, value, low=None, high=None, low_open=False, high_open=False) -> None:
    """`value` is a finite number within [low, high] (open ends where asked); None ends are unbounded."""
    ok = isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        raise UserError(f"{where}: {name} = {value!r}; expected a number {' and '.join(s for s in (lo, hi) if s)}")


def check_choice(where: str, name: str, value, choices) -> None:
    if value not in choices:
        raise UserError(f"{where}: {name} = {value!r}; expected one of {', '.join(map(str, choices))}")


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, seed: int | None = None) -> None:
    """The sampling knobs of `generate` and the CLI (the server's come checked by its request schema)."""
    check_range("sampling", "temperature", temperature, 0)
    if top_k is not None:
        check_range("sampling", "top_k", top_k, 1)
    if top_p is not None:
        check_range("sampling", "top_p", top_p, 0, 1, low_open=True)
    if seed is not None and not (isinstance(seed, int) and 0 <= seed <= MAX_SEED):
        raise UserError(f"sampling: seed = {seed!r}; expected an integer from 0 to 2**63-1")


def device(name, where: str = "device"):
    """torch.device(name), refusing names torch does not know and GPUs this machine does not have."""
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"{where} {name!r}: expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"{where} {name!r}: this machine has no CUDA GPU (or torch was built without CUDA); "
                            "use cpu")
        if dev.index is not None and dev.index >= count:
            raise UserError(f"{where} {name!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    return dev
