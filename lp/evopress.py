"""EvoPress's evolutionary search for the decoder layers to drop (Sieberling et al., "EvoPress: Towards Optimal
Dynamic Model Compression via Evolutionary Search", ICML 2025; official code github IST-DASLab/EvoPress).

The rules, each as the official ``evo_drop_search.py`` (commit 50888a0) has it:
- a search point is a set of k removed blocks; the initial population is the fittest ``population`` of
  ``initial`` distinct random sets, scored on ``initial_tokens`` tokens (lines 351-389);
- each generation, ``offspring`` distinct children of a random parent, none equal to a parent; a child makes
  min(U(1, m), U(1, m)) flips (m = ``max_mutations``, biased towards few), each flip picking attention or MLP
  at random, adding one kept block to the removed set and taking one removed block out (lines 416-453);
- selection in steps: step j keeps the ``survivors[j]`` fittest on ``tokens[j]`` tokens, a fresh random
  draw of calibration sequences per step (the last one cut to the budget; lines 120-149); the parents join
  the last step (elitism, lines 455-475);
- fitness: KL(dense || candidate) per token over positions 0..T-2, the dense model's logits computed once
  (src/metrics.py, compute_kl_div, lines 41-80; lines 326-331 of the search);
- generations: k(L - k) / 1.5 (scripts/run_drop_search.sh, line 14); offspring 32, initial 64 on 2,048 tokens,
  survivors 2 then 1 on 2,048 and 32,768 tokens (lines 26-33 of that script).

Where lp differs (docs/methods.md lists each): whole layers only, i.e. the official ``--drop_entire_block``
(with it, a flip that picks the MLP is overwritten by the attention list, line 444-445: kept here as a flip
that changes nothing); the sets a model has are finite, so ``initial`` and ``offspring`` are capped at what
exists (the official loops would never end); a seeded ``random.Random`` of its own; optionally the dense
probabilities kept only on their top-k tokens (``topk``); candidates start from the dense state entering
their first changed layer (exact: the layers before it are the dense model's); and optionally the fitness of
the patched model (``make_patch``: each candidate's interfaces patched from the one calibration pass).
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from functools import cache
from itertools import combinations

import torch
import torch.nn.functional as F

from .calibration import stream_boundaries
from .distill import topk_kl
from .evaluation import layer_output_kind, prefix_reuse_applies
from .models import Layout, module_device
from .pruning import pruned

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Schedule:
    """How long and on how many tokens the search runs (the official example's values by default)."""

    generations: int | None = None  # None: k(L - k) / 1.5
    offspring: int = 32
    initial: int = 64
    initial_tokens: int = 2048
    survivors: tuple[int, ...] = (2, 1)  # the last is the population size
    tokens: tuple[int, ...] = (2048, 32768)
    max_mutations: int = 3

    def generations_for(self, k: int, num_layers: int) -> int:
        return self.generations if self.generations is not None else int(k * (num_layers - k) / 1.5)


class KLFitness:
    """Mean per-token KL(dense || candidate) of a set of removed layers on chosen calibration tokens.

    The dense model's log-probabilities (all of them, or the top ``topk`` renormalised) and, where the family
    allows prefix reuse, the dense hidden states entering each layer are computed once for every sample; a
    candidate then runs only the layers from its first changed one on. States are kept for every ``stride``-th
    boundary so that they fit ``budget`` bytes (a candidate starts at the nearest kept boundary before its first
    change). ``make_patch(s, e)``: the fitness of the patched model, each interface's patch built once (a patch
    from the calibration statistics, which changes no layer before the interface)."""

    def __init__(self, model, samples: torch.Tensor, batch_size: int = 1, topk: int | None = None,
                 budget: int = 2**31, make_patch=None):
        self.model, self.samples, self.topk = model, samples, topk
        self.make_patch = cache(make_patch) if make_patch is not None else (lambda s, e: None)  # each built once
        self.evaluations = 0
        lay = Layout(model)
        self.num_layers = L = lay.num_layers
        n, t = samples.shape
        per_boundary = n * t * lay.hidden_size * torch.finfo(next(model.parameters()).dtype).bits // 8
        self.stride = min(L, max(1, math.ceil(per_boundary * L / max(budget, 1)))) if prefix_reuse_applies(model) else L
        kept = list(range(0, L, self.stride))
        states: dict[int, list[torch.Tensor]] = {b: [] for b in kept if b}
        self.teacher: list = []
        with torch.no_grad(), layer_output_kind(model) as returns:
            for i in range(0, n, batch_size):
                batch = samples[i : i + batch_size]
                logits = model(input_ids=batch.to(module_device(model)), use_cache=False).logits
                # one sample at a time in float32: no float copy of the whole batch's vocabulary (Gemma-3: 16 GiB)
                self.teacher.extend(self._target(logits[j].float()) for j in range(len(batch)))
                if states:
                    hs = next(iter(stream_boundaries(model, batch, len(batch), progress=False)))
                    for b in states:
                        states[b].append(hs[b].cpu())
        self.states = {b: torch.cat(v) for b, v in states.items()}
        self.tuple_output = returns[0] if returns else False

    def _target(self, logits: torch.Tensor):
        if self.topk is None:
            return logits.log_softmax(-1).to(torch.bfloat16).cpu()
        top = logits.topk(self.topk, dim=-1)
        return top.values.softmax(-1).to(torch.bfloat16).cpu(), top.indices.int().cpu()

    @torch.no_grad()
    def __call__(self, removed: tuple[int, ...], rows: list[tuple[int, int]]) -> float:
        """The fitness of removing ``removed`` on ``rows``: (sample index, its first tokens) pairs."""
        self.evaluations += 1
        start = min(removed, default=self.num_layers - 1) // self.stride * self.stride  # the layers before: dense
        device = module_device(self.model)
        total, count = 0.0, 0
        with pruned(self.model, list(removed), self.make_patch), Layout(self.model).skipping(start, self.tuple_output):
            for i, length in rows:
                if start:
                    logits = self.model(inputs_embeds=self.states[start][i : i + 1, :length].to(device), use_cache=False).logits
                else:
                    logits = self.model(input_ids=self.samples[i : i + 1, :length].to(device), use_cache=False).logits
                total += self._kl(logits[0, : length - 1].float(), i, length) * (length - 1)
                count += length - 1
        return total / count

    def _kl(self, out: torch.Tensor, i: int, length: int) -> float:
        device = out.device
        if self.topk is None:  # the official: F.kl_div(log q, log p, log_target=True, batchmean) per token
            log_p = self.teacher[i][: length - 1].to(device).float()
            return F.kl_div(out.log_softmax(-1), log_p, log_target=True, reduction="batchmean").item()
        probs, idx = self.teacher[i]
        return topk_kl(out, probs[: length - 1].to(device), idx[: length - 1].to(device)).item()


def draw_rows(rng: random.Random, num_samples: int, seqlen: int, tokens: int) -> list[tuple[int, int]]:
    """Distinct random samples until ``tokens`` tokens, the last one cut to the budget (official lines 120-138)."""
    if tokens > num_samples * seqlen:
        raise ValueError(f"a selection step asks for {tokens} tokens; the search samples hold {num_samples} x "
                         f"{seqlen} = {num_samples * seqlen}")
    rows, used, order = [], 0, list(range(num_samples))
    while used < tokens:
        i = order.pop(rng.randrange(len(order)))
        take = min(seqlen, tokens - used)
        rows.append((i, take))
        used += take
    return rows


@dataclass
class SearchResult:
    removed: list[int]
    fitness: float  # on the last selection step's tokens
    generations: int
    evaluations: int
    seconds: float
    history: list[float] = field(default_factory=list)  # the best fitness after each generation


def search(fitness, num_layers: int, k: int, num_samples: int, seqlen: int, schedule: Schedule = Schedule(),
           seed: int = 0) -> SearchResult:
    """EvoPress for ``k`` removed layers of ``num_layers``; ``fitness(removed, rows)``, lower is better, on rows
    drawn from ``num_samples`` samples of ``seqlen`` tokens. Reproducible from ``seed``."""
    t0 = time.perf_counter()
    rng = random.Random(seed)
    if not 0 < k < num_layers:
        raise ValueError(f"EvoPress removes 0 < k < {num_layers} layers; got k={k}")
    s = schedule
    if len(s.survivors) != len(s.tokens) or not s.survivors:
        raise ValueError(f"prune.survivors {list(s.survivors)} and prune.tokens {list(s.tokens)} must be lists of "
                         f"one length (a selection step each)")
    size = s.survivors[-1]
    exist = math.comb(num_layers, k)

    def select(cands: list[frozenset], keep: int, tokens: int) -> tuple[list[frozenset], list[float]]:
        rows = draw_rows(rng, num_samples, seqlen, tokens)
        scored = [(fitness(tuple(sorted(c)), rows), j) for j, c in enumerate(cands)]
        best = sorted(scored)[:keep]  # stable on ties: the earlier candidate, as np.argsort's first
        return [cands[j] for _, j in best], [f for f, _ in best]

    initial: list[frozenset] = []
    while len(initial) < min(s.initial, exist):
        c = frozenset(rng.sample(range(num_layers), k))
        if c not in initial:
            initial.append(c)
    population, fit = select(initial, size, s.initial_tokens)
    gens = s.generations_for(k, num_layers)
    history = []
    for g in range(gens):
        children: list[frozenset] = []
        while len(children) < min(s.offspring, exist - len(population)):
            child = set(rng.choice(population))
            flips = min(rng.randint(1, s.max_mutations), rng.randint(1, s.max_mutations))
            for _ in range(flips):
                if rng.randint(0, 1):  # a flip of the MLP list, overwritten by the attention list (whole layers)
                    continue
                kept, gone = [i for i in range(num_layers) if i not in child], sorted(child)
                out, back = rng.choice(kept), rng.choice(gone)  # both drawn before either changes (lines 433-442)
                child.add(out)
                child.discard(back)
            child = frozenset(child)
            if child in children or child in population:
                continue
            children.append(child)
        for j, (keep, tokens) in enumerate(zip(s.survivors, s.tokens)):
            if j == len(s.survivors) - 1:
                children += [p for p in population if p not in children]
            children, fit = select(children, keep, tokens)
        population = children
        history.append(fit[0])
        if (g + 1) % max(1, gens // 10) == 0 or g + 1 == gens:  # a long search is never silent
            log.info(f"EvoPress generation {g + 1}/{gens}: best {sorted(population[0])}, KL {fit[0]:.4g} "
                     f"({time.perf_counter() - t0:.0f} s)")
    return SearchResult(sorted(population[0]), fit[0], gens, getattr(fitness, "evaluations", 0),
                        round(time.perf_counter() - t0, 3), history)


def brute_force(fitness, num_layers: int, k: int, rows: list[tuple[int, int]]) -> tuple[list[int], float]:
    """The set of ``k`` layers whose removal has the lowest fitness on ``rows``, by trying every set (a check)."""
    best = min(combinations(range(num_layers), k), key=lambda c: fitness(c, rows))
    return list(best), fitness(best, rows)
