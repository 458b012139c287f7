"""Solver calls: each solver gets only the loop keywords it declares, and its options come as a
typed dataclass built from its signature (defaults equal, names and simple types checked)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from hasslefree.lowrank import LOWRANK_SOLVERS
from hasslefree.solver_calls import LOOP_KEYWORDS, loop_keywords, option_values, options_type, typed_options
from hasslefree.sparse import SPARSE_SOLVERS

SOLVERS = {**SPARSE_SOLVERS, **{f"lowrank:{k}": v for k, v in LOWRANK_SOLVERS.items()}}


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_options_type_mirrors_the_signature(name):
    solver = SOLVERS[name]
    declared = {p.name: p.default for p in inspect.signature(solver).parameters.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in LOOP_KEYWORDS}
    options = options_type(solver)()
    assert option_values(options) == declared
    assert dataclasses.is_dataclass(options) and not any(p.kind is inspect.Parameter.VAR_KEYWORD
                                                         for p in inspect.signature(solver).parameters.values())
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(options, "x", 1)


def test_typed_options_check_names_and_types():
    sparsegpt, exact = SPARSE_SOLVERS["sparsegpt"], LOWRANK_SOLVERS["exact"]
    assert typed_options(sparsegpt, {"blocksize": 64}).blocksize == 64
    assert typed_options(exact, {"randomized": True, "power_iterations": 1}).power_iterations == 1
    for bad, message in [({"blocksiz": 3}, "blocksiz"), ({"blocksize": "64"}, "blocksize"),
                         ({"blocksize": True}, "blocksize"), ({"adaptive_mask": 1}, "adaptive_mask")]:
        with pytest.raises(ValueError, match=message):
            typed_options(sparsegpt, bad)
    assert typed_options(SPARSE_SOLVERS["alps"], {"rho": 1}).rho == 1  # an int is a fine float
    with pytest.raises(ValueError, match="takes none"):
        typed_options(SPARSE_SOLVERS["magnitude"], {"anything": 1})


def test_loop_keywords_reach_only_solvers_that_declare_them():
    supplied = dict(warm=("U", "V"), iteration=3, generator="g")
    assert loop_keywords(LOWRANK_SOLVERS["svd"], **supplied) == {}
    assert loop_keywords(LOWRANK_SOLVERS["exact"], **supplied) == {"warm": ("U", "V"), "generator": "g"}
    assert set(loop_keywords(LOWRANK_SOLVERS["adam"], **supplied)) == {"warm", "iteration", "generator"}
    assert loop_keywords(SPARSE_SOLVERS["alps"], previous="S") == {"previous": "S"}
    assert loop_keywords(SPARSE_SOLVERS["wanda"], previous="S") == {}
    assert loop_keywords(lambda t, h, p, **kw: None, previous="S") == {"previous": "S"}
    with pytest.raises(ValueError, match="not a loop keyword"):
        loop_keywords(SPARSE_SOLVERS["wanda"], blocksize=3)
