"""Scoring generated replies: batched greedy decoding (KV cache, left padding) and the metrics.

Metrics, each in points (×100) over the replies scored:
  exact_match    the reply equals the gold text after normalising (case, punctuation, articles, spaces)
  numeric        the last number of the reply (commas removed) is within 0.001 of the gold number
                 (the LLM-Adapters rule for AddSub, MultiArith, SingleEq, GSM8K)
  answer_format  the reply states "The answer is N" (how often the answer format was learned)
  choice         the first letter A–E of the reply is the gold letter
  rougeL         ROUGE-L F1 (Google's rouge-score)
"""

from __future__ import annotations

import re
import string
from contextlib import nullcontext

import torch

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def normalize(text: str) -> str:
    text = text.lower().strip()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _exact_match(reply: str, gold: str) -> float:
    return float(normalize(reply) == normalize(gold))


def last_number(text: str) -> float | None:
    found = NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


def _numeric(reply: str, gold: str) -> float:
    pred, want = last_number(reply), last_number(str(gold))
    return float(pred is not None and want is not None and abs(pred - want) <= 1e-3)


def _answer_format(reply: str, gold: str) -> float:
    return float(re.search(r"the answer is\s*:?\s*\$?-?\d", reply.replace(",", ""), re.IGNORECASE) is not None)


def _choice(reply: str, gold: str) -> float:
    found = re.search(r"[A-E]", reply)
    return float(found is not None and found.group(0) == str(gold).strip()[:1].upper())


def _rouge_l(reply: str, gold: str) -> float:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"]).score(gold, reply)["rougeL"].fmeasure


METRICS = {"exact_match": _exact_match, "numeric": _numeric, "answer_format": _answer_format,
           "choice": _choice, "rougeL": _rouge_l}


def score_replies(names: tuple[str, ...], replies: list[str], golds: list[str]) -> dict[str, float]:
    return {n: 100.0 * sum(METRICS[n](r, g) for r, g in zip(replies, golds)) / max(1, len(replies)) for n in names}


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
             device: torch.device | str = "cpu", streamer=None, per_batch=None) -> list[str]:
    """Greedy replies to token-id prompts, decoded without special tokens; batches of similar
    length, left-padded, decoded with the KV cache.

    `per_batch(indices)`: a context manager each batch is generated in, given the batch's prompt
    indices in row order (a mixed-adapter model sets each row's adapter there: `serve.Mixed.use`)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    replies: dict[int, str] = {}
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        with per_batch(idx) if per_batch is not None else nullcontext():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                                 do_sample=False, num_beams=1, use_cache=True, pad_token_id=pad,
                                 eos_token_id=tokenizer.eos_token_id, streamer=streamer)
        for row, i in enumerate(idx):
            replies[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
    model.train(was_training)
    return [replies[i] for i in range(len(prompts))]
