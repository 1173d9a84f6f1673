"""Prompt variants: the system prompt the feedback loop chose, applied server-side.

A variants file (YAML or JSON) names the active variant and the text of each::

    active: concise
    variants:
      concise: "You are a helpful assistant. Answer in one or two sentences."
      detailed: "You are a helpful assistant. Explain your reasoning step by step."

The feedback loop's bandit splits traffic between variants with ``weights`` (each variant's share;
``active`` is then the variant with the largest)::

    active: concise
    weights: {concise: 0.8, detailed: 0.2}
    variants: {...}

The file is re-read when it changes, so the feedback loop switches variants by rewriting it
(atomically: write a temporary file and rename it). A chat request without a system message gets
a variant drawn by the weights (without weights, the active one's text); a request can pin a variant (``x-autoglm-prompt-variant`` header or
the ``prompt_variant`` field). A plain-text prompt is the client's whole prompt and is left as is
(its variant is reported as ``none``). A malformed file keeps the last good variants.
"""

from __future__ import annotations

import logging
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from autoglm_core.errors import AutoGLMError

log = logging.getLogger(__name__)

NONE = "none"


class UnknownVariantError(AutoGLMError, ValueError):
    """A prompt variant the variants file does not name (400)."""

    default_status = 400


@dataclass(frozen=True)
class Variants:
    active: str = NONE
    texts: dict[str, str] = field(default_factory=dict)
    #: Each variant's share of chat requests (they sum to 1); empty: every request gets ``active``.
    weights: dict[str, float] = field(default_factory=dict)

    def draw(self, rng: random.Random) -> str:
        """A variant for one request: drawn by the weights, else the active one."""
        if not self.weights:
            return self.active
        names = list(self.weights)
        return rng.choices(names, weights=[self.weights[n] for n in names])[0]

    @classmethod
    def parse(cls, data: Any, source: str) -> Variants:
        if not isinstance(data, dict) or not isinstance(data.get("variants"), dict):
            raise ValueError(
                f"{source}: expected a mapping with 'active' and 'variants' (name -> system prompt)"
            )
        texts = data["variants"]
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in texts.items()):
            raise ValueError(f"{source}: every variant needs a name and a system prompt text")
        active = data.get("active", NONE)
        if active != NONE and active not in texts:
            raise ValueError(f"{source}: active variant {active!r} is not one of {sorted(texts)}")
        weights = data.get("weights") or {}
        if not isinstance(weights, dict) or not all(
            k in texts and isinstance(v, int | float) and not isinstance(v, bool) and v >= 0
            for k, v in weights.items()
        ):
            raise ValueError(f"{source}: 'weights' must map variants of {sorted(texts)} to shares >= 0")
        total = float(sum(weights.values()))
        if weights and total <= 0:
            raise ValueError(f"{source}: the weights must not all be 0")
        shares = {k: float(v) / total for k, v in weights.items()}
        return cls(active=active, texts=dict(texts), weights=shares)


class PromptVariants:
    """The variants in force; ``resolve`` picks the text for one request."""

    def __init__(self, path: Path | None = None, variants: Variants | None = None) -> None:
        self.path = path
        self._variants = variants or Variants()
        self._mtime: float | None = None
        self._lock = threading.Lock()
        self._rng = random.Random()
        if path is not None:
            self._variants = Variants.parse(
                yaml.safe_load(path.read_text()), str(path)
            )  # a bad file fails start-up
            self._mtime = path.stat().st_mtime

    def current(self) -> Variants:
        self._reload_if_changed()
        return self._variants

    def set_active(self, name: str) -> None:
        variants = self.current()
        if name != NONE and name not in variants.texts:
            raise UnknownVariantError(
                f"unknown prompt variant {name!r}; known: {[*sorted(variants.texts), NONE]}"
            )
        self._variants = Variants(active=name, texts=variants.texts)  # pinning one drops the weights

    def resolve(self, pinned: str | None) -> tuple[str, str | None]:
        """(variant name, system prompt text or None) for a request that pinned ``pinned`` (or not)."""
        variants = self.current()
        name = pinned or variants.draw(self._rng)
        if name == NONE:
            return NONE, None
        if name not in variants.texts:
            raise UnknownVariantError(
                f"unknown prompt variant {name!r}; known: {[*sorted(variants.texts), NONE]}"
            )
        return name, variants.texts[name]

    def _reload_if_changed(self) -> None:
        if self.path is None:
            return
        try:
            mtime = self.path.stat().st_mtime
        except OSError:
            return
        if mtime == self._mtime:
            return
        with self._lock:
            try:
                self._variants = Variants.parse(yaml.safe_load(self.path.read_text()), str(self.path))
            except (OSError, ValueError, yaml.YAMLError) as exc:
                log.error("prompt variants not reloaded, keeping the last good ones: %s", exc)
            self._mtime = mtime


def with_system_prompt(messages: list[dict[str, str]], text: str | None) -> tuple[list[dict[str, str]], bool]:
    """Prepend ``text`` as the system message unless the conversation has one; (messages, applied)."""
    if text is None or any(m.get("role") == "system" for m in messages):
        return messages, False
    return [{"role": "system", "content": text}, *messages], True
