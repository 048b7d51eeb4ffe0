"""Protocol tables, report files, the HTML sections, the store round trip and the CLI."""

from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
import typing
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from eqdiff.data.datasets import Layout
from eqdiff.evaluation.metrics import REAL_IMAGES, SCORE_COLUMNS
from eqdiff.evaluation.report import (
    DREAMBENCH_LAYOUT,
    SECTION_IDS,
    class_table,
    load_published,
    method_table,
    prompt_table,
    subject_table,
    write_report,
)
from eqdiff.evaluation.scores import load_run_scores, rebuild_report, save_scores
from eqdiff.store import open_store

CHROMIUM = Path("/usr/bin/chromium")


def _row(subject: str, class_noun: str, method: str, prompt_index: int, seed: int,
         dino: float, clip_i: float, clip_t: float, kind: str = "object") -> dict[str, object]:
    prompt = "" if method == REAL_IMAGES else f"a {class_noun} in scene {prompt_index}"
    key = (f"real/{subject}/{seed}.png" if method == REAL_IMAGES
           else f"samples/{subject}/{method}/{prompt_index:02d}_{seed}.png")
    return {"run": "r1", "subject": subject, "class": class_noun, "kind": kind, "method": method,
            "prompt": prompt, "prompt_index": prompt_index, "seed": seed, "image_key": key,
            "clip_i": clip_i, "clip_t": clip_t, "dino": dino}


def _hand_table() -> pd.DataFrame:
    """Two subjects with different image counts, so a pooled image mean differs from the
    protocol's mean over subjects."""
    rows = [
        # subject A (dog): 2 images on prompt 0  → DINO 0.3, CLIP-I 0.7, CLIP-T 0.20
        _row("a", "dog", "m", 0, 0, 0.2, 0.6, 0.10, "live"),
        _row("a", "dog", "m", 0, 1, 0.4, 0.8, 0.30, "live"),
        # subject B (toy): 4 images on prompts 0 and 1 → DINO 0.7, CLIP-I 0.9, CLIP-T 0.30
        _row("b", "toy", "m", 0, 0, 0.6, 0.9, 0.25),
        _row("b", "toy", "m", 0, 1, 0.6, 0.9, 0.25),
        _row("b", "toy", "m", 1, 0, 0.8, 0.9, 0.35),
        _row("b", "toy", "m", 1, 1, 0.8, 0.9, 0.35),
        # real-images bound rows
        _row("a", "dog", REAL_IMAGES, -1, 0, 0.9, 0.95, math.nan, "live"),
        _row("a", "dog", REAL_IMAGES, -1, 1, 0.7, 0.85, math.nan, "live"),
        _row("b", "toy", REAL_IMAGES, -1, 0, 0.5, 0.75, math.nan),
        _row("b", "toy", REAL_IMAGES, -1, 1, 0.5, 0.75, math.nan),
    ]
    return pd.DataFrame(rows, columns=list(SCORE_COLUMNS))


def test_protocol_aggregation_matches_a_hand_computed_table() -> None:
    subjects = subject_table(_hand_table())
    mine = subjects[subjects["method"] == "m"].set_index("subject")
    assert mine.loc["a", ["dino", "clip_i", "clip_t"]].tolist() == pytest.approx([0.3, 0.7, 0.2])
    assert mine.loc["b", ["dino", "clip_i", "clip_t"]].tolist() == pytest.approx([0.7, 0.9, 0.3])
    assert mine["n_images"].tolist() == [2, 4]
    methods = method_table(subjects).set_index("method")
    # mean over subjects ((0.3 + 0.7) / 2), not over the 6 pooled images (3.4 / 6)
    assert methods.loc["m", "dino"] == pytest.approx(0.5)
    assert methods.loc["m", "clip_i"] == pytest.approx(0.8)
    assert methods.loc["m", "clip_t"] == pytest.approx(0.25)
    assert methods.loc["m", "dino_sd"] == pytest.approx(0.2)
    assert methods.loc[REAL_IMAGES, "dino"] == pytest.approx((0.8 + 0.5) / 2)
    assert methods.loc[REAL_IMAGES, "clip_i"] == pytest.approx((0.9 + 0.75) / 2)
    assert math.isnan(methods.loc[REAL_IMAGES, "clip_t"])
    assert methods.loc[REAL_IMAGES, "n_scored"] == 2  # no CLIP-T is expected of real images
    assert list(methods.index) == [REAL_IMAGES, "m"]

    classes = class_table(subjects).set_index(["method", "class"])
    assert classes.loc[("m", "dog"), "dino"] == pytest.approx(0.3)
    assert classes.loc[("m", "toy"), "clip_t"] == pytest.approx(0.3)

    prompts = prompt_table(_hand_table())
    # per kind and prompt: mean over the subjects of that kind
    toy = prompts[(prompts["kind"] == "object")].set_index("prompt_index")
    assert toy.loc[0, "dino"] == pytest.approx(0.6) and toy.loc[1, "dino"] == pytest.approx(0.8)
    assert toy.loc[0, "prompt"] == "a {class} in scene 0"
    dog = prompts[prompts["kind"] == "live"].set_index("prompt_index")
    assert dog.loc[0, "clip_t"] == pytest.approx(0.2)
    assert REAL_IMAGES not in set(prompts["method"])


def test_nan_scores_and_failed_subjects_are_shown_not_dropped() -> None:
    table = _hand_table()
    table.loc[(table["subject"] == "b") & (table["prompt_index"] == 1), "dino"] = math.nan
    failures = pd.DataFrame([{"subject": "c", "method": "m", "reason": "CUDA out of memory"}])
    subjects = subject_table(table, failures).set_index(["method", "subject"])
    assert math.isnan(subjects.loc[("m", "b"), "dino"])  # no partial mean over 2 of 4 images
    assert subjects.loc[("m", "b"), "clip_t"] == pytest.approx(0.3)
    assert subjects.loc[("m", "b"), "reason"] == "2 of 4 image(s) have no DINO score"
    assert subjects.loc[("m", "c"), "reason"] == "CUDA out of memory"
    assert subjects.loc[("m", "c"), "n_images"] == 0
    methods = method_table(subjects.reset_index()).set_index("method")
    assert methods.loc["m", "n_subjects"] == 3 and methods.loc["m", "n_scored"] == 1
    assert methods.loc["m", "dino"] == pytest.approx(0.3)  # the one fully scored subject


# --------------------------------------------------------------------------- files and HTML

class _Sections(HTMLParser):
    """Section ids, the text inside each section, image sources and external references."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.text: dict[str, list[str]] = {}
        self.images: list[str] = []
        self.external: list[str] = []
        self._stack: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "section":
            self._stack.append(attributes.get("id") or "")
            self.ids.append(attributes.get("id") or "")
        if tag == "img":
            self.images.append(attributes.get("src") or "")
        if tag in ("script", "link", "iframe") or (tag == "a" and (attributes.get("href") or "")
                                                    .startswith("http")):
            self.external.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag == "section" and self._stack:
            self._stack.pop()

    def handle_data(self, data: str) -> None:
        if self._stack:
            self.text.setdefault(self._stack[-1], []).append(data)

    def section(self, name: str) -> str:
        return " ".join(self.text.get(name, []))


def _png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _image_loader(table: pd.DataFrame) -> tuple[dict[str, bytes], object]:
    rng = np.random.default_rng(0)
    images = {key: _png(tuple(int(v) for v in rng.integers(0, 256, 3)))
              for key in table["image_key"]}
    return images, images.__getitem__


def _failing_inputs() -> tuple[pd.DataFrame, pd.DataFrame]:
    table = _hand_table()
    table.loc[(table["subject"] == "b") & (table["prompt_index"] == 1), "dino"] = math.nan
    failures = pd.DataFrame([{"subject": "c", "method": "m", "reason": "CUDA out of memory"}])
    return table, failures


def test_report_files_and_html_sections(tmp_path: Path) -> None:
    table, failures = _failing_inputs()
    images, load = _image_loader(table)
    provenance = {"base model": "tiny-sd", "CLIP model": "tiny-clip", "seeds in scores": [0, 1]}
    written = write_report(table, tmp_path, failures=failures, provenance=provenance,
                           load_image=load, dataset_layout=DREAMBENCH_LAYOUT)
    assert all(p.is_file() and p.stat().st_size > 0 for p in written)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "results.parquet"), table,
                                  check_dtype=False)
    assert len(pd.read_csv(tmp_path / "results.csv")) == len(table)

    parser = _Sections()
    parser.feed((tmp_path / "report.html").read_text("utf-8"))
    assert [i for i in parser.ids if i] == list(SECTION_IDS)
    assert not parser.external  # self-contained: no scripts, stylesheets or remote links
    assert parser.images and all(src.startswith("data:image/") for src in parser.images)
    assert "not comparable" in parser.section("published").lower()
    assert "DreamBooth (SD)" in parser.section("published")
    assert "DreamBooth" not in parser.section("summary")  # others' numbers stay in their table
    assert "Fewer than two methods" in parser.section("differences")  # one method only
    failures_text = parser.section("failures")
    assert "CUDA out of memory" in failures_text and "2 of 4 image(s)" in failures_text
    assert "—" in parser.section("subjects")
    assert "tiny-sd" in parser.section("provenance")
    # grids: the real images of both subjects + one thumbnail per (method, prompt) + 2 plots
    assert len(parser.images) == 4 + (1 + 2) + 2
    assert "CUDA out of memory" in parser.section("grids")  # the failed subject's row says why

    summary = (tmp_path / "summary.md").read_text("utf-8")
    assert "Published numbers (others' runs)" in summary and "CUDA out of memory" in summary


def test_missing_images_show_as_cells_not_errors(tmp_path: Path) -> None:
    table = _hand_table()
    images, _ = _image_loader(table)
    missing = table["image_key"].iloc[0]
    del images[missing]
    write_report(table, tmp_path, load_image=images.__getitem__)
    html_text = (tmp_path / "report.html").read_text("utf-8")
    assert f'title="{missing}">image missing' in html_text


def test_names_prompts_and_reasons_are_html_escaped(tmp_path: Path) -> None:
    table = _hand_table()
    table.loc[table["subject"] == "a", "subject"] = "<b>a&amp;</b>"
    generated = table["method"] != REAL_IMAGES
    table.loc[generated, "prompt"] = table.loc[generated, "prompt"] + ' <script>x("y")</script>'
    failures = pd.DataFrame([{"subject": "<i>c</i>", "method": "m",
                              "reason": '<img src=x onerror="alert(1)">'}])
    images, _ = _image_loader(table)
    write_report(table, tmp_path, failures=failures, provenance={"<k>": "<v>"},
                 load_image=images.__getitem__)
    page = (tmp_path / "report.html").read_text("utf-8")
    for raw in ("<script", "<b>a", "<i>c", "<img src=x", "<k>", "<v>"):
        assert raw not in page
    parser = _Sections()
    parser.feed(page)
    assert not parser.external and all(src.startswith("data:image/") for src in parser.images)
    assert "<b>a&amp;</b>" in parser.section("subjects")  # shown as text, exactly
    assert '<img src=x onerror="alert(1)">' in parser.section("failures")
    assert '<script>x("y")</script>' in parser.section("grids")
    assert "<i>c</i>" in parser.section("grids") and "<k>" in parser.section("provenance")
    assert 'title="&lt;img src=x onerror=&quot;alert(1)&quot;&gt;"' in page  # tooltips too


def test_published_numbers_ship_with_the_package() -> None:
    published, note = load_published()
    assert {"method", "dino", "clip_i", "clip_t", "source"} <= set(published.columns)
    assert "not comparable" in note.lower() and len(published) > 1
    assert published["clip_t"].isna().sum() == 1  # only the real-images row lacks CLIP-T


def test_published_numbers_follow_only_a_dreambench_dataset(tmp_path: Path) -> None:
    assert DREAMBENCH_LAYOUT in typing.get_args(Layout)  # the loader's name for that layout
    for layout, shown in ((DREAMBENCH_LAYOUT, True), ("plain", False), ("", False)):
        out = tmp_path / (layout or "unknown")
        write_report(_hand_table(), out, dataset_layout=layout)
        parser = _Sections()
        parser.feed((out / "report.html").read_text("utf-8"))
        text = parser.section("published")
        summary = (out / "summary.md").read_text("utf-8")
        assert ("DreamBooth (SD)" in text) is shown and ("DreamBooth (SD)" in summary) is shown
        assert ("not shown" in text) is not shown and ("not shown" in summary) is not shown
        if not shown:
            assert "is not DreamBench" in text
    assert "loaded with the plain layout" in (tmp_path / "plain" / "report.html").read_text()


# --------------------------------------------------------------------------- store and CLI

def _stored_run(root: Path) -> None:
    store = open_store(str(root))
    table = _hand_table()
    for subject in ("a", "b"):
        save_scores(store, table[table["subject"] == subject], run_id="r1", subject=subject,
                    method="m", config_hash="abc")
    store.put_bytes("runs/r1/scores/d/m/scores.parquet", b"half written")  # no marker
    store.put_json("runs/r1/run.json", {"run_id": "r1", "base_model": "tiny-sd", "status": {
        "a/m": "done", "b/m": "done", "c/m": "failed: CUDA out of memory", "e/m": "done"}})
    images, _ = _image_loader(table)
    for key, data in images.items():
        store.put_bytes(key, data)


def test_scores_round_trip_through_the_store_with_failures(tmp_path: Path) -> None:
    _stored_run(tmp_path)
    scores, failures = load_run_scores(open_store(str(tmp_path)), "r1")
    assert len(scores) == len(_hand_table())
    reasons = dict(zip(failures["subject"], failures["reason"], strict=True))
    assert reasons == {"d": "scores incomplete: no completion marker",
                       "c": "CUDA out of memory",
                       "e": "no scores stored (stage status: done)"}


def test_subject_level_status_fails_every_method_and_done_is_ignored(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    table = _hand_table()
    save_scores(store, table[table["subject"] == "a"], run_id="r2", subject="a", method="m",
                config_hash="abc")
    store.put_json("runs/r2/run.json", {
        "run_id": "r2", "config": {"methods": [{"name": "m"}, {"name": "n"}]},
        "status": {"a": "done", "a/m": "done", "z": "failed: preprocess: 0 usable images"}})
    _, failures = load_run_scores(store, "r2")
    rows = sorted(zip(failures["subject"], failures["method"], failures["reason"], strict=True))
    assert rows == [("z", "m", "preprocess: 0 usable images"),
                    ("z", "n", "preprocess: 0 usable images")]


def test_dataset_problems_are_in_the_failures_section_and_in_no_method_row(
        tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    table = _hand_table()
    save_scores(store, table[table["subject"] == "a"], run_id="r3", subject="a", method="m",
                config_hash="abc")
    store.put_json("runs/r3/run.json", {
        "run_id": "r3", "config": {"methods": [{"name": "m"}]},
        "status": {"a": "done", "a/m": "done"},
        "dataset_problems": [{"kind": "unlisted_folder", "subject": "stray",
                              "message": "folder 'stray' is not listed in subjects.csv"}]})
    page = rebuild_report(store, "r3", tmp_path / "out")
    summary = pd.read_csv(page.parent / "summary.csv")
    assert "(dataset)" not in set(summary["method"])  # the dataset row is no method
    html = page.read_text()
    assert ">stray</td>" in html and "is not listed in subjects.csv" in html
    assert ">(dataset)</td>" in html
    # a dataset problem is no failed (subject, method) pair: the header says which is which
    assert "Every (subject, method) pair was scored." in html
    assert "pair(s) have no or incomplete" not in html
    assert "<b>1 dataset problem(s)</b>" in html


@pytest.mark.parametrize(("layout", "shown"), [(DREAMBENCH_LAYOUT, True), ("plain", False),
                                               (None, False)])
def test_the_run_record_decides_whether_published_numbers_are_shown(
        tmp_path: Path, layout: str | None, shown: bool) -> None:
    _stored_run(tmp_path)
    store = open_store(str(tmp_path))
    record = store.get_json("runs/r1/run.json")
    if layout is not None:
        record["dataset_layout"] = layout
    store.put_json("runs/r1/run.json", record)
    parser = _Sections()
    parser.feed(rebuild_report(store, "r1", tmp_path / "out").read_text("utf-8"))
    assert ("DreamBooth (SD)" in parser.section("published")) is shown
    assert ("is not DreamBench" in parser.section("published")) is not shown
    assert (layout or "not recorded") in parser.section("provenance")


def test_a_stored_report_is_current_until_its_scores_or_the_dataset_layout_change(
        tmp_path: Path) -> None:
    from eqdiff.evaluation.scores import current_report

    _stored_run(tmp_path)
    store = open_store(str(tmp_path))
    assert current_report(store, "r1") is None  # never built
    first = rebuild_report(store, "r1", tmp_path / "first")
    assert "DreamBooth (SD)" not in first.read_text("utf-8")
    assert current_report(store, "r1") == "runs/r1/report/report.html"
    record = store.get_json("runs/r1/run.json")
    store.put_json("runs/r1/run.json", {**record, "dataset_layout": DREAMBENCH_LAYOUT})
    assert current_report(store, "r1") is None  # the published numbers must now be shown
    page = rebuild_report(store, "r1", tmp_path / "second")
    assert "DreamBooth (SD)" in page.read_text("utf-8")
    assert current_report(store, "r1") == "runs/r1/report/report.html"


def test_cli_rebuilds_the_report_from_stored_scores(tmp_path: Path) -> None:
    from flows.cli import main

    _stored_run(tmp_path / "store")
    assert main(["report", "--store", str(tmp_path / "store"), "--run-id", "r1",
                 "--out", str(tmp_path / "out")]) == 0
    page = (tmp_path / "out" / "report.html").read_text("utf-8")
    stored = tmp_path / "store" / "runs" / "r1" / "report"
    assert (stored / "report.html").read_text("utf-8") == page
    assert (stored / "plots" / "fidelity_editability.png").is_file()
    assert json.loads((stored / "_SUCCESS.json").read_text())["outputs"]
    for reason in ("CUDA out of memory", "no completion marker", "tiny-sd"):
        assert reason in page


def test_rebuild_refuses_an_empty_run(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nothing to report"):
        rebuild_report(open_store(str(tmp_path)), "nothing", tmp_path / "out")


# --------------------------------------------------------------------------- browser

@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium")
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    table, failures = _failing_inputs()
    _, load = _image_loader(table)
    write_report(table, tmp_path / "report", failures=failures, load_image=load)
    shot = tmp_path / "shot.png"
    profile = tmp_path / "profile"
    profile.mkdir()
    subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={profile}", f"--screenshot={shot}",
                    "--window-size=1280,2400", "--virtual-time-budget=5000",
                    (tmp_path / "report" / "report.html").as_uri()],
                   check=True, timeout=120, capture_output=True)
    shutil.rmtree(profile, ignore_errors=True)
    with Image.open(shot) as image:
        assert image.size == (1280, 2400)
        pixels = np.asarray(image.convert("L"))
    # rendered content, not a blank page: dark text rows in the top screen and the plots below
    assert (pixels[:800] < 100).mean() > 0.005
    assert pixels.std() > 20
