"""docs/extending.md, run: a metric and a patch registered from this test module (no edit to lp) go through
lp.pipeline.run on the tiny model, the pruned model saved and reloaded with its patch."""
import pytest
import torch

from lp import pipeline
from lp.calibration import BoundaryStats
from lp.keys import USES
from lp.modules import PATCH_MODULES, Patched, WeightPatch
from lp.patches import PATCHES
from lp.patches import register as register_patch
from lp.pruning import load_pruned
from lp.selection import METRICS
from lp.selection import register as register_metric
from tests.conftest import cfg_for


@pytest.fixture
def registries():
    """What the test registers is gone after it."""
    saved = [(d, dict(d)) for d in (METRICS, USES, PATCHES, PATCH_MODULES)]
    yield
    for d, before in saved:
        d.clear()
        d.update(before)


def test_a_toy_metric_and_a_toy_patch_run_end_to_end_without_editing_lp(tiny_dir, tmp_path, registries):
    @register_metric("toy_second")
    def toy_second(ctx):  # the block that starts at layer 1
        return list(range(1, 1 + ctx.n))

    class Shift(WeightPatch):  # x -> x + b, saved as its own kind
        kind = "toy_shift"

        def op(self, x, w):
            return x + w

    @register_patch("toy_shift", from_statistics=True)
    def toy_shift(ctx, s, e):
        return Shift(ctx.stats.abs_mean[e] - ctx.stats.abs_mean[s])

    out = tmp_path / "saved"
    rec = pipeline.run(cfg_for(tiny_dir, tmp_path, "prune.n=2", "prune.metric=toy_second", "patch=none",
                               "patch.variant=toy_shift", f"save_model={out}"))
    assert rec["removed"] == [1, 2] and rec["metric"] == "toy_second" and rec["patch"] == "toy_shift"
    plain = pipeline.run(cfg_for(tiny_dir, tmp_path, "prune.n=2", "prune.metric=toy_second", "patch=none"))
    assert plain["removed"] == [1, 2] and plain["ppl"]["pruned"] != rec["ppl"]["pruned"]  # the patch was applied
    stats = BoundaryStats.load(rec["calib_stats"])
    model, _, spec = load_pruned(out)
    assert spec.patches == {"1": "toy_shift"} and len(model.model.layers) == 4
    layer = model.model.layers[1]
    assert isinstance(layer, Patched) and isinstance(layer.patch, Shift)
    torch.testing.assert_close(layer.patch.weight, stats.abs_mean[3] - stats.abs_mean[1])
