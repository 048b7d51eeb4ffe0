"""Reading the pipeline's stored artifacts back: manifests, photos, masks, samples, caches.

Stages pass store keys between them, never tensors; these helpers turn keys into the images,
tensors and caches the method and the scorers take.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from eqdiff.config import config_hash
from eqdiff.data.images import pil_to_tensor
from eqdiff.data.masks import CachedMask, MaskCache, decode_mask_png, mask_to_tensor
from eqdiff.data.preprocess import MANIFEST, SubjectManifest
from eqdiff.evaluation.metrics import FeatureCache, GeneratedImage, RealImage
from eqdiff.method.training import Checkpointer, CheckpointRejected, ConceptTrainer
from eqdiff.store import ArtifactStore, keys
from eqdiff.store.errors import ChecksumMismatchError
from eqdiff.store.keys import join_key

SAMPLES_RECORD = "samples.json"

logger = logging.getLogger(__name__)


def read_rgb(store: ArtifactStore, key: str) -> Image.Image:
    """The stored image at ``key`` as RGB."""
    with Image.open(io.BytesIO(store.get_bytes(key))) as image:
        return image.convert("RGB")


def read_manifest(store: ArtifactStore, run_id: str, subject: str) -> SubjectManifest:
    """The preprocessing manifest of a subject."""
    prefix = keys.preprocess_prefix(run_id, subject)
    return SubjectManifest.from_dict(store.get_json(join_key(prefix, MANIFEST)))


def download_prefix(store: ArtifactStore, prefix: str, folder: Path) -> Path:
    """Every output of the stage at ``prefix`` (markers left out) into ``folder``."""
    for key in store.list_keys(prefix + "/"):
        relative = key[len(prefix) + 1:]
        if relative.startswith("_"):
            continue  # markers
        store.get_file(key, folder / relative)
    return folder


def subject_tensors(store: ArtifactStore, run_id: str, subject: str
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """A subject's preprocessed photos (N, 3, R, R) in [-1, 1] and masks (N, 1, R, R)."""
    photos = keys.preprocess_prefix(run_id, subject)
    masks = keys.masks_prefix(run_id, subject)
    images, mask_list = [], []
    for entry in read_manifest(store, run_id, subject).images:
        images.append(pil_to_tensor(read_rgb(store, join_key(photos, entry.file))))
        mask, _ = decode_mask_png(store.get_bytes(join_key(masks, f"{entry.name}.png")))
        mask_list.append(mask_to_tensor(mask))
    return torch.stack(images), torch.stack(mask_list)


def prior_tensors(store: ArtifactStore, prefix: str) -> torch.Tensor:
    """The class-prior images under ``prefix`` (read through the store's local cache: every
    subject of the class reads the same ones)."""
    found = sorted(k for k in store.list_keys(prefix + "/") if k.endswith(".png"))
    tensors = []
    for key in found:
        with Image.open(store.local_path(key)) as image:
            tensors.append(pil_to_tensor(image.convert("RGB")))
    return torch.stack(tensors)


def reference_image(store: ArtifactStore, run_id: str, subject: str,
                    resolution: int) -> torch.Tensor:
    """The subject's first preprocessed photo, (3, R, R) in [-1, 1]: RRA's fixed reference."""
    first = read_manifest(store, run_id, subject).images[0]
    image = read_rgb(store, join_key(keys.preprocess_prefix(run_id, subject), first.file))
    return pil_to_tensor(image.resize((resolution, resolution), Image.Resampling.BICUBIC))


def real_images(store: ArtifactStore, run_id: str, subject: str) -> list[RealImage]:
    """The subject's preprocessed photos, as the scorers take them."""
    prefix = keys.preprocess_prefix(run_id, subject)
    images = []
    for entry in read_manifest(store, run_id, subject).images:
        key = join_key(prefix, entry.file)
        images.append(RealImage(key, entry.sha256, read_rgb(store, key)))
    return images


def generated_images(store: ArtifactStore, prefix: str) -> list[GeneratedImage]:
    """The samples of one (subject, method), with their prompts and seeds."""
    records = json.loads(store.get_bytes(join_key(prefix, SAMPLES_RECORD)))
    images = []
    for record in records:
        key = join_key(prefix, record["file"])
        images.append(GeneratedImage(key, record["prompt"], record["prompt_index"],
                                     record["seed"], read_rgb(store, key)))
    return images


def store_mask_cache(store: ArtifactStore) -> MaskCache:
    """Masks cached in the store (``cache/masks/…``), shared by runs and methods."""

    def key_of(name: CachedMask) -> str:
        return keys.mask_cache_key(name.image_sha, name.extractor, name.settings_digest)

    def get(name: CachedMask) -> bytes | None:
        key = key_of(name)
        return store.get_bytes(key) if store.exists(key) else None

    def put(name: CachedMask, data: bytes) -> None:
        store.put_bytes(key_of(name), data)

    return MaskCache(get=get, put=put)


def store_feature_cache(store: ArtifactStore) -> FeatureCache:
    """Real-image features persisted in the store (``cache/features/…``), so reruns and other
    runs embed each real photo once per scorer."""

    def key_for(name: str) -> str:
        scorer, sha = name.rsplit("/", 1)
        return keys.features_key(config_hash(scorer), sha)

    def load(name: str) -> torch.Tensor | None:
        key = key_for(name)
        return (safetensors_load(store.get_bytes(key))["features"] if store.exists(key)
                else None)

    def save(name: str, features: torch.Tensor) -> None:
        store.put_bytes(key_for(name), safetensors_save({"features": features.contiguous()}))

    return FeatureCache(load=load, save=save)


class StoreCheckpointer(Checkpointer):
    """A :class:`Checkpointer` whose file also lives in the store, so a run resumes on any
    worker after the one that trained it died.

    A stored checkpoint that cannot be resumed (see :class:`CheckpointRejected`; or its content
    fails the store's checksum) does not fail the training: it is moved to
    ``rejected_key(time)``, a warning names both keys and the reason, :attr:`rejected` records
    it, and the training starts from step 0. ``key``'s folder holds the checkpoint alone
    (:func:`eqdiff.store.keys.checkpoint_key`): moving it away deletes that folder.
    """

    def __init__(self, store: ArtifactStore, key: str, folder: Path, every: int, *, name: str,
                 rejected_key: Callable[[str], str]) -> None:
        super().__init__(folder, every, name=name)
        self.store, self.key, self.rejected_key = store, key, rejected_key
        self.rejected: list[dict[str, str | None]] = []

    @property
    def source(self) -> str:
        return self.key

    def restore(self, trainer: ConceptTrainer) -> bool:
        if not self.store.exists(self.key):
            return False
        try:
            self.store.get_file(self.key, self.path)
            return super().restore(trainer)
        except ChecksumMismatchError:
            self._reject("its content does not match the checksum the store recorded for it")
        except CheckpointRejected as rejected:
            self._reject(rejected.reason)
        return False

    def _reject(self, reason: str) -> None:
        """Take the checkpoint off the resume key, keeping a copy under its rejected key."""
        if self.path.is_file():
            moved_to = self.rejected_key(datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ"))
            self.store.put_file(moved_to, self.path)
            self.path.unlink()
            self.store.delete_prefix(self.key.rsplit("/", 1)[0])
            logger.warning("%s: checkpoint %s cannot be resumed: %s. Moved it to %s; training "
                           "starts from step 0.", self.name, self.key, reason, moved_to)
        else:  # the store hands out no content that fails its checksum: nothing to copy
            moved_to = None
            logger.warning("%s: checkpoint %s cannot be resumed: %s. It cannot be read to keep "
                           "a copy, so it stays until this training's first checkpoint replaces "
                           "it; training starts from step 0.", self.name, self.key, reason)
        self.rejected.append({"key": self.key, "moved_to": moved_to, "reason": reason})

    def save(self, trainer: ConceptTrainer) -> None:
        super().save(trainer)
        self.store.put_file(self.key, self.path)
