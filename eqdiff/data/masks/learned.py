"""Mask extractors built on pretrained models: Grounded-SAM and CLIPSeg.

Models load lazily, on the first mask, through :func:`load_pretrained` — a local folder or a hub
id already in the local cache (``local_files_only``, on by default, keeps downloads off) — so
building an extractor (and hashing its settings for the cache) needs neither ``transformers``
nor weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from eqdiff.config import ALLOW_DOWNLOADS
from eqdiff.data.masks.extractors import MaskInput, MaskUnavailable


def load_pretrained(processor_class: Any, model_class: Any, source: str, what: str, *,
                    device: str, local_files_only: bool) -> tuple[Any, Any]:
    """``(processor, model)`` from ``source`` by their classes' ``from_pretrained``; the model on
    ``device`` in eval mode. ``what`` names them in errors ("no SAM processor configured").

    Model weights are read from safetensors files only (``use_safetensors=True``): a folder or
    hub repo with only pickled weights is refused, since unpickling can run code."""
    if not source:
        raise ValueError(f"no {what} processor configured: set a local path or hub id")
    loaded = []
    for part, loader, options in (("processor", processor_class, {}),
                                  ("model", model_class, {"use_safetensors": True})):
        try:
            loaded.append(loader.from_pretrained(source, local_files_only=local_files_only,
                                                 **options))
        except (OSError, ValueError) as error:
            where = ("a local folder or a hub id already in the local cache; downloads are "
                     f"off: {ALLOW_DOWNLOADS}" if local_files_only
                     else "a local folder or a hub id")
            first_line = (str(error).strip() or type(error).__name__).splitlines()[0]
            raise ValueError(f"could not load the {what} {part} from {source!r} ({where}): "
                             f"{first_line}") from error
    processor, model = loaded
    return processor, model.to(device).eval()


@dataclass(frozen=True, eq=False)
class GroundedSamMask:
    """Grounding DINO box for ``"a {class_noun}."`` (highest score), then SAM inside the box."""

    detector_model: str
    segmentation_model: str
    box_threshold: float = 0.3
    text_threshold: float = 0.25
    device: str = "cpu"
    local_files_only: bool = True
    name: str = "grounded-sam"
    cacheable: bool = True

    def settings(self) -> dict[str, Any]:
        return {"detector_model": self.detector_model,
                "segmentation_model": self.segmentation_model,
                "box_threshold": self.box_threshold, "text_threshold": self.text_threshold}

    @cached_property
    def _detector(self) -> tuple[Any, Any]:
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        return load_pretrained(AutoProcessor, AutoModelForZeroShotObjectDetection,
                               self.detector_model, "Grounding DINO", device=self.device,
                               local_files_only=self.local_files_only)

    @cached_property
    def _segmenter(self) -> tuple[Any, Any]:
        from transformers import SamModel, SamProcessor

        return load_pretrained(SamProcessor, SamModel, self.segmentation_model, "SAM",
                               device=self.device, local_files_only=self.local_files_only)

    def box(self, item: MaskInput) -> list[float]:
        """The best (x0, y0, x1, y1) box for the class noun, in image pixels."""
        processor, model = self._detector
        width, height = item.image.size
        inputs = processor(images=item.image, text=f"a {item.class_noun or 'object'}.",
                           return_tensors="pt").to(self.device)
        with torch.no_grad():
            outputs = model(**inputs)
        found = processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=self.box_threshold,
            text_threshold=self.text_threshold, target_sizes=[(height, width)])[0]
        if len(found["scores"]) == 0:
            raise MaskUnavailable(f"Grounding DINO found no {item.class_noun!r}")
        best = int(found["scores"].argmax())
        x0, y0, x1, y1 = found["boxes"][best].tolist()
        return [max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)]

    def extract(self, item: MaskInput) -> np.ndarray:
        box = self.box(item)
        processor, model = self._segmenter
        inputs = processor(item.image, input_boxes=[[box]], return_tensors="pt").to(self.device)
        with torch.no_grad():
            outputs = model(**inputs, multimask_output=False)
        masks = processor.image_processor.post_process_masks(
            outputs.pred_masks.cpu(), inputs["original_sizes"].cpu(),
            inputs["reshaped_input_sizes"].cpu())
        return masks[0][0, 0].numpy().astype(bool)


@dataclass(frozen=True, eq=False)
class ClipSegMask:
    """CLIPSeg heat map for ``"a {class_noun}"``, sigmoid, bilinear to image size, thresholded."""

    model: str
    threshold: float = 0.4
    device: str = "cpu"
    local_files_only: bool = True
    name: str = "clipseg"
    cacheable: bool = True

    def settings(self) -> dict[str, Any]:
        return {"model": self.model, "threshold": self.threshold}

    @cached_property
    def _model(self) -> tuple[Any, Any]:
        from transformers import AutoProcessor, CLIPSegForImageSegmentation

        return load_pretrained(AutoProcessor, CLIPSegForImageSegmentation, self.model, "CLIPSeg",
                               device=self.device, local_files_only=self.local_files_only)

    def extract(self, item: MaskInput) -> np.ndarray:
        processor, model = self._model
        inputs = processor(text=[f"a {item.class_noun or 'object'}"], images=[item.image],
                           return_tensors="pt", padding=True).to(self.device)
        with torch.no_grad():
            logits = model(**inputs).logits
        heat = torch.sigmoid(logits.float().reshape(-1, *logits.shape[-2:])[:1, None])
        width, height = item.image.size
        heat = F.interpolate(heat, size=(height, width), mode="bilinear", align_corners=False)
        return (heat[0, 0] >= self.threshold).cpu().numpy()


LEARNED_EXTRACTORS = frozenset({GroundedSamMask.name, ClipSegMask.name})
"""The extractors that run a pretrained model (on a GPU when there is one)."""
