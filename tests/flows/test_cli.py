"""What ``eqdiff run`` tells the shell: the outcome per (subject, method) unit."""

import logging

import pytest

from flows.cli import EXIT_FAILED, EXIT_PARTIAL, _summarise


def record(units: dict[str, str], problems: tuple[str, ...] = ()) -> dict:
    return {"run_id": "r", "units": units, "report": None,
            "dataset_problems": [{"kind": "unlisted_folder", "subject": "x", "message": m}
                                 for m in problems]}


@pytest.mark.parametrize(("units", "code"), [
    ({"a/eqdiff": "done", "b/eqdiff": "done"}, 0),
    ({"a/eqdiff": "done", "b/eqdiff": "failed: preprocess: only 1 usable image"}, EXIT_PARTIAL),
    ({"a/eqdiff": "failed: train: lost its worker", "b/eqdiff": "failed: not run"},
     EXIT_FAILED),
])
def test_the_exit_code_is_zero_only_when_every_unit_is_done(units, code) -> None:
    assert _summarise(record(units)) == code


def test_the_summary_counts_units_and_names_dataset_problems(caplog) -> None:
    caplog.set_level(logging.INFO)
    _summarise(record({"a/eqdiff": "done", "a/custom-diffusion": "failed: train: boom"},
                      problems=("folder 'stray' is not listed in subjects.csv",)))
    text = caplog.text
    assert "1 of 2 units done" in text and "a/custom-diffusion — train: boom" in text
    assert "dataset: folder 'stray' is not listed" in text


def test_a_misspelled_override_is_refused_at_submission_with_the_closest_key() -> None:
    from pydantic import ValidationError

    from flows.params import CustomizeParams

    with pytest.raises(ValidationError, match=r"'train\.learnin_rate'; did you mean "
                                              r"'train\.learning_rate'\?"):
        CustomizeParams(overrides={"train.learnin_rate": 1e-5})
    assert CustomizeParams(overrides={"train.learning_rate": 1e-5}).overrides


def test_the_ui_form_starts_from_the_default_run() -> None:
    from prefect.utilities.callables import parameter_schema

    from flows.customize import customize_dataset

    schema = parameter_schema(customize_dataset).model_dump()["properties"]["params"]
    assert "anyOf" not in schema  # no "null" choice
    assert schema["default"]["dataset"] == "toyworld" and schema["default"]["methods"]


@pytest.mark.parametrize(("setting", "line"), [
    ("base_model=/models/not-here", "ModelLoadError: base model folder /models/not-here does "
                                    "not exist"),
    ("dataset=/data/not-here", "/data/not-here"),
])
def test_a_run_that_cannot_start_fails_in_seconds_with_one_line(prefect_server, tmp_path,
                                                                 caplog, setting, line) -> None:
    import time

    from flows.cli import EXIT_REFUSED, main

    started = time.monotonic()
    code = main(["run", "--no-server", "--set", setting, "--set", "compute=local",
                 "--set", f"storage_url={tmp_path / 'store'}"])
    assert code == EXIT_REFUSED
    assert time.monotonic() - started < 30
    errors = [r.getMessage() for r in caplog.records
              if r.levelname == "ERROR" and r.name == "eqdiff"]
    assert len(errors) == 1 and line in errors[0] and "\n" not in errors[0], errors
    assert not (tmp_path / "store" / "runs").exists()  # nothing was started
