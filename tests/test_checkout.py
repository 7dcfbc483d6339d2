"""The tests test the code beside them: the project's packages are imported from this checkout.

The package is installed editable from one checkout; a copy or another worktree run with the same venv
must still import its own packages (pytest puts the checkout first on sys.path), or its tests would
silently check other code (`.ci/no-shared` relies on this).
"""

from pathlib import Path

import calibration
import pipeline
import targets

ROOT = Path(__file__).resolve().parents[1]


def test_packages_come_from_this_checkout():
    for module in (pipeline, calibration, targets):
        assert Path(module.__file__).resolve().parent == ROOT / module.__name__, module.__name__
