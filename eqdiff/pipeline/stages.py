"""The pipeline's stages as plain functions: inputs from the artifact store, outputs back to it.

Every stage runs on the skeleton of :mod:`eqdiff.pipeline.skeleton`: one prefix, a hash of
everything that determines its outputs, skipped when its marker holds that hash. Stages pass
store keys and small records, never tensors or models. Prefect tasks (``tasks/``) wrap these
one to one; the same functions run without Prefect for tests and quick scripts.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from eqdiff.config import MethodConfig
from eqdiff.data.datasets import Subject
from eqdiff.data.masks import build_extractor, write_subject_masks
from eqdiff.data.preprocess import SubjectManifest, mask_inputs, preprocess_subject
from eqdiff.data.prompts import PromptSet
from eqdiff.evaluation.metrics import (
    REAL_IMAGES,
    CLIPScorer,
    DINOScorer,
    FeatureCache,
    RealFeatures,
    real_features,
    real_image_rows,
    score_images,
)
from eqdiff.evaluation.scores import rebuild_report, save_scores
from eqdiff.method.concept import RRA_PREFIX, load_concept, save_concept
from eqdiff.method.models import load_sd_components, model_identity
from eqdiff.method.priors import generate_class_priors
from eqdiff.method.reference import training_extensions
from eqdiff.method.sampling import ConceptGenerator, plan_requests
from eqdiff.method.training import ConceptData, TrainingCallback, train_concept
from eqdiff.pipeline.digests import (
    evaluation_hash,
    ingest_digest,
    masks_digest,
    preprocess_digest,
    priors_digest,
    samples_digest,
    scores_digest,
    train_digest,
)
from eqdiff.pipeline.ingest import IngestedSubject, read_ingested
from eqdiff.pipeline.skeleton import (
    Produced,
    RunContext,
    StageFailed,
    StageResult,
    require_done,
    run_stage,
)
from eqdiff.pipeline.store_io import (
    SAMPLES_RECORD,
    StoreCheckpointer,
    download_prefix,
    generated_images,
    prior_tensors,
    read_manifest,
    real_images,
    reference_image,
    store_feature_cache,
    store_mask_cache,
    subject_tensors,
)
from eqdiff.store import keys
from eqdiff.store.keys import join_key

__all__ = ["RunContext", "StageFailed", "StageResult", "class_priors", "extract_masks",
           "generate", "ingest", "preprocess", "report", "score", "train"]

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


def ingest(ctx: RunContext, subject: Subject, prompt_set: PromptSet) -> StageResult:
    """Copy a subject's photos, its own masks and its class and prompts into the store.

    The only stage that opens dataset files: it runs where the dataset is read (the flow's own
    process), and every later stage reads the copy. Files are stored by content, so a rerun or
    another run over the same photos uploads nothing.
    """
    store = ctx.store()
    described = IngestedSubject.describe(subject, prompt_set)

    def work(scratch: Path) -> Produced:
        uploaded = described.copy_in(store, subject)
        described.write(scratch)
        return Produced(scratch, {"photos": len(described.photos),
                                  "masks": len(described.masks), "uploaded": uploaded})

    return run_stage(store, keys.ingest_prefix(ctx.run_id, subject.name),
                     ingest_digest(described), work, name="ingest")


def preprocess(ctx: RunContext, subject: str) -> StageResult:
    """Validate and normalise a subject's photos; fails (StageFailed) with too few usable ones."""
    store = ctx.store()
    prefix = keys.preprocess_prefix(ctx.run_id, subject)
    resolution = ctx.config.train.resolution
    ingested = require_done(store, keys.ingest_prefix(ctx.run_id, subject),
                            f"the ingest of {subject!r}")
    digest = preprocess_digest(ctx, ingested.config_hash)

    def work(scratch: Path) -> Produced:
        local = read_ingested(store, ctx.run_id, subject).fetch(store, scratch / "dataset")
        manifest = preprocess_subject(local, scratch / "out", resolution=resolution)
        if manifest.status != "ok":
            rejected = "; ".join(_summary(manifest)["rejected"])
            raise StageFailed(f"subject {subject!r}: {manifest.reason}"
                              + (f" ({rejected})" if rejected else ""))
        return Produced(scratch / "out", _summary(manifest))

    result = run_stage(store, prefix, digest, work, name="pre")
    if result.skipped:
        return StageResult(prefix, skipped=True,
                           info=_summary(read_manifest(store, ctx.run_id, subject)))
    return result


def _summary(manifest: SubjectManifest) -> dict:
    return {"images": len(manifest.images),
            "rejected": [f"{Path(r.source).name}: {r.reason}" for r in manifest.rejected]}


def extract_masks(ctx: RunContext, subject: str, *, device: str = "cpu") -> StageResult:
    """Mask every preprocessed photo with the configured extractor (and its fallbacks).

    A mask the extractor could not make, or one covering less than ``masks.min_coverage``, is
    replaced by the fallback's and then by the full mask: no mask written is empty. The info
    names the extractors that made the masks, counts the ``fallbacks`` and lists the
    ``warnings`` (one per fallback or near-full mask, naming the photo)."""
    store = ctx.store()
    source = keys.preprocess_prefix(ctx.run_id, subject)
    source_record = require_done(store, source, f"preprocessing of {subject!r}")
    ingested = require_done(store, keys.ingest_prefix(ctx.run_id, subject),
                            f"the ingest of {subject!r}")
    settings = ctx.config.masks
    digest = masks_digest(ctx, source_record.config_hash, ingested.config_hash)

    def work(scratch: Path) -> Produced:
        folder = download_prefix(store, source, scratch / "in")
        manifest = SubjectManifest.read(folder)
        provided = read_ingested(store, ctx.run_id, subject).fetch(store, scratch / "dataset",
                                                                   photos=False)
        wanted = settings.extractor
        if wanted == "provided" and provided.mask_dir is None:
            logger.info("%s: no mask folder; using %s", subject, settings.fallback)
            wanted = settings.fallback
        local_only = ctx.config.model.local_files_only
        extractor = build_extractor(wanted, settings, mask_dir=provided.mask_dir, device=device,
                                    local_files_only=local_only)
        fallback = build_extractor(settings.fallback, settings, mask_dir=provided.mask_dir,
                                   device=device, local_files_only=local_only
                                   ) if settings.fallback != "provided" else None
        written = write_subject_masks(subject, mask_inputs(manifest, folder),
                                      scratch / "out", extractor, fallback=fallback,
                                      cache=store_mask_cache(store),
                                      min_coverage=settings.min_coverage)
        made_by = sorted({r["extractor"] for r in written.masks.values()})
        warnings = [w for r in written.masks.values() for w in r["warnings"]]
        if written.fallbacks:
            logger.warning("%s: %d of %d masks fell back (see the warnings in masks.json)",
                           subject, written.fallbacks, len(written.masks))
        return Produced(scratch / "out", {"extractor": wanted, "extractors": made_by,
                                          "fallbacks": written.fallbacks,
                                          "warnings": warnings})

    return run_stage(store, keys.masks_prefix(ctx.run_id, subject), digest, work,
                     name="masks")


def class_priors(ctx: RunContext, class_noun: str, *, device: str = "cpu",
                 progress: Progress | None = None) -> StageResult:
    """Class-prior images for ``class_noun``, shared by every subject of that class."""
    train_settings = ctx.config.train
    digest = priors_digest(ctx, class_noun)

    def work(scratch: Path) -> Produced:
        components = load_sd_components(ctx.base_model,
                                        local_files_only=ctx.config.model.local_files_only)
        images = generate_class_priors(
            components, class_noun, count=train_settings.num_prior_images,
            seed=train_settings.prior_seed, sample=ctx.config.sample,
            resolution=train_settings.resolution, device=device,
            batch_size=ctx.config.sample.batch_size, progress=progress)
        for index, image in enumerate(images):
            image.save(scratch / f"{index:04d}.png", format="PNG")
        return Produced(scratch, {"class": class_noun,
                                  "base_model": model_identity(ctx.base_model)}, returned={})

    return run_stage(ctx.store(), keys.prior_prefix(class_noun, digest), digest, work,
                     name="priors")


def train(ctx: RunContext, subject: str, class_noun: str, method: MethodConfig, *,
          prior_prefix: str | None, device: str = "cpu",
          callbacks: Sequence[TrainingCallback] = ()) -> StageResult:
    """Train one (subject, method) concept.

    A training resumes from a stored checkpoint only if it was made under the same stage hash
    (settings, base model, photos, masks and priors); checkpoints of anything else are ignored,
    with a warning and an ``ignored_checkpoints`` entry in the result. One that cannot be
    resumed (unreadable, unsafe, damaged, not fitting) is moved to its rejected key and the
    training starts afresh, with a warning and a ``rejected_checkpoints`` entry. Once the
    concept is stored, the (subject, method)'s checkpoints are deleted.
    """
    store = ctx.store()
    masks_record = require_done(store, keys.masks_prefix(ctx.run_id, subject),
                                f"the masks of {subject!r}")
    digest = train_digest(ctx, method, masks_record.config_hash, prior_prefix)
    checkpoints = keys.checkpoints_prefix(ctx.run_id, subject, method.name)
    resume_key = keys.checkpoint_key(ctx.run_id, subject, method.name, digest)

    def work(scratch: Path) -> Produced:
        stale = [key for key in store.list_keys(checkpoints + "/") if key != resume_key]
        if stale:
            logger.warning("%s/%s: not resuming from %d checkpoint(s) made for other settings or "
                           "inputs: %s", subject, method.name, len(stale), ", ".join(stale))
        images, masks = subject_tensors(store, ctx.run_id, subject)
        priors = (prior_tensors(store, prior_prefix)
                  if prior_prefix and method.prior_preservation
                  else torch.empty(0, *images.shape[1:]))
        data = ConceptData(subject, class_noun, images, masks, priors)
        components = load_sd_components(ctx.base_model,
                                        local_files_only=ctx.config.model.local_files_only)
        checkpointer = StoreCheckpointer(
            store, resume_key, scratch / "checkpoint", ctx.config.train.checkpoint_every,
            name=f"{subject}/{method.name}",
            rejected_key=lambda when: keys.rejected_checkpoint_key(ctx.run_id, subject,
                                                                   method.name, digest, when))
        trained = train_concept(components, data, ctx.config, method, device=device,
                                checkpointer=checkpointer, callbacks=callbacks,
                                extensions=training_extensions(ctx.config.rra, method))
        folder = save_concept(scratch / "concept", trained.tensors, trained.metadata,
                              base_model=ctx.base_model)
        losses = trained.loss_history
        facts = {"steps": trained.metadata["steps"],
                 "resumed_from_step": trained.metadata["resumed_from_step"],
                 "seconds": trained.metadata["seconds"],
                 "first_loss": losses[0]["loss"] if losses else None,
                 "last_loss": losses[-1]["loss"] if losses else None}
        notes = {"ignored_checkpoints": stale, "rejected_checkpoints": checkpointer.rejected}
        return Produced(folder, facts, returned={**facts, **{k: v for k, v in notes.items() if v}})

    result = run_stage(store, keys.concept_prefix(ctx.run_id, subject, method.name), digest,
                       work, name="train")
    store.delete_prefix(checkpoints)  # the concept is stored: nothing is left to resume
    return result


def generate(ctx: RunContext, generator: Callable[[], ConceptGenerator], subject: str,
             method: str, prompts: Sequence[str], *,
             progress: Progress | None = None) -> StageResult:
    """Draw ``images_per_prompt`` images per prompt with the trained concept.

    ``prompts`` hold the placeholder token already. Seeds depend on (subject, prompt, k) only,
    so every method is drawn on identical noise. ``generator`` gives the (usually cached)
    generator; it is only called when there is work to do, so a rerun loads no model.
    """
    store = ctx.store()
    concept_key = keys.concept_prefix(ctx.run_id, subject, method)
    concept_record = require_done(store, concept_key, f"the concept {subject}/{method}")
    sample = ctx.config.sample
    digest = samples_digest(ctx, concept_record.config_hash, prompts)

    def work(scratch: Path) -> Produced:
        concept = load_concept(download_prefix(store, concept_key, scratch / "concept"))
        reference = (reference_image(store, ctx.run_id, subject, sample.resolution)
                     if concept.tensors_with_prefix(RRA_PREFIX) else None)
        requests = plan_requests(subject, list(prompts), sample.images_per_prompt,
                                 sample.seed)
        images = generator().generate(concept, requests, reference_image=reference,
                                      progress=progress)
        out = scratch / "samples"
        records = []
        for image in images:
            name = f"{image.record['prompt_index']:02d}_{image.record['k']}.png"
            image.save(out / name)
            records.append({"file": name, **image.record})
        (out / SAMPLES_RECORD).write_text(json.dumps(records, indent=2))
        return Produced(out, {"images": len(images)})

    return run_stage(store, keys.samples_prefix(ctx.run_id, subject, method), digest, work,
                     name="gen")


def score(ctx: RunContext, scorers: Callable[[], tuple[CLIPScorer, DINOScorer]],
          subject: str, methods: Sequence[str], *,
          cache: FeatureCache | None = None) -> StageResult:
    """CLIP-I, CLIP-T and DINO for every method of one subject, plus the real-images bound.

    Real-image features are computed once for the subject (and cached in the store).
    ``scorers`` gives the (usually cached) scorers, called only when something is unscored.
    Each (subject, method) is its own stage, so one new method scores only that method."""
    store = ctx.store()
    cache = cache or store_feature_cache(store)
    photos = require_done(store, keys.preprocess_prefix(ctx.run_id, subject),
                          f"preprocessing of {subject!r}")
    eval_hash = evaluation_hash(ctx.config.eval)
    real: RealFeatures | None = None
    scored, skipped = [], []
    for method in [REAL_IMAGES, *methods]:
        if method == REAL_IMAGES:
            source_hash = photos.config_hash
        else:
            source_hash = require_done(
                store, keys.samples_prefix(ctx.run_id, subject, method),
                f"the samples of {subject}/{method}").config_hash
        digest = scores_digest(eval_hash, source_hash)
        if store.is_done(keys.scores_prefix(ctx.run_id, subject, method),
                         expect_hash=digest):
            skipped.append(method)
            continue
        clip, dino = scorers()
        real = real or real_features(real_images(store, ctx.run_id, subject), clip, dino,
                                     cache)
        manifest = read_manifest(store, ctx.run_id, subject)
        common = {"run_id": ctx.run_id, "subject": subject,
                  "class_noun": manifest.class_noun, "kind": manifest.kind}
        if method == REAL_IMAGES:
            rows = real_image_rows(real, **common)
        else:
            rows = score_images(
                generated_images(store, keys.samples_prefix(ctx.run_id, subject, method)),
                real, clip=clip, dino=dino, method=method,
                placeholders=ctx.config.train.placeholder_token, **common)
        save_scores(store, rows, run_id=ctx.run_id, subject=subject, method=method,
                    config_hash=digest)
        scored.append(method)
    return StageResult(keys.run_prefix(ctx.run_id), skipped=not scored,
                       info={"scored": scored, "already scored": skipped})


def report(ctx: RunContext) -> StageResult:
    """Rebuild the run's report from its stored scores (nothing recomputed)."""
    store = ctx.store()
    prefix = keys.report_prefix(ctx.run_id)
    with tempfile.TemporaryDirectory(prefix="eqdiff-report-") as scratch:
        html = rebuild_report(store, ctx.run_id, Path(scratch))
        key = join_key(prefix, html.name)
    return StageResult(prefix, skipped=False, info={"report": key, "location": store.location(key)})
