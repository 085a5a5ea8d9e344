"""`peftkit merge mode=compress` (ComPEFT): τ = trained − initial, top-k by |τ|, sign × one scale per tensor.

References are independent of peftkit's code: numpy for the bit packing (np.packbits) and for the
closed form (argsort, mean, std in float64); the initial weights come from the lr=0 run's saved
adapter, which never moved from them.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import run_cli
from methods._helpers import LABELS, SENTENCES, backbone_cfg, outputs, perturb
from safetensors.torch import load_file

from peftkit import adapter, model
from peftkit.merge import compress
from peftkit.train import seed_everything

THREADS = {"OMP_NUM_THREADS": "1"}
SCALE_RTOL = 1e-6  # the stored float32 scale vs the float64 closed form: float32 rounding only
LOGITS_ATOL = 1e-5  # a folded-in adapter vs the adapter, fp32


def cli(*args, cwd):
    return run_cli(*args, cwd=cwd, env=THREADS)


def train(tmp, tiny_bert, name, *extra):
    """A 4-step quickstart LoRA run on the tiny BERT (seed 3)."""
    r = cli("train", "recipe=quickstart", f"backbone.path={tiny_bert}", "trainer.max_steps=4", "trainer.eval_every=4",
            "dataset.max_train_samples=128", "dataset.max_eval_samples=32", "seed=3", f"hydra.run.dir={tmp / name}", *extra, cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / name


@pytest.fixture(scope="module")
def runs(tiny_bert, tmp_path_factory):
    """Two runs: `frozen` (trainer.lr=0, so its adapter is the initial one) and `trained`; `trained` compressed to `c10`."""
    tmp = tmp_path_factory.mktemp("compress")
    frozen = train(tmp, tiny_bert, "frozen", "trainer.lr=0")
    trained = train(tmp, tiny_bert, "trained", "trainer.lr=1e-2")
    r = cli("merge", "mode=compress", f"adapter={trained}", f"out={tmp / 'c10'}", cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "×" in r.stdout and "relative error" in r.stdout
    return tmp, frozen, trained, tmp / "c10"


def initial(meta: dict) -> dict[str, torch.Tensor]:
    """The adapter's tensors right after build, seeded as training seeds it."""
    seed_everything(meta["seed"])
    a = model.build(backbone_cfg(meta["backbone"]["path"]), meta["method"], meta["label_names"])
    params = dict(a.model.named_parameters())
    return {n: params[n].detach().clone() for n in a.trainable if n in params}


def unpack(packed: torch.Tensor, n: int) -> np.ndarray:
    return np.unpackbits(packed.numpy())[:n].astype(bool)


def assert_user_error(r, *needles: str) -> None:
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("peftkit: error:"), r.stderr
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"


# ---------------------------------------------------------------- the initial weights are rebuilt exactly

def test_the_seed_rebuilds_the_initial_adapter_bit_for_bit(runs):
    _, frozen, _, _ = runs
    meta = adapter.read_config(frozen / "adapter")
    saved = load_file(str(frozen / "adapter" / adapter.WEIGHTS))
    rebuilt = initial(meta)
    assert rebuilt.keys() == saved.keys() and any(".lora_A" in n for n in saved) and any(n.startswith("classifier.") for n in saved)
    differ = [n for n in saved if saved[n].dtype != rebuilt[n].dtype or not torch.equal(saved[n], rebuilt[n])]
    assert not differ, f"{len(differ)} of {len(saved)} rebuilt tensors differ, e.g. {differ[:3]}"
    assert all(saved[n].abs().sum() > 0 for n in saved if ".lora_A" in n or n == "classifier.weight")  # random, not trivially 0
    other = initial({**meta, "seed": meta["seed"] + 1})  # the seed is what decides them
    assert not torch.equal(other["classifier.weight"], saved["classifier.weight"])
    # and compress's own rebuild is the same
    mine = compress.initial_tensors(meta, frozen, None)
    assert mine.keys() == saved.keys() and all(torch.equal(mine[n], saved[n]) for n in saved)


# ---------------------------------------------------------------- the format and the closed form

@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1000])
def test_bit_packing_is_numpy_packbits_and_round_trips(n):
    bits = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.3
    packed = compress.pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n / 8)
    assert np.array_equal(packed.numpy(), np.packbits(bits.numpy()))
    assert torch.equal(compress.unpack_bits(packed, n), bits)
    with pytest.raises(ValueError):
        compress.unpack_bits(torch.cat([packed, packed.new_zeros(1)]), n)


def test_kept_count_is_ceil_density_n():
    assert compress.kept_count(30, 0.1) == 3  # 0.1 · 30 is 3.0000000000000004 in floating point
    assert compress.kept_count(31, 0.1) == 4
    assert compress.kept_count(5, 0.01) == 1  # at least one
    assert compress.kept_count(407, 1.0) == 407


def closed_form(tau: np.ndarray, density: float, alpha: float, scale: str) -> tuple[np.ndarray, float]:
    """The support (ceil(density·n) largest |τ|, zeros dropped) and the scale, from the definition."""
    flat = tau.ravel().astype(np.float64)
    k = math.ceil(round(density * flat.size, 6))
    keep = np.zeros(flat.size, bool)
    keep[np.argsort(-np.abs(flat), kind="stable")[:k]] = True
    keep &= flat != 0
    c = alpha * (np.abs(flat[keep]).mean() if scale == "mean" else flat.std())
    return keep, c


@pytest.mark.parametrize("density, alpha, scale", [(0.1, 1.0, "mean"), (0.3, 0.5, "std"), (1.0, 1.0, "mean"), (1.0, 2.0, "std")])
def test_compress_then_decompress_is_the_closed_form(density, alpha, scale):
    tau = torch.randn(37, 11, generator=torch.Generator().manual_seed(0))
    tau[0, :5] = 0  # zeros have no sign: never kept, not counted in the mean
    stored = compress.compress_tensor("w", tau, density, alpha, scale)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in stored.items()} == {
        "w.mask": (torch.uint8, (math.ceil(407 / 8),)), "w.sign": (torch.uint8, (math.ceil(int(unpack(stored["w.mask"], 407).sum()) / 8),)),
        "w.scale": (torch.float32, ())}
    keep, c = closed_form(tau.numpy(), density, alpha, scale)
    assert np.array_equal(unpack(stored["w.mask"], 407), keep)
    assert keep.sum() == min(math.ceil(round(density * 407, 6)), 402)
    torch.testing.assert_close(stored["w.scale"], torch.tensor(c, dtype=torch.float32), rtol=SCALE_RTOL, atol=0)
    got = compress.decompress({**stored}, {"w": tau.shape})["w"]
    expected = torch.where(torch.from_numpy(keep.reshape(tau.shape)), torch.sign(tau) * stored["w.scale"], torch.zeros(()))
    assert torch.equal(got, expected)
    if density == 1.0:  # every nonzero entry kept, still ternary: sign(τ) · c
        assert torch.equal(got, torch.sign(tau) * stored["w.scale"])
        if scale == "mean":  # c = mean|τ| minimises ‖τ − c·sign τ‖ over c: ‖τ‖² − n·c² with n the nonzeros
            err2 = ((got.double() - tau.double()) ** 2).sum().item()
            assert err2 == pytest.approx((tau.double() ** 2).sum().item() - 402 * c * c, rel=1e-6)
            for f in (0.99, 1.01):
                assert ((f * got.double() - tau.double()) ** 2).sum().item() > err2


def test_an_all_zero_tensor_compresses_to_zero():
    stored = compress.compress_tensor("w", torch.zeros(3, 4), 0.5, 1.0, "mean")
    assert stored["w.scale"].item() == 0 and not unpack(stored["w.mask"], 12).any()
    assert torch.equal(compress.decompress(stored, {"w": torch.Size([3, 4])})["w"], torch.zeros(3, 4))


# ---------------------------------------------------------------- a compressed trained run

def test_a_compressed_run_loads_as_initial_plus_the_closed_form(runs):
    _, frozen, trained, out = runs
    meta = adapter.read_config(out / "adapter")
    assert meta["compression"]["method"] == "compeft" and meta["compression"]["density"] == 0.1
    assert meta["compression"]["scale"] == "mean" and meta["compression"]["alpha"] == 1.0
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["README.md", compress.WEIGHTS, adapter.CONFIG]
    assert (out / "config.yaml").read_text() == (trained / "config.yaml").read_text()

    source = load_file(str(trained / "adapter" / adapter.WEIGHTS))
    init = load_file(str(frozen / "adapter" / adapter.WEIGHTS))  # the same seed and recipe, never moved
    stored = load_file(str(out / "adapter" / compress.WEIGHTS))
    assert set(stored) == {n + s for n in source for s in (".mask", ".sign", ".scale")}
    a, _ = model.from_adapter(out / "adapter")
    params = dict(a.model.named_parameters())
    err2 = norm2 = 0.0
    for n, theta in source.items():
        tau = (theta - init[n]).numpy()
        keep = unpack(stored[n + ".mask"], tau.size)
        k = math.ceil(round(0.1 * tau.size, 6))
        flat = np.abs(tau.ravel())
        # the support is a top-k by |τ| (ties may be broken either way), without zeros
        assert keep.sum() == min(k, int((flat > 0).sum())), n
        if keep.any() and not keep.all():
            assert flat[keep].min() >= flat[~keep].max(), n
        positive = unpack(stored[n + ".sign"], int(keep.sum()))
        assert np.array_equal(positive, tau.ravel()[keep] > 0), n
        c = np.abs(tau.ravel()[keep]).mean()
        torch.testing.assert_close(stored[n + ".scale"], torch.tensor(c, dtype=torch.float32), rtol=SCALE_RTOL, atol=0)
        s = stored[n + ".scale"]
        approx = torch.zeros(tau.size)
        approx[torch.from_numpy(keep)] = torch.where(torch.from_numpy(positive), s, -s)
        assert torch.equal(params[n].detach(), init[n] + approx.view(theta.shape)), n
        err2 += ((approx.double().numpy() - tau.ravel()) ** 2).sum()
        norm2 += (tau.astype(np.float64) ** 2).sum()

    info = json.loads((out / "merge.json").read_text())
    assert info["mode"] == "compress" and info["tensors_compressed"] == len(source) and info["tensors_dense"] == 0
    assert info["relative_error"] == pytest.approx(math.sqrt(err2 / norm2), rel=1e-6)
    assert 0 < info["relative_error"] < 1


def test_bytes_and_ratio(runs):
    _, _, trained, out = runs
    info = json.loads((out / "merge.json").read_text())
    source = load_file(str(trained / "adapter" / adapter.WEIGHTS))
    stored = load_file(str(out / "adapter" / compress.WEIGHTS))
    assert info["original_bytes"] == sum(4 * t.numel() for t in source.values())  # fp32
    # per tensor: a bit per entry, a bit per kept entry, a float32 scale (no τ of a trained tensor is 0 here)
    assert info["compressed_bytes"] == sum(math.ceil(t.numel() / 8) + math.ceil(math.ceil(round(0.1 * t.numel(), 6)) / 8) + 4
                                           for t in source.values())
    assert info["compressed_bytes"] == sum(t.numel() * t.element_size() for t in stored.values())
    assert info["ratio"] == pytest.approx(info["original_bytes"] / info["compressed_bytes"]) and info["ratio"] > 10
    assert info["original_file_bytes"] == (trained / "adapter" / adapter.WEIGHTS).stat().st_size
    assert info["compressed_file_bytes"] == (out / "adapter" / compress.WEIGHTS).stat().st_size
    assert info["compressed_file_bytes"] < info["original_file_bytes"]


def test_peftkit_eval_scores_the_compressed_run(runs):
    tmp, _, _, out = runs
    work = tmp / "eval_copy"
    shutil.copytree(out, work)
    r = cli("eval", f"run={work}", cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "accuracy" in r.stdout
    report = json.loads((work / "eval" / "report.json").read_text())
    assert 0 <= report["metrics"]["validation"]["accuracy"] <= 100


def test_a_compressed_adapter_folds_into_its_base(runs):
    tmp, _, _, out = runs
    r = cli("merge", f"adapter={out}", f"out={tmp / 'folded'}", cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    from transformers import AutoModelForSequenceClassification

    a, _ = model.from_adapter(out / "adapter")
    batch = a.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp / "folded").eval()
    torch.testing.assert_close(outputs(plain, batch)[0], outputs(a.model, batch)[0], atol=LOGITS_ATOL, rtol=0)


def test_buffers_are_stored_as_they_are(tiny_bert, tmp_path):
    """VeRA: frozen random projections (buffers) beside trained vectors; an adapter saved as training saves it."""
    method = {"name": "vera", "r": 16}
    seed_everything(5)
    a = model.build(backbone_cfg(tiny_bert), dict(method), list(LABELS))
    params = dict(a.model.named_parameters())
    init = {n: params[n].detach().clone() for n in a.trainable if n in params}
    buffers = [n for n in a.trainable if n not in params]
    assert buffers
    perturb(a.model, list(init), std=0.1, seed=2)
    meta = {**model.meta(a, backbone_cfg(tiny_bert), list(LABELS), "test"), "seed": 5}
    adapter.save(tmp_path / "run" / "adapter", a.model, a.trainable, meta)
    from peftkit import config, merge

    info = merge.run(config.compose_merge("compress", [f"adapter={tmp_path / 'run'}", "density=0.5", "scale=std",
                                                       f"out={tmp_path / 'out'}"]))
    assert info["tensors_compressed"] == len(init) and info["tensors_dense"] == len(buffers)
    stored = load_file(str(tmp_path / "out" / "adapter" / compress.WEIGHTS))
    saved = load_file(str(tmp_path / "run" / "adapter" / adapter.WEIGHTS))
    assert all(torch.equal(stored[n], saved[n]) for n in buffers)
    b, _ = model.from_adapter(tmp_path / "out" / "adapter")
    loaded = dict(b.model.named_buffers())
    assert all(torch.equal(loaded[n], saved[n]) for n in buffers)
    loaded = dict(b.model.named_parameters())
    for n, before in init.items():
        tau = (saved[n] - before).numpy()
        keep, c = closed_form(tau, 0.5, 1.0, "std")  # random τ: no ties, so the support is unique
        assert np.array_equal(unpack(stored[n + ".mask"], tau.size), keep), n
        torch.testing.assert_close(stored[n + ".scale"], torch.tensor(c, dtype=torch.float32), rtol=SCALE_RTOL, atol=0)
        approx = torch.from_numpy(np.where(keep, np.sign(tau.ravel()), 0).astype(np.float32)) * stored[n + ".scale"]
        assert torch.equal(loaded[n].detach(), before + approx.view(before.shape)), n


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("knob, needle", [("density=0", "density=0: expected a fraction in (0, 1]"),
                                          ("density=1.5", "density=1.5: expected a fraction in (0, 1]"),
                                          ("alpha=0", "alpha=0: expected a number > 0"),
                                          ("scale=median", "scale=median: expected one of 'mean' or 'std'")])
def test_bad_knobs_are_refused(runs, tmp_path, knob, needle):
    _, _, trained, _ = runs
    r = cli("merge", "mode=compress", f"adapter={trained}", knob, f"out={tmp_path / 'c'}", cwd=tmp_path)
    assert_user_error(r, needle)
    assert list(tmp_path.iterdir()) == []


def test_an_adapter_without_a_seed_is_refused(runs, tmp_path):
    _, _, trained, _ = runs
    old = shutil.copytree(trained / "adapter", tmp_path / "old" / "adapter")
    cfg = json.loads((old / adapter.CONFIG).read_text())
    del cfg["seed"]
    (old / adapter.CONFIG).write_text(json.dumps(cfg))
    r = cli("merge", "mode=compress", f"adapter={old}", f"out={tmp_path / 'c'}", cwd=tmp_path)
    assert_user_error(r, "records no seed", "retrain")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_a_compressed_adapter_is_not_compressed_again(runs, tmp_path):
    _, _, _, out = runs
    r = cli("merge", "mode=compress", f"adapter={out}", f"out={tmp_path / 'c'}", cwd=tmp_path)
    assert_user_error(r, "already compressed")
    assert list(tmp_path.iterdir()) == []


def test_initial_weights_that_do_not_rebuild_are_refused(runs, tmp_path):
    """Another seed stands in for another torch version: the rebuilt θ_init's fingerprint differs."""
    _, _, _, out = runs
    work = shutil.copytree(out, tmp_path / "tampered")
    cfg = json.loads((work / "adapter" / adapter.CONFIG).read_text())
    cfg["seed"] += 1
    (work / "adapter" / adapter.CONFIG).write_text(json.dumps(cfg))
    r = cli("eval", f"run={work}", cwd=tmp_path)
    assert_user_error(r, "initial weights could not be rebuilt")
    assert not (work / "eval").exists()
