"""The `peftkit` command: train, eval, merge, report, generate, chat, predict, ls.

`train` hands its arguments to Hydra (overrides, `-m` for sweeps); the other commands take
`key=value` arguments of their own. Bad input prints one line and exits with code 2; set
`PEFTKIT_TRACEBACK=1` (or pass `--traceback`) to see the traceback instead.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from peftkit.errors import Interrupted, UserError
from peftkit.files import user_path, write_error

USAGE = """usage: peftkit [--version] [--recipes-dir DIR] [--traceback] COMMAND [ARGS]

commands:
  train   train an adapter from a recipe:  peftkit train recipe=glue_lora dataset=glue/mrpc method.r=16
          sweep with -m:                   peftkit train -m method=lora,ia3 dataset=glue/rte,glue/mrpc
  eval    re-score a finished run:         peftkit eval run=outputs/2026-01-01/12-00-00 [split=test]
  merge   fold, combine, compress adapters: peftkit merge adapter=outputs/... out=merged/
                                           peftkit merge mode=ties adapters=[RUN1,RUN2] out=DIR
  report  compare runs in a leaderboard:  peftkit report multirun/2026-01-01/12-00-00 [out=DIR]
  generate  reply with a causal-LM run:    peftkit generate run=outputs/... prompt="Is this review fresh?"
  chat    talk to a causal-LM run:         peftkit chat run=outputs/...
  predict rows of a file, each on its run's adapter, in mixed batches:
                                           peftkit predict runs=[RUN1,RUN2] file=in.jsonl out=preds.jsonl
  ls      list what exists:                peftkit ls [recipes|methods|backbones|datasets|trainers|merges]

Run `peftkit COMMAND --help` for each command's options.
"""

TRAIN_HELP = """usage: peftkit train [-m] recipe=NAME [GROUP=OPTION ...] [KEY=VALUE ...]

Train an adapter, write it with a GLUE-style report to outputs/<date>/<time>/.
  recipe=NAME        a recipe from `peftkit ls recipes` (default: quickstart)
  GROUP=OPTION       pick a config: backbone=, method=, dataset=, trainer= (see `peftkit ls`)
  dataset=[A,B,...]  one multi-task run over several classification datasets (a head each;
                     dataset.temperature=T draws tasks ∝ size^(1/T)); or dataset=glue/small
  KEY=VALUE          override any value: method.r=16 trainer.lr=3e-4 trainer.max_steps=50 seed=1
  resume=true        continue the newest unfinished run from its last checkpoint (or resume=DIR)
  overwrite=true     replace the run already in hydra.run.dir (without it, peftkit refuses to)
  -m, --multirun     sweep comma-separated values: method=lora,ia3 seed=0,1,2
  --cfg job          print the composed config and exit (Hydra)
  --dry-run          read the data, print the modules the run would adapt and its trainable parameters, and exit

A run writes config.yaml, adapter/ (adapter_config.json + adapter.safetensors), train_log.jsonl
and eval/report.{json,md}.
"""

EVAL_HELP = """usage: peftkit eval run=DIR [split=validation|test] [KEY=VALUE ...]

Reload a run's base model and adapter from disk, re-score it and write eval/report.{json,md}.
  run=DIR            a run directory written by `peftkit train`
  split=test         GLUE: predict the test split, write GLUE-server files to eval/submission/;
                     a causal LM: score every test set (dataset=math: AddSub, MultiArith, SingleEq,
                     gsm8k), a table per set and sample generations in eval/test_report.{json,md}
  dataset=NAME       score on another dataset than the run trained on (then dataset.KEY=VALUE for it),
                     e.g. dataset=math dataset.data_dir=../shared/llm/math split=test
  KEY=VALUE          override the run's config, e.g. dataset.data_dir=/data/glue backbone.path=/models/x
"""

MERGE_HELP = """usage: peftkit merge [mode=MODE | recipe=NAME] KEY=VALUE ...

Fold, combine, compress and exchange adapters. Each mode's keys and defaults are in
configs/merge/MODE.yaml (`peftkit ls merges`); a merge recipe fixes some of them.
  into_base        fold a mergeable adapter into its base: a plain transformers folder
                   peftkit merge adapter=RUN out=merged/
  task_arithmetic  base + Σ weight·(adapter − base); weights < 0 remove a behaviour
                   peftkit merge mode=task_arithmetic adapters=[RUN1,RUN2] weights=[1,-0.5] out=DIR
  ties             trim to the top `density`, elect signs, average the agreeing values
  dare             drop at random to `density`, rescale, add (elect_sign=true: DARE-TIES)
  concat           LoRA adapters side by side: one LoRA of rank r1+r2+..., exact
  svd              the summed ΔW of any mergeable adapters, truncated to a LoRA of rank=R
  head=mean|INDEX  combined heads: their weighted mean (one label set), or one adapter's head
  mwa              average one run's kept checkpoints (train with trainer.keep_checkpoints=K)
                   peftkit merge mode=mwa run=RUN weighting=loss penalty=1 out=DIR
  compress         ComPEFT: keep the top `density` of τ = trained − initial as sign × one scale
                   peftkit merge mode=compress adapter=RUN density=0.1 out=DIR
  to_peft          a lora/rslora/dora/ia3 adapter in Hugging Face peft's format
                   peftkit merge mode=to_peft adapter=RUN out=DIR
  from_peft        a peft LoRA/IA³ adapter as a peftkit adapter
                   peftkit merge mode=from_peft adapter=DIR out=OUT [backbone=NAME|backbone_path=DIR]
  materialize      a multi-task run as one single-task run per task: OUT/<task>/ (hyperformer: houlsby)
                   peftkit merge mode=materialize adapter=RUN out=DIR; peftkit eval run=DIR/rte
  overwrite=true   replace an out= folder that already holds files (out= never overlaps an input)
Lists take Hydra syntax: adapters=[outputs/a,outputs/b]. An adapter is an adapter folder or a run
directory; adapters written by concat/svd/mwa/compress land in OUT/adapter with OUT/config.yaml,
so `peftkit eval run=OUT` scores them.
"""

REPORT_HELP = """usage: peftkit report DIR... [out=DIR] [submission=true [data_dir=DIR]]

Collect every run under the DIRs (any folder with eval/report.json and config.yaml), print a
leaderboard and write it to OUT/leaderboard/: leaderboard.{md,csv,json,html}, best_runs.md,
score_vs_params.png, scores.png (a heat map) and loss_curves.png. One row per method configuration, one column per task
(mean ± std over seeds); failed runs are listed apart and left out of the means.
  DIR...             run directories or folders holding them (a sweep, outputs/)
  out=DIR            where to write leaderboard/ (default: the first DIR)
  submission=true    the best run of each GLUE task predicts its test split: leaderboard/submission/
                     holds the GLUE-server TSVs and leaderboard/submission.zip the upload
  data_dir=DIR       the GLUE folder with the test TSVs, if not the one the runs trained from
"""

GENERATE_HELP = """usage: peftkit generate run=DIR (prompt=TEXT | prompts=FILE) [max_new_tokens=N]

Reply to prompts with a causal-LM run's adapter (greedy, formatted as in training).
  prompt=TEXT        one prompt
  prompts=FILE       a text file, one prompt per line
  max_new_tokens=N   the reply's length limit (default 128)
"""

CHAT_HELP = """usage: peftkit chat run=DIR [system=TEXT] [max_new_tokens=N]

Talk to a causal-LM run's adapter on the terminal; replies are streamed. An empty line ends.
"""

PREDICT_HELP = """usage: peftkit predict runs=[RUN1,RUN2,...] file=FILE out=FILE [KEY=VALUE ...]

Answer each row of a file with the adapter it names: one base model holds every run's LoRA factors
stacked, and a batch mixes rows of different adapters in one forward pass (no loop over adapters).
The runs: lora or rslora adapters (PiSSA-initialised too) of one base model and one task type.
  runs=[RUN,...]     run directories (or adapter folders, for classification)
  file=FILE          CSV/TSV/JSON/JSONL/Parquet inputs, one row each
  out=FILE           JSON lines in the input's order: row (1-based), adapter, and the label and
                     probabilities over the run's labels (a regression run: score), or the reply
  adapter_field=adapter  the column naming each row's run: its directory name, its path as given in
                     runs=, or its position in runs= (0-based); causal LMs: base for the base alone
  text_fields=[text] the text column(s): one, or two for sentence pairs (causal LMs: [prompt], the
                     user's message, formatted with the run's template as peftkit generate does)
  id_field=COLUMN    copy this column into each output record as id
  batch_size=32      rows per forward pass (or per generation batch)
  max_new_tokens=128 a causal-LM reply's length limit (greedy decoding)
  backbone.path=DIR  load the runs' base from this folder (its fingerprint is checked)
  overwrite=true     replace an existing out= file (without it, peftkit refuses to)
"""

LS_HELP = """usage: peftkit ls [recipes|methods|backbones|datasets|trainers|merges]
       peftkit ls targets [recipe=NAME] [backbone=NAME | backbone.path=DIR] [method=NAME] [KEY=VALUE ...]

List what exists, one line each. `ls targets` loads the backbone, applies the method and prints the
modules it adapts (folded over layers: `model.layers.N.self_attn.q_proj`), their layer type, shape and
roles, and the trainable parameters, without training (the same as `peftkit train ... --dry-run`).
"""


def _kv(args: list[str], command: str) -> dict[str, str]:
    out = {}
    for a in args:
        if "=" not in a:
            raise UserError(f"peftkit {command}: expected KEY=VALUE, got '{a}' (see peftkit {command} --help)")
        k, v = a.split("=", 1)
        if k in out:
            raise UserError(f"peftkit {command}: {k}= is given twice ({k}={out[k]} and {a}); give it once")
        out[k] = v
    return out


def _quote_home(args: list[str]) -> list[str]:
    """`out=~/x` as `out='~/x'`: Hydra's override grammar takes no bare `~` in a value, and every path
    then goes through `files.user_path`, which expands it (quoted or not, the same way everywhere)."""
    out = []
    for a in args:
        key, eq, value = a.partition("=")
        out.append(f"{key}='{value}'" if eq and re.fullmatch(r"~[\w.@+-]*(/[^'\"\\,\[\]{}()=]*)?", value) else a)
    return out


def _once(args: list[str], command: str) -> None:
    """A key given twice is refused: which one wins (Hydra takes the last) is nothing to guess at."""
    seen: dict[str, str] = {}
    for a in args:
        if "=" not in a:
            continue
        key = a.split("=", 1)[0].lstrip("+~")
        if key in seen:
            raise UserError(f"peftkit {command}: {key}= is given twice ({seen[key]} and {a}); give it once")
        seen[key] = a


# Hydra's own options that `peftkit train` passes on (None: any value; a tuple: the values it takes)
TRAIN_OPTIONS = {"--cfg": ("job", "hydra", "all"), "-c": ("job", "hydra", "all"), "--package": None, "-p": None,
                 "--resolve": False, "--hydra-help": False}


def _train_args(args: list[str]) -> tuple[bool, list[str], list[str]]:
    """(multirun, Hydra options, overrides); an option peftkit does not pass on is one line."""
    multirun, passthrough, overrides = False, [], []
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-m", "--multirun"):
            multirun = True
        elif a.startswith("-"):
            name, eq, value = a.partition("=")
            if name not in TRAIN_OPTIONS:
                raise UserError(f"peftkit train: unknown option {a}; it takes -m, --cfg job|hydra|all, --resolve, "
                                f"--package PKG and KEY=VALUE overrides (see peftkit train --help)")
            allowed = TRAIN_OPTIONS[name]
            if allowed is False:
                passthrough.append(a)
            else:
                if not eq:
                    if i + 1 >= len(args):
                        raise UserError(f"peftkit train: {name} needs a value" + (f": one of {', '.join(allowed)}" if allowed else ""))
                    i += 1
                    value = args[i]
                if allowed and value not in allowed:
                    raise UserError(f"peftkit train: {name} {value}: expected one of {', '.join(allowed)}")
                passthrough += [name, value]
        else:
            overrides.append(a)
        i += 1
    return multirun, passthrough, overrides


def _flag(args: list[str], key: str, command: str) -> tuple[bool, list[str]]:
    """Pull a command-level `key=true|false` out of the arguments (it is no config value)."""
    values = [a.split("=", 1)[1] for a in args if a.startswith(key + "=")]
    if len(values) > 1:
        raise UserError(f"peftkit {command}: {key}= is given twice; give it once")
    if values and values[0].lower() not in ("true", "false"):
        raise UserError(f"{key}={values[0]}: expected true or false")
    return bool(values) and values[0].lower() == "true", [a for a in args if not a.startswith(key + "=")]


def cmd_train(args: list[str]) -> int:
    from peftkit import config, launch

    if any(a in ("-h", "--help") for a in args):
        print(TRAIN_HELP)
        return 0
    dry_run, args = "--dry-run" in args, [a for a in args if a != "--dry-run"]
    multirun, passthrough, overrides = _train_args(args)
    overrides = _quote_home(overrides)
    _once(overrides, "train")
    if multirun and any(a in ("--cfg", "-c") for a in passthrough):
        raise UserError("--cfg prints one config; drop -m, or give one value per key")
    overwrite, overrides = _flag(overrides, "overwrite", "train")
    recipe, overrides = config.split_recipe(overrides, default="quickstart")
    overrides = config.multitask_shorthand(overrides)
    if dry_run:
        from peftkit import listing

        if multirun:
            raise UserError("--dry-run shows one run's targets; drop -m, or give one value per key")
        listing.show_targets(recipe, overrides, read_data=True)
        return 0
    cfg, composed, out = config.check(recipe, overrides, multirun)
    overrides, resumed = launch.resolve_resume(recipe, overrides, cfg)
    if resumed:  # resume=DIR became resume=true in DIR's folder: another config
        composed = None if multirun else config.compose(recipe, overrides, with_hydra=True)
    return launch.hydra_train(recipe, overrides, multirun, passthrough, overwrite, resumed or out, composed)


def cmd_eval(args: list[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        print(EVAL_HELP)
        return 0
    from peftkit import evaluate

    kv = _kv(args, "eval")
    if "run" not in kv:
        raise UserError("peftkit eval needs run=DIR (a directory written by peftkit train)")
    evaluate.run(user_path(kv.pop("run"), "run"), kv.pop("split", "validation"), kv)
    return 0


def cmd_merge(args: list[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        print(MERGE_HELP)
        return 0
    from peftkit import config, merge

    for a in args:
        if "=" not in a:
            raise UserError(f"peftkit merge: expected KEY=VALUE, got '{a}' (see peftkit merge --help)")
    overwrite, args = _flag(args, "overwrite", "merge")
    args = _quote_home([f"backbone_path={a.split('=', 1)[1]}" if a.startswith("backbone.path=") else a for a in args])
    _once(args, "merge")
    picks = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if a.split("=", 1)[0] in ("mode", "recipe")}
    if len(picks) == 2:
        raise UserError("peftkit merge takes mode= or recipe=, not both (a recipe names its mode)")
    name = next(iter(picks.values()), "into_base")
    rest = [a for a in args if a.split("=", 1)[0] not in ("mode", "recipe")]
    merge.run(config.compose_merge(name, rest), overwrite)
    return 0


def _lm_command(args: list[str], command: str, allowed: set[str]) -> tuple[Path, int, dict[str, str], dict[str, str]]:
    kv = _kv(args, command)
    if "run" not in kv:
        raise UserError(f"peftkit {command} needs run=DIR (a causal-LM run written by peftkit train)")
    own = {k: kv.pop(k) for k in list(kv) if k in allowed}
    try:
        n = int(own.pop("max_new_tokens", "128"))
        assert n >= 1
    except (ValueError, AssertionError):
        raise UserError(f"max_new_tokens={kv.get('max_new_tokens')}: expected a whole number ≥ 1") from None
    return user_path(kv.pop("run"), "run"), n, own, kv


def cmd_generate(args: list[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        print(GENERATE_HELP)
        return 0
    from peftkit import generate

    run_dir, n, own, overrides = _lm_command(args, "generate", {"prompt", "prompts", "max_new_tokens"})
    if ("prompt" in own) == ("prompts" in own):
        raise UserError("peftkit generate takes prompt=TEXT or prompts=FILE (one prompt per line)")
    if "prompts" in own:
        f = user_path(own["prompts"], "prompts")
        if not f.is_file():
            raise UserError(f"prompts={f}: no such file; give a text file with one prompt per line")
        prompts = [line for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        prompts = [own["prompt"]]
    generate.run(run_dir, prompts, n, overrides)
    return 0


def cmd_chat(args: list[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        print(CHAT_HELP)
        return 0
    from peftkit import generate

    run_dir, n, own, overrides = _lm_command(args, "chat", {"system", "max_new_tokens"})
    generate.chat(run_dir, n, overrides, own.get("system"))
    return 0


def _list(value: str, key: str) -> list[str]:
    """`[a,b]` (or `a,b`, or `a`) as a list of its items."""
    text = value.strip()
    if text.startswith("[") != text.endswith("]"):
        raise UserError(f"{key}={value}: unbalanced brackets; write {key}=[A,B]")
    items = [v.strip().strip("'\"") for v in text.strip("[]").split(",")]
    if not all(items):
        raise UserError(f"{key}={value}: an empty item; write {key}=[A,B]")
    return items


def _count(kv: dict[str, str], key: str) -> int | None:
    if key not in kv:
        return None
    try:
        n = int(kv[key])
        assert n >= 1
    except (ValueError, AssertionError):
        raise UserError(f"{key}={kv[key]}: expected a whole number ≥ 1") from None
    return n


def cmd_predict(args: list[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        print(PREDICT_HELP)
        return 0
    from peftkit import predict

    overwrite, args = _flag(args, "overwrite", "predict")
    kv = _kv(args, "predict")
    known = {"runs", "file", "out", "adapter_field", "text_fields", "id_field", "batch_size", "max_new_tokens", "backbone.path"}
    unknown = sorted(set(kv) - known)
    if unknown:
        raise UserError(f"peftkit predict: unknown option {', '.join(unknown)}; it takes {', '.join(sorted(known))} "
                        f"and overwrite= (see peftkit predict --help)")
    missing = [k for k in ("runs", "file", "out") if k not in kv]
    if missing:
        raise UserError(f"peftkit predict needs {' and '.join(k + '=' for k in missing)} (see peftkit predict --help)")
    predict.run([str(user_path(r, "runs")) for r in _list(kv["runs"], "runs")], user_path(kv["file"], "file"),
                user_path(kv["out"], "out"), kv.get("adapter_field", "adapter"),
                _list(kv["text_fields"], "text_fields") if "text_fields" in kv else None, kv.get("id_field"),
                _count(kv, "batch_size") or 32, _count(kv, "max_new_tokens"), overwrite,
                str(user_path(kv["backbone.path"], "backbone.path")) if "backbone.path" in kv else None)
    return 0


def cmd_report(args: list[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        print(REPORT_HELP)
        return 0
    from peftkit.evaluation import leaderboard

    flags = [a for a in args if a.startswith("-")]
    if flags:
        raise UserError(f"peftkit report: unknown option {flags[0]}; it takes DIR... and KEY=VALUE (out=DIR), see peftkit report --help")
    dirs = [user_path(a, "DIR") for a in args if "=" not in a]
    kv = _kv([a for a in args if "=" in a], "report")
    unknown = set(kv) - {"out", "submission", "data_dir"}
    if unknown:
        raise UserError(f"peftkit report: unknown option {', '.join(sorted(unknown))} (see peftkit report --help)")
    if not dirs:
        raise UserError("peftkit report needs at least one DIR (see peftkit report --help)")
    submission = kv.get("submission", "false").lower()
    if submission not in ("true", "false"):
        raise UserError(f"submission must be true or false, got '{kv['submission']}'")
    leaderboard.run(dirs, user_path(kv["out"], "out") if "out" in kv else None, submission == "true", kv.get("data_dir"))
    return 0


def cmd_ls(args: list[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        print(LS_HELP)
        return 0
    from peftkit import config, listing

    if args and args[0] == "targets":  # which modules a recipe adapts: recipe=, backbone=, method=, KEY=VALUE
        overrides = _quote_home(args[1:])
        _once(overrides, "ls targets")
        recipe, overrides = config.split_recipe(overrides, default="quickstart")
        listing.show_targets(recipe, overrides)
        return 0
    if len(args) > 1:
        raise UserError(f"peftkit ls takes one word, got {' '.join(args)} (see peftkit ls --help)")
    what = args[0] if args else "all"
    listing.show(what)
    return 0


INTERRUPTED = {"train": " before training started; nothing was kept", "eval": "; the run's adapter and checkpoints are untouched",
               "merge": "; nothing was written to out=", "report": "; no leaderboard was written",
               "predict": "; nothing was written to out="}

COMMANDS = {"train": cmd_train, "eval": cmd_eval, "merge": cmd_merge, "report": cmd_report, "generate": cmd_generate,
            "chat": cmd_chat, "predict": cmd_predict, "ls": cmd_ls}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    traceback = os.environ.get("PEFTKIT_TRACEBACK", "").strip().lower() in ("1", "true", "yes", "on")
    from peftkit import config

    config.clear_user_dirs()  # --recipes-dir holds for this command only
    command = None
    try:
        while argv and argv[0].startswith("--") and argv[0] not in ("--help",):
            opt = argv.pop(0)
            if opt == "--version":
                from peftkit import __version__

                print(f"peftkit {__version__}")
                return 0
            if opt == "--traceback":
                traceback = True
            elif opt.startswith("--recipes-dir"):
                from peftkit import config

                if "=" not in opt and not argv:
                    raise UserError("--recipes-dir needs a folder: peftkit --recipes-dir DIR COMMAND ...")
                config.add_user_dir(opt.split("=", 1)[1] if "=" in opt else argv.pop(0))
            else:
                raise UserError(f"unknown option {opt}; see peftkit --help")
        if not argv or argv[0] in ("-h", "--help", "help"):
            print(USAGE)
            return 0
        command, rest = argv[0], argv[1:]
        if command not in COMMANDS:
            raise UserError(f"unknown command '{command}'; choose one of: {', '.join(COMMANDS)}")
        return COMMANDS[command](rest) or 0
    except UserError as e:
        if traceback:
            raise
        print(f"peftkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C: one line that says what was kept (a run says it itself), exit 130
        if traceback:
            raise
        message = str(e) if isinstance(e, Interrupted) and str(e) else f"interrupted (Ctrl-C){INTERRUPTED.get(command, '')}"
        print(f"peftkit: error: {message}", file=sys.stderr)
        return e.code if isinstance(e, Interrupted) else 130
    except OSError as e:  # the machine's doing (disk full, read-only): one line; a bug's error keeps its traceback
        message = write_error(e)
        if message is None or traceback:
            raise
        print(f"peftkit: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
