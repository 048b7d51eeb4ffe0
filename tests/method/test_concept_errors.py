"""Every malformed concept file fails with one ConceptError line that names the file."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from eqdiff.method.concept import (
    RECORD_FILE,
    TENSORS_FILE,
    ConceptError,
    load_concept,
    save_concept,
)


def write_concept(folder: Path) -> Path:
    """A small valid concept (no model needed: the base model is named, not loaded)."""
    tensors = {"eqdiff_token.vectors": torch.randn(2, 8),
               "eqdiff_kv.block.attn2.to_k.weight": torch.randn(4, 8)}
    record = {"subject": "ball", "class_noun": "ball", "placeholder_token": "<eqd>",
              "method": {"name": "custom-diffusion"}}
    return save_concept(folder, tensors, record, base_model="test/base")


def not_safetensors(folder: Path) -> Path:
    (folder / TENSORS_FILE).write_bytes(b"\xff" * 64 + b"this is not a safetensors file")
    return folder / TENSORS_FILE


def truncated(folder: Path) -> Path:
    data = (folder / TENSORS_FILE).read_bytes()
    (folder / TENSORS_FILE).write_bytes(data[:len(data) // 2])
    return folder / TENSORS_FILE


def empty(folder: Path) -> Path:
    (folder / TENSORS_FILE).write_bytes(b"")
    return folder / TENSORS_FILE


def json_not_parseable(folder: Path) -> Path:
    (folder / RECORD_FILE).write_text('{"format": "eqdiff-concept", ')
    return folder / RECORD_FILE


def json_not_an_object(folder: Path) -> Path:
    (folder / RECORD_FILE).write_text("[1, 2, 3]")
    return folder / RECORD_FILE


def without(field: str) -> Callable[[Path], Path]:
    def edit(folder: Path) -> Path:
        record = json.loads((folder / RECORD_FILE).read_text())
        del record[field]
        (folder / RECORD_FILE).write_text(json.dumps(record))
        return folder / RECORD_FILE
    return edit


def rewrite_tensors(change: Callable[[dict], None], *, relist: bool = False
                    ) -> Callable[[Path], Path]:
    """Rewrite the tensors; with ``relist`` the record's tensor_names follow them (its hash
    does not), so the checks after the name check are reached."""
    def edit(folder: Path) -> Path:
        tensors = dict(load_concept(folder).tensors)
        change(tensors)
        save_file(tensors, folder / TENSORS_FILE)
        if relist:
            record = json.loads((folder / RECORD_FILE).read_text())
            record["tensor_names"] = sorted(tensors)
            (folder / RECORD_FILE).write_text(json.dumps(record))
        return folder / TENSORS_FILE
    return edit


def drop_kv(tensors: dict) -> None:
    del tensors["eqdiff_kv.block.attn2.to_k.weight"]


def drop_vectors(tensors: dict) -> None:
    del tensors["eqdiff_token.vectors"]


def flat_vectors(tensors: dict) -> None:
    tensors["eqdiff_token.vectors"] = torch.randn(8)


def nudge(tensors: dict) -> None:
    tensors["eqdiff_token.vectors"] = tensors["eqdiff_token.vectors"] + 1


CASES = {
    "not safetensors": (not_safetensors, "not a readable safetensors file"),
    "truncated": (truncated, "not a readable safetensors file"),
    "empty": (empty, "not a readable safetensors file"),
    "json not parseable": (json_not_parseable, "not readable JSON"),
    "json not an object": (json_not_an_object, "not a concept record"),
    "no hash field": (without("tensors_sha256"), "missing required field.*tensors_sha256"),
    "no placeholder": (without("placeholder_token"), "missing required field.*placeholder"),
    "no base model": (without("base_model"), "missing required field.*base_model"),
    "no format": (without("format"), "is not an eqdiff-concept record"),
    "a tensor missing": (rewrite_tensors(drop_kv),
                         r"missing \['eqdiff_kv.block.attn2.to_k.weight'\]"),
    "no token vectors": (rewrite_tensors(drop_vectors, relist=True), "missing the token vectors"),
    "vectors of the wrong shape": (rewrite_tensors(flat_vectors), "must be 1 or 2 float rows"),
    "hash mismatch": (rewrite_tensors(nudge), "does not match the hash"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_malformed_concept_file_raises_one_line_naming_it(case: str, tmp_path: Path) -> None:
    folder = write_concept(tmp_path / "concept")
    load_concept(folder)  # valid before the damage
    damage, problem = CASES[case]
    damaged = damage(folder)
    with pytest.raises(ConceptError, match=problem) as caught:
        load_concept(folder)
    message = str(caught.value)
    assert str(damaged) in message
    assert "\n" not in message
    assert isinstance(caught.value, ValueError)


def test_a_concept_file_that_is_no_safetensors_is_not_a_safetensor_error(tmp_path: Path) -> None:
    """The raw ``SafetensorError: header too large`` used to escape."""
    folder = write_concept(tmp_path / "concept")
    (folder / TENSORS_FILE).write_bytes(b"PK\x03\x04" + b"\x00" * 200)  # e.g. a zip (torch.save)
    with pytest.raises(ConceptError, match=f"{TENSORS_FILE}: not a readable safetensors"):
        load_concept(folder / TENSORS_FILE)
