"""Property tests for graph surgery: random kernel subsets against the zeroing oracle, and random
function-preserving edit sequences against the original model."""

from __future__ import annotations

from functools import lru_cache

import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnxaom.edits import InsertLayer, WidenLayer
from onnxaom.errors import EditError
from onnxaom.model import Model
from onnxaom.surgery import apply, plan_removal

from . import zoo
from .test_surgery import assert_removal_exact, assert_same_function, editable_layers

SETTINGS = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@lru_cache(maxsize=64)
def _model(builder: str, seed: int) -> onnx.ModelProto:
    if builder == "chain":
        return zoo.chain(seed=seed, kernels=(6, 8))
    if builder == "residual":
        return zoo.residual(seed=seed, kernels=6)
    if builder == "concat":
        return zoo.concat(seed=seed, kernels=(4, 5, 6))
    return zoo.BUILDERS[builder](seed=seed)


@SETTINGS
@given(data=st.data(), builder=st.sampled_from(sorted(zoo.BUILDERS)), seed=st.integers(0, 2))
def test_removing_random_kernel_subsets_equals_zeroing_them(data, builder, seed):
    proto = _model(builder, seed)
    model = Model(proto)
    sizes = {layer.name: layer.kernels for layer in model.layers()}
    chosen = data.draw(st.lists(st.sampled_from(editable_layers(proto)), min_size=1,
                                unique=True), label="layers")
    removals = {
        name: sorted(data.draw(st.sets(st.integers(0, sizes[name] - 1), min_size=1,
                                       max_size=sizes[name] - 1), label=name))
        for name in chosen
    }
    try:
        plan = plan_removal(model, removals)
    except EditError as exc:
        # only coupling may push a layer to zero kernels; every request alone keeps one
        assert "all" in str(exc) and "coupled" in str(exc), str(exc)
        return
    assert all(len(k) < sizes[name] for name, k in plan.removed.items())
    assert_removal_exact(proto, removals)


@SETTINGS
@given(data=st.data(), builder=st.sampled_from(sorted(zoo.BUILDERS)), seed=st.integers(0, 2))
def test_random_widen_and_insert_sequences_keep_the_function(data, builder, seed):
    proto = _model(builder, seed)
    model = Model(proto)
    edits: list[WidenLayer | InsertLayer] = []
    current = model
    for _ in range(data.draw(st.integers(1, 3), label="steps")):
        layers = [layer for layer in current.layers() if layer.name in
                  editable_layers(current.proto)]
        layer = data.draw(st.sampled_from(layers), label="layer")
        if layer.chain and layer.chain[-1] == "Relu" and data.draw(st.booleans(), label="deep"):
            edit: WidenLayer | InsertLayer = InsertLayer(
                layer.name, kernel_size=data.draw(st.sampled_from([1, 3]), label="size"))
        else:
            add = data.draw(st.integers(1, 5), label="add")
            init = data.draw(st.sampled_from(["net2net", "random", "zeros"]), label="init")
            sources = None
            if init == "net2net" and data.draw(st.booleans(), label="own sources"):
                sources = tuple(data.draw(st.lists(st.integers(0, layer.kernels - 1),
                                                   min_size=add, max_size=add), label="sources"))
            edit = WidenLayer(layer.name, add=add, init=init, sources=sources,
                              seed=data.draw(st.integers(0, 9), label="seed"))
        try:
            current = apply(current, edit)
        except EditError as exc:  # the zoo has nothing these edits may refuse
            raise AssertionError(f"{edit} refused: {exc}") from exc
        edits.append(edit)
    assert_same_function(proto, current.proto)
    assert_same_function(proto, apply(model, edits).proto)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["slice_batch", "nhwc_flatten"]),
       kept=st.sets(st.integers(0, 4), min_size=1, max_size=4), add=st.integers(1, 3))
def test_other_exporters_flatten_heads_take_random_edits(kind, kept, add):
    """Computed-batch and channels-last flattens before a dense layer: removing any kernel
    subset of the flattened conv equals zeroing it, and widening it keeps the function."""
    from .test_surgery import _flatten_head

    proto = _flatten_head(kind)
    assert_removal_exact(proto, {"conv2": sorted(set(range(5)) - kept)})
    assert_same_function(proto, apply(Model(proto), WidenLayer("conv2", add=add)).proto)
