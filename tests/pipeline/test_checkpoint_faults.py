"""A stored training checkpoint that cannot be resumed never fails the training stage.

Planted in the store where an interrupted training left its ``last.pt``: garbage, a pickle of
objects beyond tensors and plain values, a truncated or empty file, another structure, another
configuration, tensors of another shape, one that fails half-way into the trainer, one whose
content fails the store's checksum. Each time the stage trains from step 0, keeps the file
under its rejected key, warns with both keys and a reason of our own (never PyTorch's advice
about ``weights_only``), and lists it in its result. A good checkpoint is resumed, and the
resume is logged.
"""

from __future__ import annotations

import io
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load
from stage_setup import METHOD, StopAtStep, context, demo_subject, prepared

from eqdiff.config import method_preset
from eqdiff.data.datasets import Subject
from eqdiff.pipeline import stages
from eqdiff.pipeline.skeleton import RunContext
from eqdiff.store import ChecksumMismatchError, LocalStore, keys

STEPS = 3
REJECTED_NAME = re.compile(r"\d{8}T\d{6}\.\d{6}Z-last\.pt")

unpickled: list[str] = []


def _note_unpickled() -> None:
    unpickled.append("called")  # what unpickling this object would do; it must never run


class Payload:
    """An object a checkpoint must not hold; unpickling it would run ``_note_unpickled``."""

    def __reduce__(self):
        return _note_unpickled, ()


@pytest.fixture(scope="module")
def subject(tmp_path_factory) -> Subject:
    return demo_subject(tmp_path_factory.mktemp("data"))


def store_context(folder: Path, tiny_zoo: dict) -> RunContext:
    return context(folder, tiny_zoo, steps=STEPS, run_id="faults")


def train(ctx: RunContext, subject: Subject, **options) -> stages.StageResult:
    return stages.train(ctx, subject.name, subject.class_noun, method_preset(METHOD),
                        prior_prefix=None, **options)


def interrupted(ctx: RunContext, subject: Subject) -> str:
    """Train until step 2 is lost; the key of the checkpoint left at step 1."""
    with pytest.raises(KeyboardInterrupt):
        train(ctx, subject, callbacks=[StopAtStep(2)])
    [key] = ctx.store().list_keys(keys.checkpoints_prefix(ctx.run_id, subject.name, METHOD)
                                  + "/")
    return key


def concept_tensors(ctx: RunContext, subject: Subject) -> dict[str, torch.Tensor]:
    prefix = keys.concept_prefix(ctx.run_id, subject.name, METHOD)
    return load(ctx.store().get_bytes(prefix + "/concept.safetensors"))


def saved(state: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def real_state(good: bytes) -> dict:
    return torch.load(io.BytesIO(good), map_location="cpu", weights_only=True)


def garbage(good: bytes) -> bytes:
    return b"not a checkpoint at all\n" * 40


def pickled_objects(good: bytes) -> bytes:
    return saved({**real_state(good), "extra": Payload()})


def truncated(good: bytes) -> bytes:
    return good[:len(good) // 2]


def empty(good: bytes) -> bytes:
    return b""


def other_structure(good: bytes) -> bytes:
    return saved({"step": 1, "weights": torch.zeros(3)})


def other_configuration(good: bytes) -> bytes:
    return saved({**real_state(good), "training_hash": "0" * 16})


def kv_of_another_shape(good: bytes) -> bytes:
    state = real_state(good)
    name = next(k for k in sorted(state["learned"]) if k.startswith("eqdiff_kv."))
    return saved({**state, "learned": {**state["learned"], name: torch.zeros(1, 1)}})


def optimizer_of_another_size(good: bytes) -> bytes:
    """Right configuration and tensors, but an optimizer group short of a parameter: it fails
    after the learned tensors were copied in, so the trainer must be put back as it was."""
    state = real_state(good)
    learned = {name: t + 100.0 for name, t in state["learned"].items()}
    [group] = state["optimizer"]["param_groups"]
    optimizer = {**state["optimizer"], "param_groups": [{**group, "params": group["params"][1:]}]}
    return saved({**state, "learned": learned, "optimizer": optimizer})


FAULTS: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "garbage": (garbage, "truncated, damaged or not a PyTorch checkpoint"),
    "pickled objects": (pickled_objects, r"holds Python objects \(.*_note_unpickled\)"),
    "truncated": (truncated, "truncated, damaged or not a PyTorch checkpoint"),
    "empty": (empty, "truncated, damaged or not a PyTorch checkpoint"),
    "other structure": (other_structure, "not a training state: missing or mistyped"),
    "other configuration": (other_configuration, "another configuration"),
    "tensors of another shape": (kv_of_another_shape, "learned tensors are not this training's"),
    "half-way failure": (optimizer_of_another_size, "does not fit this training"),
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_zoo, subject) -> dict[str, torch.Tensor]:
    """The concept a training from step 0 makes: what every rejected checkpoint must give."""
    ctx = prepared(store_context(tmp_path_factory.mktemp("whole"), tiny_zoo), subject)
    train(ctx, subject)
    return concept_tensors(ctx, subject)


@pytest.fixture(scope="module")
def left_behind(tmp_path_factory, tiny_zoo, subject) -> tuple[Path, str]:
    """A store where a training was interrupted after step 2: its folder and the key of the
    checkpoint of step 1. Each test works on a copy."""
    folder = tmp_path_factory.mktemp("interrupted") / "store"
    return folder, interrupted(prepared(store_context(folder, tiny_zoo), subject), subject)


def copy_of(left_behind: tuple[Path, str], tmp_path: Path, tiny_zoo: dict
            ) -> tuple[RunContext, str]:
    folder, key = left_behind
    shutil.copytree(folder, tmp_path / "store")
    return store_context(tmp_path / "store", tiny_zoo), key


@pytest.mark.parametrize("fault", list(FAULTS))
def test_an_unusable_checkpoint_is_moved_aside_and_training_starts_afresh(
        fault, tmp_path, tiny_zoo, subject, left_behind, uninterrupted, caplog):
    make, reason = FAULTS[fault]
    ctx, key = copy_of(left_behind, tmp_path, tiny_zoo)
    store = ctx.store()
    planted = make(store.get_bytes(key))
    store.put_bytes(key, planted)

    with caplog.at_level(logging.INFO, logger="eqdiff"):
        result = train(ctx, subject)

    assert not result.skipped
    assert result.info["resumed_from_step"] == 0 and result.info["steps"] == STEPS
    [rejected] = result.info["rejected_checkpoints"]
    moved = rejected["moved_to"]
    assert rejected["key"] == key and re.search(reason, rejected["reason"])
    folder = f"runs/{ctx.run_id}/rejected/checkpoints/{subject.name}/{METHOD}/"
    assert moved.startswith(folder) and moved.split("/")[-2] == key.split("/")[-2]
    assert REJECTED_NAME.fullmatch(moved.rsplit("/", 1)[1])
    assert store.get_bytes(moved) == planted  # kept as it was, for inspection
    assert store.list_keys(keys.checkpoints_prefix(ctx.run_id, subject.name, METHOD)) == []
    assert not unpickled

    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert key in warning.getMessage() and moved in warning.getMessage()
    assert re.search(reason, warning.getMessage())
    assert "weights_only" not in caplog.text and ": resuming from step" not in caplog.text

    fresh = concept_tensors(ctx, subject)  # a clean start: the same as never interrupted
    assert fresh.keys() == uninterrupted.keys()
    assert all(torch.equal(fresh[name], uninterrupted[name]) for name in fresh)
    assert train(ctx, subject).skipped
    assert store.exists(moved)  # outlives the checkpoints' deletion


def test_a_checkpoint_failing_the_stores_checksum_is_replaced_by_a_fresh_training(
        tmp_path, tiny_zoo, subject, left_behind, uninterrupted, caplog, monkeypatch):
    ctx, key = copy_of(left_behind, tmp_path, tiny_zoo)
    get_file = LocalStore.get_file

    def failing_checksum(self, wanted, dest, **options):
        if wanted == key:
            raise ChecksumMismatchError(f"checksum mismatch for {wanted}")
        return get_file(self, wanted, dest, **options)

    monkeypatch.setattr(LocalStore, "get_file", failing_checksum)
    with caplog.at_level(logging.WARNING, logger="eqdiff"):
        result = train(ctx, subject)

    assert result.info["resumed_from_step"] == 0
    assert result.info["rejected_checkpoints"] == [{
        "key": key, "moved_to": None,
        "reason": "its content does not match the checksum the store recorded for it"}]
    [warning] = caplog.records
    assert key in warning.getMessage() and "cannot be read to keep a copy" in warning.getMessage()
    assert torch.equal(concept_tensors(ctx, subject)["eqdiff_token.vectors"],
                       uninterrupted["eqdiff_token.vectors"])


def test_a_resumed_training_logs_the_step_and_the_checkpoint(tmp_path, tiny_zoo, subject,
                                                             left_behind, caplog):
    ctx, key = copy_of(left_behind, tmp_path, tiny_zoo)
    with caplog.at_level(logging.INFO, logger="eqdiff"):
        result = train(ctx, subject)
    assert result.info["resumed_from_step"] == 1 and "rejected_checkpoints" not in result.info
    expected = f"{subject.name}/{METHOD}: resuming from step 1 of checkpoint {key}"
    assert expected in [record.getMessage() for record in caplog.records]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
