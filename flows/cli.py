"""The ``eqdiff`` command line: runs, the demo, reports, the local server, deployments, concepts.

It lives with the flows (the top of the import order: flows → tasks → eqdiff) because most
commands start flows; commands that need no Prefect import none.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

logger = logging.getLogger("eqdiff")

DEMO_METHODS = ["eqdiff", "custom-diffusion"]


# --------------------------------------------------------------------------- runs

def load_run_file(path: str | Path) -> dict[str, Any]:
    """A YAML run file: the flow's parameter names as keys; unknown keys are errors."""
    import yaml

    text = Path(path).read_text("utf-8")
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise SystemExit(f"{path}: a run file is a mapping of parameter names to values")
    return data


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``name=value`` pairs; values are read as YAML (numbers, lists, true/false). A dotted
    name (``train.learning_rate=1e-5``) is an advanced setting: it goes to ``overrides``."""
    import yaml

    values: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise RunRefused(f"--set expects name=value, got {pair!r}")
        if "." in name:
            values.setdefault("overrides", {})[name] = yaml.safe_load(raw)
        else:
            values[name] = yaml.safe_load(raw)
    return values


def _yaml_mapping(text: str) -> dict[str, Any]:
    """An argparse type: a YAML mapping given on the command line."""
    import yaml

    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise argparse.ArgumentTypeError(f"expected a YAML mapping, got {text!r}")
    return data


def merge_run_data(file_data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A run file's parameters with ``--set`` ones on top (advanced settings merged)."""
    data = {**file_data, **overrides}
    if "overrides" in file_data and "overrides" in overrides:
        data["overrides"] = {**file_data["overrides"], **overrides["overrides"]}
    return data


def _params(data: dict[str, Any]):  # CustomizeParams
    from pydantic import ValidationError

    from flows.params import CustomizeParams

    try:
        return CustomizeParams(**data)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(part) for part in e['loc']) or 'parameters'}: "
                             f"{_plain(e)}" for e in error.errors())
        raise RunRefused(f"invalid run parameters: {problems}") from None


def _plain(error: dict) -> str:
    """One pydantic error in words ("unknown parameter" for a key the run does not have)."""
    if error["type"] == "extra_forbidden":
        return "unknown parameter"
    return str(error["msg"]).removeprefix("Value error, ")


def _run_flow(params, *, start_server: bool) -> dict:  # CustomizeParams
    # Prefect is imported only after ensure_server() has set PREFECT_API_URL: Prefect fixes its
    # settings when first imported, and prefect-ray hands those settings to the Ray workers,
    # whose events then went nowhere ("Service 'EventsWorker' failed to process item").
    if start_server:
        from flows.server import ensure_server

        server = ensure_server()
        logger.info("Prefect UI: %s", server.ui_url)
    from tasks.logs import STAGE_LOGGERS

    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", ",".join(STAGE_LOGGERS))
    # lines logged outside a flow run (this command's own summary) stay on the terminal only
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    from flows.customize import customize_dataset

    try:
        state = customize_dataset(params, return_state=True)
    finally:
        _stop_ray()  # interrupted or not: no Ray process of ours outlives the command
    record = state.result(raise_on_failure=False)
    if isinstance(record, BaseException):
        raise RunRefused(_first_line(record)) from record
    flow_run_id = state.state_details.flow_run_id
    api = os.environ.get("PREFECT_API_URL", "")
    if api and flow_run_id:
        logger.info("flow run: %s/runs/flow-run/%s", api.removesuffix("/api"), flow_run_id)
    return record


def _stop_ray() -> None:
    """Disconnect from Ray; a local instance this process started stops with it."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def _terminate_as_interrupt(signum: int, frame: Any) -> None:
    """SIGTERM (a container stop, a process manager) ends a run as Ctrl-C does: Prefect marks
    its flow and task runs Crashed and the local Ray instance is stopped."""
    raise KeyboardInterrupt(f"signal {signum}")


class RunRefused(Exception):
    """The run stopped before or outside its units: a bad dataset, base model, store or
    setting, a held lease, ... The message is one line for the user."""


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return f"{type(error).__name__}: {text.splitlines()[0]}"


EXIT_REFUSED = 2  # the run could not start (or stopped as a whole); nothing was half done
EXIT_FAILED = 1  # no requested unit was done
EXIT_PARTIAL = 3  # some units done, some failed
EXIT_INTERRUPTED = 130


def _summarise(record: dict) -> int:
    """Log the outcome per (subject, method) unit and the dataset's problems; the exit code is
    0 only when every requested unit is done."""
    units = record["units"]
    failed = {k: v for k, v in units.items() if v != "done"}
    logger.info("run %s: %d of %d units done", record["run_id"], len(units) - len(failed),
                len(units))
    for key, status in failed.items():
        logger.error("  %s — %s", key, status.removeprefix("failed: "))
    for problem in record["dataset_problems"]:
        logger.warning("  dataset: %s", problem["message"])
    if record.get("report"):
        logger.info("report: %s", record["report"]["location"])
    if not failed:
        return 0
    return EXIT_PARTIAL if len(failed) < len(units) else EXIT_FAILED


def _run_params(args: argparse.Namespace):  # CustomizeParams
    data = load_run_file(args.config) if args.config else {}
    return _params(merge_run_data(data, parse_overrides(args.set or [])))


def _cmd_run(args: argparse.Namespace) -> int:
    params = _run_params(args)
    if args.dry_run:
        return _show_plan(params)
    _preflight(params)
    return _summarise(_run_flow(params, start_server=not args.no_server))


def _preflight(params):  # CustomizeParams -> RunSetup
    """The run's dataset, subjects, base model and store, checked here before any Prefect
    server or flow starts: a mistake costs seconds (the flow checks them again, for runs
    started from the UI)."""
    from eqdiff.store import StorageError
    from flows.preflight import prepare_run

    try:
        return prepare_run(params)
    except (ValueError, OSError, StorageError) as error:
        raise RunRefused(_first_line(error)) from error


def _cmd_plan(args: argparse.Namespace) -> int:
    return _show_plan(_run_params(args))


def _show_plan(params, previous: dict | None = None) -> int:  # CustomizeParams
    """Print what a run of ``params`` would do, per (subject, method) and stage; nothing runs
    and no Prefect server or Ray instance is started."""
    from flows.preflight import previous_record

    setup = _preflight(params)
    plan = setup.plan()
    if previous is None:
        previous = previous_record(setup.store, setup.ctx.run_id)
    sys.stdout.write(format_plan(plan, previous) + "\n")
    return 0


def format_plan(plan, previous: dict) -> str:  # RunPlan
    """The plan as a text table, with a summary line and, per unit, its last outcome."""
    import pandas as pd

    table = pd.DataFrame(plan.table(previous))
    if table["last run"].eq("").all():
        table = table.drop(columns="last run")
    else:
        table["last run"] = table["last run"].str.slice(0, 80)
    lines = [plan.summary(), "", table.to_string(index=False)]
    if previous.get("dataset_problems"):
        lines += ["", "dataset problems in the last run:"]
        lines += [f"  {p['message']}" for p in previous["dataset_problems"]]
    return "\n".join(lines)


def _cmd_status(args: argparse.Namespace) -> int:
    """The state of a run id in a store: its plan under the parameters it was run with."""
    from eqdiff.store import open_store
    from eqdiff.store.errors import ArtifactNotFoundError
    from eqdiff.store.keys import run_lease, run_record

    store = open_store(args.store, endpoint_url=args.endpoint_url)
    try:
        record = store.get_json(run_record(args.run_id))
    except ArtifactNotFoundError:
        raise RunRefused(f"{store.location(run_record(args.run_id))} does not exist: run "
                         f"{args.run_id!r} never finished in this store (eqdiff plan shows "
                         "what a run would do)") from None
    try:
        lease = store.get_json(run_lease(args.run_id))
        sys.stdout.write(f"a run of {args.run_id} holds its lease: {lease.get('holder')} "
                         f"(expires {lease.get('expires_at')} unless renewed)\n")
    except ArtifactNotFoundError:
        pass
    return _show_plan(_params(record["params"]), previous=record)


def _cmd_demo(args: argparse.Namespace) -> int:
    from eqdiff.fixtures import fixture_run_overrides

    started = time.perf_counter()
    params = _params({"dataset": "toyworld", "base_model": "toy", "methods": DEMO_METHODS,
                      "steps": args.steps, "images_per_prompt": 2,
                      "storage_url": args.store,
                      "compute": "local" if args.local else "ray", "run_id": args.run_id,
                      "overrides": {**fixture_run_overrides("toy"), "train.checkpoint_every": 100}})
    record = _run_flow(params, start_server=not args.no_server)
    code = _summarise(record)
    logger.info("demo finished in %.0f s", time.perf_counter() - started)
    return code


# --------------------------------------------------------------------------- reports, zoo

def _cmd_report(args: argparse.Namespace) -> int:
    import webbrowser

    from eqdiff.evaluation.scores import rebuild_report
    from eqdiff.store import keys, open_store

    out = Path(args.out or Path("artifacts") / "reports" / args.run_id)
    store = open_store(args.store, endpoint_url=args.endpoint_url)
    page = rebuild_report(store, args.run_id, out)
    logger.info("report: %s (also stored under runs/%s/report/)", page.resolve(), args.run_id)
    if args.link:
        key = keys.join_key(keys.report_prefix(args.run_id), page.name)
        until = datetime.now(UTC) + timedelta(seconds=args.link)
        logger.info("link to the stored report, valid for %d s (until %s UTC); anyone who has "
                    "it can read the report until then: %s", args.link,
                    until.strftime("%Y-%m-%d %H:%M"), store.url_for(key, expires_s=args.link))
    if args.open:
        webbrowser.open(page.resolve().as_uri())
    return 0


def _cmd_zoo(args: argparse.Namespace) -> int:
    from eqdiff.fixtures.zoo import build_zoo

    for role, folder in build_zoo(args.folder).items():
        logger.info("%s: %s", role, folder.resolve())
    return 0


# --------------------------------------------------------------------------- the toy world

def _cmd_toyworld_train_base(args: argparse.Namespace) -> int:
    from eqdiff.fixtures.toyworld.base_model import BaseTrainConfig, train_base_model

    chosen = {name: getattr(args, name) for name in ("seed", "corpus_size", "vae_steps",
                                                      "unet_steps", "threads")}
    settings = BaseTrainConfig(**{k: v for k, v in chosen.items() if v is not None})
    record = train_base_model(args.out, settings)
    logger.info("trained in %.0f s: %s", record["timings"]["total_s"], args.out)
    return 0


def _cmd_toyworld_train_evaluators(args: argparse.Namespace) -> int:
    from eqdiff.fixtures.toyworld.evaluators import EvaluatorConfig, train_evaluators

    record = train_evaluators(args.out, EvaluatorConfig(seed=args.seed), parts=args.parts)
    logger.info("evaluators written to %s: %s", args.out, record["checks"]["accuracy"])
    return 0


def _cmd_toyworld_card(args: argparse.Namespace) -> int:
    from eqdiff.fixtures.toyworld.card import write_model_card

    logger.info("model card: %s", write_model_card(args.models))
    return 0


def _cmd_toyworld_benchmark(args: argparse.Namespace) -> int:
    if not args.no_server:
        from flows.server import ensure_server

        ensure_server()
    from flows.toy_benchmark import ToyBenchmarkParams, toy_benchmark  # after PREFECT_API_URL

    defaults = ToyBenchmarkParams()
    params = ToyBenchmarkParams(seeds=args.seeds, methods=args.methods or defaults.methods,
                                variants=args.variants, steps=args.steps,
                                steps_scale=args.steps_scale, images_per_prompt=args.images,
                                storage_url=args.store,
                                compute="ray" if args.ray else "local", out=args.out)
    result = toy_benchmark(params)
    record_file = Path(args.out) / "benchmark.json"  # the command beside what it produced
    record = json.loads(record_file.read_text("utf-8"))
    record["command"] = " ".join(["eqdiff", *(shlex.quote(a) for a in sys.argv[1:])])
    record_file.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    sys.stdout.write(Path(result["summary"]).read_text("utf-8"))
    return 0


# --------------------------------------------------------------------------- server

def _cmd_server(args: argparse.Namespace) -> int:
    from flows.server import DEFAULT_HOME, ensure_server, healthy, local_api_url, stop_server

    if args.action == "start":
        database_url = args.database_url or os.environ.get("EQDIFF_PREFECT_DATABASE_URL", "")
        server = ensure_server(port=args.port, host=args.host,
                               advertise_url=args.advertise_url or None,
                               database_url=database_url or None)
        logger.info("Prefect server: %s (UI %s)", server.api_url, server.ui_url)
        logger.info("flows and workers use it with: export PREFECT_API_URL=%s", server.api_url)
    elif args.action == "stop":
        logger.info("stopped" if stop_server(DEFAULT_HOME) else "no server started by eqdiff")
    else:
        url = local_api_url(args.host, args.port)
        logger.info("%s: %s", url, "healthy" if healthy(url) else "not answering")
    return 0


def _cmd_deploy(args: argparse.Namespace) -> int:
    from flows.server import ensure_server

    if not args.no_server:
        ensure_server()
    from flows.deploy import deploy_all  # after PREFECT_API_URL is set (see _run_flow)

    for name in deploy_all(work_pool=args.work_pool):
        logger.info("deployed %s", name)
    logger.info("start a worker: prefect worker start --pool %s --type process", args.work_pool)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from flows.server import ensure_server

    if not args.no_server:
        server = ensure_server()
        logger.info("Prefect UI: %s — trigger runs from Deployments", server.ui_url)
    from flows.deploy import serve_all  # after PREFECT_API_URL is set (see _run_flow)

    serve_all()
    return 0


# --------------------------------------------------------------------------- concepts

def _load_concept(path: str):  # Concept
    """The concept folder (or its .safetensors file) named on the command line; a concept
    that is missing or malformed stops the command with one line."""
    from eqdiff.method.concept import ConceptError, load_concept

    try:
        return load_concept(path)
    except ConceptError as error:
        raise RunRefused(str(error)) from error


def _cmd_concept_generate(args: argparse.Namespace) -> int:
    import torch

    from eqdiff.config import SampleConfig
    from eqdiff.data.images import load_image, normalise_image, pil_to_tensor
    from eqdiff.method.sampling import ConceptGenerator, plan_requests

    concept = _load_concept(args.concept)
    token, class_noun = concept.placeholder_token, concept.record.get("class_noun", "")
    prompts = [p.replace("{token}", token).replace("{class_noun}", class_noun)
               for p in args.prompt]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sample = SampleConfig(steps=args.steps, images_per_prompt=args.images, seed=args.seed,
                          resolution=args.resolution)
    generator = ConceptGenerator.from_pretrained(
        args.base_model, sample, device=device,
        dtype=torch.bfloat16 if device == "cuda" else None,
        local_files_only=not args.allow_downloads)
    reference = None
    if args.reference:
        reference = pil_to_tensor(normalise_image(load_image(args.reference),
                                                  args.resolution).image)
    requests = plan_requests(concept.record.get("subject", "concept"), prompts, args.images,
                             args.seed)
    out = Path(args.out)
    for image in generator.generate(concept, requests, reference_image=reference):
        path = image.save(out / f"{image.record['prompt_index']:02d}_{image.record['k']}.png")
        logger.info("%s: %s", path, image.record["prompt"])
    return 0


def _cmd_concept_export(args: argparse.Namespace) -> int:
    from eqdiff.method.concept import ConceptError
    from eqdiff.method.export import EXPORT_README_FILE, EXPORT_RECORD_FILE, export_concept

    concept = _load_concept(args.concept)
    try:
        result = export_concept(concept, args.out, overwrite=args.overwrite)
    except ConceptError as error:
        raise RunRefused(str(error)) from error
    for part in result.parts:
        logger.info("wrote %s: %s", result.folder / part.file, part.holds)
    logger.info("wrote %s and %s: base model, token, files and the diffusers code that loads "
                "them", result.folder / EXPORT_README_FILE, result.folder / EXPORT_RECORD_FILE)
    for line in result.left_out:
        logger.warning("%s", line)
    return 0


# --------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eqdiff",
        description="Equilibrated Diffusion subject customization at dataset scale "
                    "(Prefect flows, Ray workers, local or S3 artifacts).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error that stops a run")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run", help="customize a whole dataset (the customize-dataset flow)",
        description="Runs the customize-dataset flow. Parameters come from a YAML run file "
                    "(the flow's parameter names) and --set overrides.")
    run.add_argument("-c", "--config", help="YAML run file, e.g. examples/dreambench.yaml")
    run.add_argument("--set", action="append", metavar="NAME=VALUE",
                     help="override a parameter, e.g. --set steps=300 --set "
                          "'methods=[eqdiff, custom-diffusion]'")
    run.add_argument("--no-server", action="store_true",
                     help="do not start a local Prefect server (use PREFECT_API_URL or "
                          "Prefect's temporary server)")
    run.add_argument("--dry-run", action="store_true",
                     help="print what the run would do (eqdiff plan) and run nothing")
    run.set_defaults(handler=_cmd_run)

    plan = commands.add_parser(
        "plan", help="what a run would do: each stage of each (subject, method), done or to run",
        description="Checks the run's dataset, base model and store, computes every stage's "
                    "inputs hash and compares it with the store's markers. Runs nothing; "
                    "starts no Prefect server and no Ray.")
    plan.add_argument("-c", "--config", help="YAML run file")
    plan.add_argument("--set", action="append", metavar="NAME=VALUE",
                      help="override a parameter, as for eqdiff run")
    plan.set_defaults(handler=_cmd_plan)

    status = commands.add_parser(
        "status", help="a run id's state: done, to run and last failures per unit",
        description="Reads the run's record (run.json) and markers from the store and shows "
                    "each (subject, method) stage as done or to run, with the last outcome.")
    status.add_argument("run_id", help="name of the run in the store")
    status.add_argument("--store", default="./artifacts", help="artifact store URL")
    status.add_argument("--endpoint-url", default="", help="S3-compatible endpoint")
    status.set_defaults(handler=_cmd_status)

    demo = commands.add_parser(
        "demo", help="the whole job on the toy world with its trained offline models",
        description="Starts a local Prefect server and local Ray if needed, draws the toy "
                    "world's novel subjects, customizes them with EqDiff and Custom Diffusion "
                    "on the toy base model, evaluates with the toy CLIP and DINO stand-in and "
                    "writes the report. Finished stages are skipped on a rerun.")
    demo.add_argument("--store", default="./artifacts",
                      help="artifact store: a folder, file:///… or s3://bucket/prefix")
    demo.add_argument("--steps", type=int, default=250, help="training steps per concept")
    demo.add_argument("--run-id", default="demo", help="name of the run in the store")
    demo.add_argument("--local", action="store_true", help="run tasks in this process, no Ray")
    demo.add_argument("--no-server", action="store_true",
                      help="do not start a local Prefect server")
    demo.set_defaults(handler=_cmd_demo)

    report = commands.add_parser(
        "report", help="(re)build a run's report from its stored scores",
        description="Reads runs/{run}/scores/*/*/scores.parquet and run.json from the store; "
                    "nothing is recomputed.")
    report.add_argument("--store", default="./artifacts", help="artifact store URL")
    report.add_argument("--endpoint-url", default="", help="S3-compatible endpoint")
    report.add_argument("--run-id", required=True, help="name of the run in the store")
    report.add_argument("--out", default="", help="local folder for the report files "
                                                  "(default artifacts/reports/RUN)")
    report.add_argument("--open", action="store_true", help="open report.html in a browser")
    report.add_argument("--link", type=int, default=0, metavar="SECONDS",
                        help="also print a link to the stored report that a browser can open "
                             "(presigned on S3) and that expires after SECONDS (max 604800)")
    report.set_defaults(handler=_cmd_report)

    server = commands.add_parser(
        "server", help="a Prefect server: local (127.0.0.1, SQLite) or shared (0.0.0.0, Postgres)",
        description="Starts, stops or checks a Prefect server run from the Prefect home "
                    "~/.eqdiff/prefect. Bound to 0.0.0.0 it advertises an API URL other "
                    "machines can reach; 'start' prints the PREFECT_API_URL workers should use.")
    server.add_argument("action", choices=["start", "stop", "status"])
    server.add_argument("--port", type=int, default=4200)
    server.add_argument("--host", default="127.0.0.1",
                        help="address to bind: 0.0.0.0 lets other machines reach the server")
    server.add_argument("--advertise-url", default="",
                        help="the API URL other machines use, e.g. http://head-node:4200/api "
                             "(default with --host 0.0.0.0: this machine's primary IPv4 address)")
    server.add_argument("--database-url", default="",
                        help="keep the server's state in this database, e.g. "
                             "postgresql+asyncpg://user:PASSWORD@db:5432/prefect (default: "
                             "$EQDIFF_PREFECT_DATABASE_URL, else SQLite in the Prefect home); "
                             "prefer the variable: a command line is visible to other users")
    server.set_defaults(handler=_cmd_server)

    deploy = commands.add_parser(
        "deploy", help="create the deployments of deployments/prefect.yaml on a process pool",
        description="Creates the work pool if missing and the customize-dataset and "
                    "nightly-reevaluation deployments; start a worker to run them.")
    deploy.add_argument("--work-pool", default="eqdiff-process")
    deploy.add_argument("--no-server", action="store_true",
                        help="use PREFECT_API_URL instead of a local server")
    deploy.set_defaults(handler=_cmd_deploy)

    serve = commands.add_parser(
        "serve", help="serve the deployments from this process (no pool or worker needed)")
    serve.add_argument("--no-server", action="store_true",
                       help="use PREFECT_API_URL instead of a local server")
    serve.set_defaults(handler=_cmd_serve)

    concept = commands.add_parser("concept", help="use a trained concept")
    concept_commands = concept.add_subparsers(dest="concept_command", required=True)
    generate = concept_commands.add_parser(
        "generate", help="draw images from a saved concept with your prompts",
        description="Prompts may use {token} and {class_noun}, e.g. "
                    "'a watercolor painting of a {token} {class_noun}'.")
    generate.add_argument("concept", help="concept folder (concept.safetensors + concept.json)")
    generate.add_argument("--base-model", required=True,
                          help="the base model the concept was trained on (folder or hub id)")
    generate.add_argument("-p", "--prompt", action="append", required=True)
    generate.add_argument("--reference", help="reference photo (required for EqDiff concepts "
                                              "with residual reference attention)")
    generate.add_argument("--images", type=int, default=4, help="images per prompt")
    generate.add_argument("--steps", type=int, default=50)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--resolution", type=int, default=512)
    generate.add_argument("--out", default="generated")
    generate.add_argument("--allow-downloads", action="store_true",
                          help="fetch a base model missing from the local Hugging Face cache "
                               "(safetensors only); off: local folders and the cache only")
    generate.set_defaults(handler=_cmd_concept_generate)
    export = concept_commands.add_parser(
        "export", help="write a saved concept in diffusers' own formats (no eqdiff needed)",
        description="Writes the token as a textual-inversion embedding and the K/V weights as "
                    "Custom Diffusion attention processors, with README.md and export.json "
                    "holding the plain-diffusers code that loads them. Residual reference "
                    "attention has no diffusers equivalent and is left out (said so).")
    export.add_argument("concept", help="concept folder (concept.safetensors + concept.json), "
                                        "e.g. artifacts/runs/RUN/concepts/SUBJECT/METHOD")
    export.add_argument("--out", required=True, help="folder to write (empty or new)")
    export.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty folder, replacing files of the same names")
    export.set_defaults(handler=_cmd_concept_export)

    toy = commands.add_parser(
        "toyworld", help="the toy world: train its base model and evaluators, its benchmark")
    toy_commands = toy.add_subparsers(dest="toy_command", required=True)
    from eqdiff.fixtures.toyworld import MODELS_ROOT

    train_base = toy_commands.add_parser(
        "train-base", help="train the toy base model from scratch (under an hour on a CPU)",
        description="Renders the corpus, trains the VAE, then the text encoder and UNet; "
                    "writes the diffusers folder and training.json. Options left out take "
                    "the values that trained the committed model.")
    train_base.add_argument("--out", default=str(MODELS_ROOT / "base"))
    for option in ("seed", "corpus-size", "vae-steps", "unet-steps", "threads"):
        train_base.add_argument(f"--{option}", type=int, default=None)
    train_base.set_defaults(handler=_cmd_toyworld_train_base)
    train_eval = toy_commands.add_parser(
        "train-evaluators", help="train the toy CLIP and DINO stand-in (about 15 min)")
    train_eval.add_argument("--out", default=str(MODELS_ROOT))
    train_eval.add_argument("--seed", type=int, default=0)
    train_eval.add_argument(
        "--parts", nargs="+", choices=("clip", "dino"), default=["clip", "dino"],
        help="which to (re)train; the other is kept from --out (it must have the same config)")
    train_eval.set_defaults(handler=_cmd_toyworld_train_evaluators)
    card = toy_commands.add_parser(
        "card", help="sample grids, loss curves and evaluator checks into the model card")
    card.add_argument("--models", default=str(MODELS_ROOT))
    card.set_defaults(handler=_cmd_toyworld_card)
    bench = toy_commands.add_parser(
        "benchmark", help="EqDiff, its ablations and the baselines on the toy world, per seed",
        description="Runs the customize-dataset flow once per seed on the toyworld dataset "
                    "and summarises scores by method and by what the prompt changes.")
    bench.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    bench.add_argument("--methods", nargs="+", default=None)
    bench.add_argument("--variants", type=_yaml_mapping, default={},
                       help="further methods as YAML, e.g. '{eqdiff-mgdp-loss-only: {preset: "
                            "eqdiff, mgdp_parts: loss-only}}'")
    bench.add_argument("--steps-scale", type=float, default=0.25,
                       help="every method's recipe steps × this")
    bench.add_argument("--steps", type=int, default=0,
                       help="training steps of every method (0: recipes × --steps-scale)")
    bench.add_argument("--images", type=int, default=2, help="images per prompt")
    bench.add_argument("--store", default="./artifacts")
    bench.add_argument("--out", default="artifacts/toy-benchmark")
    bench.add_argument("--ray", action="store_true", help="run tasks on Ray (default: local)")
    bench.add_argument("--no-server", action="store_true",
                       help="do not start a local Prefect server")
    bench.set_defaults(handler=_cmd_toyworld_benchmark)

    zoo = commands.add_parser("zoo", help="build the tiny offline models into a folder")
    zoo.add_argument("folder", nargs="?", default="artifacts/zoo")
    zoo.set_defaults(handler=_cmd_zoo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for chatty in ("httpx", "httpcore"):  # one line per Prefect API call otherwise
        logging.getLogger(chatty).setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    try:
        return args.handler(args)
    except RunRefused as refused:
        if args.debug:
            raise
        logger.error("%s (--debug shows the traceback)", refused)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        logger.error("interrupted: the run's flow and task runs are marked Crashed; run the "
                     "same command again to continue where it stopped")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
