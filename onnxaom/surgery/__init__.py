"""Graph surgery on ONNX models: remove kernels, widen a layer, insert a layer.

Layout (one concern per module, arrows one way):

* :mod:`.channels`: the channel dependency graph (flows, slots, coupled groups), plans and the
  rewrite driver;
* :mod:`.ops`: the op registry, out-/in-channel rules per op;
* :mod:`.remove`, :mod:`.widen`, :mod:`.deepen`: one edit kind each;
* :mod:`.gsio`: onnx <-> onnx-graphsurgeon conversion and constants;
* :mod:`.apply`: :func:`apply`, the pure entry point, with its post-conditions.
"""

from __future__ import annotations

from .apply import METADATA_KEY, STEPS_KEY, apply, plan_removal, remove_kernels
from .remove import RemovalPlan

__all__ = ["METADATA_KEY", "STEPS_KEY", "RemovalPlan", "apply", "plan_removal",
           "remove_kernels"]
