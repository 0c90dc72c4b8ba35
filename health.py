"""
health.py: is FP4 healthy? What train.py logs at every eval, read from the FP4 layers and one batch, outside
autograd, so that watching a run never changes it.

For each FP4Linear (docs/numerics.md §9):
  - SQNR (dB) of X, W and dY as their GEMMs quantize them: 10·log10(‖x‖² / ‖x - x_dq‖²). NVFP4 gives ~20 dB on
    Gaussian data with round to nearest, ~17 dB with stochastic rounding; a layer far below that has outliers
    its scales cannot hold.
  - saturated: the fraction of blocks whose scaled amax exceeds 7, i.e. whose scale is too small (MXFP4's
    power-of-two floor does this to 17% of randn's blocks; NVFP4's fitted E4M3 scale never does).
  - underflow: the fraction of blocks whose E4M3 scale is subnormal or zero (< 2^-6: fewer than 4 significant bits),
    the per-tensor scale's failure mode on a block far below the tensor's amax.
plus OsciReset's oscillation ratio and resets and OutControl's outlier channels. With probe=True (--fp4-probe) also
the whole-model gradient against the same weights in high precision: its cosine and relative error.
"""

import torch

import fp4
from fp4 import FLT_MAX, MX, MX_BLOCK, NVFP4_BLOCK, OUTER_BLOCK


SATURATION_LIMIT = 7.0   # a scaled |x| above 7 loses more to the clamp at 6 than rounding loses anywhere in range


def sqnr(x, x_dq):
    """Signal-to-quantization-noise ratio in dB: 10·log10(‖x‖² / ‖x - x_dq‖²), in fp64."""
    x, x_dq = x.double(), x_dq.double()
    return (10 * torch.log10(x.square().sum() / (x - x_dq).square().sum())).item()


def block_health(x, recipe, tile=(1, 16), four_over_six=None):
    """-> (saturated, underflow) among the non-zero blocks of x (..., K): the fraction whose scaled amax exceeds
    SATURATION_LIMIT (MXFP4's floor scale does this to 17% of randn's blocks; NVFP4's fitted scale never), and the
    fraction whose scale is an E4M3 subnormal or zero (< 2^-6) or E8M0's smallest."""
    q = fp4.quantize(x, recipe, tile=tile, four_over_six=four_over_six)
    x2 = x.reshape(-1, x.shape[-1]).float()                                   # (M, K)
    if isinstance(q, MX):
        block, scale = MX_BLOCK, q.scale.float().view(x2.shape[0], -1)
        tiny = q.scale.view(torch.uint8).view(scale.shape) == 0
    else:
        block, s = NVFP4_BLOCK, q.block_scale.float().view(x2.shape[0], -1)
        outer = q.outer_scale if q.outer_scale.dim() == 0 else \
            q.outer_scale.view(x2.shape[0], -1).repeat_interleave(OUTER_BLOCK // NVFP4_BLOCK, dim=-1)
        scale, tiny = s * outer, s < 2.0 ** -6
    x2 = torch.nn.functional.pad(x2, (0, scale.shape[1] * block - x2.shape[1]))
    amax = x2.abs().view(x2.shape[0], -1, block).amax(-1)
    nonzero = amax > 0
    n = nonzero.sum().clamp(min=1)
    saturated = (amax * (1.0 / scale).clamp(max=FLT_MAX) > SATURATION_LIMIT) & nonzero
    return (saturated.sum() / n).item(), ((tiny & nonzero).sum() / n).item()


def layer_health(layer, x, dy, generator):
    """An FP4Linear and one batch's input x (..., in) and output gradient dy (..., out) -> {sqnr_x, sqnr_w,
    sqnr_dy_dgrad, sqnr_dy_wgrad (dB), saturated_x/_w, underflow_x/_w}: each operand quantized as its GEMM does
    (dY after the GEMM's RHT, its random draws from `generator`)."""
    r, x2, dy2 = layer.recipe, x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1]).float()
    fx, fw = fp4.four_over_six_of(r, "activations"), fp4.four_over_six_of(r, "weights")
    out = dict(sqnr_x=sqnr(x2, fp4.fake_quant(x2, r, four_over_six=fx, columns=layer.columns)),
               sqnr_w=sqnr(layer.weight, layer.quantize_weight()))
    out.update(zip(("saturated_x", "underflow_x"), block_health(x2, r, four_over_six=fx)))
    out.update(zip(("saturated_w", "underflow_w"), block_health(layer.weight.detach(), r, r.weight_tile, fw)))
    for gemm, a in (("dgrad", dy2), ("wgrad", dy2.t())):
        signs = None
        if gemm in r.rht:
            signs = (fp4.random_signs(generator, a.device, r.rht_size) if r.rht_signs == "random"
                     else torch.tensor(fp4.NVIDIA_RHT_SIGNS, dtype=torch.float32, device=a.device))
        seen = a if signs is None else fp4.rht(fp4.pad_2d(a, 1, len(signs)), signs)
        out[f"sqnr_dy_{gemm}"] = sqnr(seen, fp4.fake_quant(a, r, r.grad_rounding, generator=generator, rht_signs=signs))
    return out


def measure(model, layers, batch, probe=False):
    """One forward and backward of `batch` -> ({name: layer_health}, probe or None), touching nothing the run
    continues with (gradients put back, each layer's generator restored, eval mode so OutControl does not count).
    probe: also the FP4 gradient against the same weights in high precision: {grad_cosine, grad_rel_error} over
    all parameters (under DDP pass the unwrapped model: no all-reduce)."""
    params, was_training = list(model.parameters()), model.training
    saved = [p.grad for p in params], {n: l.get_extra_state() for n, l in layers.items()}
    captured, hooks = {}, []

    def capture(name):
        def hook(module, inputs, output):
            captured[name] = [inputs[0].detach(), None]
            output.register_hook(lambda g: captured[name].__setitem__(1, g.detach()))
        return hook

    grads = []
    try:
        model.eval()
        hooks = [l.register_forward_hook(capture(n)) for n, l in layers.items()]
        for shadow in (False, True) if probe else (False,):
            for p in params:
                p.grad = None
            for l in layers.values():
                l.high_precision = shadow
            model(*batch)[1].backward()
            grads.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double()
                                    for p in params]))
            for h in hooks if not shadow else ():
                h.remove()
    finally:
        for h in hooks:
            h.remove()
        for p, g in zip(params, saved[0]):
            p.grad = g
        for n, l in layers.items():
            l.high_precision = False
            l.set_extra_state(saved[1][n])
        model.train(was_training)
    gen = torch.Generator(next(iter(layers.values())).weight.device).manual_seed(0)
    health = {n: layer_health(l, *captured[n], gen) for n, l in layers.items()}
    if not probe:
        return health, None
    g4, g = grads
    return health, {"grad_cosine": (g4 @ g / (g4.norm() * g.norm())).item(), "grad_rel_error": ((g4 - g).norm() / g.norm()).item()}


def report(step, health, osci, outctl):
    """measure()'s health with OsciReset's and OutControl's state -> (record for log.jsonl, one line): per layer
    and the mean over layers."""
    layers = {n: dict(h) for n, h in health.items()}
    for n, v in osci.last.items():
        layers[n].update(oscillating=v["oscillating"], reset=v["reset"])
    for n, count in (outctl.summary() if outctl else {}).items():
        layers[n]["outliers"] = count
    mean = {k: sum(v[k] for v in layers.values() if k in v) / len(layers) for k in sorted({k for v in layers.values() for k in v})}
    osc, reset = osci.summary()
    total = dict(mean, oscillating=osc, reset=reset, outliers=sum(outctl.summary().values()) if outctl else 0)
    sq = " ".join(f"{k[5:]} {mean[k]:.1f}" for k in mean if k.startswith("sqnr"))
    return {"total": total, "layers": layers}, (
        f"fp4  {step:5d} | sqnr(dB) {sq} | saturated x {mean['saturated_x']:.2%} w {mean['saturated_w']:.2%} | underflow "
        f"x {mean['underflow_x']:.2%} w {mean['underflow_w']:.2%} | oscillating {osc:.3%} reset {reset} | outliers {total['outliers']}")
