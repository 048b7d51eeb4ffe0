"""The pipeline's stages as plain functions: inputs from the artifact store, outputs back to it.

Each stage writes its outputs under one prefix and a completion marker last (with the hash of
everything that determines the outputs), and returns at once when that marker exists — so a
rerun costs seconds and a crashed run continues where it stopped. Stages pass store keys and
small records, never tensors or models. Prefect tasks (``tasks/``) wrap these one to one; the
same functions run without Prefect for tests and quick scripts.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from eqdiff.config import EvalConfig, MethodConfig, RunConfig, config_hash
from eqdiff.data.datasets import Subject
from eqdiff.data.images import file_sha256, pil_to_tensor
from eqdiff.data.masks import (
    MaskCache,
    build_extractor,
    decode_mask_png,
    mask_to_tensor,
    write_subject_masks,
)
from eqdiff.data.preprocess import MANIFEST, SubjectManifest, mask_inputs, preprocess_subject
from eqdiff.evaluation.metrics import (
    REAL_IMAGES,
    CLIPScorer,
    DINOScorer,
    FeatureCache,
    RealFeatures,
    RealImage,
    real_features,
    real_image_rows,
    score_images,
)
from eqdiff.evaluation.metrics import GeneratedImage as ScoredImage
from eqdiff.evaluation.scores import rebuild_report, save_scores
from eqdiff.method.concept import RRA_PREFIX, load_concept, save_concept
from eqdiff.method.models import load_sd_components, model_identity
from eqdiff.method.priors import generate_class_priors, prior_hash
from eqdiff.method.reference import training_extensions
from eqdiff.method.sampling import ConceptGenerator, plan_requests
from eqdiff.method.training import (
    Checkpointer,
    ConceptData,
    ConceptTrainer,
    TrainingCallback,
    train_concept,
    training_hash,
)
from eqdiff.store.storage import ArtifactStore, artifact_key, join_key, store_from_config

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


class StageFailed(Exception):
    """A stage could not produce its outputs for a reason that retrying will not fix
    (bad images, too few photos, an unusable subject). The message is shown in the report."""


@dataclass(frozen=True)
class RunContext:
    """What every stage needs to find its inputs and outputs. Small and picklable."""

    run_id: str
    config: RunConfig

    def store(self) -> ArtifactStore:
        return store_from_config(self.config.storage)

    @property
    def base_model(self) -> str:
        return self.config.model.base_model


@dataclass(frozen=True)
class StageResult:
    """A stage's outcome: the prefix it wrote and whether it did any work."""

    prefix: str
    skipped: bool
    info: dict = field(default_factory=dict)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _upload_folder(stage, folder: Path) -> None:
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stage.put_file(path.relative_to(folder).as_posix(), path)


def _download_prefix(store: ArtifactStore, prefix: str, folder: Path) -> Path:
    for key in store.list_keys(prefix + "/"):
        relative = key[len(prefix) + 1:]
        if relative.startswith("_"):
            continue  # markers
        store.get_file(key, folder / relative)
    return folder


# --------------------------------------------------------------------------- preprocess

def preprocess_prefix(run_id: str, subject: str) -> str:
    return join_key(artifact_key("subject", run_id=run_id, subject=subject), "preprocess")


def preprocess(ctx: RunContext, subject: Subject) -> StageResult:
    """Validate and normalise a subject's photos; fails (StageFailed) with too few usable ones."""
    store = ctx.store()
    prefix = preprocess_prefix(ctx.run_id, subject.name)
    resolution = ctx.config.train.resolution
    digest = config_hash({"resolution": resolution, "class": subject.class_noun,
                          "sources": [file_sha256(p) for p in subject.image_paths]})
    record = store.read_marker(prefix)
    if record is not None and record.config_hash == digest:
        manifest = SubjectManifest.from_dict(store.get_json(join_key(prefix, MANIFEST)))
    else:
        with tempfile.TemporaryDirectory(prefix="eqdiff-pre-") as scratch:
            manifest = preprocess_subject(subject, Path(scratch), resolution=resolution)
            if manifest.status == "ok":
                with store.stage(prefix, digest, info={"images": len(manifest.images)}) as st:
                    _upload_folder(st, Path(scratch))
        record = None
    if manifest.status != "ok":
        raise StageFailed(f"subject {subject.name!r}: {manifest.reason}")
    return StageResult(prefix, skipped=record is not None,
                       info={"images": len(manifest.images),
                             "rejected": [f"{Path(r.source).name}: {r.reason}"
                                          for r in manifest.rejected]})


# --------------------------------------------------------------------------- masks

def masks_prefix(run_id: str, subject: str) -> str:
    return join_key(artifact_key("subject", run_id=run_id, subject=subject), "masks")


def store_mask_cache(store: ArtifactStore) -> MaskCache:
    """Masks cached in the store (``cache/masks/…``), shared by runs and methods."""

    def get(key: str) -> bytes | None:
        return store.get_bytes(key) if store.exists(key) else None

    def put(key: str, data: bytes) -> None:
        store.put_bytes(key, data)

    return MaskCache(get=get, put=put)


def extract_masks(ctx: RunContext, subject: Subject, *, device: str = "cpu") -> StageResult:
    """Mask every preprocessed photo with the configured extractor (and its fallbacks)."""
    store = ctx.store()
    prefix = masks_prefix(ctx.run_id, subject.name)
    source = preprocess_prefix(ctx.run_id, subject.name)
    source_record = store.read_marker(source)
    if source_record is None:
        raise RuntimeError(f"{source} is not done: run preprocessing first")
    mcfg = ctx.config.masks
    digest = config_hash(mcfg, source_record.config_hash,
                         str(subject.mask_dir) if subject.mask_dir else "")
    if store.is_done(prefix, expect_hash=digest):
        return StageResult(prefix, skipped=True)
    with tempfile.TemporaryDirectory(prefix="eqdiff-masks-") as scratch:
        folder = _download_prefix(store, source, Path(scratch) / "in")
        manifest = SubjectManifest.read(folder)
        wanted = mcfg.extractor
        if wanted == "provided" and subject.mask_dir is None:
            logger.info("%s: no mask folder; using %s", subject.name, mcfg.fallback)
            wanted = mcfg.fallback
        extractor = build_extractor(wanted, mcfg, mask_dir=subject.mask_dir, device=device,
                                    local_files_only=ctx.config.model.local_files_only)
        fallback = build_extractor(mcfg.fallback, mcfg, mask_dir=subject.mask_dir,
                                   device=device) if mcfg.fallback != "provided" else None
        written = write_subject_masks(subject.name, mask_inputs(manifest, folder),
                                      Path(scratch) / "out", extractor, fallback=fallback,
                                      cache=store_mask_cache(store))
        with store.stage(prefix, digest, info={"extractor": wanted}) as st:
            _upload_folder(st, Path(scratch) / "out")
    made_by = sorted({r["extractor"] for r in written.masks.values()})
    warnings = [w for r in written.masks.values() for w in r["warnings"]]
    return StageResult(prefix, skipped=False, info={"extractors": made_by,
                                                    "warnings": warnings})


# --------------------------------------------------------------------------- class priors

def class_priors(ctx: RunContext, class_noun: str, *, device: str = "cpu",
                 progress: Progress | None = None) -> StageResult:
    """Class-prior images for ``class_noun``, shared by every subject of that class."""
    store = ctx.store()
    tcfg = ctx.config.train
    digest = prior_hash(ctx.base_model, class_noun, count=tcfg.num_prior_images,
                        seed=tcfg.prior_seed, sample=ctx.config.sample,
                        resolution=tcfg.resolution)
    prefix = artifact_key("prior", class_name=class_noun, content_hash=digest)
    if store.is_done(prefix, expect_hash=digest):
        return StageResult(prefix, skipped=True)
    components = load_sd_components(ctx.base_model,
                                    local_files_only=ctx.config.model.local_files_only)
    images = generate_class_priors(components, class_noun, count=tcfg.num_prior_images,
                                   seed=tcfg.prior_seed, sample=ctx.config.sample,
                                   resolution=tcfg.resolution, device=device,
                                   batch_size=ctx.config.sample.batch_size, progress=progress)
    with store.stage(prefix, digest, info={"class": class_noun,
                                           "base_model": model_identity(ctx.base_model)}) as st:
        for index, image in enumerate(images):
            st.put_bytes(f"{index:04d}.png", _png(image))
    return StageResult(prefix, skipped=False)


# --------------------------------------------------------------------------- training

class StoreCheckpointer(Checkpointer):
    """A :class:`Checkpointer` whose file also lives in the store, so a run resumes on any
    worker after the one that trained it died."""

    def __init__(self, store: ArtifactStore, prefix: str, folder: Path, every: int) -> None:
        super().__init__(folder, every)
        self.store, self.key = store, join_key(prefix, "last.pt")

    def restore(self, trainer: ConceptTrainer) -> bool:
        if self.store.exists(self.key):
            self.store.get_file(self.key, self.path)
        return super().restore(trainer)

    def save(self, trainer: ConceptTrainer) -> None:
        super().save(trainer)
        self.store.put_file(self.key, self.path)


def _subject_tensors(store: ArtifactStore, run_id: str, subject: str
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    pre, masks = preprocess_prefix(run_id, subject), masks_prefix(run_id, subject)
    manifest = SubjectManifest.from_dict(store.get_json(join_key(pre, MANIFEST)))
    images, mask_list = [], []
    for entry in manifest.images:
        with Image.open(io.BytesIO(store.get_bytes(join_key(pre, entry.file)))) as image:
            images.append(pil_to_tensor(image.convert("RGB")))
        mask, _ = decode_mask_png(store.get_bytes(join_key(masks, f"{entry.name}.png")))
        mask_list.append(mask_to_tensor(mask))
    return torch.stack(images), torch.stack(mask_list)


def _prior_tensors(store: ArtifactStore, prefix: str) -> torch.Tensor:
    keys = sorted(k for k in store.list_keys(prefix + "/") if k.endswith(".png"))
    tensors = []
    for key in keys:
        with Image.open(store.local_path(key)) as image:
            tensors.append(pil_to_tensor(image.convert("RGB")))
    return torch.stack(tensors)


def concept_prefix(run_id: str, subject: str, method: str) -> str:
    return artifact_key("concept", run_id=run_id, subject=subject, method=method)


def train(ctx: RunContext, subject: str, class_noun: str, method: MethodConfig, *,
          prior_prefix: str | None, device: str = "cpu",
          callbacks: Sequence[TrainingCallback] = ()) -> StageResult:
    """Train one (subject, method) concept; resumes from the stored checkpoint if any."""
    store = ctx.store()
    prefix = concept_prefix(ctx.run_id, subject, method.name)
    masks_record = store.read_marker(masks_prefix(ctx.run_id, subject))
    if masks_record is None:
        raise RuntimeError(f"masks of {subject!r} are not done: run the mask stage first")
    digest = config_hash(training_hash(ctx.config, method), masks_record.config_hash,
                         prior_prefix or "")
    if store.is_done(prefix, expect_hash=digest):
        return StageResult(prefix, skipped=True)
    images, masks = _subject_tensors(store, ctx.run_id, subject)
    priors = (_prior_tensors(store, prior_prefix) if prior_prefix and method.prior_preservation
              else torch.empty(0, *images.shape[1:]))
    data = ConceptData(subject, class_noun, images, masks, priors)
    components = load_sd_components(ctx.base_model,
                                    local_files_only=ctx.config.model.local_files_only)
    with tempfile.TemporaryDirectory(prefix="eqdiff-train-") as scratch:
        checkpointer = StoreCheckpointer(
            store, artifact_key("checkpoint", run_id=ctx.run_id, subject=subject,
                                method=method.name),
            Path(scratch) / "checkpoint", ctx.config.train.checkpoint_every)
        trained = train_concept(components, data, ctx.config, method, device=device,
                                checkpointer=checkpointer, callbacks=callbacks,
                                extensions=training_extensions(ctx.config.rra, method))
        folder = save_concept(Path(scratch) / "concept", trained.tensors, trained.metadata,
                              base_model=ctx.base_model)
        losses = trained.loss_history
        info = {"steps": trained.metadata["steps"],
                "resumed_from_step": trained.metadata["resumed_from_step"],
                "seconds": trained.metadata["seconds"],
                "first_loss": losses[0]["loss"] if losses else None,
                "last_loss": losses[-1]["loss"] if losses else None}
        with store.stage(prefix, digest, info=info) as st:
            _upload_folder(st, folder)
    return StageResult(prefix, skipped=False, info=info)


# --------------------------------------------------------------------------- generation

def samples_prefix(run_id: str, subject: str, method: str) -> str:
    return artifact_key("samples", run_id=run_id, subject=subject, method=method)


SAMPLES_RECORD = "samples.json"


def _reference_image(store: ArtifactStore, run_id: str, subject: str,
                     resolution: int) -> torch.Tensor:
    """The subject's first preprocessed photo, (3, R, R) in [-1, 1]: RRA's fixed reference."""
    pre = preprocess_prefix(run_id, subject)
    manifest = SubjectManifest.from_dict(store.get_json(join_key(pre, MANIFEST)))
    with Image.open(io.BytesIO(store.get_bytes(join_key(pre, manifest.images[0].file)))) as im:
        image = im.convert("RGB").resize((resolution, resolution), Image.Resampling.BICUBIC)
    return pil_to_tensor(image)


def generate(ctx: RunContext, generator: Callable[[], ConceptGenerator], subject: Subject,
             method: str, prompts: Sequence[str], *,
             progress: Progress | None = None) -> StageResult:
    """Draw ``images_per_prompt`` images per prompt with the trained concept.

    ``prompts`` hold the placeholder token already. Seeds depend on (subject, prompt, k) only,
    so every method is drawn on identical noise. ``generator`` gives the (usually cached)
    generator; it is only called when there is work to do, so a rerun loads no model.
    """
    store = ctx.store()
    prefix = samples_prefix(ctx.run_id, subject.name, method)
    concept_key = concept_prefix(ctx.run_id, subject.name, method)
    concept_record = store.read_marker(concept_key)
    if concept_record is None:
        raise RuntimeError(f"concept {concept_key} is not done: train it first")
    sample = ctx.config.sample
    digest = config_hash(concept_record.config_hash, sample, list(prompts))
    if store.is_done(prefix, expect_hash=digest):
        return StageResult(prefix, skipped=True)
    with tempfile.TemporaryDirectory(prefix="eqdiff-gen-") as scratch:
        concept = load_concept(_download_prefix(store, concept_key, Path(scratch) / "concept"))
        reference = (_reference_image(store, ctx.run_id, subject.name, sample.resolution)
                     if concept.tensors_with_prefix(RRA_PREFIX) else None)
        requests = plan_requests(subject.name, list(prompts), sample.images_per_prompt,
                                 sample.seed)
        images = generator().generate(concept, requests, reference_image=reference,
                                      progress=progress)
        out = Path(scratch) / "samples"
        records = []
        for image in images:
            name = f"{image.record['prompt_index']:02d}_{image.record['k']}.png"
            image.save(out / name)
            records.append({"file": name, **image.record})
        (out / SAMPLES_RECORD).write_text(json.dumps(records, indent=2))
        with store.stage(prefix, digest, info={"images": len(images)}) as st:
            _upload_folder(st, out)
    return StageResult(prefix, skipped=False, info={"images": len(images)})


# --------------------------------------------------------------------------- evaluation

def evaluation_hash(config: EvalConfig) -> str:
    """The evaluation settings and the identity of each scorer's weights: replacing a local
    CLIP or DINO model in place rescores instead of keeping the old scores."""
    return config_hash(config, *(model_identity(source) for source in
                                 (config.clip_model, config.clip_pretrained, config.dino_model)))


def store_feature_cache(store: ArtifactStore) -> FeatureCache:
    """Real-image features persisted in the store (``cache/features/…``), so reruns and other
    runs embed each real photo once per scorer."""

    def key_for(name: str) -> str:
        scorer, sha = name.rsplit("/", 1)  # scorer ids may hold paths: name them by hash
        return join_key("cache", "features", config_hash(scorer), f"{sha}.safetensors")

    def load(name: str) -> torch.Tensor | None:
        key = key_for(name)
        return (safetensors_load(store.get_bytes(key))["features"] if store.exists(key)
                else None)

    def save(name: str, features: torch.Tensor) -> None:
        store.put_bytes(key_for(name), safetensors_save({"features": features.contiguous()}))

    return FeatureCache(load=load, save=save)


def _real_images(store: ArtifactStore, run_id: str, subject: str) -> list[RealImage]:
    pre = preprocess_prefix(run_id, subject)
    manifest = SubjectManifest.from_dict(store.get_json(join_key(pre, MANIFEST)))
    images = []
    for entry in manifest.images:
        key = join_key(pre, entry.file)
        with Image.open(io.BytesIO(store.get_bytes(key))) as image:
            images.append(RealImage(key, entry.sha256, image.convert("RGB")))
    return images


def _generated_images(store: ArtifactStore, prefix: str) -> list[ScoredImage]:
    records = json.loads(store.get_bytes(join_key(prefix, SAMPLES_RECORD)))
    images = []
    for record in records:
        key = join_key(prefix, record["file"])
        with Image.open(io.BytesIO(store.get_bytes(key))) as image:
            images.append(ScoredImage(key, record["prompt"], record["prompt_index"],
                                      record["seed"], image.convert("RGB")))
    return images


def score(ctx: RunContext, scorers: Callable[[], tuple[CLIPScorer, DINOScorer]],
          subject: Subject, methods: Sequence[str], *,
          cache: FeatureCache | None = None) -> StageResult:
    """CLIP-I, CLIP-T and DINO for every method of one subject, plus the real-images bound.

    Real-image features are computed once for the subject (and cached in the store).
    ``scorers`` gives the (usually cached) scorers, called only when something is unscored."""
    store = ctx.store()
    cache = cache or store_feature_cache(store)
    pre_record = store.read_marker(preprocess_prefix(ctx.run_id, subject.name))
    if pre_record is None:
        raise RuntimeError(f"{subject.name} was not preprocessed")
    eval_hash = evaluation_hash(ctx.config.eval)
    real: RealFeatures | None = None
    scored, skipped = [], []
    for method in [REAL_IMAGES, *methods]:
        if method == REAL_IMAGES:
            source_hash = pre_record.config_hash
        else:
            marker = store.read_marker(samples_prefix(ctx.run_id, subject.name, method))
            if marker is None:
                raise RuntimeError(f"samples of {subject.name}/{method} are not done")
            source_hash = marker.config_hash
        digest = config_hash(eval_hash, source_hash)
        prefix = artifact_key("scores", run_id=ctx.run_id, subject=subject.name, method=method)
        if store.is_done(prefix, expect_hash=digest):
            skipped.append(method)
            continue
        clip, dino = scorers()
        real = real or real_features(_real_images(store, ctx.run_id, subject.name), clip, dino,
                                     cache)
        common = {"run_id": ctx.run_id, "subject": subject.name,
                  "class_noun": subject.class_noun, "kind": subject.kind}
        if method == REAL_IMAGES:
            rows = real_image_rows(real, **common)
        else:
            rows = score_images(
                _generated_images(store, samples_prefix(ctx.run_id, subject.name, method)),
                real, clip=clip, dino=dino, method=method,
                placeholders=ctx.config.train.placeholder_token, **common)
        save_scores(store, rows, run_id=ctx.run_id, subject=subject.name, method=method,
                    config_hash=digest)
        scored.append(method)
    return StageResult(artifact_key("run", run_id=ctx.run_id), skipped=not scored,
                       info={"scored": scored, "already scored": skipped})


def report(ctx: RunContext) -> StageResult:
    """Rebuild the run's report from its stored scores (nothing recomputed)."""
    store = ctx.store()
    with tempfile.TemporaryDirectory(prefix="eqdiff-report-") as scratch:
        html = rebuild_report(store, ctx.run_id, Path(scratch))
        key = join_key(artifact_key("report", run_id=ctx.run_id), html.name)
    return StageResult(artifact_key("report", run_id=ctx.run_id), skipped=False,
                       info={"report": key, "url": store.url_for(key)})
