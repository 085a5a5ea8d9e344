"""Images in class folders, and scikit-learn's 8×8 digits written out once in that layout.

`dataset=imagefolder dataset.path=DIR` reads the layout torchvision's ImageFolder and 🤗 datasets'
imagefolder read: one folder per class, named after it (`DIR/cat/1.jpg`, `DIR/dog/2.png`), or
`DIR/train/` and `DIR/val/` (or `validation/`) each holding such class folders. Without a dev
folder, `dev_fraction` of each class is dev, picked with `split_seed`. Every image a run uses is
decoded once while loading, so a broken file is one line naming it before anything is written.

`dataset=digits` writes the 1,797 digits (`sklearn.datasets.load_digits`, 10 classes) as PNG
class folders under the peftkit cache, once, and reads them back through the imagefolder loader:
the path a user's own images take.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from peftkit.data import TaskData
from peftkit.errors import UserError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
DEV_FOLDERS = ("val", "validation")
METRICS = ("accuracy", "macro_f1")
LAYOUT = "one folder of images per class (DIR/cat/1.jpg, DIR/dog/2.png), or DIR/train/ and DIR/val/ holding such folders"


@dataclass
class ImageSplit:
    """One split: image files, their class ids, and ids (the file's path under the dataset folder)."""

    paths: list[Path]
    labels: list[int]
    ids: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def head(self, n: int | None) -> ImageSplit:
        if n is None or n >= len(self):
            return self
        return ImageSplit(self.paths[:n], self.labels[:n], self.ids[:n])

    def subset(self, rows) -> ImageSplit:
        return ImageSplit([self.paths[i] for i in rows], [self.labels[i] for i in rows], [self.ids[i] for i in rows])


def read_image(path: Path, where: str = "dataset"):
    """The image as RGB (grayscale, palette and RGBA images converted), or one line naming the file."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
        why = " ".join(str(e).replace(f" {str(path)!r}", "").split())  # PIL's message names the file again
        raise UserError(f"{where}: cannot read image {path} ({why}); fix or remove that file") from None


def load(cfg: DictConfig, splits: tuple[str, ...] = ("train", "validation")) -> TaskData:
    """The splits a run needs; `max_train_samples` / `max_eval_samples` keep the first N of each split's
    seeded shuffle (a sample of every class, not the first class folders)."""
    if "test" in splits:
        raise UserError(f"dataset={cfg.name} has no test split here; score the dev split with peftkit eval run=DIR (split=validation)")
    if cfg.name == "digits":
        root, where, name = digits_folder(), "dataset=digits", "digits"
    elif cfg.name == "imagefolder":
        if not cfg.get("path"):
            raise UserError(f"dataset=imagefolder needs dataset.path=DIR: {LAYOUT}")
        root, where = Path(cfg.path).expanduser(), f"dataset.path={cfg.path}"
        name = root.resolve().name
    else:
        raise UserError(f"unknown image dataset '{cfg.name}'; choose imagefolder or digits")
    label_names, parts = _layout(root, where)
    train_files = _files(parts["train"], label_names, where, root)
    if parts.get("validation") is not None:
        dev_classes = _class_folders(parts["validation"])
        extra = [c for c in dev_classes if c not in label_names]
        if extra:
            raise UserError(f"{where}: {parts['validation']} has class folder(s) {extra} that {parts['train']} lacks; "
                            f"give every class train images, or remove those folders")
        out = {"train": train_files, "validation": _files(parts["validation"], dev_classes, where, root, label_names)}
    else:
        train_rows, dev_rows = stratified_split(train_files.labels, cfg.dev_fraction, cfg.split_seed, where)
        out = {"train": train_files.subset(train_rows), "validation": train_files.subset(dev_rows)}
    limits = {"train": cfg.get("max_train_samples"), "validation": cfg.get("max_eval_samples")}
    kept = {}
    for s in splits:
        order = np.random.default_rng(cfg.split_seed).permutation(len(out[s]))
        kept[s] = out[s].subset(order).head(limits[s])
        for p in kept[s].paths:  # decoded once now: a broken file stops the run before it writes anything
            read_image(p, where)
    return TaskData(cfg.name, name, label_names, METRICS, kept)


def _layout(root: Path, where: str) -> tuple[list[str], dict[str, Path | None]]:
    """The class names (train's class folders, sorted) and the train and dev folders (None: carve dev)."""
    if not root.is_dir():
        what = "is a file" if root.exists() else "does not exist"
        raise UserError(f"{where}: {root} {what}; set dataset.path=DIR to a folder holding {LAYOUT}")
    train, dev = root / "train", [root / d for d in DEV_FOLDERS if (root / d).is_dir()]
    if len(dev) > 1:
        raise UserError(f"{where}: {root} holds both val/ and validation/; keep one dev folder")
    if not train.is_dir():
        if dev:
            raise UserError(f"{where}: {root} holds {dev[0].name}/ but no train/; add train/ with the class folders, "
                            f"or put the class folders directly in {root}")
        train = root
    classes = _class_folders(train)
    if not classes:
        raise UserError(f"{where}: {train} holds no class folders; expected {LAYOUT}")
    if len(classes) < 2:
        raise UserError(f"{where}: {train} holds one class folder ({classes[0]}) and classification needs at least two; "
                        f"add a folder of images for each other class")
    return classes, {"train": train, "validation": dev[0] if dev else None}


def _class_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _files(folder: Path, classes: list[str], where: str, root: Path, label_names: list[str] | None = None) -> ImageSplit:
    """Every image file under each class folder (sub-folders too, hidden files not), sorted."""
    index = {c: i for i, c in enumerate(label_names or classes)}
    paths, labels = [], []
    for c in classes:
        found = sorted(p for p in (folder / c).rglob("*")
                       if p.suffix.lower() in EXTENSIONS and p.is_file() and not p.name.startswith("."))
        if not found:
            raise UserError(f"{where}: class folder {folder / c} holds no images ({', '.join(e[1:] for e in EXTENSIONS)}); "
                            f"add images or remove the folder")
        paths += found
        labels += [index[c]] * len(found)
    return ImageSplit(paths, labels, [p.relative_to(root).as_posix() for p in paths])


def stratified_split(labels: list[int], fraction: float, seed: int, where: str) -> tuple[list[int], list[int]]:
    """(train rows, dev rows): round(fraction × images) for dev (at least one), shared out over the classes in
    proportion to their sizes (largest remainders first), each class keeping an image to train on; the
    images of each class picked with `seed`."""
    labels_np = np.asarray(labels)
    classes, counts = np.unique(labels_np, return_counts=True)
    n = len(labels_np)
    total = min(n - len(classes), max(1, round(n * fraction)))
    if total < 1:
        raise UserError(f"{where}: {n} images in {len(classes)} classes leave none for dev once each class keeps one to train on; "
                        f"add images, or give a val/ folder")
    quota = counts * total / n
    take = np.floor(quota).astype(int)
    take[np.argsort(-(quota - take), kind="stable")[: total - take.sum()]] += 1
    take = np.minimum(take, counts - 1)
    rng = np.random.default_rng(seed)
    dev: list[int] = []
    for c, k in zip(classes, take):
        dev += rng.permutation(np.flatnonzero(labels_np == c))[:k].tolist()
    chosen = set(dev)
    return [i for i in range(n) if i not in chosen], sorted(dev)


# ---- the digits ------------------------------------------------------------------------------------------

DIGITS = 1797


def digits_folder() -> Path:
    """`<peftkit cache>/datasets/digits`: class folders 0..9 of 8×8 grayscale PNGs named by their row
    in `load_digits` (0000.png ...), written once (atomically: a reader never sees a partial set)."""
    from peftkit.backbone import models_cache

    out = models_cache().parent / "datasets" / "digits"
    if out.is_dir() and sum(1 for _ in out.glob("*/*.png")) == DIGITS:
        return out
    from PIL import Image
    from sklearn.datasets import load_digits

    from peftkit.files import atomic_dir

    digits = load_digits()
    pixels = np.rint(digits.images * (255 / 16)).astype(np.uint8)  # 0..16 gray levels as 0..255
    with atomic_dir(out) as tmp:
        for c in range(10):
            (tmp / str(c)).mkdir()
        for i, (image, c) in enumerate(zip(pixels, digits.target)):
            Image.fromarray(image).save(tmp / str(c) / f"{i:04d}.png")
    return out
