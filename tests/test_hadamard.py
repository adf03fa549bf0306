import pytest
import torch

from lp.hadamard import hadamard, is_supported

BASES = [1, 2, 12, 20, 28, 36, 40, 52, 60, 84, 108, 140]
MODEL_SIZES = [576, 640, 896, 960, 1152, 1536, 2048, 2304]  # real hidden sizes (SmolLM2, Gemma3, Qwen2, ...)


@pytest.mark.parametrize("n", BASES + [m * 4 for m in BASES] + MODEL_SIZES)
def test_orthonormal_with_pm_entries(n):
    H = hadamard(n, torch.float64)
    assert torch.allclose(H @ H.T, torch.eye(n, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(H.abs(), torch.full_like(H, n**-0.5))


@pytest.mark.parametrize("n", [3584, 4096, 5120, 5376, 8192])
def test_large_model_sizes_are_built(n):
    # 3584 = Qwen2-7B, 4096 = LLaMA-3-8B, 5120 = LLaMA-2-13B, 5376 = Gemma3-27B
    H = hadamard(n, torch.float32)
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(0))
    # orthonormality checked through norm preservation on a few vectors (cheap for big n)
    assert torch.allclose((x @ H).norm(dim=1), x.norm(dim=1), rtol=1e-4)
    assert torch.allclose(x @ H @ H.T, x, atol=1e-3)


@pytest.mark.parametrize("n", [0, 3, 6, 92, 156, 172, 188])
def test_unsupported_sizes_name_the_size(n):
    assert not is_supported(n)
    with pytest.raises(ValueError, match=str(n)):
        hadamard(n)
