import pytest
import torch

from hasslefree.patterns import SparsityPattern


@pytest.mark.parametrize("spec,n,m", [("2:4", 2, 4), ("1:4", 1, 4), ("3:8", 3, 8), ("2:8", 2, 8), (" 4 : 8 ", 4, 8)])
def test_parse_nm_keeps_n_of_m(spec, n, m):
    pattern = SparsityPattern.parse(spec)
    assert (pattern.kind, pattern.n, pattern.m) == ("nm", n, m)
    scores = torch.rand(5, 3 * m)
    mask = pattern.mask_from_scores(scores)
    assert (mask.reshape(5, 3, m).sum(-1) == n).all()
    assert pattern.is_satisfied_by(mask)


def test_nm_keeps_largest_in_each_group():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.2, 4.0, 3.0, 2.0, 1.0]])
    mask = SparsityPattern.parse("2:4").mask_from_scores(scores)
    assert mask.tolist() == [[False, True, True, False, True, True, False, False]]


def test_unstructured_and_row_budgets():
    scores = torch.rand(13, 29)
    layer = SparsityPattern.parse("unstructured:0.3")
    assert int(layer.mask_from_scores(scores).sum()) == round(0.3 * 13 * 29)
    row = SparsityPattern.parse("row:40%")
    assert (row.mask_from_scores(scores).sum(1) == round(0.4 * 29)).all()
    exact = layer.with_nonzeros(17)
    assert int(exact.mask_from_scores(scores).sum()) == 17


def test_unstructured_mask_is_global_topk():
    scores = torch.rand(7, 11)
    mask = SparsityPattern.parse("unstructured:0.25").mask_from_scores(scores)
    kept = scores[mask]
    dropped = scores[~mask]
    assert kept.min() >= dropped.max()


@pytest.mark.parametrize("bad", ["4:4", "5:4", "abc", "unstructured:1.5", "2:0"])
def test_bad_patterns_raise(bad):
    with pytest.raises(ValueError):
        SparsityPattern.parse(bad)


def test_width_not_divisible_names_layer():
    with pytest.raises(ValueError, match="q_proj.*not divisible by M=4"):
        SparsityPattern.parse("2:4").validate_shape(8, 10, "q_proj")
