"""``toy_benchmark``: the toy world's quality benchmark as a flow of ordinary dataset runs.

For each seed it runs ``customize_dataset`` (as a subflow) on the ``toyworld`` dataset with the
``toy`` base model and evaluators, every method trained on identical data, with the training
and sampling seeds set to that seed. It then reads every run's stored scores, splits them by
what the prompt changed (context or style) and publishes the table — mean and spread over seeds —
as a Prefect artifact and as files (``summary.csv``, ``summary.md``, ``summary.png``).
"""

from __future__ import annotations

import io
import json
import logging
import os
import platform
import time
from pathlib import Path

import pandas as pd
from PIL import Image
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, ConfigDict, Field

from eqdiff.config import METHOD_PRESETS
from eqdiff.evaluation.scores import load_run_scores, package_versions, source_commit
from eqdiff.fixtures import fixture_models, fixture_run_overrides
from eqdiff.fixtures.toyworld.benchmark import (
    differences_markdown,
    markdown_table,
    paired_differences,
    plot_summary,
    sample_grid,
    summarise,
)
from eqdiff.method.models import model_identity
from eqdiff.store import open_store
from flows.customize import customize_dataset
from flows.params import CustomizeParams, MethodName

logger = logging.getLogger(__name__)

class ToyBenchmarkParams(BaseModel):
    """A toy benchmark: methods × seeds on the toy world's novel subjects, each method at its
    own recipe (scaled to the toy model by the toy settings and ``steps_scale``)."""

    model_config = ConfigDict(extra="forbid")

    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4], min_length=1)
    methods: list[MethodName] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(METHOD_PRESETS))
    variants: dict[str, dict[str, object]] = Field(
        default_factory=dict, description="Further methods: a name → a preset and the fields "
                                          "it changes (as in the dataset run's form)")
    steps_scale: float = Field(0.25, gt=0, le=4,
                               description="Every method's recipe steps × this (the methods "
                                           "keep their recipes' ratios); not with 'steps'")
    steps: int = Field(0, ge=0, description="Training steps of every method (0: the recipes "
                                            "× steps_scale)")
    images_per_prompt: int = Field(2, ge=1)
    storage_url: str = "./artifacts"
    compute: str = Field("local", pattern="^(local|ray)$")
    out: str = Field("artifacts/toy-benchmark", description="Folder for the summary files")
    overrides: dict[str, object] = Field(default_factory=dict)

    def run_params(self, seed: int) -> CustomizeParams:
        scale = {} if self.steps else {"train.steps_scale": self.steps_scale}
        overrides = {**fixture_run_overrides("toy"), "train.seed": seed, "sample.seed": seed,
                     "masks.extractor": "provided", **scale, **self.overrides}
        return CustomizeParams(dataset="toyworld", base_model="toy", methods=self.methods,
                               variants=self.variants, steps=self.steps,
                               images_per_prompt=self.images_per_prompt,
                               storage_url=self.storage_url, compute=self.compute,
                               run_id=f"toybench-s{seed}", overrides=overrides)


def provenance(params: ToyBenchmarkParams, seconds: dict[int, float], commit: str) -> dict:
    """What the benchmark's numbers come from: parameters, each method's training settings as
    resolved, code commit, package versions, model hashes, machine and time per seed."""
    models = fixture_models("toy", ".")
    config = params.run_params(params.seeds[0]).run_config(base_model=models.base)
    return {
        "params": params.model_dump(mode="json"),
        "training": {method.name: {key: getattr(config.training(method), key) for key in (
            "steps", "instance_batch", "prior_batch", "gradient_accumulation",
            "learning_rate", "initializer_token")} for method in config.methods},
        "commit": commit,
        "packages": package_versions(),
        "models": {role: model_identity(folder) for role, folder in (
            ("base", models.base), ("clip", models.clip), ("dino", models.dino))},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "seconds_per_seed": seconds,
    }


@flow(name="toy-benchmark")
def toy_benchmark(params: ToyBenchmarkParams | None = None) -> dict:
    """Run every seed's dataset run, then summarise the scores by method and prompt change,
    with paired differences over (subject, seed) units."""
    params = params or ToyBenchmarkParams()
    log = get_run_logger()
    commit = source_commit(Path(__file__).resolve().parent.parent)  # the code that runs
    frames, seconds = [], {}
    for seed in params.seeds:
        run_params = params.run_params(seed)
        started = time.perf_counter()
        record = customize_dataset(run_params)
        seconds[seed] = round(time.perf_counter() - started, 1)
        store = open_store(params.storage_url)
        scores, failures = load_run_scores(store, record["run_id"])
        for _, failure in failures.iterrows():
            log.warning("seed %d: %s/%s failed: %s", seed, *failure.tolist()[:3])
        frames.append(scores.assign(bench_seed=seed))
    scores = pd.concat(frames, ignore_index=True)
    summary = summarise(scores)
    differences = paired_differences(scores)
    out = Path(params.out)
    out.mkdir(parents=True, exist_ok=True)
    scores.to_csv(out / "scores.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    differences.to_csv(out / "differences.csv", index=False)
    record = provenance(params, seconds, commit)
    (out / "benchmark.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    table = markdown_table(summary)
    compared = differences_markdown(differences)
    (out / "summary.md").write_text(
        f"{table}\n## Paired differences\n\n{compared}\n", encoding="utf-8")
    plot_summary(summary, out / "summary.png")
    first = scores[scores["bench_seed"] == params.seeds[0]]
    sample_grid(first, lambda key: Image.open(io.BytesIO(store.get_bytes(key))).convert("RGB"),
                sorted(set(first["subject"]))[0], out / f"samples_seed{params.seeds[0]}.png")
    create_table_artifact(key="toy-benchmark", table=summary.round(4).to_dict(orient="records"),
                          description="Toy benchmark: mean ± sd over seeds per method and "
                                      "prompt change")
    create_markdown_artifact(key="toy-benchmark-summary",
                             markdown=f"# Toy benchmark\n\n{table}\n## Paired differences"
                                      f"\n\n{compared}",
                             description=f"seeds {params.seeds}, recipes × "
                                         f"{params.steps_scale} steps")
    log.info("toy benchmark summary written to %s", out.resolve())
    return {"summary": str(out / "summary.md"), "runs": [f"toybench-s{s}" for s in params.seeds]}
