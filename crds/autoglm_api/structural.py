"""What the API server does with a CRD's structural schema: defaulting and CEL rule evaluation.

It works from the rendered ``openAPIV3Schema`` alone (not from the pydantic models), so tests can
check that the committed CRD defaults and rejects exactly what ``autoglm validate`` does, and
emulated API servers (kmock in the operator tests) can apply the same admission.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from autoglm_api.cel import CelRule


def apply_defaults(value: Any, schema: Mapping[str, Any]) -> Any:
    """Return ``value`` with the schema's defaults filled in, top-down, as the API server does."""
    if isinstance(value, Mapping):
        out = dict(value)
        properties: Mapping[str, Any] = schema.get("properties") or {}
        for name, prop in properties.items():
            if name not in out and "default" in prop:
                out[name] = copy.deepcopy(prop["default"])
            if name in out:
                out[name] = apply_defaults(out[name], prop)
        extra = schema.get("additionalProperties")
        if isinstance(extra, Mapping):
            out = {k: apply_defaults(v, extra) for k, v in out.items()}
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        return [apply_defaults(v, schema["items"]) for v in value]
    return value


def _typed(value: Any, schema: Mapping[str, Any]) -> Any:
    # CEL sees `type: number` values as doubles even when the JSON holds an integer.
    if schema.get("type") == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, Mapping):
        properties: Mapping[str, Any] = schema.get("properties") or {}
        return {k: _typed(v, properties.get(k, {})) for k, v in value.items()}
    if isinstance(value, list):
        return [_typed(v, schema.get("items") or {}) for v in value]
    return value


def check_rules(
    value: Any, schema: Mapping[str, Any], path: str = "", *, errors_fail: bool = True
) -> list[tuple[str, str]]:
    """Evaluate every ``x-kubernetes-validations`` rule; return ``(field path, message)`` failures."""
    failures: list[tuple[str, str]] = []
    if isinstance(value, Mapping):
        typed = _typed(value, schema)
        for raw in schema.get("x-kubernetes-validations") or []:
            rule = CelRule(
                rule=raw["rule"],
                message=raw.get("message", ""),
                field_path=raw.get("fieldPath"),
                message_expression=raw.get("messageExpression"),
            )
            message = rule.check(typed, errors_fail=errors_fail)
            if message is not None:
                failures.append((_join(path, rule.field_path or ""), message))
        for name, prop in (schema.get("properties") or {}).items():
            if name in value:
                failures += check_rules(value[name], prop, _join(path, "." + name), errors_fail=errors_fail)
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for i, item in enumerate(value):
            failures += check_rules(item, schema["items"], f"{path}[{i}]", errors_fail=errors_fail)
    return failures


def _join(path: str, suffix: str) -> str:
    return (path + suffix).lstrip(".")
