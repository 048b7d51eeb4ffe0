"""Prompt sets: named templates with ``{token}`` and ``{class_noun}``, and the built-in ones
(DreamBench's object and live-subject lists, and a style set) that ship with the package."""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from importlib import resources
from typing import Any

OBJECT_PROMPTS = "dreambench-object"
LIVE_PROMPTS = "dreambench-live"
STYLE_PROMPTS = "style"
TEMPLATE_FIELDS = frozenset({"token", "class_noun"})


@dataclass(frozen=True)
class PromptSet:
    """Named prompt templates with ``{token}`` and ``{class_noun}`` placeholders."""

    name: str
    templates: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"prompt set name must be letters, digits, '-' or '_', "
                             f"got {self.name!r}")
        if not self.templates:
            raise ValueError(f"prompt set {self.name!r} has no templates")
        for template in self.templates:
            check_template(template, where=f"prompt set {self.name!r}")

    def render(self, token: str, class_noun: str) -> list[str]:
        """Prompts with the placeholder token, e.g. ``"a <eqd> dog in the jungle"``."""
        return [_squash(t.format(token=token, class_noun=class_noun)) for t in self.templates]

    def render_plain(self, class_noun: str) -> list[str]:
        """Prompts without the placeholder (for CLIP-T), e.g. ``"a dog in the jungle"``."""
        return self.render("", class_noun)

    def __len__(self) -> int:
        return len(self.templates)


def _squash(text: str) -> str:
    return " ".join(text.split())


def check_template(template: str, *, where: str = "template") -> str:
    """Validate a prompt template: only ``{token}``/``{class_noun}`` fields, ``{token}`` present."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as error:
        raise ValueError(f"{where}: malformed template {template!r} ({error})") from error
    unknown = sorted(set(fields) - TEMPLATE_FIELDS)
    if unknown:
        raise ValueError(f"{where}: template {template!r} uses unknown field(s) {unknown}; "
                         f"allowed: {{token}}, {{class_noun}}")
    if "token" not in fields:
        raise ValueError(f"{where}: template {template!r} lacks the {{token}} placeholder")
    return template


def _read_package_json(name: str) -> dict[str, Any]:
    return json.loads(resources.files("eqdiff").joinpath("data", name).read_text("utf-8"))


def builtin_prompt_sets() -> tuple[PromptSet, ...]:
    """DreamBench's object and live lists (a copy of the public benchmark's 25 + 25 templates)
    and our own style list."""
    dreambench = _read_package_json("dreambench_prompts.json")
    style = _read_package_json("style_prompts.json")
    return (PromptSet(OBJECT_PROMPTS, tuple(dreambench["object"])),
            PromptSet(LIVE_PROMPTS, tuple(dreambench["live"])),
            PromptSet(STYLE_PROMPTS, tuple(style["templates"])))


