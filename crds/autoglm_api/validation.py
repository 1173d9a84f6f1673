"""Validate ``AutoGLMModel`` manifests the way the API server would, with messages a person can act on.

A document goes through the same stages as on the server: nulls are pruned, then the schema
(types, enums, bounds, patterns, unknown fields) and the CEL rules are checked. Both live in the
pydantic models, so every problem in a document is reported, each with its field path::

    spec.rollout.steps: step weights must be strictly increasing, got [10, 5, 100]
"""

from __future__ import annotations

import base64
import datetime
import difflib
import json
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from autoglm_api.base import API_VERSION, CEL_ERROR_TYPE, GROUP, KIND, PATTERN_HINTS
from autoglm_api.crd import openapi_schema
from autoglm_api.resource import AutoGLMModel, ObjectMeta
from autoglm_api.structural import apply_defaults, check_rules


class UnreadableManifestError(Exception):
    """The text is not YAML (or repeats a key, which kubectl refuses too)."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a document, at a field path such as ``spec.targets[0].name``."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


@dataclass
class DocumentResult:
    """The outcome for one YAML document of a stream."""

    index: int
    model: AutoGLMModel | None = None
    problems: list[Problem] = field(default_factory=list)
    skipped: str | None = None

    @property
    def valid(self) -> bool:
        return self.model is not None and not self.problems

    @property
    def name(self) -> str:
        return self.model.namespaced_name if self.model else ""


class _StrictLoader(yaml.SafeLoader):
    """A safe loader that refuses duplicate mapping keys instead of keeping the last one."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {key!r}",
                key_node.start_mark,
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
# YAML 1.2 floats (`1e-3`, `1.5e3`), which kubectl reads as numbers and PyYAML's YAML 1.1 as strings.
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)$"),
    list("-+.0123456789"),
)

RULES_NOT_CHECKED = (
    "some validation rules were not checked because the object was invalid; "
    "correct the existing errors to complete validation"
)


def read_source(source: str) -> str:
    """The text of a manifest file, or of stdin for ``-``; raises UnreadableManifestError."""
    if source == "-":
        return sys.stdin.read()
    try:
        return Path(source).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UnreadableManifestError(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise UnreadableManifestError(f"cannot read: {exc.strerror or exc}") from exc


def load_documents(text: str) -> list[Any]:
    """Parse a YAML stream; empty documents (``---`` alone) are dropped."""
    try:
        return [d for d in yaml.load_all(text, Loader=_StrictLoader) if d is not None]
    except yaml.YAMLError as exc:
        raise UnreadableManifestError(f"not valid YAML: {' '.join(str(exc).split())}") from exc


def as_json(value: Any) -> Any:
    """YAML values as kubectl sends them: string keys, timestamps and binary as strings."""
    if isinstance(value, Mapping):
        return {k if isinstance(k, str) else _scalar_text(k): as_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [as_json(v) for v in value]
    if isinstance(value, datetime.datetime | datetime.date | bytes):
        return _scalar_text(value)
    return value


def _scalar_text(value: Any) -> str:
    if isinstance(value, datetime.datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, datetime.date):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def prune_nulls(value: Any) -> Any:
    """Drop null values, as the API server does for non-nullable fields before defaulting."""
    if isinstance(value, Mapping):
        return {k: prune_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [prune_nulls(v) for v in value]
    return value


def validate_document(doc: Any, index: int = 0) -> DocumentResult:
    """Validate one parsed document. Documents of other API groups are skipped, not judged."""
    result = DocumentResult(index=index)
    if not isinstance(doc, Mapping):
        result.problems.append(
            Problem("", f"a manifest must be a YAML mapping (an object), got {_describe(doc)}")
        )
        return result
    api_version = doc.get("apiVersion")
    if isinstance(api_version, str) and not api_version.startswith(f"{GROUP}/"):
        result.skipped = f"{api_version}/{doc.get('kind')} is not an {GROUP} resource"
        return result
    if api_version == API_VERSION and doc.get("kind") not in (KIND, None):
        result.problems.append(Problem("kind", f'must be "{KIND}", got {_describe(doc.get("kind"))}'))
        return result
    body = prune_nulls(as_json({k: v for k, v in doc.items() if k != "status"}))  # status is the operator's
    for required in ("apiVersion", "kind"):
        if required not in body:
            result.problems.append(Problem(required, "required field is missing"))
    try:
        model = AutoGLMModel.model_validate_json(json.dumps(body), strict=True, by_name=False)
    except ValidationError as exc:
        result.problems.extend(problems_from_error(exc))
        if any(_blocks_rules(e) for e in exc.errors(include_url=False)):
            result.problems.append(Problem("", RULES_NOT_CHECKED))
        else:
            result.problems.extend(_rules_beside_value_errors(body, result.problems))
        return result
    if not result.problems:
        result.model = model
    return result


# The API server evaluates CEL rules unless schema validation found one of these (Kubernetes'
# NotSupported, Required, TooLong, TooMany and TypeInvalid errors); then it says so instead.
_BLOCKING = {"literal_error", "missing", "string_too_long", "too_long", "int_from_float", "value_error"}


def _blocks_rules(err: ErrorDetails) -> bool:
    return err["type"] in _BLOCKING or err["type"].endswith(("_type", "_parsing"))


def _rules_beside_value_errors(body: Mapping[str, Any], reported: list[Problem]) -> list[Problem]:
    """CEL failures that pydantic skipped because a child field had a value error.

    pydantic runs an object's rules only when all its fields are valid; the API server runs them
    all unless a blocking error was found. So, with bounds and pattern errors only, the CRD's rules
    are also evaluated on the defaulted document, and what they find beyond pydantic's is added.
    """
    schema = openapi_schema()
    seen = {(p.path, p.message) for p in reported}
    found = check_rules(apply_defaults(body, schema), schema, errors_fail=False)
    return [Problem(path, message) for path, message in found if (path, message) not in seen]


def validate_text(text: str) -> list[DocumentResult]:
    """Validate every document of a YAML stream. Raises UnreadableManifestError when it is not YAML."""
    return [validate_document(doc, i) for i, doc in enumerate(load_documents(text))]


class ManifestError(ValueError):
    """A manifest that cannot be read, or is not exactly one valid AutoGLMModel; the message is one
    line naming the file and what is wrong."""


def load_manifest(source: str) -> AutoGLMModel:
    """The one AutoGLMModel in file ``source`` (``-`` for stdin), validated as the API server would.

    Raises ManifestError when it cannot be read, holds no or several AutoGLMModels, or is invalid.
    """
    label = "<stdin>" if source == "-" else source
    try:
        results = validate_text(read_source(source))
    except UnreadableManifestError as exc:
        raise ManifestError(f"{label}: {exc}") from exc
    models = [r for r in results if not r.skipped]
    if len(models) != 1:
        raise ManifestError(f"{label}: expected one AutoGLMModel document, found {len(models)}")
    (result,) = models
    if result.problems or result.model is None:
        problems = "; ".join(str(p) for p in result.problems) or "not an AutoGLMModel"
        raise ManifestError(f"{label}: invalid AutoGLMModel: {problems}")
    return result.model


def problems_from_error(exc: ValidationError) -> list[Problem]:
    """Turn pydantic's errors into field-path problems, one per failed check."""
    problems: list[Problem] = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        if err["type"] == CEL_ERROR_TYPE:
            for failure in (err.get("ctx") or {}).get("failures", []):
                extra = tuple(p for p in str(failure["fieldPath"]).split(".") if p)
                problems.append(Problem(format_path(loc + extra), str(failure["message"])))
        else:
            problems.append(Problem(format_path(loc), _message(err, loc)))
    return problems


def format_path(loc: Sequence[int | str]) -> str:
    """``('spec', 'targets', 0, 'nodeSelector', 'a/b')`` -> ``spec.targets[0].nodeSelector[a/b]``."""
    out = ""
    for part, node in zip(loc, _schema_walk(loc), strict=False):
        if isinstance(part, int) or (
            node is not None and "additionalProperties" in node and "properties" not in node
        ):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _child(node: dict[str, Any] | None, part: int | str) -> dict[str, Any] | None:
    if node is None:
        return None
    if isinstance(part, int):
        found = node.get("items")
    elif "properties" in node:
        found = node["properties"].get(part)
    else:
        found = node.get("additionalProperties")
    return found if isinstance(found, dict) else None


def _schema_walk(loc: Sequence[int | str]) -> Iterator[dict[str, Any] | None]:
    """Yield, for each element of ``loc``, the schema of the object that element indexes into."""
    node: dict[str, Any] | None = openapi_schema()
    for part in loc:
        yield node
        node = _child(node, part)


def _schema_at(loc: Sequence[int | str]) -> dict[str, Any] | None:
    if not loc:
        return openapi_schema()
    *_, parent = _schema_walk(loc)
    return _child(parent, loc[-1])


def _allowed_fields(loc: Sequence[int | str]) -> list[str]:
    if tuple(loc) == ("metadata",):  # the CRD schema leaves ObjectMeta to the API server
        return sorted(f.alias or n for n, f in ObjectMeta.model_fields.items())
    return sorted(((_schema_at(loc) or {}).get("properties") or {}).keys())


_TYPE_NAMES = {
    "int": "an integer",
    "float": "a number",
    "string": "a string",
    "bool": "a boolean (true or false)",
    "list": "a list",
    "dict": "a mapping (an object)",
    "model": "a mapping (an object)",
    "model_attributes": "a mapping (an object)",
    "datetime": "an RFC 3339 timestamp",
}


def _message(err: ErrorDetails, loc: tuple[int | str, ...]) -> str:
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    got = f", got {_plain(value)}"
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        fields = _allowed_fields(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), fields, n=1)
        hint = f'; did you mean "{close[0]}"?' if close else ""
        return f"unknown field{hint} Allowed fields: {', '.join(fields)}" if fields else "unknown field"
    if kind == "literal_error":
        enum = (_schema_at(loc) or {}).get("enum") or []
        expected = str(ctx.get("expected", "")).replace("'", '"').replace(" or ", ", ")
        allowed = ", ".join(json.dumps(v) for v in enum) if enum else expected
        return f"must be one of {allowed}{got}"
    bounds = {
        "greater_than_equal": ("greater than or equal to", "ge"),
        "greater_than": ("greater than", "gt"),
        "less_than_equal": ("less than or equal to", "le"),
        "less_than": ("less than", "lt"),
    }
    if kind in bounds:
        words, key = bounds[kind]
        return f"must be {words} {ctx.get(key)}{got}"
    if kind == "string_pattern_mismatch":
        pattern = str(ctx.get("pattern"))
        return f"must be {PATTERN_HINTS.get(pattern, f'a string matching {pattern}')}{got}"
    if kind in ("string_too_long", "string_too_short"):
        limit = ctx.get("max_length" if kind == "string_too_long" else "min_length")
        words = "at most" if kind == "string_too_long" else "at least"
        return f"must be {words} {limit} characters, got {len(value) if isinstance(value, str) else value}"
    if kind in ("too_long", "too_short"):
        limit = ctx.get("max_length" if kind == "too_long" else "min_length")
        words = "at most" if kind == "too_long" else "at least"
        return f"must have {words} {limit} item(s), got {ctx.get('actual_length', '?')}"
    if kind == "int_from_float":
        return f"must be an integer{got}"
    if kind == "value_error":
        return str(ctx.get("error") or err["msg"])
    for prefix, name in _TYPE_NAMES.items():
        if kind.startswith(prefix + "_") and kind.endswith(("_type", "_parsing", "_from_datetime_parsing")):
            return f"must be {name}, got {_describe(value)}"
    return f"{err['msg']}{got}"


def _plain(value: Any) -> str:
    if isinstance(value, str):
        text = json.dumps(value)
        return text if len(text) <= 80 else text[:76] + '..."'
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return _describe(value)


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"number {value}"
    if isinstance(value, str):
        return f"string {_plain(value)}"
    if isinstance(value, list | tuple):
        return f"a list of {len(value)} item(s)"
    if isinstance(value, Mapping):
        return "a mapping"
    return type(value).__name__
