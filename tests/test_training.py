"""lp.training.train, the loop that distillation and the Streamline fits share."""
import pytest
import torch

from lp.training import train


def fit(w, targets, **kw):
    """Fit the scalar w to targets[epoch] (one step per epoch) by squared error."""
    return train([w], lambda epoch: [targets[epoch]], lambda t: (w - t).pow(2).sum(), steps_per_epoch=1, lr=0.5,
                 progress=False, epochs=len(targets), **kw)


def test_early_stop_restores_the_best_epoch_not_the_last():
    w = torch.nn.Parameter(torch.zeros(1))
    vals = iter([3.0, 1.0, 2.0, 2.5, 0.5])  # best after epoch 1, then two epochs without improvement
    seen = []

    def validate():
        seen.append(w.item())
        return next(vals)

    r = fit(w, [torch.ones(1)] * 5, validate=validate, early_stop=2)
    assert r.val == [3.0, 1.0, 2.0, 2.5] and "best epoch (1)" in r.stopped  # stopped before epoch 4
    assert w.item() == pytest.approx(seen[1]) and w.item() != pytest.approx(seen[-1])
    assert not w.requires_grad


def test_a_non_finite_loss_restores_the_last_finite_step_or_raises():
    w = torch.nn.Parameter(torch.zeros(1))
    r = fit(w, [torch.ones(1), torch.ones(1), torch.tensor([float("nan")])])
    assert r.nonfinite and r.steps == 2 and torch.isfinite(w).all() and w.item() != 0.0
    after_two = w.item()
    assert "step 2" in r.stopped and w.item() == after_two
    with pytest.raises(ValueError, match=r"training loss became nan at step 0; lower patch.lr \(now 0.5\)"):
        fit(torch.nn.Parameter(torch.zeros(1)), [torch.tensor([float("nan")])], nonfinite="raise", lr_setting="patch.lr")


def test_cosine_schedule_ends_at_min_lr_and_clipping_bounds_the_step():
    w = torch.nn.Parameter(torch.zeros(1))
    r = fit(w, [torch.ones(1)] * 4, min_lr=0.05)
    assert r.history[0]["lr"] < 0.5 and r.history[-1]["lr"] == pytest.approx(0.05)
    const = fit(torch.nn.Parameter(torch.zeros(1)), [torch.ones(1)] * 2)
    assert [h["lr"] for h in const.history] == [0.5, 0.5]
    # the last step's gradient stays on the parameter: clipped in place to norm 1 (unclipped 200 * sqrt(3))
    for clip, norm in ((1.0, 1.0), (None, 200 * 3 ** 0.5)):
        v = torch.nn.Parameter(torch.zeros(3))
        train([v], lambda e: [None], lambda _: (v - 100).pow(2).sum(), steps_per_epoch=1, lr=0.1, clip=clip,
              progress=False)
        assert v.grad.norm().item() == pytest.approx(norm, rel=1e-5)
