"""The package's rooms and doors (docs/architecture.md, "Modules"): no module imports a private
module or a private name of another package, and lower rooms never import higher ones.

A "package" here is a top-level unit of ``scatac_dist``: a subpackage (``pp``, ``tl``,
``models``, ...) or a top-level module (``store``, ``cluster``, ...). ``_config``, ``errors``
and ``progress`` (the one progress-bar style) are shared by everything on purpose.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "scatac_dist"
SHARED = {"_config", "errors", "progress"}

# Which rooms each room may import (besides itself and SHARED); the order of GUIDE.md section 3.
ALLOWED = {
    "ops": set(),
    "blocks": {"ops"},
    "lock": set(),
    "store": {"lock"},
    "cluster": set(),
    "io": {"ops", "blocks", "lock", "store", "cluster"},
    "calibrated": {"ops", "blocks", "store", "io", "cluster"},
    "datasets": {"ops", "blocks", "store", "io", "cluster", "calibrated"},
    "pp": {"ops", "blocks", "store", "cluster"},
    "tl": {"ops", "blocks", "store", "cluster", "pp"},
    "modules": set(),
    "train": {"ops", "blocks", "store", "modules"},
    "pl": {"store"},
    "models": {"ops", "blocks", "lock", "store", "io", "pp", "tl", "modules", "train", "cluster"},
    "pipeline": {"ops", "blocks", "lock", "store", "io", "pp", "tl", "cluster", "pl"},
    "demo": {"ops", "blocks", "store", "io", "pp", "tl", "models", "cluster", "datasets", "pipeline", "pl"},
    "cli": {"ops", "blocks", "lock", "store", "io", "pp", "tl", "models", "modules", "train", "cluster", "datasets",
            "calibrated",
            "pipeline", "pl", "demo"},
    "__init__": None,  # the package root re-exports the public API
}


def _room(module: str) -> str:
    """Top-level unit of a dotted module path inside scatac_dist ('pp', 'store', ...)."""
    return module.split(".")[0]


def _imports(path: Path, root: Path = ROOT):
    """(line, target module relative to scatac_dist, imported names) for every import of ours."""
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    pkg = parts[:-1]  # the package a relative import starts from (also for an __init__)
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - (node.level - 1)] if node.level > 1 else pkg
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("scatac_dist"):
                target = node.module[len("scatac_dist"):].lstrip(".")
            else:
                continue
            names = [a.name for a in node.names]
            if not node.module and node.level:  # "from . import x" / "from .. import ops"
                for n in names:
                    yield node.lineno, ".".join(filter(None, [target, n])), []
            else:
                yield node.lineno, target, names
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("scatac_dist."):
                    yield node.lineno, a.name[len("scatac_dist."):], []


def _files(root: Path = ROOT):
    return sorted(p for p in root.rglob("*.py"))


def _violations(root: Path = ROOT):
    bad = []
    for path in _files(root):
        src_room = _room(".".join(path.relative_to(root).with_suffix("").parts))
        for line, target, names in _imports(path, root):
            if not target:  # "from .. import x" at the package root resolves above; handled per name
                continue
            dst_room = _room(target)
            if dst_room == src_room or dst_room in SHARED:
                continue
            private = [p for p in target.split(".") if p.startswith("_")]
            private += [n for n in names if n.startswith("_")]
            where = f"{path.relative_to(root.parent)}:{line}"
            if private:
                bad.append(f"{where}: imports private {', '.join(private)} from {target}")
            allowed = ALLOWED.get(src_room, set())
            if allowed is not None and dst_room not in allowed:
                bad.append(f"{where}: room '{src_room}' imports higher or unrelated room '{dst_room}' ({target})")
    return bad


def test_every_room_is_known():
    rooms = {_room(".".join(p.relative_to(ROOT).with_suffix("").parts)) for p in _files()}
    assert rooms - set(ALLOWED) - SHARED == set(), "add the new module to ALLOWED (and docs/architecture.md)"


def test_no_private_imports_across_packages_and_no_upward_imports():
    bad = _violations()
    assert not bad, "\n".join(bad)


def test_the_check_catches_a_private_import(tmp_path):
    """The check itself can fail: a module that reaches into another package's private name is reported."""
    fake = tmp_path / "scatac_dist"
    (fake / "models").mkdir(parents=True)
    (fake / "pp").mkdir()
    (fake / "models" / "bad.py").write_text("from ..pp._views import view\nfrom ..store import _replace_dir\n")
    (fake / "pp" / "ok.py").write_text("from ._views import view\n")
    (fake / "pp" / "up.py").write_text("from ..models import SCALE\n")
    got = _violations(fake)
    assert any("models/bad.py:1: imports private _views" in b for b in got), got
    assert any("models/bad.py:2: imports private _replace_dir" in b for b in got), got
    assert any("pp/up.py:1: room 'pp' imports higher" in b for b in got), got
    assert not any("pp/ok.py" in b for b in got), got
