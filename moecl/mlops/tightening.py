"""Settings a pipeline run may only make stricter: the deployment fixes the gate's thresholds and
the data rules, and whoever can create a run can raise the bar but never lower it."""
from __future__ import annotations

from dataclasses import fields, replace


def tighten(deployed, requested: dict | None, stricter: dict):
    """`deployed` (a dataclass) with each field of `requested` applied only where it is stricter;
    `stricter[field]` picks the stricter of two values (`max`, `min`, ...). An unknown field is an error."""
    known = {f.name for f in fields(deployed)}
    unknown = sorted(set(requested or {}) - known)
    if unknown:
        raise ValueError(f"unknown setting '{unknown[0]}' (known: {', '.join(sorted(known))})")
    return replace(deployed, **{name: stricter[name](getattr(deployed, name), value)
                                for name, value in (requested or {}).items()})
