"""Image classification (your class folders, the digits): `AutoModelForImageClassification` with a
fresh head for the labels, images preprocessed by the model folder's own image processor, the
model's cross-entropy, accuracy and macro-F1 on the dev split (the score: accuracy).

Methods that act on token embeddings or a text model's KV cache and attention mask have nothing
to attach to in a model that takes `pixel_values`: they are refused before anything loads
(`UNSUPPORTED`), with the reason.
"""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import DictConfig

from peftkit import backbone
from peftkit.data import TaskData, images
from peftkit.data.images import ImageSplit, read_image
from peftkit.errors import UserError
from peftkit.evaluation.scoring import score

NAME = "image_classification"
TOKENS = False  # an image is no sequence of tokens: runs report images/s, not tokens/s

UNSUPPORTED = {
    "prompt_tuning": "it prepends trained vectors to the token embeddings of input_ids, and an image model takes pixel_values",
    "prefix_tuning": "its prefixes reach attention as a text model's KV cache, which image encoders (ViT, DINOv2, CLIP) do not take",
    "loreft": "it finds the tokens it edits from a text model's input_ids and attention mask, which an image model is not given",
    "llama_adapter": "it adapts decoder attention (Llama, Mistral, Qwen2: rotary positions, a decoder layer's call), "
                     "not an image encoder's",
}


def load_data(dataset_cfg: DictConfig, splits: tuple[str, ...] = ("train", "validation")) -> TaskData:
    return images.load(dataset_cfg, splits)


def load_processor(backbone_cfg: DictConfig):
    """The model folder's image processor (`preprocessor_config.json`): resize, rescale and normalise
    as the model was pretrained."""
    import transformers
    from transformers import AutoImageProcessor

    transformers.logging.set_verbosity_error()  # "no torchvision: the PIL backend" is no news to a user
    backbone.check(backbone_cfg)
    path = backbone.resolve_path(backbone_cfg)
    try:
        return AutoImageProcessor.from_pretrained(path, trust_remote_code=bool(backbone_cfg.get("trust_remote_code")))
    except (OSError, ValueError) as e:
        raise UserError(f"backbone {backbone_cfg.name} ({path}) has no image processor ({' '.join(str(e).split())[:160]}); "
                        f"an image dataset needs an image model folder saved with its image processor "
                        f"(preprocessor_config.json), e.g. ViT, DINOv2 or CLIP") from None


def load_model(backbone_cfg: DictConfig, label_names: list[str]):
    """`*ForImageClassification` with a head for the labels. A checkpoint's own classifier of another
    size (ImageNet's 1,000 classes) is replaced by a fresh one; one of the same size starts the head."""
    from transformers import AutoConfig, AutoModelForImageClassification
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
    )

    backbone.check(backbone_cfg)
    path = backbone.resolve_path(backbone_cfg)
    config = AutoConfig.from_pretrained(path, trust_remote_code=bool(backbone_cfg.get("trust_remote_code")))
    model_type = config.model_type
    if model_type not in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES and \
            "AutoModelForImageClassification" not in (getattr(config, "auto_map", None) or {}):
        hint = (f" (a '{model_type}' folder holds a vision tower alone: save the whole model, e.g. CLIPModel rather "
                f"than CLIPVisionModel)" if model_type.endswith("_vision_model") else "")
        raise UserError(f"backbone {backbone_cfg.name} ({path}) is a '{model_type}' model, for which transformers has no image "
                        f"classifier (AutoModelForImageClassification){hint}; use an image model folder such as ViT, DINOv2 or CLIP")
    return backbone._load(backbone_cfg, AutoModelForImageClassification, load_kwargs={"ignore_mismatched_sizes": True},
                          num_labels=len(label_names), problem_type="single_label_classification",
                          id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)})


class EncodedImages:
    """A split as the trainer batches it: each batch's images are read and preprocessed when it is
    drawn, so no split is held in memory as pixels. Every image becomes the same `pixel_values`
    shape, so each counts 1 in `lengths` (nothing to group by length)."""

    def __init__(self, split: ImageSplit, processor):
        self.paths, self.labels, self.ids = split.paths, split.labels, split.ids
        self.processor = processor
        self.lengths = [1] * len(split.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def batch(self, idx: list[int]) -> dict[str, torch.Tensor]:
        pixels = self.processor(images=[read_image(self.paths[i]) for i in idx], return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels, "labels": torch.tensor([self.labels[i] for i in idx], dtype=torch.long)}


def encode(data: TaskData, processor, cfg: DictConfig) -> dict[str, EncodedImages]:
    return {s: EncodedImages(split, processor) for s, split in data.splits.items()}


def loss(net, batch, encoded: EncodedImages):
    """The model's own cross-entropy for its head."""
    return net(**batch).loss


def evaluate(accelerator, net, data: TaskData, encoded: dict[str, EncodedImages], batch_size: int) -> dict:
    """Accuracy and macro-F1 per eval split (as classification scores them); the score is the accuracy."""
    result = score(accelerator, net, data, encoded, batch_size)
    result["score"] = float(np.mean([m["accuracy"] for m in result["metrics"].values()]))
    return result


def probe(processor) -> dict[str, torch.Tensor]:
    """Two fixed images (colour ramps and seeded noise) as the model takes them: what a merge's logits are checked on."""
    from PIL import Image

    ramp = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (32, 1))
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    pictures = [Image.fromarray(np.stack([ramp, ramp.T, 255 - ramp], axis=-1)), Image.fromarray(noise)]
    return {"pixel_values": processor(images=pictures, return_tensors="pt")["pixel_values"]}
