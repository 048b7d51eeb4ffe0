"""Where a training step's device time goes: torch.profiler over a few eager steps per method.

A replayed CUDA graph shows up in a profile as one launch, so this profiles the eager step
(the same kernels). For each method it writes the operators sorted by their own device time
(``profile_<method>.txt``) and a JSON summary with the largest ones, so the EqDiff step can
be compared with Custom Diffusion's operator by operator.

    .venv/bin/python bench/profile_step.py --tiny --out bench/results     # harness check, CPU
    PYTHONUNBUFFERED=1 python3 bench/profile_step.py --out "$OUT"         # 512 px, lent GPU
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from train_step import build_components, make_data, run_config  # bench/ is this folder

from eqdiff.config import method_preset
from eqdiff.method.reference import training_extensions
from eqdiff.method.training import ConceptTrainer

TOP = 40


def profile_method(components, data, name: str, resolution: int, device: torch.device,
                   warmup: int, steps: int) -> tuple[str, dict]:
    """Profile ``steps`` eager steps of ``name`` after ``warmup``; returns (table, summary)."""
    method = method_preset(name)
    config = run_config(method, resolution, warmup + steps, f"<eqdprof{name}>",
                        frozen_weights="auto", cuda_graphs="off")
    trainer = ConceptTrainer(components, data, config, method, device=device,
                             extensions=training_extensions(config.rra, method))
    try:
        for _ in range(warmup):
            trainer.train_step()
        activities = [ProfilerActivity.CPU] + (
            [ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(steps):
                trainer.train_step()
            trainer.loss_history  # noqa: B018 — waits for the device inside the profile
    finally:
        trainer.remove()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    table = averages.table(sort_by=key, row_limit=TOP)
    rows = sorted(averages, key=lambda e: getattr(e, key), reverse=True)[:TOP]
    total = sum(getattr(e, key) for e in averages)
    summary = {"method": name, "steps": steps, "time_key": key,
               "ms_per_step_total": round(total / 1e3 / steps, 3),
               "top": [{"op": e.key, "ms_per_step": round(getattr(e, key) / 1e3 / steps, 3),
                        "calls_per_step": e.count / steps} for e in rows]}
    return table, summary


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny offline SD at 64 px on CPU")
    parser.add_argument("--methods", nargs="+", default=["custom-diffusion", "eqdiff"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available: use --tiny")
    resolution = 64 if args.tiny else 512
    with tempfile.TemporaryDirectory(prefix="eqdiff-profile-") as tmp:
        components = build_components(args.tiny, device, Path(tmp)).freeze()
    data = make_data(resolution, device)
    args.out.mkdir(parents=True, exist_ok=True)
    summaries = []
    for name in args.methods:
        table, summary = profile_method(components, data, name, resolution, device,
                                        args.warmup, args.steps)
        (args.out / f"profile_{name}.txt").write_text(table + "\n")
        summaries.append(summary)
        sys.stdout.write(f"\n## {name}: {summary['ms_per_step_total']:.1f} ms of "
                         f"{summary['time_key']} per step; largest operators\n\n")
        for row in summary["top"][:12]:
            sys.stdout.write(f"  {row['ms_per_step']:>8.2f} ms  {row['calls_per_step']:>6.0f}×"
                             f"  {row['op']}\n")
        sys.stdout.flush()
        (args.out / "profile_step.json").write_text(json.dumps(
            {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
             "torch": torch.__version__, "resolution": resolution, "methods": summaries},
            indent=2) + "\n")


if __name__ == "__main__":
    main()
