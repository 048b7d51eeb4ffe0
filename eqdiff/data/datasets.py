"""Subjects, classes and prompt sets; the DreamBench and plain-folder dataset layouts.

Two layouts are read, and :func:`load_dataset` tells them apart:

- **DreamBench**: ``prompts_and_classes.txt`` next to one folder per subject (or inside a
  ``dataset/`` sub-folder). The file is a ``subject_name,class`` table followed by two
  Python-like lists of prompt templates (objects, then live subjects); see
  :mod:`eqdiff.data.dreambench`. It is parsed, never evaluated.
- **plain**: one folder per subject plus ``subjects.csv`` (columns ``subject,class[,kind]
  [,prompt_set][,folder]``) or ``subjects.yaml`` (a ``subjects:`` list of mappings with the same
  keys and optional inline ``prompt_sets:``). Extra prompt sets may be given as
  ``prompts/<name>.txt`` (one template per line, ``#`` comments).

Subject names are safe identifiers (:func:`eqdiff.data.names.validate_subject_name`). A folder
whose name is not one (``café cup ☕``) gets a slug as its subject name (``cafe_cup``); in the
plain layout the ``folder`` column names the folder of a subject explicitly, and ``subject`` is
then its name. The folder stays on :attr:`Subject.folder`.

Subject-level trouble (a listed subject without a folder, a folder nobody listed, a folder name
that cannot be used, two folders mapping to one subject name, too few images, files that are
not accepted images) is collected as :class:`DatasetProblem`\\ s and does not stop loading; a
malformed index file raises ``ValueError`` naming the file and line. Masks supplied by the user
live in a ``masks/`` folder inside the subject folder. docs/datasets.md describes it all for
users.
"""

from __future__ import annotations

import csv
import logging
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from eqdiff.data.dreambench import DREAMBENCH_INDEX, parse_dreambench_prompts
from eqdiff.data.images import scan_folder
from eqdiff.data.names import (
    SUBJECT_KINDS,
    SubjectKind,
    check_class_noun,
    check_folder_name,
    kind_for_class,
    subject_name_for_folder,
    validate_subject_name,
)
from eqdiff.data.prompts import (
    LIVE_PROMPTS,
    OBJECT_PROMPTS,
    PromptSet,
    builtin_prompt_sets,
    check_template,
)

logger = logging.getLogger(__name__)

DEFAULT_MIN_IMAGES = 3
MASKS_FOLDER = "masks"
PROMPTS_FOLDER = "prompts"
PLAIN_INDEXES = ("subjects.csv", "subjects.yaml", "subjects.yml")

ProblemKind = Literal["missing_folder", "unlisted_folder", "invalid_folder", "name_collision",
                      "too_few_images", "no_images", "ignored_file"]
Layout = Literal["dreambench", "plain"]


@dataclass(frozen=True)
class Subject:
    """One subject to customize: its photos, class noun and evaluation prompt set."""

    name: str
    class_noun: str
    kind: SubjectKind
    image_paths: tuple[Path, ...]
    mask_dir: Path | None = None  # user-supplied masks, matched by image file stem
    prompt_set: str = ""  # "" = the DreamBench list for ``kind``
    folder: str = ""  # the dataset folder the photos were listed from ("" = not from a dataset)

    def __post_init__(self) -> None:
        validate_subject_name(self.name)
        check_class_noun(self.class_noun, f"subject {self.name!r}")
        if self.kind not in SUBJECT_KINDS:
            raise ValueError(f"subject {self.name!r}: kind must be one of {list(SUBJECT_KINDS)}, "
                             f"got {self.kind!r}")
        if not self.prompt_set:
            object.__setattr__(self, "prompt_set",
                               LIVE_PROMPTS if self.kind == "live" else OBJECT_PROMPTS)


@dataclass(frozen=True)
class DatasetProblem:
    """A subject-level problem found while loading; reported, not fatal."""

    kind: ProblemKind
    subject: str  # the subject name, or the folder / index entry as written when there is none
    message: str


@dataclass(frozen=True)
class _Entry:
    """One subject as an index lists it, before its folder is looked up."""

    subject: str  # as written: the subject name, or (without ``folder``) the folder name
    class_noun: str
    kind: str
    prompt_set: str
    folder: str  # as written; "" = the folder is called ``subject``
    where: str  # file and line, for messages


@dataclass(frozen=True)
class Dataset:
    """Subjects (sorted by name), the prompt sets they use, and the problems found."""

    root: Path
    layout: Layout
    subjects: tuple[Subject, ...]
    prompt_sets: tuple[PromptSet, ...]
    problems: tuple[DatasetProblem, ...] = ()

    def subject(self, name: str) -> Subject:
        """The subject called ``name``; ``KeyError`` lists the known names."""
        for subject in self.subjects:
            if subject.name == name:
                return subject
        raise KeyError(f"no subject {name!r}; known: {[s.name for s in self.subjects]}")

    def prompt_set(self, name: str) -> PromptSet:
        """The prompt set called ``name``; ``KeyError`` lists the known names."""
        for prompt_set in self.prompt_sets:
            if prompt_set.name == name:
                return prompt_set
        raise KeyError(f"no prompt set {name!r}; known: {[p.name for p in self.prompt_sets]}")

    def prompts_for(self, subject: Subject | str) -> PromptSet:
        """The evaluation prompt set of a subject."""
        if isinstance(subject, str):
            subject = self.subject(subject)
        return self.prompt_set(subject.prompt_set)


# --------------------------------------------------------------------------- readers

def _folder_problems(name: str, images: list[Path], min_images: int) -> list[DatasetProblem]:
    if not images:
        return [DatasetProblem("no_images", name, f"subject {name!r}: its folder has no image "
                                                  "files")]
    if len(images) < min_images:
        return [DatasetProblem("too_few_images", name,
                               f"subject {name!r}: {len(images)} image(s), need at least "
                               f"{min_images}")]
    return []


def _folder_contents(name: str, folder: Path) -> tuple[list[Path], list[DatasetProblem]]:
    """The images of a subject folder, and a problem for every other visible entry in it."""
    images, others = scan_folder(folder)
    problems = [DatasetProblem("ignored_file", name, f"subject {name!r}: {path.name} is ignored: "
                                                     f"{reason}") for path, reason in others]
    problems += [DatasetProblem("ignored_file", name,
                                f"subject {name!r}: sub-folder {sub.name}/ is ignored: only "
                                f"{MASKS_FOLDER}/ is read (for masks)")
                 for sub in sorted(folder.iterdir())
                 if sub.is_dir() and sub.name != MASKS_FOLDER and not sub.name.startswith(".")]
    return images, problems


def _make_subjects(root: Path, entries: Iterable[_Entry], min_images: int,
                   reserved: frozenset[str]) -> tuple[list[Subject], list[DatasetProblem]]:
    """Subjects for the index entries, plus the problems found with their folders.

    Folder names are compared in Unicode NFC form, so an index typed on one system matches
    folders written by another (macOS stores decomposed accents).
    """
    on_disk = {unicodedata.normalize("NFC", p.name): p for p in root.iterdir() if p.is_dir()}
    problems: list[DatasetProblem] = []
    claimed: dict[str, list[tuple[_Entry, str]]] = {}  # subject name → (entry, folder name)
    listed = set()
    for entry in entries:
        folder = unicodedata.normalize("NFC", entry.folder or entry.subject)
        listed.add(folder)
        try:
            check_folder_name(folder)
            name = entry.subject if entry.folder else subject_name_for_folder(folder)
        except ValueError as error:
            problems.append(DatasetProblem("invalid_folder", entry.subject,
                                           f"{entry.where}: {error}; skipped"))
            continue
        claimed.setdefault(name, []).append((entry, folder))
    subjects = []
    for name, claims in claimed.items():
        if len(claims) > 1:
            folders = ", ".join(repr(folder) for _, folder in claims)
            problems.append(DatasetProblem(
                "name_collision", name,
                f"folders {folders} all become subject {name!r}, so none of them is used; "
                "rename a folder or give each subject its own name with the 'folder' column"))
            continue
        entry, folder = claims[0]
        path = on_disk.get(folder)
        if path is None:
            problems.append(DatasetProblem("missing_folder", name,
                                           f"subject {name!r} is listed but {root / folder} is "
                                           "missing"))
            continue
        if name != folder:
            logger.info("%s: folder %r is subject %r", root, folder, name)
        images, found = _folder_contents(name, path)
        problems += found + _folder_problems(name, images, min_images)
        masks = path / MASKS_FOLDER
        subjects.append(Subject(name=name, class_noun=entry.class_noun, kind=entry.kind,
                                image_paths=tuple(images),
                                mask_dir=masks if masks.is_dir() else None,
                                prompt_set=entry.prompt_set, folder=path.name))
    for folder, path in sorted(on_disk.items()):
        if folder in listed or folder in reserved or folder[0] in "._":
            continue
        problems.append(DatasetProblem("unlisted_folder", folder,
                                       f"folder {path} is not listed in the index, so its "
                                       "class is unknown; skipped"))
    subjects.sort(key=lambda s: s.name)
    return subjects, problems


def _merge_prompt_sets(*groups: Iterable[PromptSet]) -> tuple[PromptSet, ...]:
    """Later groups replace earlier sets of the same name."""
    merged: dict[str, PromptSet] = {}
    for group in groups:
        for prompt_set in group:
            merged[prompt_set.name] = prompt_set
    return tuple(merged.values())


def dreambench_root(path: str | Path) -> Path | None:
    """The folder holding ``prompts_and_classes.txt``: ``path`` or ``path/dataset``; else None."""
    path = Path(path)
    for candidate in (path, path / "dataset"):
        if (candidate / DREAMBENCH_INDEX).is_file():
            return candidate
    return None


def load_dreambench(path: str | Path, *, min_images: int = DEFAULT_MIN_IMAGES) -> Dataset:
    """Read the DreamBench layout at ``path`` (the ``dataset/`` folder or its parent)."""
    root = dreambench_root(path)
    if root is None:
        raise ValueError(f"{path}: no {DREAMBENCH_INDEX} here or in {Path(path) / 'dataset'}")
    index_file = root / DREAMBENCH_INDEX
    index = parse_dreambench_prompts(index_file.read_text("utf-8"), source=str(index_file))
    entries = [_Entry(name, noun, kind_for_class(noun), "", "", str(index_file))
               for name, noun in index.classes.items()]
    subjects, problems = _make_subjects(root, entries, min_images, frozenset())
    from_file = (PromptSet(OBJECT_PROMPTS, index.object_templates),
                 PromptSet(LIVE_PROMPTS, index.live_templates))
    builtin = builtin_prompt_sets()
    for ours, theirs in zip(builtin, from_file, strict=False):
        if ours.templates != theirs.templates:
            logger.info("%s: the %s prompts differ from the built-in copy; using the file's",
                        index_file, theirs.name)
    return _finish(Dataset(root=root, layout="dreambench", subjects=tuple(subjects),
                           prompt_sets=_merge_prompt_sets(builtin, from_file),
                           problems=tuple(problems)))


def _read_prompt_files(root: Path) -> list[PromptSet]:
    """``prompts/<name>.txt`` files: one template per line; blank lines and ``#`` comments."""
    folder = root / PROMPTS_FOLDER
    if not folder.is_dir():
        return []
    sets = []
    for file in sorted(folder.glob("*.txt")):
        templates = []
        for number, raw in enumerate(file.read_text("utf-8").splitlines(), start=1):
            line = raw.strip()
            if line and not line.startswith("#"):
                templates.append(check_template(line, where=f"{file}:{number}"))
        sets.append(PromptSet(file.stem, tuple(templates)))
    return sets


def _entry(row: Mapping[str, Any], where: str) -> _Entry:
    """Validate one subjects.csv/yaml row.

    With a ``folder``, ``subject`` must be a valid subject name. Without one, ``subject`` is
    also the folder name, which may be anything: an unusable one becomes a problem for
    :func:`_make_subjects` to report, not an error here.
    """
    name = str(row.get("subject") or "").strip()
    folder = str(row.get("folder") or "").strip()
    if not name:
        raise ValueError(f"{where}: the subject is empty")
    if folder:
        try:
            validate_subject_name(name)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
    class_noun = check_class_noun(str(row.get("class") or ""), f"{where}: subject {name!r}")
    kind = str(row.get("kind") or "").strip() or kind_for_class(class_noun)
    if kind not in SUBJECT_KINDS:
        raise ValueError(f"{where}: kind must be one of {list(SUBJECT_KINDS)}, got {kind!r}")
    prompt_set = str(row.get("prompt_set") or "").strip()
    return _Entry(name, class_noun, kind, prompt_set, folder, where)


_ROW_KEYS = frozenset({"subject", "class", "kind", "prompt_set", "folder"})


def _read_subjects_csv(file: Path) -> list[_Entry]:
    with file.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle, skipinitialspace=True)
        header = [h.strip() for h in reader.fieldnames or []]
        if not {"subject", "class"} <= set(header) or set(header) - _ROW_KEYS:
            raise ValueError(f"{file}:1: header must be subject,class[,kind][,prompt_set]"
                             f"[,folder], got {','.join(header)!r}")
        reader.fieldnames = header
        rows = []
        for row in reader:
            where = f"{file}:{reader.line_num}"
            if None in row:
                raise ValueError(f"{where}: more columns than the header has")
            if not any((v or "").strip() for v in row.values()):
                continue
            rows.append(_entry(row, where))
        return rows


def _read_subjects_yaml(file: Path) -> tuple[list[_Entry], list[PromptSet]]:
    try:
        data = yaml.safe_load(file.read_text("utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"{file}: not valid YAML ({error})") from error
    if not isinstance(data, dict) or not isinstance(data.get("subjects"), list):
        raise ValueError(f"{file}: expected a mapping with a 'subjects:' list")
    unknown = set(data) - {"subjects", "prompt_sets"}
    if unknown:
        raise ValueError(f"{file}: unknown top-level key(s) {sorted(unknown)}")
    rows = []
    for i, row in enumerate(data["subjects"]):
        where = f"{file}: subjects[{i}]"
        if not isinstance(row, dict) or set(row) - _ROW_KEYS:
            raise ValueError(f"{where}: expected a mapping with keys subject, class[, kind]"
                             f"[, prompt_set][, folder], got {row!r}")
        rows.append(_entry(row, where))
    inline = data.get("prompt_sets") or {}
    if not isinstance(inline, dict):
        raise ValueError(f"{file}: prompt_sets must map a name to a list of templates")
    sets = []
    for name, templates in inline.items():
        if not isinstance(templates, list) or not all(isinstance(t, str) for t in templates):
            raise ValueError(f"{file}: prompt_sets.{name} must be a list of strings")
        sets.append(PromptSet(str(name), tuple(templates)))
    return rows, sets


def load_plain(path: str | Path, *, min_images: int = DEFAULT_MIN_IMAGES) -> Dataset:
    """Read the plain layout: subject folders + ``subjects.csv`` or ``subjects.yaml``."""
    root = Path(path)
    found = [root / name for name in PLAIN_INDEXES if (root / name).is_file()]
    if len(found) != 1:
        raise ValueError(f"{root}: expected exactly one of {list(PLAIN_INDEXES)}, found "
                         f"{[f.name for f in found]}")
    index = found[0]
    inline: list[PromptSet] = []
    if index.suffix == ".csv":
        rows = _read_subjects_csv(index)
    else:
        rows, inline = _read_subjects_yaml(index)
    prompt_sets = _merge_prompt_sets(builtin_prompt_sets(), _read_prompt_files(root), inline)
    known_sets = {p.name for p in prompt_sets}
    seen: set[str] = set()
    for entry in rows:
        if entry.subject in seen:
            raise ValueError(f"{entry.where}: subject {entry.subject!r} is listed twice")
        seen.add(entry.subject)
        if entry.prompt_set and entry.prompt_set not in known_sets:
            raise ValueError(f"{entry.where}: unknown prompt set {entry.prompt_set!r}; known: "
                             f"{sorted(known_sets)}")
    subjects, problems = _make_subjects(root, rows, min_images, frozenset({PROMPTS_FOLDER}))
    return _finish(Dataset(root=root, layout="plain", subjects=tuple(subjects),
                           prompt_sets=prompt_sets, problems=tuple(problems)))


def _finish(dataset: Dataset) -> Dataset:
    """Log the problems (one line per kind) and return the dataset."""
    by_kind: dict[str, dict[str, None]] = {}  # kind → subjects, in order, once each
    for problem in dataset.problems:
        by_kind.setdefault(problem.kind, {})[problem.subject] = None
    for kind, names in by_kind.items():
        logger.warning("%s: %s (%d): %s", dataset.root, kind.replace("_", " "), len(names),
                       ", ".join(names))
    logger.info("loaded %s dataset %s: %d subject(s), %d problem(s)", dataset.layout,
                dataset.root, len(dataset.subjects), len(dataset.problems))
    return dataset


def load_dataset(path: str | Path, *, min_images: int = DEFAULT_MIN_IMAGES) -> Dataset:
    """Load a dataset folder, detecting the layout (DreamBench index, else subjects.csv/yaml)."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"dataset folder {path} does not exist")
    if dreambench_root(path) is not None:
        return load_dreambench(path, min_images=min_images)
    if any((path / name).is_file() for name in PLAIN_INDEXES):
        return load_plain(path, min_images=min_images)
    raise ValueError(f"{path}: not a dataset: expected {DREAMBENCH_INDEX} (DreamBench layout, "
                     f"here or in dataset/) or one of {list(PLAIN_INDEXES)} (plain layout)")
