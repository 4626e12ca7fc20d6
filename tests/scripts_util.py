"""Import a file under scripts/ as a module, for tests of the converters' functions."""

import importlib.util
import pathlib
import types

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_script(name: str) -> types.ModuleType:
    """scripts/<name>.py as a module named `name` (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
