"""Routing: which caption types an image needs, decided by one cheap structured request.

The routing request asks the same VLM for three booleans under a JSON schema (about 30 output
tokens, no captions), so its cost is one short prefill per image. `general` is always written; the
other types only where the answer switches them on. The answer is stored verbatim (`route_json`) and
as one boolean column per routed type, so a downstream job can re-select without re-asking.
"""

from __future__ import annotations

from typing import Any

from captioning.schema import ROUTED_TYPES


def caption_types(decision: dict[str, Any]) -> list[str]:
    """Caption types to request for a routing answer, in CAPTION_TYPES order."""
    on = {t for key, t in ROUTED_TYPES.items() if decision.get(key) is True}
    return ["general"] + [t for t in ("text", "knowledge", "structured") if t in on]


def route_columns(decision: dict[str, Any] | None) -> dict[str, bool | None]:
    """The stored routing decision: route_<type> booleans, all null when routing failed."""
    return {f"route_{t}": (None if decision is None else bool(decision.get(key)))
            for key, t in ROUTED_TYPES.items()}
