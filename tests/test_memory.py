"""No float32 copy of a whole batch's vocabulary logits: the perplexity, the EvoPress teacher and the offline
distillation's teacher cache cast one window (or only the k logits they keep) at a time. At Gemma-3's 262k
vocabulary a batch of 8 x 2048 tokens in float32 is 16 GiB: on a shared GPU that was the out-of-memory failure."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lp.distill import TeacherCache
from lp.evaluation import perplexity
from lp.evopress import KLFitness
from tests.conftest import tiny_config

VOCAB, BATCH, T = 1024, 4, 12  # one window's logits: T x VOCAB values, far above any hidden state's size


class LargestFloat32(TorchDispatchMode):
    """The largest float32 tensor any operation returns while active."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.numel = max(self.numel, t.numel())
        return out


@pytest.fixture(scope="module")
def bf16_model():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(vocab=VOCAB), dtype=torch.bfloat16).eval()
    return model.requires_grad_(False)


@pytest.fixture(scope="module")
def windows():
    return torch.randint(3, VOCAB, (BATCH, T), generator=torch.Generator().manual_seed(1))


def largest_float32(fn) -> int:
    with torch.no_grad(), LargestFloat32() as seen:
        fn()
    return seen.numel


def test_perplexity_casts_one_window_at_a_time(bf16_model, windows):
    whole = perplexity(bf16_model, windows, batch_size=1, progress=False)
    assert perplexity(bf16_model, windows, batch_size=BATCH, progress=False) == pytest.approx(whole, rel=1e-6)
    largest = largest_float32(lambda: perplexity(bf16_model, windows, batch_size=BATCH, progress=False))
    assert (T - 1) * VOCAB <= largest < 2 * T * VOCAB  # one window's logits in float32, not the batch's


def test_the_evopress_teacher_casts_one_sample_at_a_time(bf16_model, windows):
    largest = largest_float32(lambda: KLFitness(bf16_model, windows, batch_size=BATCH, budget=0))
    assert T * VOCAB <= largest < 2 * T * VOCAB


def test_the_teacher_cache_casts_only_the_top_k(bf16_model, windows, tmp_path):
    largest = largest_float32(lambda: TeacherCache(tmp_path, BATCH, T, 7, shard_size=BATCH)
                              .build(bf16_model, windows, progress=False))
    assert largest < T * VOCAB
    top = bf16_model(input_ids=windows).logits.float().topk(7, dim=-1)
    cache = TeacherCache(tmp_path, BATCH, T, 7, shard_size=BATCH)
    assert cache.complete and torch.equal(cache.shard(0)["indices"].long(), top.indices)
    torch.testing.assert_close(cache.shard(0)["probs"].float(), top.values.softmax(-1), atol=1e-3, rtol=1e-3)
