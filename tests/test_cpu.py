"""CPU threads: what the user sets wins; otherwise a probe picks 1 or every free core. And the bf16 probe (peftkit.cpu)."""

from __future__ import annotations

import pytest
import torch

from peftkit import cpu


@pytest.fixture(autouse=True)
def _restore_threads(monkeypatch):
    saved = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu, "available_cores", lambda: 4)
    yield
    torch.set_num_threads(saved)


def test_the_users_number_wins():
    assert cpu.choose_threads(3, probe=lambda n: pytest.fail("no probe when the user says")) == (3, "trainer.threads")
    assert torch.get_num_threads() == 3


def test_omp_num_threads_is_respected(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    assert cpu.choose_threads(None, probe=lambda n: pytest.fail("no probe"))[0] == 1


@pytest.mark.parametrize("one, many, chosen, probes", [(0.010, 0.004, 4, 1), (0.010, 0.009, 1, 2), (0.010, 0.050, 1, 2)])
def test_the_probe_keeps_more_threads_only_when_clearly_faster(one, many, chosen, probes):
    """All cores when they run the probe at least 1.3x as fast as one thread; one thread only after a
    second probe agrees."""
    seen = []
    n, why = cpu.choose_threads(None, probe=lambda k: seen.append(k) or (one if k == 1 else many))
    assert n == chosen and torch.get_num_threads() == chosen and "probe" in why
    assert seen == [1, 4] * cpu.PROBE_ROUNDS * probes


def test_processes_share_the_cores():
    seen = []
    cpu.choose_threads(None, processes=2, probe=lambda k: seen.append(k) or (0.01 if k == 1 else 0.001))
    assert seen == [1, 2] * cpu.PROBE_ROUNDS and torch.get_num_threads() == 2


def test_a_moments_load_does_not_decide():
    """The two counts are timed in turns and the median of their ratios kept: slow rounds on 4 threads
    (another job took a core for a moment) short of half the rounds do not leave the run on one thread."""
    slow = (cpu.PROBE_ROUNDS - 1) // 2
    many = iter([0.050] * slow + [0.004] * (cpu.PROBE_ROUNDS - slow))
    n, _ = cpu.choose_threads(None, probe=lambda k: 0.010 if k == 1 else next(many))
    assert n == 4 and torch.get_num_threads() == 4


def test_a_slow_spell_over_a_whole_probe_does_not_decide():
    """Every round of the first probe slow on 4 threads, the second probe not: all cores."""
    many = iter([0.050] * cpu.PROBE_ROUNDS + [0.004] * cpu.PROBE_ROUNDS)
    n, why = cpu.choose_threads(None, probe=lambda k: 0.010 if k == 1 else next(many))
    assert n == 4 and "2.50x" in why


def test_the_real_probe_times_a_matmul():
    assert 0 < cpu.probe_seconds(1, repeats=1) < 5


def test_the_bf16_probe_compares_two_matmuls(monkeypatch):
    assert cpu.bf16_slowdown(64) > 0
    clock = iter([0.0, 0.002, 0.0, 0.001, 0.0, 0.06, 0.0, 0.05])  # fp32 2 then 1 ms, bf16 60 then 50 ms: the best of each
    monkeypatch.setattr(cpu.time, "perf_counter", lambda: next(clock))
    assert cpu.bf16_slowdown(8) == pytest.approx(50)


# ---- fast dropout: the same independent Bernoulli(p) drops, drawing only the dropped positions -------------

def _kept(n: int, dropped: torch.Tensor) -> torch.Tensor:
    return torch.ones(n, dtype=torch.bool).index_fill_(0, dropped, False)


def test_each_position_is_dropped_independently_with_probability_p():
    torch.manual_seed(0)
    n = 1_000_000
    kept = _kept(n, cpu.dropped_positions(n, 0.1)).float()
    for part in kept.chunk(4):  # every stretch of positions, not only the whole, keeps 0.9
        assert abs(part.mean().item() - 0.9) < 6 * (0.09 / part.numel()) ** 0.5
    pairs = (kept[:-1] * kept[1:]).mean().item()  # neighbours independent: P(both kept) = 0.81
    assert abs(pairs - 0.81) < 6 * (0.81 * 0.19 / n) ** 0.5
    torch.manual_seed(0)
    assert torch.equal(_kept(n, cpu.dropped_positions(n, 0.1)).float(), kept)  # the seeded generator decides
    assert not torch.equal(_kept(n, cpu.dropped_positions(n, 0.1)).float(), kept)
    assert cpu.dropped_positions(0, 0.1).numel() == 0


def test_the_number_dropped_is_binomial_not_fixed():
    """Independent drops make the count Binomial(n, p): variance n·p·(1 − p) = 18 for n = 200, p = 0.1.
    A fixed number of draws (no Poisson count) would give a variance near 1."""
    torch.manual_seed(1)
    counts = torch.tensor([float(_kept(200, cpu.dropped_positions(200, 0.1)).logical_not().sum()) for _ in range(3000)])
    assert abs(counts.mean().item() - 20) < 6 * (18 / 3000) ** 0.5
    assert 14 < counts.var().item() < 22
    both = sum(int(_kept(2, cpu.dropped_positions(2, 0.3)).logical_not().all()) for _ in range(20000)) / 20000
    assert abs(both - 0.09) < 6 * (0.09 * 0.91 / 20000) ** 0.5  # P(both of two dropped) = p²


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_dropout_is_x_times_scale_with_the_drawn_positions_zeroed_and_so_is_its_gradient(dtype):
    x = torch.randn(13, 7, 5).to(dtype).transpose(0, 1).requires_grad_()  # not contiguous: positions are logical
    torch.manual_seed(3)
    y = cpu.fast_dropout(x, 0.25)
    torch.manual_seed(3)
    kept = _kept(x.numel(), cpu.dropped_positions(x.numel(), 0.25)).view(x.shape)
    assert 0 < kept.logical_not().sum() < x.numel()
    assert torch.equal(y, torch.where(kept, x * (1 / 0.75), 0))
    y.sum().backward()  # an expanded (stride 0) gradient
    assert torch.equal(x.grad, torch.where(kept, torch.ones_like(x) * (1 / 0.75), 0))
    ones = torch.ones(2000, 500)
    assert abs(cpu.fast_dropout(ones, 0.3).mean().item() - 1) < 0.01  # the expectation is kept
    assert torch.equal(cpu.fast_dropout(x, 0.0), x) and not cpu.fast_dropout(x, 1.0).any()


def test_under_torch_compile_the_dropouts_are_torchs_and_the_step_is_one_graph():
    """The host-side count would break the graph at each dropout; compiled, torch's mask replaces it."""
    x = torch.randn(6, 40)

    def f(x):
        h = cpu.Dropout(0.3)(x)  # training mode: a fresh module trains
        return cpu.attention_probs(h.view(6, 1, 5, 8), None, 0.2, torch.float32)

    explained = torch._dynamo.explain(f)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()
    torch.manual_seed(0)
    compiled = torch.compile(f, backend="eager")(x)
    torch.manual_seed(0)  # torch's two dropouts, drawn in the same order
    dropped = torch.nn.functional.dropout(x, 0.3).view(6, 1, 5, 8)
    assert torch.equal(compiled, torch.nn.functional.dropout(torch.softmax(dropped, dim=-1), 0.2))
    assert (compiled == 0).any()


class _Attention(torch.nn.Module):
    is_causal = False


def test_dropout_sdpa_is_softmax_attention_with_the_mask_it_drew():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 4, 6, 8) for _ in range(3))
    attend = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    attend[1, :, :, 4:] = False  # the second row is 4 tokens and 2 pads
    module = _Attention().train()
    torch.manual_seed(9)
    out, _ = cpu.dropout_sdpa(module, q, k, v, attend, dropout=0.2, scaling=0.3)
    torch.manual_seed(9)
    keep = _kept(2 * 4 * 6 * 6, cpu.dropped_positions(2 * 4 * 6 * 6, 0.2)).view(2, 4, 6, 6)
    scores = (q @ k.transpose(2, 3) * 0.3).masked_fill(~attend, float("-inf"))
    expected = ((scores.softmax(-1) * keep / 0.8) @ v).transpose(1, 2)
    assert out.shape == (2, 6, 4, 8)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    module.eval()  # no dropout (a model passes 0 in eval): exactly transformers' SDPA
    assert torch.equal(cpu.dropout_sdpa(module, q, k, v, attend, dropout=0.0, scaling=0.3)[0],
                       sdpa_attention_forward(module, q, k, v, attend, dropout=0.0, scaling=0.3)[0])


def test_use_fast_dropout_swaps_every_dropout_and_keeps_eval_outputs(tiny_bert):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2).eval()
    batch = AutoTokenizer.from_pretrained(tiny_bert)(["a short one", "and a rather longer sentence here"],
                                                     padding=True, return_tensors="pt")
    before = model(**batch).logits
    dropouts = sum(type(m) is torch.nn.Dropout and m.p > 0 for m in model.modules())
    assert cpu.use_fast_dropout(model) == dropouts > 0
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    assert model.config._attn_implementation == cpu.FAST_ATTENTION
    assert torch.equal(model(**batch).logits, before)
    model.train()
    torch.manual_seed(5)
    first = model(**batch).logits
    torch.manual_seed(5)
    assert torch.equal(model(**batch).logits, first) and not torch.equal(first, before)
    first.sum().backward()  # the gradient flows back through both kinds of dropout to the first layer
    assert model.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
