"""Saved models load without embedforge: custom heads ship their code, configs keep their legacy forms.

Every model is saved with :func:`embedforge.model.save_model`, then loaded in ONE subprocess in which ``embedforge``
cannot be imported (a ``sys.meta_path`` finder refuses it, the working directory is outside the repository and
``PYTHONPATH`` is cleared). The subprocess runs the loading code of each model card verbatim and writes the vectors
it gets; the tests compare them with the vectors of embedforge's own :func:`embedforge.model.load_model`.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedforge.testing import sample_texts

CUSTOM = ["latent_attention", "multi_layer", "echo", "learned_binarizer", "sign_binarizer"]
STANDARD = ["mean", "lasttoken"]
MAX_SEQ_LENGTH = 96
LONG_TEXT = " ".join(f"word{i} and some more filler text" for i in range(120))  # far past MAX_SEQ_LENGTH tokens
PROMPTS = {"query": "Represent the question:\n"}

#: sentence-transformers 5.1.0, ``sentence_transformers/models/Pooling.py``: the parameters of ``Pooling.__init__``.
ST5_POOLING_PARAMS = {
    "word_embedding_dimension", "pooling_mode", "pooling_mode_cls_token", "pooling_mode_max_tokens",
    "pooling_mode_mean_tokens", "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens",
    "pooling_mode_lasttoken", "include_prompt",
}


def st5_pooling(word_embedding_dimension: int, pooling_mode: str | None = None, pooling_mode_cls_token: bool = False,
                pooling_mode_max_tokens: bool = False, pooling_mode_mean_tokens: bool = True,
                pooling_mode_mean_sqrt_len_tokens: bool = False, pooling_mode_weightedmean_tokens: bool = False,
                pooling_mode_lasttoken: bool = False, include_prompt: bool = True) -> dict[str, Any]:
    """A stand-in with the exact 5.x ``Pooling.__init__`` signature; returns what 5.x would pool with."""
    flags = {"cls": pooling_mode_cls_token, "max": pooling_mode_max_tokens, "mean": pooling_mode_mean_tokens,
             "mean_sqrt_len_tokens": pooling_mode_mean_sqrt_len_tokens,
             "weightedmean": pooling_mode_weightedmean_tokens, "lasttoken": pooling_mode_lasttoken}
    modes = [pooling_mode] if pooling_mode else [m for m, on in flags.items() if on]
    return {"dim": word_embedding_dimension, "modes": modes, "include_prompt": include_prompt}


def texts() -> list[str]:
    return [*sample_texts()[:3], LONG_TEXT]


def _build(name: str, llm: Path) -> Any:
    import torch

    from embedforge.convert.embedder import build_embedder

    common = dict(max_seq_length=MAX_SEQ_LENGTH, prompts=PROMPTS, zero_init_heads=False)
    if name in ("latent_attention", "multi_layer", "echo", "mean", "lasttoken"):
        kwargs: dict[str, Any] = dict(common, latent_count=8, latent_heads=4) if name == "latent_attention" else common
        return build_embedder(llm, pooling=name, **kwargs)
    from sentence_transformers import SentenceTransformer

    from embedforge.modules.binarizer import LearnedBinarizer, SignBinarizer

    base = build_embedder(llm, pooling="mean", **common)
    dim = base.get_embedding_dimension()
    if name == "learned_binarizer":
        head = LearnedBinarizer(dim, bits=2, output="float")
        torch.manual_seed(1)
        for level in head.levels:  # away from the identity start, so the shipped MLPs really compute something
            torch.nn.init.normal_(level.down.weight, std=0.2)
    else:
        head = SignBinarizer(dim, output="packed")
    return SentenceTransformer(modules=[*base, head], prompts=PROMPTS, device="cpu")


def _encode(model: Any, prompt_name: str | None = None) -> np.ndarray:
    return np.asarray(model.encode(texts(), prompt_name=prompt_name, convert_to_numpy=True, show_progress_bar=False))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> dict[str, Any]:
    """``{"dirs": {name: dir}, "want": {name: {None | "query": vectors from load_model}}}``."""
    from embedforge.model import load_model, save_model

    root = tmp_path_factory.mktemp("remote-code")
    dirs: dict[str, Path] = {}
    want: dict[str, dict[str | None, np.ndarray]] = {}
    for name in CUSTOM + STANDARD:
        dirs[name] = save_model(_build(name, tiny_llama_dir), root / name, stage="convert", source="tiny-llama")
        loaded = load_model(dirs[name])
        want[name] = {None: _encode(loaded), "query": _encode(loaded, "query")}
    return {"root": root, "dirs": dirs, "want": want}


#: Runs in the subprocess: refuse embedforge, run each card's loading code in the model's parent directory.
CHILD = textwrap.dedent('''
    import sys

    class RefuseEmbedforge:
        def find_spec(self, name, path=None, target=None):
            if name == "embedforge" or name.startswith("embedforge."):
                raise ImportError(f"No module named {name!r} (refused by the test)")
            return None

    sys.meta_path.insert(0, RefuseEmbedforge())
    import json, os, re
    from pathlib import Path
    import numpy as np
    from sentence_transformers import SentenceTransformer

    job = json.loads(Path(sys.argv[1]).read_text())
    report = {}
    for name, model_dir in job["dirs"].items():
        model_dir = Path(model_dir)
        card = (model_dir / "README.md").read_text()
        snippet = re.search(r"```python\\n(.*?)```", card, re.S).group(1)
        os.chdir(model_dir.parent)
        scope = {}
        exec(snippet, scope)
        model = scope["model"]
        out = Path(job["out"]) / name
        out.mkdir()
        for prompt in (None, "query"):
            vectors = model.encode(job["texts"], prompt_name=prompt, convert_to_numpy=True, show_progress_bar=False)
            np.save(out / f"{prompt}.npy", np.asarray(vectors))
        entry = {"modules": [type(m).__module__ for m in model], "snippet": snippet}
        # saved again by plain sentence-transformers, the model still loads the way its card says
        model.save(str(out / "resaved"))
        again = SentenceTransformer(str(out / "resaved"), device="cpu", trust_remote_code=job["custom"][name])
        np.save(out / "resaved.npy", again.encode(job["texts"], convert_to_numpy=True, show_progress_bar=False))
        try:
            SentenceTransformer(str(model_dir), device="cpu")
            entry["plain"] = "loaded"
        except Exception as exc:
            entry["plain"] = f"{type(exc).__name__}: {exc}"
        report[name] = entry
    report["embedforge_imported"] = sorted(m for m in sys.modules if m.split(".")[0] == "embedforge")
    Path(job["out"], "report.json").write_text(json.dumps(report))
''')


@pytest.fixture(scope="module")
def without_embedforge(saved: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Load every saved model in a subprocess that cannot import embedforge; returns its report and vectors."""
    work = tmp_path_factory.mktemp("child")
    out = work / "out"
    out.mkdir()
    job = work / "job.json"
    job.write_text(json.dumps({"dirs": {k: str(v) for k, v in saved["dirs"].items()}, "texts": texts(),
                               "out": str(out), "custom": {k: k in CUSTOM for k in saved["dirs"]}}))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(work / "hf-modules"),
               TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(job)], cwd=work, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    vectors = {name: {p: np.load(out / name / f"{p}.npy") for p in (None, "query", "resaved")}
               for name in saved["dirs"]}
    return {"report": report, "vectors": vectors}


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_the_subprocess_never_imported_embedforge(without_embedforge: dict[str, Any]) -> None:
    assert without_embedforge["report"]["embedforge_imported"] == []


@pytest.mark.parametrize("name", CUSTOM)
def test_custom_head_loads_without_embedforge(name: str, saved: dict[str, Any],
                                              without_embedforge: dict[str, Any]) -> None:
    report = without_embedforge["report"][name]
    # the card's code passes trust_remote_code, and the custom modules came from the code shipped in the directory
    assert f'SentenceTransformer("{name}", trust_remote_code=True)' in report["snippet"]
    assert any(m.startswith("transformers_modules.") and ".embedforge_" in m for m in report["modules"])
    # without the flag sentence-transformers refuses the shipped code (which is what the card tells the reader)
    assert report["plain"].startswith("ValueError") and "trust_remote_code=True" in report["plain"]
    for prompt in (None, "query"):
        got, want = without_embedforge["vectors"][name][prompt], saved["want"][name][prompt]
        assert got.shape == want.shape
        if name == "sign_binarizer":  # packed uint8 codes: identical bits
            assert got.dtype == np.uint8 and np.array_equal(got, want)
        else:
            assert _cosines(got, want).min() >= 0.9999, (name, prompt, _cosines(got, want))
    resaved = without_embedforge["vectors"][name]["resaved"]
    assert np.array_equal(resaved, without_embedforge["vectors"][name][None])


@pytest.mark.parametrize("name", STANDARD)
def test_standard_head_loads_without_trust_remote_code(name: str, saved: dict[str, Any],
                                                       without_embedforge: dict[str, Any]) -> None:
    report = without_embedforge["report"][name]
    assert "trust_remote_code" not in report["snippet"]
    assert report["plain"] == "loaded"
    assert all(m.startswith("sentence_transformers.") for m in report["modules"])
    assert not list(saved["dirs"][name].glob("*.py"))
    for prompt in (None, "query"):
        got, want = without_embedforge["vectors"][name][prompt], saved["want"][name][prompt]
        assert _cosines(got, want).min() >= 0.9999
    assert np.array_equal(without_embedforge["vectors"][name]["resaved"], without_embedforge["vectors"][name][None])


@pytest.mark.parametrize("name", CUSTOM)
def test_shipped_code_and_modules_json(name: str, saved: dict[str, Any]) -> None:
    model_dir = saved["dirs"][name]
    entries = json.loads((model_dir / "modules.json").read_text())
    custom = [e["type"] for e in entries if not e["type"].startswith("sentence_transformers.")]
    assert custom and all(re.fullmatch(r"embedforge_\w+\.\w+", t) for t in custom)
    for ref in custom:
        assert (model_dir / (ref.split(".")[0] + ".py")).is_file()
    for code in model_dir.glob("*.py"):
        text = code.read_text()
        assert not re.search(r"^\s*(from|import)\s+embedforge\b", text, re.M), code.name


def test_load_model_uses_the_installed_classes(saved: dict[str, Any]) -> None:
    from embedforge.model import load_model
    from embedforge.modules.echo import EchoPooling, EchoTransformer
    from embedforge.modules.latent_attention import LatentAttentionPooling

    assert isinstance(load_model(saved["dirs"]["latent_attention"])[1], LatentAttentionPooling)
    echo = load_model(saved["dirs"]["echo"])
    assert isinstance(echo[0], EchoTransformer) and isinstance(echo[1], EchoPooling)


def test_directories_saved_before_still_load(saved: dict[str, Any], tmp_path: Path) -> None:
    """A directory with the old ``embedforge.modules.*`` types and no shipped code loads with load_model."""
    import shutil

    from embedforge.model import load_model

    old = tmp_path / "old"
    shutil.copytree(saved["dirs"]["latent_attention"], old)
    for code in old.glob("*.py"):
        code.unlink()
    entries = json.loads((old / "modules.json").read_text())
    for e in entries:
        e["type"] = e["type"].replace("embedforge_latent_attention.", "embedforge.modules.latent_attention.")
    (old / "modules.json").write_text(json.dumps(entries))
    got = _encode(load_model(old))
    assert _cosines(got, saved["want"]["latent_attention"][None]).min() >= 0.9999


@pytest.mark.parametrize("name", STANDARD)
def test_pooling_config_has_the_sentence_transformers_5_form(name: str, saved: dict[str, Any]) -> None:
    from sentence_transformers.sentence_transformer.modules import Pooling

    folder = saved["dirs"][name] / "1_Pooling"
    config = json.loads((folder / "config.json").read_text())
    assert set(config) <= ST5_POOLING_PARAMS, set(config) - ST5_POOLING_PARAMS
    old = st5_pooling(**config)  # binds to the 5.x signature, or raises TypeError
    assert old == {"dim": 32, "modes": [name], "include_prompt": False}
    new = Pooling.load(str(saved["dirs"][name]), subfolder="1_Pooling")  # the installed 6.x reads it the same way
    assert (new.embedding_dimension, new.pooling_mode, new.include_prompt) == (32, name, False)
    assert list(inspect.signature(st5_pooling).parameters) == [
        "word_embedding_dimension", "pooling_mode", "pooling_mode_cls_token", "pooling_mode_max_tokens",
        "pooling_mode_mean_tokens", "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens",
        "pooling_mode_lasttoken", "include_prompt"]


@pytest.mark.parametrize("name", ["mean", "echo"])
def test_tokenizer_class_is_one_transformers_4_knows(name: str, saved: dict[str, Any]) -> None:
    from transformers import AutoTokenizer

    config = json.loads((saved["dirs"][name] / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    tok = AutoTokenizer.from_pretrained(str(saved["dirs"][name]))
    assert type(tok).__name__ in ("TokenizersBackend", "PreTrainedTokenizerFast")


def test_combined_pooling_modes_keep_their_order() -> None:
    from embedforge.modules.compat import legacy_pooling_config

    assert legacy_pooling_config(8, ["cls", "mean"], False) == {
        "word_embedding_dimension": 8, "pooling_mode_cls_token": True, "pooling_mode_max_tokens": False,
        "pooling_mode_mean_tokens": True, "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False, "pooling_mode_lasttoken": False, "include_prompt": False}
    # flags cannot say "mean first, then cls", so such a config keeps its 6.x form
    assert legacy_pooling_config(8, ["mean", "cls"]) is None


def test_a_file_that_imports_embedforge_is_not_shipped(saved: dict[str, Any], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    import shutil

    from embedforge.modules import portable

    with pytest.raises(portable.NotShippable, match="errors"):
        portable.rewrite_imports("def f():\n    from embedforge.errors import RunError\n", "x.py", {"common"})
    text, needs = portable.rewrite_imports("from embedforge.modules.common import (\n    a,\n    b as c,\n)\nx = 1\n",
                                           "x.py", {"common"})
    assert text == "from .embedforge_common import a, b as c\nx = 1\n" and needs == ("common",)

    # a module whose code cannot be shipped keeps its embedforge type (loads with embedforge), with a warning
    model_dir = tmp_path / "m"
    shutil.copytree(saved["dirs"]["latent_attention"], model_dir)
    for code in model_dir.glob("*.py"):
        code.unlink()

    def refuse(module: str) -> tuple[str, tuple[str, ...]]:
        raise portable.NotShippable(f"{module}.py imports torchvision")

    monkeypatch.setattr(portable, "shipped_source", refuse)
    assert portable.ship_module_code(model_dir) == []
    types = [e["type"] for e in json.loads((model_dir / "modules.json").read_text())]
    assert types[1] == "embedforge.modules.latent_attention.LatentAttentionPooling"
    assert "torchvision" in caplog.text
    assert not list(model_dir.glob("*.py"))


def test_model_card_warns_that_bidirectional_attention_needs_transformers_5_2(saved: dict[str, Any]) -> None:
    """transformers 4.x ignores ``is_causal: false`` (checked with 4.57.1: its vectors equal causal ones)."""
    assert json.loads((saved["dirs"]["mean"] / "config.json").read_text())["is_causal"] is False
    assert "needs transformers >= 5.2" in (saved["dirs"]["mean"] / "README.md").read_text()


def test_model_card_for_an_embedforge_only_module(tmp_path: Path) -> None:
    from embedforge.modelcard import model_card

    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"},
        {"idx": 1, "name": "1", "path": "1_X", "type": "embedforge.modules.latent_attention.LatentAttentionPooling"},
    ]))
    card = model_card(tmp_path, name="m")
    assert 'load_model("m")' in card and "trust_remote_code" not in card


@pytest.mark.parametrize("writer", ["save_trained", "compress"])
def test_every_stage_writer_ships_the_head(writer: str, saved: dict[str, Any], tmp_path: Path) -> None:
    """The trained (mntp / simcse / contrastive) and compressed models get the same finishing as save_model."""
    from types import SimpleNamespace

    from embedforge.model import load_model

    model = load_model(saved["dirs"]["latent_attention"])
    out = tmp_path / writer
    if writer == "save_trained":
        from embedforge.convert.train_model import save_trained

        from embedforge.convert.config import ConvertConfig

        save_trained(model, out, stage="contrastive", config=ConvertConfig(model="tiny"), parent=None, ctx=None)
    else:
        from embedforge.compress.pipeline import _save

        _save(model, out, source="tiny", config=None, ctx=SimpleNamespace(recipe_hash=None), metrics={}, extra={},
              files={})
    types = [e["type"] for e in json.loads((out / "modules.json").read_text())]
    assert types[1] == "embedforge_latent_attention.LatentAttentionPooling"
    assert (out / "embedforge_latent_attention.py").is_file() and (out / "embedforge_common.py").is_file()
    assert f'SentenceTransformer("{writer}", trust_remote_code=True)' in (out / "README.md").read_text()
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_export_pooling_and_tokenizer_configs_are_legacy_readable(saved: dict[str, Any], tmp_path: Path) -> None:
    from embedforge.export.layouts import describe_pooling, write_tei_files
    from embedforge.model import load_model

    for name in ("latent_attention", "lasttoken"):
        model = load_model(saved["dirs"][name])
        out = tmp_path / name
        out.mkdir()
        write_tei_files(model, out, pooling=describe_pooling(model), dim=32, max_seq_length=MAX_SEQ_LENGTH)
        config = json.loads((out / "1_Pooling" / "config.json").read_text())
        assert set(config) <= ST5_POOLING_PARAMS, set(config) - ST5_POOLING_PARAMS  # no embedforge_note
        # a head that pools inside the graph gets the placeholder mean; a real pooling mode is kept
        assert st5_pooling(**config)["modes"] == ["mean" if name == "latent_attention" else name]
        assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
