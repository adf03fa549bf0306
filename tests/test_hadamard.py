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


# SHA-256 of the official LinearPatch code's full matrix (rotate_utils/hadamard_utils.py get_hadamard_matrix(n),
# times sqrt(n), as int8 bytes in row-major order), computed from that file at commit d1274e8
OFFICIAL_SHA256 = {
    576: "8309c43a40c2170b05e92a8270bbe14bd5e0f31fe0492327dbf420aa7c7621ab",   # 36 x 16 (SmolLM2)
    640: "0b8d9c124f111f204648c7a7e8797bbe9e37cf0b09bf8b16d6dde3212ca5d67b",   # 40 x 16 (Gemma 3 270M)
    896: "c773ee50915e75c29a1f24df192e0e8c3c3b12d19cce4f8938e9a297a00521b0",   # 28 x 32 (Qwen2.5 0.5B)
    1536: "cfab86945d864db6caeec2780560e0ff553f2a27fbdaf837624978fc8b49988a",  # 12 x 128 (Qwen2.5 1.5B)
}


@pytest.mark.parametrize("n", sorted(OFFICIAL_SHA256))
def test_quarot_is_the_official_codes_matrix(n):
    import hashlib

    H = hadamard(n, torch.float64, construction="quarot")
    assert torch.allclose(H @ H.T, torch.eye(n, dtype=torch.float64), atol=1e-10)
    signs = (H * n**0.5).round().to(torch.int8)
    assert hashlib.sha256(signs.numpy().tobytes()).hexdigest() == OFFICIAL_SHA256[n]
    assert not torch.equal(H, hadamard(n, torch.float64, construction="paley"))  # another basis than lp's


def test_quarot_refuses_the_williamson_orders_and_names_the_alternative():
    assert not is_supported(52 * 4, "quarot") and is_supported(52 * 4, "paley")
    with pytest.raises(ValueError, match="patch.hadamard=paley"):
        hadamard(52 * 4, construction="quarot")
    with pytest.raises(ValueError, match="not one of"):
        hadamard(64, construction="sloane")
    assert torch.equal(hadamard(64, construction="quarot"), hadamard(64))  # powers of two: Sylvester in both
