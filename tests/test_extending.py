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
from lp.settings import Int
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
    @register_metric("toy_second", reads={"first": Int(0)})
    def toy_second(ctx):  # the block that starts at layer prune.first (1 here)
        return list(range(ctx.setting("first"), ctx.setting("first") + ctx.n))

    class Shift(WeightPatch):  # x -> x + b, saved as its own kind
        kind = "toy_shift"

        def op(self, x, w):
            return x + w

    @register_patch("toy_shift", from_statistics=True)
    def toy_shift(ctx, s, e):
        return Shift(ctx.stats.abs_mean[e] - ctx.stats.abs_mean[s])

    out = tmp_path / "saved"
    toy = ["prune.n=2", "prune.metric=toy_second", "+prune.first=1", "patch=none"]
    with pytest.raises(ValueError, match=r"prune.first is not set: prune.metric=toy_second reads it"):
        pipeline.run(cfg_for(tiny_dir, tmp_path, *toy[:2], "patch=none"))  # its YAML file would set it
    with pytest.raises(ValueError, match=r"prune.first=-1 is not valid: it must be an integer >= 0"):
        pipeline.run(cfg_for(tiny_dir, tmp_path, *toy[:2], "+prune.first=-1", "patch=none"))  # by its rule
    rec = pipeline.run(cfg_for(tiny_dir, tmp_path, *toy, "patch.variant=toy_shift", f"save_model={out}"))
    assert rec["removed"] == [1, 2] and rec["metric"] == "toy_second" and rec["patch"] == "toy_shift"
    plain = pipeline.run(cfg_for(tiny_dir, tmp_path, *toy))
    assert plain["removed"] == [1, 2] and plain["ppl"]["pruned"] != rec["ppl"]["pruned"]  # the patch was applied
    stats = BoundaryStats.load(rec["calib_stats"])
    model, _, spec = load_pruned(out)
    assert spec.patches == {"1": "toy_shift"} and len(model.model.layers) == 4
    layer = model.model.layers[1]
    assert isinstance(layer, Patched) and isinstance(layer.patch, Shift)
    torch.testing.assert_close(layer.patch.weight, stats.abs_mean[3] - stats.abs_mean[1])
