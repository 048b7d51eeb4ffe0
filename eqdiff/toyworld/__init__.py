"""A small procedural world, a base model trained on it, and evaluators that can read it.

No Stable Diffusion, CLIP or DINO weights can be downloaded here, so customization quality is
shown and measured in a world of our own: :mod:`eqdiff.toyworld.world` draws it, the models
trained on it live under ``eqdiff/data/toyworld/`` and load through the same code paths as the
real ones.
"""

from pathlib import Path

TOY_RESOLUTION = 32
# Run settings for the toy models (dotted config overrides): a learning rate suited to their
# width-32 embeddings and small UNet (SD-1.5's 4e-5 barely moves them in a few hundred steps),
# fewer class-prior images and sampling steps than at 512 px.
# Mask dilation is counted in latent pixels (5 passes of 5×5 ≈ ±10, tuned for SD's 64×64
# latents): on the toy model's 16×16 latents that covers the whole image and turns MGDP off, so
# one pass (±2, the same share of the image) is used.
TOY_RUN_OVERRIDES: dict[str, object] = {"train.learning_rate": 1e-3,
                                        "train.num_prior_images": 16, "sample.steps": 25,
                                        "masks.dilation_iterations": 1}
MODELS_ROOT = Path(__file__).resolve().parent.parent / "data" / "toyworld"
MODEL_MARKERS = {"base": "model_index.json", "clip": "open_clip_model.safetensors",
                 "dino": "model.safetensors"}


def toy_models(root: str | Path = MODELS_ROOT) -> dict[str, Path]:
    """The committed toy-world models by role (``base``, ``clip``, ``dino``).

    Raises ``FileNotFoundError`` naming the missing folder and the command that rebuilds it.
    """
    root = Path(root)
    folders = {role: root / role for role in MODEL_MARKERS}
    for role, folder in folders.items():
        if not (folder / MODEL_MARKERS[role]).is_file():
            raise FileNotFoundError(f"toy-world {role} model missing at {folder}; rebuild it with "
                                    "`eqdiff toyworld train-base` / `eqdiff toyworld "
                                    "train-evaluators`")
    return folders
