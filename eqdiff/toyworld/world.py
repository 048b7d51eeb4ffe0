"""The toy world: procedurally drawn objects in a few contexts and styles, with captions.

Every image comes from an :class:`ObjectSpec` (what the object is: class noun, colour, surface
pattern and pattern colour) and a :class:`SceneSpec` (where and how it is shown: context, style,
position, size, rotation). :func:`render` draws the scene at 4× and downsamples it, returning the
RGB image and the object's mask; :func:`caption` writes the sentence a base model is trained on,
e.g. ``"a watercolor painting of a red ball with blue stripes in the snow"``. Captions name the
pattern colour too: stripes, checks and zigzags cover about half of an object, so "red with blue
stripes" and "blue with red stripes" look alike and must not share a caption.

The styles are chosen to move different parts of the spectrum: ``watercolor`` is a low-frequency
change (washes, bleeding, paper), ``sketch`` and ``pixel art`` mostly high-frequency ones (lines,
hatching, blocks), ``neon`` changes both. Contexts change the background around the object and
leave the object itself alone, which is what the mask-guided process is about.

:data:`NOVEL_SUBJECTS` are objects the base model never sees in training (the sampler of the
training set rejects them, and their patterns are not in :data:`TRAIN_PATTERNS`): they are what
customization must teach it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SUPERSAMPLING = 4
DEFAULT_SIZE = 32

CLASSES = ("ball", "cube", "cone", "ring", "star", "cup")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 35, 40), "orange": (240, 130, 30), "yellow": (240, 210, 40),
    "green": (40, 160, 60), "blue": (40, 80, 210), "purple": (130, 50, 170),
    "pink": (240, 130, 180), "white": (240, 240, 235), "black": (35, 35, 40),
    "teal": (30, 150, 150),
}
TRAIN_PATTERNS = ("plain", "striped", "dotted", "checkered")
NOVEL_PATTERNS = ("zigzag", "split")  # never drawn in base-model training data
PATTERNS = TRAIN_PATTERNS + NOVEL_PATTERNS
CONTEXTS = ("plain", "beach", "snow", "grass", "city")
STYLES = ("photo", "watercolor", "sketch", "pixel art", "neon")

STYLE_PHRASES = {"photo": "a photo of", "watercolor": "a watercolor painting of",
                 "sketch": "a pencil sketch of", "pixel art": "a pixel art image of",
                 "neon": "a neon drawing of"}
CONTEXT_PHRASES = {"plain": "", "beach": "on the beach", "snow": "in the snow",
                   "grass": "on the grass", "city": "in the city"}
PATTERN_PHRASES = {"plain": "", "striped": "with {} stripes", "dotted": "with {} dots",
                   "checkered": "with {} checks", "zigzag": "with {} zigzags",
                   "split": "with a {} half"}


def object_words(shape: str, colour: str, pattern: str, pattern_colour: str) -> str:
    """``"red ball with blue stripes"``; a plain object is ``"red ball"``."""
    return " ".join(w for w in (colour, shape, PATTERN_PHRASES[pattern].format(pattern_colour))
                    if w)


@dataclass(frozen=True)
class ObjectSpec:
    """What an object is: its class noun, body colour, surface pattern and pattern colour."""

    shape: str
    colour: str
    pattern: str = "plain"
    pattern_colour: str = "white"

    def __post_init__(self) -> None:
        for value, allowed, what in ((self.shape, CLASSES, "class"),
                                     (self.colour, COLOURS, "colour"),
                                     (self.pattern, PATTERNS, "pattern"),
                                     (self.pattern_colour, COLOURS, "pattern colour")):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; known: {', '.join(allowed)}")
        if self.pattern != "plain" and self.pattern_colour == self.colour:
            raise ValueError(f"a {self.pattern} {self.colour} {self.shape} needs a pattern "
                             "colour other than its body colour")

    def describe(self) -> str:
        """``"red ball with blue stripes"`` (see :func:`object_words`)."""
        return object_words(self.shape, self.colour, self.pattern, self.pattern_colour)


@dataclass(frozen=True)
class SceneSpec:
    """Where and how an object is shown. Position and size are fractions of the image."""

    context: str = "plain"
    style: str = "photo"
    x: float = 0.5
    y: float = 0.55
    size: float = 0.3  # object radius / image size
    angle: float = 0.0  # degrees
    seed: int = 0  # texture noise of the background and style

    def __post_init__(self) -> None:
        if self.context not in CONTEXTS:
            raise ValueError(f"unknown context {self.context!r}; known: {', '.join(CONTEXTS)}")
        if self.style not in STYLES:
            raise ValueError(f"unknown style {self.style!r}; known: {', '.join(STYLES)}")


# Objects customization has to teach: their patterns or colour/class combinations never appear
# in the base model's training data (see :func:`is_novel`).
NOVEL_SUBJECTS: dict[str, ObjectSpec] = {
    "zigzag_ring": ObjectSpec("ring", "teal", "zigzag", "yellow"),
    "split_star": ObjectSpec("star", "red", "split", "blue"),
    "dotted_cone": ObjectSpec("cone", "purple", "dotted", "yellow"),
    "checkered_cup": ObjectSpec("cup", "orange", "checkered", "blue"),
}
HELD_OUT_COMBINATIONS = frozenset((s.shape, s.colour) for s in NOVEL_SUBJECTS.values())


def is_novel(obj: ObjectSpec) -> bool:
    """Whether ``obj`` is kept out of base training (a novel pattern or a held-out combination)."""
    return obj.pattern in NOVEL_PATTERNS or (obj.shape, obj.colour) in HELD_OUT_COMBINATIONS


def caption(obj: ObjectSpec, scene: SceneSpec, *, describe: str | None = None) -> str:
    """The caption of a scene: ``"a pencil sketch of a blue cube with red dots on the grass"``.

    ``describe`` replaces the object's words (e.g. ``"<eqd> ring"`` for a placeholder prompt).
    """
    noun_phrase = describe if describe is not None else obj.describe()
    article = "an" if noun_phrase[:1].lower() in "aeiou" else "a"
    words = [STYLE_PHRASES[scene.style], article, noun_phrase, CONTEXT_PHRASES[scene.context]]
    return " ".join(w for w in words if w)


def random_object(rng: np.random.Generator, *, allow_novel: bool = False) -> ObjectSpec:
    """A random object; held-out ones are redrawn unless ``allow_novel``."""
    patterns = PATTERNS if allow_novel else TRAIN_PATTERNS
    colours = list(COLOURS)
    while True:
        colour = colours[rng.integers(len(colours))]
        pattern = patterns[rng.integers(len(patterns))]
        others = [c for c in colours if c != colour]
        obj = ObjectSpec(CLASSES[rng.integers(len(CLASSES))], colour, pattern,
                         "white" if pattern == "plain" else others[rng.integers(len(others))])
        if allow_novel or not is_novel(obj):
            return obj


def random_scene(rng: np.random.Generator, *, context: str | None = None,
                 style: str | None = None) -> SceneSpec:
    """A random pose in a random (or the given) context and style."""
    return SceneSpec(
        context=context or CONTEXTS[rng.integers(len(CONTEXTS))],
        style=style or STYLES[rng.integers(len(STYLES))],
        x=float(rng.uniform(0.38, 0.62)), y=float(rng.uniform(0.45, 0.62)),
        size=float(rng.uniform(0.22, 0.32)), angle=float(rng.uniform(-20, 20)),
        seed=int(rng.integers(2**31)))


# --------------------------------------------------------------------------- objects

def _rgba(name: str, alpha: int = 255) -> tuple[int, int, int, int]:
    return (*COLOURS[name], alpha)


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Polygon of the polygonal classes (None for the round ones)."""
    if shape == "cube":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "cone":
        return [(cx, cy - 1.1 * r), (cx + 0.85 * r, cy + r), (cx - 0.85 * r, cy + r)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r * (1.1 if k % 2 == 0 else 0.45)
            phi = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(phi), cy + radius * math.sin(phi)))
        return points
    return None


def _silhouette(shape: str, size: int, cx: float, cy: float, r: float) -> Image.Image:
    """The object's shape as an "L" image (255 inside)."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    polygon = _outline(shape, cx, cy, r)
    if polygon is not None:
        draw.polygon(polygon, fill=255)
    elif shape == "ball":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        draw.ellipse((cx - 0.5 * r, cy - 0.5 * r, cx + 0.5 * r, cy + 0.5 * r), fill=0)
    elif shape == "cup":
        draw.polygon([(cx - 0.8 * r, cy - 0.8 * r), (cx + 0.8 * r, cy - 0.8 * r),
                      (cx + 0.6 * r, cy + r), (cx - 0.6 * r, cy + r)], fill=255)
        draw.ellipse((cx + 0.45 * r, cy - 0.5 * r, cx + 1.15 * r, cy + 0.35 * r), fill=255)
        draw.ellipse((cx + 0.68 * r, cy - 0.27 * r, cx + 0.92 * r, cy + 0.12 * r), fill=0)
    return mask


def _pattern_mask(pattern: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    """Where the pattern colour goes, as a boolean (size, size) array in object coordinates."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    u, v = (xx - cx) / r, (yy - cy) / r  # object-relative coordinates, about [-1, 1]
    if pattern == "striped":
        return (np.floor((v + 1.0) * 2.5) % 2) == 1
    if pattern == "dotted":
        gu, gv = (u + 1.0) * 2.0, (v + 1.0) * 2.0
        du, dv = gu - np.floor(gu) - 0.5, gv - np.floor(gv) - 0.5
        return du * du + dv * dv < 0.09
    if pattern == "checkered":
        return ((np.floor((u + 1.0) * 2.0) + np.floor((v + 1.0) * 2.0)) % 2) == 1
    if pattern == "zigzag":
        wave = np.abs(((u + 1.0) * 2.0) % 2.0 - 1.0) * 0.5  # triangle wave across u
        band = (v + 1.0 - wave) * 2.0
        return (np.floor(band) % 2) == 1
    if pattern == "split":
        return u > 0
    return np.zeros((size, size), dtype=bool)


def _shading(size: int, cx: float, cy: float, r: float) -> np.ndarray:
    """A light-from-top-left factor in [0.6, 1.25] for photo-like shading."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    d = np.hypot(xx - (cx - 0.4 * r), yy - (cy - 0.45 * r)) / (1.8 * r)
    return np.clip(1.25 - 0.65 * d, 0.6, 1.25)


def _object_layer(obj: ObjectSpec, scene: SceneSpec, big: int) -> Image.Image:
    """The object as an RGBA layer at the supersampled size (rotated, shaded for photos)."""
    cx, cy, r = scene.x * big, scene.y * big, scene.size * big
    alpha = _silhouette(obj.shape, big, cx, cy, r)
    body = np.empty((big, big, 3), dtype=np.float32)
    body[:] = COLOURS[obj.colour]
    pattern = _pattern_mask(obj.pattern, big, cx, cy, r)
    body[pattern] = COLOURS[obj.pattern_colour]
    if scene.style in ("photo", "watercolor"):
        body *= _shading(big, cx, cy, r)[..., None]
    layer = Image.fromarray(np.clip(body, 0, 255).astype(np.uint8)).convert("RGBA")
    layer.putalpha(alpha)
    return layer.rotate(scene.angle, resample=Image.Resampling.BICUBIC, center=(cx, cy))


# --------------------------------------------------------------------------- contexts

def _context_background(context: str, big: int, scene: SceneSpec,
                        rng: np.random.Generator) -> tuple[Image.Image, float]:
    """The background at the supersampled size, and the ground line (fraction of the height)."""
    image = Image.new("RGB", (big, big), (225, 222, 215))
    draw = ImageDraw.Draw(image)
    horizon = min(scene.y + scene.size * 0.2, 0.8)
    h = int(horizon * big)
    if context == "plain":
        tone = int(rng.integers(205, 240))
        image.paste((tone, tone - 3, tone - 10), (0, 0, big, big))
    elif context == "beach":
        image.paste((135, 195, 240), (0, 0, big, h))
        sea = int(big * 0.12)
        image.paste((30, 110, 180), (0, h - sea, big, h))
        image.paste((225, 200, 140), (0, h, big, big))
        for _ in range(12):  # foam and ripples
            x, y = rng.uniform(0, big), rng.uniform(h - sea, h)
            draw.line((x, y, x + big * 0.08, y), fill=(200, 230, 245), width=max(big // 64, 1))
    elif context == "snow":
        image.paste((190, 210, 230), (0, 0, big, h))
        image.paste((245, 248, 252), (0, h, big, big))
        for _ in range(25):
            x, y, s = rng.uniform(0, big), rng.uniform(0, h), big / 90
            draw.ellipse((x - s, y - s, x + s, y + s), fill=(255, 255, 255))
    elif context == "grass":
        image.paste((120, 180, 235), (0, 0, big, h))
        image.paste((70, 150, 55), (0, h, big, big))
        for _ in range(40):
            x, y = rng.uniform(0, big), rng.uniform(h, big)
            draw.line((x, y, x + rng.uniform(-2, 2), y - big / 24), fill=(40, 110, 35),
                      width=max(big // 64, 1))
    elif context == "city":
        image.paste((170, 175, 185), (0, 0, big, h))
        x = 0.0
        while x < big:
            w, top = rng.uniform(0.12, 0.22) * big, rng.uniform(0.1, 0.5) * h
            grey = int(rng.integers(60, 100))
            draw.rectangle((x, top, x + w, h), fill=(grey, grey, grey + 10))
            for wy in np.arange(top + big * 0.04, h - big * 0.04, big * 0.07):
                for wx in np.arange(x + w * 0.2, x + w * 0.8, big * 0.06):
                    if rng.uniform() < 0.6:
                        draw.rectangle((wx, wy, wx + big * 0.025, wy + big * 0.03),
                                       fill=(240, 220, 120))
            x += w + rng.uniform(0.0, 0.04) * big
        image.paste((95, 95, 100), (0, h, big, big))
    return image, horizon


# --------------------------------------------------------------------------- styles

def _watercolor(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Low-frequency change: soft washes, colours lifted toward the paper, paper grain."""
    size = image.shape[0]
    soft = np.asarray(Image.fromarray(image.astype(np.uint8))
                      .filter(ImageFilter.GaussianBlur(size / 40)), dtype=np.float32)
    paper = np.array([248, 243, 230], dtype=np.float32)
    washed = 0.62 * soft + 0.38 * paper
    coarse = rng.uniform(-1, 1, size=(6, 6)).astype(np.float32)
    blotch = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size),
                                                                 Image.Resampling.BICUBIC))
    return washed * (1.0 + 0.08 * blotch[..., None])


def _sketch(image: np.ndarray, obj_alpha: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """High-frequency change: grey pencil lines and hatching on white paper."""
    grey = Image.fromarray(image.astype(np.uint8)).convert("L")
    edges = np.asarray(grey.filter(ImageFilter.FIND_EDGES), dtype=np.float32)
    outline = np.asarray(Image.fromarray(obj_alpha).filter(ImageFilter.FIND_EDGES),
                         dtype=np.float32)
    lines = np.clip(edges * 1.5 + outline, 0, 255)
    size = image.shape[0]
    yy, xx = np.mgrid[0:size, 0:size]
    darkness = 1.0 - np.asarray(grey, dtype=np.float32) / 255.0
    hatch = (((xx + yy) % max(size // 24, 3)) == 0) & (darkness > 0.45)
    value = 250.0 - 0.9 * lines - 90.0 * hatch + rng.normal(0, 3, size=lines.shape)
    return np.repeat(np.clip(value, 0, 255)[..., None], 3, axis=2)


def _pixel_art(image: np.ndarray) -> np.ndarray:
    """High-frequency change: 8×8 blocks and a 5-level colour ramp."""
    size = image.shape[0]
    small = Image.fromarray(image.astype(np.uint8)).resize((8, 8), Image.Resampling.BOX)
    levels = np.round(np.asarray(small, dtype=np.float32) / 63.75) * 63.75
    return np.asarray(Image.fromarray(np.clip(levels, 0, 255).astype(np.uint8))
                      .resize((size, size), Image.Resampling.NEAREST), dtype=np.float32)


def _neon(image: np.ndarray, obj_alpha: np.ndarray, obj_rgb: np.ndarray) -> np.ndarray:
    """Dark night scene; the object is a glowing outline in its own (saturated) colour."""
    size = image.shape[0]
    outline = Image.fromarray(obj_alpha).filter(ImageFilter.FIND_EDGES)
    outline = outline.filter(ImageFilter.MaxFilter(size // 32 * 2 + 1))
    glow = np.asarray(outline.filter(ImageFilter.GaussianBlur(size / 30)), dtype=np.float32)
    core = np.asarray(outline, dtype=np.float32) / 255.0
    halo = np.clip(glow / max(glow.max(), 1.0) * 1.6, 0, 1)
    saturated = np.clip((obj_rgb - obj_rgb.mean(axis=2, keepdims=True)) * 1.8 + 140, 0, 255)
    night = 0.18 * image
    lit = night * (1 - halo[..., None]) + saturated * halo[..., None]
    return lit * (1 - core[..., None]) + np.clip(saturated + 90, 0, 255) * core[..., None]


# --------------------------------------------------------------------------- rendering

def render(obj: ObjectSpec, scene: SceneSpec, *,
           size: int = DEFAULT_SIZE) -> tuple[Image.Image, Image.Image]:
    """Draw ``obj`` in ``scene``: ``(RGB image, "L" mask with 255 on the object)``."""
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    rng = np.random.default_rng(scene.seed)
    big = size * SUPERSAMPLING
    background, _ = _context_background(scene.context, big, scene, rng)
    layer = _object_layer(obj, scene, big)
    if scene.style == "photo":  # a soft contact shadow under the object
        shadow = Image.new("L", (big, big), 0)
        cx, r = scene.x * big, scene.size * big
        base = scene.y * big + r
        ImageDraw.Draw(shadow).ellipse((cx - r, base - 0.18 * r, cx + r, base + 0.18 * r),
                                       fill=110)
        shadow = shadow.filter(ImageFilter.GaussianBlur(big / 50))
        background = Image.composite(Image.new("RGB", (big, big), (40, 40, 40)), background,
                                     shadow)
    scene_rgb = Image.alpha_composite(background.convert("RGBA"), layer).convert("RGB")
    alpha = layer.getchannel("A")
    small_rgb = np.asarray(scene_rgb.resize((size, size), Image.Resampling.LANCZOS),
                           dtype=np.float32)
    small_alpha = alpha.resize((size, size), Image.Resampling.BILINEAR)
    obj_rgb = np.asarray(layer.convert("RGB").resize((size, size), Image.Resampling.BILINEAR),
                         dtype=np.float32)
    alpha_array = np.asarray(small_alpha)
    if scene.style == "photo":
        styled = small_rgb + rng.normal(0, 3, size=small_rgb.shape)
    elif scene.style == "watercolor":
        styled = _watercolor(small_rgb, rng)
    elif scene.style == "sketch":
        styled = _sketch(small_rgb, alpha_array, rng)
    elif scene.style == "pixel art":
        styled = _pixel_art(small_rgb)
    else:
        styled = _neon(small_rgb, alpha_array, obj_rgb)
    image = Image.fromarray(np.clip(styled, 0, 255).astype(np.uint8))
    mask = small_alpha.point(lambda v: 255 if v >= 128 else 0)
    return image, mask


def scene_grid(rows: list[list[Image.Image]], *, scale: int = 3) -> Image.Image:
    """Tile equal-sized images into one picture, upscaled ×``scale`` with nearest neighbours."""
    height, width = rows[0][0].height, rows[0][0].width
    columns = max(len(r) for r in rows)
    grid = Image.new("RGB", (columns * width, len(rows) * height), (255, 255, 255))
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            grid.paste(image.convert("RGB"), (j * width, i * height))
    return grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)


def with_style(scene: SceneSpec, style: str) -> SceneSpec:
    """The same pose in another style."""
    return replace(scene, style=style)
