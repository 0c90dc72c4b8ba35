"""
sample.py: print text sampled from a checkpoint train.py wrote, FP4 or baseline (nanoGPT's sample.py).

    python sample.py --out-dir out                                  # 2 samples of 200 tokens after "\\n"
    python sample.py --out-dir out --start "def main(" --num-samples 4 --temperature 0.8 --top-k 50

The model is rebuilt exactly as train.py built it, by train.build_model from the checkpoint's config (FP4 recipe,
kernel and layer swap included), so an FP4 model samples through its FP4 forward. Text goes through the dataset's tokenizer
(byte, char or GPT-2 BPE, see data/prepare.py). The same --seed gives the same samples.
"""

import argparse
import contextlib
import os
import pickle
import sys
from dataclasses import replace

import torch

import config
import fastpaths
import train
from data.prepare import dataset_dir, tokenize


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):                      # "error: <what>" and nothing else (no usage dump)
        sys.exit(f"error: {message} (see python sample.py --help)")


def parse_args(argv):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--out-dir", default="out", help="the folder holding train.py's ckpt.pt (default: out)")
    p.add_argument("--start", default="\n", help="text the samples continue (default: a newline)")
    p.add_argument("--num-samples", type=int, default=2, help="samples to draw (default: 2)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens per sample (default: 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="< 1 sharper, > 1 more random (default: 0.8)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens; 0 = all (default: 50)")
    p.add_argument("--seed", type=int, default=1337, help="the sampling generator's seed (default: 1337)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"], help="default: auto")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"],
                   help="activation dtype; auto as train.py picks it (default: the run's own)")
    p.add_argument("--fp4-path", choices=["auto", *fastpaths.PATHS],
                   help="FP4 quantizer implementation (same bits on every path; default: the checkpoint's)")
    args = p.parse_args(argv)
    for bad, msg in ((args.num_samples < 1, "--num-samples must be >= 1"),
                     (args.max_new_tokens < 0, "--max-new-tokens must be >= 0"),
                     (not 1e-3 <= args.temperature < float("inf"),        # below 1e-3 the logits / T overflow
                      "--temperature must be a finite number >= 0.001 (for greedy sampling use --top-k 1)"),
                     (args.top_k < 0, "--top-k must be >= 0 (0 = no top-k)")):
        if bad:
            sys.exit(f"error: {msg}")
    if os.path.isfile(args.out_dir):
        sys.exit(f"error: --out-dir {args.out_dir} is a file; pass the run's folder, the one holding ckpt.pt "
                 f"(--out-dir {os.path.dirname(args.out_dir) or '.'})")
    return args


def load_model(out_dir, device, dtype=None, fp4_path=None):
    """<out_dir>/ckpt.pt -> (model in eval mode on `device`, checkpoint, TrainConfig): the model as it trained, built
    by train.build_model (FP4 layers, their recipe and state included). dtype: the activation dtype, None for the
    run's own (what its --dtype gives on this device). Exits with one line if the checkpoint is missing or unfit."""
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    ckpt, cfg = config.load_checkpoint(ckpt_path, f"train one first (python train.py --out-dir {out_dir}) or pass "
                                                  f"--out-dir of a finished run")
    if "dataset_meta" not in ckpt or "model" not in ckpt:
        sys.exit(f"error: {ckpt_path} is not a checkpoint train.py wrote (no model or dataset_meta)")
    vocab_size = ckpt["dataset_meta"]["vocab_size"]
    if fp4_path:
        cfg = replace(cfg, fp4_path=fp4_path)
    if dtype is None:                                      # the run's own (a config from before it was resolved: auto)
        dtype, _ = config.activation_dtype(cfg.dtype, torch.device(device).type)
    with contextlib.redirect_stdout(sys.stderr):           # its start-up lines are a log, not a sample
        model, _ = train.build_model(cfg, vocab_size, dtype, device, log=lambda line: print(line, file=sys.stderr))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        sys.exit(f"error: {ckpt_path} does not fit the model its config builds (written by another version of "
                 f"model.py or fp4.py?): {str(e).splitlines()[0]}")
    return model.eval(), ckpt, cfg


def tokenizer(ckpt, cfg):
    """-> (encode: str -> list of ids, decode: list of ids -> str) for the checkpoint's dataset. Char-level
    needs the dataset's meta.pkl (the checkpoint records only the tokenizer's name and vocab size)."""
    name = ckpt["dataset_meta"]["tokenizer"]
    if name == "byte":
        decode = lambda ids: bytes(ids).decode("utf-8", errors="replace")   # a cut multi-byte char shows as �
    elif name == "char":
        meta_path = os.path.join(dataset_dir(cfg.dataset), "meta.pkl")
        try:
            with open(meta_path, "rb") as f:
                stoi = pickle.load(f)["stoi"]
        except (OSError, pickle.UnpicklingError, EOFError, KeyError) as e:
            sys.exit(f"error: char-level checkpoint, but its dataset's vocabulary {meta_path} is unreadable ({e}); "
                     f"re-create the dataset it was trained on (data/prepare.py)")
        if len(stoi) != ckpt["dataset_meta"]["vocab_size"]:
            sys.exit(f"error: {meta_path} has {len(stoi)} characters, the checkpoint was trained on "
                     f"{ckpt['dataset_meta']['vocab_size']}: the dataset was re-prepared from another text")
        itos = {i: c for c, i in stoi.items()}
        decode = lambda ids: "".join(itos[i] for i in ids)
    else:
        tokenize("", name)                                 # exits with one line if tiktoken cannot load
        import tiktoken
        decode = tiktoken.get_encoding(name).decode

    def encode(text):
        try:
            return tokenize(text, name, stoi if name == "char" else None)[0]
        except KeyError as e:
            sys.exit(f"error: --start has a character the dataset's vocabulary lacks: {e}")

    return encode, decode


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available() or device == "mps" and not torch.backends.mps.is_available():
        sys.exit(f"error: --device {device}, but this torch sees no {device} device; use --device cpu or auto")
    dtype = config.activation_dtype(args.dtype, device.split(":")[0])[0] if args.dtype else None
    torch.manual_seed(args.seed)
    model, ckpt, cfg = load_model(args.out_dir, device, dtype, args.fp4_path)
    encode, decode = tokenizer(ckpt, cfg)
    start_ids = encode(args.start)
    if not start_ids:
        sys.exit("error: --start encodes to no tokens; give at least one character")
    what = f"FP4 recipe {cfg.fp4_recipe}" if cfg.fp4 else "baseline (no FP4)"
    print(f"loaded {os.path.join(args.out_dir, 'ckpt.pt')}: model {cfg.model} ({model.num_params() / 1e6:.2f}M "
          f"parameters), step {ckpt.get('step', '?')}, val_loss {ckpt.get('best_val_loss', float('nan')):.4f}, "
          f"{what}, {ckpt['dataset_meta']['tokenizer']} tokens, activations {str(model.compute_dtype).removeprefix('torch.')}, "
          f"{device}")
    x = torch.tensor([start_ids] * args.num_samples, dtype=torch.long, device=device)   # (num_samples, T)
    gen = torch.Generator(device).manual_seed(args.seed)
    try:
        y = model.generate(x, args.max_new_tokens, args.temperature, args.top_k or None, generator=gen,
                           vocab_size=ckpt["dataset_meta"]["vocab_size"])       # (num_samples, T + new)
    except (torch.OutOfMemoryError, RuntimeError) as e:                         # the CPU allocator's is a RuntimeError
        if "memory" not in str(e):
            raise
        sys.exit(f"error: out of memory drawing {args.num_samples} samples at once on {device}; use fewer "
                 f"--num-samples")
    for row in y.tolist():
        print(decode(row))
        print("-" * 80)


if __name__ == "__main__":
    main()
