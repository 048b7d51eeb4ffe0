"""When each subject's results are ready, and what a rerun of a finished run costs.

Runs ``eqdiff demo`` (the toy world: 4 subjects × eqdiff and custom-diffusion on Ray) from one
or more checkouts of the project, each into a fresh store, one after the other on this
machine, then reads the completion markers the run wrote: per subject, the moment its last
score table was stored, relative to the command's start. With ``--rerun`` the same command runs
again right after the first (everything finished: the rerun cost as a share of the first run).

Comparing two checkouts (``--code before=/tmp/old --code after=.``) shows what dispatching
each step as soon as its inputs are done changes against stage barriers: a subject's
generation and scoring no longer wait for the slowest training.

    .venv/bin/python bench/pipelining.py --code before=/tmp/eqdiff-before --code after=. \\
        --rerun after --out docs/bench/pipelining_cpu.json

Every checkout runs with this interpreter (``sys.executable``) and its folder first on
``PYTHONPATH`` (the local Ray workers inherit it). A Prefect server is started first if none
answers, so no run pays for it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from eqdiff.evaluation.scores import package_versions, source_commit

logger = logging.getLogger("bench.pipelining")

RUN_ID = "pipelining"
PACKAGES = ("torch", "diffusers", "prefect", "prefect-ray", "ray")


def run_demo(code: Path, store: Path, steps: int) -> tuple[float, int, float]:
    """``eqdiff demo`` from ``code`` into ``store``: (wall seconds, exit code, start time)."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    command = [sys.executable, "-m", "flows.cli", "demo", "--store", str(store), "--run-id",
               RUN_ID, "--steps", str(steps)]
    started_at = time.time()
    started = time.perf_counter()
    done = subprocess.run(command, cwd=code, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        logger.error("%s exited %d:\n%s", command, done.returncode, done.stderr[-3000:])
    return wall, done.returncode, started_at


def marker_times(store: Path, started_at: float) -> dict[str, dict[str, float]]:
    """Per subject: seconds from the command's start to its last concept, sample and score
    marker (the moment its results were complete)."""
    root = store / "runs" / RUN_ID
    times: dict[str, dict[str, float]] = {}
    for stage in ("concepts", "samples", "scores"):
        for marker in (root / stage).glob("*/*/_SUCCESS.json"):
            subject = marker.parent.parent.name
            stamp = dt.datetime.fromisoformat(json.loads(marker.read_text())["completed_at"])
            seconds = stamp.timestamp() - started_at
            entry = times.setdefault(subject, {})
            entry[stage] = round(max(entry.get(stage, 0.0), seconds), 1)
    return dict(sorted(times.items()))


def ensure_prefect(code: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(code)}
    subprocess.run([sys.executable, "-m", "flows.cli", "server", "start"], cwd=code, env=env,
                   check=True, capture_output=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", action="append", required=True, metavar="LABEL=FOLDER",
                        help="a checkout to run, e.g. after=. (several: run in this order)")
    parser.add_argument("--rerun", action="append", default=[], metavar="LABEL",
                        help="rerun this checkout's finished run right after its first run")
    parser.add_argument("--steps", type=int, default=250, help="training steps (the demo's)")
    parser.add_argument("--out", default="bench/results/pipelining.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    checkouts = [(label, Path(folder).resolve()) for label, _, folder in
                 (item.partition("=") for item in args.code)]
    ensure_prefect(checkouts[-1][1])
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
              "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "python": platform.python_version()},
              "packages": package_versions(PACKAGES),
              "run": f"eqdiff demo --steps {args.steps} (toy world, 4 subjects × eqdiff and "
                     "custom-diffusion, Ray on this machine), a fresh store per checkout",
              "runs": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for label, code in checkouts:
        store = Path(tempfile.mkdtemp(prefix=f"eqdiff-pipelining-{label}-"))
        wall, code_, started_at = run_demo(code, store, args.steps)
        entry = {"label": label, "commit": source_commit(code), "wall_s": round(wall, 1),
                 "load_average_after": [round(x, 2) for x in os.getloadavg()],
                 "exit_code": code_, "subjects_ready_s": marker_times(store, started_at)}
        ready = [t["scores"] for t in entry["subjects_ready_s"].values() if "scores" in t]
        entry["first_subject_ready_s"] = min(ready) if ready else None
        entry["mean_subject_ready_s"] = round(sum(ready) / len(ready), 1) if ready else None
        logger.info("%s: %.1f s, first subject ready at %s s", label, wall,
                    entry["first_subject_ready_s"])
        if label in args.rerun:
            rerun, rerun_code, _ = run_demo(code, store, args.steps)
            entry.update(rerun_wall_s=round(rerun, 1), rerun_exit_code=rerun_code,
                         rerun_share_of_first=round(rerun / wall, 4))
            logger.info("%s rerun: %.1f s (%.1f %% of the first run)", label, rerun,
                        100 * rerun / wall)
        result["runs"].append(entry)
        out.write_text(json.dumps(result, indent=2) + "\n")
        shutil.rmtree(store, ignore_errors=True)
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
