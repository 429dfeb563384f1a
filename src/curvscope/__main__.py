"""``python -m curvscope``: the same as the ``curvscope`` command."""

import sys

from .program import main

sys.exit(main())
