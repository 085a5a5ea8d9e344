"""Frozen bf16 Linears on weights packed once (methods.base.PackedLinear): the same numbers as
`F.linear`, bit for bit, forward and gradient; repacked when the weight changes; plain elsewhere."""

import copy

import pytest
import torch
from torch import nn

from peftkit.methods import base
from peftkit.methods.base import PackedLinear, pack_frozen_linears, packs_linears
from peftkit.methods.lora import LoraLinear, fusable, low_rank_linear

needs_packs = pytest.mark.skipif(not packs_linears(), reason="this torch build or CPU cannot pack bf16 weights (oneDNN needs AVX512-BW/VL/DQ or AVX-NE-CONVERT)")


def _frozen_bf16(*layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(*layers).to(torch.bfloat16).requires_grad_(False)


@needs_packs
def test_packed_linears_give_f_linear_outputs_and_gradients_bit_for_bit():
    torch.manual_seed(0)
    net = _frozen_bf16(nn.Linear(16, 48), nn.GELU(), nn.Linear(48, 8, bias=False))
    plain = copy.deepcopy(net)
    x = torch.randn(5, 7, 16, requires_grad=True)  # fp32 input: autocast casts it, as in training
    x2 = x.detach().clone().requires_grad_()
    assert pack_frozen_linears(net) == 2 and type(net[0]) is PackedLinear and type(net[2]) is PackedLinear
    w = torch.randn(5, 7, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_plain = net(x), plain(x2)
    (y.float() * w).sum().backward()
    (y_plain.float() * w).sum().backward()
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_plain)
    assert torch.equal(x.grad, x2.grad) and x.grad.abs().sum() > 0
    assert vars(net[0])["_packs"]._t is not None  # both packs made at first use


@needs_packs
def test_a_changed_weight_is_repacked_and_a_strided_input_is_read_as_it_is():
    net = _frozen_bf16(nn.Linear(16, 12))
    pack_frozen_linears(net)
    x = torch.randn(6, 3, 16).to(torch.bfloat16)[:, 1]  # rows 48 elements apart
    assert torch.equal(net(x), nn.functional.linear(x, net[0].weight, net[0].bias))
    with torch.no_grad():
        net[0].weight += 0.5  # as a merge does
    assert torch.equal(net(x), nn.functional.linear(x, net[0].weight, net[0].bias))
    twin = copy.deepcopy(net)  # oneDNN's packs cannot be copied: the copy packs its own
    assert "_packs" not in vars(twin[0]) and torch.equal(twin(x), net(x))


@needs_packs
def test_packing_leaves_trained_fp32_and_subclassed_linears_alone():
    trained = nn.Linear(4, 4).to(torch.bfloat16)  # requires grad
    fp32 = nn.Linear(4, 4).requires_grad_(False)
    frozen = nn.Linear(4, 4).to(torch.bfloat16).requires_grad_(False)
    net = nn.Sequential(trained, fp32, LoraLinear(frozen, r=2, alpha=2, dropout=0.0, rslora=False, init="kaiming"))
    assert pack_frozen_linears(net) == 1
    assert type(trained) is nn.Linear and type(fp32) is nn.Linear and type(frozen) is PackedLinear
    x = torch.randn(3, 4)
    assert torch.equal(fp32(x), nn.functional.linear(x, fp32.weight, fp32.bias))  # fp32 compute: the plain path


@needs_packs
def test_lora_on_a_packed_base_is_the_same_one_node_layer():
    torch.manual_seed(1)
    base = nn.Linear(32, 24).to(torch.bfloat16).requires_grad_(False)
    A, B = torch.randn(4, 32, requires_grad=True), torch.randn(24, 4, requires_grad=True)
    x = torch.randn(2, 5, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_plain = low_rank_linear(x, base, A, B, 0.5)
    (y_plain.float() ** 2).sum().backward()
    grads_plain = [t.grad.clone() for t in (x, A, B)]
    for t in (x, A, B):
        t.grad = None
    pack_frozen_linears(nn.Sequential(base))
    assert fusable(base)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = low_rank_linear(x, base, A, B, 0.5)
    (y.float() ** 2).sum().backward()
    assert torch.equal(y, y_plain)
    for got, want in zip((x.grad, A.grad, B.grad), grads_plain):
        assert torch.equal(got, want)


@needs_packs
def test_evaluation_packs_w_only_and_a_model_past_the_limit_stays_plain(monkeypatch):
    net = _frozen_bf16(nn.Linear(16, 12))
    pack_frozen_linears(net)
    with torch.inference_mode():
        net(torch.randn(3, 16).to(torch.bfloat16))
    packs = vars(net[0])["_packs"]
    assert packs._w is not None and packs._t is None  # no gradient, no Wᵀ pack
    big = _frozen_bf16(nn.Linear(16, 12))
    monkeypatch.setattr(base, "PACK_LIMIT_BYTES", 2 * big[0].weight.nbytes - 1)
    assert pack_frozen_linears(big) == 0 and type(big[0]) is nn.Linear


def test_a_cpu_that_cannot_pack_bf16_leaves_the_model_plain(monkeypatch):
    """On an AVX2-only CPU oneDNN refuses the bf16 pack ("bf16 path needs the cpu support ..."): bf16
    training there crashed at the first forward until packs_linears tried a pack instead of the op's presence."""
    def refuse(*args, **kwargs):
        raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert or avx512bw, avx512vl and avx512dq")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refuse, raising=False)
    monkeypatch.setattr(base, "packs_linears", base.packs_linears.__wrapped__)  # unmemoized, so it asks again
    net = _frozen_bf16(nn.Linear(16, 8))
    assert not base.packs_linears() and pack_frozen_linears(net) == 0 and type(net[0]) is nn.Linear
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net(torch.randn(3, 16)).shape == (3, 8)


@needs_packs
def test_under_torch_compile_a_packed_linear_is_a_plain_one():
    """dynamo cannot trace oneDNN's packed weights (it stopped a compiled bf16 step with an error in
    `mkldnn._linear_pointwise`): a traced step runs the plain Linear, with the same numbers."""
    torch.manual_seed(2)
    net = _frozen_bf16(nn.Linear(16, 12), nn.GELU(), nn.Linear(12, 4))
    plain = copy.deepcopy(net)
    pack_frozen_linears(net)
    base_layer = nn.Linear(16, 12).to(torch.bfloat16).requires_grad_(False)
    pack_frozen_linears(nn.Sequential(base_layer))
    A, B = torch.randn(4, 16, requires_grad=True), torch.randn(12, 4, requires_grad=True)
    x = torch.randn(3, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(torch.compile(net, backend="eager")(x), plain(x))
        y = torch.compile(lambda t: low_rank_linear(t, base_layer, A, B, 0.5), backend="eager")(x)
    y.float().sum().backward()
    assert A.grad is not None and "_packs" not in vars(base_layer)  # nothing was packed for the traced calls
