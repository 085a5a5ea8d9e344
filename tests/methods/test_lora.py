"""LoRA: the same numbers as Hugging Face peft on the same weights, and the closed form W + s·BA."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from conftest import minilm_dir, needs_minilm
from peftkit import methods
from peftkit.errors import UserError
from peftkit.methods.lora import LoraLinear

from ._helpers import SENTENCES, hf_model, logits, randomize_biases

# Both implementations compute base(x) + B(A(x))·s with the same ops in fp32: they agree to
# rounding (in practice bit for bit). 1e-6 absolute on logits of order 1.
ATOL = 1e-6


def _peft_vs_peftkit(path, batch, targets: list[str], r: int, alpha: float, rslora: bool):
    """(peft logits, peftkit logits, base logits, peft model, peftkit model) on one model, one set of weights."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    base = hf_model(path)
    randomize_biases(base)
    with torch.no_grad():  # a head of scale ~1/sqrt(d) so the logits are O(1), not O(0.01)
        base.classifier.weight.normal_(0, base.config.hidden_size**-0.5)
    before = logits(base, batch)
    ours = copy.deepcopy(base)

    # No task_type: with SEQ_CLS peft would wrap the classifier in modules_to_save; its forward is unchanged
    # either way. init_lora_weights=False gives B random (not zero) weights, so the adapter changes the output.
    ref = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets,
                                          use_rslora=rslora, init_lora_weights=False)).eval()
    methods.prepare(ours, methods.build({"name": "lora", "r": r, "alpha": alpha, "rslora": rslora,
                                         "target_modules": targets}), head=["classifier"])

    ref_modules = dict(ref.base_model.model.named_modules())
    ref_wrapped = {n for n, m in ref_modules.items() if isinstance(m, LoraLayer)}
    ours_wrapped = {n: m for n, m in ours.named_modules() if isinstance(m, LoraLinear)}
    assert set(ours_wrapped) == ref_wrapped and ref_wrapped
    with torch.no_grad():
        for name, m in ours_wrapped.items():
            src = ref_modules[name]
            assert m.scaling == pytest.approx(src.scaling["default"])
            m.lora_A.copy_(src.lora_A["default"].weight)
            m.lora_B.copy_(src.lora_B["default"].weight)
        ours.classifier.load_state_dict(ref.base_model.model.classifier.state_dict())
    return logits(ref, batch), logits(ours, batch), before, ref, ours


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha_over_r", "rslora"])
def test_forward_equals_peft(tiny_bert, batch, rslora):
    r, alpha = 4, 8  # s = 2 (alpha/r) or 4 (alpha/sqrt r): a wrong scaling rule shows
    ref, ours, before, _, model = _peft_vs_peftkit(tiny_bert, batch, ["query", "value", "pooler.dense"], r, alpha, rslora)
    assert (ref - before).abs().max() > 1e-2, "the adapter must move the logits, or this comparison proves nothing"
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    scaling = alpha / math.sqrt(r) if rslora else alpha / r
    assert {m.scaling for m in model.modules() if isinstance(m, LoraLinear)} == {scaling}


def test_forward_equals_peft_on_one_named_layer(tiny_bert, batch):
    """A full-name target: only that Linear is adapted, in both libraries (compared on the hidden states,
    which one adapter moves far more than the random tiny model's logits)."""
    ref, ours, _, ref_model, model = _peft_vs_peftkit(
        tiny_bert, batch, ["bert.encoder.layer.0.attention.self.value"], r=2, alpha=4, rslora=False)
    assert [n for n, m in model.named_modules() if isinstance(m, LoraLinear)] == ["bert.encoder.layer.0.attention.self.value"]
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    with torch.no_grad():
        h_ref = ref_model(**batch, output_hidden_states=True).hidden_states[-1]
        h_ours = model(**batch, output_hidden_states=True).hidden_states[-1]
        with ref_model.disable_adapter():
            h_base = ref_model(**batch, output_hidden_states=True).hidden_states[-1]
    assert (h_ref - h_base).abs().max() > 1e-2
    torch.testing.assert_close(h_ours, h_ref, atol=1e-5, rtol=0)  # hidden states are O(1): 1e-5 absolute


@needs_minilm
def test_forward_equals_peft_on_minilm():
    from transformers import AutoTokenizer

    path = minilm_dir()
    batch = AutoTokenizer.from_pretrained(path)(SENTENCES, padding=True, return_tensors="pt")
    ref, ours, before, _, model = _peft_vs_peftkit(path, batch, ["query", "value"], r=8, alpha=16, rslora=False)
    assert sum(isinstance(m, LoraLinear) for m in model.modules()) == 12  # 6 layers x (query, value)
    assert (ref - before).abs().max() > 1e-2
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


def _lora_linear(in_f=6, out_f=5, r=3, alpha=6.0, rslora=False, bias=True) -> LoraLinear:
    torch.manual_seed(0)
    m = LoraLinear(nn.Linear(in_f, out_f, bias=bias), r=r, alpha=alpha, dropout=0.0, rslora=rslora, init="kaiming")
    with torch.no_grad():
        m.lora_B.normal_()
    return m


def test_init_b_is_zero_so_the_layer_starts_as_its_base():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    m = LoraLinear(base, r=3, alpha=6.0, dropout=0.0, rslora=False, init="kaiming")
    x = torch.randn(4, 6)
    assert torch.count_nonzero(m.lora_B) == 0 and torch.count_nonzero(m.lora_A) > 0
    assert torch.equal(m(x), base(x))
    assert m.lora_A.shape == (3, 6) and m.lora_B.shape == (5, 3)


@pytest.mark.parametrize("rslora", [False, True])
def test_delta_weight_is_scaled_b_times_a(rslora):
    m = _lora_linear(r=4, alpha=6.0, rslora=rslora)
    s = 6.0 / 2 if rslora else 6.0 / 4
    assert m.scaling == s
    torch.testing.assert_close(m.delta_weight(), s * m.lora_B @ m.lora_A, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bias", [True, False])
def test_forward_is_x_times_merged_weight(bias):
    m = _lora_linear(bias=bias)
    x = torch.randn(2, 7, 6)
    w = m.base_layer.weight + m.scaling * m.lora_B @ m.lora_A
    expected = x @ w.T + (m.base_layer.bias if bias else 0)
    with torch.no_grad():
        torch.testing.assert_close(m(x), expected, atol=1e-6, rtol=0)
        assert (m(x) - m.base_layer(x)).abs().max() > 1e-2


def test_dropout_acts_on_the_lora_path_only_in_training():
    torch.manual_seed(0)
    m = LoraLinear(nn.Linear(16, 8), r=4, alpha=8, dropout=0.5, rslora=False, init="kaiming")
    with torch.no_grad():
        m.lora_B.normal_()
    x = torch.randn(32, 16)
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), x @ (m.base_layer.weight + m.delta_weight()).T + m.base_layer.bias, atol=1e-5, rtol=0)
        m.train()
        assert not torch.allclose(m(x), m(x))  # two dropout masks


def test_gaussian_init_and_unknown_init():
    torch.manual_seed(0)
    m = LoraLinear(nn.Linear(256, 256), r=4, alpha=8, dropout=0.0, rslora=False, init="gaussian")
    assert m.lora_A.std().item() == pytest.approx(1 / 4, rel=0.05)
    with pytest.raises(UserError, match="unknown lora init"):
        LoraLinear(nn.Linear(4, 4), r=2, alpha=2, dropout=0.0, rslora=False, init="xavier")


def test_rank_below_one_is_a_user_error(tiny_bert):
    model = hf_model(tiny_bert)
    with pytest.raises(UserError, match="at least 1"):
        methods.prepare(model, methods.build({"name": "lora", "r": 0}), head=["classifier"])


def test_unknown_option_is_a_user_error():
    with pytest.raises(UserError, match="no option rank"):
        methods.build({"name": "lora", "rank": 8})
