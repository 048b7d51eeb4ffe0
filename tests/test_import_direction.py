"""Imports read top to bottom: each package imports only packages on lower floors.

    floor 5  flows/                      flows, parameters, compute plan, command line
    floor 4  tasks/                      thin Prefect tasks
    floor 3  eqdiff.pipeline  eqdiff.fixtures   stages on one skeleton | offline stand-ins
    floor 2  eqdiff.evaluation           scorers, score tables, the report
    floor 1  eqdiff.method  eqdiff.data  eqdiff.store   the algorithm | photos in | artifacts
    floor 0  eqdiff.config               the run-file schema, serialisation, hashes

Packages on one floor do not import each other. The method imports neither boto3, pandas,
prefect nor ray; only the S3 store imports boto3; nothing under eqdiff/ imports prefect or ray.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = {"eqdiff.config": 0, "eqdiff.method": 1, "eqdiff.data": 1, "eqdiff.store": 1,
          "eqdiff.evaluation": 2, "eqdiff.pipeline": 3, "eqdiff.fixtures": 3, "tasks": 4,
          "flows": 5}
FORBIDDEN = {
    "eqdiff": {"prefect", "prefect_ray", "ray", "tasks", "flows"},
    "eqdiff/method": {"boto3", "botocore", "pandas"},
    "tasks": {"flows"},
}
BOTO3_ONLY_IN = {"eqdiff/store/s3.py"}


def package_of(module: str) -> str | None:
    """The floor-table entry a module belongs to (``eqdiff.method.training.trainer`` ->
    ``eqdiff.method``), or None for third-party modules."""
    parts = module.split(".")
    for length in (2, 1):
        name = ".".join(parts[:length])
        if name in FLOORS:
            return name
    return None


def module_of(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def project_imports(path: Path) -> set[str]:
    """Absolute project modules imported anywhere in the file (functions included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def python_files() -> list[Path]:
    """Every module of the three packages but ``eqdiff/__init__.py`` (which imports nothing)."""
    return sorted(p for folder in ("eqdiff", "tasks", "flows")
                  for p in (ROOT / folder).rglob("*.py") if p != ROOT / "eqdiff" / "__init__.py")


def test_the_package_root_imports_nothing_of_the_project() -> None:
    assert not {package_of(name) for name in project_imports(ROOT / "eqdiff" / "__init__.py")
                } - {None}


def test_every_project_module_has_a_floor() -> None:
    homeless = [str(p.relative_to(ROOT)) for p in python_files()
                if package_of(module_of(p)) is None]
    assert not homeless, f"modules outside the floor table: {homeless}"


def test_imports_only_point_down() -> None:
    upward = []
    for path in python_files():
        here = package_of(module_of(path))
        for name in project_imports(path):
            there = package_of(name)
            if there is None or there == here:
                continue
            if FLOORS[there] >= FLOORS[here]:
                upward.append(f"{path.relative_to(ROOT)} ({here}, floor {FLOORS[here]}) imports "
                              f"{name} ({there}, floor {FLOORS[there]})")
    assert not upward, "imports must point down:\n" + "\n".join(upward)


def imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_keeps_out_of_forbidden_imports(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no python files under {package}/"
    offenders = {
        str(f.relative_to(ROOT)): sorted(imported_top_levels(f) & FORBIDDEN[package])
        for f in files
    }
    offenders = {f: bad for f, bad in offenders.items() if bad}
    assert not offenders, f"{package}/ must not import {sorted(FORBIDDEN[package])}: {offenders}"


def test_only_the_s3_store_imports_boto3() -> None:
    importers = {str(p.relative_to(ROOT)) for p in python_files()
                 if imported_top_levels(p) & {"boto3", "botocore"}}
    assert importers == BOTO3_ONLY_IN


def test_the_floor_checker_catches_an_upward_import() -> None:
    assert package_of("eqdiff.method.training.trainer") == "eqdiff.method"
    assert package_of("eqdiff.config") == "eqdiff.config"
    assert package_of("torch.nn") is None
    assert FLOORS[package_of("eqdiff.pipeline.stages")] > FLOORS[package_of("eqdiff.store.keys")]


def test_checker_sees_nested_and_from_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    import ray.util\n    from prefect.tasks import task\n")
    assert {"ray", "prefect"} <= imported_top_levels(sample)


def test_the_command_line_loads_prefect_only_after_the_server_is_known():
    """Prefect fixes its settings at first import and prefect-ray hands them to Ray workers,
    so the CLI must not import it before ``ensure_server`` sets ``PREFECT_API_URL``."""
    import subprocess
    import sys

    code = ("import sys, flows.cli, flows.server, flows.params; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'ray')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
