"""The op registry: per op, how layer channels flow through it and how it changes with them.

Each :class:`Handler` answers three questions for the ops it is registered for:

* ``trace``: given the :class:`~onnxaom.surgery.channels.Flow` of each input (None where an
  input carries no layer channels), the flows of the outputs; raise
  :class:`~onnxaom.surgery.channels.Unsupported` where the op does something with the
  channels that the surgery cannot follow (the channels are then blocked, never edited);
* ``apply``: given the :class:`~onnxaom.surgery.channels.Change` of each input and output,
  rewrite the node's constants and attributes (out-channel side for layers, in-channel side for
  consumers, per-channel parameters for everything in between);
* ``zero_reason`` / ``zero_state``: for removal after a layer's probe point, what the op
  makes of zeroed channels: zero, a constant per channel (a Sigmoid, a BN shift, an added
  constant; :class:`~onnxaom.surgery.channels.Constant`), or something else (why);
* ``fold_constant``: for layers reading such constants, taking them into the bias (a conv
  without padding, a Gemm); where a layer cannot, or reads anything else, the surgery refuses,
  because removing the channels would not equal zeroing them.

Supported: layers (Conv, including grouped and depthwise; Gemm; MatMul with a constant weight)
on both sides; element-wise activations, Identity, Dropout, Cast, Clip, PRelu; BatchNormalization;
Add/Sub/Mul/Div/Max/Min/Pow/Sum/Mean with constants, with another layer's tensor (coupling), or
with a tensor broadcast over channels; pools (Max/Average/Lp, global ones); Pad and Resize that
leave the channel axis alone; Concat; Flatten and Reshape (channel-major flattening, trailing
dims merged, (N, F) -> (N, F, 1, 1); the target a constant or ``Concat`` of constants and
sizes of tensors, PyTorch's legacy export of ``x.view(x.size(0), -1)`` or ``view(b, c, 1,
1)``); Shape and Size (computed
at run time, no channels in their output); Reduce* over other axes; Squeeze, Unsqueeze,
Transpose; Slice and Split along other axes. Everything else blocks the channels it reads.
A channels-last flatten (Transpose to NHWC, then Flatten or Reshape to (N, H*W*C), as Keras
models exported by tf2onnx have before their dense head) interleaves the channels: a flow's
segments then repeat once per position (:attr:`~onnxaom.surgery.channels.Flow.outer`).

The handlers live in one module per family: :mod:`.elementwise`, :mod:`.spatial`,
:mod:`.layout` (with :mod:`.sizes`, sizes computed in the graph) and :mod:`.layers`; the
registry, the :class:`Handler` interface and the helpers they share in :mod:`.base`. Importing
this package registers them all.
"""

from __future__ import annotations

from . import elementwise, layout, spatial  # noqa: F401 (registers their handlers)
from .base import HANDLERS, LAYER_HANDLERS, Handler, handler_for, layer_handler_for, register
from .layers import conv_weight, integer_storage, layer_weight

__all__ = ["HANDLERS", "LAYER_HANDLERS", "Handler", "conv_weight", "handler_for",
           "integer_storage", "layer_handler_for", "layer_weight", "register"]
