"""``toy_benchmark``: the toy world's quality benchmark as a flow of ordinary dataset runs.

For each seed it runs ``customize_dataset`` (as a subflow) on the ``toyworld`` dataset with the
``toy`` base model and evaluators, every method trained on identical data, with the training
and sampling seeds set to that seed. It then reads every run's stored scores, splits them by
what the prompt changed (context or style) and publishes the table — mean and spread over seeds —
as a Prefect artifact and as files (``summary.csv``, ``summary.md``, ``summary.png``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, ConfigDict, Field

from eqdiff.config import METHOD_PRESETS
from eqdiff.evaluation.scores import load_run_scores
from eqdiff.fixtures import fixture_run_overrides
from eqdiff.fixtures.toyworld.benchmark import markdown_table, plot_summary, summarise
from eqdiff.store import open_store
from flows.customize import customize_dataset
from flows.params import CustomizeParams, MethodName

logger = logging.getLogger(__name__)

class ToyBenchmarkParams(BaseModel):
    """A toy benchmark: methods × seeds on the toy world's novel subjects."""

    model_config = ConfigDict(extra="forbid")

    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    methods: list[MethodName] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(METHOD_PRESETS))
    steps: int = Field(300, ge=1, description="Training steps per concept")
    images_per_prompt: int = Field(4, ge=1)
    storage_url: str = "./artifacts"
    compute: str = Field("local", pattern="^(local|ray)$")
    out: str = Field("artifacts/toy-benchmark", description="Folder for the summary files")
    overrides: dict[str, object] = Field(default_factory=dict)

    def run_params(self, seed: int) -> CustomizeParams:
        overrides = {**fixture_run_overrides("toy"), "train.seed": seed, "sample.seed": seed,
                     "masks.extractor": "provided", **self.overrides}
        return CustomizeParams(dataset="toyworld", base_model="toy", methods=self.methods,
                               steps=self.steps, images_per_prompt=self.images_per_prompt,
                               storage_url=self.storage_url, compute=self.compute,
                               run_id=f"toybench-s{seed}", overrides=overrides)


@flow(name="toy-benchmark")
def toy_benchmark(params: ToyBenchmarkParams | None = None) -> dict:
    """Run every seed's dataset run, then summarise the scores by method and prompt change."""
    params = params or ToyBenchmarkParams()
    log = get_run_logger()
    frames = []
    for seed in params.seeds:
        run_params = params.run_params(seed)
        record = customize_dataset(run_params)
        store = open_store(params.storage_url)
        scores, failures = load_run_scores(store, record["run_id"])
        for _, failure in failures.iterrows():
            log.warning("seed %d: %s/%s failed: %s", seed, *failure.tolist()[:3])
        frames.append(scores.assign(bench_seed=seed))
    scores = pd.concat(frames, ignore_index=True)
    summary = summarise(scores)
    out = Path(params.out)
    out.mkdir(parents=True, exist_ok=True)
    scores.to_csv(out / "scores.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    table = markdown_table(summary)
    (out / "summary.md").write_text(table + "\n", encoding="utf-8")
    plot_summary(summary, out / "summary.png")
    create_table_artifact(key="toy-benchmark", table=summary.round(4).to_dict(orient="records"),
                          description="Toy benchmark: mean ± sd over seeds per method and "
                                      "prompt change")
    create_markdown_artifact(key="toy-benchmark-summary",
                             markdown=f"# Toy benchmark\n\n{table}",
                             description=f"seeds {params.seeds}, {params.steps} steps")
    log.info("toy benchmark summary written to %s", out.resolve())
    return {"summary": str(out / "summary.md"), "runs": [f"toybench-s{s}" for s in params.seeds]}
