"""Sequence classification and regression (GLUE, your labelled files): a fresh head on the
backbone, cross-entropy (or MSE for one score), GLUE metrics on the dev split."""

from __future__ import annotations

from omegaconf import DictConfig
from torch import nn

from peftkit import backbone, cpu, data
from peftkit.data.batching import Encoded
from peftkit.evaluation.scoring import score

NAME = "classification"


def load_data(dataset_cfg: DictConfig, splits: tuple[str, ...] = ("train", "validation")) -> data.TaskData:
    return data.load(dataset_cfg, splits)


def load_processor(backbone_cfg: DictConfig):
    return backbone.load_tokenizer(backbone_cfg)


def load_model(backbone_cfg: DictConfig, label_names: list[str] | None):
    """`*ForSequenceClassification` with a head for the labels (one output for regression)."""
    if label_names is None:
        return backbone.load_model(backbone_cfg, 1, "regression")
    return backbone.load_model(backbone_cfg, len(label_names), "single_label_classification", label_names)


def loss(net, batch, encoded: Encoded):
    """The model's own loss (cross-entropy, or MSE for regression) for its head."""
    return net(**batch).loss


def encode(task: data.TaskData, tokenizer, cfg: DictConfig) -> dict[str, Encoded]:
    regression = task.label_names is None
    return {s: Encoded(split, tokenizer, cfg.backbone.max_length, float_labels=regression) for s, split in task.splits.items()}


def evaluate(accelerator, net, task: data.TaskData, encoded: dict[str, Encoded], batch_size: int) -> dict:
    return score(accelerator, net, task, encoded, batch_size)


# ---- the last layer on the first position only ---------------------------------------------------------------

FIRST_POSITION_HEADS = ("bert", "roberta", "xlm-roberta", "camembert", "electra")  # their classifiers read position 0


def skip_unread_positions(model: nn.Module, method) -> bool:
    """Run the last encoder layer on the first position only, where the model's classifier reads it
    (BERT's pooler, RoBERTa's and ELECTRA's heads take `[:, 0]`): its keys and values still come from
    every position, its query, attention output and feed-forward from one. The logits and gradients
    are the same (tests/tasks/test_classification_first_position.py); the work saved is about 10/12
    of one layer's matmuls per position (a sixth of MiniLM's): 1.08× a bf16 SST-2 step
    (`scripts/bench_lever.py first_position`). Only for methods that act on each
    position alone (`Method.positionwise`) and BERT-style layers; anything else runs whole.
    Returns whether it applies."""
    config = getattr(model, "config", None)
    if (not getattr(method, "positionwise", False) or not type(model).__name__.endswith("ForSequenceClassification")
            or getattr(config, "model_type", None) not in FIRST_POSITION_HEADS or config.is_decoder
            or getattr(config, "add_cross_attention", False) or getattr(config, "chunk_size_feed_forward", 0)):
        return False
    layers = getattr(getattr(model.base_model, "encoder", None), "layer", None)
    last = layers[-1] if isinstance(layers, nn.ModuleList) and len(layers) else None
    attention = getattr(getattr(last, "attention", None), "self", None)
    if (attention is None or not hasattr(last, "feed_forward_chunk") or not hasattr(last.attention, "output")
            or not all(hasattr(attention, a) for a in ("query", "key", "value", "attention_head_size", "scaling", "dropout"))):
        return False
    cls = type(last)  # a subclass with the forward below, not a bound method on the instance: that would
    if cls.__name__.startswith("FirstPosition"):  # make a reference cycle and keep a dropped model alive
        return True
    last.__class__ = _FIRST_POSITION.setdefault(cls, type(f"FirstPosition{cls.__name__}", (cls,), {"forward": _first_position_forward}))
    return True


_FIRST_POSITION: dict[type, type] = {}


def _first_position_forward(self, hidden_states, attention_mask=None, *args, **kwargs):
    """A BERT-style layer's forward for position 0 of each row (`skip_unread_positions`). One query
    a row: its attention is a weighted sum written out (no batched matmul, whose per-shape kernels
    would be built for every new sequence length), with the model's mask and attention dropout."""
    attn = self.attention.self
    rows, length = hidden_states.shape[:2]
    first = hidden_states[:, 0]  # 2-D throughout: a (rows, 1, dim) input that needs a gradient makes
    # torch.matmul broadcast the weight to every row (a bmm on a copied (rows, dim, dim) weight)
    query = attn.query(first).view(rows, -1, 1, attn.attention_head_size)  # (rows, heads, 1, head size)
    key = attn.key(hidden_states).view(rows, length, -1, attn.attention_head_size).transpose(1, 2)
    value = attn.value(hidden_states).view(rows, length, -1, attn.attention_head_size).transpose(1, 2)
    scores = (key * query).sum(-1) * attn.scaling  # (rows, heads, length)
    mask = attention_mask[:, :, 0, :length] if attention_mask is not None and attention_mask.dim() == 4 else attention_mask
    probs = cpu.attention_probs(scores, mask, attn.dropout.p if attn.training else 0.0, value.dtype)
    context = (probs.unsqueeze(-1) * value).sum(2)  # (rows, heads, head size)
    attention_output = self.attention.output(context.reshape(rows, -1), first)
    return self.feed_forward_chunk(attention_output).unsqueeze(1)
