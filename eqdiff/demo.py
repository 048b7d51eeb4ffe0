"""The demo: the whole local job on embedded defaults, with no GPU, weights or credentials.

It builds the offline model zoo, draws the synthetic demo dataset, and for every subject and
method: normalises the photos, reads the subject masks, draws class-prior images (shared per
class), trains a concept, and draws a few images of it in new contexts — persisting each stage
to the artifact store with a completion marker, so a rerun skips finished work.

This sequential runner is what exists before the Prefect/Ray flow (issue 8); the flow will
run the same stages as tasks.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image

from eqdiff.concept import apply_concept, load_concept, save_concept
from eqdiff.config import (
    RunConfig,
    SampleConfig,
    TrainConfig,
    config_hash,
    method_preset,
    to_dict,
)
from eqdiff.datasets import Dataset, Subject, load_dataset
from eqdiff.demo_data import write_demo_dataset
from eqdiff.images import ImageError, fit_mask, load_image, normalise_image, pil_to_tensor
from eqdiff.models import load_sd_components
from eqdiff.priors import generate_class_priors, prior_hash
from eqdiff.storage import ArtifactStore, artifact_key, open_store
from eqdiff.training import ConceptData, ProgressBar, train_concept, training_hash
from eqdiff.zoo import build_zoo

logger = logging.getLogger(__name__)

DEMO_METHODS = ("eqdiff-no-rra", "custom-diffusion")
DEMO_RESOLUTION = 64


def demo_config(steps: int = 30) -> RunConfig:
    """Small settings for the tiny offline model on a CPU."""
    return RunConfig(
        methods=tuple(method_preset(m) for m in DEMO_METHODS),
        train=TrainConfig(steps=steps, resolution=DEMO_RESOLUTION, num_prior_images=4,
                          learning_rate=1e-3, checkpoint_every=10),
        sample=SampleConfig(steps=10, images_per_prompt=1, resolution=DEMO_RESOLUTION))


@dataclass
class DemoResult:
    run_id: str
    store_url: str
    completed: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def _subject_tensors(subject: Subject, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised photos (N, 3, R, R) in [-1, 1] and their masks (N, 1, R, R) in {0, 1}.

    Bad photos are skipped with a warning; masks come from the subject's mask folder (matched
    by file stem), or are all ones when a photo has none.
    """
    images, masks = [], []
    for path in subject.image_paths:
        try:
            fitted = normalise_image(load_image(path), resolution)
        except ImageError as err:
            logger.warning("skipping %s", err)
            continue
        images.append(pil_to_tensor(fitted.image))
        mask_file = next(iter(sorted(subject.mask_dir.glob(path.stem + ".*"))), None) \
            if subject.mask_dir else None
        if mask_file is None:
            masks.append(torch.ones(1, resolution, resolution))
            continue
        mask = fit_mask(Image.open(mask_file).convert("L").resize(fitted.fit.source_size),
                        fitted.fit)
        masks.append((pil_to_tensor(mask.convert("RGB"))[:1] > 0).float())
    if len(images) < 2:
        raise ValueError(f"subject {subject.name!r} has {len(images)} usable photo(s); at least "
                         "2 are needed")
    return torch.stack(images), torch.stack(masks)


def _class_priors(store: ArtifactStore, base: str, class_noun: str, config: RunConfig
                  ) -> torch.Tensor:
    tcfg = config.train
    digest = prior_hash(base, class_noun, count=tcfg.num_prior_images, seed=tcfg.prior_seed,
                        sample=config.sample, resolution=tcfg.resolution)
    prefix = artifact_key("prior", class_name=class_noun, content_hash=digest)
    names = [f"{i:04d}.png" for i in range(tcfg.num_prior_images)]
    if not store.is_done(prefix, expect_hash=digest):
        images = generate_class_priors(load_sd_components(base, local_files_only=True),
                                       class_noun, count=tcfg.num_prior_images,
                                       seed=tcfg.prior_seed, sample=config.sample,
                                       resolution=tcfg.resolution)
        with store.stage(prefix, digest) as stage:
            for name, image in zip(names, images, strict=True):
                stage.put_bytes(name, _png_bytes(image))
    return torch.stack([pil_to_tensor(Image.open(store.local_path(f"{prefix}/{name}")))
                        for name in names])


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


DEMO_PROMPTS = ("a {token} {class_noun} on the beach", "a {token} {class_noun} in the snow")


def _draw_samples(base: str, concept_folder: Path, class_noun: str, config: RunConfig,
                  ) -> list[Image.Image]:
    pipe = StableDiffusionPipeline.from_pretrained(base, local_files_only=True,
                                                   safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    concept = load_concept(concept_folder)
    apply_concept(pipe, concept, base_model=base)
    prompts = [p.format(token=concept.placeholder_token, class_noun=class_noun)
               for p in DEMO_PROMPTS]
    generators = [torch.Generator().manual_seed(config.sample.seed + i)
                  for i in range(len(prompts))]
    return pipe(prompts, num_inference_steps=config.sample.steps,
                guidance_scale=config.sample.guidance_scale, height=config.sample.resolution,
                width=config.sample.resolution, generator=generators).images


def run_subject_method(store: ArtifactStore, run_id: str, base: str, subject: Subject,
                       method_name: str, config: RunConfig, workdir: Path) -> bool:
    """Train and sample one (subject, method); returns False when it was already done."""
    method = config.method(method_name)
    digest = training_hash(config, method)
    concept_prefix = artifact_key("concept", run_id=run_id, subject=subject.name,
                                  method=method_name)
    samples_prefix = artifact_key("samples", run_id=run_id, subject=subject.name,
                                  method=method_name)
    sample_hash = config_hash(digest, config.sample)
    if store.is_done(samples_prefix, expect_hash=sample_hash):
        return False
    local = workdir / "concepts" / subject.name / method_name
    if not store.is_done(concept_prefix, expect_hash=digest):
        images, masks = _subject_tensors(subject, config.train.resolution)
        priors = (_class_priors(store, base, subject.class_noun, config)
                  if method.prior_preservation else torch.empty(0, *images.shape[1:]))
        trained = train_concept(
            load_sd_components(base, local_files_only=True),
            ConceptData(subject.name, subject.class_noun, images, masks, priors), config,
            method, checkpoint_dir=workdir / "checkpoints" / subject.name / method_name,
            callbacks=[ProgressBar(f"{subject.name}/{method_name}")])
        save_concept(local, trained.tensors, trained.metadata, base_model=base)
        with store.stage(concept_prefix, digest) as stage:
            for file in ("concept.safetensors", "concept.json"):
                stage.put_file(file, local / file)
        logger.info("%s/%s trained: loss %.4f → %.4f", subject.name, method_name,
                    trained.loss_history[0]["loss"], trained.loss_history[-1]["loss"])
    else:
        local.mkdir(parents=True, exist_ok=True)
        for file in ("concept.safetensors", "concept.json"):
            store.get_file(f"{concept_prefix}/{file}", local / file)
    images = _draw_samples(base, local, subject.class_noun, config)
    with store.stage(samples_prefix, sample_hash) as stage:
        for index, image in enumerate(images):
            stage.put_bytes(f"{index:02d}_0.png", _png_bytes(image))
    return True


def run_demo(workdir: str | Path = "artifacts/demo-work", store_url: str = "./artifacts",
             *, steps: int = 30, run_id: str = "demo") -> DemoResult:
    """Run the demo end to end; a rerun skips every finished (subject, method)."""
    started = time.perf_counter()
    workdir = Path(workdir)
    zoo = build_zoo(workdir / "models")
    dataset: Dataset = load_dataset(write_demo_dataset(workdir / "dataset",
                                                       size=DEMO_RESOLUTION))
    for problem in dataset.problems:
        logger.warning("dataset: %s", problem.message)
    store = open_store(store_url)
    store.check()
    config = demo_config(steps)
    base = str(zoo["base"])
    result = DemoResult(run_id, store_url)
    for subject in dataset.subjects:
        for method in config.methods:
            key = (subject.name, method.name)
            try:
                ran = run_subject_method(store, run_id, base, subject, method.name, config,
                                         workdir)
            except (ValueError, RuntimeError, OSError) as err:
                logger.error("%s/%s failed: %s", *key, err)
                result.failed[f"{subject.name}/{method.name}"] = str(err)
                continue
            (result.completed if ran else result.skipped).append(key)
    result.seconds = round(time.perf_counter() - started, 1)
    status = {f"{s}/{m}": "done" for s, m in result.completed + result.skipped}
    status.update({name: f"failed: {reason}" for name, reason in result.failed.items()})
    store.put_json(artifact_key("run", run_id=run_id, name="run.json"), {
        "run_id": run_id, "dataset": str(dataset.root), "base_model": base,
        "config": to_dict(config), "status": dict(sorted(status.items())),
        "problems": [p.message for p in dataset.problems]})
    return result
