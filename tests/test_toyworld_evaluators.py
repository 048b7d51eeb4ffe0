"""Toy-world evaluators: training writes models the scorers load, the DINO scorer follows a
non-protocol model's processor config, and the trust checks measure what they claim (on
constructed cases, and on the committed models against random ones)."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from itertools import product
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eqdiff
from eqdiff.evaluation.metrics import (
    CLIPScorer,
    DINOScorer,
    dino_preprocess,
    processor_preprocess,
)
from eqdiff.fixtures.toyworld.checks import (
    ATTRIBUTE_VALUES,
    attribute_accuracy,
    attribute_captions,
    identity_checks,
    zero_shot_predictions,
)
from eqdiff.fixtures.toyworld.evaluators import (
    EvaluatorConfig,
    encode_text_prefix,
    save_clip,
    save_dino,
    supcon_loss,
    toy_clip_config,
    toy_dino,
    train_evaluators,
)
from eqdiff.fixtures.toyworld.renders import render_identities
from eqdiff.fixtures.toyworld.world import COLOURS, ObjectSpec, SceneSpec, caption, object_words
from eqdiff.fixtures.zoo import build_tiny_dino

# Floors for the committed evaluators on 30 fresh renders (measured 0.63 / 0.47 / 0.60 / 1.0 /
# 1.0); chance is 1/6, 1/10, 1/6, 1/5, 1/5, and a random model must stay below every floor.
MIN_CLIP_ACCURACY = {"class": 0.45, "colour": 0.3, "pattern": 0.4, "context": 0.8, "style": 0.8}
# Identity retrieval on 60 renders of 20 objects: measured top-1 0.68 (chance 0.034), cosine
# same 0.66 vs different 0.20.
MIN_DINO_TOP1, MIN_DINO_COSINE_GAP = 0.3, 0.2
COMMITTED = Path(eqdiff.__file__).parent / "fixtures" / "toyworld" / "models"
CHANCE = {a: 1 / len(v) for a, v in ATTRIBUTE_VALUES.items()}


def _unit(rows: torch.Tensor) -> torch.Tensor:
    return F.normalize(rows.float(), dim=-1)


# --------------------------------------------------------------------------- training run

SHORT = EvaluatorConfig(clip_images=48, clip_steps=3, clip_batch=16, dino_identities=12,
                        dino_views=2, dino_steps=3, dino_batch_identities=8, warmup_steps=1,
                        holdout_identities=4, holdout_views=2, log_every=1)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("toy-evaluators")
    threads = torch.get_num_threads()
    try:
        return root, train_evaluators(root, SHORT)  # on one thread, as configured
    finally:
        torch.set_num_threads(threads)


def _losses(log: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in log]


def test_retraining_only_clip_reproduces_the_full_run_and_keeps_dino(
        short_run: tuple[Path, dict], tmp_path: Path) -> None:
    root, record = short_run
    copy = tmp_path / "models"
    shutil.copytree(root, copy)
    dino_weights = (copy / "dino" / "model.safetensors").read_bytes()
    threads = torch.get_num_threads()
    try:
        again = train_evaluators(copy, SHORT, parts=["clip"])
    finally:
        torch.set_num_threads(threads)
    assert (copy / "dino" / "model.safetensors").read_bytes() == dino_weights
    assert again["trained"] == ["clip"] and record["trained"] == ["clip", "dino"]
    assert again["dino_log"] == record["dino_log"]  # carried over, timings included
    assert _losses(again["clip_log"]) == _losses(record["clip_log"])  # retrained, same losses
    assert again["checks"] == record["checks"]
    assert again["timings"]["dino_train_s"] == record["timings"]["dino_train_s"]
    with pytest.raises(ValueError, match="another config"):
        train_evaluators(copy, replace(SHORT, dino_steps=4), parts=["clip"])
    with pytest.raises(FileNotFoundError, match="lacks dino"):
        train_evaluators(tmp_path / "empty", SHORT, parts=["clip"])
    with pytest.raises(ValueError, match="parts must be among"):
        train_evaluators(copy, SHORT, parts=["vae"])


def test_a_short_training_run_writes_models_the_scorers_load(short_run: tuple[Path, dict]
                                                             ) -> None:
    root, record = short_run
    clip = CLIPScorer(f"local-dir:{root / 'clip'}", "")
    dino = DINOScorer(str(root / "dino"), local_files_only=True)
    assert all(p.dtype == torch.float32 for p in clip.model.parameters())  # float16 on disk
    images = render_identities(3, 1, seed=5).pil()
    features = {"clip image": clip.image_features(images),
                "clip text": clip.text_features(["a photo of a red ball", "a neon drawing of "
                                                 "a blue zigzag cube in the city"]),
                "dino": dino.image_features(images)}
    assert features["clip image"].shape == (3, 64) and features["clip text"].shape == (2, 64)
    assert features["dino"].shape == (3, 96)
    for name, rows in features.items():
        assert rows.dtype == torch.float32, name
        torch.testing.assert_close(rows.norm(dim=1), torch.ones(len(rows)), atol=1e-5, rtol=0)
    written = json.loads((root / "evaluators.json").read_text())
    assert written["checks"]["accuracy"].keys() == ATTRIBUTE_VALUES.keys()
    assert set(written["timings"]) >= {"clip_train_s", "dino_train_s", "checks_s"}
    assert written["checks"]["dino_identity"]["queries"] == 8
    assert record["parameters"]["dino"] == sum(p.numel() for p in dino.model.parameters())
    assert (root / "clip" / "open_clip_model.safetensors").stat().st_size < 10e6


def test_the_scorers_preprocess_32px_renders_as_training_did(short_run: tuple[Path, dict]
                                                             ) -> None:
    # at the model's size the resize and crop are no-ops: only the normalisation is left
    root, _ = short_run
    renders = render_identities(2, 1, seed=6)
    pixels = torch.from_numpy(renders.images).permute(0, 3, 1, 2).float() / 255
    clip = CLIPScorer(f"local-dir:{root / 'clip'}", "")
    dino = DINOScorer(str(root / "dino"), local_files_only=True)
    for scorer, mean, std in ((clip, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD),
                              (dino, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))):
        expected = (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        got = torch.stack([scorer.preprocess(im) for im in renders.pil()])
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- DINO preprocessing

def _small_vit(folder: Path, image_size: int, processor: dict | None) -> Path:
    save_dino(toy_dino(EvaluatorConfig(image_size=image_size, dino_width=32, dino_layers=1)),
              folder)
    if processor is None:
        (folder / "preprocessor_config.json").unlink()
    else:
        (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return folder


def test_dino_scorer_follows_the_processor_config_of_a_non_protocol_model(tmp_path: Path
                                                                          ) -> None:
    # a 64² image with a 12 px red frame around blue; shortest edge 32 halves it (frame 6 px),
    # the 16 px centre crop cuts 8 px from each side: only blue is left
    processor = {"do_resize": True, "size": {"shortest_edge": 32}, "resample": 2,
                 "do_center_crop": True, "crop_size": {"height": 16, "width": 16},
                 "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                 "image_mean": [0.2, 0.3, 0.4], "image_std": [0.5, 0.25, 0.125]}
    scorer = DINOScorer(str(_small_vit(tmp_path / "vit16", 16, processor)),
                        local_files_only=True)
    array = np.zeros((64, 64, 3), dtype=np.uint8)
    array[:, :] = (255, 0, 0)
    array[12:-12, 12:-12] = (0, 0, 255)
    tensor = scorer.preprocess(Image.fromarray(array))
    assert tensor.shape == (3, 16, 16)
    rgb = tensor * torch.tensor([0.5, 0.25, 0.125])[:, None, None] + \
        torch.tensor([0.2, 0.3, 0.4])[:, None, None]
    assert rgb[0].abs().max() < 0.02 and (rgb[2] - 1).abs().max() < 0.02
    wide = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 90, 3), np.uint8))
    assert scorer.preprocess(wide).shape == (3, 16, 16)
    with torch.no_grad():
        cls = scorer.model(pixel_values=scorer.preprocess(wide)[None]).last_hidden_state[:, 0]
    torch.testing.assert_close(scorer.image_features([wide]), _unit(cls), atol=1e-5, rtol=1e-4)


def test_the_toy_dino_processor_agrees_with_transformers(tmp_path: Path) -> None:
    from transformers import AutoImageProcessor

    folder = _small_vit(tmp_path / "vit32", 32, None)
    save_dino(toy_dino(EvaluatorConfig(dino_width=32, dino_layers=1)), folder)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (60, 85, 3), np.uint8))
    theirs = AutoImageProcessor.from_pretrained(folder)(images=image, return_tensors="pt")
    ours = DINOScorer(str(folder), local_files_only=True).preprocess(image)
    assert ours.shape == theirs["pixel_values"].shape[1:] == (3, 32, 32)
    assert (ours - theirs["pixel_values"][0]).abs().mean() < 0.01  # resize rounding only


def test_a_protocol_size_model_keeps_the_protocol_whatever_its_folder_says(tmp_path: Path
                                                                           ) -> None:
    folder = build_tiny_dino(tmp_path / "zoo-dino")  # its processor file says mean/std 0.5
    assert json.loads((folder / "preprocessor_config.json").read_text())["image_mean"] == \
        [0.5, 0.5, 0.5]
    scorer = DINOScorer(str(folder), local_files_only=True)
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (300, 260, 3), np.uint8))
    torch.testing.assert_close(scorer.preprocess(image), dino_preprocess()(image))


def test_a_non_protocol_model_needs_a_fitting_processor_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="preprocessor_config.json"):
        DINOScorer(str(_small_vit(tmp_path / "none", 32, None)), local_files_only=True)
    wrong_crop = {"size": {"shortest_edge": 32}, "do_center_crop": True,
                  "crop_size": {"height": 24, "width": 24}, "image_mean": [0.5] * 3,
                  "image_std": [0.5] * 3}
    with pytest.raises(ValueError, match=r"\(3, 24, 24\)"):
        DINOScorer(str(_small_vit(tmp_path / "crop", 32, wrong_crop)), local_files_only=True)
    with pytest.raises(ValueError, match="image_mean"):
        processor_preprocess({"size": {"shortest_edge": 32}})
    with pytest.raises(ValueError, match="not supported"):
        processor_preprocess({"size": {"longest_edge": 32}, "image_mean": [0.5] * 3,
                              "image_std": [0.5] * 3})


# --------------------------------------------------------------------------- pure pieces

def test_text_features_from_the_token_prefix_equal_the_full_77_tokens() -> None:
    torch.manual_seed(0)
    model = open_clip.CLIP(**toy_clip_config(EvaluatorConfig(clip_vision_layers=1,
                                                             clip_text_layers=2))).eval()
    tokens = open_clip.tokenize(["a photo of a red ball",
                                 "a pixel art image of a purple star with a yellow half on "
                                 "the beach"])
    length = int(tokens.argmax(dim=-1).max()) + 1
    assert length < 20
    with torch.no_grad():
        torch.testing.assert_close(encode_text_prefix(model, tokens[:, :length]),
                                   model.encode_text(tokens), atol=1e-5, rtol=1e-4)


def test_supcon_loss_on_a_worked_example() -> None:
    # two identities, two identical views each, orthogonal: every anchor sees its positive at
    # cosine 1 and two negatives at 0, so the loss is log((e + 2) / e) at temperature 1
    rows = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    loss = supcon_loss(rows, torch.tensor([0, 0, 1, 1]), temperature=1.0)
    assert loss.item() == pytest.approx(math.log((math.e + 2) / math.e), abs=1e-6)
    mixed = supcon_loss(rows, torch.tensor([0, 1, 0, 1]), temperature=1.0)
    assert mixed.item() > loss.item() + 1.0  # positives at cosine 0 cost more
    with pytest.raises(ValueError, match="same label"):
        supcon_loss(rows, torch.arange(4), temperature=1.0)


def test_identity_checks_on_constructed_features() -> None:
    features = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.85, 0.15]])
    labels = ["a", "a", "b", "b", "c"]  # "c" has no second image: never a query
    checks = identity_checks(features, labels, groups=["x", "y", "x", "y", "x"])
    # nearest others: 0→1 (a ✓), 1→4 (c ✗), 2→3 (b ✓), 3→2 (b ✓)
    assert checks["top1"] == pytest.approx(3 / 4) and checks["queries"] == 4
    assert checks["top1_by_group"] == {"x": 1.0, "y": 0.5}
    assert checks["chance"] == pytest.approx(1 / 4)
    sims = _unit(features) @ _unit(features).T
    assert checks["same_cosine"] == pytest.approx(float((sims[0, 1] + sims[2, 3]) / 2), abs=1e-6)
    different = [sims[i, j] for i, j in product(range(5), repeat=2)
                 if i != j and labels[i] != labels[j]]
    assert checks["different_cosine"] == pytest.approx(float(sum(different) / len(different)),
                                                       abs=1e-6)


def test_attribute_captions_vary_one_attribute() -> None:
    obj, scene = ObjectSpec("cup", "orange", "split", "blue"), SceneSpec("snow", "sketch")
    assert attribute_captions(obj, scene, "pattern") == [
        "a pencil sketch of an orange cup in the snow",
        "a pencil sketch of an orange cup with blue stripes in the snow",
        "a pencil sketch of an orange cup with blue dots in the snow",
        "a pencil sketch of an orange cup with blue checks in the snow",
        "a pencil sketch of an orange cup with blue zigzags in the snow",
        "a pencil sketch of an orange cup with a blue half in the snow"]
    # the pattern colour stays the object's, even where a candidate body colour equals it
    assert "a pencil sketch of a blue cup with a blue half in the snow" in \
        attribute_captions(obj, scene, "colour")
    assert attribute_captions(obj, scene, "style")[0] == "a photo of an orange cup with a blue " \
        "half in the snow"
    with pytest.raises(ValueError, match="unknown attribute"):
        attribute_captions(obj, scene, "size")


class _AttributeEmbedder:
    """A fake CLIP: a caption embeds as the sum of one-hot vectors of its five attribute values;
    image ``i`` (a 1×1 image whose red value is ``i``) embeds as the sum for ``shown[i]``."""

    def __init__(self, shown: list[dict[str, str]]) -> None:
        self.axes = [(a, v) for a, values in ATTRIBUTE_VALUES.items() for v in values]
        self.shown = shown
        self.parsed = {}
        for shape, colour, pattern, context, style in product(*ATTRIBUTE_VALUES.values()):
            for pattern_colour in COLOURS:
                words = object_words(shape, colour, pattern, pattern_colour)
                text = caption(ObjectSpec(shape, "red"), SceneSpec(context, style),
                               describe=words)
                self.parsed[text] = {"class": shape, "colour": colour, "pattern": pattern,
                                     "context": context, "style": style}

    def _vector(self, values: dict[str, str]) -> torch.Tensor:
        return _unit(torch.tensor([float(values[a] == v) for a, v in self.axes]))

    def text_features(self, texts: list[str]) -> torch.Tensor:
        return torch.stack([self._vector(self.parsed[t]) for t in texts])

    def image_features(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([self._vector(self.shown[im.getpixel((0, 0))[0]]) for im in images])


def test_attribute_accuracy_counts_exactly_the_attributes_shown_wrong() -> None:
    renders = render_identities(12, 1, seed=3)
    intended = [{"class": o.shape, "colour": o.colour, "pattern": o.pattern,
                 "context": s.context, "style": s.style}
                for o, s in zip(renders.objects, renders.scenes, strict=True)]
    shown = [dict(values) for values in intended]
    for i in range(3):  # images 0-2 show another colour, image 3 another style
        shown[i]["colour"] = next(c for c in ATTRIBUTE_VALUES["colour"] if c != shown[i]["colour"])
    shown[3]["style"] = next(s for s in ATTRIBUTE_VALUES["style"] if s != shown[3]["style"])
    images = [Image.new("RGB", (1, 1), (i, 0, 0)) for i in range(12)]
    embedder = _AttributeEmbedder(shown)
    accuracy = attribute_accuracy(embedder, images, renders.objects, renders.scenes)
    assert accuracy == {"class": 1.0, "colour": 9 / 12, "pattern": 1.0, "context": 1.0,
                        "style": 11 / 12}
    rows = zero_shot_predictions(embedder, images, renders.objects, renders.scenes, ["style"])
    assert rows.loc[3, "predicted"] == shown[3]["style"] and not rows.loc[3, "correct"]
    with pytest.raises(ValueError, match="one ObjectSpec"):
        attribute_accuracy(embedder, images[:2], renders.objects, renders.scenes)


# --------------------------------------------------------------------------- committed models

@pytest.fixture(scope="module")
def world_images() -> tuple:
    return render_identities(20, 3, seed=2024)  # not the training or record seeds


def test_committed_clip_knows_the_world_and_a_random_one_does_not(tmp_path: Path,
                                                                  world_images) -> None:
    images = world_images.pil()[::2]
    objects, scenes = world_images.objects[::2], world_images.scenes[::2]
    trained = attribute_accuracy(CLIPScorer(f"local-dir:{COMMITTED / 'clip'}", "",
                                            batch_size=256), images, objects, scenes)
    config = json.loads((COMMITTED / "clip" / "open_clip_config.json").read_text())
    torch.manual_seed(0)
    random_folder = save_clip(open_clip.CLIP(**config["model_cfg"]), config["model_cfg"],
                              tmp_path / "random-clip")
    untrained = attribute_accuracy(CLIPScorer(f"local-dir:{random_folder}", "",
                                              batch_size=256), images, objects, scenes)
    for attribute, floor in MIN_CLIP_ACCURACY.items():
        assert trained[attribute] >= floor, (attribute, trained)
        assert untrained[attribute] < floor, (attribute, untrained)


def test_committed_dino_retrieves_identities_and_a_random_one_does_not(tmp_path: Path,
                                                                       world_images) -> None:
    images, objects = world_images.pil(), world_images.objects
    trained = identity_checks(DINOScorer(str(COMMITTED / "dino"), local_files_only=True,
                                         batch_size=256).image_features(images), objects)
    random_folder = save_dino(toy_dino(EvaluatorConfig()), tmp_path / "random-dino")
    untrained = identity_checks(DINOScorer(str(random_folder), local_files_only=True,
                                           batch_size=256).image_features(images), objects)
    assert trained["chance"] == pytest.approx(2 / 59)
    assert trained["top1"] >= MIN_DINO_TOP1 > untrained["top1"]
    assert trained["same_cosine"] - trained["different_cosine"] > MIN_DINO_COSINE_GAP
    assert untrained["same_cosine"] - untrained["different_cosine"] < MIN_DINO_COSINE_GAP
