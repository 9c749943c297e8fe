"""The layout's rules, read from the source: components never import recipes or experiments, and
a loss's traits live in its LossSpec only."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import prefopt

SRC = Path(prefopt.__file__).parent
TOP_LEVEL = ("prefopt.recipes", "prefopt.experiments", "prefopt.cli", "prefopt.__main__")  # jobs and entry points


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every prefopt module `path` imports, at any depth (top of module or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("prefopt")}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (use prefopt.…)"
            if node.module and node.module.startswith("prefopt"):
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def is_job(module: str) -> bool:
    return any(module == top or module.startswith(top + ".") for top in TOP_LEVEL)


def test_components_never_import_recipes_or_experiments():
    offending = []
    for path in sorted(SRC.rglob("*.py")):
        module = module_name(path)
        if is_job(module):
            continue
        offending += [f"{module} imports {name}" for name in sorted(imports_of(path)) if is_job(name)]
    assert not offending, offending


def test_the_rule_sees_an_offence(tmp_path):
    """The check above can fail: a component importing the recipe is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from prefopt.recipes.train import train\n")
    assert any(is_job(name) for name in imports_of(bad))


def test_loss_traits_live_in_the_loss_spec():
    """No list of loss names outside prefopt.losses decides what a loss needs or how its reward
    is formed (the old KL_BASELINE_LOSSES, _NOT_PER_PAIR, PER_TOKEN_LOSSES)."""
    out = subprocess.run(
        ["grep", "-rnE", "KL_BASELINE_LOSSES|_NOT_PER_PAIR|PER_TOKEN_LOSSES", str(SRC)], capture_output=True, text=True
    )
    assert out.stdout == ""
