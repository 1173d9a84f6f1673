"""The base of every API type: camelCase JSON, unknown fields forbidden, CEL rules enforced."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, Any, ClassVar, Self

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    StringConstraints,
    WithJsonSchema,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from autoglm_api.cel import CelRule

GROUP = "autoglm.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "AutoGLMModel"
PLURAL = "autoglmmodels"
SINGULAR = "autoglmmodel"
SHORT_NAMES = ("agm",)
CATEGORIES = ("autoglm",)

#: Error type of a failed CEL rule in pydantic's ValidationError; ``ctx["failures"]`` lists them.
CEL_ERROR_TYPE = "cel_rule"

URI_SCHEMES = ("hf", "s3", "gs", "pvc", "file", "pkg", "http", "https")
URI_PATTERN = rf"^({'|'.join(URI_SCHEMES)})://[^\s]+$"
DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"
DNS_LABEL_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
DNS_1123_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
#: Most Kubernetes object names: dot-separated DNS-1123 labels, at most 253 characters in all.
DNS_1123_SUBDOMAIN_PATTERN = r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
MAX_LABEL_LENGTH = 63
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
SHA256_PATTERN = r"^[a-f0-9]{64}$"

#: What each pattern means, for error messages a person can act on.
PATTERN_HINTS: dict[str, str] = {
    URI_PATTERN: f"a URI with one of the schemes {', '.join(s + '://' for s in URI_SCHEMES)}",
    DURATION_PATTERN: "a duration such as 30s, 5m, 1h or 1h30m",
    DNS_LABEL_PATTERN: "a DNS-1035 label: lowercase letters, digits and '-', starting with a letter",
    DNS_1123_LABEL_PATTERN: "a DNS-1123 label: lowercase letters, digits and '-'",
    QUANTITY_PATTERN: "a Kubernetes quantity such as 500m, 4, 16Gi",
    SHA256_PATTERN: "a SHA-256 digest: 64 lowercase hex characters",
}

Uri = Annotated[str, StringConstraints(pattern=URI_PATTERN, max_length=2048)]
Duration = Annotated[str, StringConstraints(pattern=DURATION_PATTERN, max_length=32)]
DnsLabel = Annotated[str, StringConstraints(pattern=DNS_LABEL_PATTERN, max_length=63)]
Sha256 = Annotated[str, StringConstraints(pattern=SHA256_PATTERN)]


_SUFFIXES: dict[str, Decimal] = {
    "": Decimal(1), "m": Decimal("0.001"),
    **{s: Decimal(1000) ** (i + 1) for i, s in enumerate("kMGTPE")},
    **{s + "i": Decimal(1024) ** (i + 1) for i, s in enumerate("KMGTPE")},
}  # fmt: skip


def quantity_value(quantity: str) -> Decimal:
    """The number a quantity of :data:`QUANTITY_PATTERN` stands for (``16Gi`` -> 17179869184).

    Written here (a few lines) rather than taken from the ``kubernetes`` client, which the API
    package does not depend on; the tests check it against ``kubernetes.utils.parse_quantity``.
    """
    if not re.fullmatch(QUANTITY_PATTERN, quantity):
        raise ValueError(f"{quantity!r} is not {PATTERN_HINTS[QUANTITY_PATTERN]}")
    number = quantity.rstrip("mkMGTPEi")
    return Decimal(number) * _SUFFIXES[quantity[len(number) :]]


def _quantity_to_str(value: Any) -> Any:
    # Kubernetes quantities are int-or-string: `cpu: 4` and `cpu: "4"` mean the same; 0.5 is neither.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        raise ValueError(f'must be an integer or a quantity string such as "500m", got {value}')
    return value


Quantity = Annotated[
    str,
    BeforeValidator(_quantity_to_str),
    StringConstraints(pattern=QUANTITY_PATTERN, max_length=32),
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
        }
    ),
]


def _cel_rules_schema(schema: dict[str, Any], cls: type[Any]) -> None:
    rules: tuple[CelRule, ...] = getattr(cls, "__cel_rules__", ())
    if rules:
        schema["x-kubernetes-validations"] = [r.to_kubernetes() for r in rules]


class ApiModel(BaseModel):
    """Base of the API types. Subclasses list their cross-field rules in ``__cel_rules__``."""

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        validate_by_alias=True,
        validate_by_name=True,  # Python code may use field names; manifests are read with by_name=False
        serialize_by_alias=True,
        json_schema_extra=_cel_rules_schema,
    )

    __cel_rules__: ClassVar[tuple[CelRule, ...]] = ()

    @model_validator(mode="after")
    def _check_cel_rules(self) -> Self:
        if not self.__cel_rules__:
            return self
        obj = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        failures = []
        for rule in self.__cel_rules__:
            message = rule.check(obj)
            if message is not None:
                failures.append({"fieldPath": rule.field_path or "", "message": message, "rule": rule.rule})
        if failures:
            raise PydanticCustomError(
                CEL_ERROR_TYPE,
                "{detail}",
                {"detail": "; ".join(f["message"] for f in failures), "failures": failures},
            )
        return self

    def to_json(self) -> dict[str, Any]:
        """The object as the API server stores it: camelCase keys, unset optionals left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)
