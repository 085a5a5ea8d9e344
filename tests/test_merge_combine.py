"""Combining adapters: task arithmetic, TIES, DARE, LoRA concatenation and SVD, heads, refusals.

Every combined model is checked against the update computed directly from the adapters' own
tensors (ΔW = s·BA for LoRA, diag-scaled W for IA³), not against the code under test.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_bert, run_cli
from methods._helpers import LABELS, SENTENCES, backbone_cfg, build, hf_model, outputs, perturb
from peftkit import adapter, model
from peftkit.merge.combine import combine, elect_and_average, trim
from peftkit.methods.lora import LoraLinear, PissaLinear

LORA = {"name": "lora", "r": 4, "alpha": 8}
ATOL = 1e-5  # fp32 logits and weights: sums of a few products, rounding only


# ------------------------------------------------------------------ the element-wise rules

def test_trim_keeps_the_largest_magnitudes():
    t = torch.tensor([[0.1, -3.0, 0.5], [2.0, -0.2, 0.0]])
    assert torch.equal(trim(t, 0.34), torch.tensor([[0.0, -3.0, 0.5], [2.0, 0.0, 0.0]]))  # ceil(0.34 · 6) = 3 kept
    assert torch.equal(trim(t, 1.0), t)


def test_trim_count_is_ceil_of_density():
    t = torch.arange(1.0, 11.0)
    assert (trim(t, 0.25) != 0).sum() == 3  # ceil(2.5)
    assert (trim(t, 0.01) != 0).sum() == 1  # at least one


def test_ties_sign_election_and_disjoint_mean_by_hand():
    # entry 0: +1, +3, -1 → sum +3 → mean of the positives (1, 3) = 2
    # entry 1: -2, +1, 0  → sum -1 → only -2 agrees → -2
    # entry 2: 0, 0, 0     → 0
    stacked = torch.tensor([[1.0, -2.0, 0.0], [3.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])
    assert torch.equal(elect_and_average(stacked), torch.tensor([2.0, -2.0, 0.0]))


def test_dare_drops_and_rescales_with_its_seed():
    d = torch.randn(50, 40)
    got = combine([d], [2.0], "dare", density=0.3, generator=torch.Generator().manual_seed(7))
    keep = torch.rand(d.shape, generator=torch.Generator().manual_seed(7)) < 0.3
    torch.testing.assert_close(got, torch.where(keep, 2.0 * d / 0.3, torch.zeros_like(d)), atol=1e-6, rtol=0)
    assert 0.2 < keep.float().mean() < 0.4


def test_task_arithmetic_is_the_weighted_sum():
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(combine([a, b], [1.0, -0.5], "task_arithmetic"), a - 0.5 * b)


# ------------------------------------------------------------------ adapters on the tiny BERT

def _trained(a) -> list[str]:
    return [n for n, p in a.model.named_parameters() if p.requires_grad]


def _save(path, backbone, cfg, seed, labels=LABELS):
    a = build(backbone, cfg, seed=seed)
    perturb(a.model, _trained(a), std=0.3, seed=seed + 100)  # B ≠ 0, l ≠ 1, a trained-looking head
    if labels != LABELS:  # a 3-label head: rebuild with those labels
        torch.manual_seed(seed)
        a = model.build(backbone_cfg(backbone), dict(cfg), list(labels))
        perturb(a.model, _trained(a), std=0.3, seed=seed + 100)
    adapter.save(path, a.model, a.trainable, {**model.meta(a, backbone_cfg(backbone), labels, "test"), "seed": seed})
    return a


def _lora_deltas(a) -> dict[str, torch.Tensor]:
    """ΔW per wrapped Linear from the adapter's own factors, relative to the original W."""
    out = {}
    for name, m in a.model.named_modules():
        if isinstance(m, LoraLinear):
            d = m.scaling * m.lora_B.detach() @ m.lora_A.detach()
            if isinstance(m, PissaLinear):
                d = d - m.scaling * m.lora_B_initial @ m.lora_A_initial
            out[name + ".weight"] = d
    return out


def _head(a):
    return {n: t.detach().clone() for n, t in a.model.state_dict().items() if n.startswith("classifier.")}


@pytest.fixture(scope="module")
def adapters(tiny_bert, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("combine")
    made = {
        "lora1": _save(tmp / "lora1", tiny_bert, LORA, seed=1),
        "lora2": _save(tmp / "lora2", tiny_bert, {**LORA, "r": 2, "target_modules": ["query", "key"]}, seed=2),
        "pissa": _save(tmp / "pissa", tiny_bert, {**LORA, "init": "pissa"}, seed=3),
        "ia3": _save(tmp / "ia3", tiny_bert, {"name": "ia3"}, seed=4),
        "houlsby": _save(tmp / "houlsby", tiny_bert, {"name": "houlsby", "bottleneck": 4}, seed=5),
        "three_labels": _save(tmp / "three_labels", tiny_bert, LORA, seed=6, labels=["a", "b", "c"]),
    }
    other = make_tiny_bert(tmp / "other_base", seed=1)
    made["other_base"] = _save(tmp / "other_base_lora", other, LORA, seed=7)
    return tmp, made


@pytest.fixture
def batch(tiny_bert):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert)(SENTENCES, padding=True, return_tensors="pt")


def _merge(tmp, *args):
    r = run_cli("merge", *args, cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _model_state(path):
    return load_file(str(path / "model.safetensors"))


def test_task_arithmetic_equals_base_plus_weighted_deltas(adapters, tiny_bert):
    tmp, a = adapters
    _merge(tmp, "mode=task_arithmetic", f"adapters=[{tmp / 'lora1'},{tmp / 'lora2'}]", "weights=[1.0,-0.5]", f"out={tmp / 'ta'}")
    got = _model_state(tmp / "ta")
    base = hf_model(tiny_bert).state_dict()
    d1, d2 = _lora_deltas(a["lora1"]), _lora_deltas(a["lora2"])
    for n in set(d1) | set(d2):
        expected = base[n] + d1.get(n, 0) - 0.5 * d2.get(n, 0)
        torch.testing.assert_close(got[n], expected, atol=ATOL, rtol=0)
    untouched = "bert.encoder.layer.0.output.dense.weight"
    assert torch.equal(got[untouched], base[untouched])
    # head=mean over the positive weights: only lora1's head
    for n, t in _head(a["lora1"]).items():
        torch.testing.assert_close(got[n], t, atol=0, rtol=0)
    info = json.loads((tmp / "ta" / "merge.json").read_text())
    assert [x["weight"] for x in info["adapters"]] == [1.0, -0.5]
    card = (tmp / "ta" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers") and "  - merged" in card


def test_merged_model_loads_in_transformers_and_gives_the_adapter_sum(adapters, tiny_bert, batch):
    """The average of a LoRA and an IA³ adapter, run by transformers alone, equals base + mean of their ΔW."""
    tmp, a = adapters
    _merge(tmp, "mode=task_arithmetic", f"adapters=[{tmp / 'lora1'},{tmp / 'ia3'}]", "weights=[0.5,0.5]", f"out={tmp / 'avg'}")
    from transformers import AutoModelForSequenceClassification

    net = AutoModelForSequenceClassification.from_pretrained(tmp / "avg").eval()
    ref = hf_model(tiny_bert)
    sd = ref.state_dict()
    ia3 = a["ia3"].model
    from peftkit.methods.ia3 import IA3Linear

    with torch.no_grad():
        for n, d in _lora_deltas(a["lora1"]).items():
            sd[n] += 0.5 * d
        for name, m in ia3.named_modules():
            if isinstance(m, IA3Linear):  # IA³ scales W's rows (outputs) or columns (inputs) by l
                w = m.base_layer.weight
                scaled = w * m.ia3_l.view(1, -1) if m.on_input else w * m.ia3_l.view(-1, 1)
                sd[name + ".weight"] += 0.5 * (scaled - w)
                if not m.on_input:  # an output scale scales the bias too
                    sd[name + ".bias"] += 0.5 * (m.base_layer.bias * m.ia3_l - m.base_layer.bias)
        h1, h2 = _head(a["lora1"]), _head(a["ia3"])
        for n in h1:
            sd[n] = 0.5 * h1[n] + 0.5 * h2[n]
        ref.load_state_dict(sd)
    got, expected = outputs(net, batch), outputs(ref, batch)
    torch.testing.assert_close(got[0], expected[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(got[1], expected[1], atol=ATOL, rtol=0)
    assert net.config.id2label == {0: "rotten", 1: "fresh"}


def _ties_reference(deltas: list[np.ndarray], density: float) -> np.ndarray:
    """TIES element by element, as the paper states it."""
    trimmed = []
    for d in deltas:
        k = int(np.ceil(density * d.size))
        threshold_idx = np.argsort(-np.abs(d).ravel(), kind="stable")[:k]
        t = np.zeros(d.size, dtype=d.dtype)
        t[threshold_idx] = d.ravel()[threshold_idx]
        trimmed.append(t)
    out = np.zeros(deltas[0].size, dtype=np.float64)
    for j in range(out.size):
        values = [t[j] for t in trimmed]
        sign = np.sign(sum(values))
        agree = [v for v in values if v != 0 and np.sign(v) == sign]
        out[j] = sum(agree) / len(agree) if agree else 0.0
    return out.reshape(deltas[0].shape)


def test_ties_matches_an_elementwise_reference(adapters, tiny_bert):
    tmp, a = adapters
    _merge(tmp, "mode=ties", f"adapters=[{tmp / 'lora1'},{tmp / 'pissa'}]", "density=0.3", f"out={tmp / 'ties'}")
    got = _model_state(tmp / "ties")
    base = hf_model(tiny_bert).state_dict()
    name = "bert.encoder.layer.1.attention.self.query.weight"
    deltas = [_lora_deltas(a["lora1"])[name].numpy(), _lora_deltas(a["pissa"])[name].numpy()]
    expected = base[name] + torch.from_numpy(_ties_reference(deltas, 0.3)).float()
    torch.testing.assert_close(got[name], expected, atol=ATOL, rtol=0)


def test_dare_with_density_one_is_task_arithmetic(adapters):
    tmp, _ = adapters
    _merge(tmp, "mode=dare", f"adapters=[{tmp / 'lora1'},{tmp / 'ia3'}]", "density=1.0", f"out={tmp / 'dare1'}")
    _merge(tmp, "mode=task_arithmetic", f"adapters=[{tmp / 'lora1'},{tmp / 'ia3'}]", f"out={tmp / 'ta1'}")
    a, b = _model_state(tmp / "dare1"), _model_state(tmp / "ta1")
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=ATOL, rtol=0)


def _peftkit_logits(run_or_adapter, batch):
    from peftkit.merge.sources import load

    ad, _ = load(run_or_adapter)
    return outputs(ad.model, batch)


def test_concat_is_exact(adapters, batch):
    """One LoRA of rank 4 + 2 + 2·4 (PiSSA brings its initial factors) = the dense task-arithmetic model."""
    tmp, _ = adapters
    three = f"adapters=[{tmp / 'lora1'},{tmp / 'lora2'},{tmp / 'pissa'}]"
    _merge(tmp, "mode=concat", three, "weights=[0.7,-0.4,0.5]", f"out={tmp / 'cat'}")
    _merge(tmp, "mode=task_arithmetic", three, "weights=[0.7,-0.4,0.5]", f"out={tmp / 'cat_dense'}")
    cfg = json.loads((tmp / "cat" / "adapter" / adapter.CONFIG).read_text())
    assert cfg["method"]["name"] == "lora" and cfg["method"]["r"] == 4 + 2 + 8 and cfg["method"]["alpha"] == 14
    from transformers import AutoModelForSequenceClassification

    dense = AutoModelForSequenceClassification.from_pretrained(tmp / "cat_dense").eval()
    got, expected = _peftkit_logits(tmp / "cat", batch), outputs(dense, batch)
    torch.testing.assert_close(got[0], expected[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(got[1], expected[1], atol=ATOL, rtol=0)


def test_svd_error_is_eckart_young_and_full_rank_is_exact(adapters, batch):
    tmp, a = adapters
    two = f"adapters=[{tmp / 'lora1'},{tmp / 'ia3'}]"
    _merge(tmp, "mode=svd", two, "rank=2", f"out={tmp / 'svd2'}")
    info = json.loads((tmp / "svd2" / "merge.json").read_text())
    from peftkit.methods.ia3 import IA3Linear

    deltas = dict(_lora_deltas(a["lora1"]))
    for name, m in a["ia3"].model.named_modules():
        if isinstance(m, IA3Linear):
            w = m.base_layer.weight
            d = w * m.ia3_l.view(1, -1) - w if m.on_input else w * m.ia3_l.view(-1, 1) - w
            deltas[name + ".weight"] = deltas.get(name + ".weight", 0) + d.detach()
    tail = total = 0.0
    for n, d in deltas.items():
        s = torch.linalg.svdvals(d.double())
        e = (s[2:] ** 2).sum().item()
        assert info["relative_frobenius_error_per_layer"][n.removesuffix(".weight")] == pytest.approx((e / (s**2).sum().item()) ** 0.5, abs=1e-6)
        tail, total = tail + e, total + (s**2).sum().item()
    assert info["relative_frobenius_error"] == pytest.approx((tail / total) ** 0.5, abs=1e-6)
    assert 0 < info["relative_frobenius_error"] < 1

    _merge(tmp, "mode=svd", two, "rank=32", f"out={tmp / 'svd32'}")  # 32 = full rank of the tiny BERT's Linears
    _merge(tmp, "mode=task_arithmetic", two, f"out={tmp / 'svd_dense'}")
    assert json.loads((tmp / "svd32" / "merge.json").read_text())["relative_frobenius_error"] < 1e-6
    from transformers import AutoModelForSequenceClassification

    dense = AutoModelForSequenceClassification.from_pretrained(tmp / "svd_dense").eval()
    got, expected = _peftkit_logits(tmp / "svd32", batch), outputs(dense, batch)
    torch.testing.assert_close(got[1], expected[1], atol=1e-4, rtol=0)  # SVD in float64, factors stored in fp32


def test_heads_of_different_label_sets(adapters):
    tmp, a = adapters
    pair = f"adapters=[{tmp / 'lora1'},{tmp / 'three_labels'}]"
    r = run_cli("merge", "mode=task_arithmetic", pair, f"out={tmp / 'no'}", cwd=tmp)
    assert r.returncode == 2 and "head=INDEX" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp / "no").exists()
    _merge(tmp, "mode=task_arithmetic", pair, "head=1", f"out={tmp / 'three'}")
    cfg = json.loads((tmp / "three" / "config.json").read_text())
    assert cfg["id2label"] == {"0": "a", "1": "b", "2": "c"}
    got = _model_state(tmp / "three")
    for n, t in _head(a["three_labels"]).items():
        assert torch.equal(got[n], t)


@pytest.mark.parametrize("args, message", [
    (["mode=ties", "adapters=[{t}/lora1,{t}/houlsby]", "out={t}/x"], "'houlsby'"),
    (["mode=task_arithmetic", "adapters=[{t}/lora1,{t}/other_base_lora]", "out={t}/x"], "another base"),
    (["mode=task_arithmetic", "adapters=[{t}/lora1,{t}/ia3]", "weights=[1]", "out={t}/x"], "one per adapter"),
    (["mode=ties", "adapters=[{t}/lora1,{t}/ia3]", "density=0", "out={t}/x"], "density=0: expected a fraction in (0, 1]"),
    (["mode=concat", "adapters=[{t}/lora1,{t}/ia3]", "out={t}/x"], "use mode=svd"),
    (["mode=svd", "adapters=[{t}/lora1]", "rank=0", "out={t}/x"], "rank=0: expected a whole number ≥ 1"),
    (["mode=svd", "adapters=[{t}/lora1]", "rank=1000000000", "out={t}/x"], "32 at the largest here; pick rank between 1 and 32"),
    (["mode=ties", "out={t}/x"], "needs adapters=..."),
    (["mode=ties", "adapters=[{t}/lora1]", "out={t}/x", "densty=0.3"], "its keys are: mode, adapters, weights, density"),
    (["mode=ties", "adapters=[{t}/nothing]", "out={t}/x"], "neither an adapter folder nor a run directory"),
    (["mode=task_arithmetic", "adapters=[{t}/lora1]", "head=7", "out={t}/x"], "head must be mean or an adapter index"),
])
def test_refusals(adapters, args, message):
    tmp, _ = adapters
    r = run_cli("merge", *[a.format(t=tmp) for a in args], cwd=tmp)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("peftkit: error:") and message in lines[0], r.stderr
    assert not (tmp / "x").exists()


def test_into_base_refuses_another_base(adapters, tmp_path):
    """The fingerprint: an adapter is never folded into a base it was not trained on."""
    tmp, _ = adapters
    r = run_cli("merge", f"adapter={tmp / 'lora1'}", f"out={tmp_path / 'm'}", f"backbone.path={tmp / 'other_base'}", cwd=tmp_path)
    assert r.returncode == 2 and "fingerprint" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "m").exists()


# ------------------------------------------------------------------ trained runs, end to end

@pytest.fixture(scope="module")
def two_runs(tiny_bert, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("combine_runs")
    for seed in (1, 2):
        r = run_cli("train", "recipe=quickstart", f"backbone.path={tiny_bert}", "trainer.max_steps=4", "trainer.eval_every=4",
                    "dataset.max_train_samples=128", "dataset.max_eval_samples=32", f"seed={seed}",
                    f"hydra.run.dir={tmp / f'run{seed}'}", cwd=tmp)
        assert r.returncode == 0, r.stderr[-3000:]
    return tmp


def test_adapter_folder_has_a_model_card(two_runs):
    card = (two_runs / "run1" / "adapter" / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: peftkit" in front and "  - lora" in front and "pipeline_tag: text-classification" in front
    assert "base_model" not in front  # a local folder: its weights may be anything, so no Hub id is claimed
    report = json.loads((two_runs / "run1" / "eval" / "report.json").read_text())
    assert f"value: {report['metrics']['validation']['accuracy']:.4g}" in front
    assert "| trainable params |" in card and "| peftkit version |" in card


def test_concat_of_trained_runs_scores_with_peftkit_eval(two_runs):
    tmp = two_runs
    _merge(tmp, "mode=concat", f"adapters=[{tmp / 'run1'},{tmp / 'run2'}]", "weights=[0.5,0.5]", f"out={tmp / 'soup'}")
    assert (tmp / "soup" / "config.yaml").is_file() and (tmp / "soup" / "adapter" / "README.md").is_file()
    r = run_cli("eval", f"run={tmp / 'soup'}", cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp / "soup" / "eval" / "report.json").read_text())
    assert 0 <= report["metrics"]["validation"]["accuracy"] <= 100


@pytest.mark.parametrize("mode, extra", [("task_arithmetic", ["weights=[0.5,0.5]"]), ("ties", ["density=0.3"]),
                                         ("dare", ["density=0.5", "elect_sign=true"]), ("svd", ["rank=4"])])
def test_every_combining_mode_on_trained_runs(two_runs, mode, extra):
    tmp = two_runs
    _merge(tmp, f"mode={mode}", f"adapters=[{tmp / 'run1'},{tmp / 'run2'}]", *extra, f"out={tmp / mode}")
    if mode == "svd":
        r = run_cli("eval", f"run={tmp / mode}", cwd=tmp)
        assert r.returncode == 0, r.stderr[-3000:]
    else:
        from transformers import AutoModelForSequenceClassification

        net = AutoModelForSequenceClassification.from_pretrained(tmp / mode)
        assert net.config.id2label == {0: "rotten", 1: "fresh"}
    assert json.loads((tmp / mode / "merge.json").read_text())["mode"] == mode


def test_merge_recipes_shipped_and_user(adapters, tmp_path):
    tmp, _ = adapters
    pair = f"adapters=[{tmp / 'lora1'},{tmp / 'pissa'}]"
    _merge(tmp, "recipe=soup", pair, f"out={tmp_path / 'soup'}")
    _merge(tmp, "mode=task_arithmetic", pair, "weights=[0.5,0.5]", f"out={tmp_path / 'halves'}")
    a, b = _model_state(tmp_path / "soup"), _model_state(tmp_path / "halves")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)

    mine = tmp_path / "my_recipes" / "merge"
    mine.mkdir(parents=True)
    (mine / "sparse_ties.yaml").write_text("# TIES, denser\ndefaults:\n  - ties\n  - _self_\ndensity: 0.5\n")
    r = run_cli("--recipes-dir", str(tmp_path / "my_recipes"), "merge", "recipe=sparse_ties", pair, f"out={tmp_path / 'mine'}", cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((tmp_path / "mine" / "merge.json").read_text())
    assert (info["mode"], info["density"]) == ("ties", 0.5)
    r = run_cli("merge", "recipe=soup", "mode=ties", pair, f"out={tmp_path / 'x'}", cwd=tmp)
    assert r.returncode == 2 and "not both" in r.stderr
