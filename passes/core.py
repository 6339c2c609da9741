"""Pass infrastructure: `Pass`, `Option`, `PassContext`, `PassResult`, the registry, errors.

A pass is a small named unit with a docstring (shown in the README's pass list and by
`python -m passes.run --list-passes`), declared options, and a `run(model, ctx)` that edits the IR
in place and returns a `PassResult` saying whether anything changed. Passes register themselves
with `@register_pass`; the spec strings of the CLI and of `passes.apply` name them.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Iterator

from ir import CompressError, Model

__all__ = [
    "Pass", "Option", "PassContext", "PassResult", "register_pass", "get_pass",
    "available_passes", "PassError", "PreconditionError", "OptionError",
]


class PassError(CompressError):
    """A pass failed on this model (the message names the pass and the reason)."""


class PreconditionError(PassError):
    """The model does not meet what a pass needs (e.g. static shapes, calibration data)."""


class OptionError(CompressError):
    """An unknown pass, an unknown option or an option value of the wrong kind."""


_MISSING = object()


@dataclass(frozen=True)
class Option:
    """A pass option: its type, default, help text and, optionally, allowed values.

    `kind` is one of int, float, str, bool or list (a list of strings, written `a+b+c` in specs).
    """
    kind: type
    default: Any = None
    help: str = ""
    choices: tuple = ()

    def parse(self, pass_name: str, key: str, raw: Any) -> Any:
        value = self._convert(pass_name, key, raw)
        if self.choices and value not in self.choices:
            raise OptionError(f"{pass_name}: {key}={raw!r} is not one of "
                              f"{', '.join(map(str, self.choices))}")
        return value

    def _convert(self, pass_name: str, key: str, raw: Any) -> Any:
        if not isinstance(raw, str):
            if self.kind is list and isinstance(raw, (list, tuple)):
                return [str(v) for v in raw]
            if self.kind is float and isinstance(raw, (int, float)) and not isinstance(raw, bool):
                return float(raw)
            if isinstance(raw, self.kind):
                return raw
            raise OptionError(f"{pass_name}: {key}={raw!r} must be {self.kind.__name__}")
        try:
            if self.kind is bool:
                lowered = raw.lower()
                if lowered in ("1", "true", "yes", "on"):
                    return True
                if lowered in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            if self.kind is list:
                return [part for part in raw.split("+") if part]
            return self.kind(raw)
        except ValueError:
            raise OptionError(f"{pass_name}: {key}={raw!r} must be {self.kind.__name__}") from None


@dataclass
class PassResult:
    """What a pass did: whether the graph changed, notes for the user, details for the report."""
    changed: bool
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


def _no_progress(items: Iterable, total: int | None = None, desc: str = "") -> Iterator:
    return iter(items)


@dataclass
class PassContext:
    """What passes share besides the model: calibration data, options of the run, progress.

    `calibration` is a `passes.calibration.CalibrationSet` or None; passes that need data call
    `ctx.require_calibration(model)`, which falls back to documented synthetic data and says so.
    `progress(items, total, desc)` wraps long loops so the CLI can show a progress display.
    `artifacts` lets passes leave results for later passes and backends (e.g. channel groups).
    """
    calibration: Any = None
    seed: int = 0
    progress: Callable[..., Iterator] = _no_progress
    notes: list[str] = field(default_factory=list)
    artifacts: dict[str, Any] = field(default_factory=dict)

    def note(self, message: str) -> None:
        self.notes.append(message)

    def require_calibration(self, model: Model, samples: int = 32):
        """The calibration set, or a synthetic one (noted in the report) when none was given."""
        from .calibration import CalibrationSet
        if self.calibration is None:
            self.calibration = CalibrationSet.synthetic(model, samples=samples, seed=self.seed)
            self.note(f"no --calib given: using {samples} synthetic samples "
                      f"({CalibrationSet.SYNTHETIC_RULE}); data-aware results will be weaker")
        return self.calibration


class Pass:
    """Base class. Subclasses set `name`, a docstring, `options`, and implement `run`.

    Options become attributes (dashes turned into underscores) after validation, so a pass reads
    `self.ratio` rather than parsing strings itself.
    """
    name: ClassVar[str] = ""
    options: ClassVar[dict[str, Option]] = {}
    # Passes that compute with shapes (pruning, quantization) need every input dim known.
    requires_static_shapes: ClassVar[bool] = False

    def __init__(self, **values: Any):
        unknown = sorted(set(values) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise OptionError(f"{self.name}: unknown option {unknown[0]!r} (options: {known})")
        self.values: dict[str, Any] = {}
        for key, option in self.options.items():
            value = option.parse(self.name, key, values[key]) if key in values else option.default
            self.values[key] = value
            setattr(self, key.replace("-", "_"), value)

    @classmethod
    def summary(cls) -> str:
        doc = inspect.getdoc(cls) or ""
        return " ".join(doc.split("\n\n")[0].split())

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def describe(self) -> str:
        """The pass as a spec item, e.g. ``prune-channels:ratio=0.5``."""
        changed = [f"{k}={_format(v)}" for k, v in self.values.items()
                   if v != self.options[k].default]
        return ":".join([self.name, *changed])


def _format(value: Any) -> str:
    return "+".join(value) if isinstance(value, list) else str(value)


_REGISTRY: dict[str, type[Pass]] = {}

# Pass families imported on first registry use; a family missing from the tree is skipped so that
# the infrastructure works while the families are developed independently.
_BUILTIN_FAMILIES = ("passes.cleanup", "passes.prune", "passes.sparsify", "passes.quantize",
                     "passes.recover")
_loaded = False


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by its `name`."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    if not inspect.getdoc(cls):
        raise TypeError(f"pass {cls.name} needs a docstring (it is the user documentation)")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise TypeError(f"pass name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for family in _BUILTIN_FAMILIES:
        if importlib.util.find_spec(family) is not None:
            importlib.import_module(family)


def get_pass(name: str) -> type[Pass]:
    _load_builtin()
    if name not in _REGISTRY:
        raise OptionError(f"unknown pass {name!r} (available: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]


def available_passes() -> dict[str, type[Pass]]:
    _load_builtin()
    return dict(sorted(_REGISTRY.items()))


def stderr_progress(items: Iterable, total: int | None = None, desc: str = "") -> Iterator:
    """Progress on stderr for loops that run over a second: a live line on a terminal, a line
    every few seconds otherwise (logs)."""
    if total is None:
        items = list(items)
        total = len(items)
    tty = sys.stderr.isatty()
    interval = 0.2 if tty else 5.0
    start = last = time.monotonic()
    shown = False
    for index, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        if now - start > 1.0 and (now - last > interval or index == total):
            last, shown = now, True
            line = f"  {desc} {index}/{total} ({now - start:.1f}s)"
            sys.stderr.write(f"\r{line}" if tty else f"{line}\n")
            sys.stderr.flush()
    if shown and tty:
        sys.stderr.write("\n")
