"""Imports go one way: flows → tasks → eqdiff. eqdiff never imports prefect or ray."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "eqdiff": {"prefect", "prefect_ray", "ray", "tasks", "flows"},
    "tasks": {"flows"},
}


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
def test_package_imports_only_downstream(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no python files under {package}/"
    offenders = {
        str(f.relative_to(ROOT)): sorted(imported_top_levels(f) & FORBIDDEN[package])
        for f in files
    }
    offenders = {f: bad for f, bad in offenders.items() if bad}
    assert not offenders, f"{package}/ must not import {sorted(FORBIDDEN[package])}: {offenders}"


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
