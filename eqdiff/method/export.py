"""A concept in diffusers' own file formats, for code that never imports eqdiff.

:func:`export_concept` writes each kind of learned tensor with its own writer
(:data:`PART_WRITERS`, by concept-file prefix):

- the token (S_LF + S_HF, or the single vector: exactly the row :func:`apply_concept` writes)
  as a textual-inversion embedding, ``learned_embeds.safetensors`` ``{placeholder: (1, D)}``,
  for ``pipe.load_textual_inversion``;
- the Custom-Diffusion K/V weights as ``pytorch_custom_diffusion_weights.safetensors`` for
  ``pipe.unet.load_attn_procs``: ``<layer>.processor.to_k_custom_diffusion.weight`` (and
  ``to_v``) per cross-attention layer, plus an empty tensor under each self-attention layer's
  ``<block>.attn1.processor`` so diffusers gets a processor for every attention layer
  (``train_kv=True``, ``train_q_out=False``).

Residual reference attention has no diffusers equivalent: it is left out and the result says
so (:data:`LEFT_OUT`). A prefix that is in neither table is refused, never skipped. Beside the
files, ``export.json`` and ``README.md`` name the base model, the placeholder token, what
each file holds and the plain-diffusers code that loads them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
from safetensors.torch import save_file

from eqdiff.method.attention import KV_PREFIX
from eqdiff.method.concept import Concept, ConceptError
from eqdiff.method.embeddings import TOKEN_PREFIX
from eqdiff.method.lora import LORA_PREFIX, write_diffusers_lora
from eqdiff.method.reference import RRA_PREFIX

TEXTUAL_INVERSION_FILE = "learned_embeds.safetensors"
CUSTOM_DIFFUSION_FILE = "pytorch_custom_diffusion_weights.safetensors"
EXPORT_RECORD_FILE = "export.json"
EXPORT_README_FILE = "README.md"
EXPORT_FORMAT = "eqdiff-concept-export"
CROSS_ATTENTION = ".attn2"
SELF_ATTENTION = ".attn1"
_KV_NAME = re.compile(r"(?P<layer>.+)\.(?P<proj>to_k|to_v)\.weight")


@dataclass(frozen=True)
class ExportedPart:
    """One file of an export: its name, what it holds, and the plain-diffusers lines that load
    it into ``pipe`` (they read the export folder from the variable ``folder``)."""

    file: str
    holds: str
    load_code: str


PartWriter = Callable[[Concept, Path], ExportedPart]


def write_textual_inversion(concept: Concept, folder: Path) -> ExportedPart:
    """The inference token as diffusers' textual-inversion file: one key, the placeholder."""
    vector = concept.token_vector.detach().cpu().float().reshape(1, -1).contiguous()
    token = concept.placeholder_token
    save_file({token: vector}, folder / TEXTUAL_INVERSION_FILE)
    rows = concept.tensors[TOKEN_PREFIX + "vectors"].shape[0]
    source = "S_LF + S_HF" if rows == 2 else "the learned vector"
    return ExportedPart(
        TEXTUAL_INVERSION_FILE,
        f"textual-inversion embedding of {token} ({source}, {vector.shape[1]} values)",
        f"pipe.load_textual_inversion(folder, weight_name={TEXTUAL_INVERSION_FILE!r}, "
        f"token={token!r})")


def custom_diffusion_state_dict(kv: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """eqdiff K/V tensors (``eqdiff_kv.<block>.attn2.to_k.weight``) under diffusers' Custom
    Diffusion names, with an empty entry for each block's self-attention layer."""
    state: dict[str, torch.Tensor] = {}
    for name, tensor in kv.items():
        match = _KV_NAME.fullmatch(name.removeprefix(KV_PREFIX))
        if match is None or not match["layer"].endswith(CROSS_ATTENTION):
            raise ConceptError(f"K/V tensor {name!r} has no Custom Diffusion equivalent (only "
                               "cross-attention to_k/to_v weights without bias export)")
        processor = f"{match['layer']}.processor"
        state[f"{processor}.{match['proj']}_custom_diffusion.weight"] = (
            tensor.detach().cpu().contiguous())
        block = match["layer"].removesuffix(CROSS_ATTENTION)
        state[f"{block}{SELF_ATTENTION}.processor"] = torch.empty(0)
    for processor in {key.rsplit(".", 2)[0] for key in state if key.endswith(".weight")}:
        for proj in ("to_k", "to_v"):
            if f"{processor}.{proj}_custom_diffusion.weight" not in state:
                raise ConceptError(f"K/V tensors of {processor.removesuffix('.processor')} lack "
                                   f"{proj}; Custom Diffusion needs both")
    return state


def write_custom_diffusion(concept: Concept, folder: Path) -> ExportedPart:
    """The K/V weights as diffusers' Custom Diffusion attention-processor file."""
    kv = concept.tensors_with_prefix(KV_PREFIX)
    save_file(custom_diffusion_state_dict(kv), folder / CUSTOM_DIFFUSION_FILE,
              metadata={"format": "pt"})
    layers = len(kv) // 2
    return ExportedPart(
        CUSTOM_DIFFUSION_FILE,
        f"Custom Diffusion K/V weights of {layers} cross-attention layers",
        f"pipe.unet.load_attn_procs(folder, weight_name={CUSTOM_DIFFUSION_FILE!r},\n"
        "                          _pipeline=pipe)  # diffusers 0.42 installs them only with "
        "_pipeline")


def write_lora(concept: Concept, folder: Path) -> ExportedPart:
    """The UNet LoRA as diffusers' own LoRA file (what ``train_dreambooth_lora.py`` saves)."""
    path = write_diffusers_lora(concept.tensors, folder)
    layers = len(concept.tensors_with_prefix(LORA_PREFIX)) // 2
    return ExportedPart(path.name, f"UNet LoRA of {layers} attention projections",
                        f"pipe.load_lora_weights(folder, weight_name={path.name!r})")


PART_WRITERS: dict[str, PartWriter] = {
    TOKEN_PREFIX: write_textual_inversion,
    KV_PREFIX: write_custom_diffusion,
    LORA_PREFIX: write_lora,
}
"""One writer per kind of learned tensor, by concept-file prefix, in loading order."""

LEFT_OUT: dict[str, str] = {RRA_PREFIX: "residual reference attention"}
"""Kinds of learned tensor with no diffusers equivalent: left out, and said so."""


@dataclass
class ExportResult:
    folder: Path
    parts: list[ExportedPart]
    left_out: list[str]
    """One line per left-out kind of tensor, saying what it is and what it changes."""


def load_code(concept: Concept, folder: Path, parts: list[ExportedPart]) -> str:
    """Plain-diffusers lines that build ``pipe`` from the base model and these files."""
    base = concept.record.get("base_model_source") or concept.record["base_model"]
    return "\n".join(["from diffusers import StableDiffusionPipeline", "",
                      f"folder = {str(folder)!r}",
                      f"pipe = StableDiffusionPipeline.from_pretrained({base!r})",
                      *(part.load_code for part in parts)])


def export_concept(concept: Concept, folder: str | Path, *,
                   overwrite: bool = False) -> ExportResult:
    """Write ``concept`` into ``folder`` in diffusers' formats (see the module docstring).

    Refuses, before writing anything, a concept with tensors of a kind no writer knows, and a
    non-empty ``folder`` unless ``overwrite`` (files of the same names are then replaced,
    others kept).
    """
    folder = Path(folder)
    known = (*PART_WRITERS, *LEFT_OUT)
    unknown = sorted({name.split(".", 1)[0] + "." for name in concept.tensors
                      if not name.startswith(known)})
    if unknown:
        raise ConceptError(f"concept tensors under {', '.join(unknown)} have no diffusers "
                           f"export (known: {', '.join(known)})")
    if folder.exists() and not folder.is_dir():
        raise ConceptError(f"{folder} is a file, not a folder to export into")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise ConceptError(f"{folder} is not empty; choose another folder or overwrite")
    folder.mkdir(parents=True, exist_ok=True)
    parts = [writer(concept, folder) for prefix, writer in PART_WRITERS.items()
             if concept.tensors_with_prefix(prefix)]
    left_out = [f"left out: {what} ({len(concept.tensors_with_prefix(prefix))} tensors); "
                "images will differ from eqdiff's own generation"
                for prefix, what in LEFT_OUT.items() if concept.tensors_with_prefix(prefix)]
    result = ExportResult(folder, parts, left_out)
    code = load_code(concept, folder.resolve(), parts)
    _write_record(concept, result, code)
    _write_readme(concept, result, code)
    return result


def _write_record(concept: Concept, result: ExportResult, code: str) -> None:
    record = concept.record
    method = record.get("method")
    (result.folder / EXPORT_RECORD_FILE).write_text(json.dumps({
        "format": EXPORT_FORMAT,
        "diffusers_version": diffusers.__version__,
        "base_model": record["base_model"],
        "base_model_source": record.get("base_model_source") or record["base_model"],
        "placeholder_token": concept.placeholder_token,
        "subject": record.get("subject"),
        "class_noun": record.get("class_noun"),
        "method": method.get("name") if isinstance(method, dict) else method,
        "concept_tensors_sha256": record["tensors_sha256"],
        "files": {part.file: part.holds for part in result.parts},
        "left_out": result.left_out,
        "load_code": code,
    }, indent=2))


def _write_readme(concept: Concept, result: ExportResult, code: str) -> None:
    token = concept.placeholder_token
    noun = concept.record.get("class_noun") or ""
    files = [f"- `{part.file}`: {part.holds}" for part in result.parts]
    prompt = " ".join(f"a photo of a {token} {noun}".split())
    lines = [
        f"# Concept {concept.record.get('subject', token)} for diffusers",
        "",
        f"Base model: `{concept.record['base_model']}`. Placeholder token: `{token}`.",
        "",
        *files,
        f"- `{EXPORT_RECORD_FILE}`: the same, as JSON",
        "",
        *(f"{line[:1].upper()}{line[1:]}.\n" for line in result.left_out),
        "```python",
        code,
        f"image = pipe({prompt!r}).images[0]",
        "```",
        "",
    ]
    (result.folder / EXPORT_README_FILE).write_text("\n".join(lines))
