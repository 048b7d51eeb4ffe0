"""What Prefect (and Ray) add to a tiny run: the customize_dataset flow vs its stages in a loop.

The same workload runs three ways, each on a fresh local-folder store:

- ``direct``: the :mod:`eqdiff.pipeline.stages` functions called in a plain loop (on one worker
  thread, like the local task runner), in the order the flow runs them (preprocess, masks, class
  priors, train, generate, score, report), each model loaded once per run;
- ``flow-local``: ``customize_dataset`` with ``compute="local"`` (tasks in this process, one at
  a time), reporting to a real Prefect server;
- ``flow-ray`` (``--ray``): the same on a local Ray instance (``ray.init`` and cold Ray
  workers are paid in the first repeat);
- ``flow-ray fresh-workers`` (``--ray --ray-gpus N``): Ray is given N logical GPUs, so the heavy
  tasks ask for a GPU as on a GPU node (and run one at a time per GPU; the work itself stays
  on the CPU). ``flow-ray`` keeps the GPU workers between tasks (``reuse_gpu_workers``, the
  default); this variant gives each GPU task a new process, Ray's own default for GPU tasks.
  Their difference is what a GPU task pays to start a worker, import torch and load models.

Each is then run again on its finished store (everything skipped): the "rerun costs seconds"
figure. Heavy imports happen before any timing, so the figures compare orchestration, not
import order; the first repeat also pays torch's first-use warm-up (tens of seconds here), so
compare the minimums over repeats. The flow also writes run.json and its Prefect artifacts;
those count as its overhead. A Prefect server is started on a free port with a temporary home
(or the one at ``PREFECT_API_URL`` is used) and stopped at the end.

    .venv/bin/python bench/orchestration_overhead.py --out bench/results   # 3 repeats, ~4 min
    .venv/bin/python bench/orchestration_overhead.py --ray --repeat 2 --out bench/results
    .venv/bin/python bench/orchestration_overhead.py --ray --ray-gpus 1 --repeat 2 \
        --out bench/results/gpu_workers
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

logger = logging.getLogger("bench.orchestration")

DEFAULT_SUBJECTS = ["red_ball", "blue_box"]
DEFAULT_METHODS = ["textual-inversion", "custom-diffusion"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def workload(args: argparse.Namespace, store: Path, compute: str,
             reuse_gpu_workers: bool = True) -> Any:
    """The run's parameters (a ``CustomizeParams``) with its store folder and compute target."""
    from flows.params import CustomizeParams

    return CustomizeParams(dataset="demo", subjects=args.subjects, methods=args.methods,
                           steps=args.steps, images_per_prompt=1, max_prompts=args.prompts,
                           base_model="tiny", storage_url=str(store), compute=compute,
                           reuse_gpu_workers=reuse_gpu_workers, run_id="bench",
                           overrides={"train.num_prior_images": 2,
                                      "sample.steps": args.sample_steps,
                                      "train.checkpoint_every": args.steps})


def run_direct(params: Any) -> dict[str, bool]:
    """:func:`direct_stages` on one worker thread, as the flow's local task runner runs its
    tasks, so both variants do their torch work the same way."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(direct_stages, params).result()


def direct_stages(params: Any) -> dict[str, bool]:
    """The flow's stages as plain calls, set up as the flow sets them up; returns the
    training stage's ``skipped`` flags by ``subject/method``."""
    from eqdiff.config import EvalConfig
    from eqdiff.evaluation.metrics import CLIPScorer, DINOScorer
    from eqdiff.method.sampling import ConceptGenerator
    from eqdiff.pipeline import stages
    from eqdiff.store import store_from_config
    from flows.preflight import (
        DEFAULT_WORKDIR,
        evaluation_prompts,
        resolve_dataset,
        resolve_models,
        select_subjects,
        subject_prompt_set,
    )

    models = resolve_models(params, DEFAULT_WORKDIR)
    dataset = resolve_dataset(params, DEFAULT_WORKDIR)
    config = params.run_config(
        base_model=models.base, resolution=models.resolution,
        eval_models=EvalConfig(clip_model=models.clip, clip_pretrained="",
                               dino_model=models.dino))
    store_from_config(config.storage).check()
    ctx = stages.RunContext(params.derived_run_id(), config)
    subjects = select_subjects(dataset, params.subjects)
    skipped: dict[str, bool] = {}
    for subject in subjects:
        stages.ingest(ctx, subject, subject_prompt_set(dataset, subject, params))
        stages.preprocess(ctx, subject.name)
        stages.extract_masks(ctx, subject.name)
    priors = {c: stages.class_priors(ctx, c).prefix
              for c in sorted({s.class_noun for s in subjects})
              if any(m.prior_preservation for m in config.methods)}
    for subject in subjects:
        for method in config.methods:
            skipped[f"{subject.name}/{method.name}"] = stages.train(
                ctx, subject.name, subject.class_noun, method,
                prior_prefix=priors.get(subject.class_noun)).skipped
    @functools.cache
    def generator() -> ConceptGenerator:  # loaded once, and only if something is to draw
        return ConceptGenerator.from_pretrained(models.base, config.sample, config.rra,
                                                device="cpu", local_files_only=True)

    @functools.cache
    def scorers() -> tuple[CLIPScorer, DINOScorer]:
        return (CLIPScorer(config.eval.clip_model, config.eval.clip_pretrained, device="cpu",
                           batch_size=config.eval.batch_size),
                DINOScorer(config.eval.dino_model, device="cpu",
                           batch_size=config.eval.batch_size))

    for subject in subjects:
        prompts = evaluation_prompts(dataset, subject, params, config)
        for method in config.methods:
            stages.generate(ctx, generator, subject.name, method.name, prompts)
    for subject in subjects:
        stages.score(ctx, scorers, subject.name, [m.name for m in config.methods])
    stages.report(ctx)
    return skipped


def run_flow(params: Any) -> dict[str, bool]:
    """``customize_dataset`` called in this process; returns the training ``skipped`` flags."""
    from flows.customize import customize_dataset

    record = customize_dataset(params)
    failed = {k: v for k, v in record["status"].items() if v != "done"}
    if failed:
        raise RuntimeError(f"the flow failed items: {failed}")
    return {key: records["train"]["skipped"] for key, records in record["records"].items()
            if "train" in records}


def timed(label: str, function: Any, params: Any) -> tuple[float, dict[str, bool]]:
    """Seconds ``function(params)`` took, and its training ``skipped`` flags."""
    started = time.perf_counter()
    skipped = function(params)
    seconds = time.perf_counter() - started
    logger.info("%s: %.1f s", label, seconds)
    return seconds, skipped


def drain_prefect() -> None:
    """Send the flow runs' queued logs and events before the server goes away."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    EventsWorker.drain_all(timeout=10)


def warm_imports() -> None:
    """Import what every variant needs once, so no variant pays for the others' imports."""
    import open_clip  # noqa: F401
    import prefect_ray.task_runners  # noqa: F401

    import eqdiff.evaluation.metrics  # noqa: F401
    import eqdiff.method.sampling  # noqa: F401
    import eqdiff.pipeline.stages  # noqa: F401
    import flows.customize  # noqa: F401


def summarise(samples: dict[str, list[float]], counts: dict[str, tuple[int, int]]
              ) -> list[dict[str, Any]]:
    """One row per variant: min / median / max seconds over the repeats, and the ratio of the
    mins to ``direct`` (the min is the figure least disturbed by other load)."""
    direct = min(samples["direct"])
    return [{"variant": name, "runs": len(values), "min_s": round(min(values), 2),
             "median_s": round(statistics.median(values), 2), "max_s": round(max(values), 2),
             "trained": counts[name][0], "skipped": counts[name][1],
             "min_vs_direct": round(min(values) / direct, 3)}
            for name, values in samples.items()]


def _write_table(rows: list[dict[str, Any]]) -> None:
    lines = ["| variant | runs | min s | median s | max s | trained | skipped | min vs direct |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['variant']} | {r['runs']} | {r['min_s']:.1f} | {r['median_s']:.1f} | "
              f"{r['max_s']:.1f} | {r['trained']} | {r['skipped']} | {r['min_vs_direct']:.2f}× |"
              for r in rows]
    sys.stdout.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", nargs="+", default=DEFAULT_SUBJECTS,
                        help="demo subjects (default: red_ball blue_box)")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS,
                        help="methods (default: textual-inversion custom-diffusion)")
    parser.add_argument("--steps", type=int, default=4, help="training steps per concept")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per subject")
    parser.add_argument("--sample-steps", type=int, default=4, help="denoising steps")
    parser.add_argument("--ray", action="store_true",
                        help="also time the flow on local Ray (ray.init is paid in repeat 1)")
    parser.add_argument("--ray-gpus", type=int, default=0,
                        help="with --ray: give local Ray this many logical GPUs and also time "
                             "the flow with a new worker process per GPU task")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each variant, interleaved (default 3)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"),
                        help="folder for orchestration_overhead.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from flows.server import ensure_server, healthy, stop_server

    with tempfile.TemporaryDirectory(prefix="eqdiff-bench-") as tmp:
        scratch = Path(tmp)
        own_server = not healthy(os.environ.get("PREFECT_API_URL", ""))
        if own_server:  # before Prefect is imported, so its settings see this server
            os.environ.pop("PREFECT_API_URL", None)
            os.environ["PREFECT_HOME"] = str(scratch / "prefect-home")
            os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
        started = time.perf_counter()
        server = ensure_server(port=_free_port(), home=scratch / "prefect-home")
        server_s = time.perf_counter() - started
        try:
            started = time.perf_counter()
            warm_imports()
            import_s = time.perf_counter() - started
            variants = [("direct", run_direct, "local", True),
                        ("flow-local", run_flow, "local", True)]
            if args.ray:
                variants.append(("flow-ray", run_flow, "ray", True))
            if args.ray and args.ray_gpus:
                import ray

                from flows.compute import ray_init_kwargs

                ray.init(num_gpus=args.ray_gpus, **ray_init_kwargs(""))
                variants.append(("flow-ray fresh-workers", run_flow, "ray", False))
            samples: dict[str, list[float]] = {}
            counts: dict[str, tuple[int, int]] = {}
            for repeat in range(args.repeat):  # interleaved, so load changes hit every variant
                for label, function, compute, reuse in variants:
                    store = scratch / f"store-{label.replace(' ', '-')}-{repeat}"
                    params = workload(args, store, compute, reuse)
                    for name in (label, f"{label} rerun"):
                        seconds, skipped = timed(name, function, params)
                        samples.setdefault(name, []).append(seconds)
                        counts[name] = (sum(not s for s in skipped.values()),
                                        sum(skipped.values()))
            if args.ray:
                import ray

                ray.shutdown()
            drain_prefect()
        finally:
            if own_server:
                stop_server(server.home)

    rows = summarise(samples, counts)
    _write_table(rows)
    best = {row["variant"]: row["min_s"] for row in rows}
    ratios = {}
    for label, *_ in variants:
        if label != "direct":
            ratios[f"{label} / direct"] = round(best[label] / best["direct"], 2)
        ratios[f"{label} rerun / first"] = round(best[f"{label} rerun"] / best[label], 3)
    if "flow-ray fresh-workers" in best:  # what new processes for GPU tasks cost the run
        ratios["fresh-workers - kept workers, s"] = round(
            best["flow-ray fresh-workers"] - best["flow-ray"], 1)
    sys.stdout.write("".join(f"{name} (min): {value}\n" for name, value in ratios.items()))
    sys.stdout.write(f"(Prefect server start {server_s:.1f} s"
                     f"{' (reused)' if not own_server else ''}; imports {import_s:.1f} s; "
                     "neither counted above)\n")
    args.out.mkdir(parents=True, exist_ok=True)
    import prefect

    report = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                          "platform": platform.platform(), "prefect": prefect.__version__},
              "workload": {"subjects": args.subjects, "methods": args.methods,
                           "steps": args.steps, "prompts": args.prompts,
                           "sample_steps": args.sample_steps, "store": "local folder",
                           "ray_logical_gpus": args.ray_gpus},
              "server_start_s": round(server_s, 2), "server_reused": not own_server,
              "import_s": round(import_s, 2), "repeat": args.repeat, "samples_s": samples,
              "results": rows, "ratios_of_mins": ratios}
    path = args.out / "orchestration_overhead.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    sys.stdout.write(f"results written to {path}\n")


if __name__ == "__main__":
    main()
