"""Pre-flight: every stage's data, models and outputs are checked before the first stage of a recipe runs."""

from __future__ import annotations

import errno
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from embedforge import stages
from embedforge.configs import ConfigError, opt
from embedforge.data import DataError
from embedforge.errors import EmbedforgeError, OutputError, RunError, UsageError
from embedforge.model import LINEAGE_FILE, make_lineage
from embedforge.recipe import check_recipe, load_recipe, run_recipe
from embedforge.sources import SourceError


@dataclass
class ToyConfig:
    """A stage used only by these tests: writes its model name into ``out``."""

    model: str = opt(help="input")


RUNS: list[str] = []


def toy_runner(config: ToyConfig, out_dir: Path, ctx) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "result.txt").write_text(config.model)
    (out_dir / LINEAGE_FILE).write_text(json.dumps(make_lineage(stage="toy", source=config.model, config=config)))
    RUNS.append(ctx.stage_name)


@pytest.fixture(autouse=True)
def toy_stage(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(stages.STAGES, "toy", (f"{__name__}:ToyConfig", f"{__name__}:toy_runner"))
    RUNS.clear()
    yield


def _model_dir(path: Path, max_positions: int = 128, weight_bytes: int = 0) -> Path:
    """A folder that looks like a model to the checks (they read config.json and file sizes, nothing more)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "bert", "max_position_embeddings": max_positions}))
    if weight_bytes:
        (path / "model.safetensors").write_bytes(b"\0" * weight_bytes)
    return path


def _recipe(tmp_path: Path, second: str, first_model: str = "some/hub-model") -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(
        "stages:\n"
        "  - name: first\n"
        "    stage: toy\n"
        f"    model: {first_model}\n"
        f"    out: {tmp_path / 'runs' / 'first'}\n"
        + second
    )
    return path


def _contrastive(tmp_path: Path, data: Path, model: str = "${stages.first.out}") -> str:
    return ("  - name: tune\n"
            "    stage: contrastive\n"
            f"    model: {model}\n"
            f"    out: {tmp_path / 'runs' / 'tuned'}\n"
            f"    data: [{data}]\n")


def test_bad_json_in_the_second_stage_stops_the_run_before_the_first_stage(tmp_path: Path) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"anchor": "a", "positive": "b"}\n{"anchor": "c", "positive": \n')
    recipe = load_recipe(_recipe(tmp_path, _contrastive(tmp_path, data)))
    with pytest.raises(DataError) as info:
        run_recipe(recipe)
    assert str(info.value) == f"stage 'tune': data[0]: {data}:2: invalid JSON (Expecting value)"
    assert info.value.exit_code == 2
    assert RUNS == [] and not (tmp_path / "runs" / "first").exists()


def test_missing_columns_are_found_with_the_columns_the_stage_reads(tmp_path: Path) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"query": "a", "doc": "b"}\n')
    recipe = load_recipe(_recipe(tmp_path, _contrastive(tmp_path, data)))
    with pytest.raises(DataError, match=r"^stage 'tune': data\[0\]: .*pairs\.jsonl: missing column\(s\) 'anchor', "
                                        r"'positive'; the file has 'query', 'doc'"):
        check_recipe(recipe)
    data.write_text('{"anchor": "a", "positive": "b"}\n')  # pairs without negatives are fine for contrastive
    check_recipe(recipe)


def test_a_data_mapping_without_a_path_is_refused(tmp_path: Path) -> None:
    second = ("  - name: tune\n    stage: contrastive\n    model: ${stages.first.out}\n"
              f"    out: {tmp_path / 'runs' / 'tuned'}\n    data: [{{columns: {{anchor: q}}}}]\n")
    with pytest.raises(DataError, match=r"^stage 'tune': data\[0\]: a data mapping needs a path"):
        check_recipe(load_recipe(_recipe(tmp_path, second)))


def test_eval_task_files_are_read_before_work(tmp_path: Path) -> None:
    model = _model_dir(tmp_path / "model")
    sts = tmp_path / "sts.tsv"
    sts.write_text("sentence1\tsentence2\tscore\na\tb\thigh\n")
    second = (f"  - name: score\n    stage: eval\n    model: {model}\n    out: {tmp_path / 'runs' / 'eval'}\n"
              f"    tasks: ['sts:{sts}']\n")
    with pytest.raises(DataError, match=r"stage 'score': tasks\[0\]: .*sts\.tsv:2: column 'score': expected a number"):
        run_recipe(load_recipe(_recipe(tmp_path, second)))
    assert RUNS == []


def test_model_directories_must_hold_a_model_unless_an_earlier_stage_writes_them(tmp_path: Path) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"anchor": "a", "positive": "b"}\n')
    empty = tmp_path / "empty"
    empty.mkdir()
    recipe = load_recipe(_recipe(tmp_path, _contrastive(tmp_path, data, model=str(empty))))
    with pytest.raises(SourceError, match=rf"^stage 'tune': model: {empty} holds no model \(no config\.json"):
        check_recipe(recipe)
    # the first stage's output does not exist yet, but the run makes it: no error
    check_recipe(load_recipe(_recipe(tmp_path, _contrastive(tmp_path, data))))
    # with --only the first stage does not run, so its output must already be there
    with pytest.raises(SourceError, match=r"stage 'tune': model: model directory not found: .*runs/first"):
        check_recipe(load_recipe(_recipe(tmp_path, _contrastive(tmp_path, data))), only=["tune"])


def test_stages_that_will_be_skipped_are_not_checked(tmp_path: Path) -> None:
    data = tmp_path / "texts.jsonl"
    data.write_text('{"text": "a"}\n')
    second = (f"  - name: second\n    stage: toy\n    model: ${{stages.first.out}}\n"
              f"    out: {tmp_path / 'runs' / 'second'}\n")
    recipe = load_recipe(_recipe(tmp_path, second))
    assert [s for _, s in run_recipe(recipe)] == ["ran", "ran"]
    # The toy output of 'first' holds no config.json, so the model check of 'second' would refuse it; the
    # complete and current 'second' is skipped without being checked, and checked when it is forced to run.
    assert [s for _, s in run_recipe(recipe, only=["second"])] == ["skipped"]
    with pytest.raises(SourceError, match="holds no model"):
        run_recipe(recipe, only=["second"], force=True)


def test_max_seq_length_beyond_the_model_positions_is_refused(tmp_path: Path) -> None:
    model = _model_dir(tmp_path / "model", max_positions=128)
    base = (f"  - name: onnx\n    stage: export\n    model: {model}\n    out: {tmp_path / 'runs' / 'onnx'}\n")
    with pytest.raises(ConfigError, match=r"^stage 'onnx': max_seq_length: 512 exceeds the model's "
                                          r"max_position_embeddings 128 \(.*config\.json\); set max_seq_length "
                                          r"to at most 128$"):
        check_recipe(load_recipe(_recipe(tmp_path, base + "    max_seq_length: 512\n")))
    check_recipe(load_recipe(_recipe(tmp_path, base + "    max_seq_length: 128\n")))
    check_recipe(load_recipe(_recipe(tmp_path, base)))  # the stage's own default is not checked


def test_an_unwritable_output_folder_is_refused_before_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    real = tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        if Path(kwargs.get("dir", "")) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(locked / ".probe"))
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    path = tmp_path / "r.yaml"
    path.write_text(f"stages:\n  - name: first\n    stage: toy\n    model: a/b\n    out: {locked}/deep/out\n")
    with pytest.raises(OutputError) as info:
        run_recipe(load_recipe(path))
    assert str(info.value) == (f"stage 'first': out: cannot create {locked}/deep/out in {locked}: permission "
                               "denied; choose an output directory you can write, or fix its permissions")
    assert RUNS == [] and not (locked / "deep").exists()


def test_an_out_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "first").write_text("not a folder")
    with pytest.raises(OutputError, match=r"stage 'first': out: .*runs/first is a file"):
        check_recipe(load_recipe(_recipe(tmp_path, "")))


def test_too_little_free_space_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model_dir(tmp_path / "model", weight_bytes=2**20)
    recipe = load_recipe(_recipe(tmp_path, "", first_model=str(model)))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=2**19))
    with pytest.raises(OutputError, match=r"^stage 'first': out: .* has 0\.00 GiB free, and the run needs about "
                                          r"0\.00 GiB there; free some space or set out to a bigger disk$"):
        run_recipe(recipe)
    assert RUNS == []
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=2**30))
    assert [s for _, s in run_recipe(recipe)] == ["ran"]


def test_error_classes_carry_their_exit_codes() -> None:
    from embedforge.training.guard import NanLossError, TrainingInterrupted
    from embedforge.export.graph import ExportError
    from embedforge.export.parity import ParityError
    from embedforge.recipe import RecipeError

    for cls in (RecipeError, ConfigError, DataError, SourceError, OutputError):
        assert issubclass(cls, UsageError) and cls.exit_code == 2, cls
    for cls in (NanLossError, ParityError, ExportError):
        assert issubclass(cls, RunError) and cls.exit_code == 1, cls
    assert issubclass(TrainingInterrupted, EmbedforgeError) and TrainingInterrupted.exit_code == 130
    assert issubclass(DataError, ValueError) and issubclass(NanLossError, RuntimeError)  # old catches still work
