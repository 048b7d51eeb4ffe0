"""The toy world's evaluators: a CLIP and a DINO stand-in trained here, saved like the real ones.

Pretrained CLIP and DINO know nothing of the toy world, so CLIP-I, CLIP-T and DINO are measured
with small models trained on it, in exactly the formats :class:`eqdiff.metrics.CLIPScorer` and
:class:`eqdiff.metrics.DINOScorer` load:

- **toy CLIP** — an ``open_clip.CLIP`` (a ViT on 32 px images; a text transformer with CLIP's
  49,408-token BPE vocabulary and 77-token context), trained with the symmetric InfoNCE loss
  and a learnable logit scale on rendered images and their captions
  (:func:`eqdiff.toyworld.world.caption`), novel patterns included. Saved in open_clip's hub
  layout (``open_clip_config.json`` + ``open_clip_model.safetensors``, float16 weights that
  open_clip loads into its float32 model).
- **DINO stand-in** — a ``transformers.ViTModel`` whose CLS token embeds object identity: a
  supervised-contrastive loss (through a projection head that is not saved) makes renders of the
  same :class:`ObjectSpec` in other poses, contexts and styles positives. Saved with
  ``save_pretrained`` (float32) plus a ``ViTImageProcessor`` for 32 px.

Both learn the object's attributes slowly from their contrastive losses alone, so each also
classifies them from its embedding through linear heads that are not saved. Both ViTs use 8 px
patches (a 4×4 grid), which learned the object faster than 4 px patches for the same CPU time
(held-out, after ~2.5 minutes of supervised attribute training: class accuracy 0.60 against
0.41; DINO stand-in after ~5.5 minutes: identity top-1 0.43 against 0.37).

Trust checks: :func:`attribute_accuracy` (CLIP zero-shot: for each of class, colour, pattern,
context and style, the intended caption against captions that change only that attribute) works
on any images with their intended attributes, e.g. a base model's samples;
:func:`identity_checks` (top-1 identity retrieval, same- vs different-identity cosine) works on
any features. :func:`train_evaluators` trains both models, measures both checks on held-out
renders and writes ``evaluators.json``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from eqdiff.metrics import IMAGENET_MEAN, IMAGENET_STD, CLIPScorer, DINOScorer, cosine_matrix
from eqdiff.toyworld.world import (
    CLASSES,
    COLOURS,
    CONTEXTS,
    DEFAULT_SIZE,
    PATTERNS,
    STYLES,
    ObjectSpec,
    SceneSpec,
    caption,
    object_words,
    random_object,
    random_scene,
    render,
)
from eqdiff.zoo import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE

logger = logging.getLogger(__name__)

CLIP_FOLDER = "clip"
DINO_FOLDER = "dino"
RECORD_FILE = "evaluators.json"
NO_DECAY = ("token_embedding", "positional_embedding", "position_embeddings", "cls_token")
HEAD_SCALE = 10.0  # unit embeddings are scaled by this before an auxiliary linear head
ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "class": CLASSES, "colour": tuple(COLOURS), "pattern": PATTERNS, "context": CONTEXTS,
    "style": STYLES}
OBJECT_PARTS: dict[str, tuple[str, ...]] = {  # what makes an object's identity
    "shape": CLASSES, "colour": tuple(COLOURS), "pattern": PATTERNS,
    "pattern_colour": tuple(COLOURS)}


@dataclass(frozen=True)
class EvaluatorConfig:
    """Everything that decides the trained evaluators (recorded in ``evaluators.json``)."""

    seed: int = 0
    threads: int = 1
    image_size: int = DEFAULT_SIZE
    max_shift: int = 2  # augmentation: random translation by up to this many pixels
    # toy CLIP
    clip_embed_dim: int = 64
    clip_patch_size: int = 8
    clip_vision_width: int = 96
    clip_vision_layers: int = 4
    clip_text_width: int = 64
    clip_text_layers: int = 3
    clip_images: int = 16_000  # random scenes in the training pool
    clip_steps: int = 3_000
    clip_batch: int = 64
    clip_lr: float = 2e-3
    clip_attribute_weight: float = 2.0  # auxiliary attribute classification (0: contrastive only)
    # DINO stand-in
    dino_patch_size: int = 8
    dino_width: int = 96
    dino_layers: int = 4
    dino_identities: int = 3_000  # random objects in the training pool
    dino_views: int = 4  # renders of each in the pool
    dino_steps: int = 2_800
    dino_batch_identities: int = 64
    dino_views_per_step: int = 2
    dino_lr: float = 1e-3
    dino_temperature: float = 0.1
    dino_attribute_weight: float = 1.0  # auxiliary object-attribute classification (0: none)
    # both
    warmup_steps: int = 50
    weight_decay: float = 0.05
    # held-out check set: random objects, each in several random scenes
    holdout_identities: int = 150
    holdout_views: int = 4
    log_every: int = 50


# --------------------------------------------------------------------------- renders

@dataclass(frozen=True)
class Renders:
    """Rendered scenes: ``images`` (N, S, S, 3) uint8 with the specs that drew them."""

    images: np.ndarray
    objects: tuple[ObjectSpec, ...]
    scenes: tuple[SceneSpec, ...]

    def pil(self) -> list[Image.Image]:
        return [Image.fromarray(image) for image in self.images]

    def captions(self) -> list[str]:
        return [caption(o, s) for o, s in zip(self.objects, self.scenes, strict=True)]


def render_identities(identities: int, views: int, *, seed: int,
                      size: int = DEFAULT_SIZE) -> Renders:
    """``identities`` random objects (novel ones included), each in ``views`` random scenes;
    images of one object are consecutive. Deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    images = np.empty((identities * views, size, size, 3), dtype=np.uint8)
    objects, scenes = [], []
    for i in range(identities):
        obj = random_object(rng, allow_novel=True)
        for j in range(views):
            scene = random_scene(rng)
            images[i * views + j] = np.asarray(render(obj, scene, size=size)[0])
            objects.append(obj)
            scenes.append(scene)
    return Renders(images, tuple(objects), tuple(scenes))


def _intended(obj: ObjectSpec, scene: SceneSpec, attribute: str) -> str:
    return {"class": obj.shape, "colour": obj.colour, "pattern": obj.pattern,
            "context": scene.context, "style": scene.style}[attribute]


def _pixels(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N, S, S, 3) → normalised float32 (N, 3, S, S), as the scorers' preprocessing
    leaves an image already at the model's size."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _shift(batch: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image (N, C, S, S) by up to ``max_shift`` px, repeating the border."""
    if max_shift == 0:
        return batch
    size = batch.shape[-1]
    padded = F.pad(batch, (max_shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * max_shift + 1, (len(batch), 2), generator=generator)
    return torch.stack([padded[i, :, dy:dy + size, dx:dx + size]
                        for i, (dy, dx) in enumerate(offsets.tolist())])


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def _adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on the weight matrices only (not on token and position
    embeddings, class tokens, norms, biases)."""
    decay, plain = [], []
    for name, param in model.named_parameters():
        wants_decay = param.ndim >= 2 and not any(part in name for part in NO_DECAY)
        (decay if wants_decay else plain).append(param)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": plain, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=True)


# --------------------------------------------------------------------------- toy CLIP

def toy_clip_config(cfg: EvaluatorConfig) -> dict:
    """open_clip ``model_cfg`` of the toy CLIP (CLIP's tokenizer and context length)."""
    return {
        "embed_dim": cfg.clip_embed_dim,
        "vision_cfg": {"image_size": cfg.image_size, "patch_size": cfg.clip_patch_size,
                       "width": cfg.clip_vision_width, "layers": cfg.clip_vision_layers,
                       "head_width": 32},
        "text_cfg": {"context_length": CLIP_MAX_LENGTH, "vocab_size": CLIP_VOCAB_SIZE,
                     "width": cfg.clip_text_width, "heads": cfg.clip_text_width // 32,
                     "layers": cfg.clip_text_layers},
        "quick_gelu": True,
    }


def encode_text_prefix(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text`` of an open_clip ``CLIP`` on the first L ≤ 77 token columns.

    ``tokens`` (N, L) int64 must hold each text's end token (the largest id) within its L
    columns. The attention is causal and the text feature is read at the end token, so the
    padding after it never changes the result: this equals ``encode_text`` on the full
    77-column tokens, at a fraction of the cost. Returns (N, D) unnormalised features.
    """
    length = tokens.shape[1]
    x = model.token_embedding(tokens) + model.positional_embedding[:length]
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
    return x[torch.arange(len(tokens), device=x.device), tokens.argmax(dim=-1)] @ \
        model.text_projection


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
              logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of matching rows: features (N, D), L2-normalised; scalar scale."""
    logits = logit_scale * image_features @ text_features.T
    targets = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def _attribute_labels(renders: Renders) -> dict[str, torch.Tensor]:
    """Per attribute, the index of each render's value in :data:`ATTRIBUTE_VALUES`."""
    return {a: torch.tensor([values.index(_intended(o, s, a))
                             for o, s in zip(renders.objects, renders.scenes, strict=True)])
            for a, values in ATTRIBUTE_VALUES.items()}


def train_clip(renders: Renders, cfg: EvaluatorConfig) -> tuple[torch.nn.Module, list[dict]]:
    """Contrastive training of a fresh toy CLIP on ``renders`` and their captions.

    Learning the object's attributes from the contrastive loss alone is slow, so an auxiliary
    loss (weight ``cfg.clip_attribute_weight``) classifies the five attributes from both image
    and text embeddings with shared linear heads, which are not saved: both towers then lay
    out their embeddings along the same attribute directions.

    Returns the model (eval mode, CPU, float32) and the loss log.
    """
    import open_clip

    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    model = open_clip.CLIP(**toy_clip_config(cfg))
    pixels = _pixels(renders.images, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    captions = renders.captions()
    unique = sorted(set(captions))
    position = {text: k for k, text in enumerate(unique)}
    tokens = open_clip.tokenize(unique)[[position[c] for c in captions]]
    tokens = tokens[:, :int(tokens.argmax(dim=-1).max()) + 1]  # columns up to the last end token
    labels = _attribute_labels(renders)
    heads = torch.nn.ModuleDict({a: torch.nn.Linear(cfg.clip_embed_dim, len(values))
                                 for a, values in ATTRIBUTE_VALUES.items()})
    optimizer = _adamw(torch.nn.ModuleList([model, heads]), cfg.clip_lr, cfg.weight_decay)
    max_scale = math.log(100.0)
    log, started = [], time.perf_counter()
    model.train()
    for step in range(cfg.clip_steps):
        for group in optimizer.param_groups:
            group["lr"] = cfg.clip_lr * _lr_factor(step, cfg.warmup_steps, cfg.clip_steps)
        index = torch.randperm(len(pixels), generator=generator)[:cfg.clip_batch]
        image_features = F.normalize(
            model.encode_image(_shift(pixels[index], cfg.max_shift, generator)), dim=-1)
        text_features = F.normalize(encode_text_prefix(model, tokens[index]), dim=-1)
        contrastive = clip_loss(image_features, text_features, model.logit_scale.exp())
        both = torch.cat([image_features, text_features])
        attributes = sum(F.cross_entropy(head(both * HEAD_SCALE), labels[a][index].repeat(2))
                         for a, head in heads.items()) / len(heads)
        loss = contrastive + cfg.clip_attribute_weight * attributes
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, max_scale)
        if step % cfg.log_every == 0 or step == cfg.clip_steps - 1:
            log.append({"step": step, "loss": round(loss.item(), 4),
                        "contrastive": round(contrastive.item(), 4),
                        "attributes": round(attributes.item(), 4),
                        "logit_scale": round(model.logit_scale.exp().item(), 2),
                        "elapsed_s": round(time.perf_counter() - started, 1)})
            logger.info("toy CLIP step %d/%d loss %.4f", step + 1, cfg.clip_steps, loss.item())
    return model.eval(), log


def save_clip(model: torch.nn.Module, model_cfg: dict, folder: str | Path) -> Path:
    """Write open_clip's hub layout: ``open_clip_config.json`` (model and preprocessing
    config) and ``open_clip_model.safetensors`` (float16; open_clip loads it as float32)."""
    import open_clip
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image_size = model_cfg["vision_cfg"]["image_size"]
    config = {"model_cfg": model_cfg,
              "preprocess_cfg": {"size": image_size, "mean": list(open_clip.OPENAI_DATASET_MEAN),
                                 "std": list(open_clip.OPENAI_DATASET_STD),
                                 "interpolation": "bicubic",
                                 "resize_mode": "shortest"}}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, folder / "open_clip_model.safetensors")
    return folder


# --------------------------------------------------------------------------- DINO stand-in

def toy_dino(cfg: EvaluatorConfig) -> torch.nn.Module:
    """A fresh ViT of DINO's family for ``cfg.image_size`` px images (no pooler)."""
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(image_size=cfg.image_size, patch_size=cfg.dino_patch_size,
                       hidden_size=cfg.dino_width, num_hidden_layers=cfg.dino_layers,
                       num_attention_heads=cfg.dino_width // 16,
                       intermediate_size=4 * cfg.dino_width, qkv_bias=True, layer_norm_eps=1e-6)
    return ViTModel(config, add_pooling_layer=False)


def supcon_loss(embeddings: torch.Tensor, labels: torch.Tensor,
                temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, "L_out").

    ``embeddings`` (N, D) L2-normalised, ``labels`` (N,) int64: every other row with the same
    label is a positive of a row. Each anchor averages −log softmax over its positives, the
    softmax running over all other rows; anchors without a positive are left out.
    """
    count = len(embeddings)
    self_mask = torch.eye(count, dtype=torch.bool, device=embeddings.device)
    logits = (embeddings @ embeddings.T / temperature).masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    counts = positives.sum(dim=1)
    anchors = counts > 0
    if not anchors.any():
        raise ValueError("supcon_loss needs at least two rows with the same label")
    per_anchor = -log_prob.masked_fill(~positives, 0.0).sum(dim=1)[anchors] / counts[anchors]
    return per_anchor.mean()


def _identity_ids(objects: Sequence[Hashable]) -> torch.Tensor:
    ids: dict[Hashable, int] = {}
    return torch.tensor([ids.setdefault(o, len(ids)) for o in objects])


def _object_labels(objects: Sequence[ObjectSpec]) -> dict[str, torch.Tensor]:
    """Per part of an object's identity, the index of each object's value in
    :data:`OBJECT_PARTS`."""
    return {name: torch.tensor([values.index(getattr(o, name)) for o in objects])
            for name, values in OBJECT_PARTS.items()}


def train_dino(renders: Renders, cfg: EvaluatorConfig) -> tuple[torch.nn.Module, list[dict]]:
    """Supervised-contrastive training of a fresh DINO stand-in on ``renders`` laid out as
    :func:`render_identities` does (``cfg.dino_views`` consecutive renders per object).

    Each step takes ``cfg.dino_batch_identities`` pool objects and ``cfg.dino_views_per_step``
    of their renders. As for the toy CLIP, an auxiliary loss (weight
    ``cfg.dino_attribute_weight``) classifies the object's class, colour, pattern and pattern
    colour from the unit CLS embedding. Returns the ViT (eval mode, CPU, float32; the
    projection and attribute heads are dropped) and the loss log.
    """
    views = cfg.dino_views
    if len(renders.images) % views or cfg.dino_views_per_step > views:
        raise ValueError(f"a pool of {len(renders.images)} renders cannot hold {views} views "
                         f"per object with {cfg.dino_views_per_step} taken per step")
    torch.manual_seed(cfg.seed + 1)
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    model = toy_dino(cfg)
    width = cfg.dino_width
    head = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU(),
                               torch.nn.Linear(width, width))
    pixels = _pixels(renders.images, IMAGENET_MEAN, IMAGENET_STD)
    labels = _identity_ids(renders.objects)
    parts = _object_labels(renders.objects)
    heads = torch.nn.ModuleDict({name: torch.nn.Linear(width, len(values))
                                 for name, values in OBJECT_PARTS.items()})
    pool_objects = len(pixels) // views
    optimizer = _adamw(torch.nn.ModuleList([model, head, heads]), cfg.dino_lr,
                       cfg.weight_decay)
    log, started = [], time.perf_counter()
    model.train()
    for step in range(cfg.dino_steps):
        for group in optimizer.param_groups:
            group["lr"] = cfg.dino_lr * _lr_factor(step, cfg.warmup_steps, cfg.dino_steps)
        chosen = torch.randperm(pool_objects, generator=generator)[:cfg.dino_batch_identities]
        picks = torch.rand(len(chosen), views, generator=generator).argsort(dim=1)
        index = (chosen[:, None] * views + picks[:, :cfg.dino_views_per_step]).reshape(-1)
        batch = _shift(pixels[index], cfg.max_shift, generator)
        cls = model(pixel_values=batch).last_hidden_state[:, 0]
        contrastive = supcon_loss(F.normalize(head(cls), dim=-1), labels[index],
                                  cfg.dino_temperature)
        scaled = F.normalize(cls, dim=-1) * HEAD_SCALE
        attributes = sum(F.cross_entropy(heads[name](scaled), parts[name][index])
                         for name in heads) / len(heads)
        loss = contrastive + cfg.dino_attribute_weight * attributes
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % cfg.log_every == 0 or step == cfg.dino_steps - 1:
            log.append({"step": step, "loss": round(loss.item(), 4),
                        "contrastive": round(contrastive.item(), 4),
                        "attributes": round(attributes.item(), 4),
                        "elapsed_s": round(time.perf_counter() - started, 1)})
            logger.info("DINO stand-in step %d/%d loss %.4f", step + 1, cfg.dino_steps,
                        loss.item())
    return model.eval(), log


def save_dino(model: torch.nn.Module, folder: str | Path) -> Path:
    """``save_pretrained`` (float32 safetensors) plus a ``ViTImageProcessor`` for the model's
    image size: shortest-edge resize (bicubic), centre crop, ImageNet mean/std."""
    from transformers import ViTImageProcessor

    folder = Path(folder)
    size = model.config.image_size
    model.save_pretrained(folder, safe_serialization=True)
    ViTImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                      do_center_crop=True, resample=3, image_mean=list(IMAGENET_MEAN),
                      image_std=list(IMAGENET_STD)).save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------- trust checks

class TextImageEmbedder(Protocol):
    """What :func:`attribute_accuracy` needs (a :class:`CLIPScorer` is one)."""

    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor: ...

    def text_features(self, texts: Sequence[str]) -> torch.Tensor: ...


def attribute_captions(obj: ObjectSpec, scene: SceneSpec, attribute: str) -> list[str]:
    """The caption of ``(obj, scene)`` with ``attribute`` set to each of its values in turn
    (in :data:`ATTRIBUTE_VALUES` order); everything else stays as intended."""
    if attribute not in ATTRIBUTE_VALUES:
        raise ValueError(f"unknown attribute {attribute!r}; known: {', '.join(ATTRIBUTE_VALUES)}")
    if attribute in ("context", "style"):
        return [caption(obj, replace(scene, **{attribute: value}))
                for value in ATTRIBUTE_VALUES[attribute]]
    words = {"class": obj.shape, "colour": obj.colour, "pattern": obj.pattern}
    texts = []
    for value in ATTRIBUTE_VALUES[attribute]:
        chosen = {**words, attribute: value}
        noun = object_words(chosen["class"], chosen["colour"], chosen["pattern"],
                            obj.pattern_colour)
        texts.append(caption(obj, scene, describe=noun))
    return texts


def zero_shot_predictions(clip: TextImageEmbedder, images: Sequence[Image.Image],
                          objects: Sequence[ObjectSpec], scenes: Sequence[SceneSpec],
                          attributes: Sequence[str] = tuple(ATTRIBUTE_VALUES)) -> pd.DataFrame:
    """Zero-shot classification of each image's attributes by caption retrieval.

    For every image and attribute, the image embedding is compared with
    :func:`attribute_captions` (the intended caption varied in that attribute only); the best
    caption's value is the prediction. One row per (image, attribute): ``image``,
    ``attribute``, ``intended``, ``predicted``, ``correct``, and the intended ``style``,
    ``context`` and ``object_pattern`` (to break results down).
    """
    if not len(images) == len(objects) == len(scenes):
        raise ValueError(f"need one ObjectSpec and SceneSpec per image, got {len(images)} "
                         f"images, {len(objects)} objects, {len(scenes)} scenes")
    candidates = {(i, a): attribute_captions(o, s, a)
                  for i, (o, s) in enumerate(zip(objects, scenes, strict=True))
                  for a in attributes}
    unique = sorted({text for texts in candidates.values() for text in texts})
    position = {text: k for k, text in enumerate(unique)}
    text_features = clip.text_features(unique)
    image_features = clip.image_features(list(images))
    rows = []
    for (i, attribute), texts in candidates.items():
        scores = text_features[[position[t] for t in texts]] @ image_features[i]
        predicted = ATTRIBUTE_VALUES[attribute][int(scores.argmax())]
        intended = _intended(objects[i], scenes[i], attribute)
        rows.append({"image": i, "attribute": attribute, "intended": intended,
                     "predicted": predicted, "correct": predicted == intended,
                     "style": scenes[i].style, "context": scenes[i].context,
                     "object_pattern": objects[i].pattern})
    return pd.DataFrame(rows)


def attribute_accuracy(clip: TextImageEmbedder, images: Sequence[Image.Image],
                       objects: Sequence[ObjectSpec], scenes: Sequence[SceneSpec],
                       attributes: Sequence[str] = tuple(ATTRIBUTE_VALUES)) -> dict[str, float]:
    """Zero-shot accuracy per attribute (see :func:`zero_shot_predictions`); chance is one
    over the number of values (:data:`ATTRIBUTE_VALUES`)."""
    predictions = zero_shot_predictions(clip, images, objects, scenes, attributes)
    accuracy = predictions.groupby("attribute", sort=False)["correct"].mean()
    return {attribute: float(accuracy[attribute]) for attribute in attributes}


def identity_checks(features: torch.Tensor, identities: Sequence[Hashable], *,
                    groups: Sequence[str] | None = None) -> dict:
    """How well features (N, D) group images by identity (any hashable label per image).

    ``top1``: over images whose identity appears at least twice, the share whose nearest other
    image (cosine) has the same identity; ``chance``: its expectation for random features.
    ``same_cosine`` / ``different_cosine``: mean cosine over pairs of distinct images with the
    same / a different identity. With ``groups`` (a label per image, e.g. its style),
    ``top1_by_group`` breaks ``top1`` down by the query's group.
    """
    if len(features) != len(identities):
        raise ValueError(f"{len(features)} features but {len(identities)} identities")
    labels = _identity_ids(identities).to(features.device)
    sims = cosine_matrix(features, features)
    self_mask = torch.eye(len(sims), dtype=torch.bool, device=sims.device)
    same = (labels[:, None] == labels[None, :]) & ~self_mask
    queries = same.any(dim=1)
    if not queries.any() or (~same & ~self_mask).sum() == 0:
        raise ValueError("identity checks need an identity seen twice and two identities")
    nearest = sims.masked_fill(self_mask, float("-inf")).argmax(dim=1)
    hits = same[torch.arange(len(sims), device=sims.device), nearest]
    checks = {"top1": float(hits[queries].float().mean()),
              "chance": float((same.sum(dim=1)[queries] / (len(sims) - 1)).mean()),
              "same_cosine": float(sims[same].mean()),
              "different_cosine": float(sims[~same & ~self_mask].mean()),
              "queries": int(queries.sum())}
    if groups is not None:
        if len(groups) != len(features):
            raise ValueError(f"{len(features)} features but {len(groups)} groups")
        hits_by_group: dict[str, list[bool]] = {}
        for group, hit, query in zip(groups, hits.tolist(), queries.tolist(), strict=True):
            if query:
                hits_by_group.setdefault(group, []).append(hit)
        checks["top1_by_group"] = {g: sum(h) / len(h) for g, h in sorted(hits_by_group.items())}
    return checks


# --------------------------------------------------------------------------- training run

def _summary(predictions: pd.DataFrame) -> dict:
    overall = predictions.groupby("attribute", sort=False)["correct"].mean()
    by_style = predictions.pivot_table(index="style", columns="attribute", values="correct",
                                       aggfunc="mean")
    by_pattern = predictions.pivot_table(index="object_pattern", columns="attribute",
                                         values="correct", aggfunc="mean")
    return {"accuracy": {a: round(float(v), 4) for a, v in overall.items()},
            "chance": {a: round(1 / len(ATTRIBUTE_VALUES[a]), 4) for a in overall.index},
            "accuracy_by_style": {style: {a: round(float(v), 4) for a, v in row.items()}
                                  for style, row in by_style.iterrows()},
            "accuracy_by_object_pattern": {
                pattern: {a: round(float(v), 4) for a, v in row.items()}
                for pattern, row in by_pattern.iterrows()}}


def _rounded(values: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else _rounded(v) if isinstance(v, dict)
            else v for k, v in values.items()}


def evaluate_evaluators(clip: CLIPScorer, dino: DINOScorer, held_out: Renders) -> dict:
    """Both trust checks on ``held_out`` through the scorers: CLIP zero-shot attribute
    accuracy (overall, by style, by object pattern) and identity checks of DINO and of CLIP
    image features (overall, by the query's style)."""
    images = held_out.pil()
    checks = _summary(zero_shot_predictions(clip, images, held_out.objects, held_out.scenes))
    styles = [scene.style for scene in held_out.scenes]
    for name, scorer in (("dino", dino), ("clip", clip)):
        checks[f"{name}_identity"] = _rounded(identity_checks(
            scorer.image_features(images), held_out.objects, groups=styles))
    return checks


EVALUATORS = ("clip", "dino")


def _parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _kept_record(out_root: Path, cfg: EvaluatorConfig, kept: Sequence[str]) -> dict:
    """The old record, when evaluators in ``kept`` are reused; checks they can be."""
    if not kept:
        return {}
    path = out_root / RECORD_FILE
    missing = [p for p in kept if not (out_root / p).is_dir()]
    if missing or not path.is_file():
        raise FileNotFoundError(f"cannot keep {', '.join(kept)}: {out_root} lacks "
                                f"{', '.join(missing) or RECORD_FILE}; train all parts")
    previous = json.loads(path.read_text("utf-8"))
    if previous.get("config") != asdict(cfg):
        raise ValueError(f"{', '.join(kept)} in {out_root} was trained with another config "
                         f"({previous.get('config')}); train all parts")
    return previous


def train_evaluators(out_root: str | Path, cfg: EvaluatorConfig = EvaluatorConfig(),
                     parts: Sequence[str] = EVALUATORS) -> dict:
    """Train the toy CLIP and the DINO stand-in, write them to ``out_root/clip`` and
    ``out_root/dino``, check them on held-out renders through the project's scorers and write
    the record (config, timings, losses, checks) to ``out_root/evaluators.json``.

    ``parts`` picks which to (re)train; the other one must already be in ``out_root``, trained
    with the same config (its losses and timings are carried over from the old record). The
    DINO stand-in never sees captions, so a caption change needs only ``parts=("clip",)``.
    """
    unknown = set(parts) - set(EVALUATORS)
    if unknown or not parts:
        raise ValueError(f"parts must be among {', '.join(EVALUATORS)}; got {list(parts)}")
    torch.set_num_threads(cfg.threads)
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    previous = _kept_record(out_root, cfg, [p for p in EVALUATORS if p not in parts])
    seeds = np.random.SeedSequence(cfg.seed).generate_state(3)
    timings: dict[str, float] = dict(previous.get("timings", {}))
    logs = {f"{p}_log": previous[f"{p}_log"] for p in EVALUATORS if p not in parts}

    if "clip" in parts:
        mark = time.perf_counter()
        clip_pool = render_identities(cfg.clip_images, 1, seed=int(seeds[0]),
                                      size=cfg.image_size)
        timings["clip_render_s"] = round(time.perf_counter() - mark, 1)
        mark = time.perf_counter()
        clip_model, logs["clip_log"] = train_clip(clip_pool, cfg)
        timings["clip_train_s"] = round(time.perf_counter() - mark, 1)
        save_clip(clip_model, toy_clip_config(cfg), out_root / CLIP_FOLDER)
        del clip_pool

    if "dino" in parts:
        mark = time.perf_counter()
        dino_pool = render_identities(cfg.dino_identities, cfg.dino_views, seed=int(seeds[1]),
                                      size=cfg.image_size)
        timings["dino_render_s"] = round(time.perf_counter() - mark, 1)
        mark = time.perf_counter()
        dino_model, logs["dino_log"] = train_dino(dino_pool, cfg)
        timings["dino_train_s"] = round(time.perf_counter() - mark, 1)
        save_dino(dino_model, out_root / DINO_FOLDER)
        del dino_pool

    mark = time.perf_counter()
    held_out = render_identities(cfg.holdout_identities, cfg.holdout_views, seed=int(seeds[2]),
                                 size=cfg.image_size)
    clip = CLIPScorer(f"local-dir:{out_root / CLIP_FOLDER}", "", batch_size=256)
    dino = DINOScorer(str(out_root / DINO_FOLDER), batch_size=256, local_files_only=True)
    checks = evaluate_evaluators(clip, dino, held_out)
    timings["checks_s"] = round(time.perf_counter() - mark, 1)

    dino_config = json.loads((out_root / DINO_FOLDER / "config.json").read_text("utf-8"))
    record = {"config": asdict(cfg), "clip_model_cfg": toy_clip_config(cfg),
              "dino_model_cfg": {k: v for k, v in dino_config.items()
                                 if k in ("image_size", "patch_size", "hidden_size",
                                          "num_hidden_layers", "num_attention_heads",
                                          "intermediate_size")},
              "parameters": {"clip": _parameter_count(clip.model),
                             "dino": _parameter_count(dino.model)},
              "trained": sorted(parts),
              "held_out": {"identities": cfg.holdout_identities, "views": cfg.holdout_views,
                           "images": len(held_out.images)},
              "timings": timings, "threads": torch.get_num_threads(),
              "torch": torch.__version__, **logs, "checks": checks}
    (out_root / RECORD_FILE).write_text(json.dumps(record, indent=1))
    logger.info("toy evaluators written to %s: CLIP accuracy %s, DINO top-1 %.3f", out_root,
                checks["accuracy"], checks["dino_identity"]["top1"])
    return record
