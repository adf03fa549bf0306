"""One forward pass over the calibration samples, collecting what every metric and patch needs.

Boundary ``i`` (0 <= i <= L) is the residual stream entering decoder layer ``i``; boundary ``L`` enters the
final norm.  Removing layers [s, e) joins boundary ``s`` to the layers that expected boundary ``e``.

Statistics are streamed: per batch, the hidden states of all L+1 boundaries are held at once (one batch,
so memory is bounded by ``batch_size``, never by the number of samples) and folded into running sums.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .hadamard import OFFICIAL, hadamard
from .models import Layout
from .modules import unwrap
from .files import DamagedFile, atomic_write


STATS_FORMAT = 3  # of the statistics files (in their cache key): 3 added cos_normed


@dataclass
class BoundaryStats:
    """Calibration statistics of the L+1 layer boundaries of a dense model."""

    abs_mean: torch.Tensor  # (L+1, d) mean |x| per channel
    abs_mean_rot: torch.Tensor  # (L+1, d) mean |x H| per channel (H orthonormal Hadamard)
    cos: torch.Tensor  # (L+1, L+1) mean token-wise cosine similarity between boundaries
    angular: torch.Tensor  # (L+1, L+1) mean token-wise angular distance arccos(cos)/pi
    norm_mean: torch.Tensor  # (L+1,) mean token L2 norm
    tokens: int
    # the first calibration sample, per token: max over channels of |x| and of |x H| (the massive
    # outliers on a few tokens, and what the rotation leaves of them); None in files of older lp versions
    token_absmax: torch.Tensor | None = None  # (L+1, seqlen)
    token_absmax_rot: torch.Tensor | None = None  # (L+1, seqlen)
    # per sample, the cosine of the LAST token's hidden states (Gromov et al.'s angular distance uses it)
    cos_last: torch.Tensor | None = None  # (L+1, L+1)
    # per sample and channel, the cosine of two boundaries along the sequence, averaged over channels then
    # samples: the official LinearPatch selection (torch.cosine_similarity on (1, T, d), i.e. dim=1)
    cos_seq: torch.Tensor | None = None  # (L+1, L+1)
    # the mean token-wise cosine of every boundary with the final norm's OUTPUT (HF's last hidden_states entry,
    # which LLM-Streamline's official selection compares a block that ends at the last layer with)
    cos_normed: torch.Tensor | None = None  # (L+1,)
    # the Hadamard construction of abs_mean_rot (lp.hadamard.CONSTRUCTIONS): a patch built from these
    # statistics must rotate with the same matrix. Files of older lp versions name it in their meta, or
    # predate the choice (lp's Paley basis).
    hadamard: str = OFFICIAL

    @property
    def num_layers(self) -> int:
        return self.cos.shape[0] - 1

    def save(self, path: str | Path, meta: dict | None = None) -> None:
        """Atomically, with ``meta`` (what the statistics were computed from) beside the tensors."""
        atomic_write(path, lambda tmp: torch.save({**asdict(self), "meta": meta or {}}, tmp))

    @classmethod
    def load(cls, path: str | Path, num_layers: int | None = None, hidden_size: int | None = None) -> "BoundaryStats":
        """Raises :class:`lp.files.DamagedFile` naming ``path`` if it cannot be read, or if its tensors are not
        of one model's shapes (of ``num_layers`` layers and ``hidden_size`` channels, when given)."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state.setdefault("hadamard", (state.pop("meta", None) or {}).get("hadamard", "paley"))
            state.pop("meta", None)
            stats = cls(**state)
            stats.check_shapes(num_layers, hidden_size)
        except Exception as e:  # a truncated zip, a pickle error, missing or unknown fields, wrong shapes
            raise DamagedFile(f"{path} is damaged ({type(e).__name__}: {e})") from e
        stats.check_finite(str(path))
        return stats

    def check_shapes(self, num_layers: int | None = None, hidden_size: int | None = None) -> None:
        """Every tensor of one model's L+1 boundaries and d channels (those given must match)."""
        B, d = self.abs_mean.shape[0], self.abs_mean.shape[-1]
        want = {"abs_mean": (B, d), "abs_mean_rot": (B, d), "cos": (B, B), "angular": (B, B), "norm_mean": (B,),
                "cos_last": (B, B), "cos_seq": (B, B), "cos_normed": (B,)}
        for name, shape in want.items():
            t = getattr(self, name)
            if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != shape):
                raise ValueError(f"{name} has shape {tuple(getattr(t, 'shape', ()))}, not {shape}")
        if num_layers is not None and B != num_layers + 1:
            raise ValueError(f"statistics of {B - 1} layers, not this model's {num_layers}")
        if hidden_size is not None and d != hidden_size:
            raise ValueError(f"statistics of {d} channels, not this model's hidden size {hidden_size}")

    def check_finite(self, where: str) -> None:
        """Non-finite statistics (a damaged model, an overflow) stop the run, naming the boundaries."""
        for name in ("abs_mean", "abs_mean_rot", "cos", "angular", "norm_mean"):
            t = getattr(self, name)
            bad = (~torch.isfinite(t)).reshape(t.shape[0], -1).any(-1).nonzero().flatten().tolist()
            if bad:
                raise ValueError(f"calibration statistics ({where}): {name} is not finite at boundaries {bad} "
                                 f"(of 0..{self.num_layers}); the model's hidden states overflow or its weights "
                                 f"are damaged")


def _capture_boundaries(layout: Layout):
    """Pre-hooks that record the hidden state entering every layer and the final norm, as the layer computes
    with it: after the patch of a patched layer (what Prune&Comp's rounds measure on a compensated model)."""
    captured: list[torch.Tensor | None] = [None] * (layout.num_layers + 1)

    def make(i):
        def hook(module, args, kwargs):
            captured[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    modules = [unwrap(m) for m in list(layout.layers) + [layout.norm]]
    handles = [m.register_forward_pre_hook(make(i), with_kwargs=True) for i, m in enumerate(modules)]
    return captured, handles


@torch.no_grad()
def stream_boundaries(model, samples: torch.Tensor, batch_size: int = 1, device=None, progress: bool = True,
                      desc: str = "calibration"):
    """Yield, per batch of ``samples``, the list of the L+1 boundary hidden states (each (B, T, d))."""
    layout = Layout(model)
    device = device or next(model.parameters()).device
    captured, handles = _capture_boundaries(layout)
    try:
        for start in tqdm(range(0, len(samples), batch_size), desc=desc, disable=not progress):
            layout.base(input_ids=samples[start : start + batch_size].to(device), use_cache=False)
            yield list(captured)
            captured[:] = [None] * len(captured)
    finally:
        for h in handles:
            h.remove()


class _Stop(Exception):
    """Raised by a hook to end a forward pass once what is needed has been seen."""


def tree_to(obj, device, dtype=None):
    """``obj`` (a tensor, or tuples/lists/dicts of them) on ``device``; floating tensors cast to ``dtype``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, dtype if dtype is not None and obj.is_floating_point() else obj.dtype)
    if isinstance(obj, (tuple, list)):
        return type(obj)(tree_to(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: tree_to(v, device, dtype) for k, v in obj.items()}
    return obj


@torch.no_grad()
def stream_block_io(model, samples: torch.Tensor, s: int, e: int, batch_size: int = 1):
    """Yield, per batch of ``samples``, (x_s, kwargs, x_e) on the CPU: the hidden state entering dense layer
    ``s``, the keyword arguments the model passes its layers (attention mask, position embeddings, ...), and
    the hidden state entering layer ``e`` (the final norm if e = L). The forward pass stops at ``e``."""
    layout = Layout(model)
    device = next(model.parameters()).device
    stop = layout.layers[e] if e < layout.num_layers else layout.norm
    got: dict = {}

    def enter(module, args, kwargs):
        got["x_s"] = args[0] if args else kwargs["hidden_states"]
        got["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}

    def leave(module, args, kwargs):
        got["x_e"] = args[0] if args else kwargs["hidden_states"]
        raise _Stop

    handles = [layout.layers[s].register_forward_pre_hook(enter, with_kwargs=True),
               stop.register_forward_pre_hook(leave, with_kwargs=True)]
    try:
        for start in range(0, len(samples), batch_size):
            try:
                layout.base(input_ids=samples[start : start + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
            yield got["x_s"].cpu(), tree_to(got["kwargs"], "cpu"), got["x_e"].cpu()
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def collect_stats(model, samples: torch.Tensor, batch_size: int = 1, device: str | None = None,
                  progress: bool = True, hadamard_construction: str = OFFICIAL,
                  token_chunk: int = 512) -> BoundaryStats:
    """Stream calibration statistics of every boundary over ``samples`` (n, seqlen); the Hadamard basis of
    ``abs_mean_rot`` is ``hadamard_construction``'s (lp.hadamard.CONSTRUCTIONS). Per batch the reductions run
    over chunks of about ``token_chunk`` tokens (speed and memory only: the statistics are the same)."""
    layout = Layout(model)
    L, d = layout.num_layers, layout.hidden_size
    H = hadamard(d, torch.float32, "cpu", hadamard_construction)
    sums: dict[str, torch.Tensor] = {}
    tokens = 0

    def add(name: str, value: torch.Tensor) -> None:  # accumulate on the value's device, float64
        value = value.double()
        sums[name] = value if name not in sums else sums[name] + value.to(sums[name].device)

    rotations: dict = {}

    def rotate(x: torch.Tensor) -> torch.Tensor:
        """x H in x's own dtype (bf16 on a GPU: tensor cores, float32 accumulation)."""
        key = (x.device, x.dtype)
        if key not in rotations:
            rotations[key] = H.to(*key)
        return x @ rotations[key]

    first: dict = {}
    n_samples = 0
    normalize = torch.nn.functional.normalize
    for captured in stream_boundaries(model, samples, batch_size, device, progress):
        # reductions in float32 or wider; boundaries on other devices (split models) join on dev0
        dev0 = captured[0].device
        b, T = captured[0].shape[:2]
        if not first:
            first["plain"] = torch.stack([x[0].float().abs().amax(-1).cpu() for x in captured])
            first["rot"] = torch.stack([rotate(x[0]).float().abs().amax(-1).cpu() for x in captured])
        normed_out = unwrap(layout.norm)(captured[L])
        last = torch.stack([normalize(x[:, -1].float().to(dev0), dim=-1) for x in captured])
        add("cos_last", torch.einsum("ibd,jbd->ij", last, last).clamp_(-1, 1))
        # the norm of every channel along the sequence (the official selection's cosine, dim=1)
        seq_norm = torch.stack([x.float().norm(dim=1).to(dev0) for x in captured]).clamp_min_(1e-8)  # (L+1, b, d)
        # The rest is summed over chunks of tokens: only the L+1 boundaries of the batch in the model's dtype
        # and one chunk of them in float32 are held at once (memory above the weights stays small at 8B).
        step = max(1, token_chunk // b)
        for t0 in range(0, T, step):
            chunk = [x[:, t0 : t0 + step] for x in captured]
            xs = [x.reshape(-1, d) for x in chunk]
            add("abs", torch.stack([x.float().abs().sum(0).to(dev0) for x in xs]))
            add("abs_rot", torch.stack([rotate(x).float().abs().sum(0).to(dev0) for x in xs]))
            add("norm", torch.stack([x.float().norm(dim=-1).sum().to(dev0) for x in xs]))
            unit = torch.stack([normalize(x.float().to(dev0), dim=-1) for x in xs])  # (L+1, t, d)
            cos = torch.einsum("itd,jtd->tij", unit, unit).clamp_(-1, 1)  # (tokens, L+1, L+1)
            add("cos", cos.sum(0))
            add("ang", (torch.arccos(cos) / torch.pi).sum(0))
            normed = normed_out[:, t0 : t0 + step].reshape(-1, d).float().to(dev0)
            add("cos_normed", torch.einsum("itd,td->it", unit, normalize(normed, dim=-1)).clamp_(-1, 1).sum(1))
            del unit, cos
            along = torch.stack([x.float().to(dev0) for x in chunk]) / seq_norm[:, :, None, :]  # (L+1, b, t, d)
            add("cos_seq", torch.einsum("ibtd,jbtd->ij", along, along) / d)  # summed over samples, mean over channels
            del along
        tokens += b * T
        n_samples += b
    sums = {k: v.cpu() for k, v in sums.items()}
    stats = BoundaryStats(
        abs_mean=(sums["abs"] / tokens).float(),
        abs_mean_rot=(sums["abs_rot"] / tokens).float(),
        cos=(sums["cos"] / tokens).float(),
        angular=(sums["ang"] / tokens).float(),
        norm_mean=(sums["norm"] / tokens).float(),
        tokens=tokens,
        token_absmax=first["plain"],
        token_absmax_rot=first["rot"],
        cos_last=(sums["cos_last"] / n_samples).float(),
        cos_seq=(sums["cos_seq"] / n_samples).float(),
        cos_normed=(sums["cos_normed"] / tokens).float(),
        hadamard=hadamard_construction,
    )
    stats.check_finite("computed from the calibration samples")
    return stats
