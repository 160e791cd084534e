"""Typed settings, declared once, and everything derived from the declaration.

A command's settings are a dataclass mixing in :class:`Settings`, each field declared with :func:`setting`
(default, help, valid values, flag, ``--help`` group). From that one declaration come

- the checks: :meth:`Settings.validate` runs on construction and refuses a bad value with one line
  naming the setting (its flag and its name), the value and what would be valid;
- the command line: :func:`add_arguments` derives every flag (name, type, choices, help with the
  default), :func:`from_args` builds the dataclass from what the user gave, :func:`to_flags` gives the
  flags back;
- the files: a run's ``config.json`` is :meth:`Settings.to_dict`; TOML tables and JSON records are read
  with :meth:`Settings.from_dict`, which refuses unknown keys;
- the README's flag tables (:func:`flags_markdown`).

A setting's choices may be a :class:`RegistryNames`: the names of the registry (a dict name ->
implementation) in the module that implements them, read when first needed, so that declaring a
setting, or a command line offering it, never imports that module.

em-unet's own settings are declared in :mod:`em_unet.config`. This module imports nothing of em_unet but
:mod:`em_unet.errors`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import re
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import field, fields
from pathlib import Path

from em_unet.errors import ConfigError

# ---------------------------------------------------------------- declaring a setting


class RegistryNames(Sequence):
    """The names in a registry of another module (a dict name -> implementation, or any iterable of names),
    read when first used.

    ``RegistryNames("em_unet.training.losses", "LOSSES")`` behaves as ``tuple(LOSSES)`` of that module, with
    ``first`` before the registry's names (e.g. ``("auto",)``, a choice that picks one of them), and equals
    that tuple; but the module is imported only when the names are first read: when a value is checked
    against them, or an error, ``--help`` or the README's tables list them. argparse takes it as ``choices``.
    """

    def __init__(self, module: str, registry: str, first: Iterable[str] = ()):
        self.module, self.registry, self.first = module, registry, tuple(first)
        self._names: tuple | None = None

    def names(self) -> tuple:
        if self._names is None:
            # Imported here, on first use, on purpose: the registries' modules import Keras and TensorFlow,
            # which the commands that never read these names (evaluate, segment, plot; building any
            # command's parser) must not load.
            registry = getattr(importlib.import_module(self.module), self.registry)
            self._names = (*self.first, *registry)
        return self._names

    def __getitem__(self, index):
        return self.names()[index]

    def __len__(self) -> int:
        return len(self.names())

    def __iter__(self) -> Iterator:
        return iter(self.names())

    def __contains__(self, value) -> bool:
        return value in self.names()

    def __eq__(self, other) -> bool:
        if isinstance(other, (tuple, RegistryNames)):
            return self.names() == tuple(other)
        return NotImplemented

    __hash__ = None  # a hash equal to its tuple's would read the names

    def __repr__(self) -> str:
        first = f", first={self.first!r}" if self.first else ""
        return f"{type(self).__name__}({self.module!r}, {self.registry!r}{first})"


# The sections of --help (and the README) a setting can be filed under; "options": argparse's own.
GROUPS = {
    "data": "data",
    "model": "model",
    "optimisation": "optimisation",
    "augmentation": "augmentation",
    "runtime": "runtime",
    "outputs": "outputs",
    "prediction": "prediction",
    "segmentation": "segmentation (seeded watershed + agglomeration; defaults measured on ISBI 2012 slices 15-19)",
    "mutex": "segmentation of affinity maps (mutex watershed)",
    "search": "search",
    "volumes": "large volumes (HDF5, Zarr, OME-Zarr inputs or outputs: worked on block by block on a Dask cluster)",
    "distributed": "distributed tuning (KerasTuner chief and workers: --workers on this machine, or --tuner-id, "
    "--oracle-ip, --oracle-port across machines; default: the KERASTUNER_* variables, else one process)",
    "study": "study",
    "options": "options",
}


def setting(
    default=dataclasses.MISSING,
    help: str = "",
    *,
    flag: str | None = None,
    group: str = "options",
    choices: Sequence[str] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    below: float | None = None,
    metavar: str | None = None,
    parse: Callable[[str], object] | None = None,
    default_text: str | None = None,
    positional: bool = False,
    cli: bool = True,
    toml: bool = True,
    bare: str | None = None,
):
    """A dataclass field with everything the CLI, the checks and the docs need.

    ``choices``: a tuple, or a :class:`RegistryNames`. ``minimum``/``maximum`` are inclusive bounds,
    ``above``/``below`` exclusive ones. ``parse`` turns the command line's (or a TOML's) text into the
    value (e.g. ``"15-19"`` into ``(15, 19)``).
    ``default_text`` is what ``--help`` says for the default instead of the value (e.g. for None).
    ``cli=False``: no flag; ``toml=False``: not settable from a TOML file.
    ``bare``: the value of the flag given without one (``--resume`` alone is ``--resume last``).
    """
    metadata = {
        "help": help,
        "flag": flag,
        "group": group,
        "choices": choices,
        "minimum": minimum,
        "maximum": maximum,
        "above": above,
        "below": below,
        "metavar": metavar,
        "parse": parse,
        "default_text": default_text,
        "positional": positional,
        "cli": cli,
        "toml": toml,
        "bare": bare,
    }
    return field(default=default, metadata=metadata)


def parse_slice_range(text: str) -> tuple[int, int]:
    """``"15-19"`` -> (15, 19), inclusive slice indices; ``"7"`` -> (7, 7)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+))?\s*", str(text))
    if not match:
        raise ValueError("is not of the form FIRST-LAST, e.g. 15-19")
    first = int(match.group(1))
    last = int(match.group(2)) if match.group(2) else first
    return first, last


# ---------------------------------------------------------------- checking one value


def flag_of(f: dataclasses.Field) -> str | None:
    """The command-line flag of a field (None for positional arguments and fields without one)."""
    if not f.metadata.get("cli", True) or f.metadata.get("positional"):
        return None
    if f.metadata.get("flag"):
        return f.metadata["flag"]
    if f.default is True:  # a setting that is on by default: its flag turns it off
        return "--no-" + f.name.replace("_", "-")
    return "--" + f.name.replace("_", "-")


def describe(f: dataclasses.Field) -> str:
    """How an error names a setting: its flag and its name as config files spell it."""
    flag = flag_of(f)
    if f.metadata.get("positional"):
        return f.name.upper()
    return f"{flag} ({f.name})" if flag and flag.lstrip("-").replace("-", "_") != f.name else (flag or f.name)


_HINTS: dict[type, dict] = {}


def _hint(f: dataclasses.Field, owner: type):
    if owner not in _HINTS:
        _HINTS[owner] = typing.get_type_hints(owner)
    return _HINTS[owner][f.name]


def _split_optional(hint) -> tuple[object, bool]:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(hint))
    return hint, False


def _base_type(f: dataclasses.Field, owner: type):
    return _split_optional(_hint(f, owner))[0]


def value_type(cls: type, name: str):
    """The type of setting ``name`` of ``cls`` without ``| None`` (``int``, ``float``, ``str``, ...)."""
    return _base_type(cls.field(name), cls)


def _rule(f: dataclasses.Field, base) -> str:
    meta = f.metadata
    if meta.get("choices"):
        return "one of " + ", ".join(map(str, meta["choices"]))
    if base is bool:
        return "true or false"
    if typing.get_origin(base) is tuple:
        return "a slice range FIRST-LAST of slice indices with 0 <= FIRST <= LAST, e.g. 15-19"
    paths = {"STACK": "a path or volume address", "DIR": "a folder path", "TOML": "a path", "NAME": "a folder name"}
    text = paths.get(meta.get("metavar"), "a non-empty text")
    kind = {int: "an integer", float: "a finite number", str: text, Path: "a path"}.get(base, str(base))
    bounds = []
    if meta.get("minimum") is not None:
        bounds.append(f">= {meta['minimum']:g}")
    if meta.get("above") is not None:
        bounds.append(f"> {meta['above']:g}")
    if meta.get("below") is not None:
        bounds.append(f"< {meta['below']:g}")
    if meta.get("maximum") is not None:
        bounds.append(f"<= {meta['maximum']:g}")
    return kind + (" " + " and ".join(bounds) if bounds else "")


def check_value(f: dataclasses.Field, value, owner: type):
    """The value of field ``f`` of ``owner`` checked and normalised (text parsed, lists made tuples)."""
    hint = _hint(f, owner)
    base, optional = _split_optional(hint)
    meta = f.metadata
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{describe(f)} is required: give {_rule(f, base)}")
    bad = ConfigError(f"{describe(f)} = {value!r}: must be {_rule(f, base)}")
    if meta.get("parse") and isinstance(value, str) and base is not str:
        try:
            value = meta["parse"](value)
        except ValueError:
            raise bad from None
    if base is bool:
        if not isinstance(value, bool):
            raise bad
    elif base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
    elif base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad
        value = float(value)
    elif base is str:
        if not isinstance(value, str) or not value.strip():
            raise bad
    elif typing.get_origin(base) is tuple:
        if (
            not isinstance(value, (list, tuple))
            or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            or not 0 <= value[0] <= value[1]
        ):
            raise bad
        value = tuple(value)
    if meta.get("choices") and value not in meta["choices"]:
        raise bad
    if base in (int, float):
        if (
            (meta.get("minimum") is not None and value < meta["minimum"])
            or (meta.get("maximum") is not None and value > meta["maximum"])
            or (meta.get("above") is not None and value <= meta["above"])
            or (meta.get("below") is not None and value >= meta["below"])
        ):
            raise bad
    return value


# ---------------------------------------------------------------- settings classes


class Settings:
    """Mixed into each settings dataclass: checks every field on construction, reads and writes dicts."""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Check and normalise every field, then the rules between fields (:meth:`check`)."""
        for f in fields(self):
            object.__setattr__(self, f.name, check_value(f, getattr(self, f.name), type(self)))
        self.check()

    def check(self) -> None:
        """Rules that involve several fields; override."""

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    @classmethod
    def field(cls, name: str) -> dataclasses.Field:
        return next(f for f in fields(cls) if f.name == name)

    @classmethod
    def check_keys(cls, values: dict, where: str, allowed: Iterable[str] | None = None) -> None:
        """Refuse keys that are not settings of ``cls`` (or not in ``allowed``), naming the valid ones."""
        valid = list(allowed) if allowed is not None else [f.name for f in fields(cls) if f.metadata.get("toml", True)]
        unknown = [key for key in values if key not in valid]
        if unknown:
            raise ConfigError(f"{where}: unknown settings {', '.join(map(repr, unknown))} (valid: {', '.join(valid)})")

    @classmethod
    def from_dict(cls, values: dict, where: str, allowed: Iterable[str] | None = None, **fixed):
        """Build from a TOML table or a JSON record; errors are prefixed with ``where`` (a file and table)."""
        cls.check_keys(values, where, allowed)
        try:
            return cls(**{**values, **fixed})
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None


# ---------------------------------------------------------------- the command line


def _default_text(f: dataclasses.Field, note: str | None = None) -> str | None:
    if note:
        return note
    if f.metadata.get("default_text"):
        return f.metadata["default_text"]
    if f.default is dataclasses.MISSING or isinstance(f.default, bool) or f.default is None:
        return None
    return f"{f.default:g}" if isinstance(f.default, float) else str(f.default)


def help_text(f: dataclasses.Field, note: str | None = None) -> str:
    """The help of a field with its default."""
    default = _default_text(f, note)
    return f.metadata["help"] + (f" (default: {default})" if default else "")


def selected(cls: type, include: Iterable[str] | None = None, exclude: Iterable[str] = ()) -> list:
    chosen = [f for f in fields(cls) if f.metadata.get("cli", True) and f.name not in set(exclude)]
    if include is not None:
        wanted = list(include)
        chosen = sorted((f for f in chosen if f.name in wanted), key=lambda f: wanted.index(f.name))
    return chosen


def add_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    notes: dict[str, str] | None = None,
) -> None:
    """Add a flag (or positional argument) for each chosen field of the settings class ``cls``.

    Flags default to "not given" (``argparse.SUPPRESS``), so :func:`from_args` knows what the user
    set and the class supplies every default. ``notes`` replaces the default shown for a field
    (e.g. "from the TOML").
    """
    notes = notes or {}
    groups = parser.__dict__.setdefault("_em_unet_groups", {})
    for f in selected(cls, include, exclude):
        meta = f.metadata
        kwargs = {"help": help_text(f, notes.get(f.name)).replace("%", "%%")}
        base = _base_type(f, cls)
        choices = meta.get("choices")  # not tested for truth: that would read a RegistryNames
        if base is bool:
            kwargs["action"] = "store_false" if f.default is True else "store_true"
        else:
            kwargs["type"] = {int: int, float: float}.get(base, str)
            if choices is None:  # else --help shows the choices
                kwargs["metavar"] = meta.get("metavar") or {int: "N", float: "X"}.get(base, "TEXT")
        if meta.get("positional"):
            if not meta.get("metavar"):
                kwargs.pop("metavar", None)
            action = parser.add_argument(f.name, **kwargs)
        else:
            kwargs["dest"] = f.name
            kwargs["default"] = argparse.SUPPRESS
            if meta.get("bare") is not None:
                kwargs.update(nargs="?", const=meta["bare"])
            if f.default is dataclasses.MISSING:
                kwargs["required"] = True
            names = [flag_of(f)]
            if names[0] == "-o":
                names.append("--output")
            target = parser
            if meta.get("group", "options") != "options":
                title = GROUPS[meta["group"]]
                target = groups.get(title) or groups.setdefault(title, parser.add_argument_group(title))
            action = target.add_argument(*names, **kwargs)
        # Set after add_argument, which lists an action's choices at once (to check its metavar): a
        # RegistryNames stays unread until a value is checked or --help is written.
        action.choices = choices


def given(args: argparse.Namespace, cls: type) -> dict:
    """The settings of ``cls`` the user gave on the command line."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}


def from_args(cls: type, args: argparse.Namespace, **overrides):
    """Build ``cls`` from the flags given (defaults for the rest); checks every value."""
    return cls(**{**given(args, cls), **overrides})


def to_flags(settings: Settings, exclude: Iterable[str] = ()) -> list[str]:
    """The command-line flags that give ``settings`` again (:func:`from_args` reads them back): every
    value that is not None, and each on/off setting that differs from its default."""
    flags = []
    for f in selected(type(settings), exclude=exclude):
        value = getattr(settings, f.name)
        if f.metadata.get("positional") or value is None:
            continue
        if isinstance(value, bool):
            if value != f.default:
                flags.append(flag_of(f))
            continue
        text = (
            f"{value[0]}-{value[1]}" if isinstance(value, tuple) else repr(value) if isinstance(value, float) else value
        )
        flags += [flag_of(f), str(text)]
    return flags


def flags_markdown(cls: type, include: Iterable[str] | None = None, exclude: Iterable[str] = ()) -> str:
    """A Markdown table of the flags of ``cls`` (the README's tables are these)."""
    lines = ["| flag | default | valid | what it does |", "| --- | --- | --- | --- |"]
    for f in selected(cls, include, exclude):
        if f.metadata.get("positional"):
            continue
        base = _base_type(f, cls)
        default = _default_text(f) or ("required" if f.default is dataclasses.MISSING else "off")
        valid = "" if base is bool else _rule(f, base)
        lines.append(f"| `{flag_of(f)}` | {default} | {valid} | {f.metadata['help']} |")
    return "\n".join(lines)
