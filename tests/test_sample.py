"""model.GPT.generate and sample.py: shapes and valid ids, seeded reproducibility, context cropping, sampling
from a baseline and an FP4 checkpoint, one-line errors. Run: python -m pytest tests/test_sample.py -q"""
import pytest
import torch

import fp4
import sample
import train
from conftest import TINY


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small run fastest on one thread (and ~100x slower on two when the CPUs are busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(dataset, tmp_path_factory):
    """-> {"baseline": out_dir, "fp4": out_dir}: two tiny CPU runs of 6 steps each."""
    out = {}
    for name, flags in (("baseline", []), ("fp4", ["--fp4", "--fp4-path", "reference"])):
        out[name] = str(tmp_path_factory.mktemp(name))
        train.main(["--dataset", dataset, "--out-dir", out[name], "--device", "cpu", "--dtype", "float32",
                    "--max-iters", "6", "--eval-interval", "6", *TINY, *flags])
    return out


@pytest.mark.parametrize("kind", ["baseline", "fp4"])
def test_generate_shape_valid_ids_and_seeded(runs, kind):
    model, *_ = sample.load_model(runs[kind], "cpu", torch.float32)
    assert any(isinstance(m, fp4.FP4Linear) for m in model.modules()) == (kind == "fp4")
    idx = torch.tensor([[10, 97, 98], [32, 32, 61]])                       # (2, 3)
    draw = lambda seed, n=30, **kw: model.generate(idx, n, generator=torch.Generator().manual_seed(seed), **kw)
    out = draw(0)                       # 3 + 30 tokens > block_size 32: the context must be cropped
    assert out.shape == (2, 33) and out.dtype == torch.int64 and torch.equal(out[:, :3], idx)
    assert 0 <= out.min() and out.max() < model.config.vocab_size
    assert torch.equal(out, draw(0)) and not torch.equal(out, draw(1))
    top1 = draw(0, n=8, top_k=1)                                           # top-1 = greedy, whatever the seed
    assert torch.equal(top1, draw(5, n=8, top_k=1, temperature=0.5))
    assert draw(0, n=8, temperature=5.0, vocab_size=20)[:, 3:].max() < 20  # (the vocab padding is never drawn)


@pytest.mark.parametrize("kind", ["baseline", "fp4"])
def test_sample_py_prints_samples_and_the_same_seed_repeats(runs, kind, capsys):
    argv = ["--out-dir", runs[kind], "--device", "cpu", "--num-samples", "2", "--max-new-tokens", "20",
            "--start", "alpha"]
    sample.main(argv)
    out = capsys.readouterr().out
    header, *body = out.splitlines()
    assert header.startswith("loaded ") and ("FP4 recipe tetrajet, path reference" if kind == "fp4"
                                             else "baseline") in header
    assert out.count("-" * 80) == 2 and out.count("alpha") >= 2           # each sample continues the start text
    sample.main(argv)
    assert capsys.readouterr().out == out
    sample.main(argv + ["--seed", "7"])
    assert capsys.readouterr().out != out


@pytest.mark.parametrize("argv, message", [
    (["--out-dir", "/nonexistent/run"], "no checkpoint at /nonexistent/run/ckpt.pt; train one first"),
    (["--temperature", "0"], "--temperature must be > 0"), (["--top-k", "many"], "invalid int value")])
def test_bad_input_exits_with_one_clear_line(argv, message):
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    assert str(e.value).startswith("error: ") and message in str(e.value) and "\n" not in str(e.value)
