"""Image classification: class folders and the digits as data, tiny random ViT, DINOv2 and CLIP
image models (saved with their image processors) as backbones, trained, re-scored, merged and
compared through the CLI as users run them; every method on a tiny ViT trains and reloads
bit-exactly, or is refused before anything loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _train_helpers import check, cli
from conftest import ROOT
from methods._helpers import with_sources
from omegaconf import OmegaConf

from peftkit.data import images
from peftkit.errors import UserError
from peftkit.methods import METHODS
from peftkit.tasks import image_classification
from peftkit.evaluation.report import FINISHED  # ok, or collapsed (tiny random models often predict one class)

LABELS = ["a", "b", "c"]


def make_image_model(out, arch: str, seed: int = 0):
    """A 2-layer, hidden-32 image model with random weights for 32×32 images (8×8 patches), saved
    with its image processor: what `backbone.path` points at."""
    from transformers import (
        BitImageProcessor,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        Dinov2Config,
        Dinov2Model,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    torch.manual_seed(seed)
    small = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
    crop = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}
    if arch == "vit":
        ViTModel(ViTConfig(**small, intermediate_size=64)).save_pretrained(out)
        ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
    elif arch == "dinov2":
        Dinov2Model(Dinov2Config(**small, mlp_ratio=2)).save_pretrained(out)
        BitImageProcessor(**crop).save_pretrained(out)
    else:  # CLIPForImageClassification reads a whole CLIP model's folder (its vision tower; the text tower is unused)
        text = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 64, "vocab_size": 64,
                "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
        CLIPModel(CLIPConfig(text_config=text, vision_config={**small, "intermediate_size": 64}, projection_dim=16)).save_pretrained(out)
        CLIPImageProcessor(**crop).save_pretrained(out)
    return out


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread, as the CLI runs here (`_train_helpers.THREADS`): on busy shared cores torch's
    default pool makes a tiny model's step many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("image_models")
    return {arch: make_image_model(root / arch, arch) for arch in ("vit", "dinov2", "clip")}


def write_images(folder, n: int, colour: tuple[int, int, int], fmt: str = "png", seed: int = 0):
    """n noisy images of one colour: classes a model can tell apart."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = np.clip(np.array(colour) + rng.normal(0, 30, (12, 12, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.{fmt}")


def cfg_of(name: str, **values) -> OmegaConf:
    cfg = OmegaConf.load(ROOT / "configs" / "dataset" / f"{name}.yaml")
    for k, v in values.items():
        cfg[k] = v
    return cfg


# ---- imagefolder -----------------------------------------------------------------------------------------

def test_class_folders_give_a_seeded_stratified_dev_split_of_rgb_images(tmp_path):
    from PIL import Image

    root = tmp_path / "shapes"
    write_images(root / "b", 10, (0, 0, 255), "jpg")
    write_images(root / "a", 10, (255, 0, 0), "png")
    write_images(root / "c", 5, (0, 255, 0), "webp")
    for mode, fmt in (("L", "bmp"), ("P", "gif"), ("RGBA", "png"), ("RGB", "JPEG")):  # every format and mode converts to RGB
        Image.new(mode, (9, 7)).save(root / "c" / f"more_{mode}.{fmt.lower()}", format=fmt if fmt != "bmp" else "BMP")
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "a" / ".hidden.png").write_bytes(b"")
    data = images.load(cfg_of("imagefolder", path=str(root), dev_fraction=0.2))
    assert data.label_names == LABELS and data.task == "shapes" and data.metrics == ("accuracy", "macro_f1")
    train, dev = data.splits["train"], data.splits["validation"]
    per_class = lambda s: np.bincount(s.labels, minlength=3).tolist()
    assert per_class(dev) == [2, 2, 2] and per_class(train) == [8, 8, 7]  # 20% of each class
    assert not set(train.ids) & set(dev.ids) and len(train) + len(dev) == 29
    assert images.read_image(dev.paths[0]).mode == "RGB"
    again = images.load(cfg_of("imagefolder", path=str(root), dev_fraction=0.2))
    assert again.splits["validation"].ids == dev.ids  # seeded
    other = images.load(cfg_of("imagefolder", path=str(root), dev_fraction=0.2, split_seed=1))
    assert other.splits["validation"].ids != dev.ids
    few = images.load(cfg_of("imagefolder", path=str(root), max_train_samples=6, max_eval_samples=3))
    assert len(few.splits["train"]) == 6 and len(few.splits["validation"]) == 3
    assert len(set(few.splits["train"].labels)) > 1  # a seeded sample, not the first class folder


def test_train_and_val_folders_are_the_splits(tmp_path):
    root = tmp_path / "split"
    for c, colour in zip(LABELS, [(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        write_images(root / "train" / c, 4, colour)
    write_images(root / "validation" / "b", 3, (0, 255, 0))  # a class may be missing from dev
    data = images.load(cfg_of("imagefolder", path=str(root)))
    assert data.label_names == LABELS and len(data.splits["train"]) == 12
    assert data.splits["validation"].labels == [1, 1, 1]
    assert sorted(data.splits["validation"].ids) == [f"validation/b/{i:03d}.png" for i in range(3)]
    assert set(images.load(cfg_of("imagefolder", path=str(root)), splits=("validation",)).splits) == {"validation"}


def _bad_folders(tmp_path):
    ok_classes = lambda root: [write_images(root / c, 3, (9, 9, 9)) for c in ("a", "b")]
    (tmp_path / "empty").mkdir()
    (tmp_path / "files_only").mkdir()
    write_images(tmp_path / "files_only", 2, (0, 0, 0))
    ok_classes(tmp_path / "no_images")
    (tmp_path / "no_images" / "c").mkdir()
    (tmp_path / "no_images" / "c" / "readme.txt").write_text("x")
    ok_classes(tmp_path / "broken")
    (tmp_path / "broken" / "b" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    write_images(tmp_path / "one_class" / "a", 3, (0, 0, 0))
    ok_classes(tmp_path / "extra_dev" / "train")
    write_images(tmp_path / "extra_dev" / "val" / "z", 2, (0, 0, 0))
    ok_classes(tmp_path / "two_dev" / "train")
    ok_classes(tmp_path / "two_dev" / "val")
    ok_classes(tmp_path / "two_dev" / "validation")


BAD = [
    ("missing", "does not exist; set dataset.path=DIR"),
    ("empty", "holds no class folders"),
    ("files_only", "holds no class folders"),
    ("no_images", "class folder .*/no_images/c holds no images"),
    ("broken", "cannot read image .*/broken/b/bad.png"),
    ("one_class", "one class folder \\(a\\) and classification needs at least two"),
    ("extra_dev", "has class folder\\(s\\) \\['z'\\] that .* lacks"),
    ("two_dev", "holds both val/ and validation/"),
]


@pytest.mark.parametrize("folder,message", BAD)
def test_bad_image_folders_are_one_line_naming_what_to_fix(folder, message, tmp_path):
    _bad_folders(tmp_path)
    with pytest.raises(UserError, match=message) as e:
        images.load(cfg_of("imagefolder", path=str(tmp_path / folder)))
    assert "\n" not in str(e.value) and f"dataset.path={tmp_path / folder}" in str(e.value)


def test_bad_data_through_the_cli_exits_2_and_writes_nothing(tmp_path, models):
    _bad_folders(tmp_path)
    cases = [(f"dataset.path={tmp_path / 'broken'}", "cannot read image"), ("dataset.path=null", "needs dataset.path=DIR"),
             ("dataset.dev_fraction=1.5", "dataset.dev_fraction=1.5: expected a fraction in (0, 1)")]
    for i, (override, message) in enumerate(cases):
        run = tmp_path / f"run{i}"
        proc = cli("train", "dataset=imagefolder", override, *([f"dataset.path={tmp_path / 'no_images'}"] if "path" not in override else []),
                   f"backbone.path={models['vit']}", f"hydra.run.dir={run}", cwd=tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and message in lines[-1] and lines[-1].startswith("peftkit: error:"), proc.stderr[-2000:]
        assert not run.exists()


# ---- the digits -------------------------------------------------------------------------------------------

def test_digits_are_written_once_as_png_class_folders_and_read_as_an_imagefolder(tmp_path):
    from PIL import Image
    from sklearn.datasets import load_digits

    folder = images.digits_folder()
    assert sorted(p.name for p in folder.iterdir()) == [str(c) for c in range(10)]
    files = sorted(folder.glob("*/*.png"))
    assert len(files) == images.DIGITS == 1797
    digits = load_digits()
    for i in (0, 1000, 1796):
        f = folder / str(digits.target[i]) / f"{i:04d}.png"
        assert np.array_equal(np.asarray(Image.open(f)), np.rint(digits.images[i] * 255 / 16).astype(np.uint8))
    stamp = files[0].stat().st_mtime_ns
    assert images.digits_folder() == folder and files[0].stat().st_mtime_ns == stamp  # not written again

    data = images.load(cfg_of("digits"))
    assert data.label_names == [str(c) for c in range(10)] and data.task == "digits"
    assert (len(data.splits["train"]), len(data.splits["validation"])) == (1438, 359)
    dev_share = np.bincount(data.splits["validation"].labels) / np.bincount(digits.target)
    assert dev_share.min() > 0.19 and dev_share.max() < 0.21  # 20% of each digit


# ---- runs through the CLI ---------------------------------------------------------------------------------

RUN = ["dataset=digits", "dataset.max_train_samples=96", "dataset.max_eval_samples=40", "trainer.batch_size=16",
       "trainer.max_steps=4", "trainer.eval_every=2", "trainer.log_every=1", "trainer.lr=5e-3", "seed=0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, models):
    """recipe=digits_lora (LoRA on q_proj, v_proj) on each tiny image model."""
    root = tmp_path_factory.mktemp("image_runs")
    out = {}
    for arch, path in models.items():
        out[arch] = root / arch
        check(cli("train", "recipe=digits_lora", f"backbone.path={path}", *RUN, f"hydra.run.dir={out[arch]}", cwd=root))
    return root, out


@pytest.mark.parametrize("arch", ["vit", "dinov2", "clip"])
def test_lora_trains_on_each_image_model(arch, runs):
    _, out = runs
    report = json.loads((out[arch] / "eval" / "report.json").read_text())
    assert report["status"] in FINISHED and report["task"] == "digits" and report["total_steps"] == 4
    metrics = report["metrics"]["validation"]
    assert set(metrics) == {"accuracy", "macro_f1"} and report["score"] == metrics["accuracy"]
    assert "tokens_per_s" not in report and report["samples_per_s"] > 0  # an image has no tokens
    meta = json.loads((out[arch] / "adapter" / "adapter_config.json").read_text())
    assert meta["task_type"] == "image_classification" and meta["label_names"] == [str(c) for c in range(10)]
    assert meta["head"] == ["classifier"] and all(t.endswith(("q_proj", "v_proj")) for t in meta["method"]["target_modules"])
    config = OmegaConf.load(out[arch] / "config.yaml")
    assert config.dataset.task == "image_classification" and config.backbone.name == "vit-base"


def test_eval_reproduces_the_training_scores(runs):
    root, out = runs
    before = json.loads((out["vit"] / "eval" / "report.json").read_text())
    proc = cli("eval", f"run={out['vit']}", cwd=root)
    check(proc)
    assert "reproduces the training-time scores exactly" in proc.stdout
    assert json.loads((out["vit"] / "eval" / "report.json").read_text())["metrics"] == before["metrics"]


def test_report_ranks_the_image_runs(runs):
    root, _ = runs
    check(cli("report", str(root), f"out={root / 'board'}", cwd=root))
    board = json.loads((root / "board" / "leaderboard" / "leaderboard.json").read_text())
    assert board["tasks"] == ["digits"] and sum(r["scores"]["digits"]["n"] for r in board["rows"]) == 3


@pytest.mark.parametrize("arch", ["vit", "clip"])
def test_merge_into_base_is_a_plain_image_classifier_with_the_same_logits(arch, runs, models):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from peftkit import model

    root, out = runs
    merged = root / f"merged_{arch}"
    check(cli("merge", f"adapter={out[arch]}", f"out={merged}", cwd=root))
    names = {p.name for p in merged.iterdir()}
    assert "preprocessor_config.json" in names and not {"tokenizer.json", "tokenizer_config.json", "vocab.txt"} & names
    plain = AutoModelForImageClassification.from_pretrained(merged).eval()
    assert plain.config.id2label[3] == "3"
    batch = image_classification.probe(AutoImageProcessor.from_pretrained(merged))
    a, _ = model.from_adapter(out[arch] / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, a.model.eval()(**batch).logits, atol=1e-5, rtol=1e-5)
    assert "AutoModelForImageClassification.from_pretrained" in (merged / "README.md").read_text()
    if arch == "vit":  # peft has no task type for image classifiers: a clear refusal, nothing written
        proc = cli("merge", "mode=to_peft", f"adapter={out[arch]}", f"out={root / 'peft'}", cwd=root)
        assert proc.returncode == 2 and "image classifier" in proc.stderr and not (root / "peft").exists()


def test_a_text_model_or_a_vision_tower_alone_is_one_line(tmp_path, tiny_bert):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    tower = tmp_path / "tower"
    CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64)).save_pretrained(tower)
    make_image_model(tmp_path / "vit", "vit")
    (tmp_path / "vit" / "preprocessor_config.json").rename(tower / "preprocessor_config.json")
    for path, message in [(tiny_bert, "has no image processor"), (tower, "'clip_vision_model' model, for which transformers has no image classifier")]:
        proc = cli("train", "dataset=digits", f"backbone.path={path}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
        assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
        assert not (tmp_path / "run").exists()


# ---- every method on a tiny ViT -----------------------------------------------------------------------------

# ViT's layers (transformers 5) for the roles methods target by default, found by peftkit's role inference
VIT_ROLES = {"query": "attention.q_proj", "key": "attention.k_proj", "value": "attention.v_proj", "attn_out": "attention.o_proj",
             "ffn_in": "mlp.fc1", "ffn_out": "mlp.fc2"}


@pytest.mark.parametrize("name", sorted(set(METHODS) - set(image_classification.UNSUPPORTED)))
def test_every_other_method_trains_reloads_and_merges_on_a_tiny_vit(name, models, tmp_path):
    """With its shipped YAML defaults: methods that target layers by role find ViT's own."""
    from transformers import AutoModelForImageClassification

    from peftkit import adapter, model
    from peftkit.merge import into_base

    bb = OmegaConf.load(ROOT / "configs" / "backbone" / "vit-base.yaml")
    bb.path = str(models["vit"])
    torch.manual_seed(0)
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "method" / f"{name}.yaml"))
    cfg = with_sources(name, cfg, bb, tmp_path, LABELS, image_classification.NAME)  # composition: two made-up sources
    torch.manual_seed(0)
    a = model.build(bb, cfg, LABELS, image_classification.NAME)
    targets = getattr(a.method.cfg, "target_modules", None)
    if METHODS[name].default_roles and targets is not None:
        want = {f"vit.layers.{i}.{VIT_ROLES[r]}" for r in METHODS[name].default_roles if r in VIT_ROLES for i in (0, 1)}
        assert set(targets) == want
    g = torch.Generator().manual_seed(0)
    batch = {"pixel_values": torch.randn(6, 3, 32, 32, generator=g), "labels": torch.tensor([0, 1, 2, 0, 1, 2])}
    own = [n for n in a.trainable if n in dict(a.model.named_parameters()) and not n.startswith("classifier.")]
    assert own or name == "head", f"{name} trains nothing of its own"
    before = {n: p.detach().clone() for n, p in a.model.named_parameters() if n in own}
    # hyperformer at its own lr: a step moves a generated weight up to 0.8·√P times lr (docs/methods.md);
    # at 1e-2 its loss oscillates on these random images
    lr = 1e-3 if name == "hyperformer" else 1e-2
    opt = torch.optim.AdamW([p for p in a.model.parameters() if p.requires_grad], lr=lr)
    a.model.eval()  # no dropout: a deterministic loss
    losses = []
    for _ in range(6):
        loss = image_classification.loss(a.model, batch, None)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert not own or any(not torch.equal(p, before[n]) for n, p in a.model.named_parameters() if n in own), f"{name}: nothing moved"

    inputs = {"pixel_values": batch["pixel_values"]}
    with torch.no_grad():
        expected = a.model(**inputs).logits
    adapter.save(tmp_path / "adapter", a.model, a.trainable, model.meta(a, bb, LABELS, "digits", image_classification.NAME))
    b, _ = model.from_adapter(tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(b.model.eval()(**inputs).logits, expected)  # bit-exact reload
    if METHODS[name].mergeable:
        into_base.run(OmegaConf.create({"mode": "into_base", "adapter": str(tmp_path / "adapter"), "out": str(tmp_path / "merged")}))
        plain = AutoModelForImageClassification.from_pretrained(tmp_path / "merged").eval()
        with torch.no_grad():
            torch.testing.assert_close(plain(**inputs).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(image_classification.UNSUPPORTED))
def test_methods_for_token_sequences_are_refused_before_anything_loads(name, models, tmp_path):
    run = tmp_path / "run"
    proc = cli("train", "dataset=digits", f"method={name}", f"backbone.path={models['vit']}", f"hydra.run.dir={run}", cwd=tmp_path)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and f"method={name} does not fit dataset.task=image_classification: " in last, proc.stderr[-2000:]
    assert image_classification.UNSUPPORTED[name] in last and not run.exists()
    with pytest.raises(UserError, match="does not fit"):  # rebuilding from an adapter folder checks it too
        from peftkit import model

        model.build(OmegaConf.create({"name": "x", "path": str(models["vit"]), "max_length": 8, "head": ["classifier"],
                                      "trust_remote_code": False}), {"name": name}, LABELS, image_classification.NAME)

