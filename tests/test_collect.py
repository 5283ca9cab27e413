"""Collection: in-graph and plain counts equal a brute-force reference on many structures."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxaom
from onnxaom import DataError, LayerNotFoundError, ModelError, ProviderError
from onnxaom.collect import collect
from onnxaom.runtime import cuda_available

from . import zoo

STRUCTURES = [
    "chain",
    "bn_kept",
    "folded_bn",
    "residual",
    "concat",
    "depthwise",
    "reshape_matmul",
    "reduce_mean_head",
    "activations",
    "conv_pool_no_act",
]


def data_for(model: onnx.ModelProto, n: int, classes: int, seed: int = 0):
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, *dims)).astype(np.float32)
    labels = np.arange(n) % classes  # every class present
    rng.shuffle(labels)
    return images, labels.astype(np.int64)


def brute_force(model: onnx.ModelProto, layers, images, labels, threshold=0.0):
    """One sample at a time through ORT with the probes as outputs; counted element by element."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for layer in layers:
        m.graph.output.append(helper.make_tensor_value_info(layer.probe, TensorProto.FLOAT, None))
    session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [layer.probe for layer in layers]
    c = int(labels.max()) + 1
    counts = {}
    for i in range(images.shape[0]):
        values = session.run(names, {m.graph.input[0].name: images[i : i + 1]})
        for layer, v in zip(layers, values, strict=True):
            v = v.reshape(layer.kernels, layer.shape[1], layer.shape[2])
            target = counts.setdefault(
                layer.name, np.zeros((v.shape[0], c, *v.shape[1:]), np.int64)
            )
            for k, h, w in zip(*np.nonzero(v > threshold), strict=True):
                target[k, labels[i], h, w] += 1
    return counts


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("method", ["graph", "plain"])
def test_counts_equal_brute_force(structure: str, method: str) -> None:
    proto = getattr(zoo, structure)()
    model = onnxaom.Model(proto)
    images, labels = data_for(proto, n=37, classes=3, seed=1)
    stats = collect(
        model,
        images,
        labels,
        batch_size=8,
        method=method,
        progress=False,
        layers=[layer.name for layer in model.layers()],
    )
    expected = brute_force(proto, model.layers(), images, labels)
    assert stats.layer_names == tuple(expected)
    for name, counts in expected.items():
        assert stats.counts[name].dtype == np.int64
        np.testing.assert_array_equal(stats.counts[name], counts, err_msg=name)
    np.testing.assert_array_equal(stats.class_sizes, np.bincount(labels))


@pytest.mark.parametrize("probe", ["conv", "pool"])
def test_other_probe_points(probe: str) -> None:
    proto = zoo.chain()
    model = onnxaom.Model(proto)
    layers = model.layers(probe=probe)
    images, labels = data_for(proto, n=21, classes=2)
    stats = collect(model, images, labels, batch_size=5, probe=probe, progress=False)
    expected = brute_force(proto, [x for x in layers if x.name in stats.counts], images, labels)
    for name, counts in expected.items():
        np.testing.assert_array_equal(stats.counts[name], counts, err_msg=name)
    if probe == "pool":
        assert "pool" in {x.probe_kind for x in layers}


def test_threshold_is_strict_and_configurable() -> None:
    proto = zoo.chain()
    model = onnxaom.Model(proto)
    images, labels = data_for(proto, n=16, classes=2)
    stats = collect(model, images, labels, threshold=0.3, progress=False)
    expected = brute_force(proto, model.layers(), images, labels, threshold=0.3)
    for name in stats.layer_names:
        np.testing.assert_array_equal(stats.counts[name], expected[name])
    assert stats.metadata["threshold"] == 0.3


def test_split_runs_merge_to_one_run() -> None:
    proto = zoo.residual()
    model = onnxaom.Model(proto)
    images, labels = data_for(proto, n=40, classes=4)
    whole = collect(model, images, labels, batch_size=16, progress=False)
    parts = [
        collect(model, images[s], labels[s], batch_size=7, num_classes=4, progress=False)
        for s in (slice(0, 13), slice(13, 40))
    ]
    merged = parts[0] + parts[1]
    for name in whole.layer_names:
        np.testing.assert_array_equal(merged.counts[name], whole.counts[name])
    np.testing.assert_array_equal(merged.class_sizes, whole.class_sizes)


def test_fixed_batch_model() -> None:
    proto = zoo.chain(fixed_batch=1)
    model = onnxaom.Model(proto)
    images, labels = data_for(proto, n=11, classes=2)
    stats = collect(model, images, labels, batch_size=4, progress=False)
    expected = brute_force(proto, model.layers(), images, labels)
    for name in stats.layer_names:
        np.testing.assert_array_equal(stats.counts[name], expected[name])
    assert stats.metadata["batching"] in {"dynamic", "fixed:1"}


def test_empty_node_names_get_unique_layer_names() -> None:
    proto = zoo.chain(empty_names=True)
    names = [layer.name for layer in onnxaom.Model(proto).layers()]
    assert len(set(names)) == len(names)
    assert names[0] == "Conv_0"


def test_iterable_of_batches_and_growing_classes() -> None:
    proto = zoo.chain()
    model = onnxaom.Model(proto)
    images, labels = data_for(proto, n=30, classes=3)
    order = np.argsort(labels, kind="stable")  # class 2 appears only in the last batches
    images, labels = images[order], labels[order]
    batches = ((images[i : i + 7], labels[i : i + 7]) for i in range(0, 30, 7))
    streamed = collect(model, batches, progress=False)
    whole = collect(model, images, labels, progress=False)
    for name in whole.layer_names:
        np.testing.assert_array_equal(streamed.counts[name], whole.counts[name])


def test_device_accumulation_path_on_cpu() -> None:
    """The IOBinding accumulation used on CUDA, exercised with CPU OrtValues."""
    proto = zoo.bn_kept()
    model = onnxaom.Model(proto)
    images, labels = data_for(proto, n=29, classes=3)
    on_device = collect(
        model, images, labels, batch_size=6, accumulate_on_device=True, progress=False
    )
    plain = collect(model, images, labels, batch_size=6, method="plain", progress=False)
    for name in plain.layer_names:
        np.testing.assert_array_equal(on_device.counts[name], plain.counts[name])


def test_progress_false_is_silent_and_cpu_is_quiet(capfd) -> None:
    proto = zoo.chain()
    images, labels = data_for(proto, n=9, classes=2)
    collect(onnxaom.Model(proto), images, labels, progress=False)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_cuda_request_without_gpu() -> None:
    if cuda_available():
        pytest.skip("this machine has a working CUDA provider")
    proto = zoo.chain()
    images, labels = data_for(proto, n=4, classes=2)
    with pytest.raises(ProviderError, match="cuda"):
        collect(onnxaom.Model(proto), images, labels, provider="cuda", progress=False)


# ------------------------------------------------------------------------ bad input
@pytest.fixture
def chain_data():
    proto = zoo.chain()
    images, labels = data_for(proto, n=10, classes=2)
    return onnxaom.Model(proto), images, labels


def test_labels_out_of_range(chain_data) -> None:
    model, images, labels = chain_data
    with pytest.raises(DataError, match="0..1"):
        collect(model, images, labels + 1, num_classes=2, progress=False)
    with pytest.raises(DataError, match="negative|label"):
        collect(model, images, labels - 1, progress=False)


def test_labels_wrong_length(chain_data) -> None:
    model, images, labels = chain_data
    with pytest.raises(DataError, match="labels"):
        collect(model, images, labels[:-1], progress=False)


def test_images_wrong_shape(chain_data) -> None:
    model, images, labels = chain_data
    with pytest.raises(DataError, match="expects"):
        collect(model, images[:, :, :-1], labels, progress=False)
    with pytest.raises(DataError):
        collect(model, images[:, 0], labels, progress=False)


def test_images_wrong_dtype(chain_data) -> None:
    model, images, labels = chain_data
    with pytest.raises(DataError):
        collect(model, images.astype(str), labels, progress=False)


def test_empty_data_set(chain_data) -> None:
    model, images, labels = chain_data
    with pytest.raises(DataError, match="empty"):
        collect(model, images[:0], labels[:0], progress=False)


def test_class_without_samples(chain_data) -> None:
    model, images, labels = chain_data
    with pytest.raises(DataError, match="no samples"):
        collect(model, images, labels, num_classes=3, progress=False)
    with pytest.warns(RuntimeWarning, match="no samples"):
        stats = collect(
            model, images, labels, num_classes=3, allow_empty_classes=True, progress=False
        )
    with pytest.warns(RuntimeWarning):
        assert np.isnan(stats.aom(stats.layer_names[0])[:, 2]).all()


def test_many_empty_classes_are_listed_briefly(chain_data) -> None:
    model, images, labels = chain_data
    gappy = np.where(labels == 1, 250, labels)  # classes 1..249 empty
    with pytest.raises(DataError) as info:
        collect(model, images, gappy, progress=False)
    message = str(info.value)
    assert message.startswith("249 of 251 classes have no samples: 1, 2, 3,")
    assert "and 239 more" in message and len(message) < 300


def test_class_names_and_batch_size_forms(chain_data) -> None:
    model, images, labels = chain_data
    with pytest.raises(DataError, match="class_names must be a sequence of names"):
        collect(model, images, labels, class_names="ab", progress=False)
    with pytest.raises(DataError, match="class_names has duplicates"):
        collect(model, images, labels, class_names=["a", "a"], progress=False)
    stats = collect(model, images, labels, batch_size=np.int64(7), progress=False)
    assert stats.num_samples == len(labels)
    few = [f"c{i}" for i in range(int(labels.max()))]  # one name short
    with pytest.raises(DataError, match=f"{len(few)} class_names"):
        collect(model, images, labels, class_names=few, progress=False)
    # numpy forms: num_classes=labels.max() + 1, names in an array, with a Dataset too
    names = np.array([f"c{i}" for i in range(int(labels.max()) + 1)])
    stats = collect(model, images, labels, num_classes=labels.max() + 1, progress=False)
    assert stats.num_classes == int(labels.max()) + 1
    dataset = onnxaom.data.from_arrays(images, labels)
    stats = collect(model, dataset, class_names=names, progress=False)
    assert stats.class_names == tuple(names)


def test_uint8_arrays_are_counted_as_pixels_in_0_1(chain_data) -> None:
    model, images, labels = chain_data
    dims = images.shape[1:]
    pixels = np.random.default_rng(3).integers(0, 256, size=(len(labels), *dims), dtype=np.uint8)
    as_uint8 = collect(model, pixels, labels, threshold=0.5, progress=False)
    as_float = collect(model, pixels / np.float32(255), labels, threshold=0.5, progress=False)
    for name in as_uint8.layer_names:
        np.testing.assert_array_equal(as_uint8.counts[name], as_float.counts[name])
    assert as_uint8.metadata["preprocessing"]["scale"] == pytest.approx(1 / 255)


def test_unknown_layer(chain_data) -> None:
    model, images, labels = chain_data
    with pytest.raises(LayerNotFoundError, match="nope"):
        collect(model, images, labels, layers=["nope"], progress=False)
    with pytest.raises(LayerNotFoundError, match="layers is empty"):
        collect(model, images, labels, layers=[], progress=False)


@pytest.mark.parametrize("method", ["graph", "plain"])
def test_nan_activations_name_the_layer(method: str) -> None:
    proto = zoo.chain()
    bias = next(t for t in proto.graph.initializer if t.name == proto.graph.node[0].input[2])
    value = numpy_helper.to_array(bias).copy()
    value[0] = np.nan
    bias.CopyFrom(numpy_helper.from_array(value, bias.name))
    model = onnxaom.Model(proto)
    images, labels = data_for(proto, n=4, classes=2)
    with pytest.raises(ModelError, match="NaN"):
        collect(model, images, labels, method=method, progress=False)


def _infinite_model() -> onnx.ModelProto:
    """x * 1e30 -> conv with weights +1e30 and -1e30: kernel 0 is +inf and kernel 1 -inf
    everywhere (no NaN), so a sum of channel means is inf - inf = NaN."""
    w = np.zeros((2, 1, 1, 1), np.float32)
    w[0], w[1] = 1e30, -1e30
    nodes = [helper.make_node("Mul", ["x", "s"], ["xs"]),
             helper.make_node("Conv", ["xs", "w", "b"], ["c"], name="conv_inf"),
             helper.make_node("Sigmoid", ["c"], ["sg"]),
             helper.make_node("Flatten", ["sg"], ["f"]),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="fc", transB=1)]
    inits = [numpy_helper.from_array(np.array(1e30, np.float32), "s"),
             numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(2, np.float32), "b"),
             numpy_helper.from_array(np.ones((3, 32), np.float32), "w3"),
             numpy_helper.from_array(np.zeros(3, np.float32), "b3")]
    return zoo.hand_built(nodes, inits, ["N", 1, 4, 4], ["N", 3])


@pytest.mark.parametrize("options", [{"method": "graph"}, {"method": "graph",
                                                            "blocked_reads": False},
                                     {"method": "plain"}])
def test_infinities_of_both_signs_are_not_taken_for_nan(options) -> None:
    model = onnxaom.Model(_infinite_model())
    x, y = np.ones((6, 1, 4, 4), np.float32), np.arange(6) % 3
    stats = collect(model, x, y, layers=["conv_inf"], progress=False, **options)
    assert stats.counts["conv_inf"].sum(axis=(1, 2, 3)).tolist() == [96, 0]


def test_many_classes_are_counted_in_numpy_by_default(caplog) -> None:
    import logging

    proto = zoo.chain()
    model = onnxaom.Model(proto)
    images, _ = data_for(proto, n=202, classes=2)
    labels = np.arange(202) % 101  # 101 classes, two samples each
    with caplog.at_level(logging.INFO, logger="onnxaom.collect"):
        auto = collect(model, images, labels, progress=False)
    graph = collect(model, images, labels, method="graph", progress=False)
    assert auto.metadata["method"] == "plain" and "101 classes" in caplog.text
    for name in auto.layer_names:
        np.testing.assert_array_equal(auto.counts[name], graph.counts[name])
    assert collect(model, images, labels % 64, progress=False).metadata["method"] == "graph"


def test_model_without_conv() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mlp", [x], [y], [w])
    model = onnxaom.Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    with pytest.raises(ModelError, match="no 2-D Conv"):
        collect(model, np.zeros((2, 4), np.float32), np.array([0, 1]), progress=False)


def test_an_input_no_node_reads_is_not_the_image_input() -> None:
    """A graph input left unused (by another tool's edit) is neither the image input nor fed;
    counts equal the plain model's, and an edit keeps the input."""
    proto = zoo.chain()
    extra = onnx.ModelProto()
    extra.CopyFrom(proto)
    extra.graph.input.append(helper.make_tensor_value_info("unused", TensorProto.FLOAT, [1]))
    images, labels = data_for(proto, n=14, classes=3)
    got = collect(onnxaom.Model(extra), images, labels, progress=False)
    want = collect(onnxaom.Model(proto), images, labels, progress=False)
    for name in want.layer_names:
        np.testing.assert_array_equal(got.counts[name], want.counts[name], err_msg=name)
    edited = onnxaom.remove_kernels(onnxaom.Model(extra), {"conv1": [0]})
    assert [i.name for i in edited.proto.graph.input] == ["input", "unused"]
    two = onnx.ModelProto()
    two.CopyFrom(extra)
    two.graph.node[0].input[0] = "unused"  # now both inputs are read: which is the image?
    two.graph.node.append(helper.make_node("Identity", ["input"], ["also_read"]))
    with pytest.raises(ModelError, match="exactly one image input; it has 2: input, unused"):
        collect(onnxaom.Model(two), images, labels, progress=False)


def _bias_apart(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` (zoo.chain) with conv2's bias and fc1's written as separate Adds (a CNTK-style
    Conv + Add of a (1, K, 1, 1) constant, a tf2onnx-style MatMul + Add)."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    inits = {t.name: t for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        if node.name in ("conv2", "fc1"):
            bias = numpy_helper.to_array(inits[node.input[2]])
            shape = (1, -1, 1, 1) if node.name == "conv2" else (-1,)
            model.graph.initializer.append(
                numpy_helper.from_array(bias.reshape(shape), f"{node.name}.bias_apart"))
            out = node.output[0]
            if node.name == "fc1":  # Gemm(transB=1) -> MatMul of the transposed weight
                weight = numpy_helper.to_array(inits[node.input[1]]).T.copy()
                model.graph.initializer.append(
                    numpy_helper.from_array(weight, "fc1.weight_t"))
                node = helper.make_node("MatMul", [node.input[0], "fc1.weight_t"],
                                        [f"{out}_raw"], name="fc1")
            else:
                del node.input[2]
                node.output[0] = f"{out}_raw"
            nodes += [node, helper.make_node("Add", [f"{out}_raw", f"{node.name}.bias_apart"],
                                             [out], name=f"{node.name}_bias")]
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def test_conv_probe_reads_after_a_bias_written_apart() -> None:
    """probe="conv" is the layer's output with its bias, so the same network counts the same
    whether the bias is an input of the layer or an Add after it."""
    proto = zoo.chain()
    apart = _bias_apart(proto)
    images, labels = data_for(proto, n=30, classes=3)
    x = images[:4]
    for got, want in zip(zoo.run(apart, x), zoo.run(proto, x), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    model = onnxaom.Model(apart)
    assert [x.chain for x in model.layers(probe="conv")] == [(), ("Add",), ("Add",), ()]
    names = [x.name for x in model.layers()]
    a = collect(onnxaom.Model(proto), images, labels, probe="conv", progress=False, layers=names)
    b = collect(model, images, labels, probe="conv", progress=False, layers=names)
    for name in names:
        np.testing.assert_array_equal(a.counts[name], b.counts[name], err_msg=name)
    plain = onnxaom.summary(onnxaom.Model(proto))
    assert onnxaom.summary(model).layer_params == plain.layer_params


def test_model_with_1d_convs_names_them() -> None:
    """1-D (and 3-D) convs are not layers; the refusal says so and names them."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 1, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(size=(16 * 4, 2)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv1d", pads=[1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["y"], name="dense")]
    model = onnxaom.Model(zoo.hand_built(nodes, inits, ["N", 1, 16], ["N", 2]))
    with pytest.raises(ModelError, match=r"no 2-D Conv layer.*1-D or 3-D.*conv1d\).*dense"):
        collect(model, np.zeros((2, 1, 16), np.float32), np.array([0, 1]), progress=False)


def test_collector_streams_and_continues_after_result() -> None:
    proto = zoo.depthwise()
    model = onnxaom.Model(proto)
    images, labels = data_for(proto, n=30, classes=3)
    collector = onnxaom.Collector(model, num_classes=3)
    collector.update(images[:4], labels[:4])
    collector.update(images[4:4], labels[4:4])  # an empty batch is fine
    collector.update(images[4:20], labels[4:20])
    partial = collector.result()
    assert partial.num_samples == 20
    collector.update(images[20:], labels[20:])
    whole = collect(model, images, labels, progress=False)
    final = collector.result()
    for name in whole.layer_names:
        np.testing.assert_array_equal(final.counts[name], whole.counts[name])
    with pytest.raises(DataError, match="labels"):
        collector.update(images[:2], labels[:3])


@pytest.mark.parametrize("method", ["graph", "plain"])
def test_fixed_batch_baked_into_a_reshape_is_fed_in_chunks(method: str) -> None:
    proto = zoo.reshape_matmul(fixed_batch=2, target="batch")
    model = onnxaom.Model(proto)
    images, labels = data_for(proto, n=9, classes=3)  # odd: the last chunk is padded
    stats = collect(model, images, labels, batch_size=4, method=method, progress=False)
    assert stats.metadata["batching"] == "fixed:2"
    expected = brute_force_chunked(proto, model.layers(), images, labels, chunk=2)
    for name in stats.layer_names:
        np.testing.assert_array_equal(stats.counts[name], expected[name], err_msg=name)
    np.testing.assert_array_equal(stats.class_sizes, np.bincount(labels))


def brute_force_chunked(proto, layers, images, labels, chunk):
    """The brute force for a model that only runs batches of exactly ``chunk``: chunks of the
    whole data set, the last padded with zero images, as documented."""
    n = images.shape[0]
    padded = np.concatenate([images, np.zeros((-n % chunk, *images.shape[1:]), images.dtype)])
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    for layer in layers:
        m.graph.output.append(helper.make_tensor_value_info(layer.probe, TensorProto.FLOAT, None))
    session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    c = int(labels.max()) + 1
    counts = {x.name: np.zeros((x.kernels, c, x.shape[1], x.shape[2]), np.int64) for x in layers}
    for start in range(0, n, chunk):
        values = session.run([x.probe for x in layers], {"input": padded[start : start + chunk]})
        for layer, v in zip(layers, values, strict=True):
            v = v.reshape(chunk, layer.kernels, layer.shape[1], layer.shape[2])
            for i in range(min(chunk, n - start)):
                for k, h, w in zip(*np.nonzero(v[i] > 0), strict=True):
                    counts[layer.name][k, labels[start + i], h, w] += 1
    return counts


def test_fresh_process_on_cpu_prints_nothing(tmp_path) -> None:
    """provider='auto' on a machine without a GPU: no provider errors on stderr."""
    import subprocess
    import sys

    path = zoo.save(zoo.chain(), tmp_path / "m.onnx")
    code = (
        "import numpy as np, onnxaom\n"
        f"m = onnxaom.load({str(path)!r})\n"
        "x = np.random.default_rng(0).normal(size=(6, 3, 8, 8)).astype(np.float32)\n"
        "s = onnxaom.collect(m, x, np.arange(6) % 2, progress=False)\n"
        "print(s.metadata['provider'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    if not cuda_available():
        assert result.stdout.strip() == "CPUExecutionProvider"


def test_nan_check_can_be_switched_off() -> None:
    proto = zoo.chain()
    bias = next(t for t in proto.graph.initializer if t.name == proto.graph.node[0].input[2])
    value = numpy_helper.to_array(bias).copy()
    value[0] = np.nan
    bias.CopyFrom(numpy_helper.from_array(value, bias.name))
    images, labels = data_for(proto, n=4, classes=2)
    for method in ("graph", "plain"):
        stats = collect(
            onnxaom.Model(proto),
            images,
            labels,
            method=method,
            check_nan=False,
            progress=False,
            layers=["conv1"],
        )
        assert stats.counts["conv1"][0].sum() == 0  # NaN is not > 0


def test_model_with_an_ir_version_newer_than_onnxruntime_reads() -> None:
    proto = zoo.chain()
    proto.ir_version = onnx.IR_VERSION  # what onnx.helper.make_model writes by default
    images, labels = data_for(proto, n=6, classes=2)
    stats = collect(onnxaom.Model(proto), images, labels, progress=False)
    assert stats.num_samples == 6


def test_raw_conv_probe_reads_the_fused_relu_output() -> None:
    """Reading conv1's raw output would break ORT's Conv+Relu fusion; x > 0 iff relu(x) > 0."""
    from onnxaom.instrument import counting_graph

    model = onnxaom.Model(zoo.chain())
    layers = model.layers(probe="conv")
    graph = counting_graph(model.proto, layers).model
    greater = [n for n in graph.graph.node if n.op_type == "Greater"]
    assert greater[0].input[0] == "relu1_out"  # not conv1_out
    with_threshold = counting_graph(model.proto, layers, threshold=-0.5).model
    assert next(n for n in with_threshold.graph.node if n.op_type == "Greater").input[0] == (
        "conv1_out"
    )


@pytest.mark.parametrize("method", ["graph", "plain"])
def test_initializers_listed_as_graph_inputs(method: str) -> None:
    """Old exporters (keep_initializers_as_inputs=True) list every weight as a graph input."""
    proto = zoo.chain()
    for tensor in proto.graph.initializer:
        proto.graph.input.append(
            helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
        )
    model = onnxaom.Model(proto)
    images, labels = data_for(proto, n=10, classes=2)
    stats = collect(model, images, labels, method=method, layers=["conv1"], progress=False)
    expected = brute_force(proto, [model.layer("conv1")], images, labels)
    np.testing.assert_array_equal(stats.counts["conv1"], expected["conv1"])


@pytest.mark.parametrize("opset", [11, 13, 18, 21])
@pytest.mark.parametrize("structure", ["bn_kept", "residual", "reduce_mean_head"])
def test_other_opsets(structure: str, opset: int) -> None:
    proto = getattr(zoo, structure)(opset=opset)
    model = onnxaom.Model(proto)
    images, labels = data_for(proto, n=13, classes=2)
    graph = collect(model, images, labels, batch_size=5, progress=False)
    expected = brute_force(proto, model.layers(), images, labels)
    for name in graph.layer_names:
        np.testing.assert_array_equal(graph.counts[name], expected[name], err_msg=name)


def test_channels_last_model_as_tf2onnx_writes_it() -> None:
    """A Keras/tf2onnx-style model: NHWC input, Transpose to NCHW before the first Conv. It
    takes (N, H, W, C) images, and (N, C, H, W) ones, transposed for it."""
    proto = zoo.chain()
    image = proto.graph.input[0]
    dims = image.type.tensor_type.shape.dim
    n, c, h, w = (d.dim_param or d.dim_value for d in dims)
    nhwc = helper.make_tensor_value_info("input_nhwc", TensorProto.FLOAT, [n, h, w, c])
    transpose = helper.make_node("Transpose", ["input_nhwc"], [image.name], perm=[0, 3, 1, 2])
    proto.graph.node.insert(0, transpose)
    del proto.graph.input[:]
    proto.graph.input.append(nhwc)
    model = onnxaom.Model(proto)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(11, h, w, c)).astype(np.float32)
    labels = np.arange(11) % 2
    stats = collect(model, images, labels, batch_size=4, progress=False)
    reference = collect(onnxaom.Model(zoo.chain()), images.transpose(0, 3, 1, 2), labels,
                        batch_size=4, progress=False)
    for name in reference.layer_names:
        np.testing.assert_array_equal(stats.counts[name], reference.counts[name])
    # (N, C, H, W) batches, as every loader yields them, are transposed for this input
    fed = collect(model, images.transpose(0, 3, 1, 2), labels, batch_size=4, progress=False)
    for name in reference.layer_names:
        np.testing.assert_array_equal(fed.counts[name], reference.counts[name])
    with pytest.raises(DataError, match=r"expects \(N, \d+, \d+, \d+\) \(axis 1 differs\)"):
        collect(model, images[:, 1:], labels, progress=False)


def _batch_mixing_gate(fixed: int, *, across_chunk: bool = False) -> onnx.ModelProto:
    """conv -> relu -> x - max over (the whole tensor reshaped to [fixed, C, -1]) -> conv -> relu
    -> mean -> gemm, batch ``fixed`` baked into the Reshape constants: with the batch made
    symbolic it still runs (-1 absorbs the extra samples) but gates each sample by the others.
    ``across_chunk``: the mean of the whole chunk (reshaped to [1, C, -1]) instead, so the
    samples of a chunk of ``fixed`` gate each other too (the padding included)."""
    rng = np.random.default_rng(3)
    c = 4

    def init(name, value):
        return numpy_helper.from_array(np.asarray(value), name)

    inits = [
        init("w1", rng.normal(0, 0.5, (c, 1, 3, 3)).astype(np.float32)),
        init("b1", rng.uniform(-0.1, 0.1, c).astype(np.float32)),
        init("w2", rng.normal(0, 0.3, (c, c, 3, 3)).astype(np.float32)),
        init("b2", rng.uniform(-0.1, 0.1, c).astype(np.float32)),
        init("wf", rng.normal(0, 0.5, (3, c)).astype(np.float32)),
        init("flat_shape", np.array([1 if across_chunk else fixed, c, -1], np.int64)),
        init("gate_shape", np.array([1 if across_chunk else fixed, c, 1, 1], np.int64)),
        init("half", np.array(0.5, np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Reshape", ["r1", "flat_shape"], ["flat"], name="flatten_gate"),
        helper.make_node("ReduceMean" if across_chunk else "ReduceMax", ["flat"], ["peak"],
                         name="peak", axes=[2], keepdims=1),
        helper.make_node("Reshape", ["peak", "gate_shape"], ["gate"], name="gate"),
        helper.make_node("Mul", ["gate", "half"], ["scaled"], name="scale"),
        helper.make_node("Sub", ["r1", "scaled"], ["gated"], name="subtract"),
        helper.make_node("Conv", ["gated", "w2", "b2"], ["c2"], name="conv2", pads=[1] * 4),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat2"], name="flatten"),
        helper.make_node("Gemm", ["flat2", "wf"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "mixing", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                        [fixed, 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [fixed, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("fixed", [1, 2])
def test_fixed_batch_that_runs_symbolic_but_mixes_samples_is_fed_in_chunks(fixed: int) -> None:
    """The symbolic-batch rewrite runs this graph at any batch size, but the Reshape to
    [fixed, C, -1] then pools over samples: the trial must see that and feed chunks."""
    proto = _batch_mixing_gate(fixed)
    model = onnxaom.Model(proto)
    images, labels = data_for(proto, n=11, classes=3)
    stats = collect(model, images, labels, batch_size=4, progress=False)
    assert stats.metadata["batching"] == f"fixed:{fixed}"
    expected = brute_force_chunked(proto, model.layers(), images, labels, chunk=fixed)
    for name in stats.layer_names:
        np.testing.assert_array_equal(stats.counts[name], expected[name], err_msg=name)


@pytest.mark.parametrize("method", ["graph", "plain"])
def test_fixed_batch_chunks_are_cut_from_the_stream_not_each_batch(method: str) -> None:
    """A model fed in chunks of its fixed batch (3), whose samples gate each other: the chunks
    are the stream's, so batch sizes that do not divide by 3, and a stream of uneven batches,
    count what chunks of 3 of the whole data set count (they padded every batch before)."""
    proto = _batch_mixing_gate(3, across_chunk=True)
    model = onnxaom.Model(proto)
    images, labels = data_for(proto, n=11, classes=3)
    expected = brute_force_chunked(proto, model.layers(), images, labels, chunk=3)
    uneven = [(images[a:b], labels[a:b]) for a, b in ((0, 1), (1, 5), (5, 7), (7, 11))]
    for given in (dict(batch_size=2), dict(batch_size=4), dict(batch_size=5), None):
        if given is None:
            stats = collect(model, iter(uneven), method=method, progress=False)
        else:
            stats = collect(model, images, labels, method=method, progress=False, **given)
        assert stats.metadata["batching"] == "fixed:3" and stats.num_samples == 11
        np.testing.assert_array_equal(stats.class_sizes, np.bincount(labels))
        for name in stats.layer_names:
            np.testing.assert_array_equal(stats.counts[name], expected[name],
                                          err_msg=f"{given} {name}")


def test_trial_of_a_fixed_batch_model_with_a_single_image_batch() -> None:
    """The first batch holds one image: the trial still uses distinct images (flipped copies)."""
    proto = _batch_mixing_gate(1)
    images, labels = data_for(proto, n=3, classes=3)
    stats = collect(onnxaom.Model(proto), images, labels, batch_size=1, progress=False)
    assert stats.metadata["batching"] == "fixed:1"


def test_fixed_batch_fallback_is_quiet(capfd) -> None:
    """The symbolic-batch trial fails inside ORT for this model: nothing reaches stderr."""
    proto = zoo.reshape_matmul(fixed_batch=2, target="batch")
    images, labels = data_for(proto, n=5, classes=2)
    stats = collect(onnxaom.Model(proto), images, labels, batch_size=4, progress=False)
    assert stats.metadata["batching"] == "fixed:2"
    assert capfd.readouterr().err == ""


def _opset9_model() -> onnx.ModelProto:
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (3, 1, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(0, 0.5, (2, 3)).astype(np.float32), "wf"),
             numpy_helper.from_array(np.zeros(2, np.float32), "bf")]
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(
        nodes, "old", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 6, 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 4
    return model


def test_opset_too_old_for_the_graph_count_falls_back_to_plain() -> None:
    proto = _opset9_model()
    model = onnxaom.Model(proto)
    images, labels = data_for(proto, n=10, classes=2)
    stats = collect(model, images, labels, progress=False)
    assert stats.metadata["method"] == "plain"
    expected = brute_force(proto, model.layers(), images, labels)
    for name in stats.layer_names:
        np.testing.assert_array_equal(stats.counts[name], expected[name], err_msg=name)
    with pytest.raises(ModelError, match="opset 9 is too old"):
        collect(model, images, labels, method="graph", progress=False)


def test_counts_larger_than_the_machine_are_refused_before_allocating(monkeypatch) -> None:
    import sys

    collect_module = sys.modules["onnxaom.collect"]  # the attribute is the function
    proto = zoo.chain()
    images, labels = data_for(proto, n=6, classes=3)
    monkeypatch.setattr(collect_module, "_physical_memory", lambda: 10_000)
    with pytest.raises(DataError, match=r"largest is 'conv2'.*layers=\[\.\.\.\]"):
        collect(onnxaom.Model(proto), images, labels, progress=False)
    small = collect(onnxaom.Model(proto), images, labels, layers=["fc2"], progress=False)
    assert small.layer_names == ("fc2",)


@pytest.mark.parametrize("threshold", [float("nan"), float("inf"), "x", True])
def test_a_threshold_that_is_not_a_finite_number_is_refused(chain_data, threshold) -> None:
    model, images, labels = chain_data
    with pytest.raises(DataError, match="threshold must be a finite number"):
        collect(model, images, labels, threshold=threshold, progress=False)


def test_the_metadata_records_the_scale_of_a_uint8_torch_tensor(chain_data) -> None:
    torch = pytest.importorskip("torch")
    model, images, labels = chain_data
    pixels = np.random.default_rng(4).integers(0, 256, size=images.shape, dtype=np.uint8)
    stats = collect(model, torch.from_numpy(pixels), labels, progress=False)
    assert stats.metadata["preprocessing"]["scale"] == pytest.approx(1 / 255)
    stats = collect(model, images, labels, progress=False)
    assert stats.metadata["preprocessing"]["scale"] == 1.0


def test_a_stream_records_the_pixel_scale_it_applied(chain_data) -> None:
    """uint8 batches are scaled by 1/255 as arrays are, and say so: half of the data as a
    stream and half as an array merge; float batches record scale 1."""
    model, _, labels = chain_data
    dims = model.proto.graph.input[0].type.tensor_type.shape.dim[1:]
    pixels = np.random.default_rng(4).integers(0, 256, size=(len(labels),
                                                             *[d.dim_value for d in dims]),
                                               dtype=np.uint8)
    half = len(labels) // 2
    stream = collect(model, iter([(pixels[:half], labels[:half])]), progress=False)
    array = collect(model, pixels[half:], labels[half:], progress=False)
    assert stream.metadata["preprocessing"]["scale"] == pytest.approx(1 / 255)
    whole = collect(model, pixels, labels, progress=False)
    merged = stream + array
    for name in whole.layer_names:
        np.testing.assert_array_equal(merged.counts[name], whole.counts[name])
    floats = collect(model, iter([(pixels / np.float32(255), labels)]), progress=False)
    assert floats.metadata["preprocessing"]["scale"] == 1.0
    with pytest.raises(DataError, match=r"batch 1\): float32 pixels, but batch 0 had uint8"):
        collect(model, iter([(pixels[:half], labels[:half]),
                             (pixels[half:].astype(np.float32), labels[half:])]),
                progress=False)


def test_the_padding_of_a_fixed_batch_chunk_is_not_checked_for_nan() -> None:
    """Batch 4 baked into a Reshape (fed in chunks, the last padded with zero images), and
    each image divided by its own pixel sum: a zero image is NaN, no real one is."""
    inits = [numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes"),
             numpy_helper.from_array(np.ones((2, 1, 3, 3), np.float32), "w"),
             numpy_helper.from_array(np.array([4, 1, 4, 4], np.int64), "bake"),
             numpy_helper.from_array(np.array([4, 32], np.int64), "flat"),
             numpy_helper.from_array(np.ones((3, 32), np.float32), "wf")]
    nodes = [helper.make_node("Reshape", ["x", "bake"], ["xb"]),  # before the probe: kept
             helper.make_node("ReduceSum", ["xb", "axes"], ["s"], keepdims=1),
             helper.make_node("Div", ["xb", "s"], ["xn"]),
             helper.make_node("Conv", ["xn", "w"], ["c"], name="conv1", pads=[1] * 4),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Reshape", ["r", "flat"], ["f"]),
             helper.make_node("Gemm", ["f", "wf"], ["y"], name="fc", transB=1)]
    proto = zoo.hand_built(nodes, inits, [4, 1, 4, 4], [4, 3])
    x = np.random.default_rng(2).random((6, 1, 4, 4), dtype=np.float32) + 0.1
    y = np.arange(6) % 3
    for method in ("graph", "plain"):
        stats = collect(onnxaom.Model(proto), x, y, method=method, progress=False,
                        layers=["conv1"])
        assert stats.metadata["batching"] == "fixed:4" and stats.num_samples == 6
    x[5] = 0.0  # a real zero image (0 / 0) in the padded chunk still raises
    for method in ("graph", "plain"):
        with pytest.raises(ModelError, match="'conv1' produced NaN"):
            collect(onnxaom.Model(proto), x, y, method=method, progress=False, layers=["conv1"])


def _conv_in(elem: int, weight: np.ndarray) -> onnxaom.Model:
    """x (N, 1, 2, 2) -> Cast to ``elem`` -> conv (``weight``) -> relu -> Cast to float."""
    nodes = [helper.make_node("Cast", ["x"], ["xc"], to=elem),
             helper.make_node("Conv", ["xc", "w"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Cast", ["r"], ["y"], to=TensorProto.FLOAT)]
    return onnxaom.Model(zoo.hand_built(nodes, [numpy_helper.from_array(weight, "w")],
                                        ["N", 1, 2, 2], ["N", 2, 2, 2]))


def test_a_model_onnx_runtime_cannot_load_is_a_model_error() -> None:
    """A float64 conv, which ONNX Runtime's CPU provider does not implement: collect says so
    in one line instead of ORT's traceback."""
    model = _conv_in(TensorProto.DOUBLE, np.ones((2, 1, 1, 1), np.float64))
    images, labels = np.full((4, 1, 2, 2), 0.01, np.float32), np.array([0, 0, 1, 1])
    with pytest.raises(ModelError, match=r"ONNX Runtime cannot load the model: .*Conv"):
        collect(model, images, labels, progress=False)


def test_two_nodes_of_one_name_are_refused_naming_them() -> None:
    """Two nodes with one name (some renaming tools write them): ONNX Runtime refuses the
    model and a layer name could not pick one node, so every entry point says so, naming the
    nodes (the layers were renamed, and an edit kept both names)."""
    proto = zoo.chain()
    for node in proto.graph.node:
        if node.op_type == "Relu":
            node.name = "same"
    model = onnxaom.Model(proto)
    images, labels = data_for(proto, 8, 2)
    message = r"nodes 1 \(Relu\) and 3 \(Relu\) are both named 'same'"
    with pytest.raises(ModelError, match=message):
        collect(model, images, labels, progress=False)
    for call in (model.layers, lambda: onnxaom.summary(model),
                 lambda: onnxaom.remove_kernels(model, {"conv1": [0]})):
        with pytest.raises(ModelError, match=message):
            call()


def test_float16_probes_are_counted_as_the_model_rounds_them() -> None:
    """ORT's CPU provider runs a float16 Conv in float32 and drops the cast back before an
    in-graph comparison: an activation of 1e-8, 0 once rounded to float16, counted as positive.
    ``method="auto"`` counts float16 probes in numpy, on the tensor the model computes."""
    model = _conv_in(TensorProto.FLOAT16, np.full((2, 1, 1, 1), 1e-6, np.float16))
    images, labels = np.full((4, 1, 2, 2), 0.01, np.float32), np.array([0, 0, 1, 1])
    stats = collect(model, images, labels, progress=False)
    assert stats.metadata["method"] == "plain"
    assert int(stats.counts["conv"].sum()) == 0
    with pytest.warns(UserWarning, match="method='graph' on probes of other types than "
                                         "float32 \\(r\\)"):
        collect(model, images, labels, method="graph", progress=False)


def test_a_uint8_input_takes_8_bit_pixels() -> None:
    """A deployment model that takes raw pixels (uint8) and scales them itself: 8-bit images
    (uint8 arrays, which onnxaom scales to k / 255, or floats that are k / 255) are fed back as
    0..255; normalised images are refused, not rounded."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
             helper.make_node("Sub", ["xf", "mid"], ["xs"]),
             helper.make_node("Conv", ["xs", "w"], ["c"], name="conv", pads=[1] * 4),
             helper.make_node("Relu", ["c"], ["y"])]
    inits = [numpy_helper.from_array(np.float32(128), "mid"),
             numpy_helper.from_array(rng.normal(size=(4, 1, 3, 3)).astype(np.float32), "w")]
    proto = zoo.hand_built(nodes, inits, ["N", 1, 6, 6], ["N", 4, 6, 6])
    proto.graph.input[0].type.tensor_type.elem_type = TensorProto.UINT8
    model = onnxaom.Model(proto)
    pixels = rng.integers(0, 256, (10, 1, 6, 6)).astype(np.uint8)
    labels = np.arange(10) % 2
    session = ort.InferenceSession(proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    out = session.run(None, {"x": pixels})[0]
    want = np.stack([(out[labels == c] > 0).sum(axis=0) for c in (0, 1)], axis=1)
    for images in (pixels, pixels.astype(np.float32) / 255):
        stats = collect(model, images, labels, progress=False)
        np.testing.assert_array_equal(stats.counts["conv"], want)
    with pytest.raises(DataError, match="model input 'x' takes 8-bit pixels.* without "
                                        "normalisation and without resizing"):
        collect(model, (pixels.astype(np.float32) - 128) / 64, labels, progress=False)


def _resized_to_batch_1(batch: int | str) -> onnx.ModelProto:
    """conv1 -> relu1 -> Resize to ``sizes`` (1, 4, 16, 16), the batch written in -> conv2
    -> relu2 -> gap -> fc."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n)
             for n, s in (("w", (4, 3, 3, 3)), ("w2", (4, 4, 3, 3)), ("wf", (3, 4)))]
    inits += [numpy_helper.from_array(np.zeros(0, np.float32), "roi"),
              numpy_helper.from_array(np.zeros(0, np.float32), "scales"),
              numpy_helper.from_array(np.array([1, 4, 16, 16], np.int64), "sizes")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv1", pads=[1] * 4),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Resize", ["r", "roi", "scales", "sizes"], ["u"], mode="nearest"),
             helper.make_node("Conv", ["u", "w2"], ["c2"], name="conv2"),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "wf"], ["y"], name="fc", transB=1)]
    return zoo.hand_built(nodes, inits, [batch, 3, 8, 8], [batch, 3], opset=11)


@pytest.mark.parametrize("method", ["graph", "plain"])
def test_a_fixed_batch_written_into_a_resize_is_fed_in_chunks(method) -> None:
    """A fixed batch of 1 that a Resize's sizes also hold: made symbolic, the Resize squeezes a
    batch of 2 into 1 row. Both counting paths feed chunks of 1 (the plain one raised its row
    check's error, "a dense layer applied at every position?", from the trial)."""
    proto = _resized_to_batch_1(1)
    images, labels = data_for(proto, 6, 3)
    stats = collect(onnxaom.Model(proto), images, labels, batch_size=4, method=method,
                    progress=False)
    assert stats.metadata["batching"] == "fixed:1"
    want = collect(onnxaom.Model(proto), images, labels, batch_size=1, method=method,
                   progress=False)
    for name in stats.counts:
        np.testing.assert_array_equal(stats.counts[name], want.counts[name])


@pytest.mark.parametrize("method", ["graph", "plain"])
def test_a_run_that_fails_is_a_model_error_on_both_paths(method, capfd) -> None:
    """The same Resize with a symbolic batch squeezes a batch of 3 into one row, which both
    paths name; a head reshaped to a batch of 1 fails inside ONNX Runtime, whose exception the
    plain path let out. ORT's own log lines (red, naming onnxaom's internal nodes) are not
    printed: the error says it once."""
    proto = _resized_to_batch_1("N")
    images, labels = data_for(proto, 6, 3)
    with pytest.raises(ModelError, match="'r2' has 1 rows for a batch of 3 samples.* a batch "
                                         "size written into the graph"):
        collect(onnxaom.Model(proto), images, labels, batch_size=3, method=method,
                progress=False)
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([1, 256], np.int64), "shape"),
             numpy_helper.from_array(rng.normal(size=(3, 256)).astype(np.float32), "wf")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv1", pads=[1] * 4),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Reshape", ["r", "shape"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "wf"], ["y"], name="fc", transB=1)]
    proto = zoo.hand_built(nodes, inits, ["N", 3, 8, 8], ["N", 3], opset=11)
    with pytest.raises(ModelError, match="ONNX Runtime could not run the model on this batch "
                                         "of 3: .*declare that batch on its input"):
        collect(onnxaom.Model(proto), images, labels, batch_size=3, method=method,
                progress=False)
    assert "onnxruntime" not in capfd.readouterr().err


def test_a_batch_norm_written_in_training_mode_is_counted_with_its_running_statistics():
    """Old Caffe2 and CNTK files write BatchNormalization with its training outputs; ONNX
    Runtime then normalises each batch by its own statistics, and a sample's counts depended
    on its batch. Counted with the running statistics (a warning says so), as at inference;
    refused where another node reads the batch statistics."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")]
    inits += [numpy_helper.from_array(rng.uniform(0.5, 1.5, 4).astype(np.float32), n)
              for n in ("g", "v")]
    inits += [numpy_helper.from_array(rng.normal(0, 0.3, 4).astype(np.float32), n)
              for n in ("b", "m")]

    def model(outputs, read_mean=False):
        nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1] * 4),
                 helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], outputs,
                                  name="bn"),
                 helper.make_node("Relu", ["n"], ["y" if not read_mean else "r"])]
        if read_mean:
            nodes.append(helper.make_node("Add", ["r", "mean_out"], ["y"]))
        return zoo.hand_built(nodes, inits, ["N", 3, 6, 6], ["N", 4, 6, 6], opset=9)

    training = ["n", "mean_out", "var_out", "saved_mean", "saved_var"]
    images, labels = data_for(model(["n"]), 12, 3)
    want = collect(onnxaom.Model(model(["n"])), images, labels, progress=False).counts["conv"]
    for batch_size in (1, 5, 12):
        with pytest.warns(UserWarning, match="'bn' .* written in training mode"):
            got = collect(onnxaom.Model(model(training)), images, labels,
                          batch_size=batch_size, progress=False).counts["conv"]
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ModelError, match=r"'bn' \(BatchNormalization\) runs in training mode, "
                                         r"and its batch statistics \['mean_out'\] are read"):
        collect(onnxaom.Model(model(training, read_mean=True)), images, labels,
                progress=False)


@pytest.mark.parametrize("fixed", [None, 2])
@pytest.mark.parametrize(("method", "on_device"), [("graph", False), ("graph", True),
                                                   ("plain", False)])
def test_a_failed_batch_counts_nothing(fixed: int | None, method: str, on_device: bool) -> None:
    """A batch refused part-way (a NaN in its last fixed-size chunk, a label no other batch
    has) leaves the collector as it was: a caller that skips it gets the run without it."""
    proto = zoo.chain() if fixed is None else _batch_mixing_gate(fixed)
    model = onnxaom.Model(proto)
    images, labels = data_for(proto, n=12, classes=3)
    bad_images, bad_labels = images[:6].copy(), labels[:6].copy()
    bad_images[5] = np.nan
    bad_labels[0] = 3  # a class only this batch has
    collector = onnxaom.Collector(model, method=method, accumulate_on_device=on_device)
    collector.update(images[:6], labels[:6])
    with pytest.raises(ModelError, match="NaN"):
        collector.update(bad_images, bad_labels)
    collector.update(images[6:], labels[6:])
    stats = collector.result()
    expected = collect(model, images, labels, method=method, progress=False)
    assert stats.num_classes == 3 and stats.num_samples == 12
    assert stats.metadata["batching"] == ("dynamic" if fixed is None else f"fixed:{fixed}")
    np.testing.assert_array_equal(stats.class_sizes, expected.class_sizes)
    for name in expected.layer_names:
        np.testing.assert_array_equal(stats.counts[name], expected.counts[name], err_msg=name)


def test_samples_held_back_for_a_chunk_go_with_a_batch_that_fails() -> None:
    """Chunks of 3 cut from the stream: 2 samples of the first batch wait for the next; that
    batch holds a NaN and fails, and the 2 go with it (with a warning), or they would fail
    every later batch; the collector goes on with the batches after."""
    proto = _batch_mixing_gate(3, across_chunk=True)
    model = onnxaom.Model(proto)
    images, labels = data_for(proto, n=12, classes=3)
    bad = images[5:8].copy()
    bad[0] = np.nan  # in the chunk it makes with the 2 held back
    collector = onnxaom.Collector(model)
    collector.update(images[:5], labels[:5])
    assert collector.num_samples == 5
    with pytest.warns(RuntimeWarning, match="2 sample.* held back .* dropped"), \
            pytest.raises(ModelError, match="NaN"):
        collector.update(bad, labels[5:8])
    assert collector.num_samples == 3
    collector.update(images[8:], labels[8:])
    stats = collector.result()
    kept = np.r_[0:3, 8:12]
    expected = brute_force_chunked(proto, model.layers(), images[kept], labels[kept], chunk=3)
    assert stats.num_samples == 7
    for name in stats.layer_names:
        np.testing.assert_array_equal(stats.counts[name], expected[name], err_msg=name)


def test_held_back_samples_add_their_classes_when_they_run() -> None:
    """A class seen only in held-back samples that fail with the next batch leaves no empty
    class behind; a held-back sample that fails in result()'s padded chunk is dropped (every
    later result() failed the same way)."""
    proto = _batch_mixing_gate(3, across_chunk=True)
    model = onnxaom.Model(proto)
    images, labels = data_for(proto, n=9, classes=2)
    collector = onnxaom.Collector(model)
    collector.update(images[:3], labels[:3])
    collector.update(images[3:4], np.array([2]))  # class 2: only in a held-back sample
    bad = images[4:6].copy()
    bad[0] = np.nan
    with pytest.warns(RuntimeWarning, match="held back"), pytest.raises(ModelError):
        collector.update(bad, labels[4:6])
    collector.update(images[6:9], labels[6:9])
    stats = collector.result()
    assert stats.num_classes == 2 and stats.num_samples == 6
    collector.update(images[:1], labels[:1])  # held back; fails in result()'s padded chunk
    collector.update(bad[:1], labels[:1])
    with pytest.warns(RuntimeWarning, match="last, padded chunk"), pytest.raises(ModelError):
        collector.result()
    assert collector.result().num_samples == 6


def _fixed_batch_unknown_size(fixed: int) -> onnx.ModelProto:
    """conv -> relu -> global pool -> Reshape to [fixed, -1] -> Gemm, on images of any size:
    the layers' sizes are known only by running it, and only batches of ``fixed`` run."""
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 1, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(size=(3, 4)).astype(np.float32), "wf"),
             numpy_helper.from_array(np.array([fixed, -1], np.int64), "shape")]
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c1"], name="conv1", pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("GlobalAveragePool", ["r1"], ["g"], name="gap"),
             helper.make_node("Reshape", ["g", "shape"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "wf"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(
        nodes, "fixed_unknown", [helper.make_tensor_value_info(
            "input", TensorProto.FLOAT, [fixed, 1, "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [fixed, 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_fixed_batch_with_sizes_known_only_at_run_time(capfd) -> None:
    """The layers' sizes are found on a batch of the fixed size, not on one image (which this
    graph refuses): counted in chunks, exactly, and ORT prints nothing."""
    from dataclasses import replace

    proto = _fixed_batch_unknown_size(2)
    model = onnxaom.Model(proto)
    assert model.layers()[0].shape == (4, None, None)
    images = np.random.default_rng(0).normal(size=(7, 1, 8, 8)).astype(np.float32)
    labels = np.arange(7) % 3
    stats = collect(model, images, labels, batch_size=4, progress=False)
    assert stats.metadata["batching"] == "fixed:2"
    layers = [replace(layer, shape=tuple(stats.counts[layer.name].shape[i] for i in (0, 2, 3)))
              for layer in model.layers()]
    expected = brute_force_chunked(proto, layers, images, labels, chunk=2)
    for name in stats.layer_names:
        np.testing.assert_array_equal(stats.counts[name], expected[name], err_msg=name)
    assert capfd.readouterr().err == ""


def test_a_model_that_cannot_run_to_find_its_sizes_names_the_layers(capfd) -> None:
    """A batch written into a Reshape but not on the input: the run that finds the sizes
    fails, with an onnxaom error naming the layers it was for (not ORT's exception)."""
    proto = _fixed_batch_unknown_size(3)
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    images = np.zeros((4, 1, 8, 8), np.float32)
    with pytest.raises(ModelError, match=r"batch of 1 to find the layers' sizes \(conv1\)"):
        collect(onnxaom.Model(proto), images, np.arange(4) % 2, progress=False)
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("method", ["graph", "plain"])
def test_a_tensor_read_only_in_a_nested_subgraph_keeps_its_producer(method: str) -> None:
    """conv1 -> relu -> scale, read only two If levels down, then conv2: the instrumented
    graphs keep the scale node, and conv2 counts as the brute force does."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 1, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(size=(5, 4, 3, 3)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array(True), "yes")]

    def branch(name: str, source: str) -> onnx.GraphProto:
        return helper.make_graph([helper.make_node("Identity", [source], [name + "_out"])],
                                 name, [], [helper.make_tensor_value_info(name + "_out",
                                                                          TensorProto.FLOAT, None)])

    outer_then = helper.make_graph(
        [helper.make_node("If", ["yes"], ["o_out"], then_branch=branch("inner_then", "scaled"),
                          else_branch=branch("inner_else", "r1"))],
        "outer_then", [], [helper.make_tensor_value_info("o_out", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c1"], name="conv1", pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Mul", ["r1", "two"], ["scaled"], name="scale"),
             helper.make_node("If", ["yes"], ["chosen"], name="choose", then_branch=outer_then,
                              else_branch=branch("outer_else", "r1")),
             helper.make_node("Conv", ["chosen", "w2"], ["c2"], name="conv2", pads=[1] * 4),
             helper.make_node("Relu", ["c2"], ["out"], name="relu2")]
    graph = helper.make_graph(
        nodes, "nested", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                        ["N", 1, 6, 6])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 5, 6, 6])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    model = onnxaom.Model(proto)
    images = rng.normal(size=(6, 1, 6, 6)).astype(np.float32)
    labels = np.arange(6) % 2
    stats = collect(model, images, labels, method=method, progress=False)
    expected = brute_force(proto, model.layers(), images, labels)
    for name in stats.layer_names:
        np.testing.assert_array_equal(stats.counts[name], expected[name], err_msg=name)


@pytest.mark.filterwarnings("ignore:method='graph' on probes of other types")
@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("method", ["graph", "plain"])
@pytest.mark.parametrize("elem", [TensorProto.FLOAT, TensorProto.FLOAT16])
def test_threshold_compares_exactly_not_after_rounding(method: str, elem: int) -> None:
    """Every activation is exactly the model type's value nearest 0.1 (kernel 0) or 0.3
    (kernel 1), which lie above (float32 0.1, float16 0.1 and 0.3) or below (float32 0.3) the
    real numbers: an activation counts when it is above ``threshold`` as given, the threshold
    not rounded to the model's type first (which counted none above a rounded-up 0.3)."""
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    bias = np.array([0.1, 0.3], dtype)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    inits = [numpy_helper.from_array(np.zeros((2, 1, 3, 3), dtype), "w"),
             numpy_helper.from_array(bias, "b")]
    proto = zoo.hand_built(nodes, inits, ["N", 1, 5, 5], ["N", 2, 3, 3])
    proto.graph.input[0].type.tensor_type.elem_type = elem
    proto.graph.output[0].type.tensor_type.elem_type = elem
    model = onnxaom.Model(proto)
    images, labels = np.zeros((6, 1, 5, 5), np.float32), np.arange(6) % 2
    for threshold in (0.1, 0.3, float(bias[0]), float(bias[1]), 0.2999, 0.1000001, 1e39,
                      -1e39):  # the last two beyond float32 and float16, without warnings
        stats = collect(model, images, labels, threshold=threshold, method=method,
                        progress=False)
        want = [6 * 9 if float(b) > threshold else 0 for b in bias]  # 6 images, 3 x 3
        assert stats.counts["conv"].sum(axis=(1, 2, 3)).tolist() == want, threshold


def test_threshold_in_is_exact_for_every_value_of_small_types() -> None:
    """``x > threshold_in(t, dtype)`` is ``x > t`` for every value of float16 and uint8 (an
    integer type raised OverflowError for -0.5 or 300)."""
    from onnxaom.instrument import threshold_in

    every = {np.float16: np.arange(2**16, dtype=np.uint16).view(np.float16),
             np.uint8: np.arange(256, dtype=np.uint8)}
    for dtype, values in every.items():
        values = values[np.isfinite(values.astype(np.float64))]
        exact = values.astype(np.float64)
        for t in (-0.5, 0.0, 0.1, 0.3, 254.5, 300.0, 65504.0, 1e39, -1e39):
            np.testing.assert_array_equal(values > threshold_in(t, dtype), exact > t,
                                          err_msg=f"{dtype.__name__} {t}")


def test_a_mixing_fixed_batch_model_that_keeps_the_trial_signs_is_fed_in_chunks() -> None:
    """Found by a counting fuzzer (2026-11-25): the trial of whether a fixed-batch model can run
    other batch sizes compared the counts of a few samples; a model that normalises over the
    batch (a Reshape to [1, 1, -1] before an InstanceNormalization) moved values without
    flipping those samples' signs, passed, and was counted mixed. Values are compared too."""
    f = np.float32
    inits = [numpy_helper.from_array(np.ones((1, 1, 1, 1), f), "w1"),
             numpy_helper.from_array(np.zeros(1, f), "b1"),
             numpy_helper.from_array(np.array([1, 1, -1], np.int64), "flat"),
             numpy_helper.from_array(np.ones(1, f), "s"),
             numpy_helper.from_array(np.zeros(1, f), "b"),
             numpy_helper.from_array(np.ones((1, 1, 1, 1), f), "w2"),
             numpy_helper.from_array(np.zeros(1, f), "b2")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1"),
             helper.make_node("Reshape", ["c1", "flat"], ["r"], name="to_groups"),
             helper.make_node("InstanceNormalization", ["r", "s", "b"], ["n"], name="norm"),
             helper.make_node("Shape", ["c1"], ["shp"], name="shape"),
             helper.make_node("Reshape", ["n", "shp"], ["back"], name="back"),
             helper.make_node("Conv", ["back", "w2", "b2"], ["c2"], name="conv2"),
             helper.make_node("Relu", ["c2"], ["y"], name="relu2")]
    proto = zoo.hand_built(nodes, inits, [1, 1, 2, 2], [1, 1, 2, 2], opset=13)
    images = np.array([[1, 2, 3, 4], [0, 2, 3, 5]] + [[10, 11, 12, 13], [1, 2, 3, 4]] * 4,
                      f).reshape(-1, 1, 2, 2)
    labels = np.arange(len(images)) % 2
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    y = np.concatenate([session.run(None, {"x": image[None]})[0] for image in images])
    want = np.stack([(y[labels == c] > 0).sum(0) for c in range(2)], axis=1)
    for method in ("graph", "plain"):
        stats = onnxaom.collect(onnxaom.load(proto), images, labels, method=method,
                                progress=False)
        assert stats.metadata["batching"] == "fixed:1"
        np.testing.assert_array_equal(stats.counts["conv2"], want)
