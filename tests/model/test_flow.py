"""Rectified flow: timestep density, sampler exactness, CFG, and a tiny model that overfits."""

import math

import pytest
import torch

from model.config import get_preset
from model.dit import build_model
from model.flow import (FlowConfig, cfg_velocity, euler_sample, flow_loss, interpolate, random_keep_indices,
                        sample_t, timesteps)

from tests.model.helpers import tiny_batch, tiny_model


def test_interpolation_endpoints_and_velocity():
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert torch.equal(interpolate(x0, eps, torch.zeros(2)), x0)
    assert torch.equal(interpolate(x0, eps, torch.ones(2)), eps)
    t = torch.tensor([0.3, 0.8])
    h = 1e-3
    fd = (interpolate(x0, eps, t + h) - interpolate(x0, eps, t - h)) / (2 * h)
    torch.testing.assert_close(fd, eps - x0, atol=1e-3, rtol=1e-3)  # d x_t / dt = eps - x0


def test_logit_normal_timesteps():
    g = torch.Generator().manual_seed(0)
    t = sample_t(200_000, FlowConfig(t_mean=0.5, t_std=0.7), g)
    u = torch.log(t / (1 - t))
    assert 0 < t.min() and t.max() < 1
    assert u.mean().item() == pytest.approx(0.5, abs=0.01)
    assert u.std().item() == pytest.approx(0.7, abs=0.01)


@pytest.mark.parametrize("steps, shift", [(1, 1.0), (7, 1.0), (20, 3.0)])
def test_euler_integrates_the_straight_flow_field_exactly(steps, shift):
    # The exact velocity of a single data point x0 is v(x, t) = (x - x0) / t (linear in x): straight
    # paths, so Euler lands on x0 with any number of steps.
    x0 = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    noise = torch.randn_like(x0)
    out = euler_sample(lambda x, t: (x - x0) / t.view(-1, 1, 1, 1), noise, steps, shift)
    torch.testing.assert_close(out, x0, rtol=1e-10, atol=1e-10)
    # A constant field c moves noise to noise - c.
    c = torch.randn_like(x0)
    torch.testing.assert_close(euler_sample(lambda x, t: c, noise, steps, shift), noise - c)


def test_timesteps_run_from_noise_to_data():
    ts = timesteps(10, shift=3.0)
    assert ts[0] == 1.0 and ts[-1] == 0.0 and (ts[1:] < ts[:-1]).all()


def test_cfg_scale_one_is_conditional_and_zero_is_unconditional():
    model, cfg = tiny_model("tiny-ec", moe=dict(inference_group="sample"))
    model.eval()
    x, t, ctx, mask = tiny_batch(cfg, 3)
    cond = model(x, t, ctx, mask).pred
    uncond = model(x, t, ctx, mask, text_drop_B=torch.ones(3, dtype=torch.bool)).pred
    torch.testing.assert_close(cfg_velocity(model, ctx, mask, 1.0)(x, t), cond, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(cfg_velocity(model, ctx, mask, 0.0)(x, t), uncond, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(cfg_velocity(model, ctx, mask, 4.0)(x, t), uncond + 4 * (cond - uncond))


def test_random_keep_indices():
    keep = random_keep_indices(5, 16, 8, torch.Generator().manual_seed(0))
    assert keep.shape == (5, 8)
    for row in keep:
        assert row.unique().numel() == 8 and (row[1:] > row[:-1]).all()


@pytest.mark.parametrize("name", ["tiny-ec", "tiny-tc", "tiny-dense"])
def test_tiny_model_overfits_a_handful_of_latents(name):
    torch.manual_seed(0)
    cfg = get_preset(name)
    model = build_model(cfg, seed=0)
    x0, _, ctx, mask = tiny_batch(cfg, 4, dtype=torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    fcfg = FlowConfig(text_drop_prob=0.0)
    losses = []
    for step in range(300):
        # Same noise, t and kept tokens every step: a fixed regression problem the model must memorise.
        out = flow_loss(model, x0, ctx, mask, fcfg, generator=torch.Generator().manual_seed(0),
                        collect_stats=False)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["flow_loss"].item())
        if losses[-1] < losses[0] / 100:  # well past the bar; going on only reaches denormal numbers
            break
    assert math.isfinite(losses[-1])
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])
