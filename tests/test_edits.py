"""Edits as plain data: validation at construction, JSON round trip."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from onnxaom.edits import (
    InsertLayer,
    RemoveKernels,
    WidenLayer,
    edit_from_dict,
    edits_from_json,
    edits_to_json,
)
from onnxaom.errors import EditError, OnnxaomError

names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1,
                max_size=20)
remove_edits = st.builds(
    RemoveKernels,
    layer=names,
    kernels=st.sets(st.integers(0, 1000), min_size=1, max_size=20).map(sorted),
    coupled=st.sampled_from(["propagate", "refuse"]),
)
widen_edits = st.one_of(
    st.builds(WidenLayer, layer=names, add=st.integers(1, 64),
              init=st.sampled_from(["random", "zeros"]), seed=st.integers(0, 2**31),
              coupled=st.sampled_from(["propagate", "refuse"])),
    st.integers(1, 8).flatmap(lambda n: st.builds(
        WidenLayer, layer=names, add=st.just(n), init=st.just("net2net"),
        sources=st.one_of(st.none(), st.lists(st.integers(0, 100), min_size=n, max_size=n)),
        noise=st.floats(0, 1), seed=st.integers(0, 100))),
)
insert_edits = st.builds(InsertLayer, after=names, kernel_size=st.sampled_from([1, 3, 5, 7]),
                         init=st.sampled_from(["identity", "random"]),
                         name=st.one_of(st.none(), names), seed=st.integers(0, 100))
any_edit = st.one_of(remove_edits, widen_edits, insert_edits)


@given(any_edit)
def test_every_edit_round_trips_through_json(edit):
    assert edit_from_dict(json.loads(edit.to_json())) == edit
    assert edits_from_json(edits_to_json([edit])) == [edit]


@given(st.lists(any_edit, max_size=5))
def test_edit_lists_round_trip(edits):
    assert edits_from_json(edits_to_json(edits, indent=2)) == edits


def test_remove_kernels_sorts_and_freezes():
    edit = RemoveKernels("conv1", [5, 0, 3])
    assert edit.kernels == (0, 3, 5)
    assert edit == RemoveKernels("conv1", (0, 3, 5))
    assert hash(edit) == hash(RemoveKernels("conv1", (3, 5, 0)))
    with pytest.raises(AttributeError):
        edit.layer = "conv2"  # type: ignore[misc]
    assert edit.to_dict() == {"edit": "RemoveKernels", "layer": "conv1", "kernels": [0, 3, 5],
                              "coupled": "propagate"}


@pytest.mark.parametrize("kwargs, message", [
    ({"layer": "", "kernels": [0]}, "non-empty layer name"),
    ({"layer": 3, "kernels": [0]}, "non-empty layer name"),
    ({"layer": "c", "kernels": []}, "is empty"),
    ({"layer": "c", "kernels": [0, 3, 0]}, "repeats [0]"),
    ({"layer": "c", "kernels": [-1]}, "int >= 0"),
    ({"layer": "c", "kernels": [1.5]}, "int >= 0"),
    ({"layer": "c", "kernels": [True]}, "int >= 0"),
    ({"layer": "c", "kernels": "0,1"}, "list of kernel indices"),
    ({"layer": "c", "kernels": [0], "coupled": "maybe"}, "coupled must be one of"),
])
def test_remove_kernels_refuses_bad_fields(kwargs, message):
    with pytest.raises(EditError, match=None) as info:
        RemoveKernels(**kwargs)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, OnnxaomError)


@pytest.mark.parametrize("kwargs, message", [
    ({"layer": "c", "add": 0}, "add must be an int >= 1"),
    ({"layer": "c", "add": 2, "init": "he"}, "init must be one of"),
    ({"layer": "c", "add": 2, "sources": [0]}, "give one source kernel per new kernel"),
    ({"layer": "c", "add": 1, "init": "random", "sources": [0]}, "only applies to"),
    ({"layer": "c", "add": 1, "noise": -0.1}, "noise must be"),
    ({"layer": "c", "add": 1, "noise": float("nan")}, "noise must be"),
    ({"layer": "c", "add": 1, "seed": -1}, "seed must be"),
])
def test_widen_layer_refuses_bad_fields(kwargs, message):
    with pytest.raises(EditError) as info:
        WidenLayer(**kwargs)
    assert message in str(info.value)


@pytest.mark.parametrize("kwargs, message", [
    ({"after": "c", "kernel_size": 2}, "must be odd"),
    ({"after": "c", "kernel_size": 0}, "int >= 1"),
    ({"after": "c", "init": "zeros"}, "init must be one of"),
    ({"after": "c", "name": ""}, "non-empty"),
])
def test_insert_layer_refuses_bad_fields(kwargs, message):
    with pytest.raises(EditError) as info:
        InsertLayer(**kwargs)
    assert message in str(info.value)


def test_defaults_match_the_issue_examples():
    assert WidenLayer(layer="conv1", add=4, init="net2net").to_dict()["init"] == "net2net"
    edit = InsertLayer(after="conv2", kernel_size=3, init="identity")
    assert (edit.kernel_size, edit.init, edit.name) == (3, "identity", None)


@pytest.mark.parametrize("data, message", [
    ({"edit": "Prune", "layer": "c"}, "unknown edit type 'Prune'"),
    ({"layer": "c"}, "this one has keys 'layer'"),
    ({"type": "RemoveKernels", "layer": "c"}, "an edit needs the key 'edit' naming its type"),
    ({"edit": "RemoveKernels", "layer": "c", "kernels": [0], "extra": 1}, "no field(s) extra"),
    ({"edit": "RemoveKernels", "layer": "c"}, "kernels"),
    ([1, 2], "must be a JSON object"),
])
def test_from_dict_names_what_is_wrong(data, message):
    with pytest.raises(EditError) as info:
        edit_from_dict(data)  # type: ignore[arg-type]
    assert message in str(info.value)


def test_from_json_accepts_one_object_and_refuses_garbage():
    assert edits_from_json('{"edit": "InsertLayer", "after": "c"}') == [InsertLayer("c")]
    with pytest.raises(EditError, match="not valid JSON"):
        edits_from_json("{")
    with pytest.raises(EditError, match="array of objects"):
        edits_from_json("3")


def test_numpy_integers_are_accepted_as_plain_ints():
    import numpy as np

    edit = RemoveKernels("conv1", np.array([3, 0]))
    assert edit.kernels == (0, 3) and all(type(k) is int for k in edit.kernels)
    widen = WidenLayer("conv1", add=np.int64(2), seed=np.int32(1))
    assert (widen.add, widen.seed) == (2, 1) and type(widen.add) is int
    assert json.loads(edit.to_json())["kernels"] == [0, 3]
    with pytest.raises(EditError):
        RemoveKernels("conv1", np.array([True]))
