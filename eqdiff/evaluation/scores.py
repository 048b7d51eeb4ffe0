"""Evaluation results in the artifact store: save scores, and (re)build the report from them.

Scores of one (subject, method) live at ``runs/{run}/scores/{subject}/{method}/scores.parquet``
(a stage with a completion marker); the run record at ``runs/{run}/run.json``. Rebuilding the
report reads only these — nothing is recomputed — and writes the files of
:func:`eqdiff.evaluation.report.write_report` under ``runs/{run}/report/``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import platform
import subprocess
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from eqdiff.config import RunConfig, config_hash, from_dict
from eqdiff.evaluation.metrics import SCORE_COLUMNS
from eqdiff.evaluation.report import FAILURE_COLUMNS, check_scores, write_report
from eqdiff.evaluation.report.tables import DATASET_ROW
from eqdiff.store import ArtifactNotFoundError, ArtifactStore, ObjectInfo, keys
from eqdiff.store.keys import RUN_RECORD, SCORES_FILE, join_key, unescape_segment

logger = logging.getLogger(__name__)

VERSIONED_PACKAGES = ("eqdiff", "torch", "torchvision", "diffusers", "transformers",
                      "open_clip_torch", "pandas", "numpy", "pillow")


def save_scores(store: ArtifactStore, scores: pd.DataFrame, *, run_id: str, subject: str,
                method: str, config_hash: str) -> ObjectInfo:
    """Store one (subject, method)'s score rows as a finished stage."""
    buffer = io.BytesIO()
    check_scores(scores).to_parquet(buffer, index=False)
    prefix = keys.scores_prefix(run_id, subject, method)
    with store.stage(prefix, config_hash, info={"rows": len(scores)}) as stage:
        return stage.put_bytes(SCORES_FILE, buffer.getvalue())


def read_run_record(store: ArtifactStore, run_id: str) -> dict[str, Any]:
    """``run.json`` of the run, or ``{}`` when it was never written (logged)."""
    try:
        return store.get_json(keys.run_record(run_id))
    except ArtifactNotFoundError:
        logger.warning("%s: run %s has no %s; provenance will be thin", store.url, run_id,
                       RUN_RECORD)
        return {}


def load_run_scores(store: ArtifactStore, run_id: str, run: Mapping[str, Any] | None = None
                    ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """All finished score tables of a run, concatenated, and the failures table.

    Failures are the pairs the run record marks ``failed: …`` (a failed subject counts for each
    of the run's methods), pairs it marks done that have no finished scores, score files
    without a completion marker (never read), and the dataset's problems (method
    ``DATASET_ROW``: a folder nobody listed, a listed subject without photos, ...).
    """
    run = dict(run if run is not None else read_run_record(store, run_id))
    root = keys.scores_root(run_id) + "/"
    tables, failures, scored = [], [], set()
    for key in store.list_keys(root):
        parts = key.removeprefix(root).split("/")
        if len(parts) != 3 or parts[2] != SCORES_FILE:
            continue
        subject, method = unescape_segment(parts[0]), unescape_segment(parts[1])
        record = store.read_marker(keys.scores_prefix(run_id, subject, method))
        if record is None:
            failures.append((subject, method, "scores incomplete: no completion marker"))
            continue
        sha = record.output(key).sha256 if any(o.key == key for o in record.outputs) else None
        tables.append(pd.read_parquet(io.BytesIO(store.get_bytes(key, sha256=sha))))
        scored.add((subject, method))
    methods = [m["name"] for m in run.get("config", {}).get("methods", [])]
    for name, status in dict(run.get("status", {})).items():
        subject, _, method = str(name).partition("/")
        if not method:  # a subject-level entry: only a failure matters, for every method
            if str(status).startswith("failed"):
                reason = str(status).removeprefix("failed:").strip()
                failures += [(subject, m, reason) for m in methods
                             if (subject, m) not in scored]
            continue
        if (subject, method) in scored or any(f[:2] == (subject, method) for f in failures):
            continue
        reason = (str(status).removeprefix("failed:").strip() if str(status).startswith("failed")
                  else f"no scores stored (stage status: {status})")
        failures.append((subject, method, reason))
    for problem in run.get("dataset_problems", []):  # left out while loading the dataset
        failures.append((problem["subject"], DATASET_ROW, problem["message"]))
    scores = (check_scores(pd.concat(tables, ignore_index=True)) if tables
              else pd.DataFrame(columns=list(SCORE_COLUMNS)))
    logger.info("%s: run %s: %d score row(s) from %d table(s), %d failure(s)", store.url,
                run_id, len(scores), len(tables), len(failures))
    return scores, pd.DataFrame(failures, columns=list(FAILURE_COLUMNS))


def source_commit(folder: str | Path) -> str:
    """The git commit of the code in ``folder`` ("… (with uncommitted changes)" when tracked
    files differ from it; "unknown" outside a git checkout)."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True)

    try:
        head = git("rev-parse", "HEAD")
    except OSError:
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty else "")


def package_versions(names: tuple[str, ...] = VERSIONED_PACKAGES) -> dict[str, str]:
    """Installed versions of ``names`` (by default the packages that change results), plus
    Python's."""
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def run_provenance(run: Mapping[str, Any], scores: pd.DataFrame) -> dict[str, Any]:
    """What docs/evaluation.md asks every report to record, from the run record and the scores."""
    provenance: dict[str, Any] = {"run id": run.get("run_id", "")}
    config = from_dict(RunConfig, run["config"]) if "config" in run else None
    generated = scores[scores["seed"] >= 0] if len(scores) else scores
    per_prompt = (generated.groupby(["subject", "method", "prompt_index"]).size()
                  if len(generated) else pd.Series(dtype="int64"))
    provenance["base model"] = run.get("base_model") or (config.model.base_model if config
                                                          else "unknown")
    if config is not None:
        provenance["CLIP model"] = f"{config.eval.clip_model} ({config.eval.clip_pretrained})"
        provenance["DINO model"] = config.eval.dino_model
        provenance["images per prompt (configured)"] = config.sample.images_per_prompt
        provenance["sampling seed"] = config.sample.seed
        provenance["mask extractor"] = (f"{config.masks.extractor} (fallback "
                                        f"{config.masks.fallback})")
        from eqdiff.method.identity import training_hash

        provenance["training config hash per method"] = {
            m.name: training_hash(config, m) for m in config.methods}
        provenance["sampling config hash"] = config_hash(config.sample)
    provenance["images per prompt (scored)"] = (sorted({int(n) for n in per_prompt})
                                                if len(per_prompt) else [])
    provenance["seeds in scores"] = sorted({int(s) for s in generated["seed"]})
    provenance["dataset"] = run.get("dataset", "unknown")
    provenance["dataset layout"] = run.get("dataset_layout") or "not recorded"
    provenance["package versions (report build)"] = package_versions()
    return provenance


REPORT_PAGE = "report.html"


def _report_inputs(run: Mapping[str, Any], scores: pd.DataFrame,
                   failures: pd.DataFrame) -> str:
    """The hash a report's marker holds: of the score rows and failures it was built from and
    the dataset's layout (which decides whether the published DreamBench numbers are shown)."""
    layout = str(run.get("dataset_layout", ""))
    return hashlib.sha256(pd.util.hash_pandas_object(scores, index=False).to_numpy().tobytes()
                          + failures.to_csv(index=False).encode()
                          + layout.encode()).hexdigest()[:16]


def current_report(store: ArtifactStore, run_id: str) -> str | None:
    """The key of ``run_id``'s stored report page when it was built from what the store holds
    now (nothing to rebuild), else ``None``."""
    run = read_run_record(store, run_id)
    scores, failures = load_run_scores(store, run_id, run)
    prefix = keys.report_prefix(run_id)
    if store.is_done(prefix, expect_hash=_report_inputs(run, scores, failures)):
        return join_key(prefix, REPORT_PAGE)
    return None


def rebuild_report(store: ArtifactStore, run_id: str, out: str | Path, *,
                   thumb_px: int = 96) -> Path:
    """Build the report of ``run_id`` from stored scores into the folder ``out``, upload it to
    ``runs/{run}/report/`` and return the local ``report.html``. Nothing is recomputed."""
    run = read_run_record(store, run_id)
    scores, failures = load_run_scores(store, run_id, run)
    if scores.empty and failures.empty:
        raise ValueError(f"{store.url}: run {run_id!r} has no scores and no recorded stages; "
                         "nothing to report")
    out = Path(out)
    files = write_report(scores, out, failures=failures, provenance=run_provenance(run, scores),
                         load_image=store.get_bytes, title=f"EqDiff evaluation — run {run_id}",
                         thumb_px=thumb_px, dataset_layout=str(run.get("dataset_layout", "")))
    with store.stage(keys.report_prefix(run_id), _report_inputs(run, scores, failures)) as stage:
        for path in files:
            stage.put_file(path.relative_to(out).as_posix(), path)
    return out / REPORT_PAGE
