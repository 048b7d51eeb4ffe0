"""DreamBench metrics: CLIP-I, CLIP-T and DINO (docs/evaluation.md), and the per-image score rows.

Scorers load their model once and embed many images in batches:

- :class:`CLIPScorer` — an open_clip model (default ViT-B/32 with OpenAI weights) for CLIP-I
  (image↔image) and CLIP-T (image↔text), with the model's own preprocessing; raw cosines
  (CLIP-T ≈ 0.30, never ×100).
- :class:`DINOScorer` — a transformers ViT (default ``facebook/dino-vits16``); the embedding is
  the CLS token of the last layer (``last_hidden_state[:, 0]``, not a pooler output), after the
  protocol's preprocessing (resize 256 bicubic, centre-crop 224, ImageNet mean/std), built here
  with torchvision so a saved processor config cannot change it. Only a model made for another
  input size than the protocol's 224 px (the toy world's 32 px stand-in) is preprocessed as its
  folder's ``preprocessor_config.json`` says (:func:`processor_preprocess`).

Weights are read from safetensors only; a pickle checkpoint is refused. Real-image features are
computed once per subject through :class:`FeatureCache` (keyed by scorer id and image sha256).

The protocol (per subject, the mean over all (generated, real) pairs, then the mean over
subjects) starts here: :func:`score_images` writes one row per generated image whose ``clip_i``
and ``dino`` are the mean over that subject's real images, so the mean of a subject's rows is the
mean over all its pairs. :func:`real_image_rows` gives the real-images upper bound (i ≠ j).
The tables built from these rows are in :mod:`eqdiff.evaluation.report`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from eqdiff.config import ALLOW_DOWNLOADS
from eqdiff.method.models import downloads_off, hub_offline, model_identity

if TYPE_CHECKING:  # torchvision is imported where images are transformed
    from torchvision import transforms

logger = logging.getLogger(__name__)

DINO_RESIZE = 256
DINO_CROP = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINO_PROCESSOR_CONFIG = "preprocessor_config.json"
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_SAFE_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors")
OPEN_CLIP_PICKLE_WEIGHTS = "open_clip_pytorch_model.bin"  # open_clip's default hub file name
REAL_IMAGES = "real images"  # the method name of the real-vs-real upper bound rows
SCORE_COLUMNS = ("run", "subject", "class", "kind", "method", "prompt", "prompt_index", "seed",
                 "image_key", "clip_i", "clip_t", "dino")


# --------------------------------------------------------------------------- pure functions

def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarities: ``a`` (N, D), ``b`` (M, D) → (N, M), float32.

    Inputs need not be normalised; the result is on their device.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected (N, D) and (M, D) features, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def subject_scores(gen_feats: torch.Tensor, real_feats: torch.Tensor) -> float:
    """The protocol's per-subject score: the mean cosine over all (generated, real) pairs.

    ``gen_feats`` (N, D) and ``real_feats`` (M, D); N, M ≥ 1.
    """
    if len(gen_feats) == 0 or len(real_feats) == 0:
        raise ValueError("subject_scores needs at least one generated and one real feature")
    return float(cosine_matrix(gen_feats, real_feats).mean())


def real_upper_bound(real_feats: torch.Tensor) -> float:
    """The real-images upper bound: mean cosine over ordered pairs of real images with i ≠ j.

    ``real_feats`` (M, D) with M ≥ 2.
    """
    return float(real_pair_means(real_feats).mean())


def real_pair_means(real_feats: torch.Tensor) -> torch.Tensor:
    """Per real image, its mean cosine to the *other* real images: (M, D) → (M,), float32.

    The mean of the result equals :func:`real_upper_bound` (every row averages M-1 pairs).
    """
    count = len(real_feats)
    if count < 2:
        raise ValueError(f"the real-images bound needs at least 2 images, got {count}")
    sims = cosine_matrix(real_feats, real_feats)
    off_diagonal = ~torch.eye(count, dtype=torch.bool, device=sims.device)
    return (sims * off_diagonal).sum(dim=1) / (count - 1)


def strip_placeholder(prompt: str, placeholders: str | Sequence[str]) -> str:
    """The prompt for CLIP-T: every placeholder token removed, whitespace squashed.

    ``strip_placeholder("a <eqd> dog in the jungle", "<eqd>") == "a dog in the jungle"``.
    """
    tokens = [placeholders] if isinstance(placeholders, str) else list(placeholders)
    for token in tokens:
        if not token.strip():
            raise ValueError(f"placeholder token must not be blank, got {token!r}")
        prompt = prompt.replace(token, " ")
    return " ".join(prompt.split())


# --------------------------------------------------------------------------- scorers

class ImageEmbedder(Protocol):
    """What :class:`FeatureCache` needs from a scorer."""

    scorer_id: str

    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """L2-normalised features (N, D), float32, on the CPU."""
        ...


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def _embed_in_batches(images: Sequence[Image.Image], preprocess: Callable[[Image.Image],
                      torch.Tensor], encode: Callable[[torch.Tensor], torch.Tensor],
                      device: torch.device, batch_size: int) -> torch.Tensor:
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = torch.stack([preprocess(_rgb(im)) for im in images[start:start + batch_size]])
            outputs.append(F.normalize(encode(batch.to(device)).float(), dim=-1).cpu())
    if not outputs:
        raise ValueError("no images to embed")
    return torch.cat(outputs)


def _safe_file(path: Path, what: str) -> Path:
    if path.suffix != ".safetensors":
        raise ValueError(f"{what}: {path} is not a .safetensors file; pickle checkpoints are "
                         "refused (convert it with safetensors.torch.save_file)")
    if not path.is_file():
        raise FileNotFoundError(f"{what}: weights file {path} does not exist")
    return path


def _open_clip_folder(folder: Path) -> str:
    """``local-dir:`` name of an open_clip folder after checking it holds safetensors weights."""
    if not (folder / OPEN_CLIP_CONFIG).is_file():
        raise FileNotFoundError(f"CLIP model folder {folder} has no {OPEN_CLIP_CONFIG}")
    if not any((folder / name).is_file() for name in OPEN_CLIP_SAFE_WEIGHTS):
        names = " or ".join(OPEN_CLIP_SAFE_WEIGHTS)
        raise ValueError(f"CLIP model folder {folder} holds no {names}; pickle checkpoints are "
                         "refused")
    return f"local-dir:{folder}"


def _first_line(error: Exception) -> str:
    return (str(error).strip() or type(error).__name__).splitlines()[0]


def _not_fetched(what: str, local_files_only: bool, error: Exception) -> FileNotFoundError:
    """The one-line error for hub weights that could not be had: not cached while downloads are
    off (and how to allow them), or not fetched."""
    if local_files_only or hub_offline():
        return FileNotFoundError(f"{what} is not in the local Hugging Face cache and "
                                 f"{downloads_off(local_files_only)}")
    return FileNotFoundError(f"cannot fetch {what} from the Hugging Face hub: "
                             f"{_first_line(error)}")


def _open_clip_tag_weights(model: str, tag: str, config: dict, local_files_only: bool) -> Path:
    """The safetensors weights open_clip publishes for ``model``/``tag`` on the Hugging Face hub,
    from the local cache only when ``local_files_only``; open_clip's own downloader (which
    fetches pickles from URLs, with no local-only switch) is never called."""
    from huggingface_hub import hf_hub_download

    repo, filename = os.path.split(config.get("hf_hub", ""))
    if not repo:
        raise ValueError(f"open_clip publishes CLIP weights {model}/{tag} only as a pickle "
                         "checkpoint, which is refused: give a .safetensors file as "
                         "eval.clip_pretrained")
    safe_name = (OPEN_CLIP_SAFE_WEIGHTS[0] if filename in ("", OPEN_CLIP_PICKLE_WEIGHTS)
                 else f"{Path(filename).stem}.safetensors")
    try:
        return Path(hf_hub_download(repo, safe_name, local_files_only=local_files_only))
    except Exception as error:  # hub errors come in many classes; name the weights
        raise _not_fetched(f"CLIP weights {model}/{tag} ({repo}/{safe_name})", local_files_only,
                           error) from error


def _hub_text_tower(name: str) -> list[str]:
    """The Hugging Face repos an open_clip model's text tower or tokenizer are read from when it
    is built (open_clip fetches them with no local-only switch)."""
    import open_clip

    if name.startswith("local-dir:"):  # its tokenizer is read from the folder itself
        config = json.loads((Path(name.removeprefix("local-dir:")) / OPEN_CLIP_CONFIG)
                            .read_text()).get("model_cfg", {})
        keys: tuple[str, ...] = ("hf_model_name",)
    else:
        config = open_clip.get_model_config(name) or {}
        keys = ("hf_model_name", "hf_tokenizer_name")
    text = config.get("text_cfg", {})
    return [text[key] for key in keys if text.get(key)]


def _resolve_open_clip(model: str, pretrained: str, local_files_only: bool
                       ) -> tuple[str, str | None]:
    """(open_clip model name, pretrained weights file or None) for any supported source; with
    ``local_files_only`` from local files and the local Hugging Face cache only."""
    name, weights = _locate_open_clip(model, pretrained, local_files_only)
    remote = _hub_text_tower(name)
    if remote and local_files_only and not hub_offline():
        raise ValueError(f"CLIP model {model!r} builds its text tower or tokenizer from the "
                         f"Hugging Face hub ({', '.join(remote)}), which open_clip contacts "
                         "whatever is cached: set HF_HUB_OFFLINE=1 to use the cached copy, or "
                         f"{ALLOW_DOWNLOADS}")
    return name, weights


def _locate_open_clip(model: str, pretrained: str, local_files_only: bool
                      ) -> tuple[str, str | None]:
    import open_clip

    if model.startswith("local-dir:"):
        return _open_clip_folder(Path(model.removeprefix("local-dir:"))), None
    if Path(model).is_dir():
        return _open_clip_folder(Path(model)), None
    if model.startswith("hf-hub:"):
        from huggingface_hub import snapshot_download

        repo = model.removeprefix("hf-hub:")
        try:
            folder = snapshot_download(repo, allow_patterns=[OPEN_CLIP_CONFIG,
                                                             *OPEN_CLIP_SAFE_WEIGHTS],
                                       local_files_only=local_files_only)
        except Exception as error:  # hub errors come in many classes; name the repo
            raise _not_fetched(f"CLIP model {model!r}", local_files_only, error) from error
        return _open_clip_folder(Path(folder)), None
    if model not in open_clip.list_models():
        raise ValueError(f"unknown CLIP model {model!r}: give an open_clip name (e.g. ViT-B-32), "
                         "a folder with open_clip_config.json, 'local-dir:PATH' or "
                         "'hf-hub:ORG/NAME'")
    if not pretrained:
        raise ValueError(f"CLIP model {model!r} needs pretrained weights: an open_clip tag such as "
                         "'openai' or a .safetensors file")
    if Path(pretrained).suffix or Path(pretrained).exists():
        return model, str(_safe_file(Path(pretrained), f"CLIP {model}"))
    pretrained_config = open_clip.get_pretrained_cfg(model, pretrained)
    if not pretrained_config:
        raise ValueError(f"open_clip has no weights {pretrained!r} for {model}; known tags: "
                         f"{open_clip.list_pretrained_tags_by_model(model)}")
    path = _open_clip_tag_weights(model, pretrained, pretrained_config, local_files_only)
    return model, str(_safe_file(path, f"CLIP {model}/{pretrained}"))


class CLIPScorer:
    """An open_clip model for CLIP-I and CLIP-T; loaded once, embeds in batches.

    ``model`` is an open_clip name (``"ViT-B-32"``) with ``pretrained`` an open_clip tag
    (``"openai"``) or a local ``.safetensors`` file; or a folder holding
    ``open_clip_config.json`` + safetensors weights (``"local-dir:/path"`` or the bare path);
    or ``"hf-hub:org/name"``. Hub weights (a tag's or ``hf-hub:``) come from the local Hugging
    Face cache only unless ``local_files_only`` is off. Features are L2-normalised float32 on
    the CPU.
    """

    def __init__(self, model: str = "ViT-B-32", pretrained: str = "openai", *,
                 device: torch.device | str = "cpu", batch_size: int = 32,
                 local_files_only: bool = True) -> None:
        import open_clip

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        name, weights = _resolve_open_clip(model, pretrained, local_files_only)
        # a tag's weights are loaded as a file, so the tag's activation (QuickGELU for the
        # OpenAI weights) is not known to open_clip unless it is given
        quick_gelu = bool(open_clip.get_pretrained_cfg(model, pretrained).get("quick_gelu"))
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            name, pretrained=weights, device=self.device, force_quick_gelu=quick_gelu)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(name)
        # by weights identity, so cached features never outlive weights replaced in place
        self.scorer_id = (f"clip:{model_identity(name)}{'-quickgelu' if quick_gelu else ''}:"
                          f"{model_identity(weights or '')}")
        logger.info("CLIP scorer %s on %s", self.scorer_id, self.device)

    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """L2-normalised image embeddings (N, D) of PIL images, float32 on the CPU."""
        return _embed_in_batches(images, self.preprocess, self.model.encode_image, self.device,
                                 self.batch_size)

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings (N, D), float32 on the CPU."""
        if not texts:
            raise ValueError("no texts to embed")
        outputs = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                tokens = self.tokenizer(list(texts[start:start + self.batch_size]))
                features = self.model.encode_text(tokens.to(self.device)).float()
                outputs.append(F.normalize(features, dim=-1).cpu())
        return torch.cat(outputs)


def dino_preprocess() -> transforms.Compose:
    """The protocol's DINO preprocessing: resize 256 (shorter side, bicubic), centre-crop 224,
    ImageNet mean/std."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(DINO_RESIZE, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(DINO_CROP),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


# PIL resampling codes, as transformers' image processors save them, by torchvision's names
_PIL_INTERPOLATION = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX",
                      5: "HAMMING"}


def _torchvision_size(value: object, what: str) -> int | tuple[int, int]:
    """A transformers size entry as torchvision takes it: ``{"shortest_edge": n}`` → ``n``
    (the shorter side), ``{"height": h, "width": w}`` → ``(h, w)``, a bare ``n`` (old feature
    extractors) → ``(n, n)``."""
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, dict):
        if set(value) == {"shortest_edge"}:
            return int(value["shortest_edge"])
        if set(value) == {"height", "width"}:
            return (int(value["height"]), int(value["width"]))
    raise ValueError(f"image processor {what} {value!r} is not supported: give "
                     "{'shortest_edge': n} or {'height': h, 'width': w}")


def processor_preprocess(config: dict) -> transforms.Compose:
    """The preprocessing a saved image-processor config (transformers' keys) describes.

    ``size`` ({"shortest_edge": n} resizes the shorter side, {"height", "width"} resizes to
    that), ``resample`` (PIL code), ``do_center_crop`` with ``crop_size``, rescaling by 1/255
    and ``image_mean``/``image_std``, which must be given. Anything else raises ``ValueError``.
    """
    from torchvision import transforms

    steps: list[Callable] = []
    if config.get("do_resize", True):
        resample = config.get("resample", 2)
        if resample not in _PIL_INTERPOLATION:
            raise ValueError(f"image processor resample {resample!r} is not a PIL code")
        steps.append(transforms.Resize(_torchvision_size(config.get("size"), "size"),
                                       interpolation=getattr(transforms.InterpolationMode,
                                                             _PIL_INTERPOLATION[resample])))
    if config.get("do_center_crop", False):
        crop = _torchvision_size(config.get("crop_size"), "crop_size")
        steps.append(transforms.CenterCrop(crop))
    if not config.get("do_rescale", True) or \
            abs(config.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-9:
        raise ValueError("image processor must rescale by 1/255 (do_rescale, rescale_factor)")
    steps.append(transforms.ToTensor())
    if config.get("do_normalize", True):
        if "image_mean" not in config or "image_std" not in config:
            raise ValueError("image processor config names no image_mean/image_std")
        steps.append(transforms.Normalize(config["image_mean"], config["image_std"]))
    return transforms.Compose(steps)


def _dino_folder_preprocess(folder: Path, image_size: int) -> transforms.Compose:
    if image_size == DINO_CROP:
        return dino_preprocess()
    path = folder / DINO_PROCESSOR_CONFIG
    if not path.is_file():
        raise ValueError(f"DINO model {folder} takes {image_size} px images, not the protocol's "
                         f"{DINO_CROP}, so its folder needs a {DINO_PROCESSOR_CONFIG}")
    preprocess = processor_preprocess(json.loads(path.read_text()))
    shape = tuple(preprocess(Image.new("RGB", (2 * image_size, 3 * image_size))).shape)
    if shape != (3, image_size, image_size):
        raise ValueError(f"{path} makes {shape} tensors; the model takes (3, {image_size}, "
                         f"{image_size})")
    return preprocess


class DINOScorer:
    """A transformers ViT (DINO ViT-S/16 by default) whose CLS token is the image embedding.

    ``model`` is a folder written by ``save_pretrained`` or a hub id; only safetensors weights
    are read. With ``local_files_only`` (the default) the hub is never contacted. A model of the
    protocol's 224 px input gets the protocol's preprocessing (:func:`dino_preprocess`) whatever its
    folder holds; a model of another input size must be a folder with a
    ``preprocessor_config.json``, which is followed (:func:`processor_preprocess`).
    """

    def __init__(self, model: str = "facebook/dino-vits16", *, device: torch.device | str = "cpu",
                 batch_size: int = 32, local_files_only: bool = True) -> None:
        from transformers import ViTModel

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if Path(model).is_dir() and not (Path(model) / "model.safetensors").is_file():
            raise ValueError(f"DINO model folder {model} has no model.safetensors; pickle "
                             "checkpoints are refused")
        try:
            network = ViTModel.from_pretrained(model, use_safetensors=True,
                                               local_files_only=local_files_only,
                                               add_pooling_layer=False)
        except OSError as error:
            if model.startswith((".", "/", "~")) or Path(model).exists():  # a folder, not an id
                raise FileNotFoundError(f"cannot load DINO model {model!r}: "
                                        f"{_first_line(error)}") from error
            raise _not_fetched(f"DINO model {model!r}", local_files_only, error) from error
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.model = network.to(self.device).eval()
        self.preprocess = _dino_folder_preprocess(Path(model), network.config.image_size)
        self.scorer_id = f"dino:{model_identity(model)}"
        logger.info("DINO scorer %s on %s", self.scorer_id, self.device)

    def _cls(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).last_hidden_state[:, 0]

    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """L2-normalised CLS embeddings (N, D) of PIL images, float32 on the CPU."""
        return _embed_in_batches(images, self.preprocess, self._cls, self.device, self.batch_size)


# --------------------------------------------------------------------------- feature cache

class FeatureCache:
    """Image features keyed by ``(scorer id, image sha256)``, so real images are embedded once.

    ``load(key)`` / ``save(key, features)`` optionally persist entries (for example as
    ``.safetensors`` in the artifact store); keys are ``"{scorer_id}/{sha256}"``.
    """

    def __init__(self, load: Callable[[str], torch.Tensor | None] | None = None,
                 save: Callable[[str, torch.Tensor], None] | None = None) -> None:
        self._entries: dict[str, torch.Tensor] = {}
        self._load = load
        self._save = save
        self.computed = 0  # images embedded by a scorer (not found in memory or by ``load``)

    def _lookup(self, key: str) -> torch.Tensor | None:
        if key not in self._entries and self._load is not None:
            found = self._load(key)
            if found is not None:
                self._entries[key] = found
        return self._entries.get(key)

    def features(self, scorer: ImageEmbedder, images: Sequence[tuple[str, Image.Image]]
                 ) -> torch.Tensor:
        """Features (N, D) of ``(sha256, image)`` pairs, in order; only unseen ones are embedded,
        together in one batched call."""
        keys = [f"{scorer.scorer_id}/{sha}" for sha, _ in images]
        missing = {key: image for key, (_, image) in zip(keys, images, strict=True)
                   if self._lookup(key) is None}
        if missing:
            fresh = scorer.image_features(list(missing.values()))
            self.computed += len(missing)
            for key, feature in zip(missing, fresh, strict=True):
                self._entries[key] = feature
                if self._save is not None:
                    self._save(key, feature)
        return torch.stack([self._entries[key] for key in keys])


# --------------------------------------------------------------------------- score rows

@dataclass(frozen=True)
class GeneratedImage:
    """One generated image to score, with the prompt it was generated from."""

    key: str  # its artifact key (or any stable id)
    prompt: str  # as generated; placeholders are stripped for CLIP-T
    prompt_index: int
    seed: int
    image: Image.Image


@dataclass(frozen=True)
class RealImage:
    """One real photo of a subject: a loadable key, the sha256 of its file and the image."""

    key: str
    sha256: str
    image: Image.Image


@dataclass(frozen=True)
class RealFeatures:
    """One subject's real-image features: ``clip`` (M, Dc) and ``dino`` (M, Dd), normalised."""

    keys: tuple[str, ...]
    clip: torch.Tensor
    dino: torch.Tensor


def real_features(images: Sequence[RealImage], clip: CLIPScorer, dino: DINOScorer,
                  cache: FeatureCache | None = None) -> RealFeatures:
    """Embed a subject's real images once (looked up in and added to ``cache``)."""
    if not images:
        raise ValueError("a subject needs at least one real image")
    cache = cache if cache is not None else FeatureCache()
    pairs = [(r.sha256, r.image) for r in images]
    return RealFeatures(keys=tuple(r.key for r in images), clip=cache.features(clip, pairs),
                        dino=cache.features(dino, pairs))


def _rows(records: list[dict[str, object]]) -> pd.DataFrame:
    frame = pd.DataFrame.from_records(records, columns=list(SCORE_COLUMNS))
    return frame.astype({"prompt_index": "int64", "seed": "int64", "clip_i": "float64",
                         "clip_t": "float64", "dino": "float64"})


def score_images(generated: Sequence[GeneratedImage], real: RealFeatures, *, clip: CLIPScorer,
                 dino: DINOScorer, run_id: str, subject: str, class_noun: str, kind: str,
                 method: str, placeholders: str | Sequence[str]) -> pd.DataFrame:
    """One row per generated image (columns :data:`SCORE_COLUMNS`).

    ``clip_i``/``dino``: mean cosine to the subject's real images; ``clip_t``: cosine between the
    image and its prompt with the placeholders removed (the ``prompt`` column holds that text).
    """
    if not generated:
        raise ValueError(f"{subject}/{method}: no generated images to score")
    images = [g.image for g in generated]
    plain = [strip_placeholder(g.prompt, placeholders) for g in generated]
    unique = sorted(set(plain))
    text = clip.text_features(unique)
    text_rows = text[[unique.index(p) for p in plain]]
    clip_feats = clip.image_features(images)
    clip_i = cosine_matrix(clip_feats, real.clip).mean(dim=1)
    clip_t = (clip_feats * text_rows).sum(dim=1)
    dino_i = cosine_matrix(dino.image_features(images), real.dino).mean(dim=1)
    return _rows([{"run": run_id, "subject": subject, "class": class_noun, "kind": kind,
                   "method": method, "prompt": prompt, "prompt_index": g.prompt_index,
                   "seed": g.seed, "image_key": g.key, "clip_i": float(ci), "clip_t": float(ct),
                   "dino": float(di)}
                  for g, prompt, ci, ct, di in zip(generated, plain, clip_i, clip_t, dino_i,
                                                   strict=True)])


def real_image_rows(real: RealFeatures, *, run_id: str, subject: str, class_noun: str,
                    kind: str) -> pd.DataFrame:
    """The upper bound as rows of method :data:`REAL_IMAGES`: one per real image, its mean cosine
    to the other real images (``clip_t`` is NaN: there is no prompt). Empty with < 2 images."""
    if len(real.keys) < 2:
        logger.warning("%s: fewer than 2 real images, no real-images bound", subject)
        return _rows([])
    clip_i, dino_i = real_pair_means(real.clip), real_pair_means(real.dino)
    return _rows([{"run": run_id, "subject": subject, "class": class_noun, "kind": kind,
                   "method": REAL_IMAGES, "prompt": "", "prompt_index": -1, "seed": -1,
                   "image_key": key, "clip_i": float(ci), "clip_t": float("nan"),
                   "dino": float(di)}
                  for key, ci, di in zip(real.keys, clip_i, dino_i, strict=True)])

