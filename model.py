"""
model.py: a compact GPT in the OLMo 2 style that TetraJet-v2 trained (arXiv 2510.27527 §5; OLMo 2, arXiv
2501.00656 §3): rotary position embeddings, RMSNorm applied to each sublayer's *output* inside the residual
(OLMo 2's reordered norm), RMSNorm on queries and keys (QK-norm), a SwiGLU MLP, no biases, an untied LM head.
GPT-2 module names where they fit (transformer.wte / .h / .ln_f, attn.c_attn, mlp.c_fc, c_proj, lm_head).

What is quantized: exactly the four Linears inside each block (QKV, attention output, gate/up, down), which
fp4.convert_to_fp4 swaps for FP4Linear. Embedding, LM head, norms, RoPE and attention itself (softmax and
its two batched matmuls) stay in the compute dtype (bf16) or fp32 (numerics.md §6).

Precision without autocast: parameters are fp32 master weights; activations flow in `compute_dtype`, and
each Linear casts its weight to the activation dtype for the matmul (nanochat style), so a reader sees where
every cast happens. Norms and the loss run in fp32.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 256      # set from the dataset's meta.pkl
    block_size: int = 256      # max context length (RoPE tables are built for it)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    mlp_hidden: int = 256      # SwiGLU hidden width (the gate and the up projection each have this many)
    rope_theta: float = 10000.0


# The paper's model sizes (TetraJet-v2 §5, OLMo 2 architecture) and a CPU-sized one. Parameter counts with
# the GPT-2 vocabulary (50304 after padding): 70m ~72M, 150m ~163M, 370m ~405M.
PRESETS = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, mlp_hidden=256),
    "70m": dict(n_layer=8, n_head=8, n_embd=512, mlp_hidden=1024),
    "150m": dict(n_layer=12, n_head=12, n_embd=768, mlp_hidden=1536),
    "370m": dict(n_layer=16, n_head=16, n_embd=1024, mlp_hidden=4096),
}


class Linear(nn.Linear):
    """nn.Linear without bias whose fp32 master weight is cast to the activation dtype for the matmul."""

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) * weight, computed in fp32, returned in x's dtype."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        # fp32 inside: the mean of squares of bf16 activations loses digits fast, and norms are cheap
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight, self.eps).to(x.dtype)


def rope_tables(block_size, head_dim, theta):
    """-> cos, sin, each (block_size, head_dim/2) fp32: angle t * theta^(-2i/head_dim) for position t."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) of x (B, H, T, d) by the position angles (GPT-NeoX layout)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, d = config.n_head, config.n_embd
        self.c_attn = Linear(d, 3 * d)                 # QKV projection (quantized)
        self.c_proj = Linear(d, d)                     # attention output (quantized)
        self.q_norm, self.k_norm = RMSNorm(d), RMSNorm(d)   # OLMo 2 QK-norm, over the whole projection

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)                             # each (B, T, C)
        q, k = self.q_norm(q), self.k_norm(k)     # bounds the attention logits: no loss spikes from q·k growth
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)        # high precision, not quantized
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 2 * config.mlp_hidden)   # gate and up, fused (quantized)
        self.c_proj = Linear(config.mlp_hidden, config.n_embd)     # down (quantized)

    def forward(self, x):
        gate, up = self.c_fc(x).chunk(2, dim=-1)
        return self.c_proj(F.silu(gate) * up)                      # SwiGLU


class Block(nn.Module):
    """OLMo 2 block: h = x + norm(attn(x)); out = h + norm(mlp(h)) (norms on the sublayer outputs)."""

    def __init__(self, config):
        super().__init__()
        self.attn, self.ln_1 = CausalSelfAttention(config), RMSNorm(config.n_embd)
        self.mlp, self.ln_2 = MLP(config), RMSNorm(config.n_embd)

    def forward(self, x, cos, sin):
        # Normalizing the sublayer *output* (not its input, as GPT-2 does) keeps every residual update at a
        # controlled scale, which OLMo 2 found more stable; it also keeps the inputs of the next block's FP4
        # linears in a steady range.
        x = x + self.ln_1(self.attn(x, cos, sin))
        return x + self.ln_2(self.mlp(x))


class GPT(nn.Module):
    def __init__(self, config, compute_dtype=torch.float32):
        super().__init__()
        if config.n_embd % config.n_head or (config.n_embd // config.n_head) % 2:
            raise ValueError(f"n_embd={config.n_embd} must split into n_head={config.n_head} heads of even size")
        self.config, self.compute_dtype = config, compute_dtype
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=RMSNorm(config.n_embd),
        ))
        self.lm_head = Linear(config.n_embd, config.vocab_size)   # untied, high precision
        cos, sin = rope_tables(config.block_size, config.n_embd // config.n_head, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # init: N(0, 0.02) everywhere (OLMo 2), residual output projections scaled by 1/sqrt(2 n_layer) (GPT-2)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None):
        """idx (B, T) int64 -> logits (B, T, vocab) fp32, and the mean cross-entropy if targets are given."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]                     # (T, hd/2)
        x = self.transformer.wte(idx).to(self.compute_dtype)               # (B, T, C); no position embedding:
        # positions enter only through RoPE inside attention
        for block in self.transformer.h:
            x = block(x, cos, sin)
        logits = self.lm_head(self.transformer.ln_f(x)).float()           # (B, T, vocab), fp32 for the loss
        loss = None if targets is None else F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, vocab_size=None):
        """Sample a continuation (nanoGPT): idx (B, T) int64 -> (B, T + max_new_tokens) int64, idx followed by
        the new tokens. Each step feeds the last block_size tokens (the context is cropped: RoPE tables and
        the causal mask only reach that far), divides the last position's logits by `temperature` (< 1 is
        sharper), keeps the `top_k` largest if given, and draws from the softmax with torch.multinomial.
        generator: a torch.Generator on idx's device, for a reproducible sample; None uses torch's global RNG.
        vocab_size: draw only ids below it, the dataset's real vocabulary (train.build_model pads the LM head
        to a multiple of 64; the padded logits were never targets, but a short run leaves them drawable).
        An FP4 model (fp4.convert_to_fp4) needs nothing special: its forward is the FP4 forward."""
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size:]                    # (B, <= block_size)
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :vocab_size] / temperature              # (B, vocab) fp32
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]   # (B, 1)
                logits[logits < kth] = -float("inf")
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator)     # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx

    def configure_optimizer(self, lr, weight_decay, betas, device_type):
        """AdamW on the fp32 master weights; weight decay on matrices only (not norms)."""
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type == "cuda")
