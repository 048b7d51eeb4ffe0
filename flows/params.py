"""The parameters of ``customize_dataset``: a pydantic model the Prefect UI renders as a form.

Names match the YAML config files of ``eqdiff run``. Everything is validated here, at the
boundary, and turned into the frozen :class:`eqdiff.config.RunConfig` the stages use.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from eqdiff.config import (
    METHOD_PRESETS,
    EvalConfig,
    MethodConfig,
    ModelConfig,
    RecipeConfig,
    RunConfig,
    SampleConfig,
    StorageConfig,
    TrainConfig,
    config_hash,
    method_from,
    method_preset,
    with_overrides,
)

MethodName = Literal[tuple(METHOD_PRESETS)]  # type: ignore[valid-type]
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _closest(name: str, known: object) -> str:
    close = difflib.get_close_matches(name, list(known), n=2, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def method_with_recipe(name: str, changes: dict[str, object]) -> MethodConfig:
    """The preset ``name`` with its recipe changed by ``changes`` (checked like any config)."""
    preset = method_preset(name)
    recipe = dataclasses.replace(preset.recipe, **changes) if changes else preset.recipe
    return dataclasses.replace(preset, recipe=recipe)


class CustomizeParams(BaseModel):
    """A dataset-wide customization run."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(
        "toyworld", description="Dataset folder (DreamBench layout or plain folders + "
                                "subjects.csv), 'toyworld' for the toy world's novel subjects or "
                                "'demo' for three painted objects")
    subjects: list[str] = Field(default_factory=list,
                                description="Only these subjects (empty: all)")
    methods: list[MethodName] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["eqdiff", "custom-diffusion"],
        description="EqDiff, its ablations and baselines, trained on identical data and seeds")
    steps: int = Field(0, ge=0, le=100_000,
                       description="Training steps per concept for every method without its "
                                   "own in 'recipes' (0: each method's recipe: " + ", ".join(
                                       f"{name} {preset.recipe.steps}"
                                       for name, preset in METHOD_PRESETS.items()) + ")")
    variants: dict[str, dict[str, object]] = Field(
        default_factory=dict,
        description="Further methods trained beside 'methods': a name → a preset and the "
                    "fields it changes, e.g. {'eqdiff-mgdp-loss-only': {'preset': 'eqdiff', "
                    "'mgdp_parts': 'loss-only'}}")
    recipes: dict[str, dict[str, object]] = Field(
        default_factory=dict,
        description="Per-method training recipe changes, e.g. {'textual-inversion': {'steps': "
                    "1000, 'learning_rate': 0.0005}}; keys: " + ", ".join(
                        f.name for f in dataclasses.fields(RecipeConfig)))
    prompt_set: str = Field("", description="Evaluation prompt set (empty: DreamBench's object "
                                            "or live list per subject)")
    max_prompts: int = Field(0, ge=0, description="Use only the first N prompts (0: all)")
    images_per_prompt: int = Field(SampleConfig.images_per_prompt, ge=1, le=64)
    base_model: str = Field(ModelConfig().base_model,
                            description="Diffusers folder or hub id of an SD-1.x model; 'toy' "
                                        "for the toy world's trained model and evaluators, "
                                        "'tiny' for the random offline test model")
    storage_url: str = Field("./artifacts", description="Folder, file:///… or s3://bucket/prefix")
    s3_endpoint_url: str = Field("", description="S3-compatible endpoint (empty: AWS)")
    storage_shared: bool = Field(
        False, description="The local storage folder is on a filesystem every Ray node mounts "
                           "at the same path (NFS, a cluster filesystem); without it a local "
                           "folder is refused on a cluster of more than one node")
    compute: Literal["ray", "local"] = Field("ray", description="Ray cluster or this process")
    ray_address: str = Field("", description="Ray cluster address (empty: RAY_ADDRESS or a "
                                             "local instance)")
    gpus_per_subject: float = Field(
        1.0, gt=0, le=8, description="GPUs per subject's training task on Ray; 0.5 trains two "
                                     "subjects side by side on each GPU (small models)")
    reuse_gpu_workers: bool = Field(
        True, description="Keep Ray's GPU worker processes, and the models they loaded, for "
                          "later tasks; off: a new process per GPU task (Ray's default), which "
                          "hands back all of its GPU memory when the task ends")
    expect_gpus: bool = Field(
        False, description="Request gpus_per_subject GPUs even when the Ray cluster has none up "
                           "now: an autoscaling cluster then starts its GPU nodes")
    lost_worker_retries: int = Field(
        2, ge=0, le=10, description="How often Ray runs a task again when its worker process "
                                    "or node is lost (the unit resumes from its checkpoint)")
    run_id: str = Field("", description="Name of the run in the store (empty: derived from "
                                        "these parameters, so a rerun continues the same run)")
    overrides: dict[str, object] = Field(
        default_factory=dict,
        description="Advanced config overrides by dotted key, e.g. {'train.learning_rate': 1e-5}; "
                    "{'model.local_files_only': false} lets the run download model weights")

    @field_validator("run_id")
    @classmethod
    def _run_id(cls, value: str) -> str:
        if value and not RUN_ID.match(value):
            raise ValueError(f"run_id must be letters, digits, '_', '.', '-' (max 64), got "
                             f"{value!r}")
        return value

    @field_validator("overrides")
    @classmethod
    def _overrides(cls, value: dict[str, object]) -> dict[str, object]:
        """Unknown keys are refused at submission, with the closest known ones; values are
        checked when the run's configuration is built (some depend on the base model)."""
        try:
            with_overrides(RunConfig(), dict(value))
        except ValueError as error:
            if str(error).startswith("unknown config key"):
                raise
        return value

    @field_validator("variants")
    @classmethod
    def _variants(cls, value: dict[str, dict[str, object]]) -> dict[str, dict[str, object]]:
        """Each variant is a preset with some fields changed, checked like a run file's."""
        for name, spec in value.items():
            if name in METHOD_PRESETS:
                raise ValueError(f"variants: {name!r} is a preset's name; name the variant "
                                 "after what it changes")
            if not isinstance(spec, dict) or "preset" not in spec:
                raise ValueError(f"variants.{name} must name its 'preset', e.g. {{'preset': "
                                 f"'eqdiff', 'mgdp_parts': 'loss-only'}}")
            method_from({**spec, "name": name}, f"variants.{name}")
        return value

    @field_validator("recipes")
    @classmethod
    def _recipes(cls, value: dict[str, dict[str, object]]) -> dict[str, dict[str, object]]:
        """Unknown methods and recipe keys are refused at submission, with the closest known."""
        for name, changes in value.items():
            if name not in METHOD_PRESETS:
                raise ValueError(f"recipes: unknown method {name!r}"
                                 f"{_closest(name, METHOD_PRESETS)}")
            known = [f.name for f in dataclasses.fields(RecipeConfig)]
            for key in changes:
                if key not in known:
                    raise ValueError(f"recipes.{name}: unknown recipe key {key!r}"
                                     f"{_closest(key, known)}; known: {known}")
            method_with_recipe(name, changes)  # values are checked here
        return value

    @model_validator(mode="after")
    def _recipes_for_chosen_methods(self) -> CustomizeParams:
        unused = sorted(set(self.recipes) - set(self.methods))
        if unused:
            raise ValueError(f"recipes given for methods this run does not train: {unused}; "
                             f"its methods: {self.methods}")
        return self

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("choose at least one method")
        if len(set(value)) != len(value):
            raise ValueError(f"methods repeat: {value}")
        return value

    def run_config(self, *, base_model: str, eval_models: EvalConfig | None = None,
                   resolution: int | None = None) -> RunConfig:
        """The frozen run configuration (``base_model`` resolved by the flow)."""
        sized = {} if resolution is None else {"resolution": resolution}
        train = TrainConfig(**sized)
        sample = SampleConfig(images_per_prompt=self.images_per_prompt, **sized)
        steps = {"steps": self.steps} if self.steps else {}
        methods = tuple(method_with_recipe(m, {**steps, **self.recipes.get(m, {})})
                        for m in self.methods)
        methods += tuple(method_from({**spec, "name": name, "recipe": {
            **steps, **dict(spec.get("recipe") or {})}}, f"variants.{name}")
            for name, spec in self.variants.items())
        config = RunConfig(
            model=ModelConfig(base_model=base_model),
            methods=methods, train=train, sample=sample,
            eval=eval_models or EvalConfig(),
            storage=StorageConfig(url=self.storage_url, endpoint_url=self.s3_endpoint_url,
                                  shared=self.storage_shared))
        return with_overrides(config, dict(self.overrides)) if self.overrides else config

    def derived_run_id(self) -> str:
        """A stable run id from the parameters that change results."""
        if self.run_id:
            return self.run_id
        payload = self.model_dump(exclude={"storage_url", "s3_endpoint_url", "storage_shared",
                                           "compute", "ray_address", "gpus_per_subject",
                                           "reuse_gpu_workers", "expect_gpus",
                                           "lost_worker_retries", "run_id"})
        return f"run-{config_hash(payload, length=10)}"
