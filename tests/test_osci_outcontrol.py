"""TetraJet-v2's two training-time additions (docs/numerics.md §7, §8), fp4.OsciReset and fp4.OutControl: oscillating
weights are found and snapped, steady ones are not, any schedule resumes exactly; planted outlier channels are
found, kept in MXFP8 (fake_quant's columns), and help every GEMM; both survive a state_dict round trip.
Run: python -m pytest tests/test_osci_outcontrol.py -q"""
import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import config
import fp4

# -----------------------------------------------------------------------------
# OsciReset


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


@pytest.mark.parametrize("threshold, oscillating", [(1e-6, 2), (1.0, 2), (12.0, 1), (12.5, 0)])
def test_oscillation_ratio_is_sum_dq_over_sum_dw_and_zero_where_nothing_moved(threshold, oscillating):
    # r = Σ|ΔQ(w)| / Σ|Δw| per weight, 0 where Σ|Δw| = 0: sums (0, 0), (1, 1), (3, 0.25), (1, 0) give r = 0, 1, 12, 0
    layer = fp4.FP4Linear(16, 16, recipe="tetrajet")
    osci = fp4.OsciReset({"l": layer}, period=4, window=2, threshold=threshold, start=0, reset=False)
    osci.after_step(0)
    osci.after_step(1)                                   # nothing moved: the sums stay 0
    st = osci.state["l"]
    st["sum_dq"][0, :4] = torch.tensor([0.0, 1.0, 3.0, 1.0])
    st["sum_dw"][0, :4] = torch.tensor([0.0, 1.0, 0.25, 0.0])
    osci.after_step(2)                                   # closes the window
    assert osci.last["l"] == {"oscillating": oscillating / 256, "tracked": 256, "reset": 0}
    assert "l" not in osci.state and osci.summary() == (oscillating / 256, 0)


def test_window_must_fit_in_the_period():
    with pytest.raises(ValueError, match="window"):
        fp4.OsciReset({}, period=10, window=10)


def perturbed(layer, step):
    """One 'optimizer step': every weight moves by a small deterministic amount, half of them back and forth."""
    g = torch.Generator().manual_seed(step)
    with torch.no_grad():
        sign = 1.0 if step % 2 else -1.0
        layer.weight += 0.002 * torch.randn(layer.weight.shape, generator=g)
        layer.weight[:, ::2] += sign * 0.05                     # even columns oscillate


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
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
    osci = fp4.OsciReset({"l": layer}, period, window, threshold=2.0, start=start)
    if open_at_zero:
        osci.after_step(0)
    saved = None
    for step in range(1, max_iters + 1):
        if step - 1 == resume_at:
            saved = copy.deepcopy((layer.state_dict(), osci.state_dict()))
        perturbed(layer, step)
        osci.after_step(step)
    resumed = fp4.FP4Linear(32, 16, recipe="tetrajet")
    osci2 = fp4.OsciReset({"l": resumed}, period, window, threshold=2.0, start=start)
    if saved is not None:
        resumed.load_state_dict(saved[0])
        osci2.load_state_dict(saved[1])
        for step in range(resume_at + 1, max_iters + 1):
            perturbed(resumed, step)
            osci2.after_step(step)
        assert torch.equal(resumed.weight, layer.weight) and osci2.last == osci.last


def test_windows_open_at_start_plus_k_periods_and_reset_window_steps_later():
    # period 10, window 4, start 10: open after steps 10, 20; reset after 14, 24 (the official trainer: 16, 26, §7)
    layer = fp4.FP4Linear(32, 16, recipe="tetrajet")
    osci = fp4.OsciReset({"l": layer}, period=10, window=4, threshold=2.0, start=10)
    opened, closed = [], []
    for step in range(1, 30):
        perturbed(layer, step)
        was_open = "l" in osci.state
        osci.after_step(step)
        (opened if "l" in osci.state and not was_open else closed if was_open and "l" not in osci.state else []).append(step)
    assert opened == [10, 20] and closed == [14, 24]


def test_first_window_at_step_zero_closes_and_resets():
    layer = fp4.FP4Linear(32, 16, recipe="tetrajet")
    osci = fp4.OsciReset({"l": layer}, period=20, window=10, threshold=2.0, start=0)
    osci.after_step(0)
    for step in range(1, 11):
        perturbed(layer, step)
        osci.after_step(step)
    assert osci.last["l"]["reset"] > 0


def test_mxfp8_columns_are_never_tracked_or_reset():
    layer = fp4.FP4Linear(64, 16, recipe="tetrajet")
    layer.columns = fp4.select_outlier_channels(torch.arange(64.0), 0.1)      # columns 63..32 MXFP8
    outliers, inliers = layer.columns
    osci = fp4.OsciReset({"l": layer}, period=20, window=10, threshold=2.0, start=0)
    osci.after_step(0)
    before = layer.weight.detach().clone()
    for step in range(1, 11):
        perturbed(layer, step)
        w_pre_close = layer.weight.detach().clone()
        osci.after_step(step)
    moved = layer.weight.detach() != w_pre_close
    assert not moved[:, outliers].any() and moved[:, inliers].any()
    assert osci.last["l"]["tracked"] == 16 * 32 and not torch.equal(before, layer.weight)


def test_the_config_holds_the_schedule_that_runs():
    # a short run shrinks the windows to fit; the resolved steps are what the config prints and saves
    cfg = config.resolve(config.TrainConfig(max_iters=200))
    assert (cfg.osci_start, cfg.osci_period, cfg.osci_window) == (120, 40, 10)         # resets at 130 and 170
    assert (cfg.out_control_step, cfg.out_control_window) == (20, 50)
    assert config.resolve(cfg) == cfg                                        # a resumed run keeps it
    long = config.resolve(config.TrainConfig(max_iters=5000))
    assert (long.osci_start, long.osci_period, long.osci_window) == (3000, 200, 50)

# -----------------------------------------------------------------------------
# OutControl

PLANTED = torch.tensor([3, 17, 40, 41, 90, 127])


def inputs(n=256, k=128, seed=0):
    """Gaussian activations whose PLANTED channels are 30x larger, like an LLM's outlier features."""
    x = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    x[:, PLANTED] *= 30
    return x


def test_calibration_picks_the_planted_outlier_channels():
    layer = fp4.FP4Linear(128, 64, recipe="tetrajet")
    oc = fp4.OutControl({"l": layer}, frac=0.1, start=2, window=3)
    for step in range(6):
        oc.before_step(step)
        assert (layer.channel_norm is not None) == (2 <= step < 5)     # allocated (zeros) in the window only
        layer(inputs(seed=step)).sum().backward()
        oc.after_step(step + 1)
    outliers, inliers = layer.columns
    assert len(outliers) == 32                           # 10% of 128 = 12.8, rounded up to one MXFP8 block
    assert set(PLANTED.tolist()) <= set(outliers.tolist()) and sorted(outliers.tolist() + inliers.tolist()) == list(range(128))
    assert layer.channel_norm is None and oc.summary() == {"l": 32}


def test_outlier_count_is_rounded_to_32_and_capped_at_half():
    norms = torch.arange(48.0)
    assert len(fp4.select_outlier_channels(norms, 0.1)[0]) == 24          # 32 would be more than half of 48
    outliers, inliers = fp4.select_outlier_channels(torch.arange(1024.0), 0.1)
    assert outliers.tolist() == list(range(1023, 1023 - 128, -1))         # descending norm, as the official code
    assert inliers.tolist() == list(range(1023 - 128, -1, -1))            # the FP4 channels too
    assert len(fp4.select_outlier_channels(norms, 0.0)[0]) == 0


def test_random_choice_keeps_the_count_and_the_norm_order_and_draws_from_the_seed():
    # the control for OutControl: as many MXFP8 channels as the method, drawn at random, both lists norm-sorted
    norms = torch.rand(256, generator=torch.Generator().manual_seed(3))
    top, _ = fp4.select_outlier_channels(norms, 0.1)
    out, inl = fp4.select_outlier_channels(norms, 0.1, torch.Generator().manual_seed(5))
    assert len(out) == len(top) == 32 and sorted(out.tolist() + inl.tolist()) == list(range(256))
    assert (norms[out].diff() <= 0).all() and (norms[inl].diff() <= 0).all()
    assert len(set(out.tolist()) & set(top.tolist())) < 16                 # ~4 of 32 expected by chance
    again, _ = fp4.select_outlier_channels(norms, 0.1, torch.Generator().manual_seed(5))
    assert torch.equal(again, out)


def test_random_choice_does_not_follow_the_planted_outliers():
    layers = {n: fp4.FP4Linear(128, 64, recipe="tetrajet") for n in "ab"}
    oc = fp4.OutControl(layers, frac=0.1, start=0, window=1, choice="random", seed=7)
    oc.before_step(0)
    for layer in layers.values():
        layer(inputs()).sum().backward()
    oc.after_step(1)
    a, b = (set(layers[n].columns[0].tolist()) for n in "ab")
    assert len(a) == len(b) == 32 and a != b                               # one draw per layer, in order
    assert not set(PLANTED.tolist()) <= a


def test_calibration_ignores_eval_forwards():
    layer = fp4.FP4Linear(128, 64, recipe="tetrajet")
    oc = fp4.OutControl({"l": layer}, frac=0.1, start=0, window=2)
    oc.before_step(0)
    layer(inputs(seed=0))
    norm = layer.channel_norm.clone()
    assert torch.equal(norm, inputs(seed=0).norm(dim=0))
    layer.eval()
    with torch.no_grad():
        layer(inputs(seed=1) * 1000)            # an eval batch inside the window: must not count
    assert torch.equal(layer.channel_norm, norm)


def test_fp4_columns_are_quantized_in_the_given_order():
    # the FP4 part is gathered in the order given: it decides which channels share a 16-block scale
    x = inputs()
    perm = torch.randperm(128 - 6, generator=torch.Generator().manual_seed(0))
    in_order = torch.tensor([c for c in range(128) if c not in PLANTED.tolist()])
    split = fp4.fake_quant(x, "tetrajet", columns=(PLANTED, in_order[perm]))
    assert torch.equal(split[:, in_order[perm]], fp4.fake_quant(x[:, in_order[perm]], "tetrajet"))
    assert torch.equal(split[:, PLANTED], fp4.dequantize_mxfp8(fp4.quantize_mxfp8(x[:, PLANTED]))[:, :6])
    assert not torch.equal(split, fp4.fake_quant(x, "tetrajet", columns=(PLANTED, in_order)))
    assert torch.equal(fp4.fake_quant(x, "nvidia", columns=None), fp4.fake_quant(x, "nvidia"))


def test_columns_are_refused_with_stochastic_rounding_or_an_rht():
    # the split is the forward's (RTN, no RHT): a kernel given columns would otherwise drop SR and the RHT silently
    x, signs = inputs(), fp4.random_signs(torch.Generator().manual_seed(0))
    columns = fp4.select_outlier_channels(x.norm(dim=0), 0.1)
    for kw in dict(rounding="stochastic", generator=torch.Generator().manual_seed(0)), dict(rht_signs=signs):
        with pytest.raises(ValueError, match="round to nearest, no RHT"):
            fp4.fake_quant(x, "tetrajet", columns=columns, **kw)


def test_a_layer_with_no_outlier_channel_selected_runs_as_the_plain_layer():
    x, layer = inputs(), fp4.FP4Linear(128, 64, recipe="tetrajet")
    y = layer(x)
    layer.columns = fp4.select_outlier_channels(x.norm(dim=0), 0.0)            # what OutControl(frac=0) sets
    assert len(layer.columns[0]) == 0
    assert torch.equal(layer(x), y)


def test_outlier_channels_in_mxfp8_bring_every_gemm_closer_to_high_precision():
    x, dy = inputs(), torch.randn(256, 64, generator=torch.Generator().manual_seed(9))
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(8)) / 128 ** 0.5
    ref = (x @ w.t(), dy @ w, dy.t() @ x)
    columns = (PLANTED, torch.tensor([c for c in range(128) if c not in PLANTED.tolist()]))
    for name, recipe in fp4.RECIPES.items():
        errors = []
        for cols in (None, columns):
            xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
            y = fp4.FP4LinearFunction.apply(xr, wr, recipe, torch.Generator().manual_seed(1), cols)
            y.backward(dy)
            outs = (y, xr.grad, wr.grad)
            errors.append([1 - F.cosine_similarity(a.flatten(), b.flatten(), 0) for a, b in zip(outs, ref)])
        (y0, dx0, dw0), (y1, dx1, dw1) = errors
        assert y1 < 0.5 * y0 and dw1 < dw0, (name, errors)   # fprop and wgrad split the outliers off
        assert dx1 < 2 * dx0                                  # dgrad stays FP4: not hurt beyond its noise


def test_outcontrol_state_survives_a_state_dict_round_trip():
    layer = fp4.FP4Linear(128, 64)
    layer.columns = fp4.select_outlier_channels(torch.randn(128, generator=torch.Generator().manual_seed(0)), 0.1)
    layer.channel_norm = torch.arange(128.0)
    fresh = fp4.FP4Linear(128, 64)
    fresh.load_state_dict(layer.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.columns, layer.columns))
    assert torch.equal(fresh.channel_norm, torch.arange(128.0))
    assert torch.equal(fresh.quantize_weight(), layer.quantize_weight())      # the MXFP8 columns included
