"""Train one demo subject on the tiny model on the CPU and print how the loss falls.

Usage: .venv/bin/python scripts/loss_curve.py [--steps 200] [--method eqdiff]
The losses are noisy per step (random timesteps and noise), so the table shows means over
windows of steps.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from eqdiff.config import RunConfig, SampleConfig, TrainConfig, method_preset
from eqdiff.data.datasets import load_dataset
from eqdiff.data.images import load_image, normalise_image, pil_to_tensor
from eqdiff.data.masks import mask_to_tensor
from eqdiff.fixtures.demo_data import write_demo_dataset
from eqdiff.fixtures.zoo import build_zoo
from eqdiff.method.models import load_sd_components
from eqdiff.method.priors import generate_class_priors
from eqdiff.method.reference import training_extensions
from eqdiff.method.training import ConceptData, ProgressBar, train_concept


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--method", default="eqdiff")
    parser.add_argument("--window", type=int, default=25)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="eqdiff-loss-"))
    base = str(build_zoo(work / "zoo")["base"])
    dataset = load_dataset(write_demo_dataset(work / "data"))
    subject = dataset.subject("red_ball")
    images, masks = [], []
    for path in subject.image_paths:
        fitted = normalise_image(load_image(path), 64)
        images.append(pil_to_tensor(fitted.image))
        with Image.open(subject.mask_dir / f"{path.stem}.png") as mask:
            masks.append(mask_to_tensor(np.asarray(mask.convert("L").resize((64, 64))) > 127))
    config = RunConfig(train=TrainConfig(steps=args.steps, resolution=64, num_prior_images=8,
                                         learning_rate=1e-3),
                       sample=SampleConfig(steps=20, resolution=64))
    method = method_preset(args.method)
    priors = generate_class_priors(load_sd_components(base), "ball", count=8, seed=0,
                                   sample=config.sample, resolution=64)
    data = ConceptData("red_ball", "ball", torch.stack(images),
                       torch.stack(masks),
                       torch.stack([pil_to_tensor(p) for p in priors]))
    trained = train_concept(load_sd_components(base), data, config, method,
                            extensions=training_extensions(config.rra, method),
                            callbacks=[ProgressBar(f"red_ball/{args.method}")])
    history = trained.loss_history
    keys = [k for k in history[0] if k.startswith("loss")]
    sys.stdout.write("| steps | " + " | ".join(keys) + " |\n|" + "---|" * (len(keys) + 1) + "\n")
    for start in range(0, len(history), args.window):
        window = history[start:start + args.window]
        means = [statistics.fmean(h[k] for h in window) for k in keys]
        sys.stdout.write(f"| {start + 1}-{start + len(window)} | "
                         + " | ".join(f"{m:.4f}" for m in means) + " |\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
