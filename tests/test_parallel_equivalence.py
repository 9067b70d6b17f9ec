"""TP / SP / PP / DP layouts train exactly like one process (fp32, gloo, 2 processes, same weights)."""

import json

import pytest

from llama_plugin.distributed import spawn_world
from tests.workers import train_layout

TOL = 1e-5


def run_layout(tmp_path, hf_dir, world, layout, name):
    out = tmp_path / f"{name}.json"
    spawn_world(world, train_layout, str(out), str(hf_dir), layout)
    return json.loads(out.read_text())


def max_diff(a, b):
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def reference(hf_tiny, tmp_path_factory):
    return run_layout(tmp_path_factory.mktemp("ref"), hf_tiny[0], 1, {}, "tp1")


LAYOUTS = {
    "tp2_sequence_parallel": {"tp": 2, "sequence_parallel": True},
    "pp2_1f1b": {"pp": 2},
    "pp2_uneven_1_3": {"pp": 2, "first_stage_layers": 1},  # megatron's uneven split: 1 layer, then 3
    "dp2_ddp_overlap": {"overlap_grad_reduce": True, "bucket_size": 20000},
    "dp2_distributed_optimizer": {"overlap_grad_reduce": True, "distributed_optimizer": True, "bucket_size": 20000},
    # Activation recomputation must not change the numbers (selective: attention core; full: layers).
    "tp2_sp_selective_recompute": {"tp": 2, "sequence_parallel": True, "recompute": "selective"},
    "tp2_sp_full_recompute": {"tp": 2, "sequence_parallel": True, "recompute": "full"},
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_matches_single_process(name, reference, hf_tiny, tmp_path):
    got = run_layout(tmp_path, hf_tiny[0], 2, LAYOUTS[name], name)
    assert got["cpu_compat"], "these runs are meant to exercise the CPU compatibility layer"
    assert len(got["losses"]) == 6
    # The runs must actually train, or equal losses would prove nothing.
    assert reference["losses"][-1] < reference["losses"][0] - 0.05
    assert max_diff(got["losses"], reference["losses"]) <= TOL, (got, reference)
    assert max_diff(got["grad_norms"], reference["grad_norms"]) <= TOL, (got, reference)


def test_unmarked_sequence_parallel_norm_is_caught(reference, hf_tiny, tmp_path):
    """Without the SP mark the norm grads are not summed over TP ranks: the check must see it."""
    layout = dict(LAYOUTS["tp2_sequence_parallel"], unmark_sequence_parallel_norms=True)
    got = run_layout(tmp_path, hf_tiny[0], 2, layout, "broken")
    assert max_diff(got["grad_norms"], reference["grad_norms"]) > 100 * TOL
    assert max_diff(got["losses"], reference["losses"]) > 10 * TOL


# bf16 keeps 8 significant bits (relative rounding 2**-8 ~ 4e-3 per op), so bf16 runs are compared
# with the fp32 run: losses within 1e-2 absolute, grad norms within 2e-2 relative over 6 steps.
BF16_LOSS_TOL, BF16_GRAD_NORM_RTOL = 1e-2, 2e-2
BF16_LAYOUTS = {
    "tp1": (1, {"dtype": "bf16"}),
    "tp2_sequence_parallel": (2, {"dtype": "bf16", "tp": 2, "sequence_parallel": True}),
    "dp2_distributed_optimizer": (2, {"dtype": "bf16", "overlap_grad_reduce": True, "distributed_optimizer": True}),
}


@pytest.mark.parametrize("name", BF16_LAYOUTS)
def test_bf16_close_to_fp32(name, reference, hf_tiny, tmp_path):
    world, layout = BF16_LAYOUTS[name]
    got = run_layout(tmp_path, hf_tiny[0], world, layout, name)
    assert got["param_dtypes"] == ["torch.bfloat16"]
    assert 0 < max_diff(got["losses"], reference["losses"]) <= BF16_LOSS_TOL
    for g, r in zip(got["grad_norms"], reference["grad_norms"], strict=True):
        assert abs(g - r) <= BF16_GRAD_NORM_RTOL * r
