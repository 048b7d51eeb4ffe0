"""How ``eqdiff run`` handles bad inputs: exit code, the line it shows, seconds, what it wrote.

Each case runs the real command line (``python -m flows.cli run --no-server -c run.yaml --set
...``) in a subprocess with a timeout, against a fresh temporary store folder and a fresh
workdir (``HOME`` points at a new folder, so ``~/.cache/eqdiff`` and the Hugging Face cache
start empty). The shared settings (tiny offline models, ``compute=local``, one method, 2 steps,
one prompt, one image) are in the case's ``run.yaml``; the bad input is in the case's ``--set``
options or in the dataset folder it builds. Nothing is asserted: the script records what
happens, including ``run.json`` (dataset problems, failures, units) and each subject's
preprocessing manifest (rejected photos) when the run wrote them.

    .venv/bin/python bench/bad_inputs.py --out bench/results/bad_inputs.json
    .venv/bin/python bench/bad_inputs.py --cases misspelled_override corrupt_image --timeout 300
    .venv/bin/python bench/bad_inputs.py --list

Prefect: by default one Prefect server is started for all cases (temporary home, free port),
as a user with ``eqdiff server start`` running has; ``--prefect temporary`` lets each command
start Prefect's temporary server instead (about 15 s more per case that reaches the flow),
``--prefect env`` uses ``PREFECT_API_URL`` as set.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image

from eqdiff.evaluation.scores import package_versions

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "prefect", "ray", "diffusers", "transformers", "pydantic", "boto3",
            "pillow")
METHOD = "custom-diffusion"  # one method: half the training and sampling of the default pair
BASE_SETTINGS = {"base_model": "tiny", "compute": "local", "steps": 2, "images_per_prompt": 1,
                 "max_prompts": 1, "methods": [METHOD],
                 "overrides": {"train.num_prior_images": 2, "sample.steps": 2}}
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<level>[A-Z]+) "
                      r"(?P<logger>[\w.]+): (?P<message>.*)$")
PREFECT_CONSOLE_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} \| ")
TAIL_LINES = 40


# --------------------------------------------------------------------------- case inputs

@dataclass
class Case:
    """What one case passes: ``--set`` options, run-file lines, environment, store URL."""

    sets: list[str] = field(default_factory=list)
    run_file: dict[str, object] = field(default_factory=dict)  # added to BASE_SETTINGS
    env: dict[str, str] = field(default_factory=dict)
    store_url: str = ""  # default: the case's fresh store folder
    note: str = ""


def _demo(root: Path, keep: tuple[str, ...] = ("red_ball",), images: int = 3) -> Path:
    """The demo dataset (64 px, ``images`` photos per subject) cut to the ``keep`` subjects."""
    from eqdiff.fixtures.demo_data import DEMO_CLASSES, write_demo_dataset

    write_demo_dataset(root, images_per_subject=images)
    for name in DEMO_CLASSES:
        if name not in keep:
            shutil.rmtree(root / name)
    _index(root, [(name, DEMO_CLASSES[name]) for name in keep])
    return root


def _index(root: Path, rows: list[tuple[str, str]]) -> None:
    with (root / "subjects.csv").open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([("subject", "class"), *rows])


def _photo(root: Path, index: int = 0) -> Image.Image:
    return Image.open(root / "red_ball" / f"{index:02d}.png").convert("RGB")


def _dataset(tmp: Path, build: Callable[[Path], object]) -> Case:
    root = _demo(tmp / "dataset")
    build(root)
    return Case(sets=[f"dataset={root}"])


def _corrupt(path: Path, seed: int = 0) -> None:
    path.write_bytes(np.random.default_rng(seed).bytes(4096))


def _png16(root: Path) -> None:
    grey = np.asarray(_photo(root).convert("L"), dtype=np.uint16) * 257
    Image.fromarray(grey).save(root / "red_ball" / "10_16bit.png")  # uint16: mode I;16


def _gif(root: Path) -> None:
    frames = [_photo(root, i).convert("P", palette=Image.Palette.ADAPTIVE) for i in (1, 2)]
    frames[0].save(root / "red_ball" / "10_animated.gif", save_all=True,
                   append_images=frames[1:], duration=200, loop=0)


def _near_blank(root: Path) -> None:
    noise = np.random.default_rng(0).integers(-1, 2, (64, 64, 3))
    Image.fromarray((128 + noise).astype(np.uint8)).save(root / "red_ball" / "10_blank.png")


def _duplicates(root: Path) -> None:
    folder = root / "red_ball"
    shutil.copyfile(folder / "00.png", folder / "10_copy.png")  # same bytes
    _photo(root, 1).save(folder / "01.jpg", quality=95)  # same stem as 01.png


def _cmyk(root: Path) -> None:
    _photo(root).convert("CMYK").save(root / "red_ball" / "10_cmyk.jpg", quality=95)


def _palette(root: Path) -> None:
    _photo(root).convert("P", palette=Image.Palette.ADAPTIVE).save(
        root / "red_ball" / "10_palette.png")


def _unicode_folder(root: Path) -> None:
    (root / "red_ball").rename(root / "café cup ☕")
    _index(root, [("café cup ☕", "cup")])


def _all_bad(root: Path) -> None:
    broken = root / "broken_cup"
    broken.mkdir()
    _corrupt(broken / "00.jpg")
    (broken / "01.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (broken / "02.png").write_bytes((root / "red_ball" / "00.png").read_bytes()[:200])  # truncated
    Image.new("RGB", (64, 64), (200, 200, 200)).save(broken / "03.png")  # blank
    _index(root, [("red_ball", "ball"), ("broken_cup", "cup")])


def _listed_without_folder(root: Path) -> None:
    _index(root, [("red_ball", "ball"), ("ghost", "cup")])


def _unlisted_folder(root: Path) -> None:
    shutil.copytree(root / "red_ball", root / "stray")


CaseBuilder = Callable[[Path], Case]
CASES: dict[str, CaseBuilder] = {
    # settings refused before the flow starts
    "misspelled_override": lambda tmp: Case(sets=["dataset=demo", "train.stpes=3"]),
    "misspelled_override_mapping": lambda tmp: Case(
        sets=["dataset=demo",
              "overrides={train.num_prior_images: 2, sample.steps: 2, train.stpes: 3}"]),
    "misspelled_key_in_run_file": lambda tmp: Case(sets=["dataset=demo"],
                                                    run_file={"stpes": 3}),
    # the dataset, the base model, the store
    "missing_dataset_folder": lambda tmp: Case(sets=[f"dataset={tmp / 'no-such-dataset'}"]),
    "missing_base_model_path": lambda tmp: Case(
        sets=["dataset=demo", f"base_model={tmp / 'no-such-model'}"]),
    "base_model_not_cached": lambda tmp: Case(sets=["dataset=demo",
                                                    "base_model=nobody/nothing"]),
    "s3_unreachable": lambda tmp: Case(
        sets=["dataset=demo", "s3_endpoint_url=http://127.0.0.1:9"],
        store_url="s3://bad-inputs-bench/store", env=FAKE_AWS,
        note="fake AWS credentials; nothing listens on port 9"),
    "store_is_file": lambda tmp: Case(sets=["dataset=demo"], store_url="FILE"),
    "store_not_writable": lambda tmp: Case(
        sets=["dataset=demo"], store_url="READONLY",
        note="folder mode 0555; root ignores it (see machine.euid)"),
    # subjects the dataset does not have
    "subjects_one_unknown": lambda tmp: Case(sets=["dataset=demo",
                                                   "subjects=[red_ball, doggo]"]),
    "subjects_all_unknown": lambda tmp: Case(sets=["dataset=demo", "subjects=[doggo, kitty]"]),
    # the index and the folders disagree
    "listed_subject_without_folder": lambda tmp: _dataset(tmp, _listed_without_folder),
    "folder_not_listed": lambda tmp: _dataset(tmp, _unlisted_folder),
    # photos (each added to 3 good ones, except all_photos_bad)
    "corrupt_image": lambda tmp: _dataset(tmp, lambda root: _corrupt(root / "red_ball"
                                                                     / "10_corrupt.jpg")),
    "png_16bit": lambda tmp: _dataset(tmp, _png16),
    "gif_animated": lambda tmp: _dataset(tmp, _gif),
    "near_blank_image": lambda tmp: _dataset(tmp, _near_blank),
    "unicode_folder": lambda tmp: _dataset(tmp, _unicode_folder),
    "duplicates": lambda tmp: _dataset(tmp, _duplicates),
    "all_photos_bad": lambda tmp: _dataset(tmp, _all_bad),
    "cmyk_jpeg": lambda tmp: _dataset(tmp, _cmyk),
    "palette_png": lambda tmp: _dataset(tmp, _palette),
}
DESCRIPTIONS = {
    "misspelled_override": "--set train.stpes=3",
    "misspelled_override_mapping": "--set overrides={..., train.stpes: 3}",
    "misspelled_key_in_run_file": "run.yaml has stpes: 3",
    "missing_dataset_folder": "dataset= a folder that does not exist",
    "missing_base_model_path": "base_model= a folder that does not exist",
    "base_model_not_cached": "base_model=nobody/nothing (empty HF cache)",
    "s3_unreachable": "storage_url=s3://..., s3_endpoint_url=http://127.0.0.1:9",
    "store_is_file": "storage_url= a file",
    "store_not_writable": "storage_url= a folder with mode 0555",
    "subjects_one_unknown": "subjects=[red_ball, doggo] (demo)",
    "subjects_all_unknown": "subjects=[doggo, kitty] (demo)",
    "listed_subject_without_folder": "subjects.csv lists ghost, no ghost/ folder",
    "folder_not_listed": "folder stray/ not in subjects.csv",
    "corrupt_image": "3 good photos + 4 KB of random bytes named .jpg",
    "png_16bit": "3 good photos + a 16-bit greyscale PNG",
    "gif_animated": "3 good photos + a 2-frame GIF",
    "near_blank_image": "3 good photos + a uniform grey (±1) PNG",
    "unicode_folder": "the subject folder is 'café cup ☕'",
    "duplicates": "3 good photos + a byte copy + 01.jpg next to 01.png",
    "all_photos_bad": "red_ball + broken_cup (corrupt, fake, truncated, blank photos)",
    "cmyk_jpeg": "3 good photos + a CMYK JPEG",
    "palette_png": "3 good photos + a palette (P mode) PNG",
}


# --------------------------------------------------------------------------- one case

def _stderr_line(stderr: str) -> tuple[str, str]:
    """The line that explains the outcome, and where it came from.

    A message printed after the last log line (a ``SystemExit`` text, a traceback) wins: its
    last line, skipping pydantic's "For further information visit" links. Otherwise the last
    ERROR line of the ``eqdiff`` logger, then its last WARNING, then its last INFO line (its
    "N of M units done" summary if there is one), then the last non-empty line.
    """
    lines = [line.rstrip() for line in stderr.splitlines() if line.strip()]
    last_log = max((i for i, line in enumerate(lines)
                    if LOG_LINE.match(line) or PREFECT_CONSOLE_LINE.match(line)), default=-1)
    trailing = [line for line in lines[last_log + 1:]
                if not line.strip().startswith("For further information visit")]
    if trailing:
        return trailing[-1].strip(), "message after the log"
    logged = [m for m in map(LOG_LINE.match, lines) if m and m["logger"] == "eqdiff"]
    for level in ("ERROR", "WARNING", "INFO"):
        found = [m["message"].strip() for m in logged if m["level"] == level]
        summary = [line for line in found if "units done" in line]
        if found:
            return (summary or found)[-1], f"last eqdiff {level}"
    return (lines[-1].strip(), "last line") if lines else ("", "no output")


def _logged_problems(stderr: str, limit: int = 15) -> list[str]:
    """WARNING and ERROR lines of every logger (``logger: message``), first seen first."""
    found: list[str] = []
    for match in map(LOG_LINE.match, stderr.splitlines()):
        if match and match["level"] in ("WARNING", "ERROR"):
            line = f"{match['level']} {match['logger']}: {match['message'].strip()}"[:300]
            if line not in found:
                found.append(line)
    return found[:limit]


def _store_files(store: Path) -> list[str]:
    if not store.is_dir():
        return []
    return sorted(p.relative_to(store).as_posix() for p in store.rglob("*") if p.is_file())


def _summarise_store(files: list[str], store_url: str) -> str:
    if store_url.startswith("s3://"):
        return "not listed (S3 store)"
    if not files:
        return "nothing"
    parts = [f for f in files if re.fullmatch(r"runs/[^/]+/run\.json", f)]
    markers = sum(f.endswith("/_SUCCESS.json") for f in files)
    leases = [f for f in files if "_LEASE.json" in f.rsplit("/", 1)[-1]]  # with lock leftovers
    others = len(files) - len(parts) - markers - len(leases)
    parts += leases
    if markers:
        parts.append(f"{markers} markers")
    if others:
        tops = ", ".join(f"{k} {v}" for k, v in sorted(Counter(f.split("/")[0]
                                                                for f in files).items()))
        parts.append(f"{others} other files ({tops})")
    return " + ".join(parts)


def _run_details(store: Path, workdir: Path, output: str) -> dict[str, object]:
    """run.json (the store's, or a fallback copy in the workdir) and the preprocessing
    manifests' verdicts per subject."""
    records = sorted(store.glob("runs/*/run.json")) if store.is_dir() else []
    fallback = sorted((workdir / ".cache" / "eqdiff" / "run-records").glob("*.json"))
    details: dict[str, object] = {"run_ids": sorted(p.name for p in store.glob("runs/*"))
                                  if store.is_dir() else [],
                                  "fallback_run_records": [p.name for p in fallback]}
    if not details["run_ids"]:
        details["run_ids"] = sorted(set(re.findall(r"\brun (run-[0-9a-f]+)\b", output)))
    path = (records or fallback or [None])[0]
    if path is not None:
        record = json.loads(path.read_text("utf-8"))
        details["run_json"] = {"at": str(path.relative_to(store) if path in records else path),
                               "units": record.get("units"),
                               "failures": record.get("failures"),
                               "dataset_problems": record.get("dataset_problems")}
    manifests = {}
    for manifest in sorted(store.glob("runs/*/subjects/*/preprocess/manifest.json")
                           if store.is_dir() else []):
        data = json.loads(manifest.read_text("utf-8"))
        used = data.get("images", [])
        manifests[data.get("subject", manifest.parts[-3])] = {
            "status": data.get("status"), "reason": data.get("reason"), "used": len(used),
            "rejected": data.get("rejected", []),
            "changes": {image["name"]: {k: v for k, v in image.get("changes", {}).items()
                                        if k in ("mode_conversion", "frames", "notes")
                                        and v not in ("", 1, [], None)}
                        for image in used
                        if any(image.get("changes", {}).get(k) not in ("", 1, [], None)
                               for k in ("mode_conversion", "frames", "notes"))}}
    if manifests:
        details["manifests"] = manifests
    return details


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the command's process group (it ends a run like Ctrl-C), SIGKILL after 30 s."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass


def run_case(name: str, scratch: Path, timeout: float, base_env: dict[str, str]
             ) -> dict[str, object]:
    tmp = scratch / name
    home, store = tmp / "home", tmp / "store"
    home.mkdir(parents=True)
    case = CASES[name](tmp)
    store_url = case.store_url or str(store)
    if store_url == "FILE":
        store.write_text("not a folder\n")
        store_url = str(store)
    elif store_url == "READONLY":
        store.mkdir()
        store.chmod(0o555)
        store_url = str(store)
    settings = {**BASE_SETTINGS, "storage_url": store_url, **case.run_file}
    run_file = tmp / "run.yaml"
    run_file.write_text(json.dumps(settings, indent=1) + "\n", "utf-8")  # JSON is YAML
    argv = [sys.executable, "-m", "flows.cli", "run", "--no-server", "-c", str(run_file)]
    for setting in case.sets:
        argv += ["--set", setting]
    env = {**base_env, "HOME": str(home), **case.env}
    started = time.perf_counter()
    process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, errors="replace",
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        code: int | None = process.returncode
    except subprocess.TimeoutExpired:
        _stop(process)
        stdout, stderr = process.communicate()
        code = None
    seconds = time.perf_counter() - started
    if store.is_dir():
        store.chmod(0o755)
    line, source = _stderr_line(stderr)
    if not stderr.strip() and stdout.strip():
        line, source = stdout.strip().splitlines()[-1], "stdout"
    files = _store_files(store)
    details = _run_details(store, home, stdout + stderr)
    return {"case": name, "input": DESCRIPTIONS.get(name, ""), "note": case.note,
            "command": shlex.join(["python", *argv[1:]]).replace(str(scratch), "$TMP"),
            "run_file": settings, "exit_code": code, "timed_out": code is None,
            "line_shown": line.replace(str(scratch), "$TMP"), "line_source": source,
            "seconds": round(seconds, 2),
            "logged_problems": [p.replace(str(scratch), "$TMP") for p in _logged_problems(stderr)],
            "written": _summarise_store(files, store_url),
            "store_files": files[:200], "store_file_count": len(files),
            **json.loads(json.dumps(details).replace(str(scratch), "$TMP")),
            "stderr_tail": "\n".join(stderr.splitlines()[-TAIL_LINES:]).replace(str(scratch),
                                                                                 "$TMP"),
            "stdout_tail": "\n".join(stdout.splitlines()[-TAIL_LINES:]).replace(str(scratch),
                                                                                "$TMP")}


# --------------------------------------------------------------------------- the run

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(report: dict) -> str:
    machine = report["machine"]
    lines = [f"# Bad inputs to `eqdiff run` ({report['date']})", "",
             f"Commit `{report['commit']}`; {machine['cpus']} CPUs, {machine['platform']}, "
             f"Python {machine['python']}; "
             + ", ".join(f"{k} {v}" for k, v in report["versions"].items())
             + f". Prefect: {report['prefect']}. Timeout {report['timeout_s']:.0f} s per case. "
             f"Command: `{report['command']}`", "",
             "Every case: `run.yaml` with " + json.dumps(BASE_SETTINGS)
             + ", a fresh store folder and a fresh `HOME` (workdir, Hugging Face cache).", "",
             "| case | exit code | line shown | seconds | written |", "|---|---|---|---|---|"]
    for row in report["cases"]:
        code = "timeout" if row["timed_out"] else row["exit_code"]
        lines.append(f"| {_cell(row['case'])} | {code} | {_cell(row['line_shown'])} | "
                     f"{row['seconds']:.1f} | {_cell(row['written'])} |")
    lines += ["", "## What the run recorded", ""]
    for row in report["cases"]:
        lines.append(f"- **{row['case']}** ({_cell(row['input'])}): line from "
                     f"{row['line_source']}")
        for logged in row["logged_problems"]:
            lines.append(f"  - logged: {_cell(logged)}")
        record = row.get("run_json")
        if record:
            for problem in record.get("dataset_problems") or []:
                lines.append(f"  - dataset problem `{problem['kind']}`: "
                             f"{_cell(problem['message'])}")
            for key, reason in (record.get("failures") or {}).items():
                lines.append(f"  - failure `{key}`: {_cell(reason)}")
            units = record.get("units") or {}
            lines.append(f"  - units: {sum(v == 'done' for v in units.values())} of "
                         f"{len(units)} done")
        elif row["fallback_run_records"]:
            lines.append(f"  - run record only in the workdir: {row['fallback_run_records']}")
        else:
            lines.append("  - no run.json")
        for subject, manifest in (row.get("manifests") or {}).items():
            rejected = "; ".join(
                f"{Path(str(r.get('source') or r.get('file') or '?')).name}: {r.get('reason', r)}"
                for r in manifest["rejected"]) or "none"
            lines.append(f"  - `{subject}` preprocessing: {manifest['status']}, "
                         f"{manifest['used']} used, rejected: {_cell(rejected)}"
                         + (f", changes: {_cell(manifest['changes'])}"
                            if manifest["changes"] else ""))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/bad_inputs.json",
                        help="JSON result; the Markdown table goes next to it (.md)")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), metavar="NAME",
                        help="run only these cases (default: all; --list names them)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per case")
    parser.add_argument("--prefect", choices=("server", "temporary", "env"), default="server",
                        help="one server for all cases (default), Prefect's temporary server "
                             "per command, or PREFECT_API_URL as set")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folders")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args(argv)
    if args.list:
        sys.stdout.write("".join(f"{name}: {DESCRIPTIONS[name]}\n" for name in CASES))
        return 0
    names = args.cases or list(CASES)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="eqdiff-bad-inputs-"))
    base_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("AWS_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    base_env.update(PYTHONUNBUFFERED="1", MPLCONFIGDIR=str(scratch / "matplotlib"),
                    AWS_CONFIG_FILE=str(scratch / "no-aws-config"),
                    AWS_SHARED_CREDENTIALS_FILE=str(scratch / "no-aws-credentials"),
                    PREFECT_SERVER_ANALYTICS_ENABLED="false")
    server_home = None
    try:
        if args.prefect != "env":
            base_env.pop("PREFECT_API_URL", None)
        if args.prefect == "server":
            from flows.server import ensure_server

            server_home = scratch / "prefect-home"
            os.environ.pop("PREFECT_API_URL", None)
            os.environ["PREFECT_HOME"] = str(server_home)
            os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
            ensure_server(port=_free_port(), home=server_home)
            base_env["PREFECT_API_URL"] = os.environ["PREFECT_API_URL"]
            base_env["PREFECT_HOME"] = str(server_home)
        report = {"command": shlex.join([Path(sys.executable).name, *sys.argv]),
                  "date": datetime.now(UTC).isoformat(timespec="seconds"),
                  "commit": _commit(), "versions": package_versions(PACKAGES),
                  "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                              "python": platform.python_version(), "euid": os.geteuid()},
                  "prefect": {"server": "one server for all cases",
                              "temporary": "Prefect's temporary server per command",
                              "env": "PREFECT_API_URL as set"}[args.prefect],
                  "timeout_s": args.timeout, "base_settings": BASE_SETTINGS, "cases": []}
        for name in names:
            sys.stdout.write(f"{name} ... ")
            sys.stdout.flush()
            row = run_case(name, scratch, args.timeout, base_env)
            report["cases"].append(row)
            sys.stdout.write(f"exit {row['exit_code']}, {row['seconds']:.1f} s: "
                             f"{row['line_shown'][:120]}\n")
            out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", "utf-8")
            out.with_suffix(".md").write_text(markdown(report), "utf-8")
    finally:
        if server_home is not None:
            from flows.server import stop_server

            stop_server(server_home)
        if not args.keep:
            for path in scratch.rglob("*"):  # a read-only folder left by an interrupted case
                if path.is_dir() and not path.is_symlink():
                    path.chmod(0o755)
            shutil.rmtree(scratch, ignore_errors=True)
    sys.stdout.write(markdown(report) + f"\nresults: {out}, {out.with_suffix('.md')}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
