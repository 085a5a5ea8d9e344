"""Causal-LM supervised fine-tuning: the pretrained `*ForCausalLM`, next-token loss on the
assistant's tokens only (never the prompt), packed rows, and evaluation by dev loss / perplexity
and by scoring greedy replies (evaluation.generation).

Prompts are formatted by the tokenizer's chat template (`template: chat`) or the Alpaca prompt
(`template: alpaca`). Packing puts several examples in one row of up to `backbone.max_length`
tokens with positions restarting per example; with no attention mask, transformers builds a
block-diagonal causal mask from those positions, so no token attends across an example boundary
(the packed loss equals the unpacked one: tests/tasks/test_causal_lm.py). On CPU `packed_sdpa`
attends to each example alone instead of masking the whole row, and the LM head runs only on the
hidden states that predict a response token (`response_logits`).
"""

from __future__ import annotations

import math
import weakref

import numpy as np
import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.markup import escape

from peftkit import backbone, device_reads
from peftkit.data import instruct
from peftkit.data.batching import eval_batches, to_device
from peftkit.data.instruct import Conversation, LMData
from peftkit.errors import UserError
from peftkit.evaluation import generation
from peftkit.methods import METHODS
from peftkit.methods.base import compute_dtype, hooked

NAME = "causal_lm"
IGNORE = -100
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes "
          "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
console = Console(stderr=True)


def load_data(dataset_cfg: DictConfig, splits: tuple[str, ...] = ("train", "validation")) -> LMData:
    return instruct.load(dataset_cfg, splits)


def load_processor(backbone_cfg: DictConfig):
    return backbone.load_tokenizer(backbone_cfg)


def load_model(backbone_cfg: DictConfig, label_names=None):
    model = backbone.load_causal_lm(backbone_cfg)
    model.config.use_cache = False  # training: no cache, so packed positions give the block mask
    if model.config._attn_implementation == "sdpa":
        device_reads.register_attention(PACKED_ATTENTION, packed_sdpa)
        model.set_attn_implementation(PACKED_ATTENTION)
    return model


# ---- attention over packed rows ---------------------------------------------------------------------------

PACKED_ATTENTION = "peftkit_packed_sdpa"


def packed_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **kwargs):
    """SDPA, with a packed row's examples attended one at a time on CPU.

    transformers reads a packed row's restarting positions as a block-diagonal causal mask and gives
    SDPA the whole row: on CPU that computes every example against every other and then masks it out.
    Each example alone, causal, is the same attention (tests/tasks/test_causal_lm.py) at a fraction
    of the work (scripts/llm_bench.py speed: 127 → 144 tokens/s with this and `response_logits`). It reads
    the restarts on the host, which is free on CPU only (`device_reads`). Anything else (a cache, a
    GPU, a sliding window, soft-capping, no restart in the row) is plain SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    positions = kwargs.get("position_ids")
    length = query.shape[2]
    plain = (not device_reads.reads_are_free(query.device) or positions is None or key.shape[2] != length or positions.shape[-1] != length
             or not getattr(module, "is_causal", True) or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None)
    if not plain:
        positions = positions.expand(query.shape[0], -1)
        starts = [row.nonzero().squeeze(1).tolist() for row in (positions == 0)]
        window = kwargs.get("sliding_window")
        plain = all(len(s) == 1 for s in starts) or any(s[0] != 0 for s in starts) or (
            window is not None and max(e - b for s in starts for b, e in zip(s, s[1:] + [length])) > window)
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    rows = []
    for r, row_starts in enumerate(starts):
        parts = []
        for b, e in zip(row_starts, row_starts[1:] + [length]):
            q, k, v = query[r : r + 1, :, b:e], key[r : r + 1, :, b:e], value[r : r + 1, :, b:e]
            if query.dtype == torch.bfloat16 and dropout == 0 and e - b <= SHORT_EXAMPLE:
                parts.append(short_causal_attention(q, k, v, scaling))
            else:
                parts.append(torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                                                              scale=scaling, enable_gqa=gqa))
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


# In bf16 on CPU, an example up to this long attends faster as three plain ops than through the flash
# kernel, whose backward is slow there (scripts/bench_attention.py, fwd + bwd, 9 query / 3 key heads
# of 64: 1.46 against 2.93 ms at 128 tokens, 4.73 against 6.18 at 256, 15.1 against 20.4 at 512, 57
# against 47 at 1,024; in fp32 no faster). Its bf16 probabilities, kept for the backward, are
# (heads × length²): 4.7 MB per example and layer at 512.
SHORT_EXAMPLE = 512


def short_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """Causal attention of one example, (1, heads, length, dim), as scores → softmax → weighted sum.

    The query heads that share a key head are stacked along the rows, so each key head's scores are
    one matmul (no copies of keys or values for grouped-query attention); the softmax accumulates in
    float32 and returns the input's dtype."""
    heads, length, dim = q.shape[1:]
    groups = k.shape[1]
    rep = heads // groups
    above = torch.full((length, length), float("-inf"), dtype=q.dtype, device=q.device).triu(1).repeat(rep, 1)
    scores = torch.baddbmm(above, q[0].reshape(groups, rep * length, dim), k[0].transpose(1, 2),
                           alpha=dim**-0.5 if scaling is None else scaling)
    return (torch.softmax(scores, dim=-1) @ v[0]).view(1, heads, length, dim)


# ---- prompts and response-only labels -----------------------------------------------------------------------

def render(conv: Conversation, tokenizer, template: str) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation and its labels: the assistant turns' tokens, -100 elsewhere."""
    if template == "alpaca":
        ids, labels = [], []
        for user, reply in _turns(conv.messages):
            prompt = _encode(tokenizer, ALPACA.format(instruction=user), first=not ids)
            answer = tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids += prompt + answer
            labels += [IGNORE] * len(prompt) + answer
        return ids, labels
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("this tokenizer has no chat template; set dataset.template=alpaca")
    ids: list[int] = []
    labels: list[int] = []
    for k, m in enumerate(conv.messages):
        if m["role"] != "assistant":
            continue
        prompt = _chat_ids(tokenizer, conv.messages[:k], generation_prompt=True)
        full = _chat_ids(tokenizer, conv.messages[: k + 1], generation_prompt=False)
        if full[: len(prompt)] != prompt or prompt[: len(ids)] != ids:
            raise UserError("the chat template does not render a conversation as a prefix of its continuation; "
                            "set dataset.template=alpaca")
        labels += [IGNORE] * (len(prompt) - len(ids)) + full[len(prompt) :]
        ids = full
    return ids, labels


def prompt_ids(conv: Conversation, tokenizer, template: str) -> list[int]:
    """What generation starts from: everything up to the last assistant turn, and its header."""
    if template == "alpaca":
        ids, labels = render(Conversation(conv.messages[:-1] + [{"role": "assistant", "content": ""}]), tokenizer, template)
        return ids[: len(ids) - 1]  # without the empty reply's end-of-sequence
    return _chat_ids(tokenizer, conv.prompt, generation_prompt=True)


def _chat_ids(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _encode(tokenizer, text: str, first: bool) -> list[int]:
    """The prompt's ids, with the tokenizer's start token if it adds one, never an end token."""
    ids = tokenizer(text, add_special_tokens=first)["input_ids"]
    ends = {tokenizer.eos_token_id, getattr(tokenizer, "sep_token_id", None)} - {None}
    return ids[:-1] if ids and ids[-1] in ends else ids


def _turns(messages: list[dict]) -> list[tuple[str, str]]:
    """(user, assistant) pairs; a system turn is not part of the Alpaca prompt."""
    pairs, user = [], ""
    for m in messages:
        if m["role"] == "user":
            user = m["content"] if not user else f"{user}\n\n{m['content']}"
        elif m["role"] == "assistant":
            pairs.append((user, m["content"]))
            user = ""
    return pairs


# ---- encoded splits -------------------------------------------------------------------------------------------

class EncodedLM:
    """Tokenized conversations as training rows: packed (several examples per row) or one per row.

    `lengths` and `batch(idx)` are per row, so the trainer's batching (length grouping, resumable
    order) works on rows as it does on classification examples."""

    def __init__(self, examples: list[tuple[list[int], list[int]]], pad_id: int, packed: bool, max_length: int):
        self.examples = examples
        self.pad_id = pad_id
        self.packed = packed
        self.rows = pack([len(ids) for ids, _ in examples], max_length) if packed else [[i] for i in range(len(examples))]
        self.lengths = [sum(len(examples[i][0]) for i in row) for row in self.rows]
        self.tokens = sum(self.lengths)  # real tokens, no padding

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, idx: list[int]) -> dict[str, torch.Tensor]:
        width = max(self.lengths[i] for i in idx)
        input_ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(idx), width), IGNORE, dtype=torch.long)
        if not self.packed:
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                ids, lab = self.examples[self.rows[i][0]]
                input_ids[r, : len(ids)], labels[r, : len(ids)], mask[r, : len(ids)] = torch.tensor(ids), torch.tensor(lab), 1
            return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "learned": learned_positions(labels)}
        positions = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            at = 0
            for e in self.rows[i]:
                ids, lab = self.examples[e]
                input_ids[r, at : at + len(ids)], labels[r, at : at + len(ids)] = torch.tensor(ids), torch.tensor(lab)
                positions[r, at : at + len(ids)] = torch.arange(len(ids))
                at += len(ids)
            positions[r, at:] = torch.arange(width - at)  # the padding is a sequence of its own
        return {"input_ids": input_ids, "position_ids": positions, "labels": labels, "learned": learned_positions(labels)}


def learned_positions(labels: torch.Tensor) -> torch.Tensor:
    """Where `labels[:, 1:]`, flattened, holds a response token: found on the host with the batch, so the
    loss selects them on a GPU without reading the labels back (a boolean mask's count is a read)."""
    return (labels[:, 1:] != IGNORE).flatten().nonzero().squeeze(1)


def model_inputs(net, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch less what only the loss reads. Packed rows off CPU also get their block-diagonal causal
    mask, built on the device: given none, transformers first reads their positions back to see
    whether they restart (`device_reads`), which would make the host wait for the GPU."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "learned")}
    positions = inputs.get("position_ids")
    if (positions is not None and inputs.get("attention_mask") is None and not device_reads.reads_are_free(positions.device)
            and _full_attention_only(getattr(net, "module", net).config)):
        inputs["attention_mask"] = block_causal_mask(positions)
    return inputs


def block_causal_mask(positions: torch.Tensor) -> torch.Tensor:
    """(rows, 1, length, length), True where a position may attend: earlier positions of its own
    example, an example starting where its position is 0 (the padding at a row's end is one more)."""
    example = (positions == 0).cumsum(-1)
    i = torch.arange(positions.shape[-1], device=positions.device)
    return ((example[:, :, None] == example[:, None, :]) & (i[:, None] >= i[None, :]))[:, None]


def _full_attention_only(config) -> bool:
    """Whether one mask serves every layer: SDPA (peftkit's packed attention), no sliding-window or
    chunked layers, which transformers masks from the positions themselves."""
    if config._attn_implementation != PACKED_ATTENTION or getattr(config, "attention_chunk_size", None):
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return all(t == "full_attention" for t in layer_types)
    return getattr(config, "sliding_window", None) is None


def pack(lengths: list[int], max_length: int) -> list[list[int]]:
    """First-fit decreasing: example indices per row, each row at most `max_length` tokens."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    room = np.zeros(0, dtype=np.int64)
    rows: list[list[int]] = []
    for i in order:
        fits = np.flatnonzero(room >= lengths[i])
        if len(fits):
            rows[fits[0]].append(int(i))
            room[fits[0]] -= lengths[i]
        else:
            rows.append([int(i)])
            room = np.append(room, max_length - lengths[i])
    return rows


def encode(data: LMData, tokenizer, cfg: DictConfig) -> dict[str, EncodedLM]:
    """Every split rendered and truncated to `backbone.max_length`; train packed if `dataset.packing`.
    Truncated examples are counted (`data.truncated`) and reported; an example whose response is
    cut off entirely is dropped."""
    d, max_length = cfg.dataset, cfg.backbone.max_length
    packing = bool(d.packing)
    method = cfg.get("method", {}).get("name")
    if packing and method in METHODS and not METHODS[method].packs:
        console.print(f"peftkit: notice: {method} trains on padded batches, not packed rows (dataset.packing is ignored)")
        packing = False
    out = {}
    for split, convs in data.splits.items():
        examples, cut = [], 0
        for conv in convs:
            ids, labels = render(conv, tokenizer, d.template)
            if len(ids) > max_length:
                cut += 1
                ids, labels = ids[:max_length], labels[:max_length]
            if split == "train" and all(x == IGNORE for x in labels):
                continue
            examples.append((ids, labels))
        if not examples:
            raise UserError(f"no {split} example has response tokens within backbone.max_length={max_length}; raise it")
        data.truncated[split] = cut
        if cut:
            console.print(f"[yellow]peftkit: warning:[/] {cut} of {len(convs)} {split} examples are longer than "
                          f"backbone.max_length={max_length} tokens and were cut")
        out[split] = EncodedLM(examples, tokenizer.pad_token_id, packing and split == "train", max_length)
        out[split].sequence_kept = method in METHODS and METHODS[method].packs  # the method keeps positions as they are
        out[split].prompts = [prompt_ids(c, tokenizer, d.template)[-max_length:] for c in convs]
        out[split].golds = [c.gold for c in convs]
        out[split].tokenizer = tokenizer
    return out


def response_logits(net, batch: dict[str, torch.Tensor], encoded: EncodedLM) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits that predict a token, flat (tokens × vocabulary), and those tokens (-100 where nothing
    is learned). The LM head sees only the hidden states that predict a response token, row by row:
    the prompt's logits, a vocabulary-wide matmul and softmax per token, are never computed (in a
    batch of packed rows nearly every position predicts a response token in some row, so the
    positions alone would save little). Methods that move positions (prompt and prefix tuning, LoReFT)
    take every logit; prompt tuning's come after its virtual tokens', so the real tokens' logits are
    the last ones."""
    labels = batch["labels"]
    if not getattr(encoded, "sequence_kept", False):
        logits = net(**model_inputs(net, batch)).logits
        return logits[:, -labels.shape[1]:-1].flatten(0, 1), labels[:, 1:].flatten()
    head = _lm_head(net)
    outputs, watched = [], hooked(head)  # someone else's hook may change them
    seen = head.register_forward_hook(lambda _, args, out: outputs.append(out))
    try:
        logits, target = _at_responses(net, batch, lambda hidden: hidden)
    finally:
        seen.remove()
    if head not in _PLAIN_HEADS:  # the model's logits are its head's output itself: no cap, scale or cast after it
        _PLAIN_HEADS[head] = type(head) is torch.nn.Linear and not watched and len(outputs) == 1 and outputs[0] is logits
    return logits, target


_PLAIN_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # LM head → whether `fused_head_inputs` may skip it


def fused_head_inputs(net, batch: dict[str, torch.Tensor], encoded: EncodedLM):
    """(the hidden states that predict a response token, those tokens, the LM head), the model run
    without its head; None where the head must run as the model runs it: methods that move positions,
    an adapted or hooked head, or a model whose logits are not its head's output itself (a soft cap or a scale
    after the head, seen on the head's first use through `response_logits`)."""
    if not getattr(encoded, "sequence_kept", False):
        return None
    head = _lm_head(net)
    if not _PLAIN_HEADS.get(head, False) or hooked(head):
        return None
    kept = []
    _, target = _at_responses(net, batch, lambda hidden: kept.append(hidden) or hidden[:0])  # the head runs on no row
    return kept[0], target, head


def _lm_head(net) -> torch.nn.Module:
    return getattr(net, "module", net).get_output_embeddings()  # (DDP wraps the model in .module)


def _at_responses(net, batch: dict[str, torch.Tensor], feed) -> tuple[torch.Tensor, torch.Tensor]:
    """(the model's logits, the response tokens): the model run with its LM head given `feed(the hidden
    states that predict a response token)`, row by row."""
    target = batch["labels"][:, 1:]
    learned = batch["learned"]  # (`EncodedLM.batch`)
    hook = _lm_head(net).register_forward_pre_hook(lambda _, args: (feed(args[0].flatten(0, 1).index_select(0, learned)), *args[1:]))
    try:
        logits = net(**model_inputs(net, batch), logits_to_keep=torch.arange(target.shape[1], device=target.device)).logits
    finally:
        hook.remove()
    return logits, target.flatten().index_select(0, learned)


def response_cross_entropy(net, batch: dict[str, torch.Tensor], encoded: EncodedLM, reduction: str = "mean") -> torch.Tensor:
    """The response tokens' cross-entropy (mean or sum): through `head_cross_entropy` where the head can be
    fused with the loss, else from `response_logits`."""
    fused = fused_head_inputs(net, batch, encoded)
    if fused is not None:
        hidden, target, head = fused
        return head_cross_entropy(hidden, head.weight, head.bias, target, reduction)
    logits, target = response_logits(net, batch, encoded)
    return torch.nn.functional.cross_entropy(logits.float(), target, ignore_index=IGNORE, reduction=reduction)


def loss(net, batch: dict[str, torch.Tensor], encoded: EncodedLM) -> torch.Tensor:
    """The mean cross-entropy of the response tokens: the model's own loss."""
    return response_cross_entropy(net, batch, encoded)


# ---- the LM head and its loss in one ------------------------------------------------------------------------

CHUNK_LOGITS = 1 << 24  # logits a chunk of `head_cross_entropy` holds: 64 MB in float32


def head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                       reduction: str = "mean") -> torch.Tensor:
    """cross_entropy(linear(hidden, weight, bias).float(), target), every target a real token, with the same
    arithmetic (the matmul in autocast's dtype, the softmax in float32), a chunk of rows at a time: the
    gradient (softmax − one-hot) is taken on the way, so the (tokens × vocabulary) logits never exist
    whole, in float32 or at all: on SmolLM2 (vocabulary 49,152), bf16, peak RSS 2.88 against 3.08 GB and
    the same speed (`scripts/bench_lever.py fused_head`); what it never holds grows with tokens × vocabulary."""
    inputs = (hidden, weight, bias)
    if not torch.is_grad_enabled() or not any(x is not None and x.requires_grad for x in inputs):
        return _chunked_cross_entropy(hidden, weight, bias, target, reduction, (False, False, False))[0]
    return _HeadCrossEntropy.apply(hidden, weight, bias, target, reduction)


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, reduction):
        loss, grads = _chunked_cross_entropy(hidden, weight, bias, target, reduction, ctx.needs_input_grad[:3])
        ctx.save_for_backward(*grads)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grads = [None if g is None else (g * grad_out).to(d) for g, d in zip(ctx.saved_tensors, ctx.dtypes)]
        return *grads, None, None


def _chunked_cross_entropy(hidden, weight, bias, target, reduction: str, want: tuple[bool, bool, bool]):
    """(the loss, [its gradient for hidden, weight, bias, each where `want` says, else None])."""
    device = hidden.device.type
    dtype = compute_dtype(hidden)
    exact = torch.promote_types(dtype, torch.float32)  # the softmax and the sums: float32 at least
    with torch.autocast(device, enabled=False):
        h, w = hidden.to(dtype), weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        grads = [torch.empty_like(h) if want[0] else None, torch.zeros_like(weight, dtype=exact) if want[1] else None,
                 torch.zeros_like(bias, dtype=exact) if want[2] else None]
        total = torch.zeros((), dtype=exact, device=hidden.device)
        rows = max(1, CHUNK_LOGITS // weight.shape[0])
        scale = 1.0 if reduction == "sum" else 1.0 / len(target)
        for i in range(0, len(target), rows):
            x, t = h[i : i + rows], target[i : i + rows]
            logits = torch.nn.functional.linear(x, w, b).to(exact)
            norm = torch.logsumexp(logits, dim=-1)
            total += (norm - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if not any(want):
                continue
            g = logits.sub_(norm[:, None]).exp_()  # softmax
            g[torch.arange(len(t), device=t.device), t] -= 1
            g = g.mul_(scale).to(dtype)  # scaled before rounding, as the unfused backward does
            if want[0]:
                grads[0][i : i + rows] = g @ w
            if want[1]:
                grads[1] += g.t() @ x
            if want[2]:
                grads[2] += g.sum(0)
    return total * scale, grads


# ---- evaluation -----------------------------------------------------------------------------------------------

@torch.no_grad()
def response_loss(accelerator, net, enc: EncodedLM, batch_size: int) -> tuple[float, int]:
    """(sum of the response tokens' cross-entropy, their count) over a split, across processes."""
    inner = accelerator.unwrap_model(net)
    was_training = inner.training
    inner.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for b in eval_batches(enc.lengths, batch_size)[accelerator.process_index :: accelerator.num_processes]:
        batch = to_device(enc.batch(b), accelerator.device)
        with accelerator.autocast():
            total[0] += response_cross_entropy(inner, batch, enc, reduction="sum").double()
        total[1] += len(batch["learned"])
    inner.train(was_training)
    if accelerator.num_processes > 1:
        total = accelerator.reduce(total, "sum")
    return total[0].item(), int(total[1].item())


def evaluate(accelerator, net, data: LMData, encoded: dict[str, EncodedLM], batch_size: int, show: int = 3) -> dict:
    """Per eval split: mean response-token loss and perplexity; with `dataset.metrics`, greedy replies
    to up to `generate_samples` prompts, scored. The score is the first of `dataset.metrics` (the others
    are reported beside it), or −loss when there are none (higher is better, as for every task)."""
    d = data.cfg
    per_split, samples = {}, {}
    for s in data.eval_splits:
        enc = encoded[s]
        loss_sum, n = response_loss(accelerator, net, enc, batch_size)
        loss = loss_sum / max(1, n)
        metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
        if data.metrics:
            k = len(enc.prompts) if d.get("generate_samples") is None else min(len(enc.prompts), d.generate_samples)
            replies = generation.generate(accelerator.unwrap_model(net), enc.tokenizer, enc.prompts[:k],
                                          d.max_new_tokens, batch_size, accelerator.device) if k else []
            metrics.update(generation.score_replies(data.metrics, replies, enc.golds[:k]))
            samples[s] = [{"prompt": enc.tokenizer.decode(p[-300:]), "reply": r, "gold": g}
                          for p, r, g in zip(enc.prompts[:show], replies[:show], enc.golds[:show])]
            if accelerator.is_main_process:
                for x, conv in zip(samples[s], data.splits[s]):
                    asked = " ".join(next(m["content"] for m in reversed(conv.prompt) if m["role"] == "user").split())
                    console.print(f"  [dim]{escape(asked[-70:])!r}[/] → {escape(x['reply'])!r} (gold {escape(str(x['gold']))!r})",
                                  highlight=False)
        per_split[s] = metrics
    first = data.metrics[0] if data.metrics else None  # the score: the first metric listed, over the eval splits
    score = float(np.mean([m[first] for m in per_split.values()])) if first else -float(np.mean([m["loss"] for m in per_split.values()]))
    return {"metrics": per_split, "score": score, "samples": samples}

