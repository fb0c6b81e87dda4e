"""Output safety: embedforge replaces only its own outputs, one run per output, modes, full disks, killed saves."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from embedforge import outputs, stages
from embedforge.cli import main
from embedforge.configs import opt
from embedforge.errors import OutputError, RunError
from embedforge.model import (
    LINEAGE_FILE, atomic_dir, is_complete, load_model, make_lineage, save_model, update_metrics,
)
from embedforge.outputs import DiskFullError, check_output, clean_leftovers, is_disk_full, lock_path, output_lock
from embedforge.recipe import RecipeError, load_recipe, run_recipe

STS_ROWS = ["sentence1\tsentence2\tscore", "a man plays guitar\ta man is playing a guitar\t4.8",
            "a dog runs\tthe stock market fell\t0.2", "a woman cuts an onion\tsomeone slices an onion\t4.0"]


def _sts(tmp_path: Path) -> Path:
    data = tmp_path / "sts.tsv"
    data.write_text("\n".join(STS_ROWS) + "\n")
    return data


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _user_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("my notes")
    return path


def _model_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------ only embedforge's own outputs


@pytest.mark.parametrize("where", ["dir", "cwd"])
def test_convert_refuses_an_out_embedforge_did_not_write(where: str, tiny_llama_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    user = _user_dir(tmp_path / "work")
    if where == "cwd":
        monkeypatch.chdir(user)
    res = CliRunner().invoke(main, ["convert", str(tiny_llama_dir), "--out", "." if where == "cwd" else str(user)])
    assert res.exit_code == 2, res.output
    expected = "is the current directory" if where == "cwd" else "refusing to replace a non-empty directory"
    assert f"Error: {user}: {expected}" in res.output and len(res.output.strip().splitlines()) == 1
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt"]
    assert (user / "notes.txt").read_text() == "my notes"
    assert _siblings(user) == []  # no lock file or temp dir left behind


def test_convert_refuses_a_user_dir_under_home(tiny_llama_dir: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    models = _user_dir(tmp_path / "models")
    res = CliRunner().invoke(main, ["convert", str(tiny_llama_dir), "--out", "~/models"])
    assert res.exit_code == 2, res.output
    assert f"{models}: refusing to replace a non-empty directory embedforge did not write" in res.output
    assert (models / "notes.txt").read_text() == "my notes"


def test_an_empty_directory_and_an_embedforge_output_may_be_replaced(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    check_output(empty)
    with atomic_dir(empty) as tmp:
        (tmp / LINEAGE_FILE).write_text(json.dumps(make_lineage(stage="convert", source="x")))
    check_output(empty)  # now embedforge's own
    with pytest.raises(OutputError, match="is a file, not a directory"):
        (tmp_path / "file").write_text("x")
        check_output(tmp_path / "file")


def test_a_foreign_model_with_recorded_metrics_is_still_not_embedforges(tiny_st_dir: Path, tmp_path: Path) -> None:
    # eval --out records its scores in the evaluated model (stage "external"); that must not make it replaceable
    model = _model_copy(tiny_st_dir, tmp_path / "their-model")
    update_metrics(model, {"eval": {"stsb-dev": {"spearman": 1.0}}})
    assert not is_complete(model)  # a recipe stage writing here would not be skipped as done either
    before = sorted(p.name for p in model.iterdir())
    with pytest.raises(OutputError, match="refusing to replace a non-empty directory embedforge did not write"):
        with atomic_dir(model) as tmp:
            (tmp / "x").write_text("y")
    assert sorted(p.name for p in model.iterdir()) == before


def test_eval_out_into_the_evaluated_model_is_refused(tiny_st_dir: Path, tmp_path: Path) -> None:
    model = _model_copy(tiny_st_dir, tmp_path / "model")
    before = sorted(p.name for p in model.iterdir())
    res = CliRunner().invoke(main, ["eval", str(model), "--task", f"sts:{_sts(tmp_path)}", "--out", str(model)])
    assert res.exit_code == 2, res.output
    assert f"Error: {model}: is (or contains) the input {model}" in res.output
    assert sorted(p.name for p in model.iterdir()) == before


def test_eval_out_refuses_a_model_and_replaces_an_earlier_eval(tiny_st_dir: Path, tmp_path: Path) -> None:
    other = save_model(load_model(tiny_st_dir), tmp_path / "other", stage="convert", source="x")
    data = _sts(tmp_path)
    res = CliRunner().invoke(main, ["eval", str(tiny_st_dir), "--task", f"sts:{data}", "--out", str(other)])
    assert res.exit_code == 2, res.output
    assert f"Error: {other}: holds a convert model, not an eval output" in res.output
    assert (other / "model.safetensors").is_file() and json.loads((other / LINEAGE_FILE).read_text())["stage"] \
        == "convert"
    out = tmp_path / "eval"
    for _ in range(2):  # the second run replaces the first one's eval output
        res = CliRunner().invoke(main, ["eval", str(tiny_st_dir), "--task", f"sts:{data}", "--out", str(out)])
        assert res.exit_code == 0, res.output
    assert json.loads((out / LINEAGE_FILE).read_text())["stage"] == "eval"
    assert sorted(p.name for p in out.iterdir()) == [LINEAGE_FILE, "metrics.json", "report.md"]


# ------------------------------------------------------------------------------------------------ locks


def test_a_second_run_into_a_locked_output_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    code = ("import sys, time\nfrom embedforge.outputs import output_lock\n"
            "with output_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(60)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        res = CliRunner().invoke(main, ["convert", str(tiny_llama_dir), "--out", str(out)])
        assert res.exit_code == 2, res.output
        assert f"Error: {out}: another embedforge run (pid {holder.pid}, since " in res.output
        assert not out.exists()
        assert lock_path(out).is_file()  # still the other run's
    finally:
        holder.kill()
        holder.wait()
    with output_lock(out):  # its flock went with it: the lock is free again (and taken over with a warning)
        pass
    assert not lock_path(out).exists()


def test_a_lock_naming_a_live_process_is_respected(tmp_path: Path) -> None:
    out = tmp_path / "model"
    lock_path(out).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    with pytest.raises(OutputError, match=rf"another embedforge run \(pid {os.getppid()}\) holds"):
        with atomic_dir(out):
            pass
    assert not out.exists() and _siblings(out) == [lock_path(out).name]


def test_a_stale_lock_is_taken_over_with_a_warning(tiny_st_dir: Path, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "model"
    dead = _dead_pid()
    lock_path(out).write_text(json.dumps({"pid": dead, "host": socket.gethostname()}))
    with caplog.at_level(logging.WARNING, logger="embedforge.outputs"):
        save_model(load_model(tiny_st_dir), out, stage="convert", source="x")
    assert f"taking over the stale lock {lock_path(out)} left by pid {dead}" in caplog.text
    assert (out / "model.safetensors").is_file() and _siblings(out) == []


def test_the_lock_is_reentrant_and_held_by_one_process(tmp_path: Path) -> None:
    out = tmp_path / "model"
    with output_lock(out) as lock:
        with atomic_dir(out) as tmp:  # a save inside a run that already holds the lock
            (tmp / LINEAGE_FILE).write_text(json.dumps(make_lineage(stage="s", source="x")))
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists() and (out / LINEAGE_FILE).is_file()


RECIPE = """\
stages:
  - name: first
    stage: eval
    model: {model}
    out: {first}
    tasks: [stsb-dev]
  - name: second
    stage: eval
    model: {model}
    out: {second}
    tasks: [stsb-dev]
"""


def test_a_recipe_locks_all_its_outputs_before_any_work(tiny_st_dir: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    first, second = tmp_path / "runs" / "first", tmp_path / "runs" / "second"
    recipe.write_text(RECIPE.format(model=tiny_st_dir, first=first, second=second, data=_sts(tmp_path)))
    with output_lock(second):  # another run is writing the second stage's output
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(outputs, "_held", {})  # as seen from another process
            res = CliRunner().invoke(main, ["run", str(recipe)])
    assert res.exit_code == 2, res.output
    assert f"Error: {second}: another embedforge run (pid {os.getpid()}" in res.output
    assert not first.exists()  # refused before the first stage ran


# --------------------------------------------------------------------------------- duplicate outs in a recipe


def _recipe(tmp_path: Path, first: str, second: str, second_model: str = "") -> Path:
    p = tmp_path / "dup.yaml"
    model = tmp_path / "in-model"
    model.mkdir(exist_ok=True)
    p.write_text(RECIPE.format(model=model, first=first, second=second, data=_sts(tmp_path)).replace(
        f"model: {model}\n    out: {second}", f"model: {second_model or model}\n    out: {second}"))
    return p


@pytest.mark.parametrize("case", ["same", "inside", "outside", "input"])
def test_recipe_outs_may_not_collide(case: str, tmp_path: Path) -> None:
    a = tmp_path / "runs" / "a"
    first, second, message = {
        "same": (a, a, f"{a} is also the out of stage 'first'"),
        "inside": (a, a / "eval", f"{a / 'eval'} is inside {a}, the out of another stage"),
        "outside": (a / "eval", a, f"{a / 'eval'} is inside {a}, the out of another stage"),
        "input": (a, tmp_path / "in-model", f"{tmp_path / 'in-model'} is (or contains) {tmp_path / 'in-model'}, "
                                            "which stage 'first' reads"),
    }[case]
    path = _recipe(tmp_path, str(first), str(second), second_model=str(a) if case == "input" else "")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert f"dup.yaml:10: stage 'second': out: {message}" in str(info.value)
    res = CliRunner().invoke(main, ["run", str(path)])
    assert res.exit_code == 2 and message in res.output
    assert not (tmp_path / "runs").exists() and sorted(p.name for p in (tmp_path / "in-model").iterdir()) == []


def test_cli_out_equal_to_the_input_model_is_refused(tiny_st_dir: Path, tmp_path: Path) -> None:
    model = _model_copy(tiny_st_dir, tmp_path / "model")
    before = sorted(p.name for p in model.iterdir())
    res = CliRunner().invoke(main, ["export", str(model), "--out", str(model)])
    assert res.exit_code == 2, res.output
    assert f"out: {model} is (or contains) {model}, which stage 'export' reads" in res.output
    assert sorted(p.name for p in model.iterdir()) == before


# ------------------------------------------------------------------------------------------------ modes


@pytest.mark.parametrize("umask,dir_mode,file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_outputs_get_the_umask_modes(umask: int, dir_mode: int, file_mode: int, tiny_st_dir: Path,
                                     tmp_path: Path) -> None:
    old = os.umask(umask)
    try:
        out = save_model(load_model(tiny_st_dir), tmp_path / "model", stage="convert", source="x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == dir_mode
    files = [p for p in out.rglob("*") if p.is_file()]
    assert out / "model.safetensors" in files
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p.name: oct(file_mode) for p in files}
    assert all(stat.S_IMODE(p.stat().st_mode) == dir_mode for p in out.rglob("*") if p.is_dir())


# -------------------------------------------------------------------------------------------- disk full


def _fill_disk(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_keeps_the_previous_output_and_says_so(tiny_st_dir: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_model(tiny_st_dir)
    out = save_model(model, tmp_path / "model", stage="convert", source="first")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    real_save = type(model).save

    def save_half(self: object, path: str, **kwargs: object) -> None:
        real_save(self, path, **kwargs)
        _fill_disk()

    monkeypatch.setattr(type(model), "save", save_half)
    with pytest.raises(DiskFullError) as info:
        save_model(model, out, stage="convert", source="second")
    message = str(info.value)
    assert isinstance(info.value, RunError) and info.value.exit_code == 1
    assert message.startswith(f"{out}: no space left on the device") and "free space" in message
    assert "\n" not in message
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert _siblings(out) == []


def test_a_full_disk_during_eval_is_one_line_exit_1(tiny_st_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import embedforge.model

    monkeypatch.setattr(embedforge.model, "make_lineage", _fill_disk)
    out = tmp_path / "eval"
    res = CliRunner().invoke(main, ["eval", str(tiny_st_dir), "--task", f"sts:{_sts(tmp_path)}", "--out", str(out)])
    assert res.exit_code == 1, res.output
    assert res.output.strip().splitlines()[-1].startswith(f"Error: {out}: no space left on the device")
    assert not out.exists() and _siblings(out) == ["sts.tsv"]


def test_a_full_disk_while_recording_metrics_leaves_the_lineage(tiny_st_dir: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    out = save_model(load_model(tiny_st_dir), tmp_path / "model", stage="convert", source="x")
    before = (out / LINEAGE_FILE).read_text()
    monkeypatch.setattr(outputs.os, "replace", _fill_disk)
    with pytest.raises(DiskFullError, match="free space"):
        update_metrics(out, {"eval": {}})
    assert (out / LINEAGE_FILE).read_text() == before and not (out / (LINEAGE_FILE + ".tmp")).exists()


def test_disk_full_is_recognised_through_wrapping_errors() -> None:
    assert is_disk_full(RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                     "message: \"No space left on device\" })"))
    try:
        try:
            _fill_disk()
        except OSError as exc:
            raise RuntimeError("save failed") from exc
    except RuntimeError as wrapped:
        assert is_disk_full(wrapped)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))


# ------------------------------------------------------------------------------------ killed saves


def test_a_killed_saves_leftovers_are_cleaned_on_the_next_save(tmp_path: Path) -> None:
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / LINEAGE_FILE).write_text(json.dumps(make_lineage(stage="s", source="first")))
    dead, live = _dead_pid(), os.getppid()
    names = {
        "dead_tmp": outputs.temp_prefix(out, "tmp", dead) + "abc",
        "dead_old": outputs.temp_prefix(out, "old", dead) + "abc",
        "live_tmp": outputs.temp_prefix(out, "tmp", live) + "abc",  # a save running now: left alone
        "legacy_new": ".model.tmp-k2j4h5g6",  # no owner in the name, fresh: left alone
        "legacy_old": ".model.tmp-a1b2c3d4",  # no owner in the name, hours old: removed
    }
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"half")
    hours_ago = time.time() - 3 * 3600
    os.utime(tmp_path / names["legacy_old"], (hours_ago, hours_ago))
    with atomic_dir(out) as tmp:
        (tmp / LINEAGE_FILE).write_text(json.dumps(make_lineage(stage="s", source="second")))
    assert _siblings(out) == sorted([names["live_tmp"], names["legacy_new"]])
    assert json.loads((out / LINEAGE_FILE).read_text())["source"] == "second"


def test_a_save_killed_between_renames_gets_the_previous_output_back(tmp_path: Path) -> None:
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / LINEAGE_FILE).write_text(json.dumps(make_lineage(stage="s", source="first")))
    aside = tmp_path / (outputs.temp_prefix(out, "old", _dead_pid()) + "abc")
    out.rename(aside)  # killed after moving the previous output aside, before the new one was in place
    removed = clean_leftovers(out)
    assert removed == [] and json.loads((out / LINEAGE_FILE).read_text())["source"] == "first"
    assert _siblings(out) == []


@dataclass
class ToyConfig:
    """A stage used only by these tests: writes its lineage through atomic_dir."""

    model: str = opt(help="input")


def toy_runner(config: ToyConfig, out_dir: Path, ctx: object) -> None:
    with atomic_dir(out_dir) as tmp:
        (tmp / LINEAGE_FILE).write_text(json.dumps(make_lineage(stage="toy", source=config.model, config=config)))


def test_the_next_run_cleans_up_after_a_killed_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(stages.STAGES, "toy", (f"{__name__}:ToyConfig", f"{__name__}:toy_runner"))
    out = tmp_path / "runs" / "a"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"stages:\n  - stage: toy\n    model: some/hub-model\n    out: {out}\n")
    assert [s for _, s in run_recipe(load_recipe(recipe))] == ["ran"]
    dead = _dead_pid()
    half = out.parent / (outputs.temp_prefix(out, "tmp", dead) + "x")
    half.mkdir()  # the new output, half written when the save was killed ...
    out.rename(out.parent / (outputs.temp_prefix(out, "old", dead) + "x"))  # ... after moving the old one aside
    assert [s for _, s in run_recipe(load_recipe(recipe))] == ["skipped"]  # the previous output is back, complete
    assert json.loads((out / LINEAGE_FILE).read_text())["source"] == "some/hub-model" and _siblings(out) == []
