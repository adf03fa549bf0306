"""What the benchmarks share: the model shapes they time, clocks that wait for the GPU, peak memory, output."""
from __future__ import annotations

import json
import statistics
import time

import torch

SHAPES = ("llama3_8b", "qwen2.5_1.5b", "tiny")  # tiny: a few-MB LLaMA for trying a benchmark's code path on a CPU


def llama_config(shape: str, layers: int | None = None):
    """LLaMA-3-8B's shape (random weights time like trained ones), or a tiny one of the same family."""
    from transformers import LlamaConfig

    if shape == "llama3_8b":
        return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers or 32,
                           num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                           max_position_embeddings=8192, rope_theta=500000.0)
    if shape == "qwen2.5_1.5b":  # Qwen2.5-(Coder-)1.5B's dimensions in the LLaMA layout (no q/k/v biases: 0.02% of it)
        return LlamaConfig(hidden_size=1536, intermediate_size=8960, num_hidden_layers=layers or 28, num_attention_heads=12,
                           num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                           rope_theta=1000000.0, tie_word_embeddings=True)
    if shape == "tiny":
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers or 8, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096)
    raise ValueError(f"--shape {shape!r} is not one of {list(SHAPES)}")


def random_model(shape: str, dtype: torch.dtype, device: str, layers: int | None = None, seed: int = 0,
                 min_vocab: int = 0):
    """A random-initialised LlamaForCausalLM of ``shape`` on ``device``, frozen, in eval mode (its vocabulary at
    least ``min_vocab``: room for another tokenizer's ids)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = llama_config(shape, layers)
    cfg.vocab_size = max(cfg.vocab_size, min_vocab)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    model.requires_grad_(False)
    return model


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def clock() -> float:
    """perf_counter after the GPU has finished what was queued."""
    sync()
    return time.perf_counter()


def timed(fn, repeat: int = 5, warmup: int = 2) -> float:
    """Mean seconds of ``fn()`` over ``repeat`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    t = clock()
    for _ in range(repeat):
        fn()
    return (clock() - t) / repeat


def reset_peak() -> None:
    if torch.cuda.is_available():
        sync()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(above: int = 0) -> float | None:
    """GiB of the CUDA allocator's peak since reset_peak(), less ``above`` bytes (None without a GPU)."""
    if not torch.cuda.is_available():
        return None
    sync()
    return round((torch.cuda.max_memory_allocated() - above) / 2**30, 3)


def peak_rss_gib() -> float:
    """The process's peak resident memory so far (GiB): the CPU's counterpart of peak_gib, never reset."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


def allocated() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def spread(values: list[float]) -> dict:
    """Median, min and max of repeated measurements (rounded for the JSON)."""
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4), "max": round(max(values), 4)}


def emit(out: dict, path: str | None) -> dict:
    """Print ``out`` as JSON and, with a path, write it there."""
    text = json.dumps(out, indent=2)
    print(text, flush=True)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
    return out
