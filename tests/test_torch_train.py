"""freeze / retrain / evaluate: frozen layers really stay, seeded runs repeat, per-class
accuracy on a tiny data set is what counting gives."""

from __future__ import annotations

import math

import numpy as np
import pytest

import onnxaom
from onnxaom.errors import DataError, LayerNotFoundError

torch = pytest.importorskip("torch")
architectures = pytest.importorskip("onnxaom_torch.architectures")
train = pytest.importorskip("onnxaom_torch.train")
torch_zoo = pytest.importorskip("tests.torch_zoo")


@pytest.fixture(scope="module")
def digits():
    data = onnxaom.load_digits()
    small, _ = data.split(0.15, seed=1)  # ~270 images, every class
    return small


def test_freeze_turns_off_gradients_of_the_named_modules():
    module = architectures.PaperMNISTNet(image_size=8, conv_kernels=(4, 4), hidden=8)
    frozen = train.freeze(module, ["conv1", "fc2"])
    assert frozen == ("conv1.weight", "conv1.bias", "fc2.weight", "fc2.bias")
    assert not module.conv1.weight.requires_grad and module.conv2.weight.requires_grad
    with pytest.raises(LayerNotFoundError, match="no module 'conv9'.*conv1"):
        train.freeze(module, ["conv9"])
    with pytest.raises(LayerNotFoundError, match="no module 'conv1.weight'"):
        train.freeze(module, ["conv1.weight"])  # a parameter, not a module
    with pytest.raises(LayerNotFoundError, match="no module 'conv9'"):
        train.freeze(module, ["conv2", "conv9"])
    assert module.conv2.weight.requires_grad  # all names found, or nothing frozen
    every = [name for name, _ in module.named_parameters()]
    assert train.freeze(module, [""]) == tuple(every)  # the module itself: it used to be none
    fresh = architectures.PaperMNISTNet(image_size=8, conv_kernels=(4, 4), hidden=8)
    fresh.features = fresh.conv2  # one module under a second name: either name freezes it
    assert train.freeze(fresh, ["features"]) == ("conv2.weight", "conv2.bias")
    # one name as a bare string is that name, not its letters (API review, 2026-11-25)
    other = architectures.PaperMNISTNet(image_size=8, conv_kernels=(4, 4), hidden=8)
    assert train.freeze(other, "conv1") == ("conv1.weight", "conv1.bias")


def test_argument_errors_are_the_librarys_own(digits):
    """They were plain ValueErrors, where the README promises OnnxaomError for every error
    raised on purpose; and evaluate(batch_size=0) divided by zero."""
    module = architectures.PaperMNISTNet(image_size=8, conv_kernels=(4, 4), hidden=8)
    for call in (lambda: train.retrain(module, digits, epochs=-1),
                 lambda: train.retrain(module, digits, optimizer="rmsprop"),
                 lambda: train.evaluate(module, digits, batch_size=0),
                 lambda: train.evaluate(module, digits, device="tpu"),
                 lambda: architectures.PaperMNISTNet(image_size=4)):
        with pytest.raises(onnxaom.ArgumentError):
            call()
    result = train.retrain(module, digits, epochs=1, frozen="conv1", progress=False)
    assert result.frozen == ("conv1.weight", "conv1.bias")


def test_frozen_layers_and_their_batch_norm_do_not_change_the_rest_does(digits):
    module = torch_zoo.reinit(architectures.PaperCIFARNet(
        in_channels=1, image_size=8, width=4, hidden=8, batch_norm=True), 0)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    result = train.retrain(module, digits, 1, frozen=["conv1", "bn1"], batch_size=32,
                           progress=False, device="cpu")
    after = result.module.state_dict()
    for key in ("conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean",
                "bn1.running_var"):
        assert torch.equal(after[key], before[key]), key
    for key in ("conv2.weight", "bn2.running_mean", "fc1.weight", "fc2.bias"):
        assert not torch.equal(after[key], before[key]), key
    assert "conv1.weight" in result.frozen and "conv1.weight" not in result.trained
    for key, value in module.state_dict().items():  # the input module is not trained
        assert torch.equal(value, before[key]), key
    assert len(result.losses) == 1 and result.device == "cpu"


def test_seeded_retraining_repeats_and_another_seed_differs(digits):
    module = architectures.PaperMNISTNet(image_size=8, conv_kernels=(4, 4), hidden=8)
    runs = [train.retrain(module, digits, 2, seed=s, batch_size=32, progress=False,
                          device="cpu") for s in (3, 3, 4)]
    a, b, c = (r.module.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert runs[0].losses == runs[1].losses
    assert not all(torch.equal(a[k], c[k]) for k in a)
    state = torch.get_rng_state()
    train.retrain(module, digits, 1, seed=9, progress=False, device="cpu")
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone


def test_retrain_takes_arrays_and_batches_and_zero_epochs():
    module = architectures.PaperMNISTNet(image_size=8, conv_kernels=(2, 2), hidden=4)
    x = np.random.default_rng(0).random((20, 1, 8, 8)).astype(np.float32)
    y = np.arange(20) % 10
    unchanged = train.retrain(module, (x, y), 0, progress=False, device="cpu")
    assert unchanged.losses == ()
    assert all(torch.equal(v, module.state_dict()[k])
               for k, v in unchanged.module.state_dict().items())
    batches = [(torch.from_numpy(x[:10]), torch.from_numpy(y[:10])),
               (torch.from_numpy(x[10:]), torch.from_numpy(y[10:]))]
    assert len(train.retrain(module, batches, 1, progress=False, device="cpu").losses) == 1
    with pytest.raises(ValueError, match="epochs"):
        train.retrain(module, (x, y), -1)
    with pytest.raises(DataError, match="labels must have shape"):
        train.retrain(module, (x, y[:3]), 1, progress=False)


class Fixed(torch.nn.Module):
    """Predicts the class written in the first pixel of each image."""

    def forward(self, x):
        return torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), 4).float()


def test_evaluate_counts_per_class():
    labels = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2])
    predicted = np.array([0, 1, 1, 1, 0, 2, 2, 2, 3])
    x = np.zeros((9, 1, 2, 2), dtype=np.float32)
    x[:, 0, 0, 0] = predicted
    result = train.evaluate(Fixed(), (x, labels), batch_size=4, device="cpu")
    assert result.n == 9 and math.isclose(result.accuracy, 6 / 9)
    assert result.per_class[:3] == (0.5, 2 / 3, 0.75) and math.isnan(result.per_class[3])
    assert result.class_counts == (2, 3, 4, 0)
    assert result.confusion[2, 3] == 1 and result.confusion.sum() == 9
    assert result.to_dict()["per_class"][3] is None
    with pytest.raises(DataError, match="labels must lie in 0..3"):
        train.evaluate(Fixed(), (x, labels + 2), device="cpu")
    wide = train.evaluate(Fixed(), (x, labels), device="cpu", num_classes=6)
    assert wide.confusion.shape == (6, 6) and math.isclose(wide.accuracy, 6 / 9)
    with pytest.raises(DataError, match=r"num_classes=3 is below the model's output width \(4"):
        train.evaluate(Fixed(), (x, labels), device="cpu", num_classes=3)  # class 3 predicted
    for bad in (5.0, "7", True, 0):
        with pytest.raises(DataError, match="num_classes must be a positive integer"):
            train.evaluate(Fixed(), (x, labels), device="cpu", num_classes=bad)


def test_labels_and_image_sizes_that_do_not_fit_the_module_are_data_errors():
    module = architectures.PaperMNISTNet(image_size=8, conv_kernels=(2, 2), hidden=4)
    x = np.random.default_rng(0).random((12, 1, 8, 8)).astype(np.float32)
    for run in (lambda d: train.retrain(module, d, 1, progress=False, device="cpu"),
                lambda d: train.evaluate(module, d, device="cpu")):
        with pytest.raises(DataError, match=r"labels must lie in 0\.\.9.*got 20\.\.31"):
            run((x, np.arange(12) + 20))
        with pytest.raises(DataError, match=r"cannot run a batch of shape \(12, 1, 10, 10\)"):
            run((np.zeros((12, 1, 10, 10), np.float32), np.arange(12) % 10))
        # batches as a DataLoader of a TensorDataset yields them: (B, 1) labels used to
        # broadcast in the confusion matrix (an accuracy of 242%), float ones to be truncated
        images = torch.from_numpy(x)
        for labels, message in ((torch.arange(12)[:, None] % 10, r"batch 0: labels must "
                                 r"have shape \(6,\), got \(6, 1\)"),
                                (torch.full((12,), 0.7), r"batch 0: labels must be integers"),
                                (torch.arange(12) % 10, r"batch 0: images must have shape")):
            batch_images = images if "images" not in message else images[:, 0]
            batches = [(batch_images[:6], labels[:6]), (batch_images[6:], labels[6:])]
            with pytest.raises(DataError, match=message):
                run(batches)


def test_uint8_images_are_seen_in_0_1_as_by_collect(digits):
    """The same pixels as uint8 (0..255) and as floats in [0, 1] give the same evaluation and
    the same retraining, in pairs and in batches."""
    net = architectures.PaperMNISTNet(image_size=8, conv_kernels=(4, 4), hidden=8)
    as_float = np.round(np.array(digits.images) * 255) / 255
    as_uint8 = np.round(np.array(digits.images) * 255).astype(np.uint8)
    labels = np.array(digits.labels)
    a = train.evaluate(net, (as_float.astype(np.float32), labels), device="cpu")
    b = train.evaluate(net, (as_uint8, labels), device="cpu")
    c = train.evaluate(net, [(as_uint8, labels)], device="cpu")
    assert a.accuracy == b.accuracy == c.accuracy and a.per_class == b.per_class
    ra = train.retrain(net, (as_float.astype(np.float32), labels), 1, seed=0, device="cpu",
                       progress=False).module
    rb = train.retrain(net, (as_uint8, labels), 1, seed=0, device="cpu", progress=False).module
    for pa, pb in zip(ra.parameters(), rb.parameters(), strict=True):
        torch.testing.assert_close(pa, pb)
