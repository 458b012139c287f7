"""The layer-method interface: one implementation per kind of compressed layer, chosen from the
settings; each fits a shared-input group on every block and builds its replacement module."""

from __future__ import annotations

import torch

from hasslefree.hss import HSSLinear, HSSOptions
from hasslefree.nn import SparseLowRankLinear
from hasslefree.pipeline import prepare
from hasslefree.pipeline.layer_methods import HSS, SPARSE_LOW_RANK, method_for
from helpers import tiny_llama

torch.set_num_threads(1)


def _hessian(width: int) -> torch.Tensor:
    x = torch.randn(256, width, generator=torch.Generator().manual_seed(0))
    return x.T @ x / 256


def test_every_block_group_fits_and_builds_through_its_method():
    model = tiny_llama(num_hidden_layers=3)
    plans = {"hassle-free-exact": (SPARSE_LOW_RANK, SparseLowRankLinear),
             "shss": (HSS, HSSLinear)}
    for method, (expected, module_type) in plans.items():
        extra = {"hss": HSSOptions(outer_rank=8, leaf=16)} if method == "shss" else {"rank": 4, "iterations": 1}
        plan = prepare(model, pattern="2:4", method=method, **extra)
        for index, block in enumerate(model.model.layers):
            group = plan.blocks[index][0]  # q/k/v: the group both methods target
            settings = group[0].settings
            implementation = method_for(settings)
            assert implementation is expected
            results = implementation.fit(block, group, settings, _hessian(group[0].in_features), torch.device("cpu"),
                                         seed=0, engine_options={}, clock=None)
            assert set(results) == set(group)
            for target, result in results.items():
                built = implementation.build_module(block.get_submodule(target.relative), result, target.pattern)
                assert isinstance(built, module_type)
                assert built.to_dense().shape == (target.out_features, target.in_features)
                assert torch.allclose(built.to_dense().float(), result.to_dense().float(), atol=1e-6)
