"""DreamBench's ``prompts_and_classes.txt``: parsed as text, never evaluated.

The file is a ``subject_name,class`` table followed by two Python-like lists of prompt
templates (objects, then live subjects), each item a ``'...'.format(unique_token,
class_token)`` expression; :func:`parse_dreambench_prompts` reads exactly that and rejects
anything else with the file and line.
"""

from __future__ import annotations

import ast
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass

from eqdiff.data.names import SUBJECT_KINDS, check_class_noun, validate_subject_name
from eqdiff.data.prompts import check_template

DREAMBENCH_INDEX = "prompts_and_classes.txt"


@dataclass(frozen=True)
class DreamBenchIndex:
    """Contents of a DreamBench ``prompts_and_classes.txt``."""

    classes: Mapping[str, str]  # subject name → class noun, in file order
    object_templates: tuple[str, ...]
    live_templates: tuple[str, ...]


_LIST_START = re.compile(r"[A-Za-z_]\w*\s*=\s*\[")
_LIST_ITEM = re.compile(
    r"""(?P<literal>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")"""
    r"""\s*\.format\(\s*unique_token\s*,\s*class_token\s*\)\s*,?""")
_SECTION_HEADERS = {"classes": None, "prompts": None, "object prompts": "object",
                    "live subject prompts": "live", "live prompts": "live"}
_POSITIONAL_FIELDS = {"0": "{token}", "1": "{class_noun}"}


def _template_from_format_string(text: str, where: str) -> str:
    """``'a {0} {1} x'`` → ``'a {token} {class_noun} x'``; only ``{0}``/``{1}`` allowed."""
    parts = []
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as error:
        raise ValueError(f"{where}: malformed template {text!r} ({error})") from error
    for literal, field_name, spec, conversion in parsed:
        parts.append(literal.replace("{", "{{").replace("}", "}}"))
        if field_name is None:
            continue
        if field_name not in _POSITIONAL_FIELDS or spec or conversion:
            raise ValueError(f"{where}: template {text!r} may only use {{0}} (token) and {{1}} "
                             f"(class), found {{{field_name}}}")
        parts.append(_POSITIONAL_FIELDS[field_name])
    return check_template("".join(parts), where=where)


def parse_dreambench_prompts(text: str, *, source: str = DREAMBENCH_INDEX) -> DreamBenchIndex:
    """Parse DreamBench's ``prompts_and_classes.txt`` without evaluating it.

    Accepted, line by line (blank lines and ``#`` comments anywhere): the section headers
    ``Classes``, ``Prompts``, ``Object Prompts``, ``Live Subject Prompts``; a class table
    (an optional ``subject_name,class`` header, then ``name,class`` rows — the class may contain
    spaces); then exactly two lists ``name = [`` … ``]`` whose items are
    ``'…'.format(unique_token, class_token)`` (the string is read with ``ast.literal_eval``).
    The first list (or the one under ``Object Prompts``) is for objects, the other for live
    subjects. Anything else raises ``ValueError`` naming ``source`` and the line number.
    """
    classes: dict[str, str] = {}
    lists: dict[str, list[str]] = {}
    pending_header: str | None = None
    current: list[str] | None = None
    current_kind = ""
    list_start_line = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        where = f"{source}:{number}"
        if not line or line.startswith("#"):
            continue
        if current is not None:
            if line == "]":
                if not current:
                    raise ValueError(f"{where}: the {current_kind} prompt list is empty")
                lists[current_kind], current = current, None
                continue
            item = _LIST_ITEM.fullmatch(line)
            if item is None:
                raise ValueError(f"{where}: expected a prompt like "
                                 f"'a {{0}} {{1}} ...'.format(unique_token, class_token) or ']', "
                                 f"got {line!r}")
            literal = ast.literal_eval(item.group("literal"))
            current.append(_template_from_format_string(literal, where))
            continue
        if line.lower() in _SECTION_HEADERS:
            pending_header = _SECTION_HEADERS[line.lower()] or pending_header
            continue
        if _LIST_START.fullmatch(line):
            current_kind = pending_header or ("object" if "object" not in lists else "live")
            if current_kind in lists:
                raise ValueError(f"{where}: a second {current_kind} prompt list")
            current, list_start_line, pending_header = [], number, None
            continue
        if lists:
            raise ValueError(f"{where}: unexpected text after the prompt lists: {line!r}")
        if line.replace(" ", "").lower() == "subject_name,class":
            continue
        name, comma, class_noun = line.partition(",")
        if not comma:
            raise ValueError(f"{where}: expected a 'subject_name,class' row, a section header or "
                             f"a prompt list, got {line!r}")
        name = name.strip()
        try:
            validate_subject_name(name)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        if name in classes:
            raise ValueError(f"{where}: subject {name!r} is listed twice")
        classes[name] = check_class_noun(class_noun, where)
    if current is not None:
        raise ValueError(f"{source}:{list_start_line}: the prompt list opened here is never "
                         "closed with ']'")
    if not classes:
        raise ValueError(f"{source}: no 'subject_name,class' rows found")
    missing = [kind for kind in SUBJECT_KINDS if kind not in lists]
    if missing:
        raise ValueError(f"{source}: expected an object and a live prompt list; missing "
                         f"{missing}")
    return DreamBenchIndex(classes=classes, object_templates=tuple(lists["object"]),
                           live_templates=tuple(lists["live"]))


