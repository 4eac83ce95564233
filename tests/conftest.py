"""Test configuration: make the tests folder importable (shared references) and seed by default."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
