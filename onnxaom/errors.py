"""The one exception hierarchy of onnxaom.

Every error the library raises on purpose derives from :class:`OnnxaomError`. Each subclass
also inherits the builtin it matches, so ``except ValueError`` keeps working::

    OnnxaomError (Exception)
    ├── ModelError (ValueError)         not ONNX, no Conv, unsupported graph, NaN activations
    │   └── onnxaom_torch.ModuleMismatchError   a torch module that does not match the ONNX model
    ├── LayerNotFoundError (KeyError)   a layer name the model does not have
    ├── DataError (ValueError)          images/labels of wrong shape, dtype, length, range; no data
    ├── ModelFileNotFoundError (FileNotFoundError)   a model or data path that does not exist
    ├── StatsError (ValueError)         merging incompatible statistics, corrupt stats file
    ├── EditError (ValueError)          a graph edit that cannot be applied (names node/layer)
    ├── ReportError (ValueError)        a chart or report that cannot be made as asked
    ├── SessionError (ValueError)       a tuning-session folder that is corrupt, half-written or
    │                                   does not match (names the file or step)
    ├── OutputError (OSError)           an output that cannot be written: read-only folder, a
    │                                   folder in its place, one of the command's own inputs
    │                                   (a missing output folder is a ModelFileNotFoundError;
    │                                   an output on the source model's files a ModelError)
    ├── ArgumentError (ValueError)      an argument of the wrong kind or out of range (names it)
    └── ProviderError (RuntimeError)    an execution provider asked for that cannot load

Messages name the node, layer, file or argument at fault and, where possible, the fix.
"""

from __future__ import annotations

__all__ = [
    "ArgumentError",
    "DataError",
    "EditError",
    "LayerNotFoundError",
    "ModelError",
    "ModelFileNotFoundError",
    "OnnxaomError",
    "OutputError",
    "ProviderError",
    "ReportError",
    "SessionError",
    "StatsError",
]


class OnnxaomError(Exception):
    """Base of every error onnxaom raises on purpose."""


class ModelError(OnnxaomError, ValueError):
    """The ONNX model cannot be used as asked (names the file, node or layer)."""


class LayerNotFoundError(OnnxaomError, KeyError):
    """A layer name that the model does not have."""

    def __str__(self) -> str:  # KeyError would repr() the message; keep it readable
        return str(self.args[0]) if self.args else ""


class DataError(OnnxaomError, ValueError):
    """Images or labels that cannot be used (names the argument or file)."""


class ModelFileNotFoundError(OnnxaomError, FileNotFoundError):
    """A path given by the user that does not exist."""


class StatsError(OnnxaomError, ValueError):
    """Occurrence statistics that cannot be merged, loaded or queried."""


class EditError(OnnxaomError, ValueError):
    """A graph edit that cannot be applied; names the node, op or layer at fault."""


class ProviderError(OnnxaomError, RuntimeError):
    """An execution provider requested explicitly that does not load on this machine."""


class ReportError(OnnxaomError, ValueError):
    """A chart, report or rendering that cannot be made as asked (names the argument or file)."""


class SessionError(OnnxaomError, ValueError):
    """A tuning session folder that cannot be used (names the file or step at fault)."""


class ArgumentError(OnnxaomError, ValueError):
    """An argument of the wrong kind or out of range, where no more specific error applies
    (names the argument and what it takes)."""


class OutputError(OnnxaomError, OSError):
    """An output file that cannot be written: a read-only or missing folder, a folder where a
    file should go, or one of the inputs of the same command (names the path)."""


#: How to get the torch adapter, for the errors that need it. A plain ``pip install torch``
#: on a machine without a GPU pulls the multi-GB CUDA build; the setup script takes the CPU one.
TORCH_INSTALL = ("in a source checkout `bash scripts/setup.sh dev` (torch's CPU build where no "
                 "NVIDIA GPU is); else pip install 'onnxaom[torch]' (with "
                 "--extra-index-url https://download.pytorch.org/whl/cpu on a machine without "
                 "a GPU)")
