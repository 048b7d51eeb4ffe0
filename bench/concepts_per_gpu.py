"""Several concepts on one GPU: does training two subjects side by side pay?

The pipeline can pack subjects onto a GPU with a fractional Ray request
(``gpus_per_subject=0.5``: two training tasks share each card). This benchmark answers whether
that is worth it. It starts N worker processes (spawned, one CUDA context each, as Ray workers
would have), each holding its own copy of the model, and runs the same EqDiff training in
1..N of them at once, eagerly and with the CUDA-graph step. It reports per-process ms/step and
the aggregate steps/s of the overlapped window, against one process alone.

    # tiny offline SD on the CPU (checks the harness; CPU processes share 2 cores here)
    .venv/bin/python bench/concepts_per_gpu.py --tiny --out bench/results
    # SD-1.5-shaped random model at 512 px on the lent GPU
    PYTHONUNBUFFERED=1 python3 bench/concepts_per_gpu.py --out "$OUT"

Results: ``FOLDER/concepts_per_gpu.json`` and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from train_step import build_components, make_data  # bench/ is this script's folder

from eqdiff.config import RunConfig, TrainConfig, method_preset
from eqdiff.method.reference import training_extensions
from eqdiff.method.training import ConceptTrainer

logger = logging.getLogger("bench.concepts_per_gpu")

READY_TIMEOUT_S = 240  # a worker silent this long is stuck


def worker(rank: int, tiny: bool, device_name: str, resolution: int, method_name: str,
           commands: mp.Queue, results: mp.Queue, go_events: list) -> None:
    """Build the model once, then run one timed training per command until told to stop."""
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(device_name)
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix=f"eqdiff-bench-w{rank}-") as tmp:
            components = build_components(tiny, device, Path(tmp)).freeze()
        data = make_data(resolution, device, seed=rank)
        method = method_preset(method_name)
    except Exception as err:
        results.put(("error", rank, f"building the model: {type(err).__name__}: {err}"[:500]))
        return
    results.put(("built", rank, None))
    while True:
        command = commands.get()
        if command is None:
            return
        try:
            results.put(("done", rank, _timed_training(rank, command, components, data,
                                                       method, device, resolution, results,
                                                       go_events)))
        except Exception as err:  # reported to the main process, which stops the benchmark
            results.put(("error", rank, f"{type(err).__name__}: {err}"[:500]))


def _timed_training(rank: int, command: tuple, components, data, method, device: torch.device,
                    resolution: int, results: mp.Queue, go_events: list) -> dict[str, Any]:
    """One phase in one worker: warm up (the graph is captured here), wait for the others,
    time ``steps`` steps."""
    phase, graph_mode, warmup, steps = command
    config = RunConfig(methods=(method,), train=TrainConfig(
        steps=warmup + steps, resolution=resolution, num_prior_images=8,
        placeholder_token=f"<eqdw{rank}p{phase}>", checkpoint_every=0,
        cuda_graphs=graph_mode))
    trainer = ConceptTrainer(components, data, config, method, device=device,
                             extensions=training_extensions(config.rra, method))
    try:
        for _ in range(warmup):
            trainer.train_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        results.put(("ready", rank, None))
        go_events[phase].wait()
        start = time.time()
        for _ in range(steps):
            trainer.train_step()
        trainer.loss_history  # noqa: B018 — reading it waits for the device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        end = time.time()
        return {"start": start, "end": end, "ms_per_step": (end - start) * 1e3 / steps,
                "cuda_graph": trainer.graph_captured}
    finally:
        trainer.remove()


def _wait(results: mp.Queue, kind: str, count: int) -> list[dict[str, Any] | None]:
    got = []
    while len(got) < count:
        message, rank, payload = results.get(timeout=READY_TIMEOUT_S)
        if message == "error":
            raise RuntimeError(f"worker {rank} failed: {payload}")
        if message != kind:
            raise RuntimeError(f"worker {rank} sent {message!r} while waiting for {kind!r}")
        got.append(payload)
    return got


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny offline SD at 64 px on CPU")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2],
                        help="how many trainings run at once, per phase (default 1 2)")
    parser.add_argument("--graphs", nargs="+", choices=("off", "auto"), default=["off", "auto"],
                        help="train.cuda_graphs per phase (CUDA only; default off auto; the "
                             "table says whether every process captured its graph)")
    parser.add_argument("--method", default="eqdiff")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (30; 4 tiny)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first (5, which includes the graph capture; 1 tiny)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    args.steps = args.steps or (4 if args.tiny else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    if min(args.processes) < 1:
        parser.error("--processes must be >= 1")
    method_preset(args.method)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    device_name = "cpu" if args.tiny else "cuda"
    if device_name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available: use --tiny")
    graph_modes = args.graphs if device_name == "cuda" else ["off"]
    resolution = 64 if args.tiny else 512
    phases = [(mode, n) for mode in graph_modes for n in sorted(set(args.processes))]
    workers = max(args.processes)
    ctx = mp.get_context("spawn")
    commands = [ctx.Queue() for _ in range(workers)]
    results = ctx.Queue()
    go_events = [ctx.Event() for _ in phases]
    started = time.perf_counter()
    procs = [ctx.Process(target=worker, args=(rank, args.tiny, device_name, resolution,
                                              args.method, commands[rank], results, go_events),
                         daemon=True) for rank in range(workers)]
    for proc in procs:
        proc.start()
    report: dict[str, Any] = {"benchmark": "concepts_per_gpu", "method": args.method,
                              "resolution": resolution, "steps": args.steps,
                              "warmup": args.warmup, "torch": torch.__version__,
                              "device": (torch.cuda.get_device_name(0) if device_name == "cuda"
                                         else "cpu"), "phases": []}
    args.out.mkdir(parents=True, exist_ok=True)
    out_path = args.out / "concepts_per_gpu.json"
    try:
        _wait(results, "built", workers)
        logger.info("%d workers built their models in %.0f s", workers,
                    time.perf_counter() - started)
        sys.stdout.write(f"\n## concepts per GPU — {report['device']}, {args.method}, "
                         f"{resolution} px, {args.steps} timed steps per process\n\n"
                         "| train.cuda_graphs | processes | ms/step per process (median) "
                         "| aggregate steps/s | vs 1 process |\n|---|---|---|---|---|\n")
        alone: dict[str, float] = {}
        for phase, (mode, count) in enumerate(phases):
            for rank in range(count):
                commands[rank].put((phase, mode, args.warmup, args.steps))
            _wait(results, "ready", count)
            go_events[phase].set()
            runs = _wait(results, "done", count)
            window = max(r["end"] for r in runs) - min(r["start"] for r in runs)
            rate = count * args.steps / window
            if count == 1:
                alone[mode] = rate
            row = {"cuda_graphs": mode, "processes": count, "runs": runs,
                   "ms_per_step_median": round(statistics.median(
                       r["ms_per_step"] for r in runs), 2),
                   "aggregate_steps_per_s": round(rate, 3),
                   "speedup_vs_one": (round(rate / alone[mode], 3) if mode in alone
                                      else None)}
            report["phases"].append(row)
            out_path.write_text(json.dumps(report, indent=2) + "\n")
            speedup = row["speedup_vs_one"]
            captured = sum(bool(r["cuda_graph"]) for r in runs)
            row["graphs_captured"] = captured
            sys.stdout.write(f"| {mode} ({captured}/{count} captured) | {count} "
                             f"| {row['ms_per_step_median']:.1f} "
                             f"| {rate:.2f} | {'—' if speedup is None else f'{speedup:.2f}×'} |\n")
            sys.stdout.flush()
    finally:
        for queue in commands:
            queue.put(None)
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    report["elapsed_s"] = round(time.perf_counter() - started, 1)
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    sys.stdout.write(f"\ntotal {report['elapsed_s']:.0f} s; results: {out_path}\n")


if __name__ == "__main__":
    main()
