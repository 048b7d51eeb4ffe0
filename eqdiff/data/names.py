"""What a dataset may call its subjects and classes, and which subjects are "live"."""

from __future__ import annotations

import re
import unicodedata
from typing import Literal

SubjectKind = Literal["object", "live"]
SUBJECT_KINDS: tuple[str, ...] = ("object", "live")
LIVE_CLASSES = frozenset({"cat", "dog"})
_SUBJECT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SLUG_GAP = re.compile(r"[^a-z0-9]+")
_MAX_NAME = 128


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


def slugify_subject_name(text: str) -> str:
    """A safe subject name made from any text, e.g. a folder called ``café cup ☕`` → ``cafe_cup``.

    Accents are folded (Unicode NFKD, then ASCII only), letters lowercased, and every run of
    other characters becomes a single ``_``; leading and trailing ``_`` are dropped and the result
    is cut to 128 characters. Raises ``ValueError`` when nothing usable is left (e.g. ``"☕"``).
    """
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = _SLUG_GAP.sub("_", folded.lower()).strip("_")[:_MAX_NAME].rstrip("_")
    if not slug:
        raise ValueError(f"cannot make a subject name from {text!r}: it has no ASCII letters or "
                         "digits")
    return validate_subject_name(slug)


def subject_name_for_folder(folder: str) -> str:
    """The subject name for a folder: the folder name itself when it is already a valid subject
    name (so existing datasets keep their names), else :func:`slugify_subject_name` of it."""
    try:
        return validate_subject_name(folder)
    except ValueError:
        return slugify_subject_name(folder)


def check_folder_name(folder: str) -> str:
    """Return ``folder`` if it names one entry directly inside the dataset folder, else raise
    ``ValueError`` (empty, ``.``/``..``, path separators or NUL would reach elsewhere)."""
    if not folder or folder in (".", "..") or any(c in folder for c in "/\\\0"):
        raise ValueError(f"folder {folder!r} must be a single folder name inside the dataset "
                         "folder (no path separators, not '.' or '..')")
    return folder


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
