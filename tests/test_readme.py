"""The README's module usage example runs as written."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_module_example_runs():
    text = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    example = [b for b in blocks if "vq_jax.VQModel(" in b]
    assert len(example) == 1, "README must hold exactly one VQModel usage example"
    exec(compile(example[0], "README.md", "exec"), {})
