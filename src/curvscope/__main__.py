"""``python -m curvscope``: the same as the ``curvscope`` command."""

import sys

from .cli import main

sys.exit(main())
