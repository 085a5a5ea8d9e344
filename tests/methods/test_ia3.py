"""(IA)³: the same numbers as Hugging Face peft on the same vectors, and the scaling rules by hand."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from peftkit import methods
from peftkit.methods.ia3 import IA3Linear

from ._helpers import hf_model, outputs, randomize_biases

FFN = ["layer.0.output.dense", "layer.1.output.dense"]  # the FFN down projections (not attention.output.dense)
TARGETS = ["key", "value", *FFN]
ATOL = 1e-6  # same ops in fp32 in both libraries: logits of order 1 agree to rounding


def test_forward_equals_peft(tiny_bert, batch):
    from peft import IA3Config, get_peft_model
    from peft.tuners.ia3 import IA3Layer

    base = hf_model(tiny_bert)
    randomize_biases(base)  # k, v scale their bias too: a zero bias would hide getting that wrong
    with torch.no_grad():
        base.classifier.weight.normal_(0, base.config.hidden_size**-0.5)
    before = outputs(base, batch)[1]
    ours = copy.deepcopy(base)
    ref = get_peft_model(base, IA3Config(target_modules=TARGETS, feedforward_modules=FFN)).eval()
    methods.prepare(ours, methods.build({"name": "ia3", "target_modules": TARGETS, "feedforward_modules": FFN}),
                    head=["classifier"])

    ref_modules = dict(ref.base_model.model.named_modules())
    ref_wrapped = {n: m for n, m in ref_modules.items() if isinstance(m, IA3Layer)}
    ours_wrapped = {n: m for n, m in ours.named_modules() if isinstance(m, IA3Linear)}
    assert set(ours_wrapped) == set(ref_wrapped) and len(ours_wrapped) == 6
    assert {n for n, m in ours_wrapped.items() if m.on_input} == {n for n, m in ref_wrapped.items() if m.is_feedforward} \
        == {"bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.output.dense"}

    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, m in ours_wrapped.items():
            src = ref_wrapped[name].ia3_l["default"]
            src.copy_(torch.empty(src.shape).uniform_(0.2, 2.0, generator=g))  # not ones: the test must be able to fail
            m.ia3_l.copy_(src.flatten())
        ours.classifier.load_state_dict(ref.base_model.model.classifier.state_dict())
    (expected, h_expected), (got, h_got) = outputs(ref, batch), outputs(ours, batch)
    assert (h_expected - before).abs().max() > 1e-2, "the vectors must move the output, or this proves nothing"
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(h_got, h_expected, atol=1e-5, rtol=0)  # hidden states are O(1)


def _ia3_linear(on_input: bool) -> IA3Linear:
    torch.manual_seed(0)
    m = IA3Linear(nn.Linear(6, 4), on_input=on_input)
    with torch.no_grad():
        m.ia3_l.uniform_(0.5, 1.5)
    return m


def test_starts_as_identity():
    torch.manual_seed(0)
    for on_input in (False, True):
        base = nn.Linear(6, 4)
        m = IA3Linear(base, on_input=on_input)
        x = torch.randn(3, 6)
        assert torch.equal(m.ia3_l, torch.ones(6 if on_input else 4))
        assert torch.equal(m(x), base(x))


def test_output_scaling_includes_the_bias():
    m = _ia3_linear(on_input=False)
    x = torch.randn(5, 6)
    w, b = m.base_layer.weight, m.base_layer.bias
    with torch.no_grad():
        torch.testing.assert_close(m(x), (x @ w.T + b) * m.ia3_l, atol=1e-6, rtol=0)


def test_input_scaling_leaves_the_bias():
    m = _ia3_linear(on_input=True)
    x = torch.randn(5, 6)
    w, b = m.base_layer.weight, m.base_layer.bias
    with torch.no_grad():
        torch.testing.assert_close(m(x), (x * m.ia3_l) @ w.T + b, atol=1e-6, rtol=0)


def test_default_targets_and_which_scale_their_input(tiny_bert):
    model = hf_model(tiny_bert)
    methods.prepare(model, methods.build({"name": "ia3"}), head=["classifier"])
    wrapped = {n: m.on_input for n, m in model.named_modules() if isinstance(m, IA3Linear)}
    expected = {"bert.pooler.dense": False}
    for i in range(2):
        p = f"bert.encoder.layer.{i}."
        expected |= {p + "attention.self.key": False, p + "attention.self.value": False, p + "output.dense": True}
    assert wrapped == expected


@pytest.mark.parametrize("on_input", [False, True])
def test_vector_length(on_input):
    m = IA3Linear(nn.Linear(6, 4), on_input=on_input)
    assert m.ia3_l.shape == ((6,) if on_input else (4,))
