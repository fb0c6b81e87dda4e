"""The local paths a recipe stage reads: one finder decides what must exist at validation, which paths no ``out``
may be or contain, and whose identities decide whether a finished stage reruns.

Each case is checked from the outside (``embedforge recipes validate`` / ``embedforge run``: exit code, the one
error line, what is on disk afterwards), then the finder itself is checked against all three uses at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from embedforge import preflight, stages
from embedforge.configs import opt
from embedforge.model import LINEAGE_FILE, make_lineage
from embedforge.recipe import load_recipe, stage_inputs
from embedforge.testing import error_line, run_cli

STS_ROWS = ["sentence1\tsentence2\tscore", "a cat sits\ta cat is sitting\t4.5", "a dog runs\tthe sky is blue\t0.5",
            "a man cooks\ta man is cooking\t5.0", "a girl sings\ta car drives\t1.0"]


@dataclass
class PathsConfig:
    """A stage used only by these tests: keys shaped like the real stages' (model, data, tasks, teachers)."""

    model: str = opt("none", help="a model: directory, alias or hub id")
    data: str | dict[str, Any] | None = opt(None, help="texts: a built-in name, a data file, a data mapping or beir:FOLDER")
    extra_teachers: list[str] = opt(factory=list, help="more models")
    tasks: list[str] = opt(factory=list, help="task specs")
    color: str = opt("red", help="a plain word")


RUNS: list[str] = []


def paths_runner(config: PathsConfig, out_dir: Path, ctx) -> None:
    """Writes its output the way real stages do: into a temporary directory that replaces ``out_dir``."""
    from embedforge.outputs import atomic_dir

    with atomic_dir(out_dir) as tmp:
        (tmp / "result.txt").write_text(config.color)
        (tmp / LINEAGE_FILE).write_text(json.dumps(make_lineage(stage="toy", source=config.model, config=config)))
    RUNS.append(ctx.stage_name)


@pytest.fixture(autouse=True)
def paths_stage(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(stages.STAGES, "paths", (f"{__name__}:PathsConfig", f"{__name__}:paths_runner"))
    monkeypatch.setitem(preflight.MODEL_KEYS, "paths", ("extra_teachers",))  # as the distill stage's
    monkeypatch.setitem(preflight.DATA_KEYS, "paths", (("data", "texts"),))  # as the binarizer's
    RUNS.clear()
    yield






def _recipe(tmp_path: Path, *stage_bodies: str) -> Path:
    """``r.yaml`` with one stage per body (its keys, one per line); line 3 is the first stage's ``- stage:``."""
    text = "# embedforge run r.yaml\nstages:\n"
    for body in stage_bodies:
        lines = body.strip("\n").splitlines()
        text += f"  - {lines[0]}\n" + "".join(f"    {ln}\n" for ln in lines[1:])
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def _eval_output(folder: Path) -> Path:
    """An earlier eval output (embedforge may replace it) in which the user has since kept a data file."""
    folder.mkdir(parents=True)
    (folder / LINEAGE_FILE).write_text(json.dumps(make_lineage(stage="eval", source="x")))
    (folder / "metrics.json").write_text("{}")
    (folder / "sts.tsv").write_text("\n".join(STS_ROWS) + "\n")
    return folder


def _beir(folder: Path) -> Path:
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text('{"_id": "d1", "title": "", "text": "a cat"}\n')
    (folder / "queries.jsonl").write_text('{"_id": "q1", "text": "cat"}\n')
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    return folder


# ------------------------------------------------------------------ an out may not be or hold a task's file


@pytest.mark.parametrize("spec", ["sts:{f}", "classification:{f}", "retrieval:{d}", "retrieval:{d}:test"])
def test_an_out_holding_a_task_file_is_refused_at_validation(spec: str, tmp_path: Path) -> None:
    folder = _eval_output(tmp_path / "evals")
    _beir(folder / "beir")
    task = spec.format(f=folder / "sts.tsv", d=folder / "beir")
    read = folder / ("sts.tsv" if "{f}" in spec else "beir")
    before = _tree(folder)
    path = _recipe(tmp_path, f"stage: eval\nmodel: some/model\nout: {folder}\ntasks: ['{task}']")
    res = run_cli("recipes", "validate", str(path))
    assert res.exit_code == 2, res.output
    assert error_line(res.output) == (f"{path}:5: stage 'eval': out: {folder} is (or contains) {read}, which stage "
                                       "'eval' reads; writing there would delete it: choose another out")
    assert _tree(folder) == before


def test_a_later_out_holding_an_earlier_stages_task_file_is_refused(tmp_path: Path) -> None:
    folder = _eval_output(tmp_path / "evals")
    path = _recipe(tmp_path, f"stage: eval\nmodel: some/model\nout: {tmp_path}/e\ntasks: ['sts:{folder}/sts.tsv']",
                   f"stage: paths\nname: later\nout: {folder}")
    res = run_cli("run", str(path))
    assert res.exit_code == 2, res.output
    assert error_line(res.output) == (f"{path}:9: stage 'later': out: {folder} is (or contains) {folder}/sts.tsv, "
                                       "which stage 'eval' reads; writing there would delete it: choose another out")
    assert RUNS == [] and not (tmp_path / "e").exists() and (folder / "sts.tsv").is_file()


def test_an_eval_run_does_not_delete_the_task_file_it_reads(tiny_st_dir: Path, tmp_path: Path) -> None:
    # The out is an earlier eval output, so the output check alone lets the stage replace it (with the file).
    folder = _eval_output(tmp_path / "evals")
    before = _tree(folder)
    path = _recipe(tmp_path, f"stage: eval\nmodel: {tiny_st_dir}\nout: {folder}\ntasks: ['sts:{folder}/sts.tsv']")
    res = run_cli("run", str(path))
    assert res.exit_code == 2, res.output
    assert "is (or contains)" in error_line(res.output)
    assert _tree(folder) == before


# --------------------------------------------------------------------------------- beir:FOLDER data sources


def test_a_beir_data_folder_is_an_input(tmp_path: Path) -> None:
    beir = _beir(tmp_path / "scifact")
    before = _tree(beir)
    path = _recipe(tmp_path, f"stage: binarizer\nmodel: some/model\nout: {beir}\ndata: beir:{beir}")
    res = run_cli("recipes", "validate", str(path))
    assert res.exit_code == 2, res.output
    assert error_line(res.output) == (f"{path}:5: stage 'binarizer': out: {beir} is (or contains) {beir}, which "
                                       "stage 'binarizer' reads; writing there would delete it: choose another out")
    assert _tree(beir) == before
    missing = _recipe(tmp_path, f"stage: compress\nmodel: some/model\nout: {tmp_path}/c\n"
                                f"heal_data: beir:{tmp_path}/gone:dev")
    res = run_cli("recipes", "validate", str(missing))
    assert res.exit_code == 2, res.output
    assert error_line(res.output) == (f"{missing}:6: stage 'compress': heal_data: file or directory not found: "
                                       f"{tmp_path}/gone")
    assert not (tmp_path / "c").exists()


def test_a_changed_beir_folder_reruns_the_stage(tmp_path: Path) -> None:
    beir = _beir(tmp_path / "scifact")
    path = _recipe(tmp_path, f"stage: paths\nout: {tmp_path}/out\ndata: beir:{beir}:test")
    assert run_cli("run", str(path)).exit_code == 0 and RUNS == ["paths"]
    res = run_cli("run", str(path))
    assert res.exit_code == 0 and "paths: skipped" in res.output and RUNS == ["paths"]
    (beir / "corpus.jsonl").write_text('{"_id": "d1", "title": "", "text": "a dog"}\n')
    res = run_cli("run", str(path), "--dry-run")
    assert res.exit_code == 0
    assert res.output.strip() == f"paths (paths) -> {tmp_path}/out: will run: input {beir} changed"
    res = run_cli("run", str(path))
    assert res.exit_code == 0 and "paths: ran" in res.output and RUNS == ["paths", "paths"]


# ------------------------------------------------------------ names that are not paths, even where one exists


def test_a_word_that_names_the_out_does_not_block_a_rerun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = _recipe(tmp_path, "stage: paths\nout: blue\ncolor: blue")
    assert run_cli("run", str(path)).exit_code == 0 and RUNS == ["paths"]
    res = run_cli("run", str(path))  # ./blue now exists: it is the out, not something the stage reads
    assert res.exit_code == 0, res.output
    assert res.output.strip() == f"paths: skipped -> {tmp_path}/blue"
    assert (tmp_path / "blue" / "result.txt").read_text() == "blue"


@pytest.mark.parametrize("body", ["stage: eval\nmodel: some/model\nout: stsb-dev\ntasks: [stsb-dev]",
                                  "stage: convert\nmodel: smollm2-135m\nout: smollm2-135m",
                                  "stage: binarizer\nmodel: some/model\nout: texts\ndata: texts"])
def test_builtin_names_and_aliases_are_not_local_inputs(body: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = body.split("out: ")[1].split("\n")[0]
    (tmp_path / out).mkdir()  # an earlier run's output: the stage reads the built-in / alias, not this folder
    (tmp_path / out / LINEAGE_FILE).write_text(json.dumps(make_lineage(stage=body.split()[1], source="x")))
    res = run_cli("recipes", "validate", str(_recipe(tmp_path, body)))
    assert res.exit_code == 0, res.output
    assert "Error" not in res.output


# -------------------------------------------------------------------------- models named without a slash


def _toy_model(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    (folder / "result.txt").write_text(text)
    return folder


@pytest.mark.parametrize("key,value", [("model", "."), ("extra_teachers", "[teacher]"),
                                       ("extra_teachers", "[./teacher]")])
def test_a_changed_local_model_named_without_a_slash_reruns_the_stage(key: str, value: str, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    teacher = _toy_model(work / "teacher" if key == "extra_teachers" else work, "v1")
    monkeypatch.chdir(work)
    path = _recipe(tmp_path, f"stage: paths\nout: {tmp_path}/out\n{key}: {value}")
    assert run_cli("run", str(path)).exit_code == 0 and RUNS == ["paths"]
    assert "paths: skipped" in run_cli("run", str(path)).output and RUNS == ["paths"]
    (teacher / "result.txt").write_text("v2")  # the model it read is retrained
    res = run_cli("run", str(path))
    assert res.exit_code == 0, res.output
    assert res.output.strip() == f"paths: ran -> {tmp_path}/out" and RUNS == ["paths", "paths"]


# ------------------------------------------------------------- one finder: the three uses agree on each form


#: form -> (key, value, the path it reads or None, the value naming a missing path or None: may be a hub id)
FORMS: dict[str, tuple[str, str, str | None, str | None]] = {
    "file": ("data", "rows.jsonl", "rows.jsonl", "gone.jsonl"),
    "dot-file": ("data", "./rows.jsonl", "rows.jsonl", "./gone.jsonl"),
    "dir": ("data", "{root}/bdir", "bdir", "{root}/gone"),
    "data-word": ("data", "saved", "saved", "gone"),  # a saved datasets folder; no hub name lacks a slash
    "data-mapping": ("data", "{{path: rows.jsonl, kind: pairs}}", "rows.jsonl", "{{path: gone, kind: pairs}}"),
    "sts": ("tasks", "['sts:{root}/rows.jsonl']", "rows.jsonl", "['sts:{root}/gone.jsonl']"),
    "retrieval-split": ("tasks", "['retrieval:bdir:test']", "bdir", "['retrieval:gone:test']"),
    "beir": ("data", "beir:bdir:test", "bdir", "beir:gone:test"),
    "model-word": ("model", "mdir", "mdir", None),
    "dot-model": ("model", ".", ".", None),
    "teacher-word": ("extra_teachers", "[tdir]", "tdir", None),
    "hub-id": ("model", "org/name", "org/name", None),  # a local folder of that name is what the stage loads
    "builtin": ("data", "texts", None, None),
    "builtin-task": ("tasks", "[stsb-dev]", None, None),
    "alias": ("model", "smollm2-135m", None, None),
    "plain-word": ("color", "green", None, None),
    "data-kind": ("data", "{{path: texts, kind: pairs}}", None, None),  # the folder ./pairs is not read
}


@pytest.mark.parametrize("form", list(FORMS))
def test_the_out_check_the_existence_check_and_the_inputs_agree(form: str, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    root.mkdir()
    monkeypatch.chdir(root)
    (root / "rows.jsonl").write_text('{"text": "a"}\n')
    _beir(root / "bdir")
    for name in ("texts", "stsb-dev", "smollm2-135m", "green", "mdir", "tdir", "org/name", "saved", "pairs"):
        (root / name).mkdir(parents=True)
    key, value, read, gone = FORMS[form]
    body = f"stage: paths\nname: reader\nout: {tmp_path}/out\n{key}: {value.format(root=root)}"
    recipe = load_recipe(_recipe(tmp_path, body))
    target = (root / read).resolve() if read else root / ("pairs" if form == "data-kind" else value.strip("[]"))
    assert stage_inputs(recipe.stages[0]) == ([str(target)] if read else [])
    writer = _recipe(tmp_path, body, f"stage: paths\nname: writer\nout: {target}")
    res = run_cli("recipes", "validate", str(writer))
    if read:
        assert res.exit_code == 2, res.output
        assert f"is (or contains) {target}, which stage 'reader' reads" in error_line(res.output)
    else:
        assert res.exit_code == 0, res.output
    if gone:  # a path the finder counts must exist
        missing = _recipe(tmp_path, body.replace(f"{key}: {value.format(root=root)}", f"{key}: {gone.format(root=root)}"))
        res = run_cli("recipes", "validate", str(missing))
        assert res.exit_code == 2, res.output
        assert error_line(res.output).startswith(f"{missing}:6: stage 'reader': {key}")
        assert "file or directory not found: " in error_line(res.output) and "gone" in res.output


@pytest.mark.parametrize("body,read", [
    ("stage: distill\nmodel: some/teacher\nout: {out}\nextra_teachers: [tdir]\nteacher_weights: [1, 1]\n"
     "layers: 2\ntexts: [texts]", "tdir"),
    ("stage: distill\nmodel: some/teacher\nout: {out}\nstudent: model\nstudent_model: sdir\ntexts: [texts]", "sdir"),
    ("stage: eval\nmodel: some/model\nout: {out}\nexport: xdir\ntasks: [stsb-dev]", "xdir"),
    ("stage: mntp\nmodel: some/model\nout: {out}\nlm_source: ldir", "ldir"),
])
def test_model_folders_named_without_a_slash_are_inputs_of_the_real_stages(body: str, read: str, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / read).mkdir()
    path = _recipe(tmp_path, body.format(out=tmp_path / "out"))
    assert stage_inputs(load_recipe(path).stages[0]) == [str(tmp_path / read)]
    (tmp_path / read).rmdir()  # no such folder: a hub id, read by the stage itself
    assert stage_inputs(load_recipe(path).stages[0]) == []


def test_a_path_no_file_system_accepts_is_a_one_line_error(tmp_path: Path) -> None:
    path = _recipe(tmp_path, f'stage: binarizer\nmodel: some/model\nout: {tmp_path}/b\ndata: "./a\\0b.jsonl"')
    res = run_cli("recipes", "validate", str(path))  # was a ValueError traceback (embedded null byte)
    assert res.exit_code == 2, res.output
    assert error_line(res.output) == f"{path}:6: stage 'binarizer': data: file or directory not found: './a\\x00b.jsonl'"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


@pytest.mark.parametrize("body", ["stage: mntp\nmodel: some/model\nout: {out}\ndata: [saved]",
                                  "stage: contrastive\nmodel: some/model\nout: {out}\ndata: [{{path: saved}}]",
                                  "stage: compress\nmodel: some/model\nout: {out}\nheal_data: saved"])
def test_a_data_folder_named_without_a_slash_is_an_input_of_the_real_stages(body: str, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "saved").mkdir()  # a saved datasets folder: read from disk, since no hub name lacks a slash
    path = _recipe(tmp_path, body.format(out=tmp_path / "out"))
    assert stage_inputs(load_recipe(path).stages[0]) == [str(tmp_path / "saved")]
    clash = _recipe(tmp_path, body.format(out=tmp_path / "saved"))
    res = run_cli("recipes", "validate", str(clash))
    assert res.exit_code == 2, res.output
    assert error_line(res.output).endswith(f"out: {tmp_path}/saved is (or contains) {tmp_path}/saved, which stage "
                                            f"'{body.split()[1]}' reads; writing there would delete it: choose "
                                            "another out")
    (tmp_path / "saved").rmdir()
    res = run_cli("recipes", "validate", str(path))
    assert res.exit_code == 2, res.output
    assert error_line(res.output).endswith(": file or directory not found: saved")
