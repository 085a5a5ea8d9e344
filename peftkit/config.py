"""Where configs and recipes live, and composing them with Hydra.

A recipe is a primary Hydra config (`recipes/NAME.yaml`) whose defaults list picks one option from
each group in `configs/` (backbone, method, dataset, trainer). User directories given with
`--recipes-dir` or `PEFTKIT_RECIPES_DIR` come first on the search path, so they can add or shadow
recipes and group options (`<dir>/method/my_method.yaml`) without touching the package.
"""

from __future__ import annotations

import copy
import itertools
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from peftkit import tracking
from peftkit.errors import UserError

GROUPS = ("backbone", "method", "dataset", "trainer")
_PKG = Path(__file__).resolve().parent
USER_DIRS_ENV = "PEFTKIT_RECIPES_DIR"
_extra_dirs: list[Path] = []


def _shipped(name: str) -> Path:
    """`configs/` or `recipes/`: inside the package in a wheel, beside it in a source checkout."""
    for candidate in (_PKG / name, _PKG.parent / name):
        if candidate.is_dir():
            return candidate
    raise RuntimeError(f"peftkit is installed without its {name}/ directory")


def add_user_dir(path: str | os.PathLike) -> None:
    if not str(path).strip():
        raise UserError("--recipes-dir needs a folder: peftkit --recipes-dir DIR COMMAND ...")
    from peftkit.files import resolved

    p = resolved(Path(path).expanduser(), "--recipes-dir")
    if not p.is_dir():
        raise UserError(f"recipes dir {path} does not exist" if not p.exists() else f"--recipes-dir {path} is a file, not a folder")
    _extra_dirs.append(p)


def clear_user_dirs() -> None:
    _extra_dirs.clear()


def user_dirs() -> list[Path]:
    env = [Path(p).expanduser().resolve() for p in os.environ.get(USER_DIRS_ENV, "").split(os.pathsep) if p]
    return _extra_dirs + [p for p in env if p.is_dir()]


def search_path() -> list[Path]:
    """Highest priority first: user dirs, shipped recipes, shipped configs."""
    return user_dirs() + [_shipped("recipes"), _shipped("configs")]


def _options(subdir: str, recipes: bool = False) -> dict[str, Path]:
    found: dict[str, Path] = {}
    roots = search_path()
    if recipes:
        roots = [r for r in roots if r != _shipped("configs")]
    for root in reversed(roots):  # later roots are shadowed by earlier ones
        base = root / subdir if subdir else root
        if not base.is_dir():
            continue
        pattern = "*.yaml" if recipes else "**/*.yaml"
        for f in base.glob(pattern):
            name = f.relative_to(base).with_suffix("").as_posix()
            if not any(part.startswith("_") for part in name.split("/")):
                found[name] = f
    return dict(sorted(found.items()))


def group_options(group: str) -> dict[str, Path]:
    """Option name -> YAML file for a config group (`glue/mrpc` for nested datasets)."""
    return _options(group)


def recipes() -> dict[str, Path]:
    return _options("", recipes=True)


def describe(path: Path) -> str:
    """The first comment line of a YAML file: its one-line description for `peftkit ls`."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, ValueError) as e:  # a binary or unreadable file in a user's recipes dir: say so, list the rest
        return f"(unreadable: {' '.join(str(e).split())[:80]})"
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#") and not s.startswith("# @package"):
            return s.lstrip("# ").strip()
    return ""


def _check_choice(kind: str, value: str, valid: dict[str, Path]) -> None:
    if value not in valid:
        raise UserError(f"unknown {kind} '{value}'; choose one of: {', '.join(valid)}")


def split_recipe(overrides: list[str], default: str) -> tuple[str, list[str]]:
    """Pull `recipe=NAME` out of the override list."""
    recipe, rest = default, []
    for o in overrides:
        if o.startswith("recipe="):
            recipe = o.split("=", 1)[1]
        else:
            rest.append(o)
    if "," in recipe:
        raise UserError("sweep over recipes by running one sweep per recipe; recipe= takes one name")
    _check_choice("recipe", recipe, recipes())
    return recipe, rest


def multitask_shorthand(overrides: list[str]) -> list[str]:
    """`dataset=[glue/rte,glue/mrpc]` is `dataset=multitask dataset.tasks=[glue/rte,glue/mrpc]`: a
    list picks several datasets for one multi-task run (Hydra would merge them into one)."""
    out = []
    for o in overrides:
        key, _, value = o.partition("=")
        if key == "dataset" and value.startswith("[") and value.endswith("]"):
            names = [v.strip() for v in value[1:-1].split(",") if v.strip()]
            for name in names:
                _check_choice("dataset", name, group_options("dataset"))
            if not names:
                raise UserError("dataset=[] names no dataset; give one or more, e.g. dataset=[glue/rte,glue/mrpc]")
            out += ["dataset=multitask", f"dataset.tasks=[{','.join(names)}]"]
        else:
            out.append(o)
    return out


def hydra_overrides() -> list[str]:
    """Where Hydra finds configs; and Hydra writes nothing into a run folder (no .hydra/, no log file):
    peftkit writes config.yaml itself, and the folder's owner is known before anything lands in it."""
    dirs = ",".join(f"file://{d}" for d in search_path())
    return [f"hydra.searchpath=[{dirs}]", "hydra.output_subdir=null", "hydra/job_logging=none"]


def check(recipe: str, overrides: list[str], multirun: bool = False) -> tuple[DictConfig, DictConfig, str | None]:
    """Compose and validate every value a sweep names, so bad input fails before any run starts.

    Returns the config of the first combination, the same with Hydra's `hydra:` node (a single run
    starts from it: `launch.run_composed`), and where Hydra would write it (`hydra.run.dir`, or
    `hydra.sweep.dir` for a sweep), resolved now; None if only a running job could resolve it.
    Errors become one-line `UserError`s.
    """
    choices = _values(overrides, multirun)
    # One compose per distinct value (not the whole product): enough to catch a bad key or value.
    combos = [[c[0] for c in choices]]
    for i, c in enumerate(choices):
        for v in c[1:]:
            combos.append([*combos[0][:i], v, *combos[0][i + 1 :]])
    first, composed, out = None, None, None
    for combo in itertools.islice(combos, 64):
        cfg = compose(recipe, combo, with_hydra=first is None)
        if first is None:
            out = output_dir(cfg, "hydra.sweep.dir" if multirun else "hydra.run.dir")
            composed, cfg = cfg, copy.deepcopy(cfg)
            with open_dict(cfg):
                del cfg["hydra"]
            first = cfg
        validate(cfg)
        tracking.check(cfg.trainer)  # a tracker's package: train needs it, eval does not
    return first, composed, out


def output_dir(cfg: DictConfig, key: str) -> str | None:
    """Where Hydra would write, resolved now (`~` expanded); None if only a running job can resolve it
    (`${hydra:...}`). An empty value, or one that cannot resolve (`${oc.env:UNSET}`), is one line."""
    from peftkit.files import user_path

    parent, _, leaf = key.rpartition(".")
    text = OmegaConf.to_container(OmegaConf.select(cfg, parent), resolve=False).get(leaf)  # as written
    try:
        value = OmegaConf.select(cfg, key)
    except Exception as e:
        if "${hydra:" in str(text):
            return None
        raise UserError(f"{key}={text}: cannot resolve it ({str(e).splitlines()[0]}); give a folder") from None
    return str(user_path(value, key))


def _values(overrides: list[str], multirun: bool) -> list[list[str]]:
    """Each override as the list of `key=value` it stands for (one, or a sweep's several)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as e:  # hydra's parse errors are multi-line
        raise UserError(f"cannot parse overrides: {str(e).splitlines()[0]}") from None
    choices: list[list[str]] = []
    for o, text in zip(parsed, overrides):
        key = o.get_key_element().lstrip("+~")
        if o.is_sweep_override() and not multirun:
            raise UserError(f"{text} names several values: add -m to sweep over them, or give one value "
                            f"(quote a value that holds a comma: {key}='a,b')")
        if o.is_sweep_override() and not o.is_discrete_sweep():  # interval(): the optuna sweeper samples it
            values = [str(o.value().start)]
        else:
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        if not values:
            raise UserError(f"{text} names no value (an empty sweep); give at least one")
        if key in GROUPS:
            for v in values:
                _check_choice(key, v, group_options(key))
        choices.append([f"{o.get_key_element()}={v}" for v in values])
    return choices


def validate(cfg: DictConfig) -> None:
    """Every value of a composed train/eval config against `schema`, in one line on the first bad one."""
    from peftkit import backbone, schema

    try:
        values = OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:
        raise UserError(f"bad config: {' '.join(str(e).split())}") from None
    schema.check_run(values)
    backbone.check(cfg.backbone)


def method_options(section) -> dict:
    """A `method:` section's options: without `name`, which picks the class, and `lr`, which is only
    trainer.lr's default (the rate a run trains at is trainer.lr's)."""
    return {k: v for k, v in dict(section or {}).items() if k not in ("name", "lr")}


def changed_keys(a: dict, b: dict) -> set[str]:
    """The keys where two runs' settings differ. A key one run lacks and the other leaves off (false,
    0, null) is an option added or removed between them, off by default: not a difference (LoReFT's
    `train_pooler: false` from before the option left the method; `keep_checkpoints: 0` from after it came)."""
    def differs(k: str) -> bool:
        return a[k] != b[k] if k in a and k in b else bool(a.get(k) or b.get(k))

    return {k for k in a.keys() | b.keys() if differs(k)}


def compose(recipe: str, overrides: list[str] = (), with_hydra: bool = False) -> DictConfig:
    """The composed config of a recipe plus overrides, without starting a run (`with_hydra`: with
    Hydra's own `hydra:` node, which says where the run would go)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    _check_choice("recipe", recipe, recipes())
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(recipes()[recipe].parent), version_base="1.3"):
            return hydra_compose(recipe, overrides=[*hydra_overrides(), *overrides], return_hydra_config=with_hydra)
    except UserError:
        raise
    except Exception as e:
        hint = _unknown_key_hint(recipe, list(overrides), e) or _unreadable_yaml(e)
        msg = hint or f"bad config: {' '.join(str(e).split())}"
        raise UserError(msg) from None
    finally:
        GlobalHydra.instance().clear()


MERGE_DIR = "merge"


def merge_configs() -> dict[str, Path]:
    """Merge modes (`configs/merge/`) and merge recipes (`recipes/merge/`, user `<dir>/merge/`) by name."""
    return _options(MERGE_DIR)


def compose_merge(name: str, overrides: list[str]) -> DictConfig:
    """A `peftkit merge` config: a mode's YAML, or a recipe whose defaults list names one, plus overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    _check_choice("merge mode or recipe", name, merge_configs())
    dirs = ",".join(f"file://{d / MERGE_DIR}" for d in search_path() if (d / MERGE_DIR).is_dir())
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(merge_configs()[name].parent), version_base="1.3"):
            cfg = hydra_compose(name, overrides=[f"hydra.searchpath=[{dirs}]", *overrides])
    except Exception as e:
        msg = " ".join(str(e).split())
        if msg.startswith("Could not override '"):
            key = msg.split("'")[1]
            keys = ", ".join(str(k) for k in OmegaConf.load(merge_configs()[name]) if k != "defaults")
            msg = f"'{name}' has no key '{key}'; its keys are: {keys}"
        raise UserError(f"bad merge config: {msg}") from None
    finally:
        GlobalHydra.instance().clear()
    from peftkit import schema
    from peftkit.files import user_path

    try:
        values = OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:  # ${oc.env:UNSET} and the like
        key = getattr(e, "full_key", None)
        raise UserError(f"{key + ': ' if key else ''}cannot resolve it ({str(e).splitlines()[0]})") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UserError(f"peftkit merge {cfg.get('mode', name)} needs {', '.join(f'{k}=...' for k in missing)} (see peftkit merge --help)")
    schema.check_merge(values)
    for key in MERGE_PATH_KEYS:  # `~` expanded the same way everywhere, quoted or not
        if isinstance(values.get(key), str):
            values[key] = str(user_path(values[key], key))
        elif isinstance(values.get(key), list):
            values[key] = [str(user_path(v, key)) for v in values[key]]
    return OmegaConf.create(values)


MERGE_PATH_KEYS = ("out", "adapter", "adapters", "run", "backbone_path")


def _unreadable_yaml(e: Exception) -> str:
    """For a recipe or config file that is not UTF-8 text: which file (Hydra's error does not say)."""
    if not any(isinstance(x, UnicodeDecodeError) for x in (e, e.__cause__, e.__context__)) and "codec can't decode" not in str(e):
        return ""
    for root in search_path():
        for f in sorted(root.rglob("*.yaml")):
            try:
                f.read_text(encoding="utf-8")
            except (OSError, ValueError) as err:
                return f"{f} is not a text YAML file ({' '.join(str(err).split())}); fix it or move it out of {root}"
    return ""


def _unknown_key_hint(recipe: str, overrides: list[str], e: Exception) -> str:
    """For a mistyped key (`trainer.lrr=1`): the keys that do exist there."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    cause = e.__cause__
    if not isinstance(cause, (ConfigAttributeError, ConfigKeyError)) or not getattr(cause, "full_key", None):
        return ""
    groups = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in GROUPS]
    if groups == overrides:  # nothing to leave out: no config to list the keys of
        return ""
    parent, _, key = cause.full_key.rpartition(".")
    try:
        node = compose(recipe, groups)
    except UserError:
        return ""
    node = OmegaConf.select(node, parent) if parent else node
    if not isinstance(node, DictConfig):
        return ""
    return f"{cause.full_key}: unknown key; {parent or 'the config'} has no key '{key}', its keys are: {', '.join(str(k) for k in node)}"
