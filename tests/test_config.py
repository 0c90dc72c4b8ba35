"""train.py's configuration: the recipe flags over a preset (printed, saved, trained bit for bit like the preset
they rebuild), the --dtype auto rule and the fixed eval set. Run: python -m pytest tests/test_config.py -q"""
import dataclasses

import torch

import fp4
import train
from test_train import run


def test_recipe_flags_turn_one_preset_into_another_and_the_checkpoint_says_so(dataset, tmp_path, capsys):
    # nvidia's preset with every recipe flag set to tetrajet's value trains bit for bit like tetrajet
    flags = ["--fp4-outer", "128", "--fp4-weight-tile", "1x16", "--fp4-rht", "both", "--fp4-rht-signs", "random",
             "--fp4-grad-rounding", "stochastic", "--fp4-other-rounding", "stochastic", "--fp4-aligned", "true"]
    rebuilt = run(dataset, tmp_path / "a", "--fp4", "--fp4-recipe", "nvidia", *flags)
    assert "FP4 recipe: Recipe(name='nvidia[outer=128,weight-tile=1x16,rht=both,rht-signs=random," in capsys.readouterr().out
    tetrajet = run(dataset, tmp_path / "b", "--fp4", "--fp4-recipe", "tetrajet")
    assert [r["val_loss"] for r in rebuilt] == [r["val_loss"] for r in tetrajet]
    saved = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)["recipe"]
    assert saved == dict(dataclasses.asdict(fp4.RECIPES["tetrajet"]), name=saved["name"]) and saved["rht"] == ("dgrad", "wgrad")
    ablated = run(dataset, tmp_path / "c", "--fp4", "--fp4-recipe", "tetrajet", "--fp4-rht", "none")
    assert [r["val_loss"] for r in ablated] != [r["val_loss"] for r in tetrajet]


def test_dtype_auto_is_bf16_only_where_the_cpu_multiplies_it_natively(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    dtype, why = train.activation_dtype("auto", "cpu")
    assert dtype == torch.float32 and "no native bf16" in why
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert train.activation_dtype("auto", "cpu") == (torch.bfloat16, "auto: this CPU multiplies bf16 natively (AVX512-BF16)")
    assert train.activation_dtype("auto", "cuda")[0] == torch.bfloat16
    assert train.activation_dtype("bfloat16", "cpu") == (torch.bfloat16, "as requested")
    assert train.activation_dtype("auto", "mps")[0] == torch.float32


def test_fixed_eval_set_is_the_same_tokens_for_every_seed_and_the_seeded_one_is_not(dataset):
    from data.prepare import load_dataset
    _, splits = load_dataset(dataset, 32)
    val = splits["val"]

    def batches(seed, eval_set):
        cfg = train.TrainConfig(seed=seed, eval_set=eval_set, block_size=32, batch_size=4, eval_iters=3)
        return train.eval_batches(val, cfg, 0, 1, "cpu")
    fixed, seeded = [batches(s, "fixed") for s in (1, 2)], [batches(s, "seeded") for s in (1, 2)]
    assert len(fixed[0]) == 3 and fixed[0][0][0].shape == (4, 32)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(*fixed))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(*seeded))
    x, y = fixed[0][0]
    assert torch.equal(x[:, 1:], y[:, :-1])                                   # targets: the next token
    assert torch.equal(x[0], torch.from_numpy(val[:32].astype("int64")))      # evenly spaced from the start
    assert len({tuple(x[i].tolist()) for x, _ in fixed[0] for i in range(4)}) == 12   # 12 distinct windows
