"""A target's desired state: what its servers should serve, as the operator writes it into the
target's ConfigMap (``desired.json``) and the agent beside each server reads it back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class DesiredStateError(ValueError):
    """The ConfigMap's document is not a desired state (the message names the field and what it takes)."""


@dataclass(frozen=True)
class Assignment:
    """One revision a target's servers should hold, where to get it and its share of traffic."""

    revision: str
    uri: str
    sha256: str | None = None
    weight: int = 100

    def to_json(self) -> dict[str, Any]:
        return {"revision": self.revision, "uri": self.uri, "sha256": self.sha256, "weight": self.weight}

    @classmethod
    def from_json(cls, data: Any, where: str) -> Assignment:
        if not isinstance(data, dict):
            raise DesiredStateError(f"{where} must be an object with revision, uri, sha256 and weight")
        revision, uri, sha256, weight = (data.get(k) for k in ("revision", "uri", "sha256", "weight"))
        if not isinstance(revision, str) or not revision:
            raise DesiredStateError(f"{where}.revision must be a non-empty string, got {revision!r}")
        if not isinstance(uri, str) or not uri:
            raise DesiredStateError(f"{where}.uri must be a non-empty string, got {uri!r}")
        if sha256 is not None and not (isinstance(sha256, str) and len(sha256) == 64):
            raise DesiredStateError(f"{where}.sha256 must be 64 hex digits or null, got {sha256!r}")
        weight = 100 if weight is None else weight
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 100:
            raise DesiredStateError(f"{where}.weight must be an integer in 0..100, got {weight!r}")
        return cls(revision, uri, sha256, weight)


@dataclass(frozen=True)
class Desired:
    """What a target's servers should serve: the stable revision and, during a canary, the candidate
    (its ``weight`` is the candidate's share of traffic)."""

    stable: Assignment
    candidate: Assignment | None = None
    generation: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "stable": self.stable.to_json(),
            "candidate": self.candidate.to_json() if self.candidate else None,
            "generation": self.generation,
        }

    @classmethod
    def from_json(cls, data: Any) -> Desired:
        if not isinstance(data, dict):
            raise DesiredStateError("the desired state must be a JSON object with 'stable' and 'candidate'")
        stable = Assignment.from_json(data.get("stable"), "stable")
        raw = data.get("candidate")
        candidate = None if raw is None else Assignment.from_json(raw, "candidate")
        if candidate is not None and candidate.revision == stable.revision:
            raise DesiredStateError(f"candidate and stable are both revision {stable.revision}")
        generation = data.get("generation", 0)
        if isinstance(generation, bool) or not isinstance(generation, int):
            raise DesiredStateError(f"generation must be an integer, got {generation!r}")
        return cls(stable, candidate, generation)
