"""``python -m onnxaom``: the same command line as the ``onnxaom`` script."""

import sys

from .cli import main

sys.exit(main())
