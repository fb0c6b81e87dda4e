"""Students: layer subsets (BERT and decoders), the static student, the projection head and its fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedforge.distill import students


def _load(path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device="cpu")


def test_bert_layer_student_keeps_the_chosen_layers_and_round_trips(bert_teacher, texts, tmp_path):
    teacher = _load(bert_teacher)
    student = students.layer_student(teacher, [0, 2])
    t_layers = teacher[0].auto_model.encoder.layer
    s_layers = student[0].auto_model.encoder.layer
    assert len(s_layers) == 2 and student[0].auto_model.config.num_hidden_layers == 2
    for s_layer, t_index in zip(s_layers, [0, 2]):
        for (name, p_s), (_, p_t) in zip(s_layer.named_parameters(), t_layers[t_index].named_parameters()):
            assert torch.equal(p_s, p_t), name
    assert len(t_layers) == 3  # the teacher itself is untouched

    student.save(str(tmp_path / "s"))
    reloaded = _load(tmp_path / "s")
    assert reloaded[0].auto_model.config.num_hidden_layers == 2
    np.testing.assert_allclose(reloaded.encode(texts[:8]), student.encode(texts[:8]), atol=1e-5)


def test_first_layers_student_equals_teacher_hidden_state(bert_teacher, texts):
    """Keeping the first n layers of BERT gives exactly the teacher's hidden state after layer n, pooled."""
    teacher = _load(bert_teacher)
    student = students.layer_student(teacher, [0, 1])
    batch = texts[:6]
    feats = teacher.preprocess(batch)
    with torch.no_grad():
        hidden = teacher[0].auto_model(input_ids=feats["input_ids"], attention_mask=feats["attention_mask"],
                                       output_hidden_states=True).hidden_states[2]
    mask = feats["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    expected = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    np.testing.assert_allclose(student.encode(batch), expected, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_decoder_layer_student(arch, tmp_path, texts):
    """Decoders (converted LLMs) lose layers too; per-layer attention types follow the kept layers."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    from embedforge.testing import tiny_decoder

    path = tiny_decoder(arch, tmp_path / arch, num_hidden_layers=4)
    transformer = Transformer(str(path), max_seq_length=32)
    transformer.auto_model.config.is_causal = False
    teacher = SentenceTransformer(modules=[transformer, Pooling(32, pooling_mode="mean"), Normalize()], device="cpu")
    types = getattr(teacher[0].auto_model.config, "layer_types", None)
    student = students.layer_student(teacher, [0, 3])
    backbone = student[0].auto_model
    assert backbone.config.num_hidden_layers == 2 and len(backbone.layers) == 2
    if isinstance(types, list):
        assert backbone.config.layer_types == [types[0], types[3]]
    assert [layer.self_attn.layer_idx for layer in backbone.layers] == [0, 1]
    assert backbone.config.is_causal is False
    student.save(str(tmp_path / "student"))
    reloaded = _load(tmp_path / "student")
    np.testing.assert_allclose(reloaded.encode(texts[:4]), student.encode(texts[:4]), atol=1e-5)


def test_first_layers_decoder_student_reproduces_teacher_states(tmp_path, texts):
    from transformers import AutoModel

    from embedforge.testing import tiny_decoder

    path = tiny_decoder("llama", tmp_path / "llama", num_hidden_layers=4)
    teacher = AutoModel.from_pretrained(path)
    teacher.config.is_causal = False
    student = AutoModel.from_pretrained(path)
    student.config.is_causal = False
    from embedforge.backbone import keep_layers

    keep_layers(student, [0, 1])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(texts[:3], padding=True, return_tensors="pt")
    with torch.no_grad():
        t_states = teacher(**enc, output_hidden_states=True, use_cache=False).hidden_states
        s_states = student(**enc, output_hidden_states=True, use_cache=False).hidden_states
    for i in range(2):  # states entering layers 0 and 1, and after layer 0
        torch.testing.assert_close(s_states[i], t_states[i])


def test_static_student_from_model2vec(bert_teacher, texts, tmp_path):
    pytest.importorskip("skeletoken", reason="the static student needs model2vec's distillation extra")
    teacher = _load(bert_teacher)
    student = students.static_student(teacher, dims=16, teacher_path=bert_teacher)
    assert student.get_embedding_dimension() == 16
    table = student[0].embedding.weight.detach().numpy()
    emb = student.encode(texts[:5])
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # The static student averages its rows: check one text by hand.
    tok = student[0].tokenizer
    ids = tok.encode(texts[0], add_special_tokens=False).ids
    manual = table[ids].mean(0)
    np.testing.assert_allclose(emb[0], manual / np.linalg.norm(manual), atol=1e-5)
    # Rows are the teacher's token vectors after PCA: the table's row space explains texts the teacher
    # finds similar as similar (correlation of pairwise cosines well above chance).
    t_emb = teacher.encode(texts[:30], normalize_embeddings=True)
    s_emb = student.encode(texts[:30], normalize_embeddings=True)
    iu = np.triu_indices(30, 1)
    corr = np.corrcoef((t_emb @ t_emb.T)[iu], (s_emb @ s_emb.T)[iu])[0, 1]
    assert corr > 0.2
    student.save(str(tmp_path / "static"))
    np.testing.assert_allclose(_load(tmp_path / "static").encode(texts[:5]), emb, atol=1e-6)


def test_projection_identity_and_least_squares_fit(bert_teacher, texts):
    teacher = _load(bert_teacher)
    same = students.add_projection(teacher, 32, identity=True)
    np.testing.assert_allclose(same.encode(texts[:5]), teacher.encode(texts[:5]), atol=1e-5)
    with pytest.raises(ValueError, match="identity"):
        students.add_projection(teacher, 48, identity=True)

    wide = students.add_projection(teacher, 48)
    assert wide.get_embedding_dimension() == 48
    # Targets that ARE a linear map of the pooled vectors: the fit must recover them (cosine ~ 1).
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(32, 48)), rng.normal(size=48) * 0.1
    from sentence_transformers import SentenceTransformer

    body = SentenceTransformer(modules=list(_load(bert_teacher))[:2], device="cpu")  # no Normalize: Dense input
    pooled = body.encode(texts)
    targets = (pooled @ w + b).astype(np.float32)
    cos = students.fit_projection(wide, texts, targets)
    assert cos > 0.999
    got = wide.encode(texts[:10])
    expected = targets[:10] / np.linalg.norm(targets[:10], axis=1, keepdims=True)
    np.testing.assert_allclose(got, expected, atol=1e-3)
