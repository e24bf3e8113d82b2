"""Import a script of ``recipes/`` (not a package) as a module, for tests of its functions."""

import importlib.util
from pathlib import Path
from types import ModuleType

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def load_recipe(file_name: str) -> ModuleType:
    """``recipes/<file_name>`` executed as a module named after the file."""
    spec = importlib.util.spec_from_file_location(Path(file_name).stem, RECIPES / file_name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
