"""
data/prepare.py: turn text into the token files train.py reads, and check them when it does (nanoGPT style).
One function per dataset; each writes data/<name>/train.bin and val.bin (raw uint16 token ids, no header,
np.memmap-able) and meta.pkl (tokenizer, vocab size, how many bytes or chars a token is worth, sources,
sha256 of the bins). load_dataset() opens them for train.py and refuses missing or corrupt files.

    python data/prepare.py pystdlib                           # the offline default corpus (train.py runs this)
    python data/prepare.py shakespeare_char [--input FILE]    # tinyshakespeare, char-level (downloads once)
    python data/prepare.py textfile --input FILE --tokenizer {byte,char,gpt2} [--name NAME] [--val-from BYTE]

pystdlib is built from what every Python install already has: the standard library's source (docstrings and
all) and its bundled documentation (pydoc_data/topics.py) of the running interpreter, read as bytes (vocab
256), files in sorted order, test suites left out, and split by file (a file's sha256-of-path decides), so no
file leaks between train and val. Its size depends on the Python version (3.11: 746 files, ~12 MB); the
version, file list and sha256 of the outputs are recorded in meta.pkl. Nothing third-party is committed.
"""

import argparse
import hashlib
import os
import pickle
import sys
import sysconfig
import urllib.request
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).resolve().parent
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
STDLIB_SUFFIXES = (".py", ".txt", ".rst")
VAL_FRACTION = 0.1


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_dataset(name, train_ids, val_ids, meta, root=DATA_DIR):
    """Write <root>/<name>/{train,val}.bin (uint16) and meta.pkl; each file atomically (tmp + rename)."""
    out = Path(root) / name
    out.mkdir(parents=True, exist_ok=True)
    if meta["vocab_size"] > 65536:
        raise ValueError(f"vocab_size {meta['vocab_size']} does not fit uint16 token files")
    meta = dict(meta, train_tokens=len(train_ids), val_tokens=len(val_ids))
    for split, ids in (("train", train_ids), ("val", val_ids)):   # (a tmp name per process: two runs may build at once)
        tmp = out / f"{split}.bin.{os.getpid()}.tmp"
        np.asarray(ids, dtype=np.uint16).tofile(tmp)
        os.replace(tmp, out / f"{split}.bin")
        meta[f"{split}_sha256"] = sha256_file(out / f"{split}.bin")
    with open(out / f"meta.pkl.{os.getpid()}.tmp", "wb") as f:
        pickle.dump(meta, f)
    os.replace(out / f"meta.pkl.{os.getpid()}.tmp", out / "meta.pkl")
    print(f"wrote {out}: {len(train_ids):,} train / {len(val_ids):,} val tokens, vocab {meta['vocab_size']} "
          f"({meta['tokenizer']})")
    return out


def tokenize(text, tokenizer, stoi=None):
    """str -> (list of ids, meta). byte: UTF-8 bytes (vocab 256). char: one id per distinct character
    (vocab from `stoi`, or built from `text`). gpt2: tiktoken's GPT-2 BPE (vocab 50257)."""
    if tokenizer == "byte":
        return list(text.encode("utf-8")), dict(tokenizer="byte", vocab_size=256, unit="byte")
    if tokenizer == "char":
        stoi = stoi or {c: i for i, c in enumerate(sorted(set(text)))}
        return [stoi[c] for c in text], dict(tokenizer="char", vocab_size=len(stoi), unit="char", stoi=stoi,
                                             itos={i: c for c, i in stoi.items()})
    if tokenizer == "gpt2":
        try:
            import tiktoken
            enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # tiktoken downloads its BPE files on first use
            sys.exit(f"error: could not load tiktoken's GPT-2 BPE ({type(e).__name__}: {e}). Offline? Set "
                     f"TIKTOKEN_CACHE_DIR to a folder holding its cached files, or use --tokenizer byte/char")
        return enc.encode_ordinary(text), dict(tokenizer="gpt2", vocab_size=enc.n_vocab, unit="byte")
    raise ValueError(f"unknown tokenizer {tokenizer!r}: choose byte, char or gpt2")


def prepare_text(name, text, tokenizer, source, root=DATA_DIR, val_from=None):
    """Split a text 90/10 (nanoGPT: the last 10% is val), or at byte offset `val_from` when the corpus defines
    its own split (gutenberg_subset.txt: whole books from byte 38,234,253 on, so no book is in both halves);
    tokenize, write. For byte-level units, the meta records bytes per val token so train.py can report bits per
    byte whatever the tokenizer."""
    if not text:
        sys.exit(f"error: {source} is empty")
    cut = int(len(text) * (1 - VAL_FRACTION))
    if val_from is not None:
        raw = text.encode("utf-8")
        if not 0 < val_from < len(raw):
            sys.exit(f"error: --val-from {val_from} is outside {source} (1..{len(raw) - 1} bytes)")
        try:
            cut = len(raw[:val_from].decode("utf-8"))
        except UnicodeDecodeError:
            sys.exit(f"error: --val-from {val_from} falls inside a UTF-8 character of {source}; give a character boundary")
    stoi = {c: i for i, c in enumerate(sorted(set(text)))} if tokenizer == "char" else None  # whole text's chars
    train_ids, meta = tokenize(text[:cut], tokenizer, stoi)
    val_ids, _ = tokenize(text[cut:], tokenizer, stoi)
    units = len(text[cut:].encode("utf-8")) if meta["unit"] == "byte" else len(text[cut:])
    meta.update(units_per_token=units / len(val_ids), source=source)
    return write_dataset(name, train_ids, val_ids, meta, root)


def read_text(path):
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        sys.exit(f"error: cannot read {path} as UTF-8 text: {e}")


def stdlib_files():
    """-> sorted list of (relative posix path, Path) of the running interpreter's stdlib text files."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = [(p.relative_to(lib).as_posix(), p) for p in lib.rglob("*")
             if p.suffix in STDLIB_SUFFIXES and p.is_file()
             and not STDLIB_SKIP.intersection(p.relative_to(lib).parts)]
    return sorted(files)


def prepare_pystdlib(name="pystdlib", root=DATA_DIR):
    files = stdlib_files()
    if not files:
        sys.exit(f"error: found no standard-library sources under {sysconfig.get_paths()['stdlib']}; "
                 f"use `python data/prepare.py textfile --input FILE` for any text file instead")
    splits = {"train": [], "val": []}
    for rel, path in files:
        # one header line per file, so a sample shows where it came from; val = files whose path hashes to 0 mod 10
        doc = f"# file: {rel}\n".encode() + path.read_bytes() + b"\n"
        is_val = int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) % round(1 / VAL_FRACTION) == 0
        splits["val" if is_val else "train"].append(doc)
    train, val = (np.frombuffer(b"".join(splits[s]), dtype=np.uint8) for s in ("train", "val"))
    meta = dict(tokenizer="byte", vocab_size=256, unit="byte", units_per_token=1.0,
                source=f"Python {sys.version.split()[0]} standard library at {sysconfig.get_paths()['stdlib']}",
                files=[rel for rel, _ in files], python_version=sys.version.split()[0])
    return write_dataset(name, train, val, meta, root)


def prepare_shakespeare_char(input_path=None):
    if input_path is None:
        input_path = DATA_DIR / "shakespeare_char" / "input.txt"
        if not input_path.exists():
            print(f"downloading {SHAKESPEARE_URL}")
            try:
                input_path.parent.mkdir(parents=True, exist_ok=True)
                urllib.request.urlretrieve(SHAKESPEARE_URL, input_path.with_suffix(".tmp"))
                os.replace(input_path.with_suffix(".tmp"), input_path)     # never a half-downloaded input.txt
            except OSError as e:
                sys.exit(f"error: could not download tinyshakespeare ({e}); pass --input /path/to/input.txt")
    return prepare_text("shakespeare_char", read_text(input_path), "char", str(input_path))


def dataset_dir(name):
    """--dataset: a folder path, or a name under data/."""
    return name if os.path.isdir(name) else str(DATA_DIR / name)


def load_dataset(data_dir, block_size, world=1):
    """Open a prepared dataset for training: -> (meta, {"train": memmap, "val": memmap}) of uint16 tokens.
    One clear error, naming the command that fixes it, if anything is missing, truncated, corrupt (sha256,
    for files under 1 GiB) or too short for `block_size` tokens per each of `world` processes' shards."""
    name = os.path.basename(data_dir)
    fix = ("python data/prepare.py pystdlib" if name == "pystdlib" else "python data/prepare.py shakespeare_char"
           if name == "shakespeare_char" else f"python data/prepare.py textfile --input FILE --name {name}")
    try:
        with open(os.path.join(data_dir, "meta.pkl"), "rb") as f:
            meta = pickle.load(f)
        splits = {s: np.memmap(os.path.join(data_dir, f"{s}.bin"), dtype=np.uint16, mode="r") for s in ("train", "val")}
    except (OSError, pickle.UnpicklingError, EOFError) as e:
        sys.exit(f"error: dataset '{name}' is missing or unreadable in {data_dir} ({e}); prepare it with: {fix}")
    for s, data in splits.items():
        if len(data) != meta[f"{s}_tokens"]:
            sys.exit(f"error: data/{name}/{s}.bin has {len(data)} tokens, meta.pkl says {meta[f'{s}_tokens']} "
                     f"(truncated or stale?); re-run: {fix}")
        if data.nbytes < 1 << 30 and sha256_file(os.path.join(data_dir, f"{s}.bin")) != meta[f"{s}_sha256"]:
            sys.exit(f"error: data/{name}/{s}.bin does not match the sha256 in meta.pkl (corrupt?); re-run: {fix}")
        if len(data) // world <= block_size + 1:
            sys.exit(f"error: data/{name}/{s}.bin ({len(data)} tokens) is too short for --block-size {block_size}")
    return meta, splits


def main(argv=None):
    p = argparse.ArgumentParser(prog="data/prepare.py", description="\n\n".join(__doc__.split("\n\n")[:2]),
                                allow_abbrev=False, formatter_class=argparse.RawTextHelpFormatter)
    p.error = lambda message: sys.exit(f"error: {message} (see python data/prepare.py --help)")
    p.add_argument("dataset", choices=["pystdlib", "shakespeare_char", "textfile"])
    p.add_argument("--input", help="a UTF-8 text file (shakespeare_char: instead of downloading; textfile: required)")
    p.add_argument("--tokenizer", choices=["byte", "char", "gpt2"], default="byte", help="textfile only (default byte)")
    p.add_argument("--name", help="textfile only: output folder under data/ (default: the file's stem)")
    p.add_argument("--val-from", type=int, help="textfile only: byte offset where the val split starts (default: last 10%%)")
    args = p.parse_args(argv)
    if args.dataset == "pystdlib":
        return prepare_pystdlib()
    if args.dataset == "shakespeare_char":
        return prepare_shakespeare_char(args.input)
    if not args.input:
        p.error("textfile needs --input FILE")
    return prepare_text(args.name or Path(args.input).stem, read_text(args.input), args.tokenizer, args.input,
                        val_from=args.val_from)


if __name__ == "__main__":
    main()
