"""Model loading through the real from_pretrained paths, on the offline zoo's tiny models."""

import json
import logging

import pytest
import torch
from diffusers import StableDiffusionPipeline

from eqdiff.fixtures import TINY_RESOLUTION
from eqdiff.fixtures.zoo import (
    build_tiny_clip,
    build_tiny_dino,
    build_tiny_sd,
    save_clip_tokenizer,
    tiny_sd_pipeline,
)
from eqdiff.method.models import (
    ModelLoadError,
    check_base_model,
    load_sd_components,
    model_identity,
    native_resolution,
)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("zoo") / "tiny-sd", seed=0)


def test_rebuilt_tokenizer_gives_clip_ids(tmp_path):
    tokenizer = save_clip_tokenizer(tmp_path / "tok")
    assert len(tokenizer) == 49408
    ids = tokenizer("a photo of a cat").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = tokenizer("a dog", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == 49407


def _generate(pipe: StableDiffusionPipeline) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    return pipe("a photo of a cat", num_inference_steps=3, guidance_scale=7.5, height=64,
                width=64, generator=generator, output_type="pt").images


def test_save_then_load_gives_identical_weights_and_images(tiny_sd, tmp_path):
    reference = tiny_sd_pipeline(tmp_path / "tok", seed=0)
    components = load_sd_components(str(tiny_sd), local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        saved = getattr(reference, name).state_dict()
        loaded = getattr(components, name).state_dict()
        assert saved.keys() == loaded.keys()
        assert all(torch.equal(saved[k], loaded[k]) for k in saved), name
    assert components.vae_scale_factor == 2
    assert components.latent_size(64) == 32
    loaded_pipe = StableDiffusionPipeline(
        vae=components.vae, text_encoder=components.text_encoder,
        tokenizer=components.tokenizer, unet=components.unet, scheduler=reference.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    assert torch.equal(_generate(reference), _generate(loaded_pipe))


def test_standard_diffusers_loader_reads_the_zoo_folder(tiny_sd):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, local_files_only=True)
    assert pipe.unet.config.cross_attention_dim == 32
    assert len(pipe.tokenizer) == 49408


def test_missing_folder_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "sd15"
    with pytest.raises(ModelLoadError, match=str(missing)):
        load_sd_components(str(missing))


def test_folder_without_components_is_named(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelLoadError, match=r"missing subfolder\(s\).*tokenizer"):
        load_sd_components(str(tmp_path))


def test_pickled_checkpoints_are_refused(tmp_path):
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"not loaded")
    with pytest.raises(ModelLoadError, match="pickled"):
        load_sd_components(str(checkpoint))


def test_uncached_hub_id_offline_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        load_sd_components("someone/not-a-real-model", local_files_only=True)


def test_the_pre_flight_check_agrees_with_the_loader_without_loading(tiny_sd, tmp_path,
                                                                   monkeypatch):
    check_base_model(tiny_sd, local_files_only=True)  # a complete folder passes
    (tmp_path / "unet").mkdir()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for source, reason in ((str(tmp_path / "nowhere"), "does not exist"),
                           (str(tmp_path), r"missing subfolder\(s\)"),
                           ("someone/not-a-real-model", "not in the local Hugging Face cache"),
                           (str(tmp_path / "model.ckpt"), "pickled")):
        with pytest.raises(ModelLoadError, match=reason):
            check_base_model(source, local_files_only=True)


@pytest.mark.parametrize("load", [check_base_model, load_sd_components])
def test_an_uncached_base_model_is_never_downloaded_by_default(no_network, load):
    with pytest.raises(ModelLoadError, match="model.local_files_only=false") as raised:
        load("eqdiff-tests/absent-sd")
    assert "eqdiff-tests/absent-sd" in str(raised.value) and "\n" not in str(raised.value)
    assert no_network == []


def test_a_run_far_from_the_models_resolution_is_warned_about(tiny_sd, caplog):
    assert native_resolution(str(tiny_sd)) == TINY_RESOLUTION  # from the configs alone
    caplog.set_level(logging.WARNING, logger="eqdiff.method.models")
    for resolution in (TINY_RESOLUTION, 96, TINY_RESOLUTION // 2 + 8):  # near enough: quiet
        check_base_model(tiny_sd, resolution=resolution)
    check_base_model(tiny_sd)  # no run resolution given: nothing to compare
    assert caplog.records == []
    for resolution in (512, 2 * TINY_RESOLUTION, TINY_RESOLUTION // 2):
        check_base_model(tiny_sd, resolution=resolution)
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 3
    assert all(f"makes {TINY_RESOLUTION} px" in w and "train.resolution" in w for w in warnings)
    assert "uses 512 px" in warnings[0]


def test_model_identity_tells_local_models_apart(tiny_sd, tmp_path):
    other = build_tiny_sd(tmp_path / "tiny-sd", seed=1)
    assert model_identity(str(tiny_sd)) == model_identity(str(tiny_sd))
    assert model_identity(str(tiny_sd)) != model_identity(str(other))
    assert model_identity("stable-diffusion-v1-5/stable-diffusion-v1-5") == (
        "stable-diffusion-v1-5/stable-diffusion-v1-5")


def test_tiny_clip_loads_with_open_clip(tmp_path):
    import open_clip

    folder = build_tiny_clip(tmp_path / "clip")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    with torch.no_grad():
        image = model.encode_image(torch.zeros(1, 3, 224, 224))
        text = model.encode_text(tokenizer(["a photo of a cat"]))
    assert image.shape == text.shape == (1, 32)
    config = json.loads((folder / "open_clip_config.json").read_text())
    assert config["model_cfg"]["embed_dim"] == 32


def test_tiny_dino_loads_with_transformers(tmp_path):
    from transformers import ViTModel

    folder = build_tiny_dino(tmp_path / "dino")
    model = ViTModel.from_pretrained(folder, local_files_only=True)
    with torch.no_grad():
        out = model(pixel_values=torch.zeros(2, 3, 224, 224)).last_hidden_state
    assert out.shape == (2, 1 + (224 // 16) ** 2, 32)


@pytest.mark.slow
def test_sd15_shaped_components_have_sd15_sizes():
    from eqdiff.fixtures.zoo import sd15_shaped_components

    parts = sd15_shaped_components()
    unet_params = sum(p.numel() for p in parts.unet.parameters())
    assert 859e6 < unet_params < 860e6
    assert parts.vae_scale_factor == 8
    assert parts.text_encoder.config.hidden_size == 768


def test_weights_replaced_in_place_change_every_cache_key(tmp_path):
    from eqdiff.config import EvalConfig, ModelConfig, RunConfig, method_preset
    from eqdiff.method.identity import training_hash
    from eqdiff.pipeline.digests import evaluation_hash

    base, clip, dino = tmp_path / "base", tmp_path / "clip", tmp_path / "dino"
    build_tiny_sd(base, seed=0)
    build_tiny_clip(clip)
    build_tiny_dino(dino, seed=0)
    run = RunConfig(model=ModelConfig(base_model=str(base)))
    scorers = EvalConfig(clip_model=f"local-dir:{clip}", clip_pretrained="",
                         dino_model=str(dino))
    before = (model_identity(str(dino)), training_hash(run, method_preset("eqdiff")),
              evaluation_hash(scorers))
    assert model_identity(f"local-dir:{clip}") == model_identity(str(clip))
    assert model_identity(str(dino)) == before[0]  # stable while nothing changes

    build_tiny_sd(base, seed=1)  # same path, same configs, other weights
    build_tiny_dino(dino, seed=1)
    after = (model_identity(str(dino)), training_hash(run, method_preset("eqdiff")),
             evaluation_hash(scorers))
    assert all(a != b for a, b in zip(before, after, strict=True))


def test_no_float32_warning_when_no_module_must_stay_float32(tiny_sd):
    import eqdiff.method.models  # noqa: F401  (installs the filter)

    class Collect(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.WARNING)
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    components = load_sd_components(tiny_sd, local_files_only=True)
    diffusers_logger = logging.getLogger("diffusers.models.modeling_utils")
    collect = Collect()
    diffusers_logger.addHandler(collect)  # sees what passes the logger's filters
    try:
        components.unet.to(torch.float16)
        components.vae.to(torch.float16)
        diffusers_logger.warning("There are modules in X that should be kept in float32: "
                                 "['norm'].")
    finally:
        diffusers_logger.removeHandler(collect)
    assert collect.messages == ["There are modules in X that should be kept in float32: "
                                "['norm']."]  # the empty-list warnings were dropped
