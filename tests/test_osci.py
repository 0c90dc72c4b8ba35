"""OsciReset (TetraJet-v2 §4, numerics.md §7): oscillating weights are found and snapped, steady ones are not.
Run: python -m pytest tests/test_osci.py -q"""
import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

import fp4
import fp4_training


def test_oscillating_weight_is_reset_to_its_grid_value_and_a_moving_one_is_not():
    layer = fp4.FP4Linear(16, 16, recipe="tetrajet")
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[0, 0] = 6.0            # fixes the 1x16 block's scale at ~1, so the grid is 0, .5, ... 3, 4, 6
        layer.weight[0, 1] = 2.5            # a rounding boundary between grid points 2 and 3
        layer.weight[0, 2] = 0.9            # will drift steadily upward
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    layer.weight.grad = torch.randn(16, 16)
    opt.step()                              # populate the optimizer state
    with torch.no_grad():
        layer.weight[0, :3] = torch.tensor([6.0, 2.5, 0.9])
    adam_state = {k: v.clone() for k, v in opt.state[layer.weight].items()}
    osci = fp4_training.OsciReset({"l": layer}, period=20, window=10, threshold=8.0, start=0)
    osci.after_step(0)                                              # window opens: snapshot
    for step in range(1, 11):
        with torch.no_grad():
            layer.weight[0, 1] = 2.5 + (0.01 if step % 2 else -0.01)   # flips Q between 3 and 2 every step
            layer.weight[0, 2] += 0.05                                # crosses a bin every ~10 steps
        w_before = layer.weight.detach().clone()
        q_before = layer.quantize_weight()
        osci.after_step(step)
    w = layer.weight.detach()
    assert w[0, 1] == q_before[0, 1] and q_before[0, 1] != w_before[0, 1]   # snapped to its current grid value
    assert w[0, 2] == w_before[0, 2]                                       # the steady weight is untouched
    assert osci.last["l"]["reset"] == 1 and osci.summary() == (1 / 256, 1)
    assert all(torch.equal(v, opt.state[layer.weight][k]) for k, v in adam_state.items())  # optimizer untouched


def test_oscillation_ratio_is_zero_where_nothing_moved():
    r = fp4_training.oscillation_ratio(torch.tensor([0.0, 1.0, 3.0]), torch.tensor([0.0, 1.0, 0.25]))
    assert r.tolist() == [0.0, 1.0, 12.0]


def test_window_must_fit_in_the_period():
    with pytest.raises(ValueError, match="window"):
        fp4_training.OsciReset({}, period=10, window=10)


def perturbed(layer, step):
    """One 'optimizer step': every weight moves by a small deterministic amount, half of them back and forth."""
    g = torch.Generator().manual_seed(step)
    with torch.no_grad():
        sign = 1.0 if step % 2 else -1.0
        layer.weight += 0.002 * torch.randn(layer.weight.shape, generator=g)
        layer.weight[:, ::2] += sign * 0.05                     # even columns oscillate


@settings(max_examples=25, deadline=None)
@given(start=st.integers(0, 30), period=st.integers(2, 16), window=st.integers(1, 15), max_iters=st.integers(1, 50),
       resume=st.floats(0, 1), open_at_zero=st.booleans())
def test_osci_reset_runs_and_resumes_exactly_for_any_schedule(start, period, window, max_iters, resume, open_at_zero):
    # any valid schedule: start 0 (the first window opens on the initial weights), a start between windows, a
    # run that ends inside a window, and a resume inside a window give the uninterrupted run's weights; a run
    # whose first call comes after a window's opening step waits for the next window instead of failing
    window = min(window, period - 1)
    resume_at = int(resume * max_iters)
    torch.manual_seed(0)
    layer = fp4.FP4Linear(32, 16, recipe="tetrajet")
    osci = fp4_training.OsciReset({"l": layer}, period, window, threshold=2.0, start=start)
    if open_at_zero:
        osci.after_step(0)
    saved = None
    for step in range(1, max_iters + 1):
        if step - 1 == resume_at:
            saved = copy.deepcopy((layer.state_dict(), osci.state_dict()))
        perturbed(layer, step)
        osci.after_step(step)
    resumed = fp4.FP4Linear(32, 16, recipe="tetrajet")
    osci2 = fp4_training.OsciReset({"l": resumed}, period, window, threshold=2.0, start=start)
    if saved is not None:
        resumed.load_state_dict(saved[0])
        osci2.load_state_dict(saved[1])
        for step in range(resume_at + 1, max_iters + 1):
            perturbed(resumed, step)
            osci2.after_step(step)
        assert torch.equal(resumed.weight, layer.weight) and osci2.last == osci.last


def test_first_window_at_step_zero_closes_and_resets():
    layer = fp4.FP4Linear(32, 16, recipe="tetrajet")
    osci = fp4_training.OsciReset({"l": layer}, period=20, window=10, threshold=2.0, start=0)
    osci.after_step(0)
    for step in range(1, 11):
        perturbed(layer, step)
        osci.after_step(step)
    assert osci.last["l"]["reset"] > 0


def test_mxfp8_columns_are_never_tracked_or_reset():
    layer = fp4.FP4Linear(64, 16, recipe="tetrajet")
    layer.outliers, layer.inliers = fp4_training.select_outlier_channels(torch.arange(64.0), 0.1)   # columns 63..32 MXFP8
    osci = fp4_training.OsciReset({"l": layer}, period=20, window=10, threshold=2.0, start=0)
    osci.after_step(0)
    before = layer.weight.detach().clone()
    for step in range(1, 11):
        perturbed(layer, step)
        w_pre_close = layer.weight.detach().clone()
        osci.after_step(step)
    moved = layer.weight.detach() != w_pre_close
    assert not moved[:, layer.outliers].any() and moved[:, layer.inliers].any()
    assert osci.last["l"]["tracked"] == 16 * 32 and not torch.equal(before, layer.weight)


def test_the_config_holds_the_schedule_that_runs():
    # a short run shrinks the windows to fit; the resolved steps are what the config prints and saves
    import train
    cfg = train.resolve_schedules(train.TrainConfig(max_iters=200))
    assert (cfg.osci_start, cfg.osci_period, cfg.osci_window) == (120, 40, 10)         # resets at 130 and 170
    assert (cfg.out_control_step, cfg.out_control_window) == (20, 50)
    assert train.resolve_schedules(cfg) == cfg                                        # a resumed run keeps it
    long = train.resolve_schedules(train.TrainConfig(max_iters=5000))
    assert (long.osci_start, long.osci_period, long.osci_window) == (3000, 200, 50)
