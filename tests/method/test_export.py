"""`export_concept` / `eqdiff concept export`: a concept in diffusers' own formats, loaded by
plain diffusers code (in a subprocess that never imports eqdiff) into the same images."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file
from synthetic import RESOLUTION, random_concept

from eqdiff.method.concept import Concept, ConceptError, apply_concept, load_concept, save_concept
from eqdiff.method.export import (
    CUSTOM_DIFFUSION_FILE,
    EXPORT_README_FILE,
    EXPORT_RECORD_FILE,
    TEXTUAL_INVERSION_FILE,
    export_concept,
)
from eqdiff.method.lora import install_unet_lora, lora_learned_tensors
from eqdiff.method.models import load_sd_components
from flows.cli import EXIT_REFUSED, main

LORA_FILE = "pytorch_lora_weights.safetensors"

KINDS = ["textual-inversion", "custom-diffusion", "eqdiff-no-rra", "dreambooth-lora"]
PROMPT = "a <eqd> ball on the beach"
SEED = 7

PLAIN_DIFFUSERS = textwrap.dedent("""
    import json
    import sys
    from pathlib import Path

    import numpy as np
    import torch

    prompt, seed, side = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    for folder, out in zip(sys.argv[4::2], sys.argv[5::2]):
        scope = {}
        exec(json.loads((Path(folder) / "export.json").read_text())["load_code"], scope)
        images = scope["pipe"](prompt, num_inference_steps=3, height=side, width=side,
                               generator=torch.Generator().manual_seed(seed),
                               output_type="np").images
        np.save(out, images)
    assert not [name for name in sys.modules if name.split(".")[0] == "eqdiff"]
""")


def concept_of_kind(tiny_sd, folder, kind: str) -> Concept:
    """Token (two vectors for EqDiff, one otherwise) and K/V (not for textual inversion): the
    pretrained K/V and a random token, clearly perturbed (``random_concept``)."""
    tensors = dict(random_concept(tiny_sd, folder / "source", rra=False).tensors)
    if kind != "eqdiff-no-rra":
        tensors["eqdiff_token.vectors"] = tensors["eqdiff_token.vectors"][:1]
    if kind in ("textual-inversion", "dreambooth-lora"):
        tensors = {k: v for k, v in tensors.items() if not k.startswith("eqdiff_kv.")}
    if kind == "dreambooth-lora":  # a LoRA whose B is no longer zero
        unet = load_sd_components(tiny_sd, local_files_only=True).unet
        handle = install_unet_lora(unet, 4, torch.Generator().manual_seed(1))
        gen = torch.Generator().manual_seed(2)
        tensors.update({name: t + 0.05 * torch.randn(t.shape, generator=gen)
                        for name, t in lora_learned_tensors(handle).items()})
    record = {"subject": "ball", "class_noun": "ball", "placeholder_token": "<eqd>",
              "method": {"name": kind}}
    return load_concept(save_concept(folder / kind, tensors, record, base_model=tiny_sd))


def draw(pipe) -> np.ndarray:
    return pipe(PROMPT, num_inference_steps=3, height=RESOLUTION, width=RESOLUTION,
                generator=torch.Generator().manual_seed(SEED), output_type="np").images


@pytest.fixture(scope="module")
def exported(tiny_sd, tmp_path_factory):
    """{kind: (concept, export result, images drawn by plain diffusers from the export)}."""
    root = tmp_path_factory.mktemp("export")
    made = {}
    for kind in KINDS:
        concept = concept_of_kind(tiny_sd, root / "concepts", kind)
        made[kind] = (concept, export_concept(concept, root / "out" / kind))
    script = root / "plain_diffusers.py"
    script.write_text(PLAIN_DIFFUSERS)
    outputs = [str(root / f"{kind}.npy") for kind in KINDS]
    folders = [str(made[kind][1].folder) for kind in KINDS]
    args = [x for pair in zip(folders, outputs, strict=True) for x in pair]
    subprocess.run([sys.executable, str(script), PROMPT, str(SEED), str(RESOLUTION), *args],
                   cwd=root, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return {kind: (*made[kind], np.load(out)) for kind, out in zip(KINDS, outputs, strict=True)}


@pytest.mark.parametrize("kind", KINDS)
def test_plain_diffusers_draws_what_apply_concept_draws(exported, tiny_sd, kind):
    concept, result, plain = exported[kind]
    files = {part.file for part in result.parts}
    assert files == {"textual-inversion": {TEXTUAL_INVERSION_FILE},
                     "dreambooth-lora": {TEXTUAL_INVERSION_FILE, LORA_FILE}}.get(
        kind, {TEXTUAL_INVERSION_FILE, CUSTOM_DIFFUSION_FILE})
    assert result.left_out == []
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, local_files_only=True)
    base = draw(pipe)
    apply_concept(pipe, concept, base_model=tiny_sd)
    ours = draw(pipe)
    assert np.abs(ours - base).max() > 0.05  # the concept changes what is drawn
    np.testing.assert_allclose(plain, ours, rtol=0, atol=1e-5)


def test_the_files_hold_the_inference_token_and_every_kv_layer(exported):
    concept, result, _ = exported["eqdiff-no-rra"]
    embedding = load_file(result.folder / TEXTUAL_INVERSION_FILE)
    assert list(embedding) == ["<eqd>"]
    assert torch.equal(embedding["<eqd>"][0], concept.tensors["eqdiff_token.vectors"].sum(0))
    weights = load_file(result.folder / CUSTOM_DIFFUSION_FILE)
    for name, tensor in concept.tensors_with_prefix("eqdiff_kv.").items():
        layer, proj, _ = name.removeprefix("eqdiff_kv.").rsplit(".", 2)
        assert torch.equal(weights[f"{layer}.processor.{proj}_custom_diffusion.weight"], tensor)
        assert weights[layer.replace(".attn2", ".attn1") + ".processor"].numel() == 0
    record = json.loads((result.folder / EXPORT_RECORD_FILE).read_text())
    assert record["placeholder_token"] == "<eqd>"
    assert record["base_model"] == concept.record["base_model"]
    assert set(record["files"]) == {TEXTUAL_INVERSION_FILE, CUSTOM_DIFFUSION_FILE}
    readme = (result.folder / EXPORT_README_FILE).read_text()
    assert record["load_code"] in readme


def test_residual_reference_attention_is_reported_as_left_out(tiny_sd, tmp_path):
    concept = random_concept(tiny_sd, tmp_path / "concept", rra=True)
    count = len(concept.tensors_with_prefix("eqdiff_rra."))
    result = export_concept(concept, tmp_path / "out")
    line = (f"left out: residual reference attention ({count} tensors); images will differ "
            "from eqdiff's own generation")
    assert result.left_out == [line]
    assert json.loads((tmp_path / "out" / EXPORT_RECORD_FILE).read_text())["left_out"] == [line]
    assert f"L{line[1:]}." in (tmp_path / "out" / EXPORT_README_FILE).read_text()
    assert not [k for k in load_file(tmp_path / "out" / CUSTOM_DIFFUSION_FILE) if "rra" in k]


def test_a_kind_of_tensor_without_a_writer_is_refused(tiny_sd, tmp_path):
    concept = random_concept(tiny_sd, tmp_path / "concept", rra=False)
    unknown = Concept({**concept.tensors, "eqdiff_hypernet.up.weight": torch.ones(2, 2)},
                      concept.record)
    with pytest.raises(ConceptError, match=r"under eqdiff_hypernet\. have no diffusers export"):
        export_concept(unknown, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_non_empty_folder_is_kept_unless_overwrite(tiny_sd, tmp_path):
    concept = random_concept(tiny_sd, tmp_path / "concept", rra=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(ConceptError, match="is not empty"):
        export_concept(concept, out)
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    export_concept(concept, out, overwrite=True)
    assert (out / TEXTUAL_INVERSION_FILE).is_file()
    assert (out / "mine.txt").read_text() == "keep"


def test_the_command_exports_a_concept_folder(tiny_sd, tmp_path, caplog):
    random_concept(tiny_sd, tmp_path / "concept", rra=True)
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        assert main(["concept", "export", str(tmp_path / "concept"), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [TEXTUAL_INVERSION_FILE, CUSTOM_DIFFUSION_FILE, EXPORT_RECORD_FILE, EXPORT_README_FILE])
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"wrote {out / CUSTOM_DIFFUSION_FILE}") for m in messages)
    assert [m for m in messages if m.startswith("left out: residual reference attention")]
    caplog.clear()
    assert main(["concept", "export", str(tmp_path / "concept"), "--out", str(out)]) \
        == EXIT_REFUSED  # the folder now holds the export
    assert main(["concept", "export", str(tmp_path / "concept"), "--out", str(out),
                 "--overwrite"]) == 0


def test_the_command_refuses_a_missing_concept_in_one_line(tmp_path, caplog):
    assert main(["concept", "export", str(tmp_path / "nothing"), "--out",
                 str(tmp_path / "out")]) == EXIT_REFUSED
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0]
    assert "is not a concept" in errors[0]
    assert not (tmp_path / "out").exists()
