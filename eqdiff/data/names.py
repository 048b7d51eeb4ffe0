"""What a dataset may call its subjects and classes, and which subjects are "live"."""

from __future__ import annotations

import re
from typing import Literal

SubjectKind = Literal["object", "live"]
SUBJECT_KINDS: tuple[str, ...] = ("object", "live")
LIVE_CLASSES = frozenset({"cat", "dog"})
_SUBJECT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def validate_subject_name(name: str) -> str:
    """Return ``name`` if it is a safe subject name, else raise ``ValueError``.

    Allowed: 1–128 characters from letters, digits, ``.``, ``_`` and ``-``, starting with a letter
    or digit — so no path separators, no ``..``, no hidden names; safe as a folder name and as a
    storage-key component.
    """
    if not isinstance(name, str) or not _SUBJECT_NAME.fullmatch(name):
        raise ValueError(f"invalid subject name {name!r}: use 1-128 letters, digits, '.', '_' or "
                         "'-', starting with a letter or digit (no path separators)")
    return name


def kind_for_class(class_noun: str) -> SubjectKind:
    """DreamBench's rule: subjects whose class is ``cat`` or ``dog`` are live, others objects."""
    return "live" if class_noun.strip().lower() in LIVE_CLASSES else "object"


def check_class_noun(class_noun: str, where: str) -> str:
    cleaned = " ".join(str(class_noun).split())
    if not cleaned:
        raise ValueError(f"{where}: the class noun is empty")
    if "{" in cleaned or "}" in cleaned:
        raise ValueError(f"{where}: the class noun {class_noun!r} must not contain braces")
    return cleaned
