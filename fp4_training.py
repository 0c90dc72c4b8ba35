"""
fp4_training.py: what a training run adds around the FP4 linear of fp4.py.

fp4.py says what FP4 does to a number and to one layer's three GEMMs. A run needs two more things, both from
TetraJet-v2 (arXiv 2510.27527) and both acting on the whole set of FP4 layers over many steps, plus a way to
watch them. This file holds them; "§n" is a section of docs/numerics.md.

Weight oscillation reset (OsciReset, TetraJet-v2 §4, §7)
--------------------------------------------------------
Late in training the updates get small, and a master weight sitting on a rounding boundary flips its FP4
value back and forth on tiny updates: the network the optimizer sees keeps jumping by a whole bin. Over a
window of T steps, r = Σ|Q(w_t) - Q(w_t-1)| / Σ|w_t - w_t-1| separates these (r >> 1) from weights that
drift through bins (r ≈ 1); OsciReset snaps w <- Q(w) where r >= θ, moving it to its bin's centre.

Outlier-channel control (OutControl, TetraJet-v2 §4, §8)
--------------------------------------------------------
A few input channels of a linear layer carry most of the activation energy, and they stay the same through
training. After a short calibration the top 10% of channels by L2 norm are fixed and computed in MXFP8:
Y = Q4(X[:, F]) Q4(W[:, F])ᵀ + Q8(X[:, O]) Q8(W[:, O])ᵀ in fprop and the O columns of wgrad in MXFP8; dgrad
stays FP4. (The GEMMs themselves are fp4.fake_quant_split inside fp4.FP4LinearFunction; here is only the
choice of the channels.)

Diagnostics
-----------
What train.py logs at every eval (fp4_report), with --fp4-probe (fp4_probe: the FP4 gradient against the same
network's high-precision one) and when the loss goes non-finite (nonfinite_report). None of them draws a random
number or changes a weight, so a run that records them trains bit for bit like one that does not
(tests/test_train.py, tests/test_estimator.py).

Layout: OsciReset, OutControl, then the diagnostics (record_stats and high_precision, the two context managers
that read an FP4 layer, then the three reports).
"""

import contextlib
import math

import torch

import fp4

# -----------------------------------------------------------------------------
# OsciReset (TetraJet-v2 §4, §7): weights whose FP4 value flips back and forth

def oscillation_ratio(sum_dq, sum_dw):
    """r = Σ_t |Q(w_t) - Q(w_{t-1})| / Σ_t |w_t - w_{t-1}| per element; 0 where the weight did not move.
    A weight drifting steadily through bins has r ≈ 1; one sitting on a rounding boundary, nudged back and
    forth by tiny updates, flips a whole bin (up to 2 grid steps x scale) per step for a tiny Δw: r >> 1."""
    return torch.where(sum_dw > 0, sum_dq / sum_dw, 0.0)


class OsciReset:
    """Every `period` optimizer steps from step `start`: snapshot each FP4 weight w and its forward quantization
    Q(w), accumulate Σ|ΔQ(w)| and Σ|Δw| over the next `window` steps, then snap w <- Q(w) (the centre of its
    current bin) where r >= `threshold`. Optimizer state is left alone (§7). Snapped weights sit on a grid
    point, far from any rounding boundary, so they stop flipping until real gradient signal moves them.
    Memory: four fp32 copies of each weight during a window, none outside it. `layers`: {name: FP4Linear}.
    reset=False only measures: the oscillation ratio of a run without OsciReset, for comparison."""

    def __init__(self, layers, period=200, window=50, threshold=8.0, start=0, reset=True):
        if not 0 < window < period:
            raise ValueError(f"OsciReset needs 0 < window ({window}) < period ({period})")
        self.layers, self.period, self.window, self.threshold, self.start = layers, period, window, threshold, start
        self.reset = reset
        self.state = {}      # name -> {prev_w, prev_q, sum_dq, sum_dw}, only while a window is open
        self.last = {}       # name -> {"oscillating": fraction with r >= threshold, "reset": count}, last window

    @torch.no_grad()
    def after_step(self, step):
        """Call after every optimizer step with `step` = optimizer steps done so far (and once with the first
        step before training, so a window at that step opens). A window opens at phase (step - start) % period
        = 0 and closes at phase = window. A layer with no open window at a later phase (the run began or was
        resumed from an old checkpoint after the window opened) waits for the next one: nothing is measured
        over a partial window. Only the FP4 columns are tracked and reset: OutControl's MXFP8 columns
        (layer.outliers) quantize differently and are left alone, as the official code does."""
        if step < self.start or (phase := (step - self.start) % self.period) > self.window:
            return
        for name, layer in self.layers.items():
            if phase != 0 and name not in self.state:
                continue                                                  # no window open: wait for the next
            w, q = layer.weight, layer.quantize_weight()                  # (out, in) master, fp32 Q(w)
            if phase == 0:                                                # open a window: snapshot
                zeros = torch.zeros_like(q)
                self.state[name] = dict(prev_w=w.float().clone(), prev_q=q, sum_dq=zeros, sum_dw=zeros.clone())
                continue
            st = self.state[name]
            st["sum_dq"] += (q - st["prev_q"]).abs()
            st["sum_dw"] += (w.float() - st["prev_w"]).abs()
            st["prev_w"], st["prev_q"] = w.float().clone(), q
            if phase == self.window:                                      # close it: reset the oscillators
                fp4_columns = torch.ones(w.shape[1], dtype=torch.bool, device=w.device)
                if layer.outliers is not None:
                    fp4_columns[layer.outliers] = False                   # MXFP8 columns: not tracked
                mask = (oscillation_ratio(st["sum_dq"], st["sum_dw"]) >= self.threshold) & fp4_columns
                if self.reset:
                    w[mask] = q[mask].to(w.dtype)
                tracked = int(fp4_columns.sum()) * w.shape[0]
                self.last[name] = {"oscillating": mask.sum().item() / max(tracked, 1), "tracked": tracked,
                                   "reset": int(mask.sum()) if self.reset else 0}
                del self.state[name]

    def summary(self):
        """-> (oscillation ratio: fraction of all tracked (FP4) weights with r >= threshold in the last windows,
        number of weights reset then)."""
        n = sum(v.get("tracked", self.layers[k].weight.numel()) for k, v in self.last.items())
        osc = sum(v["oscillating"] * v.get("tracked", self.layers[k].weight.numel()) for k, v in self.last.items())
        return (osc / n if n else 0.0), sum(v["reset"] for v in self.last.values())

    def state_dict(self):
        return {"state": self.state, "last": self.last}

    def load_state_dict(self, d):
        """Restore a state_dict(); open windows' tensors move to their layer's device (checkpoints load on CPU)."""
        self.last = d["last"]
        self.state = {name: {k: t.to(self.layers[name].weight.device) for k, t in st.items()}
                      for name, st in d["state"].items()}

# -----------------------------------------------------------------------------
# OutControl (TetraJet-v2 §4, §8): a static set of outlier input channels kept in MXFP8

def select_outlier_channels(channel_norm, frac, generator=None):
    """(in,) accumulated input-channel L2 norms -> (outliers, inliers), LongTensors of channel indices: the top
    `frac` channels, the count rounded up to a multiple of 32 (one MXFP8 block) and capped at half the
    channels, and the rest. Both lists are in descending-norm order, as in the official release (one
    argsort, descending, split in two): the FP4 columns are then gathered so that channels of similar norm
    share a 16-block scale, which a sorted-by-index list would not do.
    With a `generator` the outliers are as many channels drawn uniformly at random instead (a control, not the
    method: it keeps the share of MXFP8 channels and the norm-sorted FP4 columns, and drops only the choice by
    norm); both lists are still in descending-norm order."""
    count = min(math.ceil(frac * channel_norm.numel() / fp4.MX_BLOCK) * fp4.MX_BLOCK, channel_norm.numel() // 2)
    order = channel_norm.argsort(descending=True, stable=True)
    if generator is None:
        return order[:count], order[count:]
    picked = torch.zeros(channel_norm.numel(), dtype=torch.bool)
    picked[torch.randperm(channel_norm.numel(), generator=generator)[:count]] = True
    picked = picked.to(order.device)[order]                  # in descending-norm order
    return order[picked], order[~picked]


class OutControl:
    """For `window` steps from step `start`, every FP4Linear sums ‖X[:, c]‖₂ over the tokens of each
    training micro-batch (eval forwards do not count), per input channel c (its `channel_norm`); then the top `frac` channels become its outliers,
    fixed for the rest of training and kept in MXFP8 in fprop and wgrad (§8). Activation outliers sit in
    a few channels that stay the same through training (TetraJet-v2 §4), so a short calibration suffices.
    Call before_step(step) before each optimizer step and after_step(steps_done, reduce) after it; `reduce`
    sums a tensor across processes in place (DDP), so every process picks the same channels.
    choice="random" keeps as many channels, drawn at random from `seed` (the same on every process and after a
    resume), in MXFP8 instead of the top ones: the control that tells the choice by norm from the share."""

    def __init__(self, layers, frac=0.1, start=500, window=50, choice="norm", seed=0):
        if choice not in ("norm", "random"):
            raise ValueError(f"OutControl choice must be 'norm' or 'random', not {choice!r}")
        self.layers, self.frac, self.start, self.window, self.choice, self.seed = layers, frac, start, window, choice, seed

    def before_step(self, step):
        for layer in self.layers.values():
            layer.calibrating = self.start <= step < self.start + self.window and layer.outliers is None

    def after_step(self, step, reduce=None):
        if step != self.start + self.window:
            return
        gen = torch.Generator().manual_seed(self.seed) if self.choice == "random" else None   # layer by layer, in order
        for layer in self.layers.values():
            if layer.channel_norm is not None:
                if reduce is not None:
                    reduce(layer.channel_norm)
                layer.outliers, layer.inliers = select_outlier_channels(layer.channel_norm, self.frac, gen)
                layer.channel_norm = None
            layer.calibrating = False

    def summary(self):
        """-> {layer name: number of outlier channels}."""
        return {k: (0 if m.outliers is None else len(m.outliers)) for k, m in self.layers.items()}

# -----------------------------------------------------------------------------
# Diagnostics: the two ways to read the FP4 layers, then what train.py logs


@contextlib.contextmanager
def record_stats(layers):
    """with record_stats({name: FP4Linear}) as stats: <one forward and backward> -> stats[name] holds that
    layer's diagnostics: SQNR (dB) of X, W and dY as quantized, the fraction of X's and W's blocks with a
    saturated or underflowed scale (block_health). The one way to read them: each layer's `stats` dict is set
    for the duration of the block only (FP4LinearFunction fills it; it draws no random numbers, so recording
    changes no bits of the step)."""
    stats = {name: {} for name in layers}
    for name, layer in layers.items():
        layer.stats = stats[name]
    try:
        yield stats
    finally:
        for layer in layers.values():
            layer.stats = None


@contextlib.contextmanager
def high_precision(layers):
    """with high_precision(layers): the given FP4Linear layers run as plain linears in the activation dtype (the
    weight cast to it, as model.Linear does): the same network without FP4, for a shadow gradient of the same
    batch with the same weights (train.py --fp4-probe, tools/estimator.py). No random number is drawn inside,
    so the FP4 noise streams continue unchanged after it."""
    for layer in layers:
        layer.high_precision = True
    try:
        yield
    finally:
        for layer in layers:
            layer.high_precision = False


def fp4_report(step, layers, stats, osci, outctl):
    """FP4 health at an eval -> (dict for log.jsonl, one log line). Per layer: SQNR (dB) of X, W and dY as
    quantized in the last training step, fraction of blocks with a saturated or underflowed scale,
    oscillation ratio and resets of the last OsciReset window, outlier channels."""
    per_layer = {n: dict(stats.get(n) or {}) for n in layers}
    for n, v in (osci.last.items() if osci else ()):
        per_layer[n].update(oscillating=v["oscillating"], reset=v["reset"])
    for n, v in (outctl.summary().items() if outctl else ()):
        per_layer[n]["outliers"] = v
    keys = sorted({k for v in per_layer.values() for k in v})
    mean = {k: sum(v[k] for v in per_layer.values() if k in v) / len(layers) for k in keys}
    osc, reset = osci.summary() if osci else (0.0, 0)
    total = dict(mean, oscillating=osc, reset=reset, outliers=sum(outctl.summary().values()) if outctl else 0)
    sq = " ".join(f"{k[5:]} {mean[k]:.1f}" for k in keys if k.startswith("sqnr"))
    line = (f"fp4  {step:5d} | sqnr(dB) {sq or '-'} | saturated x {mean.get('saturated_x', 0):.2%} w "
            f"{mean.get('saturated_w', 0):.2%} | underflow x {mean.get('underflow_x', 0):.2%} w "
            f"{mean.get('underflow_w', 0):.2%} | oscillating {osc:.3%} reset {reset} | outliers {total['outliers']}")
    return {"total": total, "layers": per_layer}, line


def fp4_probe(model, layers, batch, ddp=False):
    """--fp4-probe: the gradient of `batch` with FP4 and with the same weights in high precision (high_precision:
    the shadow network) -> {"grad_cosine", "grad_rel_error"} = cos(g_fp4, g) and ‖g_fp4 − g‖/‖g‖ over all
    parameters, of this process's batch (under DDP without the all-reduce: model.no_sync). Touches nothing the
    run continues with: the gradients are put back, and each layer's noise generator is restored, so a run with
    the probe trains bit for bit like one without (tests/test_estimator.py)."""
    params, layers = list(model.parameters()), list(layers.values())
    saved_grads = [p.grad for p in params]
    saved_state = [l.get_extra_state() for l in layers]       # holds the noise generator's state
    was_training = model.training
    model.eval()                                          # eval: OutControl's calibration skips these forwards
    grads = []
    try:
        for shadow in (False, True):
            for p in params:
                p.grad = None
            no_sync = model.no_sync() if ddp else contextlib.nullcontext()
            with high_precision(layers) if shadow else contextlib.nullcontext(), no_sync:
                model(*batch)[1].backward()
            grads.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double()
                                    for p in params]))
    finally:
        for p, g in zip(params, saved_grads):
            p.grad = g
        for l, state in zip(layers, saved_state):
            l.set_extra_state(state)                           # the stream resumes where it was
        model.train(was_training)
    g4, g = grads
    return {"grad_cosine": (g4 @ g / (g4.norm() * g.norm())).item(), "grad_rel_error": ((g4 - g).norm() / g.norm()).item()}


def nonfinite_report(model, fp4_layers):
    """Which parameters hold non-finite values or gradients, and the FP4 health of each FP4 weight (fraction
    of blocks with a saturated or underflowed scale): where a NaN came from, in one block of text."""
    bad = [n for n, p in model.named_parameters()
           if not p.isfinite().all() or (p.grad is not None and not p.grad.isfinite().all())]
    lines = [f"non-finite parameters or gradients: {', '.join(bad) or 'none'}"]
    for n, m in fp4_layers.items():
        sat, under = fp4.block_health(m.weight.detach(), m.recipe, m.recipe.weight_tile,
                                        fp4.four_over_six_of(m.recipe, "weights"))
        lines.append(f"  {n}: weight blocks saturated {sat:.2%}, underflowed {under:.2%}")
    return "FP4 health at the failure:\n" + "\n".join(lines)
