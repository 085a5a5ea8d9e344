"""Host reads of device values: what makes the host wait for a GPU.

Reading a value the device holds (`.item()`, `bool(t)`, a boolean mask's count, `nonzero`) waits for
every kernel queued before it. One read in a step is enough to keep the host from queueing the next
step (or the backward) while the GPU runs this one, so a step is host time plus GPU time instead of
the larger of the two. peftkit's training step on a GPU reads nothing: step losses are read once a log
window (`train.read_losses`), a causal LM's response positions come from the host with the batch
and packed rows' mask is built on the device (`tasks.causal_lm`), and attention masks are built
without asking whether they hold padding (`unread_sdpa_mask`). On CPU a read costs nothing, and
transformers' own checks stay.
"""

from __future__ import annotations

import collections
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SDPA = "peftkit_sdpa"  # transformers' SDPA attention, with `unread_sdpa_mask`

# aten ops whose result (or output size) needs a device value on the host
READING_OPS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
               "aten.is_nonzero.default", "aten.equal.default", "aten._unique2.default", "aten.unique_dim.default",
               "aten.unique_consecutive.default", "aten.repeat_interleave.Tensor", "aten.masked_scatter.default",
               "aten.masked_scatter_.default"}


def reads_are_free(device: torch.device | str) -> bool:
    """On CPU the host holds the values already: a read waits for nothing."""
    return torch.device(device).type == "cpu"


def unread_sdpa_mask(*args, **kwargs):
    """transformers' SDPA mask, except that off CPU a given padding mask is not first read to see
    whether it masks anything (to pass SDPA no mask at all): it is built as it is. A mask without
    padding then costs SDPA a masked kernel; a read would cost the step its overlap with the GPU."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    if kwargs.get("attention_mask") is not None and not reads_are_free(kwargs.get("device", "cpu")):
        kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    return ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](*args, **kwargs)


def register_attention(name: str, attention) -> None:
    """`name` as a transformers attention implementation: `attention` with `unread_sdpa_mask`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, unread_sdpa_mask)


def attend_without_reads(model: torch.nn.Module, device: torch.device) -> None:
    """Off CPU, a model attending with transformers' SDPA attends with `SDPA`: the same attention, its
    masks built without reading the padding."""
    config = getattr(model, "config", None)
    if reads_are_free(device) or getattr(config, "_attn_implementation", None) != "sdpa":
        return
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    register_attention(SDPA, sdpa_attention_forward)
    model.set_attn_implementation(SDPA)


class HostReads(TorchDispatchMode):
    """Counts the ops run inside it that read a value on `device` (`READING_OPS`, and indexing with a
    boolean mask), with where each was called from: `with HostReads(device) as reads: ...; reads.count`.
    On CPU it counts what would be a read on a GPU (tests switch `reads_are_free` off to check that path)."""

    def __init__(self, device: torch.device | str):
        super().__init__()
        self.device = torch.device(device)
        self.where: collections.Counter = collections.Counter()

    @property
    def count(self) -> int:
        return sum(self.where.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self._reads(str(func), args, kwargs or {}):
            frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename]
            self.where[f"{func} at " + " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in frames[::-1][:3])] += 1
        return func(*args, **(kwargs or {}))

    def _reads(self, name: str, args, kwargs) -> bool:
        boolean_index = name.startswith("aten.index") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for a in args if isinstance(a, (list, tuple)) for i in a)
        if name not in READING_OPS and not boolean_index:
            return False
        tensors = (t for a in (*args, *kwargs.values()) for t in (a if isinstance(a, (list, tuple)) else [a]))
        return any(isinstance(t, torch.Tensor) and t.device.type == self.device.type for t in tensors)
