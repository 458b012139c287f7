"""The top-level API: every name in ``hasslefree.__all__`` resolves, and the whole-model /
checkpoint entries stay lazy (``import hasslefree`` does not pull in transformers)."""

from __future__ import annotations

import subprocess
import sys

import hasslefree


def test_every_public_name_resolves():
    for name in hasslefree.__all__:
        assert getattr(hasslefree, name) is not None, name
    assert set(hasslefree.__all__) <= set(dir(hasslefree))
    assert hasslefree.compress is hasslefree.pipeline.compress
    assert hasslefree.load_compressed is hasslefree.checkpoint.load_compressed


def test_unknown_attribute_is_an_attribute_error():
    try:
        hasslefree.compres  # noqa: B018
    except AttributeError as exc:
        assert "compres" in str(exc)
    else:
        raise AssertionError("a misspelt API name resolved")


def test_import_is_light_until_a_whole_model_entry_is_used():
    code = ("import sys, hasslefree; print('transformers' in sys.modules); "
            "hasslefree.compress; print('transformers' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "True"]
