"""The toy base model: its training script (small settings), the committed weights, the
benchmark summary and the flow's resolution of the ``toy`` model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open

from eqdiff.fixtures.toyworld import MODELS_ROOT, TOY_RESOLUTION, toy_models
from eqdiff.fixtures.toyworld.base_model import BaseTrainConfig, train_base_model
from eqdiff.fixtures.toyworld.benchmark import markdown_table, plot_summary, summarise
from eqdiff.method.models import load_sd_components

SMALL = BaseTrainConfig(corpus_size=96, vae_steps=20, unet_steps=10, warmup_steps=4,
                        batch_size=8, threads=1, log_every=5)


def _dtypes(weights) -> set[torch.dtype]:
    names = weights.keys()
    return {weights.get_tensor(k).dtype for k in names}


@pytest.fixture(scope="module")
def small_base(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("toy-base")
    return out, train_base_model(out, SMALL)


def test_training_writes_a_standard_pipeline_in_float16_and_float32(small_base) -> None:
    from diffusers import StableDiffusionPipeline

    out, record = small_base
    with safe_open(out / "unet" / "diffusion_pytorch_model.safetensors", "pt") as weights:
        assert _dtypes(weights) == {torch.float16}
    with safe_open(out / "text_encoder" / "model.safetensors", "pt") as weights:
        assert _dtypes(weights) == {torch.float32}
    pipeline = StableDiffusionPipeline.from_pretrained(out)
    assert pipeline.unet.dtype == pipeline.vae.dtype == pipeline.text_encoder.dtype == \
        torch.float32
    image = pipeline("a photo of a red ball", num_inference_steps=2, height=32, width=32,
                     output_type="np").images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()
    saved = json.loads((out / "training.json").read_text())
    assert saved["timings"]["total_s"] > 0 and saved["latent_scaling_factor"] > 0


def test_training_learns_and_is_reproducible(small_base, tmp_path) -> None:
    out, record = small_base
    vae = [r["mse"] for r in record["vae_log"]]
    assert vae and vae[-1] < vae[0]  # the autoencoder improves within 20 steps
    again = train_base_model(tmp_path / "again", SMALL)
    assert [r["loss"] for r in again["denoiser_log"]] == [r["loss"] for r in
                                                          record["denoiser_log"]]
    with safe_open(out / "unet" / "diffusion_pytorch_model.safetensors", "pt") as a, \
            safe_open(tmp_path / "again" / "unet" / "diffusion_pytorch_model.safetensors",
                      "pt") as b:
        names = a.keys()
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in names)


def test_the_committed_base_model_is_small_and_loads_like_sd() -> None:
    folders = toy_models()
    base = folders["base"]
    weights = sum(p.stat().st_size for p in base.rglob("*.safetensors"))
    assert weights <= 10_000_000, f"{weights} bytes of weights"
    assert not list(base.rglob("*.bin")) and not list(base.rglob("*.pt"))
    components = load_sd_components(str(base), local_files_only=True)
    assert components.latent_size(TOY_RESOLUTION) == TOY_RESOLUTION // 2
    assert components.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320,
                                                                  2368, 49407]


def test_the_committed_base_model_draws_what_its_captions_ask(tmp_path) -> None:
    """The toy CLIP recognises every asked-for attribute in the base model's samples well above
    chance (class 1/6, colour 1/10, style and context 1/5; a random or untrained model scores
    near it). Measured on these 48 samples: class 0.38, colour 0.40, pattern 0.44, context 0.58,
    style 0.73 (the model card has 150)."""
    from eqdiff.fixtures.toyworld.card import accuracy_on_samples, load_pipeline

    folders = toy_models()
    checks = accuracy_on_samples(load_pipeline(folders["base"]), folders["clip"], count=48)
    assert checks["base_model"]["style"] > 0.6
    assert checks["base_model"]["context"] > 0.4
    assert checks["base_model"]["colour"] > 0.25 and checks["base_model"]["class"] > 0.25
    assert checks["world"]["style"] > 0.9 and checks["world"]["class"] > 0.4


def test_missing_toy_models_name_the_rebuild_command(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="eqdiff toyworld train-base"):
        toy_models(tmp_path)
    assert MODELS_ROOT.parent.name == "toyworld"


def _scores(seed: int, shift: float) -> pd.DataFrame:
    prompts = ["a photo of a <eqd> cup on the beach", "a watercolor painting of a <eqd> cup"]
    rows = []
    for method, bonus in (("eqdiff", 0.1), ("textual-inversion", 0.0)):
        for prompt in prompts:
            style = prompt.startswith("a watercolor")
            for k in range(2):
                rows.append({"method": method, "prompt": prompt, "subject": "checkered_cup",
                             "dino": 0.5 + bonus + shift + (0.2 if style else 0.0),
                             "clip_i": 0.6 + shift, "clip_t": 0.3 + 0.01 * k,
                             "bench_seed": seed})
    return pd.DataFrame(rows)


def test_benchmark_summary_splits_by_prompt_change_with_the_seed_spread(tmp_path) -> None:
    scores = pd.concat([_scores(0, 0.0), _scores(1, 0.1)], ignore_index=True)
    summary = summarise(scores).set_index(["method", "change"])
    row = summary.loc[("eqdiff", "context")]
    assert row["dino"] == pytest.approx(0.65)  # seeds 0.6 and 0.7
    assert row["dino_sd"] == pytest.approx(np.std([0.6, 0.7], ddof=1))
    assert summary.loc[("eqdiff", "style"), "dino"] == pytest.approx(0.85)
    assert summary.loc[("eqdiff", "all"), "dino"] == pytest.approx(0.75)
    assert summary.loc[("textual-inversion", "all"), "images"] == 8
    assert summary.loc[("textual-inversion", "all"), "seeds"] == 2
    assert summary.loc[("eqdiff", "context"), "clip_t"] == pytest.approx(0.305)
    text = markdown_table(summarise(scores))
    assert "**context prompts**" in text and "| eqdiff | 0.650 ± 0.071 |" in text
    assert plot_summary(summarise(scores), tmp_path / "s.png").stat().st_size > 1000


def test_the_flow_customizes_a_toy_subject_with_the_toy_models(prefect_server, tmp_path) -> None:
    """``dataset=toyworld, base_model=toy``: 32 px training and samples, scored by the toy
    evaluators, through the ordinary flow."""
    from PIL import Image

    from flows.customize import customize_dataset
    from flows.params import CustomizeParams

    store = tmp_path / "store"
    record = customize_dataset(CustomizeParams(
        dataset="toyworld", subjects=["split_star"], methods=["eqdiff"], steps=3,
        base_model="toy", images_per_prompt=1, max_prompts=2, storage_url=str(store),
        compute="local", run_id="toytest",
        overrides={"train.num_prior_images": 2, "sample.steps": 2,
                   "masks.extractor": "provided"}))
    assert record["status"]["split_star/eqdiff"] == "done"
    run = json.loads((store / "runs" / "toytest" / "run.json").read_text())
    assert run["config"]["train"]["resolution"] == TOY_RESOLUTION
    assert run["config"]["eval"]["clip_model"].endswith("toyworld/clip")
    samples = store / "runs" / "toytest" / "samples" / "split_star" / "eqdiff"
    with Image.open(samples / "00_0.png") as image:
        assert image.size == (TOY_RESOLUTION, TOY_RESOLUTION)
    scores = pd.read_parquet(store / "runs" / "toytest" / "scores" / "split_star" / "eqdiff"
                             / "scores.parquet")
    assert len(scores[scores["seed"] >= 0]) == 2
    assert scores[["clip_i", "clip_t", "dino"]].notna().all().all()


def test_toy_mask_dilation_keeps_the_background_out_of_the_mask() -> None:
    """SD's dilation (±10 latent pixels) covers a toy image's whole 16×16 latent grid, which
    silently turns the mask-guided process off; the toy run settings keep a background."""
    from eqdiff.config import MaskConfig
    from eqdiff.fixtures.toyworld import TOY_RUN_OVERRIDES
    from eqdiff.fixtures.toyworld.world import NOVEL_SUBJECTS, SceneSpec, render
    from eqdiff.method.losses import latent_masks

    _, mask = render(NOVEL_SUBJECTS["split_star"], SceneSpec(size=0.28))
    pixels = torch.from_numpy(np.asarray(mask) > 0).float()[None, None]
    default = MaskConfig()
    full = latent_masks(pixels, TOY_RESOLUTION // 2, iterations=default.dilation_iterations,
                        kernel=default.dilation_kernel)
    toy = latent_masks(pixels, TOY_RESOLUTION // 2,
                       iterations=TOY_RUN_OVERRIDES["masks.dilation_iterations"],
                       kernel=default.dilation_kernel)
    assert full.mean() == 1.0
    assert 0.2 < toy.mean() < 0.8
