"""The ``AutoGLMModel`` resource: apiVersion, kind, metadata, spec and status."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import Field, model_validator

from autoglm_api.base import API_VERSION, DNS_1123_LABEL_PATTERN, DNS_LABEL_PATTERN, KIND, ApiModel
from autoglm_api.cel import CelRule
from autoglm_api.spec import AutoGLMModelSpec
from autoglm_api.status import AutoGLMModelStatus

MAX_NAME_LENGTH = 40


class ObjectMeta(ApiModel):
    """The parts of Kubernetes ObjectMeta a manifest may carry (server-set fields are accepted too)."""

    name: Annotated[str, Field(max_length=253)] | None = Field(default=None, description="Object name.")
    generate_name: Annotated[str, Field(max_length=253)] | None = Field(
        default=None, description="Name prefix."
    )
    namespace: Annotated[str, Field(max_length=63, pattern=DNS_1123_LABEL_PATTERN)] | None = Field(
        default=None, description="Namespace."
    )
    labels: dict[str, str] | None = Field(default=None, description="Labels.")
    annotations: dict[str, str] | None = Field(default=None, description="Annotations.")
    uid: str | None = Field(default=None, description="Set by the server.")
    resource_version: str | None = Field(default=None, description="Set by the server.")
    generation: int | None = Field(default=None, description="Set by the server.")
    creation_timestamp: datetime | None = Field(default=None, description="Set by the server.")
    deletion_timestamp: datetime | None = Field(default=None, description="Set by the server.")
    deletion_grace_period_seconds: int | None = Field(default=None, description="Set by the server.")
    finalizers: list[str] | None = Field(default=None, description="Finalizers.")
    owner_references: list[dict[str, Any]] | None = Field(default=None, description="Owners.")
    managed_fields: list[dict[str, Any]] | None = Field(default=None, description="Set by the server.")
    self_link: str | None = Field(default=None, description="Set by the server.")

    @model_validator(mode="after")
    def _named(self) -> Self:
        if not self.name and not self.generate_name:
            raise ValueError("name (or generateName) is required")
        prefix = self.generate_name
        if not self.name and prefix is not None:
            limit = MAX_NAME_LENGTH - 5  # the server appends 5 characters; the result must pass the name rule
            if len(prefix) > limit or not re.fullmatch(r"[a-z]([-a-z0-9]*)?", prefix):
                raise ValueError(
                    f"generateName must be at most {limit} lowercase letters, digits and '-', starting with a "
                    f"letter, got {prefix!r}"
                )
        return self


class AutoGLMModel(ApiModel):
    """One model under AutoGLM's control, from source checkpoint to served, canaried revisions."""

    __cel_rules__: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule=f"!has(self.metadata.name) || (size(self.metadata.name) <= {MAX_NAME_LENGTH} && "
            f"self.metadata.name.matches('{DNS_LABEL_PATTERN}'))",
            message=f"must be a DNS-1035 label of at most {MAX_NAME_LENGTH} characters (lowercase letters, digits "
            "and '-', starting with a letter), because it names the model's InferenceServices",
            field_path=".metadata.name",
        ),
    )

    api_version: Literal["autoglm.io/v1alpha1"] = Field(
        default="autoglm.io/v1alpha1", description=f"{API_VERSION}."
    )
    kind: Literal["AutoGLMModel"] = Field(default="AutoGLMModel", description=f"{KIND}.")
    metadata: ObjectMeta = Field(description="Standard object metadata.")
    spec: AutoGLMModelSpec = Field(description="Desired state.")
    status: AutoGLMModelStatus | None = Field(
        default=None, description="Observed state, written by the operator."
    )

    @property
    def namespaced_name(self) -> str:
        name = self.metadata.name or f"{self.metadata.generate_name}*"
        return f"{self.metadata.namespace or 'default'}/{name}"
