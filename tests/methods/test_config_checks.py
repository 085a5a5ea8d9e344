"""Every method option that can be checked without a model is checked by `methods.build`, from the
config alone: before any model loads or any file is written. Checks that need the model's shapes
or modules (a rank against min(out, in), block counts against in_features, layer indices against
the layer count) stay in `wrap` / `apply` and are tested with each method."""

from __future__ import annotations

import re

import pytest
from omegaconf import OmegaConf

from peftkit import methods, model
from peftkit.errors import UserError

from ._helpers import COMPOSITIONS, LABELS, ROOT, backbone_cfg

# (method, options, the key the message names, the bad value it shows); the value as shown when
# it is not str(value)
BAD = [
    ("lora", {"r": 0}, "r", 0),
    ("llama_adapter", {"adapter_len": 0}, "adapter_len", 0),
    ("llama_adapter", {"adapter_layers": 0}, "adapter_layers", 0),
    ("lora", {"init": "xavier"}, "init", "xavier"),
    ("lora", {"alpha": 0}, "alpha", 0),
    ("lora", {"alpha": -16.0}, "alpha", -16.0),
    ("lora", {"dropout": 1.0}, "dropout", 1.0),
    ("lora", {"dropout": -0.1}, "dropout", -0.1),
    ("rslora", {"r": 0}, "r", 0),
    ("rslora", {"init": "olora"}, "init", "olora"),
    ("rslora", {"alpha": 0}, "alpha", 0),
    ("dora", {"r": 0}, "r", 0),
    ("dora", {"init": "pissa"}, "init", "pissa"),
    ("dora", {"alpha": 0.0}, "alpha", 0.0),
    ("dora", {"dropout": 1.0}, "dropout", 1.0),
    ("adalora", {"init_r": 0}, "init_r", 0),
    ("adalora", {"target_r": 13}, "target_r", 13),
    ("adalora", {"target_r": 0}, "target_r", 0),
    ("adalora", {"alpha": 0}, "alpha", 0),
    ("adalora", {"dropout": 1.0}, "dropout", 1.0),
    ("adalora", {"tinit": 2.5}, "tinit", 2.5),
    ("adalora", {"tinit": -0.1}, "tinit", -0.1),
    ("adalora", {"tfinal": 10.5}, "tfinal", 10.5),
    ("adalora", {"allocate_every": 0}, "allocate_every", 0),
    ("adalora", {"beta1": 1.0}, "beta1", 1.0),
    ("adalora", {"beta2": 0.0}, "beta2", 0.0),
    ("adalora", {"orth_reg_weight": -1.0}, "orth_reg_weight", -1.0),
    ("dylora", {"r": 0}, "r", 0),
    ("dylora", {"init": "pissa"}, "init", "pissa"),
    ("dylora", {"eval_rank": 9}, "eval_rank", 9),
    ("dylora", {"eval_rank": 0}, "eval_rank", 0),
    ("dylora", {"alpha": 0}, "alpha", 0),
    ("dylora", {"dropout": 1.0}, "dropout", 1.0),
    ("lora_xs", {"r": 0}, "r", 0),
    ("lora_xs", {"init": "kaiming"}, "init", "kaiming"),
    ("lora_xs", {"alpha": 0}, "alpha", 0),
    ("lora_xs", {"dropout": 1.5}, "dropout", 1.5),
    ("hydra_lora", {"r": 0}, "r", 0),
    ("hydra_lora", {"alpha": 0}, "alpha", 0),
    ("moe_lora", {"num_experts": 0}, "num_experts", 0),
    ("moe_lora", {"num_experts": [2, 0]}, "num_experts", [2, 0]),
    ("moe_lora", {"top_k": 0}, "top_k", 0),
    ("moe_lora", {"num_experts": [4, 2], "top_k": 3}, "top_k", 3),
    ("moe_lora", {"r": 0}, "r", 0),
    ("moe_lora", {"alpha": 0}, "alpha", 0),
    ("moe_lora", {"dropout": 1.0}, "dropout", 1.0),
    ("moe_lora", {"aux_loss_weight": -0.01}, "aux_loss_weight", -0.01),
    ("moe_lora", {"capacity_factor": 0.0}, "capacity_factor", 0.0),
    ("moe_lora", {"expert_dropout": 1.0}, "expert_dropout", 1.0),
    ("adapter_fusion", {"adapters": None}, "adapters", None),
    ("adapter_fusion", {"adapters": ["runs/a"]}, "adapters", ["runs/a"]),
    ("adapter_fusion", {"adapters": ["a", "b"], "temperature": 0}, "temperature", 0),
    ("adapter_fusion", {"adapters": ["a", "b"], "dropout": 1.0}, "dropout", 1.0),
    ("adapter_fusion", {"adapters": ["a", "b"], "regularization": -1}, "regularization", -1),
    ("scalearn", {"adapters": []}, "adapters", []),
    ("scalearn", {"adapters": ["a", "b"], "scaling": "matrix"}, "scaling", "matrix"),
    ("tied_lora", {"r": 0}, "r", 0),
    ("tied_lora", {"alpha": 0}, "alpha", 0),
    ("vera", {"r": 0}, "r", 0),
    ("vera", {"d_initial": 0.0}, "d_initial", 0.0),
    ("vera", {"projection_seed": 2**64}, "projection_seed", 2**64),
    ("vb_lora", {"r": 0}, "r", 0),
    ("vb_lora", {"num_vectors": 0}, "num_vectors", 0),
    ("vb_lora", {"vector_length": 0}, "vector_length", 0),
    ("vb_lora", {"topk": 0}, "topk", 0),
    ("vb_lora", {"topk": 91}, "topk", 91),
    ("vb_lora", {"init_bank_bound": 0.0}, "init_bank_bound", 0.0),
    ("vb_lora", {"init_logits_std": -0.1}, "init_logits_std", -0.1),
    ("loha", {"r": 0}, "r", 0),
    ("loha", {"alpha": 0}, "alpha", 0),
    ("abba", {"r1": 0}, "r1", 0),
    ("abba", {"r2": 0}, "r2", 0),
    ("abba", {"alpha": 0}, "alpha", 0),
    ("lokr", {"r": 0}, "r", 0),
    ("lokr", {"decompose_factor": 0}, "decompose_factor", 0),
    ("lokr", {"decompose_factor": -2}, "decompose_factor", -2),
    ("lokr", {"alpha": 0}, "alpha", 0),
    ("oft", {"block_size": 8, "r": 4}, "block_size", 8),
    ("oft", {"block_size": 0, "r": 0}, "r", 0),
    ("oft", {"block_size": -1, "r": 4}, "block_size", -1),
    ("oft", {"block_size": 1}, "block_size", 1),
    ("oft", {"coft": True, "eps": 0.0}, "eps", 0.0),
    ("ether", {"n_blocks": 0}, "n_blocks", 0),
    ("ether_plus", {"n_blocks": 0}, "n_blocks", 0),
    ("diablo", {"num_blocks": 0}, "num_blocks", 0),
    ("diablo", {"dropout": 1.0}, "dropout", 1.0),
    ("houlsby", {"bottleneck": 0}, "bottleneck", 0),
    ("houlsby", {"activation": "sigmoidish"}, "activation", "sigmoidish"),
    ("houlsby", {"init_std": 0.0}, "init_std", 0.0),
    ("hyperformer", {"bottleneck": 0}, "bottleneck", 0),
    ("hyperformer", {"activation": "sigmoidish"}, "activation", "sigmoidish"),
    ("hyperformer", {"init_std": 0.0}, "init_std", 0.0),
    ("hyperformer", {"task_embedding_dim": 0}, "task_embedding_dim", 0),
    ("hyperformer", {"projector_hidden_dim": 0}, "projector_hidden_dim", 0),
    ("hyperformer", {"projected_dim": 0}, "projected_dim", 0),
    ("pfeiffer", {"bottleneck": 0}, "bottleneck", 0),
    ("pfeiffer", {"activation": "sigmoidish"}, "activation", "sigmoidish"),
    ("pfeiffer", {"init_std": -0.01}, "init_std", -0.01),
    ("parallel_adapter", {"bottleneck": 0}, "bottleneck", 0),
    ("parallel_adapter", {"activation": "sigmoidish"}, "activation", "sigmoidish"),
    ("parallel_adapter", {"scaling": 0.0}, "scaling", 0.0),
    ("prefix_tuning", {"num_virtual_tokens": 0}, "num_virtual_tokens", 0),
    ("prefix_tuning", {"encoder_hidden_size": 0}, "encoder_hidden_size", 0),
    ("prompt_tuning", {"num_virtual_tokens": 0}, "num_virtual_tokens", 0),
    ("prompt_tuning", {"init": "vocab"}, "init", "vocab"),
    ("prompt_tuning", {"init": "text"}, "init_text", "null"),
    ("prompt_tuning", {"init": "text", "init_text": ""}, "init_text", "''"),
    ("loreft", {"r": 0}, "r", 0),
    ("loreft", {"prefix_positions": -1}, "prefix_positions", -1),
    ("loreft", {"suffix_positions": -1}, "suffix_positions", -1),
    ("loreft", {"prefix_positions": 0, "suffix_positions": 0}, "prefix_positions", 0),
    ("loreft", {"layers": []}, "layers", []),
    ("loreft", {"layers": [0, 0]}, "layers", [0, 0]),
    ("loreft", {"layers": [-1]}, "layers", [-1]),
    ("loreft", {"dropout": 1.0}, "dropout", 1.0),
    ("bitfit", {"bias_names": []}, "bias_names", []),
    ("ln_tuning", {"target_modules": []}, "target_modules", []),
]


@pytest.mark.parametrize(("name", "options", "key", "value"), BAD,
                         ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for n, o, _, _ in BAD])
def test_a_bad_option_is_refused_by_build(name, options, key, value):
    with pytest.raises(UserError) as e:
        methods.build({"name": name, **options})
    message = str(e.value)
    assert "\n" not in message
    assert re.search(rf"\b{key}\b", message), f"{message!r} does not name {key}"
    shown = str(value)
    assert any(s in message for s in (f"got {shown}", f"{key}={shown}", f"'{shown}'")), f"{message!r} does not show {shown}"


def test_the_method_is_refused_before_the_model_loads():
    """model.build checks the method first: a bad option is reported, not the missing backbone."""
    with pytest.raises(UserError, match="method.r must be at least 1, got 0"):
        model.build(backbone_cfg("/nonexistent/backbone"), {"name": "lora", "r": 0}, list(LABELS))


def test_the_table_covers_every_method_that_checks_options():
    checked = {name for name, cls in methods.METHODS.items() if hasattr(cls.Config, "__post_init__")}
    assert checked - {name for name, *_ in BAD} == set()


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "method").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_builds(path):
    cfg = OmegaConf.to_container(OmegaConf.load(path))
    if path.stem in COMPOSITIONS:  # they compose earlier runs, which no shipped config can name
        with pytest.raises(UserError, match="two or more runs"):
            methods.build(cfg)
        cfg["adapters"] = ["runs/a", "runs/b"]
    method = methods.build(cfg)
    assert method.name == path.stem


@pytest.mark.parametrize(("name", "options"), [
    ("lora", {"init": "pissa", "dropout": 0.0}),
    ("dylora", {"r": 6, "eval_rank": 6}),
    ("adalora", {"init_r": 8, "target_r": 8, "tinit": 0, "tfinal": 100}),
    ("oft", {"block_size": 0, "r": 4}),
    ("oft", {"coft": False, "eps": 0.0}),  # eps is only used with coft
    ("vera", {"d_initial": -0.1, "projection_seed": -1}),
    ("vb_lora", {"topk": 90, "init_logits_std": 0.0}),
    ("lokr", {"decompose_factor": -1}),
    ("moe_lora", {"num_experts": [1, 8], "top_k": 1, "aux_loss_weight": 0.0, "capacity_factor": 0.5, "expert_dropout": 0.0}),
    ("loreft", {"prefix_positions": 0, "suffix_positions": 3, "layers": [1, 0]}),
    ("prompt_tuning", {"init": "text", "init_text": "classify the sentiment"}),
    ("bitfit", {"bias_names": None}),
])
def test_edge_values_that_work_are_accepted(name, options):
    methods.build({"name": name, **options})
