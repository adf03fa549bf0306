import pytest
import torch


def tiny_config(model_type: str = "llama", layers: int = 6, hidden: int = 24, vocab: int = 128):
    from transformers import AutoConfig

    return AutoConfig.for_model(
        model_type, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, vocab_size=vocab, max_position_embeddings=4096,
        tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


def tiny_model(model_type: str = "llama", layers: int = 6, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, layers), dtype=torch.float32).eval()
    model.requires_grad_(False)
    # random init gives a residual stream of tiny norm: spread the weights so layers matter
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture(params=sorted(__import__("lp.models", fromlist=["LAYOUTS"]).LAYOUTS))
def any_model(request):
    """Every family lp supports, as a tiny random model."""
    return tiny_model(request.param)


@pytest.fixture
def ids():
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
