"""Every key and prefix of the artifact store is made here.

Keys are ``/``-separated relative strings such as ``runs/r1/concepts/dog/eqdiff/concept.json``.
:func:`validate_key` rejects traversal and anything a folder or S3 could not hold; user-supplied
names (subjects, methods, run ids, classes) become segments through :func:`safe_segment`.
The layout of a store (docs/design.md) is the table :data:`LAYOUT`; the functions after
:func:`artifact_key` name each stage's prefix and each well-known file.
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Literal

from eqdiff.store.errors import InvalidKeyError

MARKER_NAME = "_SUCCESS.json"
PARTIAL_SUFFIX = ".eqdiff-partial"  # in-flight local temp files; never listed, never a key
_MAX_KEY_BYTES = 1024  # the S3 limit
_MAX_SEGMENT_BYTES = 255  # the usual file-name limit


def validate_key(key: str) -> str:
    """Return ``key`` unchanged if it is a safe relative key, else raise :class:`InvalidKeyError`.

    Rejected: empty keys, absolute keys (leading ``/``), backslashes, empty segments (``a//b``,
    trailing ``/``), ``.``/``..`` segments, control characters, reserved temp-file names and keys
    over 1024 UTF-8 bytes.
    """
    if not isinstance(key, str) or not key:
        raise InvalidKeyError(f"artifact key must be a non-empty string, got {key!r}")
    if key.startswith("/"):
        raise InvalidKeyError(f"artifact key must be relative, got absolute key {key!r}")
    if "\\" in key:
        raise InvalidKeyError(f"artifact key must use '/' separators, got backslash in {key!r}")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in key):
        raise InvalidKeyError(f"artifact key contains control characters: {key!r}")
    for segment in key.split("/"):
        if not segment:
            raise InvalidKeyError(f"artifact key has an empty segment: {key!r}")
        if segment in (".", ".."):
            raise InvalidKeyError(f"artifact key contains a '{segment}' segment: {key!r}")
        if segment.endswith(PARTIAL_SUFFIX):
            raise InvalidKeyError(f"artifact key uses the reserved suffix {PARTIAL_SUFFIX!r}: "
                                  f"{key!r}")
    if len(key.encode()) > _MAX_KEY_BYTES:
        raise InvalidKeyError(f"artifact key is longer than {_MAX_KEY_BYTES} bytes: {key[:80]!r}…")
    return key


def validate_prefix(prefix: str) -> str:
    """A listing prefix: ``""`` (everything) or a valid key, one trailing ``/`` tolerated."""
    if prefix == "":
        return ""
    return validate_key(prefix[:-1] if prefix.endswith("/") else prefix)


def validate_delete_prefix(prefix: str) -> str:
    """A deletion prefix: like a listing prefix, but never the whole store."""
    if prefix in ("", "/"):
        raise InvalidKeyError("refusing to delete the whole store: give a non-empty prefix")
    return validate_prefix(prefix)


def join_key(*parts: str) -> str:
    """Join key parts (each may hold several ``/``-separated segments) and validate the result."""
    return validate_key("/".join(parts))


def safe_segment(name: str) -> str:
    """One key segment from a user-supplied name (subject, method, run id, class).

    Traversal is rejected, not escaped: empty names, ``.``, ``..`` and names holding ``/``, ``\\``
    or control characters raise :class:`InvalidKeyError`. Every other character outside
    ``A-Z a-z 0-9 _ . - ~`` is percent-escaped as UTF-8 (``"red toy#2"`` -> ``"red%20toy%232"``),
    deterministically and reversibly (:func:`unescape_segment`); ``%`` itself becomes ``%25``.
    """
    if not isinstance(name, str) or not name:
        raise InvalidKeyError(f"name must be a non-empty string, got {name!r}")
    if name in (".", ".."):
        raise InvalidKeyError(f"name {name!r} would escape its folder")
    if "/" in name or "\\" in name:
        raise InvalidKeyError(f"name {name!r} must not contain '/' or '\\'")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise InvalidKeyError(f"name {name!r} contains control characters")
    segment = urllib.parse.quote(name, safe="")
    if len(segment.encode()) > _MAX_SEGMENT_BYTES:
        raise InvalidKeyError(f"name is longer than {_MAX_SEGMENT_BYTES} bytes once escaped: "
                              f"{name[:60]!r}…")
    return segment


def unescape_segment(segment: str) -> str:
    """The original name of a segment made by :func:`safe_segment`."""
    return urllib.parse.unquote(segment, errors="strict")


ArtifactKind = Literal["run", "ingest", "input", "preprocess", "masks", "checkpoint", "concept",
                       "samples", "scores", "report", "mask", "prior", "features"]

# The storage layout (docs/design.md). Every prefix is a stage prefix: its marker lives at
# {prefix}/_SUCCESS.json. Placeholders are filled by artifact_key.
LAYOUT: dict[str, tuple[str, ...]] = {
    "run": ("runs", "{run_id}"),
    "ingest": ("runs", "{run_id}", "subjects", "{subject}", "ingest"),
    "preprocess": ("runs", "{run_id}", "subjects", "{subject}", "preprocess"),
    "masks": ("runs", "{run_id}", "subjects", "{subject}", "masks"),
    "checkpoint": ("runs", "{run_id}", "checkpoints", "{subject}", "{method}"),
    "concept": ("runs", "{run_id}", "concepts", "{subject}", "{method}"),
    "samples": ("runs", "{run_id}", "samples", "{subject}", "{method}"),
    "scores": ("runs", "{run_id}", "scores", "{subject}", "{method}"),
    "report": ("runs", "{run_id}", "report"),
    "input": ("inputs", "{content_hash}"),
    "mask": ("cache", "masks", "{content_hash}"),
    "prior": ("cache", "priors", "{class_name}", "{content_hash}"),
    "features": ("cache", "features", "{content_hash}"),
}
_HASH_RE = re.compile(r"[0-9a-f]{8,128}")

RUN_RECORD = "run.json"
RUN_LEASE = "_LEASE.json"
CHECKPOINT_FILE = "last.pt"
SCORES_FILE = "scores.parquet"


def artifact_key(kind: ArtifactKind, *, run_id: str | None = None, subject: str | None = None,
                 method: str | None = None, class_name: str | None = None,
                 content_hash: str | None = None, name: str | None = None) -> str:
    """The key (with ``name``) or stage prefix (without ``name``) of an artifact.

    Layout, relative to the store's root::

        run        runs/{run_id}/                                   name: run.json
        ingest     runs/{run_id}/subjects/{subject}/ingest/         subject.json (what was copied)
        preprocess runs/{run_id}/subjects/{subject}/preprocess/     photos + manifest.json
        masks      runs/{run_id}/subjects/{subject}/masks/          {photo}.png, masks.json
        checkpoint runs/{run_id}/checkpoints/{subject}/{method}/    {stage_hash}/last.pt (resume)
        concept    runs/{run_id}/concepts/{subject}/{method}/       concept.safetensors + .json
        samples    runs/{run_id}/samples/{subject}/{method}/        {prompt_idx:02d}_{k}.png
        scores     runs/{run_id}/scores/{subject}/{method}/         scores.parquet
        report     runs/{run_id}/report/                            report.html, plots/x.png, ...
        input      inputs/{content_hash}/                           original{.suffix}: a photo or
                                                                    mask as the dataset had it
        mask       cache/masks/{content_hash}/                      {extractor}-{settings}.png
        prior      cache/priors/{class_name}/{content_hash}/        class-prior images
        features   cache/features/{content_hash}/                   {image_sha256}.safetensors

    Each kind needs exactly its placeholders; names go through :func:`safe_segment`,
    ``content_hash`` must be 8-128 lowercase hex digits and ``name`` must be a valid key.
    The functions below name the prefixes and files the pipeline uses.
    """
    try:
        template = LAYOUT[kind]
    except KeyError:
        raise ValueError(f"unknown artifact kind {kind!r}; known: {sorted(LAYOUT)}") from None
    given = {"run_id": run_id, "subject": subject, "method": method, "class_name": class_name,
             "content_hash": content_hash}
    needed = {part[1:-1] for part in template if part.startswith("{")}
    missing = sorted(k for k in needed if given[k] is None)
    extra = sorted(k for k, v in given.items() if v is not None and k not in needed)
    if missing or extra:
        raise ValueError(f"artifact kind {kind!r} needs {sorted(needed)}; "
                         f"missing {missing}, not applicable {extra}")
    if content_hash is not None and not _HASH_RE.fullmatch(content_hash):
        raise InvalidKeyError(f"content_hash must be 8-128 lowercase hex digits, got "
                              f"{content_hash!r}")
    values = {k: (v if k == "content_hash" else safe_segment(v))
              for k, v in given.items() if v is not None}
    parts = [values[part[1:-1]] if part.startswith("{") else part for part in template]
    return join_key(*parts) if name is None else join_key(*parts, name)


# --------------------------------------------------------------------------- the pipeline's keys

def run_prefix(run_id: str) -> str:
    return artifact_key("run", run_id=run_id)


def run_record(run_id: str) -> str:
    """``run.json``: the run's parameters, configuration, status and failures."""
    return artifact_key("run", run_id=run_id, name=RUN_RECORD)


def run_lease(run_id: str) -> str:
    """``_LEASE.json``: who runs this run id now, until when (:mod:`eqdiff.store.lease`)."""
    return artifact_key("run", run_id=run_id, name=RUN_LEASE)


def scores_root(run_id: str) -> str:
    """The folder holding every (subject, method) score stage of a run."""
    return join_key(run_prefix(run_id), "scores")


def ingest_prefix(run_id: str, subject: str) -> str:
    """The copy of a subject's dataset entry (photos, masks, class, prompts) the run reads."""
    return artifact_key("ingest", run_id=run_id, subject=subject)


def input_key(content_sha: str, suffix: str) -> str:
    """A dataset file copied into the store, by the sha256 of its bytes: a photo shared by
    several runs or subjects is stored once. ``suffix`` keeps its type (``.jpg``, ``.png``)."""
    if suffix and not re.fullmatch(r"\.[a-z0-9]{1,8}", suffix):
        raise InvalidKeyError(f"suffix must be a dot and 1-8 lowercase letters or digits, got "
                              f"{suffix!r}")
    return artifact_key("input", content_hash=content_sha, name=f"original{suffix}")


def preprocess_prefix(run_id: str, subject: str) -> str:
    return artifact_key("preprocess", run_id=run_id, subject=subject)


def masks_prefix(run_id: str, subject: str) -> str:
    return artifact_key("masks", run_id=run_id, subject=subject)


def checkpoints_prefix(run_id: str, subject: str, method: str) -> str:
    """Every training checkpoint of one (subject, method), whatever its stage hash."""
    return artifact_key("checkpoint", run_id=run_id, subject=subject, method=method)


def checkpoint_key(run_id: str, subject: str, method: str, stage_hash: str) -> str:
    """The checkpoint a training with this stage hash resumes from: keyed by everything that
    determines the concept, so a checkpoint of other settings, photos, masks or priors is
    never found, let alone resumed."""
    if not _HASH_RE.fullmatch(stage_hash):
        raise InvalidKeyError(f"stage_hash must be 8-128 lowercase hex digits, got {stage_hash!r}")
    return join_key(checkpoints_prefix(run_id, subject, method), stage_hash, CHECKPOINT_FILE)


def rejected_checkpoint_key(run_id: str, subject: str, method: str, stage_hash: str,
                            rejected_at: str) -> str:
    """Where the checkpoint at :func:`checkpoint_key` is moved, for inspection, when it cannot
    be resumed: ``runs/{run}/rejected/checkpoints/{subject}/{method}/{stage_hash}/
    {rejected_at}-last.pt``. Outside :func:`checkpoints_prefix`, so it is never resumed nor
    listed among the ignored checkpoints, and it outlives their deletion."""
    if not _HASH_RE.fullmatch(stage_hash):
        raise InvalidKeyError(f"stage_hash must be 8-128 lowercase hex digits, got {stage_hash!r}")
    return join_key(run_prefix(run_id), "rejected", "checkpoints", safe_segment(subject),
                    safe_segment(method), stage_hash,
                    safe_segment(f"{rejected_at}-{CHECKPOINT_FILE}"))


def concept_prefix(run_id: str, subject: str, method: str) -> str:
    return artifact_key("concept", run_id=run_id, subject=subject, method=method)


def samples_prefix(run_id: str, subject: str, method: str) -> str:
    return artifact_key("samples", run_id=run_id, subject=subject, method=method)


def scores_prefix(run_id: str, subject: str, method: str) -> str:
    return artifact_key("scores", run_id=run_id, subject=subject, method=method)


def scores_key(run_id: str, subject: str, method: str) -> str:
    return join_key(scores_prefix(run_id, subject, method), SCORES_FILE)


def report_prefix(run_id: str) -> str:
    return artifact_key("report", run_id=run_id)


def prior_prefix(class_name: str, content_hash: str) -> str:
    """Class-prior images, shared by every run and subject of the class."""
    return artifact_key("prior", class_name=class_name, content_hash=content_hash)


def mask_cache_key(image_sha: str, extractor: str, settings_digest: str) -> str:
    """A cached mask, shared by runs: by photo content, extractor and its settings."""
    return artifact_key("mask", content_hash=image_sha,
                        name=f"{safe_segment(extractor)}-{settings_digest}.png")


def features_key(scorer_digest: str, image_sha: str) -> str:
    """A real photo's features under one scorer (named by a hash: scorer ids may hold paths)."""
    return artifact_key("features", content_hash=scorer_digest,
                        name=f"{image_sha}.safetensors")


def marker_key(prefix: str) -> str:
    """The completion marker of the stage at ``prefix``."""
    return join_key(prefix, MARKER_NAME)
