"""GLUE-server submission assembled from a leaderboard's best run per task.

Each best run predicts its task's test split (as `peftkit eval split=test` does); the TSVs are
gathered under the GLUE server's file names and zipped flat, the layout the server uploads.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from peftkit.errors import UserError

# Every file the GLUE server wants in one upload; AX is the diagnostic set, predicted by the MNLI model.
SERVER_FILES = ("CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI-m", "MNLI-mm", "QNLI", "RTE", "WNLI", "AX")


def predict_best(board: dict, data_dir: str | None) -> dict[str, Path]:
    """{server file name: TSV} from each GLUE task's best run, predicting its test split now."""
    from peftkit import evaluate
    from peftkit.data.glue import TASKS

    files = {}
    for task, best in board["best"].items():
        if not str(best.get("dataset", "")).startswith("glue/"):
            continue
        run = Path(best["dir"])
        overrides = {"dataset.data_dir": data_dir} if data_dir else {}
        try:
            written = evaluate.run(run, "test", overrides)
        except UserError as e:
            raise UserError(f"submission: {task} (best run {run}): {e}") from None
        for file_name in TASKS[task].submission:  # a multi-task run writes every task's files
            files[file_name] = Path(written[file_name])
    if not files:
        raise UserError("submission=true needs GLUE runs (dataset=glue/...); none of these runs is one")
    return files


def write(files: dict[str, Path], out: Path) -> None:
    """out/submission/*.tsv, out/submission.zip and a note naming the files the server still needs."""
    folder = out / "submission"
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out / "submission.zip", "w", zipfile.ZIP_DEFLATED) as z:
        for name in sorted(files):
            text = files[name].read_text(encoding="utf-8")
            (folder / f"{name}.tsv").write_text(text, encoding="utf-8")
            z.writestr(f"{name}.tsv", text)
    missing = [f"{n}.tsv" for n in SERVER_FILES if n not in files]
    note = ["# GLUE submission", "", "From the best run per task (best_runs.md): " +
            ", ".join(f"{n}.tsv" for n in sorted(files)) + ".", ""]
    if missing:
        note += ["The GLUE server takes one zip with all of its files; these runs do not provide: " +
                 ", ".join(missing) + ".", ""]
    (folder / "README.md").write_text("\n".join(note), encoding="utf-8")
