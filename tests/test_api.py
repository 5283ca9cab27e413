"""The public surface: __all__ is complete and importable; the core never imports torch."""

from __future__ import annotations

import subprocess
import sys

import onnxaom


def test_all_names_exist_and_are_sorted() -> None:
    for name in onnxaom.__all__:
        assert hasattr(onnxaom, name), name
    assert list(onnxaom.__all__) == sorted(onnxaom.__all__)


def test_every_error_derives_from_the_base() -> None:
    errors = [getattr(onnxaom, n) for n in onnxaom.__all__ if n.endswith("Error")]
    assert errors and all(issubclass(e, onnxaom.OnnxaomError) for e in errors)


def test_core_imports_without_torch() -> None:
    code = (
        "import sys, importlib; "
        "import onnxaom, onnxaom.cli, onnxaom.job, onnxaom.collect, onnxaom.findings; "
        "[importlib.import_module('onnxaom.' + m) for m in ('charts', 'report')]; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
