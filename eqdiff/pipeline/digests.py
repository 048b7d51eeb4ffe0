"""Each stage's digest: everything that determines its outputs, from the digests of the stages
it reads.

A stage's completion marker holds its digest, so the digests of a whole run can be computed
from the dataset and the settings alone and compared with the markers without running
anything (:mod:`eqdiff.pipeline.plan`). The stages (:mod:`eqdiff.pipeline.stages`) use the same
functions. Light on purpose: no model code is imported to plan a run.
"""

from __future__ import annotations

from collections.abc import Sequence

from eqdiff.config import EvalConfig, MethodConfig, config_hash
from eqdiff.method.identity import prior_hash, training_hash
from eqdiff.method.models import model_identity
from eqdiff.pipeline.ingest import IngestedSubject
from eqdiff.pipeline.skeleton import RunContext


def ingest_digest(described: IngestedSubject) -> str:
    return config_hash(described.to_dict())


def preprocess_digest(ctx: RunContext, ingest_hash: str) -> str:
    return config_hash({"resolution": ctx.config.train.resolution, "ingest": ingest_hash})


def masks_digest(ctx: RunContext, preprocess_hash: str, ingest_hash: str) -> str:
    return config_hash(ctx.config.masks, preprocess_hash, ingest_hash)


def priors_digest(ctx: RunContext, class_noun: str) -> str:
    settings = ctx.config.train
    return prior_hash(ctx.base_model, class_noun, count=settings.num_prior_images,
                      seed=settings.prior_seed, sample=ctx.config.sample,
                      resolution=settings.resolution)


def train_digest(ctx: RunContext, method: MethodConfig, masks_hash: str,
                 prior_prefix: str | None) -> str:
    return config_hash(training_hash(ctx.config, method), masks_hash, prior_prefix or "")


def samples_digest(ctx: RunContext, concept_hash: str, prompts: Sequence[str]) -> str:
    return config_hash(concept_hash, ctx.config.sample, list(prompts))


def evaluation_hash(config: EvalConfig) -> str:
    """The evaluation settings and the identity of each scorer's weights: replacing a local
    CLIP or DINO model in place rescores instead of keeping the old scores."""
    return config_hash(config, *(model_identity(source) for source in
                                 (config.clip_model, config.clip_pretrained, config.dino_model)))


def scores_digest(eval_hash: str, source_hash: str) -> str:
    """The scores of one (subject, method), or of the real photos (``source_hash``: their
    preprocessing's digest); ``eval_hash`` is :func:`evaluation_hash` of the run."""
    return config_hash(eval_hash, source_hash)
