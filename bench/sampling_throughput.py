"""Sampling throughput of :class:`eqdiff.method.sampling.ConceptGenerator`, with and without RRA,
against a plain ``StableDiffusionPipeline`` call on the same modules in the same process.

Rows per batch size: ``pipeline`` (diffusers, base model), ``base`` (our loop, no concept),
``kv`` (a concept with token + K/V), ``rra`` (token + K/V + RRA: one reference-UNet pass per
denoising step for the whole batch), ``rra xN`` (N batches in one call, the reference pass
once per step for all of them). On CUDA each of ours runs eagerly and, as ``… graph``, with
the UNet calls replayed from CUDA graphs (``sample.cuda_graphs``; capture included in the
time). With ``--compile`` a generator on a second copy of the modules runs them with
``sample.compile="regional"`` (and graphs on CUDA) as ``… compiled``; every variant's first
call (untimed warm-up, where it compiles) is reported too. Concepts carry random weights:
speed does not depend on the values. ``--tiny`` uses the tiny offline SD on the CPU (64 px);
otherwise random modules with SD-1.5's shapes (512 px), fp16 on CUDA when available. Rows are
printed, and the JSON rewritten, after each batch size.

    .venv/bin/python bench/sampling_throughput.py --tiny --out bench/results
    PYTHONUNBUFFERED=1 python3 bench/sampling_throughput.py --batch 8 --steps 50 --repeat 1 \
        --out "$OUT"    # the lent GPU: ~2 min
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from eqdiff.config import SampleConfig
from eqdiff.fixtures.zoo import build_tiny_sd, sd15_shaped_components
from eqdiff.method.concept import Concept, load_concept, save_concept
from eqdiff.method.models import SDComponents, load_sd_components
from eqdiff.method.reference import ReferenceBank, install_rra, rra_layer_names, rra_learned_tensors
from eqdiff.method.sampling import ConceptGenerator, ImageRequest, make_scheduler

PROMPTS = ["a <eqd> dog on the beach", "a watercolor painting of a <eqd> dog",
           "a <eqd> dog in the jungle", "a <eqd> dog wearing a hat"]


def _components(tiny: bool, folder: Path) -> tuple[SDComponents, torch.device, torch.dtype]:
    if tiny:
        source = build_tiny_sd(folder / "tiny-sd")
        return load_sd_components(str(source), local_files_only=True), torch.device("cpu"), \
            torch.float32
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    return sd15_shaped_components(device=device, dtype=dtype), device, dtype


def _concept(components: SDComponents, folder: Path, *, rra: bool) -> Concept:
    """A concept with random token, K/V (and RRA) tensors for this base model."""
    gen = torch.Generator().manual_seed(0)
    width = components.text_encoder.get_input_embeddings().weight.shape[1]
    tensors = {"eqdiff_token.vectors": torch.randn(2, width, generator=gen)}
    for name, param in components.unet.named_parameters():
        if ".attn2.to_k." in name or ".attn2.to_v." in name:
            tensors[f"eqdiff_kv.{name}"] = param.detach().float().cpu()
    if rra:
        unet = components.unet
        handle = install_rra(unet, ReferenceBank(), rra_layer_names(unet, ("mid", "up")))
        with torch.no_grad():
            for processor in handle.installed.values():
                processor.to_out.weight.normal_(0, 0.01)
                processor.to_out.bias[-1] = 0.5
        tensors.update({k: v.float().cpu() for k, v in rra_learned_tensors(handle).items()})
        handle.remove()
    record = {"subject": "dog", "class_noun": "dog", "placeholder_token": "<eqd>",
              "method": {"name": "eqdiff" if rra else "eqdiff-no-rra"}}
    return load_concept(save_concept(folder / ("rra" if rra else "kv"), tensors, record,
                                     base_model=components.source))


def _timed(runs: dict[str, Callable[[], object]], repeat: int,
           device: torch.device) -> tuple[dict[str, float], dict[str, float]]:
    """Fastest of ``repeat`` runs per variant after one warm-up each, variants interleaved
    round-robin so that load from other processes hits them alike (min: the least disturbed);
    and each variant's warm-up time."""
    def once(run: Callable[[], object]) -> float:
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def logged(name: str, what: str, run: Callable[[], object]) -> float:
        seconds = once(run)  # each time on stderr at once: a run cut short keeps them
        sys.stderr.write(f"{name}: {what} {seconds:.3f} s\n")
        sys.stderr.flush()
        return seconds

    first = {name: logged(name, "first call", run) for name, run in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            times[name].append(logged(name, "call", run))
    return {name: min(values) for name, values in times.items()}, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny offline SD on the CPU")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--steps", type=int, default=None,
                        help="denoising steps (default: 5 tiny, 20 full)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batches-per-call", type=int, default=4,
                        help="the 'rra xN' variant draws N batches in one call: its reference "
                             "pass runs once per step for all of them (as the pipeline's "
                             "generation stage does)")
    parser.add_argument("--variants", nargs="+", default=["base", "kv", "rra"],
                        choices=("base", "kv", "rra"), help="our variants (default: all)")
    parser.add_argument("--graphs", choices=("auto", "both", "off"), default="auto",
                        help="both: ours eagerly and with CUDA graphs (auto: both on CUDA)")
    parser.add_argument("--compile", action="store_true",
                        help="also run ours with sample.compile=regional (on a second copy of "
                             "the modules; graphed on CUDA)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the JSON results")
    args = parser.parse_args()
    if args.graphs == "both" and (args.tiny or not torch.cuda.is_available()):
        parser.error("--graphs both needs CUDA (and not --tiny)")
    steps = args.steps or (5 if args.tiny else 20)
    resolution = 64 if args.tiny else 512

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        components, device, dtype = _components(args.tiny, folder)
        kv_concept = _concept(components, folder, rra=False)
        rra_concept = _concept(components, folder, rra=True)
        sample = SampleConfig(steps=steps, resolution=resolution, batch_size=max(args.batch),
                              cuda_graphs="off")
        generators = {"": ConceptGenerator(components, sample, device=device, dtype=dtype)}
        graphs = args.graphs == "both" or (args.graphs == "auto" and device.type == "cuda")
        if graphs:
            generators[" graph"] = ConceptGenerator(components, replace(sample, cuda_graphs="on"),
                                                    device=device, dtype=dtype)
        if args.compile:  # its own modules: compiling blocks changes them for every user
            generators[" compiled"] = ConceptGenerator(
                _components(args.tiny, folder / "compiled")[0],
                replace(sample, cuda_graphs="on" if graphs else "off", compile="regional"),
                device=device, dtype=dtype)
        pipe = components.pipeline(make_scheduler("ddim", components.noise_scheduler.config))
        pipe.set_progress_bar_config(disable=True)
        reference = torch.rand(3, resolution, resolution,
                               generator=torch.Generator().manual_seed(1)) * 2 - 1
        concepts = {"base": (None, None), "kv": (kv_concept, None),
                    "rra": (rra_concept, reference)}

        rows = []
        sys.stdout.write(f"{'batch':>5} {'variant':>18} {'s/call':>9} {'img/s':>8} "
                         f"{'vs pipeline':>12} {'first call s':>13}\n")
        for batch in args.batch:
            requests = [ImageRequest(PROMPTS[i % len(PROMPTS)], seed=i) for i in range(batch)]
            prompts = [r.prompt for r in requests]
            runs: dict[str, Callable[[], object]] = {
                "pipeline": lambda p=prompts, b=batch: pipe(
                    p, num_inference_steps=steps, height=resolution, width=resolution,
                    generator=[torch.Generator().manual_seed(i) for i in range(b)],
                    output_type="pt")}
            images = {"pipeline": batch}
            calls = args.batches_per_call
            many = [ImageRequest(PROMPTS[i % len(PROMPTS)], seed=i) for i in range(batch * calls)]
            for suffix, generator in generators.items():
                for name in args.variants:
                    concept, image = concepts[name]
                    runs[name + suffix] = lambda g=generator, c=concept, i=image, r=requests: (
                        g.generate(c, r, reference_image=i))
                    images[name + suffix] = batch
                    if name == "rra" and calls > 1:
                        runs[f"rra x{calls}{suffix}"] = lambda g=generator, b=batch, m=many: (
                            g.generate(rra_concept, m, reference_image=reference, batch_size=b))
                        images[f"rra x{calls}{suffix}"] = batch * calls
            seconds, first = _timed(runs, args.repeat, device)
            per_image_pipeline = seconds["pipeline"] / batch
            for name, value in seconds.items():
                row = {"batch": batch, "variant": name, "seconds": round(value, 4),
                       "images_per_s": round(images[name] / value, 3),
                       "vs_pipeline": round(per_image_pipeline * images[name] / value, 3),
                       "first_call_s": round(first[name], 2)}
                rows.append(row)
                sys.stdout.write(f"{batch:>5} {name:>18} {row['seconds']:>9.3f} "
                                 f"{row['images_per_s']:>8.2f} {row['vs_pipeline']:>12.2f} "
                                 f"{row['first_call_s']:>13.1f}\n")
            sys.stdout.flush()
            _save(args.out, args.tiny, device, dtype, steps, resolution, sample, rows)


def _save(out: Path | None, tiny: bool, device: torch.device, dtype: torch.dtype, steps: int,
          resolution: int, sample: SampleConfig, rows: list[dict]) -> None:
    if out is None:
        return
    result = {"model": "tiny-sd" if tiny else "sd15-shaped-random", "device": str(device),
              "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                              else platform.processor() or platform.machine()),
              "dtype": str(dtype), "steps": steps, "resolution": resolution,
              "guidance_scale": sample.guidance_scale, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    name = "sampling_tiny.json" if tiny else f"sampling_{device.type}.json"
    (out / name).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
