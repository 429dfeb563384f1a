"""Set-up of the model-zoo suite: ``from zoo_models import ...`` and ``from zoo_check import ...``
work from every test file here, whatever pytest's import mode (tests/ itself is put on the path
by tests/conftest.py)."""

import sys
from pathlib import Path

ZOO = str(Path(__file__).resolve().parent)
if ZOO not in sys.path:
    sys.path.insert(0, ZOO)
