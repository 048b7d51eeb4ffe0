"""Dataset layouts (DreamBench, plain csv/yaml), prompt sets, problems and the demo dataset."""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eqdiff.data.datasets import Subject, load_dataset
from eqdiff.data.dreambench import parse_dreambench_prompts
from eqdiff.data.names import validate_subject_name
from eqdiff.data.prompts import LIVE_PROMPTS, OBJECT_PROMPTS, PromptSet, builtin_prompt_sets
from eqdiff.fixtures.demo_data import write_demo_dataset

# The class table of DreamBench's prompts_and_classes.txt (30 subjects, file order).
DREAMBENCH_CLASSES = [
    ("backpack", "backpack"), ("backpack_dog", "backpack"), ("bear_plushie", "stuffed animal"),
    ("berry_bowl", "bowl"), ("can", "can"), ("candle", "candle"), ("cat", "cat"),
    ("cat2", "cat"), ("clock", "clock"), ("colorful_sneaker", "sneaker"), ("dog", "dog"),
    ("dog2", "dog"), ("dog3", "dog"), ("dog5", "dog"), ("dog6", "dog"), ("dog7", "dog"),
    ("dog8", "dog"), ("duck_toy", "toy"), ("fancy_boot", "boot"),
    ("grey_sloth_plushie", "stuffed animal"), ("monster_toy", "toy"),
    ("pink_sunglasses", "glasses"), ("poop_emoji", "toy"), ("rc_car", "toy"),
    ("red_cartoon", "cartoon"), ("robot_toy", "toy"), ("shiny_sneaker", "sneaker"),
    ("teapot", "teapot"), ("vase", "vase"), ("wolf_plushie", "stuffed animal"),
]


def _embedded_prompts() -> dict[str, list[str]]:
    text = resources.files("eqdiff").joinpath("data", "dreambench_prompts.json").read_text()
    return json.loads(text)


def _as_release_item(template: str) -> str:
    """Our template back in the release's syntax."""
    body = template.replace("{token}", "{0}").replace("{class_noun}", "{1}")
    return f"'{body}'.format(unique_token, class_token)"


def dreambench_text() -> str:
    """A file with the structure of DreamBench's prompts_and_classes.txt."""
    prompts = _embedded_prompts()
    lines = ["Classes", "", "subject_name,class"]
    lines += [f"{name},{noun}" for name, noun in DREAMBENCH_CLASSES]
    lines += ["", "Prompts", "", "Object Prompts", "", "prompt_list = ["]
    lines += [_as_release_item(t) + "," for t in prompts["object"][:-1]]
    lines += [_as_release_item(prompts["object"][-1]), "]", "", "Live Subject Prompts", "",
              "prompt_list = ["]
    lines += [_as_release_item(t) + "," for t in prompts["live"][:-1]]
    lines += [_as_release_item(prompts["live"][-1]), "]"]
    return "\n".join(lines) + "\n"


def _images(folder: Path, count: int, size: int = 40) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        Image.new("RGB", (size, size), (k * 40, 90, 160)).save(folder / f"{k:02d}.jpg")


@pytest.fixture
def dreambench(tmp_path: Path) -> Path:
    """A DreamBench-layout folder: the full index, 4 subject folders and 1 unlisted folder."""
    root = tmp_path / "dreambench" / "dataset"
    root.mkdir(parents=True)
    (root / "prompts_and_classes.txt").write_text(dreambench_text())
    (root / "references_and_licenses.txt").write_text("credits\n")
    for name in ("backpack", "can", "dog2", "wolf_plushie"):
        _images(root / name, 4)
    _images(root / "mystery_thing", 4)
    return tmp_path / "dreambench"


# --------------------------------------------------------------------------- DreamBench

def test_dreambench_index_parses_25_plus_25_prompts_and_30_classes() -> None:
    index = parse_dreambench_prompts(dreambench_text())
    assert len(index.classes) == 30
    assert index.classes["wolf_plushie"] == "stuffed animal"  # the space is kept
    assert index.classes["dog2"] == "dog"
    assert list(index.classes)[:2] == ["backpack", "backpack_dog"]
    assert len(index.object_templates) == 25 and len(index.live_templates) == 25
    assert index.object_templates[0] == "a {token} {class_noun} in the jungle"
    assert index.object_templates[10] == "a {token} {class_noun} with a wheat field in the " \
                                         "background"
    assert index.live_templates[10] == "a {token} {class_noun} wearing a red hat"
    assert index.live_templates[-1] == "a cube shaped {token} {class_noun}"


def test_dreambench_dataset_reports_missing_and_unlisted_folders(dreambench: Path) -> None:
    dataset = load_dataset(dreambench)  # the parent of dataset/ is accepted
    assert dataset.layout == "dreambench"
    assert dataset.root == dreambench / "dataset"
    assert [s.name for s in dataset.subjects] == ["backpack", "can", "dog2", "wolf_plushie"]
    wolf = dataset.subject("wolf_plushie")
    assert wolf.class_noun == "stuffed animal" and wolf.kind == "object"
    assert len(wolf.image_paths) == 4 and wolf.mask_dir is None
    dog = dataset.subject("dog2")
    assert dog.kind == "live" and dataset.prompts_for(dog).name == LIVE_PROMPTS
    assert dataset.prompts_for("can").name == OBJECT_PROMPTS
    missing = {p.subject for p in dataset.problems if p.kind == "missing_folder"}
    assert len(missing) == 26 and "bear_plushie" in missing and "can" not in missing
    unlisted = [p for p in dataset.problems if p.kind == "unlisted_folder"]
    assert [p.subject for p in unlisted] == ["mystery_thing"]
    assert "not listed" in unlisted[0].message


def test_dreambench_prompts_render_with_and_without_the_token(dreambench: Path) -> None:
    dataset = load_dataset(dreambench / "dataset")
    live = dataset.prompts_for("dog2")
    assert live.render("<eqd>", "dog")[0] == "a <eqd> dog in the jungle"
    assert live.render_plain("dog")[0] == "a dog in the jungle"
    assert live.render_plain("stuffed animal")[-1] == "a cube shaped stuffed animal"
    assert all("  " not in p for p in live.render_plain("dog"))


def _replace_line(text: str, old: str, new: str) -> tuple[str, int]:
    lines = text.splitlines()
    number = next(i for i, line in enumerate(lines) if line == old)
    lines[number] = new
    return "\n".join(lines) + "\n", number + 1


_FIRST_ITEM = "'a {0} {1} in the jungle'.format(unique_token, class_token),"


@pytest.mark.parametrize("old,new,message", [
    (_FIRST_ITEM, "__import__('os').system('echo hacked'),", "expected a prompt"),
    (_FIRST_ITEM, "'a {0} {2} in the jungle'.format(unique_token, class_token),",
     "may only use"),
    (_FIRST_ITEM, "'a {0} {1} in the jungle'.format(class_token, unique_token),",
     "expected a prompt"),
    (_FIRST_ITEM, "'a {0 in the jungle'.format(unique_token, class_token),", "malformed"),
    ("dog2,dog", "dog2 dog", "expected a 'subject_name,class' row"),
    ("dog2,dog", "../dog2,dog", "invalid subject name"),
    ("dog2,dog", "dog2,", "class noun is empty"),
    ("dog2,dog", "dog,dog", "listed twice"),
])
def test_malformed_dreambench_files_name_the_line(old: str, new: str, message: str) -> None:
    text, number = _replace_line(dreambench_text(), old, new)
    with pytest.raises(ValueError, match=message) as caught:
        parse_dreambench_prompts(text, source="prompts_and_classes.txt")
    assert f"prompts_and_classes.txt:{number}:" in str(caught.value)


def test_dreambench_file_structure_errors() -> None:
    text = dreambench_text()
    unclosed = text.rstrip("\n").rsplit("\n", 1)[0] + "\n"  # drop the final "]"
    with pytest.raises(ValueError, match="never closed"):
        parse_dreambench_prompts(unclosed)
    only_objects = text.split("Live Subject Prompts")[0]
    with pytest.raises(ValueError, match=r"missing \['live'\]"):
        parse_dreambench_prompts(only_objects)
    with pytest.raises(ValueError, match="unexpected text after the prompt lists"):
        parse_dreambench_prompts(text + "print('hi')\n")
    with pytest.raises(ValueError, match="no 'subject_name,class' rows"):
        parse_dreambench_prompts("Prompts\n" + text.split("Prompts", 1)[1])


# --------------------------------------------------------------------------- plain layout

def test_plain_csv_layout(tmp_path: Path) -> None:
    (tmp_path / "subjects.csv").write_text(
        "subject,class,kind,prompt_set\n"
        "rex,dog,,\n"
        "bear,stuffed animal,object,mine\n"
        "kitty,cat,live,style\n")
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "mine.txt").write_text(
        "# my prompts\na {token} {class_noun} on the moon\n\na {token} {class_noun} at sea\n")
    for name in ("rex", "bear", "kitty"):
        _images(tmp_path / name, 3)
    (tmp_path / "bear" / "masks").mkdir()
    dataset = load_dataset(tmp_path)
    assert dataset.layout == "plain" and dataset.problems == ()
    assert dataset.subject("rex").kind == "live"  # from the class noun
    assert dataset.prompts_for("rex").name == LIVE_PROMPTS
    bear = dataset.subject("bear")
    assert bear.class_noun == "stuffed animal" and bear.mask_dir == tmp_path / "bear" / "masks"
    assert dataset.prompts_for(bear).render("S", "bear") == ["a S bear on the moon",
                                                             "a S bear at sea"]
    assert dataset.prompts_for("kitty").name == "style"


def test_plain_yaml_layout_with_inline_prompts(tmp_path: Path) -> None:
    (tmp_path / "subjects.yaml").write_text(
        "subjects:\n"
        "  - {subject: mug, class: cup, prompt_set: kitchen}\n"
        "  - {subject: tom, class: cat}\n"
        "prompt_sets:\n"
        "  kitchen: ['a {token} {class_noun} on a table']\n")
    _images(tmp_path / "mug", 3)
    _images(tmp_path / "tom", 2)
    dataset = load_dataset(tmp_path)
    assert dataset.prompts_for("mug").render_plain("cup") == ["a cup on a table"]
    assert dataset.subject("tom").kind == "live"
    assert [(p.kind, p.subject) for p in dataset.problems] == [("too_few_images", "tom")]
    assert "2 image(s), need at least 3" in dataset.problems[0].message


@pytest.mark.parametrize("csv_text,message", [
    ("name,class\nrex,dog\n", ":1: header"),
    ("subject,class,folder\nrex,dog,\n../up,dog,up\n", ":3: invalid subject name"),
    ("subject,class\nrex,\n", ":2: .*class noun is empty"),
    ("subject,class,kind\nrex,dog,plant\n", ":2: kind must be"),
    ("subject,class,prompt_set\nrex,dog,nope\n", ":2: unknown prompt set 'nope'"),
    ("subject,class\nrex,dog\nrex,cat\n", ":3: subject 'rex' is listed twice"),
    ("subject,class\nrex,dog,extra\n", ":2: more columns"),
])
def test_malformed_subjects_csv(tmp_path: Path, csv_text: str, message: str) -> None:
    (tmp_path / "subjects.csv").write_text(csv_text)
    with pytest.raises(ValueError, match=message):
        load_dataset(tmp_path)


def test_malformed_yaml_and_prompt_files(tmp_path: Path) -> None:
    (tmp_path / "subjects.yaml").write_text("subjects: {rex: dog}\n")
    with pytest.raises(ValueError, match="'subjects:' list"):
        load_dataset(tmp_path)
    (tmp_path / "subjects.yaml").write_text("subjects:\n  - {subject: rex, class: dog}\n")
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "bad.txt").write_text("a {token} {class_noun}\na {thing}\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: .*unknown field"):
        load_dataset(tmp_path)


def test_layout_detection_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_dataset(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="not a dataset"):
        load_dataset(tmp_path)
    (tmp_path / "subjects.csv").write_text("subject,class\n")
    (tmp_path / "subjects.yaml").write_text("subjects: []\n")
    with pytest.raises(ValueError, match="exactly one of"):
        load_dataset(tmp_path)


# --------------------------------------------------------------------------- names and prompts

@pytest.mark.parametrize("name", ["dog2", "wolf_plushie", "a.b-c", "X"])
def test_valid_subject_names(name: str) -> None:
    assert validate_subject_name(name) == name


@pytest.mark.parametrize("name", ["", "..", "../dog", "a/b", "a\\b", ".hidden", "-x", "a b",
                                  "x" * 129, "dog\n"])
def test_invalid_subject_names(name: str) -> None:
    with pytest.raises(ValueError, match="invalid subject name"):
        validate_subject_name(name)
    with pytest.raises(ValueError, match="invalid subject name"):
        Subject(name=name, class_noun="dog", kind="live", image_paths=())


def test_prompt_set_validation() -> None:
    with pytest.raises(ValueError, match="unknown field"):
        PromptSet("x", ("a {token} {colour} {class_noun}",))
    with pytest.raises(ValueError, match="lacks the {token}"):
        PromptSet("x", ("a {class_noun}",))
    with pytest.raises(ValueError, match="no templates"):
        PromptSet("x", ())
    with pytest.raises(ValueError, match="kind must be"):
        Subject(name="a", class_noun="dog", kind="animal", image_paths=())  # type: ignore


def test_builtin_prompt_sets() -> None:
    sets = {p.name: p for p in builtin_prompt_sets()}
    assert len(sets[OBJECT_PROMPTS]) == 25 and len(sets[LIVE_PROMPTS]) == 25
    assert sets[OBJECT_PROMPTS].templates != sets[LIVE_PROMPTS].templates
    assert 8 <= len(sets["style"]) <= 12
    assert sets["style"].render_plain("dog")[0] == "a watercolor painting of a dog"


# --------------------------------------------------------------------------- demo dataset

def _tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_demo_dataset_is_deterministic_and_loadable(tmp_path: Path) -> None:
    first = write_demo_dataset(tmp_path / "a", size=48, images_per_subject=4, seed=3)
    second = write_demo_dataset(tmp_path / "b", size=48, images_per_subject=4, seed=3)
    other = write_demo_dataset(tmp_path / "c", size=48, images_per_subject=4, seed=4)
    assert _tree_bytes(first) == _tree_bytes(second)
    assert _tree_bytes(first) != _tree_bytes(other)
    dataset = load_dataset(first)
    assert dataset.problems == ()
    assert {(s.name, s.class_noun) for s in dataset.subjects} == {
        ("red_ball", "ball"), ("blue_box", "box"), ("green_toy", "toy")}
    means = []
    for subject in dataset.subjects:
        assert len(subject.image_paths) == 4 and subject.mask_dir is not None
        for path in subject.image_paths:
            image = Image.open(path)
            mask = np.asarray(Image.open(subject.mask_dir / path.name))
            assert image.size == (48, 48) and image.mode == "RGB"
            assert set(np.unique(mask)) <= {0, 255}
            assert 0.08 < (mask > 0).mean() < 0.6  # an object, not empty, not the whole frame
        means.append(np.mean([np.asarray(Image.open(p)) for p in subject.image_paths],
                             axis=(0, 1, 2)))
    assert len({tuple(np.round(m)) for m in means}) == 3  # three differently coloured subjects


# --------------------------------------------------------------------------- real sample

DREAMBENCH_MINI = Path(os.environ.get(
    "EQDIFF_DREAMBENCH_MINI",
    Path(__file__).resolve().parents[3] / "shared" / "data" / "dreambench-mini"))


@pytest.mark.skipif(not DREAMBENCH_MINI.is_dir(),
                    reason=f"optional check: {DREAMBENCH_MINI} (dreambench-mini sample) is absent")
def test_real_dreambench_mini_sample() -> None:
    dataset = load_dataset(DREAMBENCH_MINI)
    assert [s.name for s in dataset.subjects] == ["backpack", "can", "dog2", "wolf_plushie"]
    assert dataset.subject("wolf_plushie").class_noun == "stuffed animal"
    assert len(dataset.prompts_for("dog2")) == 25
    assert sum(p.kind == "missing_folder" for p in dataset.problems) == 26
    assert {p.templates for p in dataset.prompt_sets if p.name != "style"} == {
        p.templates for p in builtin_prompt_sets() if p.name != "style"}
