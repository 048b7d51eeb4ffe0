"""Per-method training recipes (docs/method.md §8): what each preset trains with, how a run's
settings and per-method changes combine, and the two recipe mechanics the trainer gained:
gradient accumulation and mirrored photos."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from eqdiff.config import (
    METHOD_PRESETS,
    MaskConfig,
    RecipeConfig,
    RunConfig,
    TrainConfig,
    from_dict,
    method_preset,
    with_overrides,
)
from eqdiff.method.embeddings import add_placeholder_token
from eqdiff.method.frequency import Band
from eqdiff.method.identity import training_hash
from eqdiff.method.models import load_sd_components
from eqdiff.method.training import ConceptData, ConceptTrainer, StepDraws
from flows.params import CustomizeParams

RESOLUTION = 64


def _settings(config: RunConfig, name: str) -> tuple:
    t = config.training(method_preset(name))
    return (t.steps, t.instance_batch, t.prior_batch, t.gradient_accumulation,
            t.learning_rate, t.initializer_token)


# --------------------------------------------------------------------------- resolution


def test_each_preset_trains_at_its_published_recipe() -> None:
    """docs/method.md §7–8: EqDiff as released; the baselines as their example scripts."""
    config = RunConfig(methods=tuple(METHOD_PRESETS.values()))
    assert _settings(config, "eqdiff") == (600, 2, 2, 1, pytest.approx(4e-5), "ktn")
    assert _settings(config, "custom-diffusion") == (250, 2, 2, 1, pytest.approx(4e-5), "ktn")
    assert _settings(config, "textual-inversion") == (3000, 1, 0, 4, pytest.approx(2e-3),
                                                      "{class_noun}")
    assert _settings(config, "dreambooth-lora") == (500, 1, 1, 1, pytest.approx(1e-4), "sks")
    assert method_preset("custom-diffusion").recipe.hflip
    assert not method_preset("eqdiff").recipe.hflip
    for name in ("eqdiff-no-fdte", "eqdiff-no-mgdp", "eqdiff-no-rra"):
        assert _settings(config, name) == _settings(config, "eqdiff")


def test_the_learning_rate_scales_with_the_batch_like_the_scripts() -> None:
    """A recipe's rate is scaled × rows × accumulation (× 2 with prior rows): a larger batch
    set for the run raises the scaled rate; a rate set for the run is used as it is."""
    config = with_overrides(RunConfig(), {"train.instance_batch": 4})
    assert config.training(method_preset("eqdiff")).learning_rate == pytest.approx(1e-5 * 4 * 2)
    assert config.training(method_preset("dreambooth-lora")).learning_rate == pytest.approx(1e-4)
    fixed = with_overrides(RunConfig(), {"train.instance_batch": 4, "train.learning_rate": 3e-4})
    assert fixed.training(method_preset("textual-inversion")).learning_rate == 3e-4


def test_run_settings_apply_to_every_method_over_its_recipe() -> None:
    config = with_overrides(RunConfig(), {"train.steps": 7, "train.gradient_accumulation": 2,
                                          "train.initializer_token": "toy"})
    for name in METHOD_PRESETS:
        steps, _, _, accumulation, _, initializer = _settings(config, name)
        assert (steps, accumulation, initializer) == (7, 2, "toy")
    # no prior rows for a method without prior preservation, whatever the run asks
    assert with_overrides(RunConfig(), {"train.prior_batch": 3}).training(
        method_preset("textual-inversion")).prior_batch == 0


def test_scales_keep_the_recipes_ratios() -> None:
    config = with_overrides(RunConfig(), {"train.steps_scale": 0.25,
                                          "train.learning_rate_scale": 25.0})
    assert _settings(config, "eqdiff")[0] == 150
    assert _settings(config, "textual-inversion")[0] == 750
    assert _settings(config, "custom-diffusion")[0] == 62  # round(62.5): half to even
    assert _settings(config, "eqdiff")[4] == pytest.approx(1e-3)
    assert _settings(config, "textual-inversion")[4] == pytest.approx(5e-2)


def test_a_run_file_changes_one_methods_recipe_from_its_preset() -> None:
    config = from_dict(RunConfig, {"methods": [
        "eqdiff", {"preset": "textual-inversion", "recipe": {"steps": 40}}]})
    changed = config.method("textual-inversion")
    assert changed.recipe == dataclasses.replace(method_preset("textual-inversion").recipe,
                                                 steps=40)
    assert changed.train_kv is False and config.training(changed).steps == 40
    assert config.training(config.method("eqdiff")).steps == 600
    with pytest.raises(ValueError, match="unknown config key.*recipe.stpes"):
        from_dict(RunConfig, {"methods": [{"preset": "eqdiff", "recipe": {"stpes": 1}}]})
    with pytest.raises(ValueError, match="recipe.steps must be a positive integer"):
        RecipeConfig(steps=0)


def test_the_recipe_enters_the_training_hash() -> None:
    """Concepts trained at another recipe are not found done."""
    base = RunConfig()
    method = method_preset("eqdiff")
    longer = dataclasses.replace(method, recipe=dataclasses.replace(method.recipe, steps=601))
    assert training_hash(base, method) != training_hash(base, longer)
    assert training_hash(base, method) == training_hash(RunConfig(), method_preset("eqdiff"))


def test_the_form_sets_steps_for_all_and_recipes_per_method() -> None:
    recipes = {"textual-inversion": {"steps": 9, "learning_rate": 1e-3}}
    params = CustomizeParams(methods=["eqdiff", "textual-inversion"], steps=5, recipes=recipes)
    config = params.run_config(base_model="x")
    assert config.training(config.method("eqdiff")).steps == 5
    ti = config.training(config.method("textual-inversion"))
    assert ti.steps == 9 and ti.learning_rate == pytest.approx(1e-3 * 4)
    default = CustomizeParams(methods=["textual-inversion"]).run_config(base_model="x")
    assert default.training(default.methods[0]).steps == 3000
    with pytest.raises(ValueError, match="did you mean 'steps'"):
        CustomizeParams(methods=["eqdiff"], recipes={"eqdiff": {"stpes": 1}})
    with pytest.raises(ValueError, match="does not train"):
        CustomizeParams(methods=["eqdiff"], recipes={"custom-diffusion": {"steps": 1}})


def test_variants_add_methods_built_from_a_preset() -> None:
    params = CustomizeParams(methods=["eqdiff"], steps=3, variants={
        "eqdiff-mgdp-loss-only": {"preset": "eqdiff", "mgdp_parts": "loss-only"}})
    config = params.run_config(base_model="x")
    variant = config.method("eqdiff-mgdp-loss-only")
    assert variant.mgdp_parts == "loss-only" and variant.rra
    assert config.training(variant).steps == 3
    assert params.derived_run_id() != CustomizeParams(methods=["eqdiff"], steps=3).derived_run_id()
    with pytest.raises(ValueError, match="preset's name"):
        CustomizeParams(variants={"eqdiff": {"preset": "eqdiff"}})
    with pytest.raises(ValueError, match="mgdp_parts must be one of"):
        CustomizeParams(variants={"x": {"preset": "eqdiff", "mgdp_parts": "half"}})


# --------------------------------------------------------------------------- trainer


def _data() -> ConceptData:
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, RESOLUTION, RESOLUTION, generator=gen) * 2 - 1
    masks = torch.zeros(3, 1, RESOLUTION, RESOLUTION)
    masks[:, :, 8:40, 4:36] = 1  # off-centre: its mirror is another mask
    return ConceptData("ball", "ball", images, masks, torch.empty(0, 3, RESOLUTION, RESOLUTION))


def _config(**train: object) -> RunConfig:
    settings = {"steps": 10, "resolution": RESOLUTION, "num_prior_images": 2, "weight_decay": 0.0,
                **train}
    return RunConfig(masks=MaskConfig(dilation_iterations=0), train=TrainConfig(**settings))


def _trainer(tiny_sd: str, config: RunConfig, name: str = "textual-inversion",
             data: ConceptData | None = None) -> ConceptTrainer:
    return ConceptTrainer(load_sd_components(tiny_sd, local_files_only=True), data or _data(),
                          config, method_preset(name))


def _joined(parts: list[StepDraws]) -> StepDraws:
    """Micro-batches' draws as one batch of their rows (no prior rows, no extension draws)."""
    tensors = {name: torch.cat([p.tensors[name] for p in parts]) for name in parts[0].tensors}
    return StepDraws(sum((p.bands for p in parts), ()), tensors)


def test_accumulated_micro_batches_update_like_one_batch_of_their_rows(tiny_sd: str) -> None:
    """Textual Inversion's recipe accumulates: 2 micro-batches of 1 row, one update, equal to
    one batch of the same 2 rows (a plain MSE's mean); the optimizer steps once per step."""
    accumulating = _trainer(tiny_sd, _config(instance_batch=1, gradient_accumulation=2,
                                             learning_rate=1e-2))
    micro: list[StepDraws] = []
    draw = accumulating.draw

    def recording() -> StepDraws:
        micro.append(draw())
        return micro[-1]

    accumulating.draw = recording
    updates = []
    step = accumulating.optimizer.step
    accumulating.optimizer.step = lambda *a, **k: (updates.append(1), step(*a, **k))[1]
    before = accumulating.embeddings.vectors.detach().clone()
    result = accumulating.train_step()
    assert len(micro) == 2 and len(updates) == 1 and accumulating.step == 1
    assert len(result.bands) == 2
    batched = _trainer(tiny_sd, _config(instance_batch=2, gradient_accumulation=1,
                                        learning_rate=1e-2))
    batched.draw = lambda: _joined(micro)
    batched.train_step()
    moved = accumulating.embeddings.vectors.detach()
    assert not torch.equal(moved, before)
    torch.testing.assert_close(moved, batched.embeddings.vectors.detach(), rtol=1e-5,
                               atol=1e-7)
    logged = accumulating.loss_history[0]["loss"]
    assert logged == pytest.approx(batched.loss_history[0]["loss"], rel=1e-5)
    accumulating.remove()
    batched.remove()


def test_mirrored_photos_join_the_photos_with_their_masks(tiny_sd: str) -> None:
    """hflip (Custom Diffusion's recipe): each photo's mirror is one more photo to draw, its
    latents encoded from the mirrored pixels and its mask mirrored with it."""
    data = _data()
    flipping = _trainer(tiny_sd, _config(), "custom-diffusion", data)
    plain = _trainer(tiny_sd, _config(), "textual-inversion", data)
    n = data.images.shape[0]
    assert flipping.instance_count == 2 * n and plain.instance_count == n
    mirrored = flipping.encode_distribution(data.images.flip(-1))[0]
    torch.testing.assert_close(flipping.instance_latents[Band.FULL][0][n:], mirrored)
    torch.testing.assert_close(flipping.pixel_masks[n:], data.masks.flip(-1))
    assert not torch.equal(flipping.pixel_masks[n:], data.masks)
    drawn = torch.cat([flipping.draw().tensors["instance_indices"] for _ in range(20)])
    assert (drawn >= n).any() and (drawn < n).any()
    flipping.remove()
    plain.remove()


def test_the_class_word_initializer_starts_from_the_subjects_class(tiny_sd: str) -> None:
    """Textual Inversion's recipe starts the token from the class word (here "ball")."""
    trainer = _trainer(tiny_sd, _config())
    fresh = load_sd_components(tiny_sd, local_files_only=True)
    _, expected = add_placeholder_token(fresh.tokenizer, fresh.text_encoder, "<x>", "ball")
    torch.testing.assert_close(trainer.embeddings.vectors.detach()[0], expected)
    trainer.remove()
