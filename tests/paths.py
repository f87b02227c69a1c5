"""Where things are, for tests in any sub-folder: the repository root and tests/data."""
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
DATA = TESTS / "data"
