"""Training-step benchmark: ``ConceptTrainer.train_step`` against a plain diffusers-style loop.

For each method preset (textual-inversion, custom-diffusion, eqdiff-no-rra, eqdiff) this times
our trainer's step after warm-up (median and p90 of many steps) and its peak memory, and — in
the same process, on the same components, with the same trainable tensors and batch — a
reference loop in the shape of diffusers' ``train_custom_diffusion.py`` /
``textual_inversion.py``: VAE encode, text encoder on every prompt, noise, UNet, MSE (+ prior
MSE), backward, grad-clip, AdamW, ``loss.item()``. The table reports ours/reference ratios,
which are what compare across machines.

The reference trains exactly our tensors: one placeholder vector injected at the token's
position (not the whole embedding table the diffusers scripts train) and, where the method
trains K/V, diffusers' own ``CustomDiffusionAttnProcessor2_0`` on the 16 cross-attentions
(K/V copies of the pretrained ones, ``train_q_out=False``). Its batch is the method's batch
(2 instance + 2 prior, or 2 instance for textual inversion, which has no prior preservation).
It has no RRA, so the "eqdiff" row's ratio is RRA + reference pass + EqDiff losses against the
K/V + token loop. Images are on the device before the loop (no data loader in either loop).

Both loops run under the trainer's precision (``precision="auto"``: bf16 autocast on CUDA with
fp32 frozen weights, plain fp32 on CPU). On CUDA a second pass (``--bf16-frozen``, default on
CUDA) casts the frozen modules to bf16 and runs everything again, measuring that lever (the
diffusers scripts keep frozen weights in the half-precision ``weight_dtype``). On CUDA our
trainer runs twice per method, eagerly and with its CUDA-graph step (``--graphs``), and the
two runs' per-step losses are compared. ``--compile`` adds a run with ``train.compile=
"regional"`` (graphed on CUDA): its step time, its first step's time (the compile, cold or warm
as the inductor cache is) and its losses against the eager run's, then the same run again in
this process (``ours_compiled_again``: a kept Ray worker's next subject, which compiles nothing).

    # tiny offline model on CPU, 64 px (seconds)
    .venv/bin/python bench/train_step.py --tiny --out bench/results
    # SD-1.5-shaped random model at 512 px on CUDA, the trainer's GPU default pass only
    # (the lent H100: ~95 s)
    PYTHONUNBUFFERED=1 .venv/bin/python bench/train_step.py --bf16-frozen only --out bench/results
    # the full path's code on CPU at a small size (sanity check, not a measurement)
    .venv/bin/python bench/train_step.py --device cpu --resolution 128 --steps 1 --warmup 0

Results go to ``FOLDER/train_step.json`` (rewritten after every method, so a run cut short
still leaves what it measured) and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import diffusers
import torch
import torch.nn.functional as F
import transformers
from diffusers.models.attention_processor import Attention, CustomDiffusionAttnProcessor2_0
from torch import Tensor, nn

from eqdiff.config import MethodConfig, RunConfig, TrainConfig, method_preset
from eqdiff.fixtures.zoo import build_tiny_sd, sd15_shaped_components
from eqdiff.method.embeddings import add_placeholder_token
from eqdiff.method.models import SDComponents, load_sd_components
from eqdiff.method.reference import training_extensions
from eqdiff.method.training import (
    CLASS_PROMPT,
    INSTANCE_PROMPT,
    ConceptData,
    ConceptTrainer,
    autocast_dtype,
)

logger = logging.getLogger("bench.train_step")

DEFAULT_METHODS = ("textual-inversion", "custom-diffusion", "eqdiff-no-rra", "eqdiff")
INSTANCE_IMAGES = 4
PRIOR_IMAGES = 8
CLASS_NOUN = "dog"


# --------------------------------------------------------------------------- setup

def make_data(resolution: int, device: torch.device, seed: int = 0) -> ConceptData:
    """Random concept images, rectangular masks and class images, on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(INSTANCE_IMAGES, 3, resolution, resolution, generator=gen) * 2 - 1
    masks = torch.zeros(INSTANCE_IMAGES, 1, resolution, resolution)
    lo, hi = resolution // 4, 3 * resolution // 4
    masks[:, :, lo:hi, lo:hi] = 1
    prior = torch.rand(PRIOR_IMAGES, 3, resolution, resolution, generator=gen) * 2 - 1
    return ConceptData("bench", CLASS_NOUN, images.to(device), masks.to(device),
                       prior.to(device))


def run_config(method: MethodConfig, resolution: int, steps: int, token: str,
               precision: str = "auto", frozen_weights: str = "as-loaded",
               cuda_graphs: str = "off", batch_multiple: int = 1,
               compile_mode: str = "off") -> RunConfig:
    """The released training settings, with this run's size and a placeholder of its own.

    ``frozen_weights="as-loaded"``: the trainer keeps the components' dtype, which each pass
    of this benchmark sets itself (fp32 pass, then bf16 pass), so both loops see the same."""
    batches = TrainConfig()
    return RunConfig(methods=(method,), train=TrainConfig(
        instance_batch=batches.instance_batch * batch_multiple,
        prior_batch=batches.prior_batch * batch_multiple,
        steps=steps, resolution=resolution, num_prior_images=PRIOR_IMAGES,
        placeholder_token=token, checkpoint_every=0, precision=precision,
        frozen_weights=frozen_weights, cuda_graphs=cuda_graphs, compile=compile_mode))


class _TokenNames:
    """Fresh placeholder names: the tokenizer keeps every placeholder a run adds."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, kind: str) -> str:
        self.count += 1
        return f"<eqdbench{kind}{self.count}>"


# --------------------------------------------------------------------------- our trainer

_LIVE_TRAINERS: list[ConceptTrainer] = []


class _BenchTrainer(ConceptTrainer):
    """``ConceptTrainer`` that registers itself before installing anything, so that a failure
    (OOM) later in ``__init__`` can still be undone with :meth:`ConceptTrainer.remove`."""

    def _install(self, data: ConceptData) -> None:
        _LIVE_TRAINERS.append(self)
        super()._install(data)


# --------------------------------------------------------------------------- reference loop

class ReferenceLoop:
    """The classic diffusers customization step, written out plainly.

    Per step: draw images, VAE encode (``latent_dist.sample()``), text encoder on every
    prompt, noise and timesteps on the device, UNet, masked instance MSE + prior MSE,
    backward, grad-clip, AdamW (default foreach, as the scripts use), ``loss.item()``.
    """

    def __init__(self, components: SDComponents, data: ConceptData, config: RunConfig,
                 method: MethodConfig, device: torch.device) -> None:
        c = self.components = components.freeze()
        tcfg = config.training(method)
        self.device = device
        self.amp_dtype = autocast_dtype(config, device)
        self.prior_weight = config.losses.prior_weight
        self.grad_clip = tcfg.grad_clip
        self.images, self.prior_images = data.images, data.prior_images
        latent_side = c.latent_size(data.images.shape[-1])
        self.latent_masks = F.interpolate(data.masks.float(), size=latent_side, mode="nearest")
        self.bi = tcfg.instance_batch
        self.bp = tcfg.prior_batch if method.prior_preservation else 0
        # token: one trainable vector injected where the placeholder id is
        self.token_id, initial = add_placeholder_token(
            c.tokenizer, c.text_encoder, tcfg.placeholder_token,
            tcfg.initializer_token.replace("{class_noun}", CLASS_NOUN))
        self.vector = nn.Parameter(initial.detach().float().to(device).reshape(1, -1))
        self._hook = c.text_encoder.get_input_embeddings().register_forward_hook(self._inject)
        # K/V: diffusers' Custom Diffusion processor on the cross-attention layers
        self._original_processors = dict(c.unet.attn_processors)
        kv_params: list[nn.Parameter] = []
        if method.train_kv:
            processors = dict(self._original_processors)
            modules = {f"{n}.processor": m for n, m in c.unet.named_modules()
                       if isinstance(m, Attention)}
            for name in processors:
                if not name.endswith("attn2.processor"):
                    continue
                attn = modules[name]
                proc = CustomDiffusionAttnProcessor2_0(
                    train_kv=True, train_q_out=False, hidden_size=attn.to_k.out_features,
                    cross_attention_dim=attn.to_k.in_features).to(device)
                with torch.no_grad():
                    proc.to_k_custom_diffusion.weight.copy_(attn.to_k.weight)
                    proc.to_v_custom_diffusion.weight.copy_(attn.to_v.weight)
                processors[name] = proc
                kv_params += list(proc.parameters())
            c.unet.set_attn_processor(processors)
        self.params = [self.vector, *kv_params]
        tokenize = c.tokenizer
        prompts = ([INSTANCE_PROMPT.format(token=tcfg.placeholder_token, class_noun=CLASS_NOUN)]
                   * self.bi + [CLASS_PROMPT.format(class_noun=CLASS_NOUN)] * self.bp)
        self.input_ids = tokenize(prompts, padding="max_length", truncation=True,
                                  max_length=tokenize.model_max_length,
                                  return_tensors="pt").input_ids.to(device)
        self.optimizer = torch.optim.AdamW(
            self.params, lr=tcfg.learning_rate, betas=(tcfg.adam_beta1, tcfg.adam_beta2),
            weight_decay=tcfg.weight_decay, eps=tcfg.adam_epsilon)

    def _inject(self, _module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        where = (args[0] == self.token_id).unsqueeze(-1)
        return torch.where(where, self.vector.to(output.dtype), output)

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.params)

    def train_step(self) -> float:
        c, device = self.components, self.device
        idx = torch.randint(self.images.shape[0], (self.bi,), device=device)
        pixels = self.images[idx]
        if self.bp:
            prior_idx = torch.randint(self.prior_images.shape[0], (self.bp,), device=device)
            pixels = torch.cat([pixels, self.prior_images[prior_idx]])
        with torch.autocast(device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            latents = c.vae.encode(pixels.to(c.vae.dtype)).latent_dist.sample()
            latents = latents.float() * c.vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(c.noise_scheduler.config.num_train_timesteps,
                                      (latents.shape[0],), device=device)
            noisy = c.noise_scheduler.add_noise(latents, noise, timesteps)
            states = c.text_encoder(self.input_ids)[0]
            pred = c.unet(noisy, timesteps, states).sample.float()
        mask = self.latent_masks[idx]
        error = (pred[:self.bi] - noise[:self.bi]).square() * mask
        loss = (error.sum((1, 2, 3)) / (mask.sum((1, 2, 3)) * pred.shape[1])).mean()
        if self.bp:
            loss = loss + self.prior_weight * F.mse_loss(pred[self.bi:], noise[self.bi:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()  # the scripts log the loss every step

    def remove(self) -> None:
        self._hook.remove()
        self.components.unet.set_attn_processor(self._original_processors)


# --------------------------------------------------------------------------- measuring

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mib(count: float) -> float:
    return round(count / 2**20, 1)


def time_steps(step: Callable[[], object], device: torch.device, warmup: int,
               steps: int) -> dict[str, Any]:
    """Run ``warmup`` untimed steps, then ``steps`` timed ones (CUDA events on CUDA). The
    first warm-up step's wall time is reported on its own (it holds any compilation)."""
    first_step_s = None
    for index in range(warmup):
        t0 = time.perf_counter()
        step()
        if index == 0:
            _sync(device)
            first_step_s = round(time.perf_counter() - t0, 2)
    _sync(device)
    setup_peak = None
    if device.type == "cuda":
        setup_peak = _mib(torch.cuda.max_memory_allocated(device))  # set-up and warm-up
        torch.cuda.reset_peak_memory_stats(device)
    times: list[float] = []
    started = time.perf_counter()
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(steps)]
        for begin, end in events:
            begin.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
        times = [begin.elapsed_time(end) for begin, end in events]
    else:
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    wall = (time.perf_counter() - started) * 1e3 / steps
    ordered = sorted(times)
    out: dict[str, Any] = {
        "ms_median": round(statistics.median(times), 2),
        "ms_p90": round(ordered[max(math.ceil(0.9 * len(ordered)) - 1, 0)], 2),
        "ms_min": round(ordered[0], 2), "ms_mean": round(statistics.fmean(times), 2),
        "wall_ms_per_step": round(wall, 2), "timed_steps": steps, "warmup_steps": warmup,
        "first_step_s": first_step_s,
    }
    if device.type == "cuda":
        out["step_peak_mib"] = _mib(torch.cuda.max_memory_allocated(device))
        out["peak_mib"] = max(out["step_peak_mib"], setup_peak)
    return out


def _prepare_memory(device: torch.device) -> float | None:
    """Free what earlier runs left, reset the peak; returns MiB allocated now (weights, data)."""
    gc.collect()
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return _mib(torch.cuda.memory_allocated(device))


def _cleanup(components: SDComponents, processors: dict[str, Any]) -> None:
    """Undo whatever a run (even a failed one) installed on the shared components."""
    while _LIVE_TRAINERS:
        _LIVE_TRAINERS.pop().remove()
    components.unet.set_attn_processor(dict(processors))
    for module in (components.text_encoder, components.vae, components.unet):
        module.zero_grad(set_to_none=True)


def measure_ours(components: SDComponents, data: ConceptData, method: MethodConfig,
                 config: RunConfig, device: torch.device, warmup: int,
                 steps: int) -> dict[str, Any]:
    """Build a trainer for ``method`` and time ``train_step``; keeps the loss history (the
    eager and graphed runs of one method draw the same numbers, so their losses compare)."""
    before = _prepare_memory(device)
    t0 = time.perf_counter()
    trainer = _BenchTrainer(components, data, config, method, device=device,
                            extensions=training_extensions(config.rra, method))
    setup_s = round(time.perf_counter() - t0, 2)
    try:
        t0 = time.perf_counter()
        result = time_steps(trainer.train_step, device, warmup, steps)
        result["warmup_and_timed_s"] = round(time.perf_counter() - t0, 2)
        result["trainable_params"] = sum(p.numel() for p in trainer.trainable_parameters())
        result["batch"] = {"instance": trainer.train.instance_batch,
                           "prior": trainer.prior_batch}
        result["cuda_graph"] = trainer.graph_captured
        result["losses"] = [round(h["loss"], 6) for h in trainer.loss_history]
    finally:
        trainer.remove()
        _LIVE_TRAINERS.remove(trainer)
    result["setup_s"] = setup_s
    result["allocated_before_mib"] = before
    return result


def loss_agreement(eager: dict[str, Any], graphed: dict[str, Any]) -> dict[str, Any] | None:
    """Largest absolute and relative difference of the two runs' per-step total losses."""
    if eager.get("status") != "ok" or graphed.get("status") != "ok":
        return None
    pairs = list(zip(eager["losses"], graphed["losses"], strict=True))
    abs_diff = max(abs(a - b) for a, b in pairs)
    rel_diff = max(abs(a - b) / max(abs(a), 1e-12) for a, b in pairs)
    return {"steps": len(pairs), "max_abs": abs_diff, "max_rel": round(rel_diff, 6)}


def measure_reference(components: SDComponents, data: ConceptData, method: MethodConfig,
                      config: RunConfig, device: torch.device, warmup: int,
                      steps: int) -> dict[str, Any]:
    """Build the plain loop with ``method``'s trainable tensors and batch, and time it."""
    before = _prepare_memory(device)
    t0 = time.perf_counter()
    loop = ReferenceLoop(components, data, config, method, device)
    setup_s = round(time.perf_counter() - t0, 2)
    try:
        result = time_steps(loop.train_step, device, warmup, steps)
        result["trainable_params"] = loop.trainable_count()
        result["batch"] = {"instance": loop.bi, "prior": loop.bp}
    finally:
        loop.remove()
    result["setup_s"] = setup_s
    result["allocated_before_mib"] = before
    return result


def guarded(run: Callable[[], dict[str, Any]], label: str, components: SDComponents,
            processors: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement; an OOM or an error becomes a status instead of ending the run."""
    outcome: dict[str, Any]
    try:
        outcome = {"status": "ok", **run()}
    except torch.OutOfMemoryError as err:
        logger.warning("%s: out of memory", label)
        outcome = {"status": "oom", "error": str(err).splitlines()[0][:300]}
    except Exception as err:  # one broken method must not lose the others' figures
        logger.exception("%s failed", label)
        outcome = {"status": "error", "error": f"{type(err).__name__}: {err}"[:500]}
    _cleanup(components, processors)
    return outcome


# --------------------------------------------------------------------------- reporting

TABLE_HEADER = ("| method | frozen weights | batch (inst+prior) | ours eager ms/step "
                "(median / p90) | ours CUDA graph ms/step | reference ms/step | eager / ref "
                "| graph / ref | ours peak MiB (eager / graph) | ref peak MiB | note |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|\n")


def _cell(run: dict[str, Any] | None, key: str) -> str:
    if not run:
        return "—"
    if run.get("status") != "ok":
        return run.get("status", "—").upper()
    value = run.get(key)
    return "n/a" if value is None else f"{value:g}"


def _times(run: dict[str, Any] | None) -> str:
    if not run or run.get("status") != "ok":
        return _cell(run, "ms_median")
    return f"{run['ms_median']:.1f} / {run['ms_p90']:.1f}"


def _ratio(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    return "—" if value is None else f"{value:.2f}"


def table_row(row: dict[str, Any]) -> str:
    ours, graphed, ref = row.get("ours"), row.get("ours_graphed"), row.get("reference")
    batch = "—"
    for run in (ours, graphed, ref):
        if run and run.get("status") == "ok":
            batch = f"{run['batch']['instance']}+{run['batch']['prior']}"
            break
    notes = [row["note"]] if row.get("note") else []
    if graphed and graphed.get("status") == "ok" and not graphed.get("cuda_graph"):
        notes.append("graph capture failed: eager steps")
    channels_last = row.get("ours_graphed_channels_last")
    if channels_last and channels_last.get("status") == "ok" and graphed \
            and graphed.get("status") == "ok":
        notes.append(f"channels-last graph {channels_last['ms_median']:.1f} ms "
                     f"({channels_last['ms_median'] / graphed['ms_median']:.2f}× graph)")
    for key, run in row.items():
        if key.startswith("ours_graphed_batch_x") and run.get("status") == "ok" and graphed \
                and graphed.get("status") == "ok":
            k = int(key.removeprefix("ours_graphed_batch_x"))
            notes.append(f"×{k} batch graph {run['ms_median']:.1f} ms "
                         f"({run['ms_median'] / graphed['ms_median']:.2f}× graph for {k}× rows)")
    agreement = row.get("loss_agreement")
    if agreement:
        notes.append(f"graph vs eager loss: max rel diff {agreement['max_rel']:.1e} over "
                     f"{agreement['steps']} steps")
    compiled = row.get("ours_compiled")
    if compiled and compiled.get("status") == "ok":
        base = graphed if graphed and graphed.get("status") == "ok" else ours
        versus = (f" ({compiled['ms_median'] / base['ms_median']:.2f}× "
                  f"{'graph' if base is graphed else 'eager'})"
                  if base and base.get("status") == "ok" else "")
        agreement = row.get("compiled_loss_agreement")
        again = row.get("ours_compiled_again") or {}
        notes.append(f"regional compile {compiled['ms_median']:.1f} ms{versus}, first step "
                     f"{compiled['first_step_s']:.0f} s" + (
                         f" (again in this process: {again['first_step_s']:.1f} s)"
                         if again.get("status") == "ok" else "") + (
                         f", loss vs eager max rel diff {agreement['max_rel']:.1e}"
                         if agreement else ""))
    for name, run in (("ours", ours), ("graphed", graphed), ("compiled", compiled),
                      ("ref", ref)):
        if run and run.get("status") not in (None, "ok"):
            notes.append(f"{name}: {run.get('error', '')[:120]}")
    peaks = f"{_cell(ours, 'peak_mib')} / {_cell(graphed, 'peak_mib')}"
    return (f"| {row['method']} | {row['frozen_weights']} | {batch} | {_times(ours)} "
            f"| {_times(graphed) if graphed else '—'} | {_times(ref)} "
            f"| {_ratio(row, 'ratio_ours_over_reference')} "
            f"| {_ratio(row, 'ratio_graphed_over_reference')} "
            f"| {peaks} | {_cell(ref, 'peak_mib')} | {'; '.join(notes).replace('|', '/')} |\n")


def write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"type": device.type}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=torch.cuda.get_device_name(device),
                    capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                    total_memory_mib=_mib(props.total_memory), cuda=torch.version.cuda,
                    float32_matmul_precision=torch.get_float32_matmul_precision())
    else:
        info.update(name=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                    torch_threads=torch.get_num_threads())
    return info


# --------------------------------------------------------------------------- main

def inductor_cache_state() -> dict[str, Any]:
    """Where inductor caches compiled code, and how much it held before this run (cold or
    warm compile)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    folder = Path(cache_dir())
    files = sum(1 for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0
    return {"dir": str(folder), "files_before": files}


def build_components(tiny: bool, device: torch.device, scratch: Path) -> SDComponents:
    """The tiny offline SD (through the real loader) or SD-1.5-shaped random modules."""
    if tiny:
        folder = build_tiny_sd(scratch / "tiny-sd", seed=0)
        return load_sd_components(str(folder), local_files_only=True).to(device)
    return sd15_shaped_components(device=device)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true",
                        help="tiny offline SD at 64 px (default device: cpu)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cpu with --tiny, cuda otherwise")
    parser.add_argument("--resolution", type=int, default=None,
                        help="pixels (default 64 with --tiny, 512 otherwise)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per loop (default 20; 10 with --tiny)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps before timing (default 5; 2 with --tiny)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU intra-op threads (default 1: stable timings on a shared "
                             "machine; ignored on CUDA)")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                        help=f"method presets (default: {' '.join(DEFAULT_METHODS)})")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"),
                        default="auto", help="TrainConfig.precision for both loops (default "
                        "auto: the trainer's default, bf16 autocast on CUDA, fp32 on CPU)")
    parser.add_argument("--bf16-frozen", choices=("auto", "on", "off", "only"),
                        default="auto",
                        help="also run every method with frozen weights cast to bf16 "
                             "(auto: on CUDA only; needs bf16 autocast); only: just that pass "
                             "(the trainer's default on a GPU)")
    parser.add_argument("--graphs", choices=("auto", "both", "off"), default="auto",
                        help="both: time our trainer eagerly and with its CUDA-graph step "
                             "(train.cuda_graphs=on) and compare their losses; auto: both on "
                             "CUDA, off elsewhere")
    parser.add_argument("--channels-last", action="store_true",
                        help="with graphs: also time the graphed step with the UNet in "
                             "channels-last memory format")
    parser.add_argument("--batch-multiple", type=int, default=1,
                        help="with graphs: also time the graphed step with N times the "
                             "instance and prior rows (what training N subjects in one step "
                             "would cost, before their separate weights)")
    parser.add_argument("--compile", nargs="*", default=None, metavar="METHOD",
                        help="also time the step with train.compile=regional (graphed on "
                             "CUDA) for these methods (none named: all); its first step "
                             "holds the compile, cold or warm as TORCHINDUCTOR_CACHE_DIR is")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the reference loop (ours only)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"),
                        help="folder for train_step.json")
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 10 if args.tiny else 20
    if args.warmup is None:
        args.warmup = 2 if args.tiny else 5
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.compile is not None and args.warmup < 1:
        parser.error("--compile needs --warmup >= 1 (the first warm-up step compiles)")
    if args.compile == []:
        args.compile = list(args.methods)
    for name in [*args.methods, *(args.compile or [])]:
        try:
            method_preset(name)
        except ValueError as err:
            parser.error(str(err))
    return args


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    diffusers.utils.logging.set_verbosity_error()  # per-method ".to()" dtype chatter
    transformers.utils.logging.set_verbosity_error()  # token-embedding resize notes
    device_name = args.device if args.device != "auto" else ("cpu" if args.tiny else "cuda")
    if device_name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available: use --tiny, or --device cpu with a small "
                         "--resolution for a sanity run of the full-size path")
    device = torch.device(device_name)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    resolution = args.resolution or (64 if args.tiny else 512)
    bf16_frozen = (args.bf16_frozen in ("on", "only")
                   or (args.bf16_frozen == "auto" and device.type == "cuda"))
    graphs = args.graphs == "both" or (args.graphs == "auto" and device.type == "cuda")
    if graphs and device.type != "cuda":
        raise SystemExit("--graphs both needs CUDA")
    amp = autocast_dtype(run_config(method_preset("custom-diffusion"), resolution, 1, "<x>",
                                    args.precision), device)
    if bf16_frozen and amp != torch.bfloat16:
        raise SystemExit("--bf16-frozen needs bf16 autocast (CUDA, or --precision bf16): "
                         "without it bf16 weights would meet fp32 activations")
    started = time.perf_counter()
    info = device_info(device)
    logger.info("device: %s (%s)", info["name"], device)

    with tempfile.TemporaryDirectory(prefix="eqdiff-bench-") as tmp:
        components = build_components(args.tiny, device, Path(tmp)).freeze()
        data = make_data(resolution, device)
    processors = dict(components.unet.attn_processors)
    weights_mib = _prepare_memory(device)
    logger.info("components ready in %.1f s (%s)", time.perf_counter() - started,
                "tiny" if args.tiny else "SD-1.5 shapes")

    report: dict[str, Any] = {
        "benchmark": "train_step", "mode": "tiny" if args.tiny else "sd15-shaped",
        "device": info, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "resolution": resolution, "steps": args.steps, "warmup": args.warmup,
        "precision": {"trainer": f'precision="{args.precision}"',
                      "autocast": str(amp).removeprefix("torch.") if amp else "none (fp32)",
                      "frozen_weights": "per pass; the trainer's own cast (train.frozen_weights="
                                        "auto, bf16 under bf16 autocast) is the bf16 pass"},
        "weights_and_data_mib": weights_mib,
        "cuda_graphs": graphs, "results": [],
        "inductor_cache": inductor_cache_state() if args.compile else None,
        "notes": [
            "reference = diffusers train_custom_diffusion/textual_inversion loop shape with our "
            "trainable tensors (one token vector; K/V via CustomDiffusionAttnProcessor2_0) and "
            "our batch; VAE + text encoder run every step; no RRA",
            "ms: CUDA events per step after warm-up (CPU: perf_counter)",
            "peak_mib: max allocated from trainer set-up to the last step (includes frozen "
            "weights and data); step_peak_mib: during the timed steps only; "
            "allocated_before_mib: allocated when the run started",
            "ours_graphed: train.cuda_graphs=on, the step captured after 3 eager warm-up "
            "steps and replayed; same seed and draws as the eager run, so the per-step losses "
            "compare (loss_agreement)",
            "ours_compiled: train.compile=regional (and graphs on CUDA); first_step_s holds "
            "the compile (inductor_cache.files_before: 0 means a cold cache); "
            "ours_compiled_again: the same run once more in this process, as a kept worker's "
            "next subject (its first step finds the compiled code in memory); "
            "compiled_loss_agreement: against the eager run",
        ],
    }
    out_path = args.out / "train_step.json"
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        report["elapsed_s"] = round(time.perf_counter() - started, 1)
        if device.type == "cpu":
            report["max_rss_mib"] = _mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                         * 1024)
        partial = out_path.with_suffix(".json.partial")
        partial.write_text(json.dumps(report, indent=2) + "\n")
        partial.replace(out_path)

    write(f"\n## train step — {info['name']} ({device}), "
          f"{'tiny SD' if args.tiny else 'SD-1.5-shaped random'}, {resolution} px, "
          f"torch {torch.__version__}, diffusers {diffusers.__version__}, "
          f"autocast {report['precision']['autocast']}, "
          f"median of {args.steps} steps after {args.warmup} warm-up\n\n")
    write(TABLE_HEADER)
    names = _TokenNames()
    passes = ([] if args.bf16_frozen == "only" else [("fp32", None)]) + (
        [("bf16", torch.bfloat16)] if bf16_frozen else [])
    for frozen, dtype in passes:
        if dtype is not None:
            components.to(device, dtype)
        for name in args.methods:
            method = method_preset(name)
            row: dict[str, Any] = {"method": name, "frozen_weights": frozen}
            report["results"].append(row)  # saved after every run: a cut-short stage keeps them
            label = f"{name} [{frozen} frozen]"
            variants = [("ours", "off")] + ([("ours_graphed", "on")] if graphs else [])
            for key, graph_mode in variants:
                config = run_config(method, resolution, args.warmup + args.steps,
                                    names("ours"), args.precision, cuda_graphs=graph_mode)
                logger.info("%s: %s", label, key)
                row[key] = guarded(lambda m=method, c=config: measure_ours(
                    components, data, m, c, device, args.warmup, args.steps),
                    f"{label} {key}", components, processors)
                save()
            if graphs and args.channels_last:  # the lever, measured before it is adopted
                config = run_config(method, resolution, args.warmup + args.steps,
                                    names("ours"), args.precision, cuda_graphs="on")
                components.unet.to(memory_format=torch.channels_last)
                logger.info("%s: ours_graphed_channels_last", label)
                try:
                    row["ours_graphed_channels_last"] = guarded(
                        lambda m=method, c=config: measure_ours(
                            components, data, m, c, device, args.warmup, args.steps),
                        f"{label} channels-last", components, processors)
                    save()
                finally:
                    components.unet.to(memory_format=torch.contiguous_format)
            if graphs and args.batch_multiple > 1:  # what batching subjects could pay
                k = args.batch_multiple
                config = run_config(method, resolution, args.warmup + args.steps,
                                    names("ours"), args.precision, cuda_graphs="on",
                                    batch_multiple=k)
                logger.info("%s: ours_graphed_batch_x%d", label, k)
                row[f"ours_graphed_batch_x{k}"] = guarded(
                    lambda m=method, c=config: measure_ours(
                        components, data, m, c, device, args.warmup, args.steps),
                    f"{label} batch x{k}", components, processors)
                save()
            if args.compile and name in args.compile:  # measured before it is adopted
                # the second run is a kept worker's next subject: the compiled code is in memory
                for key, what in (("ours_compiled", "compiled"),
                                  ("ours_compiled_again", "compiled again")):
                    config = run_config(method, resolution, args.warmup + args.steps,
                                        names("ours"), args.precision,
                                        cuda_graphs="on" if graphs else "off",
                                        compile_mode="regional")
                    logger.info("%s: %s", label, key)
                    row[key] = guarded(lambda m=method, c=config: measure_ours(
                        components, data, m, c, device, args.warmup, args.steps),
                        f"{label} {what}", components, processors)
                    save()
                row["compiled_loss_agreement"] = loss_agreement(row["ours"],
                                                                row["ours_compiled"])
            if graphs:
                row["loss_agreement"] = loss_agreement(row["ours"], row["ours_graphed"])
            if not args.no_reference:
                ref_config = run_config(method, resolution, 1, names("ref"), args.precision)
                logger.info("%s: reference", label)
                row["reference"] = guarded(lambda m=method, c=ref_config: measure_reference(
                    components, data, m, c, device, args.warmup, args.steps),
                    f"{label} reference", components, processors)
                save()
            ref = row.get("reference", {})
            for key, ratio in (("ours", "ratio_ours_over_reference"),
                               ("ours_graphed", "ratio_graphed_over_reference")):
                run = row.get(key, {})
                if run.get("status") == "ok" and ref.get("status") == "ok":
                    row[ratio] = round(run["ms_median"] / ref["ms_median"], 3)
            if method.rra:
                row["note"] = "reference has no RRA (K/V + token loop)"
            elif method.fdte:
                row["note"] = "ours trains 2 token vectors (FDTE), ref 1"
            save()
            write(table_row(row))
    write(f"\nweights + data allocated: {weights_mib if weights_mib is not None else 'n/a'} "
          f"MiB; total {time.perf_counter() - started:.0f} s; results: {out_path}\n")
    save()


if __name__ == "__main__":
    main()
