"""fastseq across ranks: gloo processes on CPU run every case of tests/torch_api/multi_rank.py
once (meshes of 2 and 3 ranks), and each case's outcome is one test here.
- dtensor_cases: DTensor inputs on every public op (fastseq/ops/_sharding.py), sharded on the
  batch or the heads, equal one process in float64 (outputs, every gradient, uneven pieces);
  bad placements are refused by name; the tensor-parallel example block equals one process.
- context_parallel_cases: ring attention equals attention over the whole sequence, and the
  Transformer-XL segment split across ranks equals the one-process LM."""
import os

import pytest
import torch
import torch.multiprocessing as mp

import fastseq
from fastseq.ops import PUBLIC_OPS

import multi_rank

WORLD = max(multi_rank.WORLD_SIZES)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    if fastseq.backend.triton_unavailable(torch.device("cpu")) is not None:
        pytest.skip("the cases run Triton on CPU tensors through the interpreter")
    folder = tmp_path_factory.mktemp("multi_rank")
    os.environ.setdefault("TRITON_INTERPRET", "1")
    out_file = str(folder / "outcomes")
    mp.spawn(multi_rank.run_all, args=(WORLD, str(folder / "init"), out_file), nprocs=WORLD,
             join=True)
    return [torch.load(f"{out_file}.{rank}") for rank in range(WORLD)]


@pytest.mark.parametrize("size", multi_rank.WORLD_SIZES)
@pytest.mark.parametrize("case", sorted(multi_rank.CASES))
def test_case(outcomes, case, size):
    for rank in range(size):
        outcome = outcomes[rank][f"{case}-{size}"]
        assert outcome == "ok", f"rank {rank} of {size}:\n{outcome}"


def test_every_public_op_has_a_sharding_rule():
    missing = [name for name, op in PUBLIC_OPS.items()
               if getattr(op.function, "sharding_rule", None) is None]
    assert not missing, f"public ops without a sharding rule: {missing}"
