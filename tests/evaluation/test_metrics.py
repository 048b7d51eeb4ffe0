"""CLIP-I / CLIP-T / DINO scorers and the per-image score rows, on tiny random models."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from eqdiff.evaluation.metrics import (
    CLIPScorer,
    DINOScorer,
    FeatureCache,
    GeneratedImage,
    RealImage,
    cosine_matrix,
    dino_preprocess,
    real_features,
    real_image_rows,
    real_upper_bound,
    score_images,
    strip_placeholder,
    subject_scores,
)
from eqdiff.fixtures.zoo import build_tiny_clip, build_tiny_dino


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval-models")
    return {"clip": build_tiny_clip(root / "clip"), "dino": build_tiny_dino(root / "dino")}


@pytest.fixture(scope="module")
def clip(model_dirs: dict[str, Path]) -> CLIPScorer:
    return CLIPScorer(str(model_dirs["clip"]), "", batch_size=3)


@pytest.fixture(scope="module")
def dino(model_dirs: dict[str, Path]) -> DINOScorer:
    return DINOScorer(str(model_dirs["dino"]), batch_size=3, local_files_only=True)


def _images(count: int, seed: int = 0, size: tuple[int, int] = (96, 80)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(count)]


def _real(images: list[Image.Image]) -> list[RealImage]:
    return [RealImage(key=f"real/{i}.png", sha256=f"{i:064x}", image=im)
            for i, im in enumerate(images)]


# --------------------------------------------------------------------------- pure functions

def test_subject_score_is_the_mean_over_all_generated_real_pairs() -> None:
    gen = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    real = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    # cosines: row 0 → 1, √½, 0 ; row 1 → 0, √½, -1
    expected = (1 + math.sqrt(0.5) + 0 + 0 + math.sqrt(0.5) - 1) / 6
    assert subject_scores(gen, real) == pytest.approx(expected, abs=1e-6)


def test_real_upper_bound_leaves_out_self_pairs() -> None:
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # off-diagonal cosines: (0,1)=0, (0,2)=√½, (1,2)=√½, each counted twice over 6 ordered pairs
    assert real_upper_bound(feats) == pytest.approx(2 * math.sqrt(0.5) / 3, abs=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        real_upper_bound(feats[:1])


def test_cosine_matrix_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="features"):
        cosine_matrix(torch.ones(2, 3), torch.ones(2, 4))


@pytest.mark.parametrize(("prompt", "tokens", "plain"), [
    ("a <eqd> dog in the jungle", "<eqd>", "a dog in the jungle"),
    ("<eqd> dog on the beach", "<eqd>", "dog on the beach"),
    ("a <lf> <hf> backpack", ["<lf>", "<hf>"], "a backpack"),
])
def test_strip_placeholder(prompt: str, tokens: str | list[str], plain: str) -> None:
    assert strip_placeholder(prompt, tokens) == plain


# --------------------------------------------------------------------------- scorers

def test_identical_image_scores_one_for_clip_i_and_dino(clip: CLIPScorer,
                                                        dino: DINOScorer) -> None:
    image = _images(1, seed=3)[0]
    real = real_features(_real([image]), clip, dino)
    rows = score_images([GeneratedImage("g/0.png", "a <eqd> dog", 0, 0, image)], real, clip=clip,
                        dino=dino, run_id="r", subject="dog", class_noun="dog", kind="live",
                        method="m", placeholders="<eqd>")
    assert rows.loc[0, "clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert rows.loc[0, "dino"] == pytest.approx(1.0, abs=1e-5)
    other = real_features(_real(_images(1, seed=4)), clip, dino)
    assert subject_scores(real.dino, other.dino) < 1 - 1e-4  # the models tell images apart


def test_a_batch_scores_like_one_by_one(clip: CLIPScorer, dino: DINOScorer) -> None:
    images = _images(4, seed=1)  # batch size 3: one full and one partial batch
    for scorer in (clip, dino):
        together = scorer.image_features(images)
        alone = torch.cat([scorer.image_features([im]) for im in images])
        assert together.shape == (4, alone.shape[1])
        torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(together.norm(dim=1), torch.ones(4), atol=1e-5, rtol=0)
    texts = ["a dog", "a red backpack", "a cat on the beach", "a teapot"]
    torch.testing.assert_close(clip.text_features(texts),
                               torch.cat([clip.text_features([t]) for t in texts]),
                               atol=1e-5, rtol=1e-4)


def test_clip_t_scores_the_prompt_without_the_placeholder(clip: CLIPScorer,
                                                          dino: DINOScorer) -> None:
    images = _images(2, seed=5)
    real = real_features(_real(_images(2, seed=6)), clip, dino)
    generated = [GeneratedImage(f"g/{i}.png", "a <eqd> dog in the jungle", 0, i, im)
                 for i, im in enumerate(images)]
    rows = score_images(generated, real, clip=clip, dino=dino, run_id="r", subject="dog",
                        class_noun="dog", kind="live", method="m", placeholders="<eqd>")
    assert list(rows["prompt"]) == ["a dog in the jungle"] * 2
    image_feats = clip.image_features(images)
    plain = (image_feats @ clip.text_features(["a dog in the jungle"]).T).squeeze(1)
    with_token = (image_feats @ clip.text_features(["a <eqd> dog in the jungle"]).T).squeeze(1)
    np.testing.assert_allclose(rows["clip_t"], plain.numpy(), atol=1e-5)
    assert not np.allclose(rows["clip_t"], with_token.numpy(), atol=1e-5)
    # clip_i of each image is its mean over the real images
    expected = cosine_matrix(image_feats, real.clip).mean(dim=1)
    np.testing.assert_allclose(rows["clip_i"], expected.numpy(), atol=1e-5)


def test_dino_embedding_is_the_last_layer_cls_token(dino: DINOScorer) -> None:
    images = _images(2, seed=7, size=(300, 260))
    pixels = torch.stack([dino_preprocess()(im) for im in images])
    with torch.no_grad():
        hidden = dino.model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(dino.image_features(images), F.normalize(hidden[:, 0], dim=-1),
                               atol=1e-5, rtol=1e-4)
    assert not hasattr(dino.model, "pooler") or dino.model.pooler is None


def test_dino_preprocess_resizes_256_and_center_crops_224() -> None:
    # a 512² image with a 30 px red frame: after 512→256 (frame 15 px) and a 224 centre crop
    # (16 px cut on each side) no red is left; the blue centre fills the crop
    array = np.zeros((512, 512, 3), dtype=np.uint8)
    array[:, :] = (255, 0, 0)
    array[30:-30, 30:-30] = (0, 0, 255)
    tensor = dino_preprocess()(Image.fromarray(array))
    assert tensor.shape == (3, 224, 224)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    rgb = tensor * std[:, None, None] + mean[:, None, None]
    assert rgb[0].max() < 0.05 and rgb[2].min() > 0.95
    wide = dino_preprocess()(Image.new("RGB", (640, 320)))  # shorter side drives the resize
    assert wide.shape == (3, 224, 224)


def test_real_features_are_computed_once_per_image_and_can_be_persisted(
        clip: CLIPScorer, dino: DINOScorer) -> None:
    stored: dict[str, torch.Tensor] = {}
    cache = FeatureCache(load=stored.get, save=stored.__setitem__)
    real = _real(_images(3, seed=8))
    first = real_features(real, clip, dino, cache)
    assert cache.computed == 6  # 3 images × (CLIP, DINO)
    again = real_features(real, clip, dino, cache)
    assert cache.computed == 6
    torch.testing.assert_close(first.clip, again.clip)
    fresh = FeatureCache(load=stored.get)  # a new process: read back what was saved
    torch.testing.assert_close(real_features(real, clip, dino, fresh).dino, first.dino)
    assert fresh.computed == 0
    assert len(stored) == 6 and all(k.startswith(("clip:", "dino:")) for k in stored)


def test_real_image_rows_average_to_the_upper_bound(clip: CLIPScorer, dino: DINOScorer) -> None:
    real = real_features(_real(_images(4, seed=9)), clip, dino)
    rows = real_image_rows(real, run_id="r", subject="dog", class_noun="dog", kind="live")
    assert list(rows["method"].unique()) == ["real images"] and len(rows) == 4
    assert rows["clip_i"].mean() == pytest.approx(real_upper_bound(real.clip), abs=1e-6)
    assert rows["dino"].mean() == pytest.approx(real_upper_bound(real.dino), abs=1e-6)
    assert rows["clip_t"].isna().all()


# --------------------------------------------------------------------------- loading

def test_clip_refuses_pickle_weights(tmp_path: Path, model_dirs: dict[str, Path]) -> None:
    folder = tmp_path / "clip-pickle"
    folder.mkdir()
    (folder / "open_clip_config.json").write_bytes(
        (model_dirs["clip"] / "open_clip_config.json").read_bytes())
    (folder / "open_clip_pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickle"):
        CLIPScorer(f"local-dir:{folder}", "")
    with pytest.raises(ValueError, match="pickle"):
        CLIPScorer("ViT-B-32", str(folder / "open_clip_pytorch_model.bin"))


def test_missing_models_raise_errors_naming_them(tmp_path: Path) -> None:
    absent = tmp_path / "no-such-dino"
    with pytest.raises(FileNotFoundError, match="no-such-dino"):
        DINOScorer(str(absent), local_files_only=True)
    with pytest.raises(FileNotFoundError, match="no-such-clip"):
        CLIPScorer("ViT-B-32", str(tmp_path / "no-such-clip.safetensors"))
    with pytest.raises(ValueError, match="unknown CLIP model"):
        CLIPScorer("ViT-Nope", "openai")


ALLOW_DOWNLOADS_HINT = "model.local_files_only=false"


@pytest.mark.parametrize("load", [
    pytest.param(lambda: CLIPScorer("ViT-B-32", "openai"), id="open_clip tag"),
    pytest.param(lambda: CLIPScorer("hf-hub:eqdiff-tests/absent-clip", ""), id="clip hf-hub"),
    pytest.param(lambda: DINOScorer("eqdiff-tests/absent-dino"), id="dino hub id"),
])
def test_scorers_never_download_by_default(no_network: list, load) -> None:
    with pytest.raises(FileNotFoundError, match=ALLOW_DOWNLOADS_HINT) as raised:
        load()
    assert "\n" not in str(raised.value)  # one line, naming the model and the switch
    assert no_network == []  # not even a request to the hub


def test_a_cached_hub_clip_model_loads_without_the_network(no_network: list,
                                                            model_dirs: dict[str, Path]) -> None:
    import huggingface_hub.constants as hub

    commit = "0" * 40
    repo = Path(hub.HF_HUB_CACHE) / "models--eqdiff-tests--tiny-clip"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in model_dirs["clip"].iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    cached = CLIPScorer("hf-hub:eqdiff-tests/tiny-clip", "")
    local = CLIPScorer(str(model_dirs["clip"]), "")
    image = _images(1)
    assert torch.allclose(cached.image_features(image), local.image_features(image))
    assert no_network == []
