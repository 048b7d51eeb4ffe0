"""Properties of mask-guided noising and the training losses (docs/method.md §4, §6)."""

import pytest
import torch
from diffusers import DDPMScheduler

from eqdiff.config import LossConfig
from eqdiff.method.losses import (
    LossTerms,
    cross_attention_mask_loss,
    latent_masks,
    masked_diffusion_loss,
    masked_noising,
    pooled_rra_attention_loss,
    prior_preservation_loss,
    rra_attention_loss,
    total_loss,
)


@pytest.fixture(scope="module")
def scheduler():
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def box_mask(batch: int, size: int, top: int, left: int, side: int) -> torch.Tensor:
    mask = torch.zeros(batch, 1, size, size)
    mask[:, :, top : top + side, left : left + side] = 1
    return mask


def as_bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.int32)


# --------------------------------------------------------------------------- masked noising

def test_masked_noising_leaves_the_background_bit_identical(scheduler):
    latents = torch.randn(2, 4, 8, 8, generator=seeded(0))
    latents[0, :, 0, 0] = -0.0  # signed zeros must survive too
    noise = torch.randn(2, 4, 8, 8, generator=seeded(1))
    timesteps = torch.tensor([999, 500])
    for mask in (torch.rand(2, 1, 8, 8, generator=seeded(2)) > 0.5,  # binary (bool)
                 torch.rand(2, 1, 8, 8, generator=seeded(3)).clamp_min(0.3) - 0.3):  # soft
        noisy = masked_noising(latents, noise, timesteps, mask, scheduler)
        background = (mask == 0).expand_as(latents)
        assert background.any() and (~background).any()
        assert torch.equal(as_bits(noisy)[background], as_bits(latents)[background])
        assert (noisy[~background] != latents[~background]).all()


def test_masked_noising_with_a_full_mask_is_the_schedulers_add_noise(scheduler):
    latents = torch.randn(3, 4, 8, 8, generator=seeded(0))
    noise = torch.randn(3, 4, 8, 8, generator=seeded(1))
    timesteps = torch.tensor([0, 421, 999])
    ones = torch.ones(3, 1, 8, 8)
    expected = scheduler.add_noise(latents, noise, timesteps)
    assert torch.equal(masked_noising(latents, noise, timesteps, ones, scheduler), expected)
    # The alphas_cumprod tensor itself works as well.
    alphas = scheduler.alphas_cumprod
    assert torch.equal(masked_noising(latents, noise, timesteps, ones, alphas), expected)
    low = latents.bfloat16()
    expected_low = scheduler.add_noise(low, noise.bfloat16(), timesteps)
    out_low = masked_noising(low, noise.bfloat16(), timesteps, ones, scheduler)
    assert out_low.dtype == torch.bfloat16 and torch.equal(out_low, expected_low)


def test_soft_mask_blends_noisy_and_clean_latents(scheduler):
    latents = torch.randn(1, 4, 4, 4, generator=seeded(0))
    noise = torch.randn(1, 4, 4, 4, generator=seeded(1))
    timesteps = torch.tensor([700])
    noisy = scheduler.add_noise(latents, noise, timesteps)
    half = torch.full((1, 1, 4, 4), 0.25)
    out = masked_noising(latents, noise, timesteps, half, scheduler)
    torch.testing.assert_close(out, 0.25 * noisy + 0.75 * latents)


def test_masked_noising_rejects_mismatched_shapes(scheduler):
    latents = torch.zeros(2, 4, 8, 8)
    with pytest.raises(ValueError):
        masked_noising(latents, latents, torch.tensor([1, 2]), torch.ones(2, 1, 4, 4), scheduler)
    with pytest.raises(ValueError):
        masked_noising(latents, latents, torch.tensor([1]), torch.ones(2, 1, 8, 8), scheduler)
    with pytest.raises(TypeError):
        masked_noising(latents, latents, torch.tensor([1, 2]), torch.ones(2, 1, 8, 8), object())


# --------------------------------------------------------------------------- masked loss

def test_masked_loss_ignores_the_background():
    pred = torch.randn(2, 4, 8, 8, generator=seeded(0))
    target = torch.randn(2, 4, 8, 8, generator=seeded(1))
    mask = box_mask(2, 8, 2, 2, 4)
    loss = masked_diffusion_loss(pred, target, mask)
    background = (mask == 0).expand_as(pred)
    changed = torch.where(background, torch.randn(2, 4, 8, 8, generator=seeded(2)) * 100, pred)
    assert torch.equal(masked_diffusion_loss(changed, target, mask), loss)
    inside = torch.where(background, pred, pred + 1)
    assert masked_diffusion_loss(inside, target, mask) != loss


def test_masked_loss_is_normalised_by_area_and_channels():
    target = torch.randn(1, 4, 16, 16, generator=seeded(0))
    error = 0.3
    pred = target + error
    small = masked_diffusion_loss(pred, target, box_mask(1, 16, 0, 0, 2))
    large = masked_diffusion_loss(pred, target, box_mask(1, 16, 3, 1, 12))
    torch.testing.assert_close(small, large)
    torch.testing.assert_close(small, torch.tensor(error**2))  # per element, not per pixel
    # A per-channel mask gives the same normalisation.
    per_channel = box_mask(1, 16, 3, 1, 12).expand(1, 4, 16, 16)
    torch.testing.assert_close(masked_diffusion_loss(pred, target, per_channel), large)


def test_released_normalisation_divides_by_the_mask_area_alone():
    """losses.instance_normalisation (docs/method.md §4): "released" divides the masked squared
    error by the mask's area (pixels), "per-element" also by the C channels: C times apart."""
    target = torch.zeros(2, 4, 8, 8)
    pred = target + 0.5
    mask = torch.cat([box_mask(1, 8, 0, 0, 3), box_mask(1, 8, 2, 2, 6)])
    # each sample: sum = 4 channels * area * 0.25; / area -> 1.0, / (4 * area) -> 0.25
    released = masked_diffusion_loss(pred, target, mask, normalisation="released")
    per_element = masked_diffusion_loss(pred, target, mask, normalisation="per-element")
    torch.testing.assert_close(released, torch.tensor(1.0))
    torch.testing.assert_close(per_element, torch.tensor(0.25))
    noisy = torch.randn(2, 4, 8, 8, generator=seeded(4))
    for weights in (mask, mask.expand(2, 4, 8, 8), None):  # None: no mask (MGDP off)
        torch.testing.assert_close(
            masked_diffusion_loss(noisy, target, weights, normalisation="released"),
            4 * masked_diffusion_loss(noisy, target, weights, normalisation="per-element"))
    torch.testing.assert_close(masked_diffusion_loss(noisy, target, None),
                               prior_preservation_loss(noisy, target))
    with pytest.raises(ValueError, match="normalisation"):
        masked_diffusion_loss(noisy, target, mask, normalisation="per-pixel")


def test_masked_loss_weighs_samples_equally_and_full_masks_give_plain_mse():
    target = torch.zeros(2, 4, 8, 8)
    pred = target.clone()
    pred[0] += 1.0
    pred[1] += 2.0
    mask = torch.cat([box_mask(1, 8, 0, 0, 2), box_mask(1, 8, 0, 0, 7)])
    torch.testing.assert_close(masked_diffusion_loss(pred, target, mask),
                               torch.tensor((1.0**2 + 2.0**2) / 2))
    noisy_pred = torch.randn(2, 4, 8, 8, generator=seeded(3))
    torch.testing.assert_close(masked_diffusion_loss(noisy_pred, target, torch.ones(2, 1, 8, 8)),
                               prior_preservation_loss(noisy_pred, target))


def test_masked_loss_with_empty_masks_is_finite_and_skips_them():
    pred = torch.randn(2, 4, 8, 8, generator=seeded(0), requires_grad=True)
    target = torch.randn(2, 4, 8, 8, generator=seeded(1))
    empty = torch.zeros(2, 1, 8, 8)
    loss = masked_diffusion_loss(pred, target, empty)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(pred.grad).all() and (pred.grad == 0).all()

    one_empty = torch.cat([torch.zeros(1, 1, 8, 8), box_mask(1, 8, 1, 1, 5)])
    torch.testing.assert_close(masked_diffusion_loss(pred, target, one_empty),
                               masked_diffusion_loss(pred[1:], target[1:], one_empty[1:]))


def test_losses_compute_in_float32_for_half_predictions():
    pred = torch.randn(2, 4, 8, 8, generator=seeded(0))
    target = torch.randn(2, 4, 8, 8, generator=seeded(1))
    mask = box_mask(2, 8, 1, 1, 5)
    low_pred, low_target = pred.bfloat16(), target.bfloat16()
    loss = masked_diffusion_loss(low_pred, low_target, mask)
    assert loss.dtype == torch.float32
    # The same numbers as float32 inputs holding the bf16 values: no bf16 arithmetic inside.
    assert torch.equal(loss, masked_diffusion_loss(low_pred.float(), low_target.float(), mask))
    half_pred, half_target = pred.half(), target.half()
    prior = prior_preservation_loss(half_pred, half_target)
    assert prior.dtype == torch.float32
    assert torch.equal(prior, prior_preservation_loss(half_pred.float(), half_target.float()))


def test_prior_preservation_loss_is_mse_and_checks_shapes():
    pred = torch.randn(2, 4, 8, 8, generator=seeded(0))
    target = torch.randn(2, 4, 8, 8, generator=seeded(1))
    torch.testing.assert_close(prior_preservation_loss(pred, target),
                               ((pred - target) ** 2).mean())
    with pytest.raises(ValueError):
        prior_preservation_loss(pred, target[:1])


# --------------------------------------------------------------------------- attention losses

def test_cross_attention_loss_is_zero_when_the_map_matches_the_mask():
    mask64 = box_mask(2, 64, 8, 16, 32)  # cells of 4x4 pixels: exact at 16x16
    mask16 = box_mask(2, 16, 2, 4, 8)[:, 0]
    attention = 0.07 * mask16  # any scale: maps are normalised by their max
    assert cross_attention_mask_loss(attention, mask64, 16).item() == 0.0
    assert cross_attention_mask_loss(attention, mask16, 16).item() == 0.0

    blurred = attention + 0.01
    assert cross_attention_mask_loss(blurred, mask64, 16).item() > 0


def test_cross_attention_loss_uses_cell_coverage_and_handles_zero_maps():
    mask = torch.zeros(1, 1, 32, 32)
    mask[:, :, :, :16] = 1  # left half, then a half-covered column of 2x2 cells
    mask[:, :, :, 16] = 1
    target16 = torch.zeros(1, 16, 16)
    target16[:, :, :8] = 1
    target16[:, :, 8] = 0.5
    assert cross_attention_mask_loss(target16, mask, 16).item() == pytest.approx(0.0, abs=1e-12)

    zero = torch.zeros(1, 16, 16, requires_grad=True)
    loss = cross_attention_mask_loss(zero, mask, 16)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zero.grad).all()
    assert loss.item() > 0
    with pytest.raises(ValueError):
        cross_attention_mask_loss(torch.zeros(1, 8, 8), mask, 16)


def rra_setup(grid: int = 4, heads: int = 2, batch: int = 2):
    """Masks at 16x16 for a 4x4 grid, and probabilities whose in-mask queries look only at
    reference-mask keys."""
    scale = 16 // grid
    target_cells = torch.zeros(batch, grid, grid)
    target_cells[:, 1:3, 1:4] = 1
    reference_cells = torch.zeros(batch, grid, grid)
    reference_cells[:, 0:2, 0:2] = 1
    target = target_cells.repeat_interleave(scale, 1).repeat_interleave(scale, 2)[:, None]
    reference = reference_cells.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    n = grid * grid
    logits = torch.randn(batch, heads, n, n, generator=seeded(0))
    in_ref = reference_cells.reshape(batch, 1, 1, n).bool()
    in_target = target_cells.reshape(batch, 1, n, 1).bool()
    on_reference = logits.masked_fill(~in_ref, float("-inf")).softmax(-1)
    probs = torch.where(in_target, on_reference, logits.softmax(-1))
    return probs, target, reference, in_target, in_ref


def test_rra_loss_is_zero_when_in_mask_queries_attend_to_reference_keys_only():
    probs, target, reference, in_target, in_ref = rra_setup()
    assert rra_attention_loss(probs, target, reference).item() == pytest.approx(0.0, abs=1e-12)
    # Out-of-mask queries are free.
    scrambled = torch.where(in_target, probs, torch.rand(probs.shape, generator=seeded(5)))
    assert rra_attention_loss(scrambled, target, reference).item() == pytest.approx(0, abs=1e-12)


def test_rra_loss_penalises_mass_outside_the_reference_mask():
    probs, target, reference, in_target, in_ref = rra_setup()
    uniform_off = (~in_ref).float() / (~in_ref).sum(-1, keepdim=True)
    # Every in-mask query puts half its mass off the reference: (0.5 - 1)^2 each.
    half = torch.where(in_target, 0.5 * probs + 0.5 * uniform_off, probs)
    assert rra_attention_loss(half, target, reference).item() == pytest.approx(0.25, rel=1e-5)
    one_query = probs.clone()
    query = int(in_target[0, 0, :, 0].nonzero()[0])
    one_query[0, 0, query] = uniform_off[0, 0, 0]
    assert rra_attention_loss(one_query, target, reference).item() > 0


def test_rra_loss_with_empty_masks_is_finite():
    probs, target, reference, _, _ = rra_setup()
    probs = probs.clone().requires_grad_(True)
    for empty_target, empty_reference in ((True, False), (False, True), (True, True)):
        t = torch.zeros_like(target) if empty_target else target
        r = torch.zeros_like(reference) if empty_reference else reference
        loss = rra_attention_loss(probs, t, r)
        assert loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, probs)
        assert torch.isfinite(grad).all()
    # One sample without a reference mask is skipped, not counted as a miss.
    off = probs.detach().clone()
    off[1] = 1.0 / off.shape[-1]
    partial_reference = reference.clone()
    partial_reference[0] = 0
    torch.testing.assert_close(rra_attention_loss(off, target, partial_reference),
                               rra_attention_loss(off[1:], target[1:], reference[1:]))


def test_pooled_rra_loss_is_the_released_mse_over_every_query():
    """The released RRA loss (docs/method.md §6) on a map pooled over heads and layers:
    MSE(s * M, M), s(p) the mass of query p on reference-mask keys, mean over all queries."""
    probs, target, reference, in_target, in_ref = rra_setup(heads=1)
    pooled = probs[:, 0]
    assert pooled_rra_attention_loss(pooled, target, reference).item() == pytest.approx(
        0.0, abs=1e-12)
    scrambled = torch.where(in_target, probs, torch.rand(probs.shape, generator=seeded(5)))
    assert pooled_rra_attention_loss(scrambled[:, 0], target, reference).item() == \
        pytest.approx(0.0, abs=1e-12)  # queries outside the target mask are free
    uniform_off = (~in_ref).float() / (~in_ref).sum(-1, keepdim=True)
    half = torch.where(in_target, 0.5 * probs + 0.5 * uniform_off, probs)[:, 0]
    # (0.5 - 1)^2 on the 6 in-mask queries of 16, averaged over all 16: 0.25 * 6 / 16; the
    # per-layer form averages over the in-mask queries only: 0.25
    assert pooled_rra_attention_loss(half, target, reference).item() == pytest.approx(
        0.25 * 6 / 16, rel=1e-5)
    assert rra_attention_loss(half[:, None], target, reference).item() == pytest.approx(
        0.25, rel=1e-5)
    # an empty reference mask is not skipped: s = 0 on the whole target mask
    empty = pooled_rra_attention_loss(pooled, target, torch.zeros_like(reference))
    assert empty.item() == pytest.approx(6 / 16, rel=1e-5)
    with pytest.raises(ValueError):
        pooled_rra_attention_loss(probs, target, reference)  # (B, heads, Nq, Nk): not pooled


def test_rra_loss_rejects_non_square_grids():
    with pytest.raises(ValueError):
        rra_attention_loss(torch.rand(1, 1, 15, 16), torch.ones(1, 4, 4), torch.ones(1, 4, 4))
    with pytest.raises(ValueError):
        rra_attention_loss(torch.rand(1, 16, 16), torch.ones(1, 4, 4), torch.ones(1, 4, 4))


# --------------------------------------------------------------------------- total

def test_total_loss_applies_the_weights_and_detaches_the_parts():
    config = LossConfig(prior_weight=0.5, xattn_weight=0.25, rra_weight=2.0)
    values = torch.tensor([1.5, 0.7, 0.3, 0.9], requires_grad=True)
    inst, prior, xattn, rra = values.unbind()
    terms = total_loss({"inst": inst, "prior": prior, "xattn": xattn, "rra": rra}, config)
    assert isinstance(terms, LossTerms)
    expected = 1.5 + 0.5 * 0.7 + 0.25 * 0.3 + 2.0 * 0.9
    assert terms.total.item() == pytest.approx(expected)
    terms.total.backward()
    torch.testing.assert_close(values.grad, torch.tensor([1.0, 0.5, 0.25, 2.0]))
    assert all(not value.requires_grad for value in terms.terms.values())
    log = terms.to_log()
    assert log["loss"] == pytest.approx(expected)
    assert log["loss/prior"] == pytest.approx(0.7) and log["loss/rra"] == pytest.approx(0.9)


def test_total_loss_with_absent_or_zero_weight_parts():
    inst = torch.tensor(2.0)
    assert total_loss({"inst": inst}, LossConfig()).total.item() == 2.0
    zero_weight = LossConfig(rra_weight=0.0)
    terms = total_loss({"inst": inst, "rra": torch.tensor(float("nan"))}, zero_weight)
    assert terms.total.item() == 2.0
    with pytest.raises(ValueError):
        total_loss({"inst": inst, "style": inst}, LossConfig())
    with pytest.raises(ValueError):
        total_loss({"prior": inst}, LossConfig())
    with pytest.raises(ValueError):
        total_loss({"inst": torch.ones(2)}, LossConfig())


# --------------------------------------------------------------------------- latent masks

def test_latent_masks_resize_nearest_then_dilate() -> None:
    masks = torch.zeros(2, 1, 64, 64, dtype=torch.bool)
    masks[0, 0, 32:34, 32:34] = True  # one latent pixel at 32x32
    latent = latent_masks(masks, 32, iterations=2, kernel=3)
    assert latent.shape == (2, 1, 32, 32) and latent.dtype == torch.float32
    assert latent.device == masks.device
    expected = torch.zeros(32, 32)
    expected[14:19, 14:19] = 1  # 16 ± 2 iterations × 1 px
    torch.testing.assert_close(latent[0, 0], expected)
    assert latent[1].sum() == 0
    undilated = latent_masks(masks.float(), 32, iterations=0, kernel=5)
    assert undilated[0, 0].sum() == 1
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        latent_masks(masks[0], 32, iterations=1, kernel=3)
    with pytest.raises(ValueError, match="odd"):
        latent_masks(masks, 32, iterations=1, kernel=4)
