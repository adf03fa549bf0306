"""Memory-efficient offline distillation of the patch (LinearPatch, Sec. 3.3).

Offline: the dense teacher's top-k next-token distribution is computed once per (model, data, samples,
seqlen, k) and cached on disk in shards; training then needs only the pruned student.  Only the patch (and,
as an ablation, the RMSNorm weights after it) is trained, with KL(teacher top-k || student top-k) where the
student's log-probabilities are renormalised over the teacher's top-k tokens.

What a step costs: every model weight is frozen (``requires_grad=False``) and the student's input ids need no
gradient, so autograd records nothing for the layers before the first patch: they run as a plain forward
pass, their activations are freed at once, and the backward pass starts at the patch.  The layers after the
patch run forward and backward (activations kept for backward; no weight gradients are formed for them).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import logging

from .models import Layout
from .pruning import patches_of
from .files import DamagedFile, atomic_write, read_cache_json, set_aside, write_json
from .training import TrainResult, train as train_loop

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ teacher cache
class TeacherCache:
    """Top-k teacher probabilities (fp16) and token indices (int32), one shard file per batch.

    A shard is written to ``*.tmp`` and renamed, so a half-written shard is never read; an interrupted build
    resumes at the first missing shard; ``meta.json`` is written last and marks the cache complete.
    """

    def __init__(self, root: str | Path, num_samples: int, seqlen: int, k: int, shard_size: int):
        self.root = Path(root)
        self.num_samples, self.seqlen, self.k, self.shard_size = num_samples, seqlen, k, shard_size

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_samples / self.shard_size)

    @property
    def nbytes(self) -> int:
        return self.num_samples * self.seqlen * self.k * (2 + 4)

    def shard_path(self, i: int) -> Path:
        return self.root / f"shard_{i:05d}.pt"

    @property
    def meta(self) -> dict:
        return {"num_samples": self.num_samples, "seqlen": self.seqlen, "k": self.k, "shard_size": self.shard_size}

    @property
    def complete(self) -> bool:
        return (self.root / "meta.json").is_file() and all(self.shard_path(i).is_file() for i in range(self.num_shards))

    def shard_problem(self, i: int) -> str | None:
        """Why shard ``i`` cannot be used (unreadable, or not fp16 probs and int32 indices of this cache's
        shape), or None. Reads only its header (memory-mapped), not its data."""
        n = min(self.shard_size, self.num_samples - i * self.shard_size)
        try:
            shard = torch.load(self.shard_path(i), map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # a truncated zip, bytes that are no torch file
            return f"unreadable ({type(e).__name__}: {e})"
        if not isinstance(shard, dict) or set(shard) != {"probs", "indices"}:
            return "not a dict of probs and indices"
        for name, dtype in (("probs", torch.float16), ("indices", torch.int32)):
            t = shard[name]
            if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != (n, self.seqlen, self.k):
                return (f"{name} is {getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}, not "
                        f"{dtype} {(n, self.seqlen, self.k)}")
        return None

    def set_aside_damaged(self) -> None:
        """Every shard, and meta.json, that cannot be used is named and moved aside (then rebuilt)."""
        meta = self.root / "meta.json"
        if meta.is_file() and read_cache_json(meta) not in (None, self.meta):
            set_aside(meta, f"it describes another cache than {self.meta}")
        for i in range(self.num_shards):
            if self.shard_path(i).is_file() and (why := self.shard_problem(i)):
                set_aside(self.shard_path(i), why)

    @torch.no_grad()
    def build(self, teacher, samples: torch.Tensor, progress: bool = True) -> "TeacherCache":
        self.root.mkdir(parents=True, exist_ok=True)
        self.set_aside_damaged()
        if self.complete:
            return self
        missing = [i for i in range(self.num_shards) if not self.shard_path(i).is_file()]
        log.info(f"teacher cache: {self.num_samples} x {self.seqlen} tokens, top-{self.k} -> "
              f"{self.nbytes / 2**20:.1f} MiB (fp16 probs + int32 indices) in {self.root}; "
              f"{len(missing)} of {self.num_shards} shards to write")
        device = next(teacher.parameters()).device
        for i in tqdm(missing, desc="teacher top-k", disable=not progress):
            batch = samples[i * self.shard_size : (i + 1) * self.shard_size].to(device)
            # the top-k of the model's own logits, then float32 (bfloat16 -> float32 is exact: the same k values)
            top = teacher(input_ids=batch, use_cache=False).logits.topk(self.k, dim=-1)
            shard = {"probs": top.values.float().softmax(-1).half().cpu(), "indices": top.indices.int().cpu()}
            atomic_write(self.shard_path(i), lambda tmp: torch.save(shard, tmp))
        write_json(self.root / "meta.json", self.meta)
        return self

    def shard(self, i: int) -> dict:
        try:
            return torch.load(self.shard_path(i), map_location="cpu", weights_only=True)
        except Exception as e:
            raise DamagedFile(f"{self.shard_path(i)} is damaged ({type(e).__name__}: {e}); delete it and rerun to "
                              f"rebuild that shard") from e


# ------------------------------------------------------------------ loss
def topk_kl(student_logits: torch.Tensor, teacher_probs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(p_teacher || q_student), q renormalised over the teacher's top-k tokens (the k
    logits are gathered before the cast to float32: no float copy of the whole vocabulary is made)."""
    log_q = F.log_softmax(student_logits.gather(-1, indices.long()).float(), dim=-1)
    p = teacher_probs.float()
    return (p * (p.clamp_min(1e-12).log() - log_q)).sum(-1).mean()


# ------------------------------------------------------------------ training
# what distill.train may name: the patch (the paper's), the patch and the norms after it, or the partial-layer
# fine-tuning of Lu et al. ("Reassessing Layer Pruning in LLMs", github yaolu-zjut/Navigation_LLM_layer_pruning,
# partial_fine-tuning.py, --partial_layer_name: norm_lmhead, last1, last2, last3)
TAIL_CHOICES = {"norm_lmhead": 0, "last1": 1, "last2": 2, "last3": 3}
TRAIN_CHOICES = ("patch", "patch+norms", *TAIL_CHOICES)


def tail_parameters(model, k: int) -> list[torch.nn.Parameter]:
    """The last ``k`` decoder layers of the pruned model (its final layer included), the final norm and the LM
    head, as partial_fine-tuning.py sets requires_grad (its lines after "for lm_head and norm"); patches inside
    those layers stay as they are. With tied embeddings the head is the input embedding: it trains too."""
    layout = Layout(model)
    patch_ids = {id(p) for m in patches_of(model).values() for p in m.parameters()}
    mods = [*list(layout.layers)[len(layout.layers) - k:], layout.norm, layout.head]
    params = [p for m in mods for p in m.parameters() if id(p) not in patch_ids]
    return list({id(p): p for p in params}.values())


def trainable_parameters(model, train: str) -> list[torch.nn.Parameter]:
    """``patch``: the patch weights; ``patch+norms``: also every norm weight from the first patch on;
    ``norm_lmhead`` / ``lastK``: :func:`tail_parameters` (no patch needed)."""
    if train not in TRAIN_CHOICES:
        raise ValueError(f"distill.train={train!r} is not one of {list(TRAIN_CHOICES)}")
    if train in TAIL_CHOICES:
        return tail_parameters(model, TAIL_CHOICES[train])
    patches = patches_of(model)
    if not patches:
        raise ValueError("distill: the pruned model has no patch to train (patch=none?)")
    params = [p for m in patches.values() for p in m.parameters()]
    if train == "patch+norms":
        layout = Layout(model)
        first = min(patches)
        mods = list(layout.layers)[first:] + [layout.norm]
        # norms found by class (a wrapped final norm is named "" or "inner"), each parameter once (a
        # streamline_ffn patch holds a copy of a norm, already among the patch's parameters)
        params += [p for m in mods for sub in m.modules() if "norm" in type(sub).__name__.lower()
                   for p in sub.parameters(recurse=False)]
    return list({id(p): p for p in params}.values())


def _val_loss(model, cache: TeacherCache, samples, device, autocast) -> float:
    losses = []
    with torch.no_grad(), autocast():
        for i in range(cache.num_shards):
            sh = cache.shard(i)
            batch = samples[i * cache.shard_size : (i + 1) * cache.shard_size].to(device)
            losses.append(topk_kl(model(input_ids=batch, use_cache=False).logits, sh["probs"].to(device),
                                  sh["indices"].to(device)).item())
    return sum(losses) / len(losses)


def distill_kl(model, train_cache: TeacherCache, train_samples: torch.Tensor, val_cache: TeacherCache | None = None,
               val_samples: torch.Tensor | None = None, *, lr: float, weight_decay: float, min_lr_factor: float,
               epochs: int, train: str = "patch", early_stop: int | None = None, autocast_dtype: str | None = None,
               progress: bool = True, on_step=None) -> TrainResult:
    """Train the pruned model's patches against the cached teacher (lp.training.train: AdamW, cosine to
    lr / min_lr_factor, early stop on the validation KL with the best epoch restored). Non-finite loss stops
    training and restores the last good parameters. The settings are distill.*'s (conf/distill/paper.yaml:
    the paper's)."""
    params = trainable_parameters(model, train)
    device = next(model.parameters()).device
    use_amp = autocast_dtype is not None and device.type == "cuda"

    def autocast():
        return torch.autocast(device.type, dtype=getattr(torch, autocast_dtype or "bfloat16"), enabled=use_amp)

    def batches(epoch):
        return torch.randperm(train_cache.num_shards, generator=torch.Generator().manual_seed(epoch)).tolist()

    def loss_of(i):
        sh = train_cache.shard(i)
        batch = train_samples[i * train_cache.shard_size : (i + 1) * train_cache.shard_size].to(device)
        with autocast():
            logits = model(input_ids=batch, use_cache=False).logits
        return topk_kl(logits, sh["probs"].to(device), sh["indices"].to(device))

    validate = (lambda: _val_loss(model, val_cache, val_samples, device, autocast)) if val_cache is not None else None
    model.train(False)
    return train_loop(params, batches, loss_of, steps_per_epoch=train_cache.num_shards, lr=lr,
                      weight_decay=weight_decay, epochs=epochs, min_lr=lr / min_lr_factor, validate=validate,
                      early_stop=early_stop, desc="distill", progress=progress, on_step=on_step)


def distill_mse(model, pairs_of, *, lr: float, weight_decay: float, epochs: int,
                progress: bool = True) -> TrainResult:
    """Cheaper variant, no logits: each patch is trained so that patch(x_s) matches the dense x_e, on the
    dense model's calibration hidden states (``pairs_of(position) -> [(x_s, x_e), ...]`` batches), at a
    constant lr (lp.training.train)."""
    result = TrainResult()
    for pos, patch in patches_of(model).items():
        pairs = pairs_of(pos)
        w = next(iter(patch.parameters()))

        def loss_of(pair):
            return F.mse_loss(patch(pair[0].to(w.device)), pair[1].to(w.device))

        r = train_loop(list(patch.parameters()), lambda epoch: pairs, loss_of, steps_per_epoch=len(pairs), lr=lr,
                       weight_decay=weight_decay, epochs=epochs, desc=f"distill mse @{pos}", progress=progress)
        result.steps += r.steps
        result.history += [{**h, "position": pos} for h in r.history]
        if r.stopped:
            result.stopped, result.nonfinite = f"patch at {pos}: {r.stopped}", r.nonfinite
            break
    return result
