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
                                              r"'train\.learning_rate'"):
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


def _one_error(caplog) -> str:
    errors = [r.getMessage() for r in caplog.records
              if r.levelname == "ERROR" and r.name == "eqdiff"]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    return errors[0]


TINY = ["--set", "dataset=demo", "--set", "base_model=tiny", "--set", "steps=2",
        "--set", "methods=[custom-diffusion]", "--set", "images_per_prompt=1",
        "--set", "max_prompts=1", "--set", "compute=local",
        "--set", "train.num_prior_images=2", "--set", "sample.steps=2"]


def test_mistakes_in_a_run_are_refused_in_one_line_before_any_server_or_flow(tmp_path,
                                                                             caplog) -> None:
    """No Prefect server is given (no fixture): the refusal comes from the pre-flight."""
    from flows.cli import EXIT_REFUSED, main

    store = ["--set", f"storage_url={tmp_path / 'store'}"]
    assert main(["run", *TINY, *store, "--set", "train.stpes=3"]) == EXIT_REFUSED
    assert "'train.stpes'; did you mean 'train.steps'" in _one_error(caplog)
    caplog.clear()
    assert main(["run", *TINY, *store, "--set", "subjects=[red_ball, blu_box]"]) == EXIT_REFUSED
    line = _one_error(caplog)
    assert "no subject 'blu_box' (did you mean 'blue_box'?)" in line
    assert "its subjects: blue_box, green_toy, red_ball" in line
    caplog.clear()
    assert main(["run", *TINY, *store, "--set", "stepz=3"]) == EXIT_REFUSED
    assert "stepz: unknown parameter" in _one_error(caplog)
    assert not (tmp_path / "store" / "runs").exists()


def test_plan_and_status_show_each_stage_of_each_unit(prefect_server, tmp_path, capsys,
                                                      monkeypatch) -> None:
    """``eqdiff plan`` before a run: every stage to run. After the run, ``eqdiff status``:
    every stage done, with the unit's outcome; a rerun finds nothing to do and neither starts
    nor joins Ray, although it asks for Ray."""
    import flows.customize
    from flows.cli import EXIT_REFUSED, main

    store = str(tmp_path / "store")
    run = [*TINY, "--set", f"storage_url={store}", "--set", "subjects=[red_ball]",
           "--set", "run_id=planned"]
    assert main(["plan", *run]) == 0
    before = " ".join(capsys.readouterr().out.split())
    assert "run planned: 0 of 1 (subject, method) units done, 8 step(s) to run" in before
    assert "red_ball custom-diffusion" + " to run" * 7 in before
    assert not (tmp_path / "store" / "runs").exists()  # planning writes nothing

    assert main(["run", "--no-server", *run]) == 0
    capsys.readouterr()
    assert main(["status", "planned", "--store", store]) == 0
    after = " ".join(capsys.readouterr().out.split())
    assert "run planned: 1 of 1 (subject, method) units done, 0 step(s) to run" in after
    assert "red_ball custom-diffusion" + " done" * 7 + " done" in after  # and the last run

    def no_compute(params, ctx):
        raise AssertionError("a finished run must not start or join Ray")

    monkeypatch.setattr(flows.customize, "compute_for", no_compute)
    assert main(["run", "--no-server", *run, "--set", "compute=ray"]) == 0
    assert main(["status", "nothing-here", "--store", store]) == EXIT_REFUSED


def test_the_pre_flight_leaves_prefect_unimported() -> None:
    """Prefect fixes its server address when first imported: a pre-flight that imported it
    before `eqdiff run` starts or finds the server sent the flow to a temporary server."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; from flows.cli import _params, _preflight; "
            "_preflight(_params({'dataset': 'demo', 'base_model': 'tiny'})); "
            "print('prefect' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).parents[2], timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False"
