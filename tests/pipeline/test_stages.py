"""The stages run directly on a local folder store: no Prefect, no Ray, tiny offline models.

What matters about a stage: it writes its outputs and a marker last, a rerun skips it and loads
nothing, a changed input redoes exactly the stages it reaches, a stage whose input is not done
says which, and a bad subject fails without leaving a marker.
"""

from __future__ import annotations

import pytest
from stage_setup import METHOD, PROMPTS, StopAtStep, context, demo_subject, prepared

from eqdiff.config import method_preset, with_overrides
from eqdiff.data.datasets import Subject, load_dataset
from eqdiff.fixtures.demo_data import write_demo_dataset
from eqdiff.pipeline import stages
from eqdiff.pipeline.skeleton import RunContext, StageFailed, UpstreamNotDone
from eqdiff.store import keys
from eqdiff.store.keys import MARKER_NAME


def never_called():
    raise AssertionError("a finished stage must not load a model")


@pytest.fixture(scope="module")
def subject(tmp_path_factory) -> Subject:
    return demo_subject(tmp_path_factory.mktemp("data"))


def scorers_of(ctx: RunContext):
    from eqdiff.evaluation.metrics import CLIPScorer, DINOScorer

    made = []

    def make():
        evaluation = ctx.config.eval
        made.append(1)
        return (CLIPScorer(evaluation.clip_model, evaluation.clip_pretrained, device="cpu"),
                DINOScorer(evaluation.dino_model, device="cpu"))

    return make, made


def generator_of(ctx: RunContext):
    from eqdiff.method.sampling import ConceptGenerator

    def make():
        return ConceptGenerator.from_pretrained(ctx.base_model, ctx.config.sample,
                                                ctx.config.rra, device="cpu",
                                                local_files_only=True)

    return make


def run_all(ctx: RunContext, subject: Subject, prompts: list[str]) -> dict:
    """Every stage once, in the flow's order; what each returned."""
    method = ctx.config.method(METHOD)
    done = {"ingest": stages.ingest(ctx, subject, PROMPTS),
            "preprocess": stages.preprocess(ctx, subject.name),
            "masks": stages.extract_masks(ctx, subject.name),
            "priors": stages.class_priors(ctx, subject.class_noun)}
    done["train"] = stages.train(ctx, subject.name, subject.class_noun, method,
                                 prior_prefix=done["priors"].prefix)
    done["generate"] = stages.generate(ctx, generator_of(ctx), subject.name, METHOD, prompts)
    make_scorers, made = scorers_of(ctx)
    done["score"] = stages.score(ctx, make_scorers, subject.name, [METHOD])
    done["scorers_loaded"] = len(made)
    return done


def test_stages_write_markers_then_skip_and_redo_only_what_a_change_reaches(
        tmp_path, tiny_zoo, subject):
    ctx = context(tmp_path / "store", tiny_zoo)
    prompts = [f"a photo of {ctx.config.train.placeholder_token} {subject.class_noun}"]
    first = run_all(ctx, subject, prompts)
    assert not any(first[name].skipped for name in ("ingest", "preprocess", "masks", "priors",
                                                    "train", "generate", "score"))
    assert first["preprocess"].info["images"] == 3
    store = ctx.store()
    for name in ("ingest", "preprocess", "masks", "priors", "train", "generate"):
        record = store.read_marker(first[name].prefix)
        assert record is not None and record.outputs, name
        assert all(o.key.startswith(first[name].prefix + "/") for o in record.outputs)
        assert not any(o.key.endswith(MARKER_NAME) for o in record.outputs)

    # a rerun: everything skipped, no model loaded, same facts back
    again = stages.generate(ctx, never_called, subject.name, METHOD, prompts)
    assert again.skipped
    rerun = run_all(ctx, subject, prompts)
    assert all(rerun[name].skipped for name in ("ingest", "preprocess", "masks", "priors",
                                                "train", "generate", "score"))
    assert rerun["preprocess"].info == first["preprocess"].info
    assert rerun["scorers_loaded"] == 0

    # other prompts: everything up to the concept stays, generation and scoring are redone
    other = run_all(ctx, subject, [*prompts, f"{prompts[0]} on the beach"])
    assert all(other[n].skipped for n in ("preprocess", "masks", "priors", "train"))
    assert not other["generate"].skipped and other["generate"].info["images"] == 2
    assert other["score"].info["scored"] == [METHOD]  # the real photos' scores stay


def concept_tensors(ctx: RunContext, subject: Subject) -> dict:
    from safetensors.torch import load

    key = keys.concept_prefix(ctx.run_id, subject.name, METHOD) + "/concept.safetensors"
    return load(ctx.store().get_bytes(key))


def test_an_interrupted_training_resumes_from_its_stored_checkpoint(tmp_path, tiny_zoo, subject):
    """Resume through the store equals an uninterrupted run, and leaves no checkpoint behind."""
    import torch

    method = method_preset(METHOD)
    whole = prepared(context(tmp_path / "whole", tiny_zoo, steps=3), subject)
    stages.train(whole, subject.name, subject.class_noun, method, prior_prefix=None)

    ctx = prepared(context(tmp_path / "interrupted", tiny_zoo, steps=3), subject)
    with pytest.raises(KeyboardInterrupt):
        stages.train(ctx, subject.name, subject.class_noun, method, prior_prefix=None,
                     callbacks=[StopAtStep(2)])
    checkpoints = keys.checkpoints_prefix(ctx.run_id, subject.name, METHOD)
    assert len(ctx.store().list_keys(checkpoints + "/")) == 1
    resumed = stages.train(ctx, subject.name, subject.class_noun, method, prior_prefix=None)
    assert resumed.info["resumed_from_step"] == 1 and resumed.info["steps"] == 3
    assert ctx.store().list_keys(checkpoints + "/") == []
    expected, got = concept_tensors(whole, subject), concept_tensors(ctx, subject)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_checkpoint_of_other_settings_is_never_resumed(tmp_path, tiny_zoo, subject):
    """Rerunning a run id with other training settings starts afresh and says what it ignored
    (it used to fail every concept on the old run's checkpoint)."""
    method = method_preset(METHOD)
    ctx = prepared(context(tmp_path / "store", tiny_zoo, steps=3), subject)
    with pytest.raises(KeyboardInterrupt):
        stages.train(ctx, subject.name, subject.class_noun, method, prior_prefix=None,
                     callbacks=[StopAtStep(2)])
    checkpoints = keys.checkpoints_prefix(ctx.run_id, subject.name, METHOD)
    [left] = ctx.store().list_keys(checkpoints + "/")
    longer = context(tmp_path / "store", tiny_zoo, steps=4)
    result = stages.train(longer, subject.name, subject.class_noun, method, prior_prefix=None)
    assert not result.skipped and result.info["resumed_from_step"] == 0
    assert result.info["steps"] == 4 and result.info["ignored_checkpoints"] == [left]
    assert ctx.store().list_keys(checkpoints + "/") == []
    again = stages.train(longer, subject.name, subject.class_noun, method, prior_prefix=None)
    assert again.skipped


def test_a_stage_names_the_input_that_is_not_done(tmp_path, tiny_zoo, subject):
    ctx = context(tmp_path / "store", tiny_zoo)
    with pytest.raises(UpstreamNotDone, match="ingest"):
        stages.preprocess(ctx, subject.name)
    stages.ingest(ctx, subject, PROMPTS)
    with pytest.raises(UpstreamNotDone, match="preprocess"):
        stages.extract_masks(ctx, subject.name)
    with pytest.raises(UpstreamNotDone, match="masks"):
        stages.train(ctx, subject.name, subject.class_noun, ctx.config.method(METHOD),
                     prior_prefix=None)
    with pytest.raises(UpstreamNotDone, match="concept"):
        stages.generate(ctx, never_called, subject.name, METHOD, ["a photo"])


def test_a_subject_without_usable_photos_fails_and_leaves_no_marker(tmp_path, tiny_zoo):
    broken = tmp_path / "broken"
    broken.mkdir()
    for index in range(3):
        (broken / f"{index:02d}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    subject = Subject("broken", "cup", "object", tuple(sorted(broken.glob("*.jpg"))))
    ctx = context(tmp_path / "store", tiny_zoo)
    stages.ingest(ctx, subject, PROMPTS)
    with pytest.raises(StageFailed, match="broken"):
        stages.preprocess(ctx, subject.name)
    assert ctx.store().list_keys(keys.preprocess_prefix(ctx.run_id, "broken")) == []


def test_after_ingest_no_stage_opens_the_dataset_folder(tmp_path, tiny_zoo):
    """The stages after ingest read the store's copy: with the dataset folder gone (a worker
    node that cannot see it), preprocessing, provided masks and training still run, and a
    second run over the same photos uploads nothing."""
    root = write_demo_dataset(tmp_path / "data", size=64, images_per_subject=3)
    subject = load_dataset(root).subjects[0]  # the demo draws a mask for every photo
    assert subject.mask_dir is not None
    ctx = context(tmp_path / "store", tiny_zoo)
    ctx = RunContext(ctx.run_id, with_overrides(ctx.config, {"masks.extractor": "provided"}))
    first = stages.ingest(ctx, subject, PROMPTS)
    assert first.info == {"photos": 3, "masks": 3, "uploaded": 6}
    hidden = root.rename(tmp_path / "out-of-sight")

    assert stages.preprocess(ctx, subject.name).info["images"] == 3
    masks = stages.extract_masks(ctx, subject.name)
    assert masks.info["extractors"] == ["provided"]
    stages.train(ctx, subject.name, subject.class_noun, ctx.config.method(METHOD),
                 prior_prefix=None)
    assert ctx.store().is_done(keys.concept_prefix(ctx.run_id, subject.name, METHOD))

    # the same photos under another run id: the record is new, the files are already stored
    hidden.rename(root)
    second = stages.ingest(RunContext("other-run", ctx.config), subject, PROMPTS)
    assert not second.skipped and second.info["uploaded"] == 0


def test_the_masks_stage_never_stores_an_empty_mask(tmp_path, tiny_zoo):
    """A user mask that is empty is replaced by the fallback's (here the full mask): the stored
    mask is not empty, the marker counts the fallback and its warning names the photo."""
    from PIL import Image

    from eqdiff.data.masks import decode_mask_png
    from eqdiff.pipeline.store_io import subject_tensors

    subject = demo_subject(tmp_path / "data")
    emptied = subject.image_paths[1].stem
    Image.new("L", (64, 64), 0).save(subject.mask_dir / f"{emptied}.png")
    ctx = context(tmp_path / "store", tiny_zoo)
    ctx = RunContext(ctx.run_id, with_overrides(ctx.config, {"masks.extractor": "provided",
                                                             "masks.fallback": "full"}))
    stages.ingest(ctx, subject, PROMPTS)
    stages.preprocess(ctx, subject.name)
    masks = stages.extract_masks(ctx, subject.name)
    assert masks.info["extractors"] == ["full", "provided"] and masks.info["fallbacks"] == 1
    assert masks.info["warnings"] == [f"{emptied}: provided mask is empty: used the full mask"]
    store = ctx.store()
    assert store.read_marker(masks.prefix).info["fallbacks"] == 1
    for path in subject.image_paths:
        mask, _ = decode_mask_png(store.get_bytes(keys.join_key(masks.prefix, f"{path.stem}.png")))
        assert mask.any() and mask.all() == (path.stem == emptied), path.stem
    _, tensors = subject_tensors(store, ctx.run_id, subject.name)
    assert (tensors.flatten(1).amax(dim=1) > 0.5).all()


def test_the_plan_finds_done_exactly_what_the_stages_would_skip(tmp_path, tiny_zoo, subject):
    """The plan computes each stage's digest from the dataset and settings alone: before a
    run every step is to run, after it every step is done, and a changed setting marks to run
    exactly the stages that would redo their work."""
    from eqdiff.evaluation.metrics import REAL_IMAGES
    from eqdiff.pipeline.plan import DONE, TO_RUN, plan_run

    ctx = context(tmp_path / "store", tiny_zoo)
    prompts = [f"a photo of {ctx.config.train.placeholder_token} {subject.class_noun}"]
    unit = f"{subject.name}/{METHOD}"

    def plan(ctx, prompts):
        return plan_run(ctx, [subject], {subject.name: PROMPTS}, {subject.name: prompts})

    before = plan(ctx, prompts)
    assert not before.all_done and len(before.to_run()) == len(before.steps) == 8
    run_all(ctx, subject, prompts)
    after = plan(ctx, prompts)
    assert after.all_done and after.unit_done(unit)
    assert after.table()[0] == {"subject": subject.name, "method": METHOD, "ingest": DONE,
                                "preprocess": DONE, "masks": DONE, "priors": DONE,
                                "train": DONE, "generate": DONE, "score": DONE, "last run": ""}
    # the marker's facts come with a done step (the preprocessing's photo count)
    assert after.step("preprocess", subject.name).info["images"] == 3

    other_prompts = plan(ctx, [*prompts, f"{prompts[0]} on the beach"])
    assert {(s.stage, s.item) for s in other_prompts.to_run()} == {("generate", unit),
                                                                    ("score", unit)}
    other_masks = with_overrides(ctx.config, {"masks.extractor": "full"})
    changed = plan(RunContext(ctx.run_id, other_masks), prompts)
    assert {(s.stage, s.item) for s in changed.to_run()} == {
        ("masks", subject.name), ("train", unit), ("generate", unit), ("score", unit)}
    assert changed.step("score", f"{subject.name}/{REAL_IMAGES}").done  # the photos stay
    assert changed.table()[0]["masks"] == TO_RUN


def test_a_stored_concept_generates_from_the_command_line(tmp_path, tiny_zoo, subject):
    """`eqdiff concept generate` on a concept a run stored: the base model from a local folder
    (no download allowed by default), one image per prompt, named by prompt and k."""
    from eqdiff.pipeline.store_io import download_prefix
    from flows.cli import main

    ctx = prepared(context(tmp_path / "store", tiny_zoo), subject)
    stages.train(ctx, subject.name, subject.class_noun, ctx.config.method(METHOD),
                 prior_prefix=None)
    concept = download_prefix(ctx.store(), keys.concept_prefix(ctx.run_id, subject.name,
                                                                METHOD), tmp_path / "concept")
    out = tmp_path / "generated"
    assert main(["concept", "generate", str(concept), "--base-model", str(tiny_zoo["base"]),
                 "-p", "a {token} {class_noun} on the beach", "-p", "a {token} {class_noun}",
                 "--images", "1", "--steps", "2", "--resolution", "64", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00_0.png", "01_0.png"]
