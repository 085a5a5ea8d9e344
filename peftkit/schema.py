"""What every value a user can set may be: typed schemas, checked before anything loads or writes.

`train`, `eval` and `merge` validate their composed config here; a bad value becomes one line
that names the key, the value and what is allowed. Methods declare their options as dataclasses
(`Method.Config`), checked field by field with the same rules (`check_fields`).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from peftkit.errors import UserError

RULES = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")


class Section(BaseModel):
    model_config = RULES


def _whole(least: int, what: str = ""):
    return Field(ge=least, description=what or f"a whole number ≥ {least}")


Count = Annotated[int, _whole(1)]
OptionalCount = Annotated[Count | None, Field(description="a whole number ≥ 1, or null")]
Fraction = Annotated[float, Field(ge=0, lt=1)]
# numpy and torch seed their generators with 0 .. 2**32 - 1: anything else fails deep inside a run
Seed = Annotated[int, Field(ge=0, le=2**32 - 1, description="a whole number from 0 to 4294967295 (2**32 - 1)")]
MAX_THREADS = 1024  # far past any machine; torch crashes creating 100,000
Path_ = Annotated[str, Field(min_length=1)]  # a path: '' is no path (null means none)
QUICKSTART_ROWS = 12808  # the quickstart corpus (peftkit.data.quickstart): dev_size must leave rows to train on


class Trainer(Section):
    lr: float = Field(ge=0, description="a number ≥ 0 (the learning rate), e.g. 1e-3")
    weight_decay: float = Field(ge=0, description="a number ≥ 0")
    betas: list[Fraction] = Field(min_length=2, max_length=2, description="two numbers in [0, 1), e.g. [0.9,0.999]")
    eps: float = Field(gt=0, description="a number > 0, e.g. 1e-8")
    epochs: Count
    max_steps: OptionalCount = Field(description="a whole number ≥ 1, or null to train trainer.epochs")
    batch_size: Count
    eval_batch_size: Count
    grad_accum: Count
    max_grad_norm: Annotated[float, Field(ge=0)] | None = Field(description="a number > 0 to clip gradients at, or 0 / null for no clipping")
    scheduler: Literal["linear", "cosine", "constant"]
    warmup: float = Field(ge=0, description="a fraction of the steps in [0, 1) or a number of steps ≥ 1")
    precision: Literal["fp32", "bf16", "fp16", "auto"]
    device: Literal["auto", "cpu", "cuda"]
    threads: Annotated[int, Field(ge=1, le=MAX_THREADS)] | None = Field(
        description=f"a whole number from 1 to {MAX_THREADS}, or null for torch's default")
    group_by_length: bool
    eval_every: OptionalCount = Field(description="a whole number of steps ≥ 1, or null for once per epoch")
    log_every: Count
    keep_best: bool
    checkpoint: bool
    keep_last_checkpoint: bool
    keep_checkpoints: int = _whole(0, "a whole number ≥ 0 (0: off)")
    eval_before: bool = False
    log_with: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        [], description="a list of experiment trackers: tensorboard, wandb, mlflow, e.g. [tensorboard] (or [] for none)")


class Backbone(Section):
    name: str
    package: str | None = None
    gguf: str | None = None
    path: Path_ | None = Field(None, description="a model folder, or null for the backbone's own weights")
    hub_id: str | None = None
    max_length: int = _whole(2, "a whole number of tokens ≥ 2 (and at most the model's maximum)")
    head: list[str]
    trust_remote_code: bool


class _Data(Section):
    name: str
    task: Literal["classification"] = "classification"
    max_train_samples: OptionalCount = Field(description="a whole number ≥ 1, or null for all rows")
    max_eval_samples: OptionalCount = Field(description="a whole number ≥ 1, or null for all rows")


class GlueData(_Data):
    data_dir: Path_ | None = Field(None, description="the folder of the GLUE TSVs, or null")


class QuickstartData(_Data):
    dev_size: int = Field(ge=1, le=QUICKSTART_ROWS - 1, description=f"a whole number from 1 to {QUICKSTART_ROWS - 1} "
                                                                   f"(the corpus has {QUICKSTART_ROWS:,} rows; the rest train)")
    split_seed: Seed


Column = str | Annotated[int, Field(ge=0)]  # a name, or an index (0, 1, ...) in a file without a header row


class LocalData(_Data):
    train_file: Path_ | None = Field(description="the path of a csv, tsv, json, jsonl or parquet file")
    dev_file: Path_ | None = Field(None, description="the path of a data file, or null to carve dev out of train")
    test_file: Path_ | None = Field(None, description="the path of a labelled data file held out from choosing the step, or null")
    dev_fraction: float = Field(gt=0, lt=1, description="a fraction in (0, 1), e.g. 0.1")
    split_seed: Seed
    header: bool = True
    task_name: Annotated[str, Field(pattern=r"^[^/\s]+$")] | None = Field(
        None, description="a name without spaces or '/', e.g. sst2, or null for one from the train file's name or folder")
    text_fields: list[Column] = Field(min_length=1, max_length=2, description="a list of one or two column names, e.g. [text] or "
                                                                              "[question,passage] (indexes from 0 with dataset.header=false)")
    label_field: Column = Field(description="a column name, e.g. label, or its index from 0 with dataset.header=false")
    label_names: list[str | int] | None = None
    regression: bool
    id_field: Column | None = Field(None, description="a column name (an index from 0 with dataset.header=false), or null")
    metrics: list[Literal["accuracy", "f1", "matthews"]] = Field(min_length=1, description="a list of accuracy, f1, matthews")


def check_local_columns(d: dict) -> None:
    """Columns by name in a file with a header row, by index (0, 1, ...) in one without (dataset.header=false)."""
    header = d.get("header", True)
    for key in ("text_fields", "label_field", "id_field"):
        value = d.get(key)
        items = value if isinstance(value, list) else [value]
        if header and any(isinstance(v, int) for v in items):
            raise UserError(f"dataset.{key}={_show(value)}: a column index needs dataset.header=false (a CSV/TSV without a header "
                            f"row); add dataset.header=false, or name the column, e.g. dataset.{key}={'[text]' if key == 'text_fields' else 'label'}")
        if not header and any(isinstance(v, str) for v in items):
            raise UserError(f"dataset.{key}={_show(value)}: with dataset.header=false the columns have no names; give indexes "
                            f"from 0, e.g. dataset.{key}={'[1]' if key == 'text_fields' else 0}, or set dataset.header=true")


class MultiTaskData(Section):
    name: str
    task: Literal["multitask"]
    tasks: list[str | dict] = Field(min_length=1, description="a list of classification datasets, e.g. [glue/rte,glue/mrpc]")
    temperature: float = Field(gt=0, description="a number > 0 (1: tasks drawn in proportion to their size; larger: closer to uniform)")
    data_dir: Path_ | None = Field(None, description="the folder of the GLUE TSVs, or null")
    max_train_samples: OptionalCount = Field(description="a whole number ≥ 1 (per task), or null for all rows")
    max_eval_samples: OptionalCount = Field(description="a whole number ≥ 1 (per task), or null for all rows")


class _ImageData(_Data):
    task: Literal["image_classification"]
    dev_fraction: float = Field(gt=0, lt=1, description="a fraction in (0, 1), e.g. 0.1 (of each class, when no val/ folder is given)")
    split_seed: Seed


class ImageFolderData(_ImageData):
    path: Path_ | None = Field(description="a folder holding one folder of images per class, or train/ and val/ holding them")


class DigitsData(_ImageData):
    pass


class Fields(Section):
    instruction: str
    input: str | None = None
    output: str
    answer: str | None = None
    messages: str | None = None


class _LMData(_Data):
    task: Literal["causal_lm"]
    template: Literal["chat", "alpaca"]
    packing: bool
    metrics: list[Literal["exact_match", "numeric", "answer_format", "choice", "rougeL"]] = Field(
        description="a list of exact_match, numeric, answer_format, choice, rougeL (or [] for the loss alone)")
    max_new_tokens: Count
    generate_samples: OptionalCount = Field(description="a whole number ≥ 1, or null for every dev example")


class _Carved(_LMData):
    dev_fraction: float = Field(gt=0, lt=1, description="a fraction in (0, 1), e.g. 0.05")
    dev_size: OptionalCount = Field(description="a whole number ≥ 1, or null to use dev_fraction")
    split_seed: Seed
    fields: Fields
    system: str | None = None


class InstructData(_Carved):
    train_file: str | None = Field(description="the path of a .json, .jsonl or .parquet file")
    dev_file: str | None = None


class MathData(_Carved):
    data_dir: str | None = Field(description="a folder in the LLM-Adapters layout")
    train_file: str
    eval_sets: list[str] = Field(min_length=1, description="a list of test-set folders, e.g. [AddSub,gsm8k]")


class QuickstartLMData(_LMData):
    prompt: str


class Run(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")
    recipe: str | None = None
    seed: Seed
    resume: bool | str = False
    backbone: Backbone
    dataset: dict
    trainer: Trainer
    method: dict


DATASETS = {"glue": GlueData, "local": LocalData, "quickstart": QuickstartData,
            "instruct": InstructData, "math": MathData, "quickstart_lm": QuickstartLMData,
            "imagefolder": ImageFolderData, "digits": DigitsData, "multitask": MultiTaskData}


def check_run(cfg: dict) -> None:
    """A composed `train` / `eval` config (resolved, as a plain dict)."""
    validate(Run, cfg)
    kind = str(cfg["dataset"].get("name", "")).split("/")[0]
    if cfg["dataset"].get("task") == "multitask":
        kind = "multitask"
    if kind not in DATASETS:
        raise UserError(f"dataset.name={cfg['dataset'].get('name')}: unknown dataset kind; choose one of: {', '.join(DATASETS)}")
    validate(DATASETS[kind], cfg["dataset"], "dataset")
    if kind == "local":
        check_local_columns(cfg["dataset"])
    from peftkit import methods, tasks

    methods.build(cfg["method"])
    tasks.check_method(cfg["dataset"].get("task"), cfg["method"].get("name"))


# ---- merge -------------------------------------------------------------------------------------------

Weights = Annotated[Literal["average"] | list[float] | None,
                    Field(description="one number per adapter, e.g. [0.5,0.5]; average; or null for 1.0 each")]
Head = Annotated[Literal["mean"] | Annotated[int, Field(ge=0)], Field(description="mean, or the index of the adapter whose head to keep")]
Density = Annotated[float, Field(gt=0, le=1, description="a fraction in (0, 1]")]


class _Merge(Section):
    mode: str
    out: Path_ = Field(description="the folder to write to")
    backbone_path: Path_ | None = Field(None, description="a model folder, or null")


class _Combine(_Merge):
    adapters: list[str] = Field(min_length=1, description="a list of run or adapter folders, e.g. [outputs/a,outputs/b]")
    weights: Weights = None
    head: Head = "mean"


class _One(_Merge):
    adapter: Path_ = Field(description="a run directory or an adapter folder")


class TaskArithmetic(_Combine):
    pass


class Ties(_Combine):
    density: Density = 0.2


class Dare(_Combine):
    density: Density = 0.5
    elect_sign: bool = False
    seed: Seed = 0


class Concat(_Combine):
    pass


class Svd(_Combine):
    rank: Count = 8


class IntoBase(_One):
    pass


class Compress(_One):
    density: Density = 0.1
    alpha: float = Field(1.0, gt=0, description="a number > 0")
    scale: Literal["mean", "std"] = "mean"


class ToPeft(_One):
    pass


class FromPeft(_One):
    backbone: str | None = None
    labels: list[str | int] | None = None
    trust_remote_code: bool = False


class Materialize(_One):
    pass


class Mwa(Section):
    mode: str
    run: Path_ = Field(description="a run directory")
    out: Path_ = Field(description="the folder to write to")
    weighting: Literal["loss", "step", "uniform", "last"] = "loss"
    penalty: float = Field(1.0, ge=0, description="a number ≥ 0")
    last: OptionalCount = None


MERGES = {"task_arithmetic": TaskArithmetic, "ties": Ties, "dare": Dare, "concat": Concat, "svd": Svd,
          "into_base": IntoBase, "compress": Compress, "to_peft": ToPeft, "from_peft": FromPeft, "mwa": Mwa,
          "materialize": Materialize}


def check_merge(cfg: dict) -> None:
    mode = cfg.get("mode")
    if mode not in MERGES:
        raise UserError(f"mode={mode}: unknown merge mode; choose one of: {', '.join(MERGES)}")
    validate(MERGES[mode], cfg)


# ---- files peftkit reads back: the keys and types it uses ---------------------------------------------

class _Named(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    name: str


class AdapterFile(BaseModel):
    """adapter_config.json: what every reader uses (a checkpoint snapshot's too), and the types of the
    rest; rebuilding base + adapter needs `MODEL_KEYS` as well."""
    model_config = ConfigDict(strict=True, extra="allow")
    method: _Named
    base_fingerprint: str
    backbone: _Named | None = None
    label_names: list[str | int] | dict[str, list[str | int] | None] | None = None  # a dict: per task (multi-task)
    trainable_params: int | None = None
    total_params: int | None = None
    task_type: str | None = None


ADAPTER_MODEL_KEYS = ("backbone", "label_names", "trainable_params", "total_params")


class ReportFile(BaseModel):
    """eval/report.json: a finished run's (`OK_KEYS` present), or a diverged or failed one's, which
    may lack the scores (a crashed job's report may hold little more than its error)."""
    model_config = ConfigDict(strict=True, extra="allow")
    status: str = "ok"
    error: str | None = None
    dataset: str | None = None
    method: str | None = None
    backbone: str | None = None
    task: str | None = None
    metrics: dict[str, dict[str, float | None]] | None = None
    score: float | None = None
    selected_on: str | None = None
    test_score: float | None = None
    trainable_params: int | None = None
    total_params: int | None = None


class RunConfigFile(BaseModel):
    """A run's config.yaml, as `eval` and `report` read it (the full check is `check_run`)."""
    model_config = ConfigDict(strict=False, extra="allow")
    backbone: dict
    method: _Named
    dataset: dict
    trainer: dict


REPORT_OK_KEYS = ("dataset", "method", "backbone", "metrics")


def check_file(schema: type[BaseModel], data, f, what: str, fix: str, required: tuple[str, ...] = ()) -> dict:
    """`data`, read from file `f`, against `schema` (and `required` keys): one line naming the file and
    what is wrong in it."""
    wrong = file_problem(schema, data, required)
    if wrong:
        raise UserError(f"corrupt {what} {f}: {wrong}; {fix}")
    return data


def file_problem(schema: type[BaseModel], data, required: tuple[str, ...] = ()) -> str | None:
    """What is wrong with `data` (a file's content) for `schema`, in a few words; None if nothing.
    A report that says `ok` must hold what a finished run's does."""
    if not isinstance(data, dict):
        return f"expected a mapping of keys, got {_kind(data)}"
    try:
        schema.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(x) for x in err["loc"])
        if err["type"] == "missing":
            return f"no {key}"
        value = data
        for part in err["loc"]:
            value = value.get(part) if isinstance(value, dict) else None
        return f"{key}={_show(value)}, expected {_expected(err, None)}"
    if schema is ReportFile and data.get("status", "ok") in ("ok", "collapsed"):  # evaluation.report.FINISHED
        required = (*required, *REPORT_OK_KEYS)
    missing = [k for k in required if k not in data]
    return f"no {missing[0]}" if missing else None


def _kind(value) -> str:
    if value is None:
        return "null"
    return {list: "a list", str: "a string", bool: "true/false", int: "a number", float: "a number"}.get(type(value), type(value).__name__)


# ---- checking and the one-line message ---------------------------------------------------------------

def validate(schema: type[BaseModel], values: dict, prefix: str = "") -> None:
    try:
        schema.model_validate(values)
    except ValidationError as e:
        raise UserError(_message(e.errors()[0], schema, values, prefix)) from None


def check_fields(config_class, values: dict, prefix: str) -> None:
    """Each option of a dataclass config (`Method.Config`) against its type, with the same rules."""
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        if f.name not in values:
            continue
        try:
            TypeAdapter(hints[f.name], config=ConfigDict(strict=True, allow_inf_nan=False)).validate_python(values[f.name])
        except ValidationError as e:
            err = e.errors()[0]
            key = f"{prefix}.{f.name}"
            raise UserError(f"{key}={_show(values[f.name])}: expected {_expected(err, hints[f.name])}"
                            f"{_quoted_hint(key, values[f.name], err)}") from None


def _message(err: dict, schema: type[BaseModel], values: dict, prefix: str) -> str:
    path, info = _field_path(schema, err["loc"])
    key = ".".join(filter(None, [prefix, *path]))
    if err["type"] == "extra_forbidden":
        extra = str(err["loc"][len(path)])
        known = ", ".join((info.annotation if info else schema).model_fields)
        return f"{key + '.' if key else ''}{extra}: unknown key; {key or 'the config'} has: {known}"
    allowed = (info.description if info is not None and info.description else None) or _expected(err, None)
    if err["type"] == "missing":
        return f"{key} is missing: expected {allowed}; set {key}=..."
    value = _lookup(values, path)
    return f"{key}={_show(value)}: expected {allowed}{_quoted_hint(key, value, err)}"


def _quoted_hint(key: str, value, err: dict) -> str:
    """`trainer.lr='1e-3'`: a number in quotes is text; say so, rather than only that a number is needed."""
    if not isinstance(value, str) or not err["type"].startswith(("float", "int", "bool")):
        return ""
    text = value.strip()
    try:
        float(text)
    except ValueError:
        if text.lower() not in ("true", "false"):
            return ""
    return f"; '{value}' is quoted, so it is text: write {key}={text} without quotes"


def _field_path(schema, loc) -> tuple[list[str], Any]:
    """The config keys an error location names (it goes on into list items and union members)."""
    node, info, path = schema, None, []
    for part in loc:
        fields = getattr(node, "model_fields", None)
        if not isinstance(part, str) or not fields or part not in fields:
            break
        info = fields[part]
        path.append(part)
        node = info.annotation
    return path, info


def _lookup(values: dict, path: list[str]) -> Any:
    for name in path:
        if not isinstance(values, dict) or name not in values:
            return None
        values = values[name]
    return values


def _expected(err: dict, annotation) -> str:
    ctx = err.get("ctx") or {}
    kind = err["type"]
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return "a whole number"
    if kind in ("float_type", "float_parsing"):
        return "a number"
    if kind == "finite_number":
        return "a finite number"
    if kind in ("bool_type", "bool_parsing"):
        return "true or false"
    if kind == "string_type":
        return "a string"
    if kind == "list_type":
        return "a list, e.g. [a,b]"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return "a mapping of keys"
    if kind == "literal_error":
        return f"one of {ctx.get('expected')}"
    for k, sign in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤")):
        if k in ctx:
            return f"a number {sign} {ctx[k]}"
    return err["msg"][0].lower() + err["msg"][1:]


def _show(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_show(v) for v in value) + "]"
    if isinstance(value, str) and value == "":
        return "''"
    if isinstance(value, str) and _looks_typed(value):  # quoted on the command line: show the quotes
        return f"'{value}'"
    return str(value)


def _looks_typed(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return text.strip().lower() in ("true", "false", "null")
