"""OsciReset (TetraJet-v2 §4, SPEC §7): oscillating weights are found and snapped, steady ones are not.
Run: python -m pytest tests/test_osci.py -q"""
import pytest
import torch

import fp4


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
    osci = fp4.OsciReset({"l": layer}, period=20, window=10, threshold=8.0, start=0)
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
    r = fp4.oscillation_ratio(torch.tensor([0.0, 1.0, 3.0]), torch.tensor([0.0, 1.0, 0.25]))
    assert r.tolist() == [0.0, 1.0, 12.0]


def test_window_must_fit_in_the_period():
    with pytest.raises(ValueError, match="window"):
        fp4.OsciReset({}, period=10, window=10)
