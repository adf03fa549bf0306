"""lm-eval's model-independent work, done once: its tasks, their documents, their requests and their token ids.

A zero-shot evaluation through ``lm_eval.simple_evaluate`` spends most of its CPU time on work that does not
depend on the model (measured in docs/performance.md): every Jinja prompt template compiled again for every
document, the task objects and their datasets built again for every evaluation, every document's requests
built again, and every request tokenised one string at a time. lp keeps lm-eval for everything that defines
the numbers (its task configs, prompts, requests, metrics, aggregation and per-document samples) and does
each of these once:

- :func:`reuse_compiled_templates`: lm-eval's ``utils.apply_template`` compiles ``env.from_string(template)``
  for every call (lm-eval issue #1286; PR #3756 proposes the same fix); lp wraps the installed function so
  that each distinct template string is compiled once and rendered as before. The wrapper is installed only
  when the installed function is the one it replaces (checked by its source), else lm-eval is left as it is.
- :class:`Suite`: the tasks of one evaluation (tasks, limit, n-shot, seed), loaded by lm-eval's TaskManager
  with ``simple_evaluate``'s overrides applied, their documents read once, their requests built once by lm-eval
  and restored (fresh ``Instance`` objects) for every later evaluation, each document's prompt fields rendered
  once. Kept in the process (a sweep's runs share it) and, for the requests and the rendered prompt fields, on
  disk, keyed on everything that changes them (the tasks' configs with their functions' source, their datasets'
  fingerprints, limit, n-shot, seed, lm-eval's version).
- :func:`_doc_hash_once`: lm-eval's ``evaluate`` writes every logged sample's ``doc_hash`` as
  ``hash_string(json.dumps(doc, indent=2, ...))``, the pure-Python encoder (~1.2 s for the whole local suite); a
  suite's documents are the same objects in every evaluation, so each one's hash is computed once, kept and
  saved with the suite's requests. In place only while lp's ``evaluate`` runs, and only over the lm-eval code
  it knows.
- :func:`encode_pairs`: the (context, continuation) token ids by HFLM's own rule (``TemplateLM._encode_pair``:
  trailing spaces moved to the continuation, context + continuation encoded whole, the context's length
  split off), the strings encoded in batches, kept in the process and on disk keyed on the tokenizer's whole
  definition, the tokenizers / transformers versions and the requests' text.

:func:`evaluate` then runs lm-eval's own ``evaluator.evaluate`` on the suite: the same results, samples and
per-document metrics as ``simple_evaluate`` (tests/test_harness.py compares every document and request).
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import inspect
import json
import logging
import random
import re
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

FORMAT = 4  # of the requests and encodings files below; part of their keys (2: strings once; 3: prompt fields;
#             4: the documents' doc_hash)
PROMPT_FIELDS = ("doc_to_text", "doc_to_target", "doc_to_choice")  # rendered once a document (_prepared_class)
_SUITES_KEPT = 2  # suites kept in the process (their documents and requests; ~100 MB for the whole local suite)
_ENCODINGS_KEPT = 4  # tokenizers whose encodings are kept in the process


# ------------------------------------------------------------------------------- compiled-template reuse
def reuse_compiled_templates() -> bool:
    """Make lm-eval's ``utils.apply_template`` compile each distinct template once (module docstring). True if
    the wrapper is in place; False (and lm-eval untouched) if the installed function is not the one it replaces."""
    from lm_eval import utils

    current = utils.apply_template
    if getattr(current, "lp_compiled_once", False):
        return True
    try:
        source = inspect.getsource(current)
    except (OSError, TypeError):
        source = ""
    if "env.from_string(template)" not in source or ".render(**doc)" not in source:
        log.warning("lm-eval's utils.apply_template is not the function lp knows; its templates are compiled "
                    "per document as lm-eval does")
        return False
    compiled = functools.lru_cache(maxsize=4096)(utils.env.from_string)

    @functools.wraps(current)
    def apply_template(template: str, doc: dict) -> str:
        return compiled(template).render(**doc)

    apply_template.lp_compiled_once = True
    apply_template.compiled = compiled
    utils.apply_template = apply_template
    return True


# ------------------------------------------------------------------------------------------- the suite
@functools.lru_cache(maxsize=None)
def _prepared_class(cls: type) -> type:
    """A loaded lm-eval task's class with its documents read once (``eval_docs`` the list ``_lp_docs``),
    ``build_all_requests`` restoring the requests lm-eval built the first time for the same arguments
    (``_lp_built``: repr of the arguments -> [(request_type, doc_id, idx, arguments, repeats)]), and each
    document's prompt fields (text, target, choices: what ``process_results`` renders again) rendered once."""
    from lm_eval.api.instance import Instance

    def build_all_requests(self, **kw):
        args = repr(sorted(kw.items()))
        rows = self._lp_built.get(args)
        if rows is None:
            cls.build_all_requests(self, **kw)
            self._lp_built[args] = [(i.request_type, i.doc_id, i.idx, i.arguments, i.repeats) for i in self._instances]
            return
        name, docs = self.config["task"], self._lp_docs
        self._instances = [Instance(request_type=rt, doc=docs[d], arguments=a, idx=i, metadata=(name, d, r))
                           for rt, d, i, a, r in rows]

    def remembered(name: str):
        """``cls.<name>(doc)`` (a prompt field rendered from the document alone), computed once per document of
        the task's own list (``_lp_ids``: objects that live as long as the task, so their ids stay theirs)."""
        base = getattr(cls, name)

        def method(self, doc, *args, **kwargs):
            if args or kwargs or id(doc) not in self._lp_ids:
                return base(self, doc, *args, **kwargs)
            key = (name, id(doc))
            if key not in self._lp_memo:
                self._lp_memo[key] = base(self, doc)
            value = self._lp_memo[key]
            return list(value) if isinstance(value, list) else value

        return method

    # __slots__ = (): the same object layout, so that a loaded task's class can be swapped for this one
    return type(f"Prepared{cls.__name__}", (cls,), {
        "__slots__": (), "eval_docs": property(lambda self: self._lp_docs), "build_all_requests": build_all_requests,
        **{name: remembered(name) for name in PROMPT_FIELDS}})


def _build_kwargs(limit) -> dict:
    """``build_all_requests``' arguments as ``lm_eval.evaluator.evaluate`` passes them for a 1-process LM."""
    return dict(limit=limit, samples=None, rank=0, world_size=1, cache_requests=False, rewrite_requests_cache=False,
                system_instruction=None, apply_chat_template=False, fewshot_as_multiturn=False, chat_template=None,
                tokenizer_name="")


class Suite:
    """The loaded tasks of one evaluation: ``loaded`` is TaskManager.load()'s result with simple_evaluate's
    overrides (n-shot, few-shot seed) applied; every leaf task of its prepared class (:func:`_prepared_class`)."""

    def __init__(self, tm, tasks: tuple[str, ...], limit, num_fewshot: int | None, seed: int):
        self.tasks, self.limit, self.num_fewshot, self.seed = tasks, limit, num_fewshot, seed
        self.path: Path | None = None  # where its requests are kept between processes (set by suite())
        self.doc_hash: dict = {}  # (id of a document, json.dumps' arguments) -> its doc_hash (_doc_hash_once)
        self.loaded = tm.load(list(tasks))
        for task in self.loaded["tasks"].values():
            # simple_evaluate's overrides (lm_eval/evaluator.py, simple_evaluate: "override tasks' fewshot values")
            if num_fewshot is not None:
                if task.get_config("num_fewshot") != 0:
                    task.set_config(key="num_fewshot", value=num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=seed)
            docs = _documents(task.eval_docs)
            task.__class__ = _prepared_class(type(task))
            task._lp_docs, task._lp_built, task._lp_ids, task._lp_memo = docs, {}, {id(d) for d in docs}, {}

    @property
    def leaves(self) -> dict:
        return self.loaded["tasks"]

    def key(self) -> str:
        """What the built requests depend on: every task's config (its functions by source), its datasets'
        fingerprints, limit, n-shot, seed, lm-eval's version, this file's format."""
        import lm_eval

        parts = {name: {"config": task.dump_config(), "data": _fingerprints(task)} for name, task in self.leaves.items()}
        blob = json.dumps([FORMAT, lm_eval.__version__, self.tasks, self.limit, self.num_fewshot, self.seed, parts],
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def _args(self, task) -> str:
        return repr(sorted(_build_kwargs(_limit_of(task, self.limit)).items()))

    def requests(self) -> dict | None:
        """{task: the rows build_all_requests made for this suite's evaluation}, None until built."""
        out = {name: task._lp_built.get(self._args(task)) for name, task in self.leaves.items()}
        return None if any(r is None for r in out.values()) else out

    def adopt(self, requests: dict) -> None:
        for name, task in self.leaves.items():
            task._lp_built[self._args(task)] = requests[name]

    def save(self, path: Path) -> None:
        """The built requests, if every argument is a string (the loglikelihood tasks), as gzipped JSON: each
        distinct string once (a question's context is every choice's), the requests as indices into them."""
        from .files import atomic_write

        reqs = self.requests()
        if reqs is None or not all(isinstance(a, tuple) and all(isinstance(s, str) for s in a)
                                   for rows in reqs.values() for _, _, _, a, _ in rows):
            return
        index: dict = {}
        rows = {name: [(rt, d, i, [index.setdefault(s, len(index)) for s in a], r) for rt, d, i, a, r in task_rows]
                for name, task_rows in reqs.items()}
        fields, hashes = {}, {}  # each document's prompt fields as rendered so far, where JSON keeps them as
        for name, task in self.leaves.items():  # they are; its doc_hash (_doc_hash_once) as the evaluation made it
            at = {id(d): k for k, d in enumerate(task._lp_docs)}
            kept = [(field, at[i], v) for (field, i), v in task._lp_memo.items()]
            if all(_plain(v) for *_, v in kept):
                fields[name] = kept
            hashes[name] = [(at[i], kw, h) for (i, kw), h in self.doc_hash.items() if i in at]
        blob = json.dumps({"format": FORMAT, "strings": list(index), "requests": rows, "fields": fields,
                           "doc_hash": hashes}).encode()
        atomic_write(path, lambda tmp: tmp.write_bytes(gzip.compress(blob, 3)))

    def load(self, path: Path) -> bool:
        """Adopt the requests saved at ``path``; False if there are none; :class:`lp.files.DamagedFile`
        naming the file if it is not what :meth:`save` writes for these tasks."""
        from .files import DamagedFile

        if not path.is_file():
            return False
        try:
            data = json.loads(gzip.decompress(path.read_bytes()))
            strings = data["strings"]
            reqs = {name: [(rt, int(d), int(i), tuple(strings[j] for j in a), int(r))
                           for rt, d, i, a, r in data["requests"][name]] for name in self.leaves}
            fields = {n: [(f, int(k), v) for f, k, v in rows] for n, rows in data["fields"].items() if n in self.leaves}
            hashes = {n: [(int(k), kw, h) for k, kw, h in rows] for n, rows in data["doc_hash"].items() if n in self.leaves}
            ok = data["format"] == FORMAT and all(
                0 <= k < len(self.leaves[n]._lp_docs) and type(kw) is str and type(h) is str
                for n, rows in hashes.items() for k, kw, h in rows) and all(
                0 <= d < len(self.leaves[n]._lp_docs) for n, rows in reqs.items() for _, d, _, _, _ in rows) and all(
                f in PROMPT_FIELDS and 0 <= k < len(self.leaves[n]._lp_docs) and _plain(v)
                for n, rows in fields.items() for f, k, v in rows)
        except (OSError, ValueError, KeyError, IndexError, TypeError, EOFError, gzip.BadGzipFile) as e:
            raise DamagedFile(f"{path} is damaged ({type(e).__name__}: {e})") from e
        if not ok:
            raise DamagedFile(f"{path} is damaged: not the requests of tasks {list(self.leaves)}")
        self.adopt(reqs)
        for n, rows in fields.items():
            docs = self.leaves[n]._lp_docs
            self.leaves[n]._lp_memo.update({(f, id(docs[k])): v for f, k, v in rows})
        for n, rows in hashes.items():
            docs = self.leaves[n]._lp_docs
            self.doc_hash.update({(id(docs[k]), kw): h for k, kw, h in rows})
        return True


def _plain(v) -> bool:
    """Whether JSON gives ``v`` back as it is: a str, int or bool, or a list of them."""
    return type(v) in (str, int, bool) or (type(v) is list and all(type(x) in (str, int, bool) for x in v))


def _documents(docs) -> list:
    """A task's documents as a list: a ``datasets.Dataset`` whose features need no decoding through Arrow's
    ``to_pylist`` (the same dicts as iterating it, ~10x faster), anything else by iterating it."""
    import datasets
    from datasets.features.features import require_decoding

    if isinstance(docs, datasets.Dataset) and not any(require_decoding(f) for f in docs.features.values()):
        return docs.to_list()
    return list(docs)


def _limit_of(task, limit):
    """The per-task limit lm-eval's evaluate passes to build_all_requests (evaluator_utils.get_sample_size)."""
    from lm_eval.evaluator_utils import get_sample_size

    return get_sample_size(task, limit)


def _fingerprints(task) -> dict:
    ds = getattr(task, "dataset", None)
    if ds is None:
        return {}
    return {split: getattr(d, "_fingerprint", None) for split, d in getattr(ds, "items", lambda: [])()}


_SUITES: OrderedDict = OrderedDict()


def suite(tm, tasks, limit=None, num_fewshot: int | None = None, seed: int = 0, cache_dir: str | Path | None = None
          ) -> Suite:
    """The :class:`Suite` of these tasks and settings: kept in the process (per TaskManager, whose identity
    changes with the task folder's state), its requests also under ``cache_dir/lm_eval/`` when given (a damaged
    file is set aside and the requests built again)."""
    from .files import DamagedFile, set_aside

    key = (tm, tuple(tasks), limit, num_fewshot, seed)
    if key not in _SUITES:
        s = Suite(tm, tuple(tasks), limit, num_fewshot, seed)
        if cache_dir:
            s.path = Path(cache_dir) / "lm_eval" / f"requests-{s.key()}.json.gz"
            try:
                s.load(s.path)
            except DamagedFile as e:
                set_aside(s.path, str(e))
        _SUITES[key] = s
        while len(_SUITES) > _SUITES_KEPT:
            _SUITES.popitem(last=False)
    _SUITES.move_to_end(key)
    return _SUITES[key]


def evaluate(lm, s: Suite) -> dict:
    """lm-eval's ``evaluator.evaluate`` of ``lm`` on the suite, seeded as ``simple_evaluate`` seeds it
    (random, numpy, torch: ``seed``), samples logged; the requests saved after the first build."""
    from lm_eval.evaluator import evaluate as lm_eval_evaluate

    random.seed(s.seed)
    np.random.seed(s.seed)
    torch.manual_seed(s.seed)
    built = s.requests() is not None
    with _doc_hash_once(s):
        out = lm_eval_evaluate(lm=lm, task_dict=s.loaded, limit=s.limit, bootstrap_iters=100000, log_samples=True)
    if not built and s.path is not None:
        try:
            s.save(s.path)
        except OSError as e:
            log.warning(f"the built zero-shot requests were not kept: {e}")
    return out


def _arguments_key(kw: dict) -> str:
    """``json.dumps``' keyword arguments as text that is the same in every process (a function by its name)."""
    def name(v):
        return f"{getattr(v, '__module__', '')}.{getattr(v, '__qualname__', type(v).__qualname__)}"

    return repr(sorted((k, name(v) if callable(v) else v) for k, v in kw.items()))


@functools.lru_cache(maxsize=4)
def _hashes_doc_json(evaluate) -> bool:
    """Whether lm-eval's ``evaluate`` uses ``json.dumps`` once, and only as ``hash_string(json.dumps(requests[0].doc,
    ...))``: each logged document's ``doc_hash``, the one use :func:`_doc_hash_once` replaces (read once a function)."""
    try:
        source = inspect.getsource(evaluate)
    except (OSError, TypeError):
        return False
    return source.count("json.dumps(") == 1 and re.search(r"hash_string\(\s*json\.dumps\(\s*requests\[0\]\.doc,",
                                                           source) is not None


class _Digest(str):
    """A document's ``doc_hash`` already computed: ``json.dumps`` gives it in place of the text, ``hash_string``
    passes it through (:func:`_doc_hash_once`)."""


@contextmanager
def _doc_hash_once(s: Suite):
    """While lm-eval's ``evaluate`` runs: its module's ``json.dumps`` of a document of the suite returns the
    document's hash kept per (document, arguments) in ``s.doc_hash`` and its ``hash_string`` passes that through
    (module docstring); lm-eval untouched unless its evaluate hashes documents exactly that way."""
    import lm_eval.evaluator as ev

    real, real_hash = ev.json, ev.hash_string
    if real is not json or not _hashes_doc_json(ev.evaluate):
        yield
        return
    ids = set().union(*(task._lp_ids for task in s.leaves.values()))

    class Json:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def dumps(obj, **kw):
            if id(obj) not in ids:
                return real.dumps(obj, **kw)
            key = (id(obj), _arguments_key(kw))
            if key not in s.doc_hash:
                s.doc_hash[key] = real_hash(real.dumps(obj, **kw))
            return _Digest(s.doc_hash[key])

    def hash_string(text):
        return str(text) if type(text) is _Digest else real_hash(text)

    ev.json, ev.hash_string = Json(), hash_string
    try:
        yield
    finally:
        ev.json, ev.hash_string = real, real_hash


# ------------------------------------------------------------------------------------------ token ids
_ENCODINGS: OrderedDict = OrderedDict()  # tokenizer key -> {(context, continuation): (context ids, continuation ids)}


def _tokenizer_key(lm) -> str | None:
    """What decides HFLM's encodings: the tokenizer's whole definition, add_bos_token, the prefix token, the
    tokenizers / transformers versions; None for a tokenizer without a serialisable definition (not cached)."""
    import tokenizers
    import transformers

    from .data import tokenizer_definition

    spec = tokenizer_definition(lm.tokenizer)
    if spec is None:
        return None
    blob = f"{FORMAT}\0{spec}\0{lm.add_bos_token}\0{lm.prefix_token_id}\0{tokenizers.__version__}\0{transformers.__version__}"
    return hashlib.sha256(blob.encode()).hexdigest()


def _encode_many(lm, strings: list[str]) -> list[list[int]]:
    """``lm.tok_encode(s)`` for every string (HFLM's rule: special tokens as its add_bos_token says, none
    where the string already starts with the BOS text), the tokenizer called on batches."""
    from lm_eval.models.utils import _add_special_kwargs, has_bos_prefix

    bos_text = lm.tokenizer.decode(lm.prefix_token_id)
    out: list = [None] * len(strings)
    by_kwargs: dict = {}
    for i, s in enumerate(strings):
        kw = _add_special_kwargs(None, lm.add_bos_token)
        if has_bos_prefix(s, bos_text):
            kw["add_special_tokens"] = False
        by_kwargs.setdefault(tuple(sorted(kw.items())), []).append(i)
    for kw, idx in by_kwargs.items():
        for start in range(0, len(idx), 4096):
            part = idx[start : start + 4096]
            ids = lm.tokenizer([strings[i] for i in part], return_attention_mask=False, **dict(kw))["input_ids"]
            for i, e in zip(part, ids, strict=True):
                out[i] = e
    return out


def encode_pairs(lm, pairs: list[tuple[str, str]], cache_dir: str | Path | None = None) -> list[tuple[tuple, tuple]]:
    """HFLM's ``(context_enc, continuation_enc)`` of each non-empty-context pair (``TemplateLM._encode_pair``,
    causal models), computed once per tokenizer and pair (module docstring); with ``cache_dir``, the encodings
    of exactly these pairs are also kept on disk for the next process."""
    from .files import DamagedFile, atomic_write, read_torch, set_aside

    key = _tokenizer_key(lm)
    memo = _ENCODINGS.setdefault(key, {}) if key is not None else {}
    if key is not None:
        _ENCODINGS.move_to_end(key)
        while len(_ENCODINGS) > _ENCODINGS_KEPT:
            _ENCODINGS.popitem(last=False)
    missing = list(dict.fromkeys(p for p in pairs if p not in memo))
    path = None
    if missing and key is not None and cache_dir is not None:
        h = hashlib.sha256(key.encode())
        for c, x in missing:
            h.update(f"{len(c)}:{c}{len(x)}:{x}".encode())
        path = Path(cache_dir) / "lm_eval" / f"encodings-{h.hexdigest()[:24]}.pt"
        if path.is_file():
            try:
                saved = read_torch(path)
                ids, ctx_len, cont_len = saved["ids"], saved["context"], saved["continuation"]
                if len(ctx_len) != len(missing) or int(ctx_len.sum() + cont_len.sum()) != len(ids) or \
                        (ctx_len < 1).any() or (cont_len < 0).any():
                    raise DamagedFile(f"{path} is damaged: not the encodings of {len(missing)} requests")
                at = 0
                ids = ids.tolist()  # one conversion for all (per-request numpy slices cost ~0.8 s a suite)
                for p, n, k in zip(missing, ctx_len.tolist(), cont_len.tolist(), strict=True):
                    memo[p] = (tuple(ids[at : at + n]), tuple(ids[at + n : at + n + k]))
                    at += n + k
                missing, path = [], None
            except (DamagedFile, KeyError, TypeError, AttributeError) as e:
                set_aside(path, str(e))
    if missing:
        moved = []
        for c, x in missing:
            n = len(c) - len(c.rstrip())
            moved.append((c[:-n], c[-n:] + x) if n else (c, x))
        enc = _encode_many(lm, [c + x for c, x in moved] + [c for c, _ in moved])
        whole, ctx = enc[: len(moved)], enc[len(moved):]
        for p, w, c in zip(missing, whole, ctx, strict=True):
            memo[p] = (tuple(c), tuple(w[len(c):]))
        if path is not None:
            ids = torch.tensor([t for p in missing for part in memo[p] for t in part], dtype=torch.long)
            saved = {"ids": ids, "context": torch.tensor([len(memo[p][0]) for p in missing]),
                     "continuation": torch.tensor([len(memo[p][1]) for p in missing])}
            try:
                atomic_write(path, lambda tmp: torch.save(saved, tmp))
            except OSError as e:
                log.warning(f"the zero-shot token ids were not kept: {e}")
    return [memo[p] for p in pairs]  # the kept tuples themselves (copies as lists cost ~0.6 s a suite)
