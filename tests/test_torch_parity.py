"""Parity with PyTorch forward hooks on the same weights, through both torch exporters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import onnxaom
from onnxaom.collect import collect

torch = pytest.importorskip("torch")
architectures = pytest.importorskip("onnxaom_torch.architectures")


def hooked_counts(module, images: np.ndarray, labels: np.ndarray, names: list[str], classes: int):
    """What a user would write: forward hooks on the ReLU modules, counted per class."""
    seen: dict[str, list[np.ndarray]] = {n: [] for n in names}
    handles = [
        getattr(module, n).register_forward_hook(
            lambda _m, _i, out, n=n: seen[n].append((out > 0).cpu().numpy())
        )
        for n in names
    ]
    with torch.no_grad():
        for start in range(0, len(images), 16):
            module(torch.from_numpy(images[start : start + 16]))
    for h in handles:
        h.remove()
    counts = {}
    for n in names:
        positive = np.concatenate(seen[n])
        if positive.ndim == 2:
            positive = positive[:, :, None, None]
        counts[n] = np.stack([positive[labels == c].sum(axis=0) for c in range(classes)], axis=1)
    return counts


def make_module(seed: int):
    torch.manual_seed(seed)
    module = architectures.PaperCIFARNet(
        in_channels=3, image_size=16, width=8, hidden=16, batch_norm=True
    )
    for i in range(1, 7):  # non-trivial BN statistics, so BN really matters
        bn = getattr(module, f"bn{i}")
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.3, 0.3)
    return module.eval()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("exporter", "external", "dynamic"),
    [("legacy", False, True), ("dynamo", True, True), ("dynamo", False, False)],
)
def test_counts_match_torch_hooks(
    tmp_path: Path, exporter: str, external: bool, dynamic: bool
) -> None:
    module = make_module(seed=3)
    path = architectures.export_onnx(
        module,
        tmp_path / "m.onnx",
        exporter=exporter,
        input_shape=(1, 3, 16, 16),
        external_data=external,
        dynamic_batch=dynamic,
    )
    if external:
        assert (tmp_path / "m.onnx.data").exists()
    model = onnxaom.load(path)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(45, 3, 16, 16)).astype(np.float32)
    labels = (np.arange(45) % 3).astype(np.int64)
    stats = collect(model, images, labels, batch_size=16, progress=False)
    relus = [f"relu{i}" for i in range(1, 8)]
    expected = hooked_counts(module, images, labels, relus, 3)
    convs = [x for x in model.layers() if x.op == "Conv"]
    dense = [x for x in model.layers() if x.op != "Conv"]
    assert len(convs) == 6
    for layer, relu in zip([*convs, dense[0]], relus, strict=True):
        np.testing.assert_array_equal(stats.counts[layer.name], expected[relu], err_msg=layer.name)
    if not dynamic:  # dynamo bakes batch 1 into the flatten Reshape: fed in chunks of 1
        assert stats.metadata["batching"] == "fixed:1"
