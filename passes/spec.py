"""Pipeline specs: ``cleanup,prune-channels:ratio=0.5,quantize:method=percentile``.

Passes are separated by commas; each is ``name`` or ``name:key=value:key=value``. List-valued
options join items with ``+`` (``exclude=conv1+fc``). A value may contain ``:`` (``nm=2:4``): a
segment without ``=`` continues the previous value.
"""

from __future__ import annotations

from .core import OptionError, Pass, get_pass

__all__ = ["parse_spec", "build_pipeline"]


def parse_spec(spec: str) -> list[tuple[str, dict[str, str]]]:
    """Split a spec into (pass name, raw options) items; checks only the syntax."""
    if spec is None or not spec.strip():
        raise OptionError("empty pass spec (example: cleanup,prune-channels:ratio=0.5)")
    items = []
    for chunk in spec.split(","):
        chunk = chunk.strip()
        if not chunk:
            raise OptionError(f"pass spec {spec!r} has an empty item")
        name, *pairs = chunk.split(":")
        options: dict[str, str] = {}
        last_key = None
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep and last_key is not None:
                # A value may itself contain ':' (nm=2:4): glue the segment back onto it.
                options[last_key] += ":" + pair.strip()
                continue
            if not sep or not key.strip():
                raise OptionError(f"{name}: option {pair!r} must be key=value")
            if key.strip() in options:
                raise OptionError(f"{name}: option {key.strip()!r} given twice")
            last_key = key.strip()
            options[last_key] = value.strip()
        items.append((name.strip(), options))
    return items


def build_pipeline(spec: str) -> list[Pass]:
    """Instantiate the passes of a spec, validating names and options."""
    return [get_pass(name)(**options) for name, options in parse_spec(spec)]
