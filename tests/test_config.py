"""Recipes and config groups: shipped ones compose; a user's recipe dir adds and shadows options."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest

from peftkit import config
from peftkit.errors import UserError
from tests.conftest import ROOT, run_cli

SHIPPED_RECIPES = ["glue", "glue_bitfit", "glue_full", "glue_houlsby", "glue_hyperformer", "glue_ia3", "glue_lora", "glue_loreft", "glue_prefix_tuning", "quickstart"]


@pytest.mark.parametrize("recipe", SHIPPED_RECIPES)
def test_every_shipped_recipe_composes(recipe):
    cfg = config.compose(recipe)
    assert cfg.recipe == recipe
    assert {"backbone", "method", "dataset", "trainer"} <= set(cfg)
    assert cfg.backbone.name == "minilm"


def test_group_options_include_nested_glue_tasks():
    tasks = [n for n in config.group_options("dataset") if n.startswith("glue/")]
    groups = ["all", "small"]  # multi-task: several tasks in one run
    assert tasks == [f"glue/{t}" for t in sorted(["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli", *groups])]


def test_overrides_pick_group_options_and_values():
    cfg = config.compose("glue_lora", ["method=ia3", "dataset=glue/mrpc", "trainer.lr=3e-3"])
    assert (cfg.method.name, cfg.dataset.name, cfg.trainer.lr) == ("ia3", "glue/mrpc", 3e-3)


def test_learning_rate_defaults_to_the_methods_own():
    """Each method YAML names the rate it trains well at; a recipe or the command line overrides it."""
    assert config.compose("quickstart", ["method=ia3"]).trainer.lr == 1e-2
    assert config.compose("quickstart", ["method=full"]).trainer.lr == 5e-5
    assert config.compose("quickstart", ["method=ia3", "trainer.lr=3e-3"]).trainer.lr == 3e-3
    assert config.compose("glue_lora", ["method=ia3"]).trainer.lr == 1e-3  # the recipe pins it
    for name, path in config.group_options("method").items():
        assert isinstance(config.compose("quickstart", [f"method={name}"]).trainer.lr, float), name


def test_check_composes_every_sweep_value():
    with pytest.raises(UserError, match="unknown method 'nope'"):
        config.check("glue_lora", ["method=lora,nope"], multirun=True)
    with pytest.raises(UserError, match="trainer.lrr"):
        config.check("glue_lora", ["method=lora,ia3", "trainer.lrr=1,2"], multirun=True)
    with pytest.raises(UserError, match="trainer.lr=abc"):
        config.check("glue_lora", ["trainer.lr=1e-3,abc"], multirun=True)
    with pytest.raises(UserError, match="add -m to sweep"):
        config.check("glue_lora", ["method=lora,ia3"])


@pytest.fixture
def user_dir(tmp_path):
    d = tmp_path / "mine"
    (d / "method").mkdir(parents=True)
    (d / "method" / "lora_r2.yaml").write_text("# LoRA with rank 2\nname: lora\nr: 2\nalpha: 4\ndropout: 0.0\n"
                                               "rslora: false\ninit: kaiming\ntarget_modules: null\n")
    (d / "my_recipe.yaml").write_text("# my own recipe\ndefaults:\n  - backbone: minilm\n  - method: lora_r2\n"
                                      "  - dataset: quickstart\n  - trainer: default\n  - _self_\n"
                                      "recipe: my_recipe\nseed: 7\nresume: false\n")
    return d


def test_user_dir_from_env_adds_recipes_and_group_options(user_dir, monkeypatch):
    monkeypatch.setenv(config.USER_DIRS_ENV, str(user_dir))
    assert "my_recipe" in config.recipes()
    assert "lora_r2" in config.group_options("method")
    cfg = config.compose("my_recipe")
    assert (cfg.seed, cfg.method.r) == (7, 2)
    # a shipped recipe can use the user's method option too
    assert config.compose("glue_lora", ["method=lora_r2"]).method.r == 2


def test_a_user_method_without_lr_trains_at_the_trainers_fallback(user_dir, monkeypatch):
    monkeypatch.setenv(config.USER_DIRS_ENV, str(user_dir))
    assert config.compose("glue", ["method=lora_r2"]).trainer.lr == 1e-3


def test_recipes_dir_flag_in_the_cli(user_dir, tmp_path):
    r = run_cli("--recipes-dir", str(user_dir), "ls", "recipes", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "my_recipe" in r.stdout and "my own recipe" in r.stdout
    r = run_cli("--recipes-dir", str(user_dir), "train", "recipe=my_recipe", "--cfg", "job", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "r: 2" in r.stdout and "seed: 7" in r.stdout
    r = run_cli("--recipes-dir", str(tmp_path / "absent"), "ls", cwd=tmp_path)
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_wheel_ships_configs_and_recipes(tmp_path):
    """A non-editable install finds its YAML inside the package."""
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                         capture_output=True, text=True, timeout=300)
    if out.returncode != 0 and "hatchling" in (out.stderr + out.stdout).lower():
        pytest.skip(f"cannot fetch the build backend here: {out.stderr.strip().splitlines()[-1:]}")
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("peftkit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for recipe in SHIPPED_RECIPES:
        assert f"peftkit/recipes/{recipe}.yaml" in names
    assert {"peftkit/configs/method/lora.yaml", "peftkit/configs/dataset/glue/rte.yaml",
            "peftkit/configs/backbone/minilm.yaml", "peftkit/configs/trainer/default.yaml",
            "peftkit/configs/hydra/sweeper/optuna.yaml", "hydra_plugins/peftkit_optuna/optuna_sweeper.py"} <= names
    assert "hydra_plugins/__init__.py" not in names  # a namespace package, shared with Hydra's own plugins
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, timeout=300)
    probe = ("import sys, peftkit.config as c; print(c._shipped('configs')); print(sorted(c.recipes()));"
             "from hydra.core.plugins import Plugins; from hydra.plugins.sweeper import Sweeper;"
             "print([sys.modules[p.__module__].__file__ for p in Plugins.instance().discover(Sweeper)])")
    r = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                       env={"PYTHONPATH": str(target), "PATH": ""}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert str(target / "peftkit" / "configs") in r.stdout
    assert "glue_lora" in r.stdout
    assert str(target / "hydra_plugins" / "peftkit_optuna" / "optuna_sweeper.py") in r.stdout  # Hydra finds it


def test_changed_keys_ignores_an_option_one_side_lacks_and_the_other_leaves_off():
    """What glue_bench's resume check and the leaderboard's row labels both call a difference."""
    assert config.changed_keys({"r": 8}, {"r": 16}) == {"r"}
    assert config.changed_keys({"r": 8}, {"r": 8, "train_pooler": False}) == set()  # removed since, left off
    assert config.changed_keys({"keep_checkpoints": 0, "lr": 1e-3}, {"lr": 1e-3}) == set()  # added since, off
    assert config.changed_keys({"r": 8, "train_pooler": True}, {"r": 8}) == {"train_pooler"}  # on: a difference
    assert config.changed_keys({"targets": None}, {"targets": ["query"]}) == {"targets"}
