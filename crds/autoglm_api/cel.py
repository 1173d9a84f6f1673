"""CEL validation rules: declared once, rendered into the CRD and evaluated locally.

The API server evaluates ``x-kubernetes-validations`` with cel-go; ``autoglm validate`` and the
pydantic models evaluate the very same expressions with cel-python, so both sides agree on what
is valid and print the same message. cel-python lacks two functions of the Kubernetes CEL
libraries that our rules use (``list.isSorted()`` from the lists library and
``list.join(sep)`` from the strings library); they are provided here with the same semantics.
Rules must stay within standard CEL plus those two functions.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import celpy
from celpy import celtypes
from celpy.adapter import json_to_cel
from celpy.evaluation import CELEvalError

Reason = Literal["FieldValueInvalid", "FieldValueForbidden", "FieldValueRequired", "FieldValueDuplicate"]


def _is_sorted(values: celtypes.ListType) -> celtypes.BoolType:
    items: list[Any] = list(values)
    return celtypes.BoolType(all(a <= b for a, b in itertools.pairwise(items)))


def _join(values: celtypes.ListType, separator: celtypes.StringType | None = None) -> celtypes.StringType:
    sep = str(separator) if separator is not None else ""
    return celtypes.StringType(sep.join(str(v) for v in values))


def _string(value: Any) -> celtypes.StringType:
    # cel-go converts doubles with strconv's shortest 'g' form: string(2.0) is "2", not "2.0".
    if isinstance(value, celtypes.DoubleType):
        return celtypes.StringType(repr(float(value)).removesuffix(".0"))
    if isinstance(value, celtypes.BoolType):
        return celtypes.StringType("true" if value else "false")
    return celtypes.StringType(value)


# Kubernetes CEL library functions that cel-python does not ship, and cel-go's string(double).
KUBERNETES_FUNCTIONS: dict[str, Any] = {"isSorted": _is_sorted, "join": _join, "string": _string}


@dataclass(frozen=True)
class CelRule:
    """One ``x-kubernetes-validations`` entry, attached to the object it is declared on.

    ``self`` in ``rule`` and ``message_expression`` is that object in its JSON form (camelCase
    keys, defaults applied, optional fields absent rather than null). ``field_path`` points the
    error at a child field, as the API server does.
    """

    rule: str
    message: str
    field_path: str | None = None
    message_expression: str | None = None
    reason: Reason = "FieldValueInvalid"

    def to_kubernetes(self) -> dict[str, str]:
        out = {"rule": self.rule, "message": self.message}
        if self.message_expression:
            out["messageExpression"] = self.message_expression
        if self.field_path:
            out["fieldPath"] = self.field_path
        if self.reason != "FieldValueInvalid":
            out["reason"] = self.reason
        return out

    def check(self, obj: Mapping[str, Any], *, errors_fail: bool = True) -> str | None:
        """Evaluate against ``obj``; return the failure message, or None when the rule holds.

        An evaluation error (a missing key, a type mismatch) fails the rule, as in the API server,
        unless ``errors_fail`` is False (used when other errors already explain the missing data).
        """
        activation = {"self": json_to_cel(dict(obj))}
        try:
            result = _program(self.rule).evaluate(activation)
        except CELEvalError as exc:
            return f"{self.message} (rule could not be evaluated: {exc.args[0]})" if errors_fail else None
        if not isinstance(result, celtypes.BoolType):
            raise TypeError(f"CEL rule {self.rule!r} returned {type(result).__name__}, not bool")
        if bool(result):
            return None
        if self.message_expression:
            try:
                message = _program(self.message_expression).evaluate(activation)
            except CELEvalError:
                return self.message
            # cel-python yields a plain str for string concatenations, StringType otherwise.
            if isinstance(message, str):
                return str(message)
        return self.message


@functools.cache
def _program(expression: str) -> celpy.Runner:
    """Compile once per expression; parsing is the slow part of cel-python."""
    env = celpy.Environment()
    return env.program(env.compile(expression), functions=KUBERNETES_FUNCTIONS)
