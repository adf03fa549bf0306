"""lp's loglikelihood engine for lm-eval: each distinct context scored once, the output head only where a
continuation token is predicted, batches by a token budget, and dense prefix reuse for pruned models.

:class:`PackedLM` is lm-eval's HFLM with its model part replaced (``_loglikelihood_tokens``): tokenisation
(the context/continuation split, empty contexts, BOS, left truncation at the model's length), requests,
``loglikelihood_rolling``, ``generate_until``, caching hooks and everything else are HFLM's own, so the
requests it scores are HFLM's requests, token for token. It is registered with lm-eval as ``lp``
(``lm_eval --model lp --model_args pretrained=...`` works as for ``hf``).

How a batch is built. A request (context c, continuation x) is scored from the input (c + x)[-(L+1):][:-1],
exactly as HFLM truncates it; its *shared* part is that input up to and including the last context token, its
*suffix* the rest (x without its last token). Requests with the same shared part (the choices of one
question) form a group: the shared part once, then every suffix, each suffix seeing the shared part and
itself, never another suffix (a prefix-sharing attention mask; positions restart after the shared part for
every suffix; given to the model as an additive mask for its own attention, or with ``eval.attention=flex`` as a
FlexAttention block mask). Groups are packed into rows (several questions per row, block-diagonal), rows into batches of
at most ``token_budget`` tokens, longest first, so an out-of-memory error shows on the first batch. The final
norm's output is gathered at the positions that predict a continuation token only, and the head and
log-softmax (float32) run on those rows alone: never a (batch, length, vocabulary) tensor.

Dense prefix reuse (:class:`PrefixStates`): the layers before the first one that pruning changes are the dense
model's, so the hidden states entering that layer, per batch, are kept (within a byte budget) from the first
evaluation that computes them (the dense one, or an earlier run of a sweep) and later evaluations start there.
The batches are a function of the requests alone, so the states fit exactly: outcomes are identical.
"""
from __future__ import annotations

import functools
import hashlib
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm.auto import tqdm
from transformers import AttentionInterface

from .evaluation import layer_output_kind, load_states, prefix_reuse_applies, save_states
from .models import Layout

ENGINE_VERSION = 2  # part of the dense evaluation's cache key and of the record: raise it when outcomes may change (2: log p by logsumexp)
ENGINES = ("lp", "hflm")  # eval.engine: lp's engine, or lm-eval's HFLM (the reference the tests compare against)
HEAD_CHUNK = 2**27  # logits computed at most this many (positions x vocabulary) at a time (512 MiB in float32)


@dataclass
class _Group:
    """Requests that share their scored input up to the last context token."""

    shared: tuple[int, ...]
    members: list = field(default_factory=list)  # (request index, suffix tokens, continuation tokens)

    @property
    def size(self) -> int:
        return len(self.shared) + sum(len(s) for _, s, _ in self.members)


def group_requests(requests: list, max_length: int) -> list[_Group]:
    """Requests ((context, continuation) strings, context tokens, continuation tokens) grouped by shared part,
    with HFLM's left truncation: the input is (context + continuation)[-(max_length + 1):][:-1]."""
    groups: dict[tuple, _Group] = {}
    for i, (_, ctx, cont) in enumerate(requests):
        if not ctx or not cont or len(cont) > max_length:
            raise ValueError(f"request {i}: a context and a continuation of 1..{max_length} tokens are needed "
                             f"(got {len(ctx)} and {len(cont)})")
        inp = (list(ctx) + list(cont))[-(max_length + 1):][:-1]
        cut = len(inp) - len(cont) + 1
        shared = tuple(inp[:cut])
        groups.setdefault(shared, _Group(shared)).members.append((i, inp[cut:], list(cont)))
    # longest first (ties by tokens: the order, hence every batch, is a function of the requests alone)
    return sorted(groups.values(), key=lambda g: (-g.size, g.shared))


def pack(groups: list[_Group], token_budget: int) -> list[list[list[_Group]]]:
    """Batches of rows of groups: within a batch every row is as long as its longest group (the batch's
    first); a row takes groups while they fit, a batch rows while rows x length stays within the budget."""
    batches, i = [], 0
    while i < len(groups):
        width = groups[i].size
        rows, used = [[]], 0
        while i < len(groups):
            g = groups[i]
            if used + g.size > width:  # a new row, if the batch has room for it
                if (len(rows) + 1) * width > token_budget:
                    break
                rows.append([])
                used = 0
            rows[-1].append(g)
            used += g.size
            i += 1
        batches.append(rows)
    return batches


@dataclass
class _Batch:
    ids: torch.Tensor  # (rows, width)
    pos: torch.Tensor  # position ids
    seg: torch.Tensor  # group of each token in its row (-1: padding)
    part: torch.Tensor  # 0: the group's shared part, j >= 1: its j-th suffix
    where: list  # per member: (request index, row, token indices that predict the continuation, continuation)

    @property
    def key(self) -> str:
        """What the batch is, for prefix reuse."""
        h = hashlib.sha256()
        for t in (self.ids, self.pos, self.seg, self.part):
            h.update(t.numpy().tobytes())
        return h.hexdigest()


def layout_batch(rows: list[list[_Group]], pad_id: int) -> _Batch:
    width = max(sum(g.size for g in row) for row in rows)
    ids, pos, seg, part, where = [], [], [], [], []
    for r, row in enumerate(rows):  # one row as flat lists, then four tensors a batch
        i_, p_, s_, q_ = [], [], [], []
        for gi, g in enumerate(row):
            n = len(g.shared)
            i_ += g.shared
            p_ += range(n)
            s_ += [gi] * n
            q_ += [0] * n
            last_shared = len(i_) - 1
            for j, (req, suffix, cont) in enumerate(g.members, start=1):
                t, k = len(i_), len(suffix)
                i_ += suffix
                p_ += range(n, n + k)
                s_ += [gi] * k
                q_ += [j] * k
                where.append((req, r, [last_shared, *range(t, t + k)], cont))
        pad = width - len(i_)  # padding: its own segment (-1), position 0
        ids.append(i_ + [pad_id] * pad)
        pos.append(p_ + [0] * pad)
        seg.append(s_ + [-1] * pad)
        part.append(q_ + [0] * pad)
    return _Batch(*(torch.tensor(x, dtype=torch.long) for x in (ids, pos, seg, part)), where)


def visible(b: _Batch, window: int | None = None, device=None) -> torch.Tensor:
    """Which keys each query sees, (rows, width, width) booleans built on ``device``: the earlier tokens of its
    group's shared part and of its own suffix (within ``window`` positions for sliding-window layers); padding
    sees itself."""
    seg, part, pos = (t.to(device) for t in (b.seg, b.part, b.pos))
    q, k = (slice(None), slice(None), None), (slice(None), None, slice(None))
    see = (seg[q] == seg[k]) & (seg[q] >= 0)
    idx = torch.arange(b.ids.shape[1], device=seg.device)
    see &= idx[:, None] >= idx[None, :]
    see &= (part[k] == 0) | (part[k] == part[q])
    if window is not None:
        see &= pos[q] - pos[k] < window
    return see | torch.eye(b.ids.shape[1], dtype=torch.bool, device=seg.device)  # padding sees itself: no empty row


def attention_mask(b: _Batch, dtype: torch.dtype, window: int | None = None, device=None) -> torch.Tensor:
    """The additive (rows, 1, width, width) mask of :func:`visible` (eval.attention=sdpa)."""
    see = visible(b, window, device)
    return torch.zeros(see.shape, dtype=dtype, device=see.device).masked_fill_(~see, torch.finfo(dtype).min)[:, None]


def block_mask(b: _Batch, window: int | None = None, device=None):
    """:func:`visible` as FlexAttention's BlockMask (eval.attention=flex): blocks that no query of theirs sees
    are skipped, so the block-diagonal rows cost what their groups cost."""
    from torch.nn.attention.flex_attention import create_block_mask

    see = visible(b, window, device)
    rows, width, _ = see.shape
    return create_block_mask(lambda r, h, q, k: see[r, q, k], rows, None, width, width, device=see.device)


def flex_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
                           **kwargs):
    """A transformers attention function (registered as ``lp_flex``) that applies FlexAttention with the block
    mask the engine passes as attention_mask: compiled on CUDA, eager elsewhere (inductor's CPU code for it does
    not build with torch 2.13; eager is exact, for tests)."""
    from torch.nn.attention.flex_attention import flex_attention

    if kwargs.get("s_aux") is not None:
        raise ValueError("eval.attention=flex: attention sinks (s_aux) are not supported; use eval.attention=sdpa")
    score_mod = None if softcap is None else (lambda score, b, h, q, k: softcap * torch.tanh(score / softcap))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "flex_attention called without torch.compile")  # eager: on purpose
        out = (_compiled_flex() if query.is_cuda else flex_attention)(
            query, key, value, score_mod=score_mod, block_mask=attention_mask, scale=scaling,
            enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


AttentionInterface.register("lp_flex", flex_attention_forward)
ATTENTION = {"sdpa": attention_mask, "flex": lambda b, dtype, window=None, device=None: block_mask(b, window, device)}
KERNEL = {"sdpa": None, "flex": "lp_flex"}  # the model's attention implementation each needs (None: as loaded)


@contextmanager
def attention_kernel(model, attention: str):
    """The model's attention implementation for ``attention`` (eval.attention), restored after."""
    want = KERNEL[attention]
    old = model.config._attn_implementation
    if want is None or want == old:
        yield
        return
    model.set_attn_implementation(want)
    try:
        yield
    finally:
        model.set_attn_implementation(old)


class PrefixStates:
    """Dense hidden states entering decoder layer ``layer``, per batch (on the CPU), kept while they fit in
    ``budget`` bytes (batches past it are computed as usual)."""

    def __init__(self, layer: int, budget: int):
        self.layer, self.budget, self.states, self.tuple_output = layer, budget, {}, None
        self.hits = 0
        self.loaded = 0  # batches adopted from a saved file

    @property
    def nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self.states.values())

    def offer(self, key: str, hidden: torch.Tensor) -> None:
        if key not in self.states and self.nbytes + hidden.numel() * hidden.element_size() <= self.budget:
            if hidden.is_cuda:  # into page-locked memory, queued on the stream: a pageable copy waits (~10 s a
                # whole-suite dense evaluation of the 1.5B model on an H100, docs/performance.md)
                kept = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
                kept.copy_(hidden.detach(), non_blocking=True)
            else:
                kept = hidden.detach().to("cpu", copy=True)
            self.states[key] = kept

    def save(self, path) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # every queued copy into the states done
        save_states(path, self.layer, self.tuple_output, self.states)

    def load(self, path, hidden_size: int) -> None:
        """Adopt the states saved at ``path`` (within the budget); DamagedFile as lp.evaluation.load_states."""
        self.tuple_output, states = load_states(path, self.layer, hidden_size)
        for k, h in states.items():
            self.offer(k, h)
        self.loaded = len(self.states)


def _masks(model, b: _Batch, dtype: torch.dtype, device, attention: str = "sdpa"):
    """What the model's forward takes as attention_mask: one mask, or one per layer type (sliding windows)."""
    types, window = getattr(model.config, "layer_types", None), getattr(model.config, "sliding_window", None)
    mask = ATTENTION[attention]
    if not types:  # one kind of layer: a sliding window for all where the config sets one (Mistral, Phi-3)
        return mask(b, dtype, window, device)
    full = mask(b, dtype, device=device)
    if "sliding_attention" not in types:
        return full
    return {"full_attention": full, "sliding_attention": mask(b, dtype, window, device)}


def output_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The head on final hidden states, with the transforms the families' forward applies after it."""
    logits = Layout(model).head(hidden)
    cfg = model.config
    if getattr(cfg, "final_logit_softcapping", None):  # Gemma 2/3
        logits = torch.tanh(logits / cfg.final_logit_softcapping) * cfg.final_logit_softcapping
    if getattr(cfg, "logits_scaling", None) and cfg.model_type == "granite":
        logits = logits / cfg.logits_scaling
    return logits


@torch.no_grad()
def final_hidden(model, b: _Batch, prefix: PrefixStates | None = None, attention: str = "sdpa") -> torch.Tensor:
    """The final norm's output for a batch (rows, width, d), from the prefix states where they hold it."""
    lay = Layout(model)
    embed = lay.base.get_input_embeddings().weight
    device, dtype = embed.device, embed.dtype
    mask, pos = _masks(model, b, dtype, device, attention), b.pos.to(device)
    key = b.key if prefix is not None else None
    if prefix is not None and key in prefix.states:
        prefix.hits += 1
        with lay.skipping(prefix.layer, prefix.tuple_output):
            return lay.base(inputs_embeds=prefix.states[key].to(device, non_blocking=True), attention_mask=mask, position_ids=pos,
                            use_cache=False).last_hidden_state
    hook = None
    if prefix is not None:
        def grab(module, args, kwargs):
            prefix.offer(key, args[0] if args else kwargs["hidden_states"])
        # the state entering layer ``prefix.layer``; in a model pruned to that many layers (the last ones gone),
        # the final norm's input
        target = lay.layers[prefix.layer] if prefix.layer < len(lay.layers) else lay.norm
        hook = target.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with layer_output_kind(model) as returns:
            out = lay.base(input_ids=b.ids.to(device), attention_mask=mask, position_ids=pos,
                           use_cache=False).last_hidden_state
        if prefix is not None:
            prefix.tuple_output = returns[0]
        return out
    finally:
        if hook is not None:
            hook.remove()


@torch.no_grad()
def score_batch(model, b: _Batch, prefix: PrefixStates | None = None, attention: str = "sdpa"
                ) -> list[tuple[int, float, bool]]:
    """(request index, log-likelihood of its continuation, whether it is the greedy continuation)."""
    hidden = final_hidden(model, b, prefix, attention)
    rows = torch.tensor([r for _, r, idx, _ in b.where for _ in idx])
    cols = torch.tensor([i for _, _, idx, _ in b.where for i in idx])
    target = torch.tensor([t for *_, cont in b.where for t in cont])
    picked = hidden[rows.to(hidden.device), cols.to(hidden.device)]
    step = max(1, HEAD_CHUNK // (getattr(Layout(model).head, "out_features", None) or 2**17))
    logp, greedy = [], []
    for s in range(0, len(picked), step):
        logits = output_logits(model, picked[s : s + step]).float()
        t = target[s : s + step].to(logits.device)
        chosen = logits.gather(1, t[:, None])[:, 0]
        # log p(t) = logit_t - logsumexp: no (positions x vocabulary) log-softmax written; greedy where the
        # target's logit is the maximum (HFLM's argmax == t, except that a tie counts as greedy here)
        logp.append((chosen - torch.logsumexp(logits, dim=-1)).cpu())
        greedy.append((chosen >= logits.max(dim=-1).values).cpu())
    logp, greedy = torch.cat(logp), torch.cat(greedy)
    out, at = [], 0
    for req, _, idx, _ in b.where:
        out.append((req, float(logp[at : at + len(idx)].sum()), bool(greedy[at : at + len(idx)].all())))
        at += len(idx)
    return out


@register_model("lp")
class PackedLM(HFLM):
    """HFLM with lp's engine for its loglikelihood requests (module docstring). ``token_budget``: tokens per
    batch (rows x width); ``prefix``: dense states to start from or to fill (:class:`PrefixStates`);
    ``attention``: the prefix-sharing mask as an additive mask for the model's own attention (``sdpa``) or as a
    FlexAttention block mask (``flex``)."""

    def __init__(self, pretrained, token_budget: int = 16384, prefix: PrefixStates | None = None,
                 cache_dir: str | None = None, attention: str = "sdpa", **kwargs):
        kwargs.pop("batch_size", None)  # batches are built by token_budget
        if attention not in ATTENTION:
            raise ValueError(f"eval.attention={attention!r} is not one of {list(ATTENTION)}")
        super().__init__(pretrained=pretrained, batch_size=1, **kwargs)
        self.token_budget, self.attention = int(token_budget), attention
        if prefix is not None and (prefix.layer == 0 or not prefix_reuse_applies(self.model)):
            prefix = None  # nothing to skip, or a family whose embeddings cannot be fed back: the plain path
        self.prefix = prefix
        self.cache_dir = cache_dir

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        """HFLM's loglikelihood (``TemplateLM.loglikelihood``) with the token ids of every request with a
        context from :func:`lp.harness.encode_pairs`: HFLM's rule, computed once per tokenizer and request."""
        from .harness import encode_pairs

        pairs = [req.args for req in requests]
        with_context = [p for p in pairs if p[0] != ""]
        encoded = dict(zip(with_context, encode_pairs(self, with_context, self.cache_dir), strict=True))
        new = []
        for context, continuation in pairs:
            if context == "":  # HFLM's own path: the prefix token as context
                cont = self.tok_encode(continuation, add_special_tokens=False)
                ctx, cont = ([self.prefix_token_id], cont) if self.prefix_token_id != cont[0] else (cont[:1], cont[1:])
            else:
                ctx, cont = encoded[(context, continuation)]
            new.append(((context, continuation), ctx, cont))
        return self._loglikelihood_tokens(new, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        groups = group_requests(requests, self.max_length)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        res: list = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="lp loglikelihood")
        with attention_kernel(self.model, self.attention):
            for rows in pack(groups, self.token_budget):
                for req, logp, greedy in score_batch(self.model, layout_batch(rows, pad), self.prefix, self.attention):
                    res[req] = (logp, greedy)
                    if requests[req][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[req][0], res[req])
                bar.update(sum(len(g.members) for row in rows for g in row))
        bar.close()
        return res
