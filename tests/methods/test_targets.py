"""Which Linears a method wraps: full names, dotted suffixes, regexes, default roles; never the head."""

from __future__ import annotations

import pytest
from torch import nn

from peftkit import methods
from peftkit.errors import UserError
from peftkit.methods import AdapterLinear
from peftkit.methods.base import find_targets

from ._helpers import hf_model

L0, L1 = "bert.encoder.layer.0.", "bert.encoder.layer.1."


@pytest.fixture
def model(tiny_bert):
    return hf_model(tiny_bert)


def _wrapped(model, method_cfg) -> list[str]:
    methods.prepare(model, methods.build(method_cfg), head=["classifier"])
    return [n for n, m in model.named_modules() if isinstance(m, AdapterLinear)]


def _targets(model, patterns) -> list[str]:
    return [n for n, _ in find_targets(model, patterns, (), exclude=["classifier"])]


@pytest.mark.parametrize(("patterns", "expected"), [
    (["bert.encoder.layer.1.attention.self.key"], [L1 + "attention.self.key"]),  # full name
    (["query"], [L0 + "attention.self.query", L1 + "attention.self.query"]),  # last component
    (["self.value"], [L0 + "attention.self.value", L1 + "attention.self.value"]),  # dotted suffix
    (["1.output.dense"], [L1 + "output.dense"]),  # the FFN down projection of layer 1 only
    (["attention.output.dense"], [L0 + "attention.output.dense", L1 + "attention.output.dense"]),
    (["output.dense"], [L0 + "attention.output.dense", L0 + "output.dense", L1 + "attention.output.dense", L1 + "output.dense"]),
    ([r".*\.0\.attention\.self\.query"], [L0 + "attention.self.query"]),  # regex: layer 0 only
    ([r".*layer\.\d+\.output\.dense"], [L0 + "output.dense", L1 + "output.dense"]),
    ([r".*\.(key|value)"], [L0 + "attention.self.key", L0 + "attention.self.value",
                           L1 + "attention.self.key", L1 + "attention.self.value"]),
    (["pooler.dense", "intermediate.dense"], [L0 + "intermediate.dense", L1 + "intermediate.dense", "bert.pooler.dense"]),
])
def test_patterns_select(model, patterns, expected):
    assert _targets(model, patterns) == expected


def test_suffix_needs_a_dot_boundary(model):
    """'uery' is not a module-name suffix at a dot; as a regex it would need to match the whole name."""
    with pytest.raises(UserError, match="matches no Linear"):
        _targets(model, ["uery"])


def test_regex_matches_the_whole_name(model):
    """re.fullmatch: 'attention' alone matches nothing, although it occurs in many names."""
    with pytest.raises(UserError, match="matches no Linear"):
        _targets(model, ["attention"])


def test_only_linears_are_targets(model):
    # `bert.encoder.layer.0.attention.output.LayerNorm` matches, but is not a Linear
    assert _targets(model, [r".*\.0\.attention\.output\..*"]) == [L0 + "attention.output.dense"]


def test_no_match_lists_the_linears(model):
    with pytest.raises(UserError) as e:
        _targets(model, ["q_proj"])
    assert "encoder.layer.N.attention.self.query" in str(e.value) and "q_proj" in str(e.value)


def test_the_head_is_never_wrapped(model):
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert "classifier" in linears and len(linears) == 2 * 6 + 2  # q, k, v, attn out, ffn in, ffn out; pooler; head
    wrapped = _wrapped(model, {"name": "lora", "r": 2, "target_modules": [".*"]})  # a regex for every Linear
    assert wrapped == [n for n in linears if n != "classifier"]
    assert type(model.classifier) is nn.Linear and model.classifier.weight.requires_grad


def test_the_head_alone_matches_nothing(model):
    with pytest.raises(UserError, match="matches no Linear"):
        _wrapped(model, {"name": "lora", "target_modules": ["classifier"]})


def test_lora_default_targets_include_the_pooler(model):
    assert _wrapped(model, {"name": "lora"}) == [
        L0 + "attention.self.query", L0 + "attention.self.value",
        L1 + "attention.self.query", L1 + "attention.self.value", "bert.pooler.dense"]
    assert model.bert.pooler.dense.lora_A.requires_grad
    assert not model.bert.pooler.dense.base_layer.weight.requires_grad


def test_ia3_default_targets(model):
    assert _wrapped(model, {"name": "ia3"}) == [
        L0 + "attention.self.key", L0 + "attention.self.value", L0 + "output.dense",
        L1 + "attention.self.key", L1 + "attention.self.value", L1 + "output.dense", "bert.pooler.dense"]


def test_houlsby_default_targets(model):
    assert _wrapped(model, {"name": "houlsby", "bottleneck": 4}) == [
        L0 + "attention.output.dense", L0 + "output.dense", L1 + "attention.output.dense", L1 + "output.dense",
        "bert.pooler.dense"]


def test_user_targets_replace_the_defaults(model):
    assert _wrapped(model, {"name": "lora", "target_modules": [r".*\.0\.attention\.self\.query"]}) == [L0 + "attention.self.query"]


def test_wrapped_layers_keep_their_base_layer(model):
    key = model.bert.encoder.layer[1].attention.self.key
    _wrapped(model, {"name": "ia3", "target_modules": ["layer.1.attention.self.key"], "feedforward_modules": ["layer.1.output.dense"]})
    wrapped = model.bert.encoder.layer[1].attention.self.key
    assert isinstance(wrapped, AdapterLinear) and wrapped.base_layer is key
    assert not key.weight.requires_grad


@pytest.mark.parametrize(("roles", "expected"), [
    (["ffn_out"], [L0 + "output.dense", L1 + "output.dense"]),  # the role, not every "output.dense" (attention's too)
    (["attn_out", "pooler"], [L0 + "attention.output.dense", L1 + "attention.output.dense", "bert.pooler.dense"]),
])
def test_role_names_select_the_models_layers_for_that_role(model, roles, expected):
    assert _targets(model, roles) == expected


def test_all_linear_is_every_linear_but_the_head(model):
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "classifier"]
    assert _targets(model, ["all-linear"]) == linears


def test_roles_and_all_linear_on_a_causal_lm(tiny_lm):
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(tiny_lm)
    found = [n for n, _ in find_targets(lm, ["ffn_in"], (), exclude=[])]
    assert found == [f"model.layers.{i}.mlp.{p}" for i in (0, 1) for p in ("gate_proj", "up_proj")]
    every = [n for n, _ in find_targets(lm, ["all-linear"], (), exclude=[])]
    assert "lm_head" not in every and len(every) == 2 * 7  # q, k, v, o, gate, up, down per layer; the LM head stays


def test_a_role_the_model_lacks_lists_its_roles_and_layers(model):
    with pytest.raises(UserError) as e:
        _targets(model, ["nope_role"])
    assert "roles found: query, key, value" in str(e.value) and "all-linear" in str(e.value)
