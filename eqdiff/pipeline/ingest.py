"""Ingest: a subject's dataset entry copied into the store, so no other stage opens a dataset path.

A subject's photos and user masks are stored by content (``inputs/{sha256}/original.jpg``,
shared by every run and subject that has the same bytes), and the run gets a record of what
was copied: the subject's class, kind, evaluation prompt set and its files by name and sha256
(``runs/{run}/subjects/{subject}/ingest/subject.json``). Every later stage starts from that
record, wherever it runs: on a cluster, a worker node never sees the folder the dataset was
read from, only the store.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eqdiff.data.datasets import Subject
from eqdiff.data.images import IMAGE_SUFFIXES, file_sha256
from eqdiff.data.prompts import PromptSet
from eqdiff.store import ArtifactStore, keys
from eqdiff.store.keys import join_key

INGEST_RECORD = "subject.json"
PHOTOS_FOLDER = "photos"
MASKS_FOLDER = "masks"


@dataclass(frozen=True)
class IngestedFile:
    """One dataset file as stored: its name in the dataset folder and the sha256 of its bytes."""

    file: str
    sha256: str

    @property
    def key(self) -> str:
        return keys.input_key(self.sha256, Path(self.file).suffix.lower())


@dataclass(frozen=True)
class IngestedSubject:
    """What a run knows of a subject once it is ingested: nothing refers to the dataset folder."""

    name: str
    class_noun: str
    kind: str
    prompt_set: PromptSet
    photos: tuple[IngestedFile, ...]
    masks: tuple[IngestedFile, ...]

    @classmethod
    def describe(cls, subject: Subject, prompt_set: PromptSet) -> IngestedSubject:
        """Read and hash a subject's files in the dataset folder (the only place that does)."""
        masks = ([path for path in sorted(subject.mask_dir.iterdir())
                  if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES]
                 if subject.mask_dir else [])
        return cls(subject.name, subject.class_noun, subject.kind, prompt_set,
                   tuple(IngestedFile(p.name, file_sha256(p)) for p in subject.image_paths),
                   tuple(IngestedFile(p.name, file_sha256(p)) for p in masks))

    def to_dict(self) -> dict[str, Any]:
        return {"subject": self.name, "class_noun": self.class_noun, "kind": self.kind,
                "prompt_set": {"name": self.prompt_set.name,
                               "templates": list(self.prompt_set.templates)},
                "photos": [{"file": f.file, "sha256": f.sha256, "key": f.key}
                           for f in self.photos],
                "masks": [{"file": f.file, "sha256": f.sha256, "key": f.key}
                          for f in self.masks]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IngestedSubject:
        prompt_set = PromptSet(data["prompt_set"]["name"],
                               tuple(data["prompt_set"]["templates"]))
        return cls(data["subject"], data["class_noun"], data["kind"], prompt_set,
                   tuple(IngestedFile(f["file"], f["sha256"]) for f in data["photos"]),
                   tuple(IngestedFile(f["file"], f["sha256"]) for f in data["masks"]))

    def copy_in(self, store: ArtifactStore, subject: Subject) -> int:
        """Upload the files that the store does not hold yet; returns how many were uploaded.

        A file whose bytes changed since :meth:`describe` read them is refused (``ValueError``):
        the record would otherwise name content that was never stored."""
        sources = {p.name: p for p in subject.image_paths}
        if subject.mask_dir:
            sources.update({f"{MASKS_FOLDER}/{p.name}": p for p in subject.mask_dir.iterdir()})
        uploaded = 0
        for folder, files in (("", self.photos), (f"{MASKS_FOLDER}/", self.masks)):
            for entry in files:
                if store.exists(entry.key):
                    continue
                path = sources[folder + entry.file]
                info = store.put_file(entry.key, path)
                if info.sha256 != entry.sha256:
                    store.delete_prefix(entry.key.rsplit("/", 1)[0])
                    raise ValueError(f"{path} changed while it was being ingested; run again")
                uploaded += 1
        return uploaded

    def fetch(self, store: ArtifactStore, folder: Path, *, photos: bool = True) -> Subject:
        """The subject with its stored photos (unless ``photos`` is false) and masks downloaded
        under ``folder``, each checked against its recorded sha256, for a stage that needs the
        original files."""
        for entry in self.photos if photos else ():
            store.get_file(entry.key, folder / PHOTOS_FOLDER / entry.file, sha256=entry.sha256)
        for entry in self.masks:
            store.get_file(entry.key, folder / MASKS_FOLDER / entry.file, sha256=entry.sha256)
        return Subject(self.name, self.class_noun, self.kind,  # type: ignore[arg-type]
                       tuple(folder / PHOTOS_FOLDER / f.file for f in self.photos),
                       mask_dir=folder / MASKS_FOLDER if self.masks else None,
                       prompt_set=self.prompt_set.name)

    def write(self, folder: Path) -> Path:
        path = folder / INGEST_RECORD
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path


def read_ingested(store: ArtifactStore, run_id: str, subject: str) -> IngestedSubject:
    """The ingest record of ``subject`` in run ``run_id``."""
    prefix = keys.ingest_prefix(run_id, subject)
    return IngestedSubject.from_dict(store.get_json(join_key(prefix, INGEST_RECORD)))
