"""The saved concept: exactly the learned tensors (safetensors) plus a JSON record.

``concept.safetensors`` holds tensors named by prefix (``eqdiff_token.``, ``eqdiff_kv.``,
``eqdiff_rra.``, ``eqdiff_lora.``); ``concept.json`` holds the base model's identity, the
placeholder token, the resolved configuration and hashes. A concept loads into a standard
diffusers ``StableDiffusionPipeline`` (token row + K/V weights + the UNet LoRA as a diffusers
LoRA adapter), so users can generate with their own code; pickled files are never read, and a
concept trained on another base model is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from eqdiff.method.attention import KV_PREFIX, WeightHandle, write_kv_weights
from eqdiff.method.embeddings import TOKEN_PREFIX, write_token_row
from eqdiff.method.lora import LORA_PREFIX, LoraHandle, apply_unet_lora
from eqdiff.method.models import model_identity
from eqdiff.method.reference import RRA_PREFIX

logger = logging.getLogger(__name__)

TENSORS_FILE = "concept.safetensors"
RECORD_FILE = "concept.json"
FORMAT = "eqdiff-concept"
FORMAT_VERSION = 1
KNOWN_PREFIXES = (TOKEN_PREFIX, KV_PREFIX, RRA_PREFIX, LORA_PREFIX)
TOKEN_VECTORS = TOKEN_PREFIX + "vectors"
REQUIRED_FIELDS = ("format", "base_model", "placeholder_token", "tensors_sha256", "tensor_names")
"""The fields of ``concept.json`` that loading and applying a concept read."""


class ConceptError(ValueError):
    """A concept file is unreadable, unsafe, malformed, or does not fit the model it is loaded
    into. The message is one line naming the file and the problem."""


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


@dataclass
class Concept:
    tensors: dict[str, torch.Tensor]
    record: dict[str, Any]

    @property
    def placeholder_token(self) -> str:
        return self.record["placeholder_token"]

    @property
    def token_vector(self) -> torch.Tensor:
        """The inference token: S_LF + S_HF (or the single vector). Shape (D,)."""
        return self.tensors[TOKEN_VECTORS].sum(dim=0)

    @property
    def content_hash(self) -> str:
        return self.record["tensors_sha256"][:16]

    def tensors_with_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.tensors.items() if k.startswith(prefix)}


def _tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def save_concept(folder: str | Path, tensors: dict[str, torch.Tensor], record: dict[str, Any],
                 *, base_model: str) -> Path:
    """Write ``concept.safetensors`` and ``concept.json`` into ``folder``; returns the folder.

    ``record`` is the trainer's metadata (subject, method, placeholder token, hashes, …);
    the base model's identity and the tensors' hash are added here.
    """
    unknown = [k for k in tensors if not k.startswith(KNOWN_PREFIXES)]
    if unknown:
        raise ConceptError(f"tensor names must start with one of {KNOWN_PREFIXES}: {unknown[:3]}")
    if TOKEN_VECTORS not in tensors:
        raise ConceptError("a concept needs its token vectors (eqdiff_token.vectors)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    full_record = {**record, "format": FORMAT, "format_version": FORMAT_VERSION,
                   "base_model": model_identity(base_model), "base_model_source": base_model,
                   "tensors_sha256": _tensors_digest(tensors),
                   "tensor_names": sorted(tensors)}
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(contiguous, folder / TENSORS_FILE,
              metadata={"format": FORMAT, "base_model": full_record["base_model"]})
    (folder / RECORD_FILE).write_text(json.dumps(full_record, indent=2, sort_keys=True))
    return folder


def load_concept(path: str | Path) -> Concept:
    """Read a concept folder (or its ``.safetensors`` file, with the JSON beside it).

    Raises :class:`ConceptError` naming the file for anything malformed: not safetensors or
    truncated, JSON that does not parse or lacks :data:`REQUIRED_FIELDS`, tensors missing,
    unexpected or of the wrong shape, or tensors that do not match the record's hash.
    """
    path = Path(path)
    folder = path.parent if path.suffix else path
    tensors_path = path if path.suffix else folder / TENSORS_FILE
    if tensors_path.suffix != ".safetensors":
        raise ConceptError(f"{tensors_path}: only .safetensors concept files are loaded "
                           "(pickles can run code)")
    record_path = folder / RECORD_FILE
    if not tensors_path.is_file() or not record_path.is_file():
        raise ConceptError(f"{folder} is not a concept: it needs {TENSORS_FILE} and "
                           f"{RECORD_FILE}")
    record = _read_record(record_path)
    try:
        tensors = load_file(tensors_path)
    except (OSError, SafetensorError) as err:
        raise ConceptError(f"{tensors_path}: not a readable safetensors file (truncated, damaged "
                           f"or another format): {_one_line(err)}") from err
    _check_tensors(tensors, record, tensors_path)
    if _tensors_digest(tensors) != record["tensors_sha256"]:
        raise ConceptError(f"{tensors_path} does not match the hash in {record_path}; the "
                           "files are corrupt or from different concepts")
    return Concept(tensors, record)


def _read_record(record_path: Path) -> dict[str, Any]:
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError) as err:  # UnicodeDecodeError and JSONDecodeError included
        raise ConceptError(f"{record_path}: not readable JSON: {_one_line(err)}") from err
    if not isinstance(record, dict):
        raise ConceptError(f"{record_path}: holds a JSON {type(record).__name__}, not a concept "
                           "record")
    if record.get("format") != FORMAT:
        raise ConceptError(f"{record_path} is not an {FORMAT} record")
    missing = [name for name in REQUIRED_FIELDS if name not in record]
    if missing:
        raise ConceptError(f"{record_path}: missing required field(s) {', '.join(missing)}")
    return record


def _check_tensors(tensors: dict[str, torch.Tensor], record: dict[str, Any],
                   tensors_path: Path) -> None:
    names = set(tensors)
    listed = set(record["tensor_names"])
    if names != listed:
        missing, extra = sorted(listed - names)[:3], sorted(names - listed)[:3]
        raise ConceptError(f"{tensors_path}: tensors do not match {RECORD_FILE}'s tensor_names: "
                           f"missing {missing}, unexpected {extra}")
    if TOKEN_VECTORS not in tensors:
        raise ConceptError(f"{tensors_path}: missing the token vectors ({TOKEN_VECTORS})")
    unknown = sorted(k for k in tensors if not k.startswith(KNOWN_PREFIXES))
    if unknown:
        raise ConceptError(f"{tensors_path}: tensor names must start with one of "
                           f"{KNOWN_PREFIXES}: {unknown[:3]}")
    vectors = tensors[TOKEN_VECTORS]
    if vectors.ndim != 2 or not 1 <= vectors.shape[0] <= 2 or not vectors.is_floating_point():
        raise ConceptError(f"{tensors_path}: {TOKEN_VECTORS} must be 1 or 2 float rows "
                           f"(n, D), got {vectors.dtype} {tuple(vectors.shape)}")


@dataclass
class ConceptHandle:
    """Undoes :func:`apply_concept`: the LoRA adapter is taken out, pretrained K/V weights come
    back; the token row is reset to zeros (the token stays in the tokenizer, meaning
    nothing)."""

    kv: WeightHandle
    text_encoder: Any
    token_id: int
    lora: LoraHandle | None = None

    def remove(self) -> None:
        if self.lora is not None:
            self.lora.remove()
            self.lora = None
        self.kv.remove()
        with torch.no_grad():
            self.text_encoder.get_input_embeddings().weight[self.token_id].zero_()


def check_base_model(concept: Concept, base_model: str) -> None:
    """Refuse a concept trained on another base model (clear error naming both)."""
    expected = concept.record["base_model"]
    actual = model_identity(base_model)
    if expected != actual:
        raise ConceptError(f"concept for subject {concept.record.get('subject')!r} was trained "
                           f"on base model {expected!r}, not {actual!r}")


def apply_concept(pipeline: Any, concept: Concept, *, base_model: str) -> ConceptHandle:
    """Load ``concept`` into a diffusers SD pipeline (or :class:`SDComponents`) in place.

    Writes S_LF + S_HF into the placeholder's embedding row and the trained K/V into the
    cross-attention projections, and loads the UNet LoRA as a diffusers LoRA adapter. RRA
    tensors need the project's sampler (which installs the
    RRA processors and the reference pass); a plain pipeline refuses them clearly.
    """
    if concept.tensors_with_prefix(RRA_PREFIX):
        check_base_model(concept, base_model)  # a concept for another model says so first
        raise ConceptError("this concept has residual-reference-attention tensors; generate "
                           "with eqdiff.method.sampling.ConceptGenerator, which installs RRA "
                           "and the reference pass")
    return apply_without_rra(pipeline, concept, base_model=base_model)


def apply_without_rra(pipeline: Any, concept: Concept, *, base_model: str) -> ConceptHandle:
    """The part of a concept a plain pipeline holds: token row, K/V weights and UNet LoRA.

    RRA tensors are left alone here; the sampler installs them with the reference pass.
    """
    check_base_model(concept, base_model)
    token_id = write_token_row(pipeline.tokenizer, pipeline.text_encoder,
                               concept.placeholder_token, concept.token_vector)
    handle = ConceptHandle(write_kv_weights(pipeline.unet, concept.tensors_with_prefix(KV_PREFIX)),
                           pipeline.text_encoder, token_id)
    try:  # after the K/V: the LoRA wraps the projections they are written into
        handle.lora = apply_unet_lora(pipeline.unet, concept.tensors)
    except Exception:
        handle.remove()
        raise
    return handle
