"""OutControl (TetraJet-v2 §4, numerics.md §8): planted outlier channels are found, kept in MXFP8, and help.
Run: python -m pytest tests/test_outcontrol.py -q"""
import torch
import torch.nn.functional as F

import fp4
import fp4_training

PLANTED = torch.tensor([3, 17, 40, 41, 90, 127])


def inputs(n=256, k=128, seed=0):
    """Gaussian activations whose PLANTED channels are 30x larger, like an LLM's outlier features."""
    x = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    x[:, PLANTED] *= 30
    return x


def test_calibration_picks_the_planted_outlier_channels():
    layer = fp4.FP4Linear(128, 64, recipe="tetrajet")
    oc = fp4_training.OutControl({"l": layer}, frac=0.1, start=2, window=3)
    for step in range(6):
        oc.before_step(step)
        layer(inputs(seed=step)).sum().backward()
        oc.after_step(step + 1)
    assert len(layer.outliers) == 32                     # 10% of 128 = 12.8, rounded up to one MXFP8 block
    assert set(PLANTED.tolist()) <= set(layer.outliers.tolist())
    assert not layer.calibrating and layer.channel_norm is None and oc.summary() == {"l": 32}


def test_outlier_count_is_rounded_to_32_and_capped_at_half():
    norms = torch.arange(48.0)
    assert len(fp4_training.select_outlier_channels(norms, 0.1)[0]) == 24          # 32 would be more than half of 48
    outliers, inliers = fp4_training.select_outlier_channels(torch.arange(1024.0), 0.1)
    assert outliers.tolist() == list(range(1023, 1023 - 128, -1))         # descending norm, as the official code
    assert inliers.tolist() == list(range(1023 - 128, -1, -1))            # the FP4 channels too
    assert len(fp4_training.select_outlier_channels(norms, 0.0)[0]) == 0


def test_random_choice_keeps_the_count_and_the_norm_order_and_draws_from_the_seed():
    # the control for OutControl: as many MXFP8 channels as the method, drawn at random, both lists norm-sorted
    norms = torch.rand(256, generator=torch.Generator().manual_seed(3))
    top, _ = fp4_training.select_outlier_channels(norms, 0.1)
    out, inl = fp4_training.select_outlier_channels(norms, 0.1, torch.Generator().manual_seed(5))
    assert len(out) == len(top) == 32 and sorted(out.tolist() + inl.tolist()) == list(range(256))
    assert (norms[out].diff() <= 0).all() and (norms[inl].diff() <= 0).all()
    assert len(set(out.tolist()) & set(top.tolist())) < 16                 # ~4 of 32 expected by chance
    again, _ = fp4_training.select_outlier_channels(norms, 0.1, torch.Generator().manual_seed(5))
    assert torch.equal(again, out)


def test_random_choice_does_not_follow_the_planted_outliers():
    layers = {n: fp4.FP4Linear(128, 64, recipe="tetrajet") for n in "ab"}
    oc = fp4_training.OutControl(layers, frac=0.1, start=0, window=1, choice="random", seed=7)
    oc.before_step(0)
    for layer in layers.values():
        layer(inputs()).sum().backward()
    oc.after_step(1)
    a, b = (set(layers[n].outliers.tolist()) for n in "ab")
    assert len(a) == len(b) == 32 and a != b                               # one draw per layer, in order
    assert not set(PLANTED.tolist()) <= a


def test_calibration_ignores_eval_forwards():
    layer = fp4.FP4Linear(128, 64, recipe="tetrajet")
    oc = fp4_training.OutControl({"l": layer}, frac=0.1, start=0, window=2)
    oc.before_step(0)
    layer(inputs(seed=0))
    norm = layer.channel_norm.clone()
    layer.eval()
    with torch.no_grad():
        layer(inputs(seed=1) * 1000)            # an eval batch inside the window: must not count
    assert torch.equal(layer.channel_norm, norm)


def test_fp4_columns_are_quantized_in_the_given_order():
    # the FP4 part is gathered in the order given: it decides which channels share a 16-block scale
    x = inputs()
    perm = torch.randperm(128 - 6, generator=torch.Generator().manual_seed(0))
    inliers = torch.tensor([c for c in range(128) if c not in PLANTED.tolist()])[perm]
    split = fp4.fake_quant_split(x, fp4.RECIPES["tetrajet"], outliers=(PLANTED, inliers))
    assert torch.equal(split[:, inliers], fp4.fake_quant(x[:, inliers], "tetrajet"))
    assert not torch.equal(split, fp4.fake_quant_split(x, fp4.RECIPES["tetrajet"], outliers=PLANTED))


def test_split_forward_equals_the_plain_forward_when_no_channel_is_selected():
    x, layer = inputs(), fp4.FP4Linear(128, 64, recipe="tetrajet")
    y = layer(x)
    layer.outliers = torch.empty(0, dtype=torch.long)
    assert torch.equal(layer(x), y)
    assert torch.equal(fp4.fake_quant_split(x, fp4.RECIPES["nvidia"], outliers=None), fp4.fake_quant(x, "nvidia"))


def test_outlier_channels_in_mxfp8_bring_every_gemm_closer_to_high_precision():
    x, dy = inputs(), torch.randn(256, 64, generator=torch.Generator().manual_seed(9))
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(8)) / 128 ** 0.5
    ref = (x @ w.t(), dy @ w, dy.t() @ x)
    for name, recipe in fp4.RECIPES.items():
        errors = []
        for outliers in (None, PLANTED):
            xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
            y = fp4.FP4LinearFunction.apply(xr, wr, recipe, torch.Generator().manual_seed(1), outliers)
            y.backward(dy)
            outs = (y, xr.grad, wr.grad)
            errors.append([1 - F.cosine_similarity(a.flatten(), b.flatten(), 0) for a, b in zip(outs, ref)])
        (y0, dx0, dw0), (y1, dx1, dw1) = errors
        assert y1 < 0.5 * y0 and dw1 < dw0, (name, errors)   # fprop and wgrad split the outliers off
        assert dx1 < 2 * dx0                                  # dgrad stays FP4: not hurt beyond its noise


def test_outcontrol_state_survives_a_state_dict_round_trip():
    layer = fp4.FP4Linear(128, 64)
    layer.outliers, layer.inliers = fp4_training.select_outlier_channels(torch.randn(128, generator=torch.Generator()
                                                                           .manual_seed(0)), 0.1)
    layer.channel_norm = torch.arange(128.0)
    fresh = fp4.FP4Linear(128, 64)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.outliers, layer.outliers) and torch.equal(fresh.inliers, layer.inliers)
    assert torch.equal(fresh.channel_norm, torch.arange(128.0))
