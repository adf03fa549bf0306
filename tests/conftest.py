"""Fixtures and helpers the test modules share (no test module imports another)."""
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lp.records import RECORD_VERSION



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


CONF = str(Path(__file__).resolve().parents[1] / "conf")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny LLaMA with a real (trained-here) byte-level BPE tokenizer, saved as a local HF folder."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from lp.data import brown_split

    path = tmp_path_factory.mktemp("tiny")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([brown_split("eval")[:200_000]], vocab_size=400, special_tokens=["<eos>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")
    tok.save_pretrained(path)
    model = tiny_model("llama", layers=6)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(path)
    return path


def conf_settings(group: str, option: str, **overrides) -> dict:
    """conf/<group>/<option>.yaml as a plain dict (the one source of its defaults), with ``overrides``: what a
    direct call of a metric or a patch is given, as the pipeline gives it the composed group."""
    return {**OmegaConf.to_container(OmegaConf.load(Path(CONF) / group / f"{option}.yaml")), **overrides}


def cfg_for(tiny_dir, results, *overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=[
            f"model.name_or_path={tiny_dir}", "model.gguf_file=null", "model.name=tiny", "logger=none",
            "data.calib_samples=4", "data.seqlen=32", "data.calib_batch_size=2", "eval.max_windows=3",
            "eval.batch_size=2", "eval.tasks=[]", f"results_dir={results}", "progress=false", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def record(n, patch, ppl, created, status="complete", seed=0, data="d", metric="cosine", acc=None, dense_acc=None):
    r = {"version": RECORD_VERSION, "status": status, "run_id": f"m-{n}-{patch}-{seed}-{data}-{metric}", "model": "m", "data": data, "metric": metric, "n": n,
         "patch": patch, "distill": "none", "eval": "ppl", "seed": seed, "removed": list(range(n)),
         "params_pruned": 1, "created": created, "ppl": {"dense": 10.0, "pruned": ppl}}
    if acc is not None:
        from lp.zeroshot import retention

        r.update(zeroshot={"dense": dense_acc, "pruned": acc, "engine": {"name": "lp", "version": 1}},
                 retention=retention(dense_acc, acc))
    return r
