"""Layer-selection metrics: which decoder layers to remove.

Each metric is a function registered in ``METRICS`` under its config name.  It gets a
:class:`SelectionContext` and returns the sorted indices of the layers to remove.
"""
from __future__ import annotations

import logging
import math
from functools import cache
from dataclasses import dataclass, field
from typing import Callable

import torch

from .calibration import BoundaryStats, stream_boundaries
from .evaluation import Prefix, layer_output_kind, perplexity, prefix_budget, prefix_reuse_applies, summed_nll
from .keys import USES
from .pruning import pruned
from .settings import Flag, Fraction, Int, Ints, OneOf, read

log = logging.getLogger(__name__)


@dataclass
class SelectionContext:
    stats: BoundaryStats
    n: int
    start: int | None = None  # force a contiguous block [start, start + n)
    indices: list[int] | None = None  # for `manual`
    seed: int = 0
    model: torch.nn.Module | None = None  # for metrics that run the model (ppl, sleb, taylor)
    samples: torch.Tensor | None = None  # calibration token windows those metrics score on
    batch_size: int = 1
    settings: dict | None = None  # the prune config (protect_ends, token, ...)
    make_patch: Callable | None = None  # (s, e) -> the training-free patch of an interface (for `patched`)
    scores: dict | None = None  # a metric's score of every candidate, kept in the record (`patched` fills it)

    def setting(self, name: str):
        return read(self.settings, "prune", name)

    @property
    def num_layers(self) -> int:
        return self.stats.num_layers


@dataclass(frozen=True)
class Metric:
    """What a selection metric is: its rule, and what the pipeline and the run ids need to know of it."""

    select: Callable[[SelectionContext], list[int]]
    runs_model: bool = False  # scores layers by running the model on calibration samples (gets model, samples)
    reads: dict = field(default_factory=dict)  # prune setting -> its rule (lp.settings; None: checked where read)
    width: Callable | None = None  # width pruning (lp.width): ctx -> WidthPlan; then ``select`` removes no layer


METRICS: dict[str, Metric] = {}


def register(name: str, runs_model: bool = False, reads: dict | None = None, width: Callable | None = None):
    """Register a selection metric ``name`` (prune.metric=name): the one place a metric is declared. ``reads``:
    the prune.* settings it reads besides metric and n, each with its rule (lp.settings), which validation
    checks; their names are kept in lp.keys.USES (what its run ids hash), their values in conf/prune/."""
    def wrap(fn):
        METRICS[name] = Metric(fn, runs_model, dict(reads or {}), width)
        USES[name] = set(reads or ())
        return fn
    return wrap


def validate_n(n: int, num_layers: int) -> None:
    if not isinstance(n, int) or n < 0 or n >= num_layers:
        raise ValueError(f"prune.n={n!r} must be an integer in [0, {num_layers - 1}] for a model of {num_layers} layers")


def _block(ctx: SelectionContext, score: torch.Tensor, best=max) -> list[int]:
    """Contiguous block [s, s+n) whose score[s] is best (or the forced ``start``)."""
    L, n = ctx.num_layers, ctx.n
    if n == 0:
        return []
    if ctx.start is not None:
        if not 0 <= ctx.start <= L - n:
            raise ValueError(f"prune.start={ctx.start} must be in [0, {L - n}] to remove {n} of {L} layers")
        s = ctx.start
    else:
        candidates = list(range(0, L - n + 1))
        s = best(candidates, key=lambda i: score[i].item())
    return list(range(s, s + n))


SIMILARITIES = ("token", "linearpatch")


START = Int(0, "start", none_ok=True)  # a forced block start: [0, L - n]


@register("cosine", reads={"start": START, "similarity": OneOf(SIMILARITIES)})
def cosine(ctx: SelectionContext) -> list[int]:
    """The contiguous block whose input and output are most similar.

    ``similarity=token`` (LLM-Streamline; lp's default): the mean token-wise cosine of boundaries s and s+n,
    any start in [0, L-n], as the official code (RUCKBReasoning/LLM-Streamline, LLM_Streamline/get_cosine.py,
    lines 44-60: per sample trace(0.5 + 0.5 cos) / T between HF's hidden_states j and j+n, averaged over
    samples, the argmax; a monotone map of the mean cosine, equal to lp's mean over tokens for windows of one
    length). Its hidden_states[L] is the final norm's output, so a block that ends at the last layer is scored
    against the normed output here too (``stats.cos_normed``). LLM-Streamline's layer replacement asks for
    n+1 layers (train_mseloss.py line 120). ``similarity=linearpatch``, the official LinearPatch code (layer_select.py,
    get_pruned_layer_with_cosine, lines 80-81): ``torch.cosine_similarity(act[i], act[i+n])`` on (1, T, d)
    inputs of layers i and i+n, i.e. a cosine along the sequence per channel, averaged over channels then
    samples; start i in range(1, L-n), i.e. [1, L-n-1] (layer 0 and the final norm's input never used)."""
    L, n = ctx.num_layers, ctx.n
    kind = ctx.setting("similarity")
    if kind not in SIMILARITIES:
        raise ValueError(f"prune.similarity={kind!r} is not one of {list(SIMILARITIES)}")
    if kind == "token":
        score = torch.tensor([ctx.stats.cos[s, s + n].item() for s in range(L - n + 1)])
        if ctx.stats.cos_normed is not None:  # a block ending at the last layer: against the normed output
            score[L - n] = ctx.stats.cos_normed[L - n].item()
        else:
            log.warning("calibration statistics without cos_normed (made by an older lp): the block ending at the "
                        "last layer is scored against the final norm's input, not its output")
    else:
        if ctx.stats.cos_seq is None:
            raise ValueError("prune.similarity=linearpatch needs calibration statistics with cos_seq (recompute them)")
        score = torch.tensor([ctx.stats.cos_seq[s, s + n].item() if 1 <= s <= L - n - 1 else -math.inf
                              for s in range(L - n + 1)])
    return _block(ctx, score, best=max)


@register("angular", reads={"start": START, "token": OneOf(("last", "all"))})
def angular(ctx: SelectionContext) -> list[int]:
    """Gromov et al. 2024 (The Unreasonable Ineffectiveness of the Deeper Layers, Sec. 3.2): the block with the
    smallest mean angular distance arccos(cos)/pi between boundaries s and s+n, on the LAST token of each
    sample (``token=last``, the paper's rule and that of the ShortGPT reference code sramshetty/ShortGPT,
    short_gpt/short_llama.py, compute_bi, lines 140-144: ``in_hidden[:, -1:]``, ``out_hidden[:, -1:]``, distance
    arccos(sim)/pi as in short_gpt/metrics.py, line 24);
    ``token=all`` averages over every token (lp's earlier variant)."""
    L, n = ctx.num_layers, ctx.n
    token = ctx.setting("token")
    if token == "last":
        if ctx.stats.cos_last is None:
            raise ValueError("prune.token=last needs calibration statistics with cos_last (recompute them)")
        ang = torch.arccos(ctx.stats.cos_last.clamp(-1, 1)) / torch.pi
    elif token == "all":
        ang = ctx.stats.angular
    else:
        raise ValueError(f"prune.token={token!r} is not one of ['last', 'all']")
    score = torch.tensor([ang[s, s + n].item() for s in range(L - n + 1)])
    return _block(ctx, score, best=min)


def block_influence_scores(stats: BoundaryStats) -> torch.Tensor:
    """ShortGPT's BI_i = 1 - E[cos(x_i, x_{i+1})] for every layer i."""
    L = stats.num_layers
    return 1 - torch.tensor([stats.cos[i, i + 1].item() for i in range(L)])


@register("block_influence")
def block_influence(ctx: SelectionContext) -> list[int]:
    """ShortGPT: the n layers with the lowest Block Influence (not necessarily contiguous); every token, as
    sramshetty/ShortGPT short_gpt/metrics.py, block_influence, lines 13-26 (1 - cos per token)."""
    bi = block_influence_scores(ctx.stats)
    return sorted(torch.argsort(bi, stable=True)[: ctx.n].tolist())


@register("last")
def last(ctx: SelectionContext) -> list[int]:
    """Control: the last n layers."""
    return list(range(ctx.num_layers - ctx.n, ctx.num_layers))


@register("manual", reads={"indices": None})  # checked against prune.n by the pipeline's validation
def manual(ctx: SelectionContext) -> list[int]:
    """Control: explicit indices (prune.indices); n is their count."""
    idx = sorted(set(ctx.indices or []))
    if len(idx) != ctx.n or any(not 0 <= i < ctx.num_layers for i in idx):
        raise ValueError(
            f"prune.indices={ctx.indices} must hold prune.n={ctx.n} distinct layers in [0, {ctx.num_layers - 1}]"
        )
    return idx


@register("random")
def random(ctx: SelectionContext) -> list[int]:
    """Sanity floor: n layers drawn uniformly at random (seeded)."""
    g = torch.Generator().manual_seed(ctx.seed)
    return sorted(torch.randperm(ctx.num_layers, generator=g)[: ctx.n].tolist())


def select_layers(metric: str, ctx: SelectionContext) -> list[int]:
    if metric not in METRICS:
        raise ValueError(f"prune.metric={metric!r} is not one of {sorted(METRICS)}")
    validate_n(ctx.n, ctx.num_layers)
    return METRICS[metric].select(ctx)


def _needs_model(ctx: SelectionContext, metric: str) -> tuple[torch.nn.Module, torch.Tensor]:
    if ctx.model is None or ctx.samples is None:
        raise ValueError(f"prune.metric={metric!r} scores layers by running the model: pass model and samples")
    return ctx.model, ctx.samples


def _ppl_without(ctx: SelectionContext, removed: list[int]) -> float:
    with pruned(ctx.model, removed, lambda s, e: None):
        return perplexity(ctx.model, ctx.samples, ctx.batch_size, progress=False)


@register("ppl", runs_model=True, reads={"score_samples": Int(1), "score_seqlen": Int(2, "context", none_ok=True), "protect_ends": Flag()})
def ppl(ctx: SelectionContext) -> list[int]:
    """Shortened LLaMA (PPL+ criterion, src/anal_block_sensitivity_ppl.py): the n layers whose single removal
    raises calibration perplexity least, never blocks 0-3 or the last two (the "+" rule)."""
    _needs_model(ctx, "ppl")
    from tqdm.auto import tqdm

    scores = [_ppl_without(ctx, [i]) for i in tqdm(range(ctx.num_layers), desc="ppl metric")]
    return _lowest(ctx, torch.tensor(scores))


def protected(ctx: SelectionContext) -> set[int]:
    """Shortened LLaMA's "+" heuristic (src/block_prune.py, lines 67-79, on unless --no_plus_heuristic): blocks
    0-3 and the last two are never removed. ``prune.protect_ends=false`` turns it off."""
    if not ctx.setting("protect_ends"):
        return set()
    L = ctx.num_layers
    return {0, 1, 2, 3, L - 2, L - 1}


def _lowest(ctx: SelectionContext, scores: torch.Tensor) -> list[int]:
    """The n least important layers by ``scores``, never a protected one."""
    keep = protected(ctx)
    order = [i for i in torch.argsort(scores, stable=True).tolist() if i not in keep]
    if len(order) < ctx.n:
        raise ValueError(f"prune.n={ctx.n} is more than the {len(order)} layers that may be removed with "
                         f"prune.protect_ends=true (layers {sorted(keep)} are kept)")
    return sorted(order[: ctx.n])


def sleb_steps(ctx: SelectionContext) -> list[tuple[int, float]]:
    """SLEB's greedy steps: (layer removed, calibration perplexity after removing it) for n steps."""
    _needs_model(ctx, "sleb")
    from tqdm.auto import tqdm

    removed: list[int] = []
    steps = []
    if ctx.n > ctx.num_layers - 2:
        raise ValueError(f"prune.n={ctx.n}: SLEB keeps the first and last remaining blocks, so at most "
                         f"{ctx.num_layers - 2} of {ctx.num_layers} can be removed")
    for _ in tqdm(range(ctx.n), desc="sleb"):
        alive = [i for i in range(ctx.num_layers) if i not in removed]
        # sleb.py, lines 104-106: for j in range(early_barrier=1, search_bound - latter_barrier=1): the first
        # and the last remaining blocks are never candidates
        candidates = alive[1:-1]
        scores = {i: _ppl_without(ctx, removed + [i]) for i in candidates}
        best = min(candidates, key=scores.__getitem__)
        removed.append(best)
        steps.append((best, scores[best]))
    return steps


@register("sleb", runs_model=True, reads={"score_samples": Int(1), "score_seqlen": Int(2, "context", none_ok=True)})
def sleb(ctx: SelectionContext) -> list[int]:
    """SLEB: iteratively remove the layer whose removal gives the lowest calibration perplexity, given the
    layers already removed."""
    return sorted(i for i, _ in sleb_steps(ctx))


def taylor_scores(ctx: SelectionContext) -> torch.Tensor:
    """Shortened LLaMA's Taylor importance per layer (src/anal_block_sensitivity_taylor.py, lines 96-145):
    the salience w * dL/dw of every WEIGHT matrix and norm weight of the block (no biases, line 101:
    ``"weight" in k``), summed over calibration batches, then |.| summed over the weight's entries and over
    the block's weights; L is the calibration language-modelling loss."""
    from .models import Layout

    model, samples = _needs_model(ctx, "taylor")
    layers = Layout(model).layers
    params = [[p for name, p in layer.named_parameters() if name.endswith("weight")] for layer in layers]
    flags = [p.requires_grad for ps in params for p in ps]
    for ps in params:
        for p in ps:
            p.requires_grad_(True)
            p.grad = None
    try:
        device = next(model.parameters()).device
        for start in range(0, len(samples), ctx.batch_size):
            batch = samples[start : start + ctx.batch_size].to(device)
            with torch.enable_grad():
                model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        scores = torch.tensor([sum((p * p.grad).abs().sum().item() for p in ps if p.grad is not None)
                               for ps in params])
    finally:
        for (p, flag) in zip((p for ps in params for p in ps), flags):
            p.grad = None
            p.requires_grad_(flag)
    return scores


@register("taylor", runs_model=True, reads={"score_samples": Int(1), "score_seqlen": Int(2, "context", none_ok=True), "protect_ends": Flag()})
def taylor(ctx: SelectionContext) -> list[int]:
    """Taylor+: remove the n layers of lowest first-order importance, never blocks 0-3 or the last two."""
    return _lowest(ctx, taylor_scores(ctx))


def llm_pruner_plan(ctx: SelectionContext):
    """LLM-Pruner's block-wise width plan (lp.width): heads and MLP channels by Taylor importance."""
    from .width import plan

    model, samples = _needs_model(ctx, "llm_pruner")
    return plan(model, samples, ctx.n, ctx.setting("ratio"), ctx.setting("protect_first"), ctx.setting("protect_last"),
                ctx.batch_size)


@register("llm_pruner", runs_model=True, width=llm_pruner_plan,
          reads={"score_samples": Int(1), "score_seqlen": Int(2, "context", none_ok=True), "ratio": Fraction(none_ok=True),
                 "protect_first": Int(0, "layers"), "protect_last": Int(0, "layers")})
def llm_pruner(ctx: SelectionContext) -> list[int]:
    """LLM-Pruner removes no layer: it narrows layers protect_first .. L - protect_last - 1 (lp.width)."""
    return []


# ------------------------------------------------------------------ lp's own: the block the patched model keeps best
SCORES = ("kl", "ppl")


def _logits_from(model, batch: torch.Tensor):
    """``logits(layer)``: the current model's logits on ``batch`` when the dense hidden state entering
    ``layer`` is fed in and layers [0, layer) are skipped (one dense pass computes every boundary); for a
    family where prefix reuse does not apply, the whole model on the tokens (``layer`` ignored)."""
    if not prefix_reuse_applies(model):
        return lambda layer: model(input_ids=batch, use_cache=False).logits
    with layer_output_kind(model) as returns:
        xs = next(iter(stream_boundaries(model, batch, len(batch), progress=False)))
    return lambda layer: Prefix(xs[layer], layer, returns[0]).forward(model, 0, len(batch))


@torch.no_grad()
def patched_scores(ctx: SelectionContext) -> dict[int, float]:
    """For every start s of a contiguous block of n layers: the block removed, the interface patched with
    ``ctx.make_patch`` (the training-free patch built from the one-pass statistics), and the model scored on
    ``ctx.samples`` (held-out calibration windows) by ``score``: ``kl``, the mean over tokens of KL(dense top-k
    || patched, renormalised over the top-k; ``topk`` tokens, as offline distillation's loss), or ``ppl``, the
    perplexity. Lower is better; a non-finite score stays in the result (the metric skips and names it)."""
    from .distill import topk_kl

    model, samples = _needs_model(ctx, "patched")
    if ctx.make_patch is None:
        raise ValueError("prune.metric=patched scores each block with its patch: pass make_patch")
    score, k = ctx.setting("score"), int(ctx.setting("topk"))
    if score not in SCORES:
        raise ValueError(f"prune.score={score!r} is not one of {list(SCORES)}")
    L, n = ctx.num_layers, ctx.n
    starts = [ctx.start] if ctx.start is not None else list(range(L - n + 1))
    make = cache(ctx.make_patch)  # each candidate's patch built once, reused for every batch

    total, tokens = dict.fromkeys(starts, 0.0), 0
    device = next(model.parameters()).device
    for i in range(0, len(samples), ctx.batch_size):
        batch = samples[i : i + ctx.batch_size].to(device)
        logits = _logits_from(model, batch)
        target = batch[:, 1:]
        if score == "kl":  # the top-k of the model's own logits (bfloat16 -> float32 is exact: same k tokens)
            top = logits(L)[:, :-1].topk(k, dim=-1)
            teacher = (top.values.float().softmax(-1), top.indices)
        for s in starts:
            with pruned(model, list(range(s, s + n)), make):
                out = logits(s)[:, :-1]
            if score == "kl":
                value = topk_kl(out, *teacher).item() * target.numel()
            else:
                value = summed_nll(out, target)
            total[s] += value
        tokens += target.numel()
    mean = {s: v / tokens for s, v in total.items()}
    return {s: (math.exp(v) if v < 700 else math.inf) if score == "ppl" and math.isfinite(v) else v
            for s, v in mean.items()}


@register("patched", runs_model=True, reads={"start": START, "patch": None, "score": OneOf(SCORES), "topk": Int(1),
                                             "score_samples": Int(1), "score_seqlen": Int(2, "context", none_ok=True)})
def patched(ctx: SelectionContext) -> list[int]:
    """lp's own selection (not a published method): the contiguous block whose removal, with the configured
    training-free patch, leaves the model closest to the dense one on held-out calibration windows
    (:func:`patched_scores`). Candidates whose score is not finite are skipped and named."""
    if ctx.n == 0:
        return []
    if ctx.scores is None:
        ctx.scores = patched_scores(ctx)
    scores = ctx.scores
    bad = sorted(s for s, v in scores.items() if not math.isfinite(v))
    if bad:
        log.warning(f"prune.metric=patched: blocks starting at {bad} give a non-finite score: skipped")
    good = {s: v for s, v in scores.items() if math.isfinite(v)}
    if not good:
        raise ValueError(f"prune.metric=patched: every candidate block ({sorted(scores)}) gives a non-finite "
                         f"score: the patched model's outputs overflow or the weights are damaged")
    s = min(good, key=good.get)
    return list(range(s, s + ctx.n))


@register("evopress", runs_model=True, reads={
    "score_samples": Int(1), "score_seqlen": Int(2, "context", none_ok=True), "generations": Int(1, none_ok=True),
    "offspring": Int(1), "initial": Int(1), "initial_tokens": Int(2), "survivors": Ints(1), "tokens": Ints(2),
    "max_mutations": Int(1), "topk": Int(1, "vocab", none_ok=True), "in_loop": Flag()})
def evopress(ctx: SelectionContext) -> list[int]:
    """EvoPress (Sieberling et al., ICML 2025): the set of n layers found by evolutionary search, fitness the KL
    of the pruned model to the dense one on calibration tokens (lp.evopress, where each rule cites the official
    code); ``in_loop``: the fitness of the model patched with the run's training-free patch (``make_patch``)."""
    from .evopress import KLFitness, Schedule, search

    model, samples = _needs_model(ctx, "evopress")
    if ctx.n == 0:
        return []
    if ctx.setting("in_loop") and ctx.make_patch is None:
        raise ValueError("prune.in_loop=true scores each candidate with its patch: pass make_patch")
    names = ("generations", "offspring", "initial", "initial_tokens", "max_mutations")
    schedule = Schedule(**{k: ctx.setting(k) for k in names}, survivors=tuple(ctx.setting("survivors")),
                        tokens=tuple(ctx.setting("tokens")))
    fitness = KLFitness(model, samples, ctx.batch_size, ctx.setting("topk"), prefix_budget(),
                        ctx.make_patch if ctx.setting("in_loop") else None)
    result = search(fitness, ctx.num_layers, ctx.n, *samples.shape, schedule, ctx.seed)
    log.info(f"prune.metric=evopress: {result.generations} generations, {result.evaluations} fitness evaluations in "
             f"{result.seconds:.1f} s; removed {result.removed}, KL {result.fitness:.4g} on the last step's tokens")
    return result.removed
