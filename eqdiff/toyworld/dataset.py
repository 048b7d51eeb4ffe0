"""The toy benchmark dataset: novel subjects photographed in one context and style.

Each subject of :data:`~eqdiff.toyworld.world.NOVEL_SUBJECTS` gets a few photos (``photo``
style, ``plain`` context, varied pose) with ground-truth masks, written in the plain layout
(:mod:`eqdiff.datasets`): ``<subject>/NN.png``, ``<subject>/masks/NN.png``, ``subjects.csv`` and
the prompt set ``prompts/toyworld.txt``. The prompts move the subject either to new contexts
(still photos) or to new styles (plain background), so a report can tell fidelity under context
changes from fidelity under style changes (:func:`prompt_change`).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from eqdiff.toyworld.world import (
    CONTEXT_PHRASES,
    CONTEXTS,
    DEFAULT_SIZE,
    NOVEL_SUBJECTS,
    STYLE_PHRASES,
    STYLES,
    SceneSpec,
    random_scene,
    render,
)

logger = logging.getLogger(__name__)

PROMPT_SET = "toyworld"
TRAIN_CONTEXT, TRAIN_STYLE = "plain", "photo"


def prompt_templates() -> list[str]:
    """The benchmark's templates: every other context as a photo, every other style plain."""
    templates = [f"{STYLE_PHRASES[TRAIN_STYLE]} a {{token}} {{class_noun}} {CONTEXT_PHRASES[c]}"
                 for c in CONTEXTS if c != TRAIN_CONTEXT]
    templates += [f"{STYLE_PHRASES[s]} a {{token}} {{class_noun}}"
                  for s in STYLES if s != TRAIN_STYLE]
    return templates


def prompt_change(prompt: str) -> tuple[str, str, str]:
    """``(kind, context, style)`` a benchmark prompt asks for; kind is "context" or "style".

    Works on prompts with or without the placeholder token.
    """
    text = " ".join(prompt.split())
    style = next((s for s, phrase in STYLE_PHRASES.items() if text.startswith(phrase)),
                 TRAIN_STYLE)
    context = next((c for c, phrase in CONTEXT_PHRASES.items() if phrase and
                    text.endswith(phrase)), TRAIN_CONTEXT)
    if style != TRAIN_STYLE:
        return "style", context, style
    if context != TRAIN_CONTEXT:
        return "context", context, style
    return "same", context, style


def write_toy_dataset(folder: str | Path, *, subjects: list[str] | None = None,
                      images_per_subject: int = 5, size: int = DEFAULT_SIZE,
                      seed: int = 0) -> Path:
    """Write the benchmark subjects (default: all novel subjects) to ``folder``; return it."""
    names = list(NOVEL_SUBJECTS) if subjects is None else subjects
    unknown = [n for n in names if n not in NOVEL_SUBJECTS]
    if unknown:
        raise ValueError(f"unknown toy subjects {unknown}; known: {', '.join(NOVEL_SUBJECTS)}")
    if images_per_subject < 1:
        raise ValueError(f"images_per_subject must be >= 1, got {images_per_subject}")
    folder = Path(folder)
    (folder / "prompts").mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(names):
        rng = np.random.default_rng([seed, index])
        masks = folder / name / "masks"
        masks.mkdir(parents=True, exist_ok=True)
        for k in range(images_per_subject):
            scene: SceneSpec = random_scene(rng, context=TRAIN_CONTEXT, style=TRAIN_STYLE)
            image, mask = render(NOVEL_SUBJECTS[name], scene, size=size)
            image.save(folder / name / f"{k:02d}.png")
            mask.save(masks / f"{k:02d}.png")
    with (folder / "subjects.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["subject", "class", "kind", "prompt_set"])
        writer.writerows([n, NOVEL_SUBJECTS[n].shape, "object", PROMPT_SET] for n in names)
    (folder / "prompts" / f"{PROMPT_SET}.txt").write_text(
        "# toy world: new contexts (photos), then new styles (plain background)\n"
        + "\n".join(prompt_templates()) + "\n", encoding="utf-8")
    logger.info("wrote toy dataset (%d subjects x %d images, %d px) to %s", len(names),
                images_per_subject, size, folder)
    return folder
