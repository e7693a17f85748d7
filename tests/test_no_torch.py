"""runtime/ must run where torch does not exist (a Jetson with only numpy, onnxruntime and TensorRT).

Two checks: every module under runtime/ is imported in a fresh interpreter whose import system refuses torch and
torchvision (so a module that needs them fails, whichever way it reaches them); and every source file is parsed so
that a torch import hidden inside a function, which importing alone would not run, is found too.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("torch", "torchvision")

# Runs in the subprocess: block torch, import every runtime module, report as JSON on the last line of stdout.
_PROBE = r"""
import importlib, importlib.abc, json, pathlib, sys, traceback
FORBIDDEN = set(sys.argv[1].split(","))
ROOT = sys.argv[2]
attempts = []

class BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in FORBIDDEN:
            # Who asked: the innermost frame outside the import machinery.
            frames = [f for f in traceback.extract_stack()[:-1] if "importlib" not in f.filename]
            attempts.append({"module": name, "from": f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"})
            raise ImportError(f"{name} is forbidden under runtime/ (torch-free layer)")
        return None

sys.meta_path.insert(0, BlockTorch())
sys.path.insert(0, ROOT)
# Walk the files, not pkgutil: a folder without __init__.py (namespace package) must be checked too.
root = pathlib.Path(ROOT)
modules, failures = [], {}
for path in sorted((root / "runtime").rglob("*.py")):
    parts = path.relative_to(root).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    modules.append(name)
    try:
        importlib.import_module(name)
    except BaseException:  # a module may even call sys.exit at import time; report it, keep walking
        failures[name] = traceback.format_exc(limit=3)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)
try:
    import torch
    blocked = False
except ImportError:
    blocked = True
print(json.dumps({"modules": modules, "failures": failures, "attempts": attempts, "loaded": loaded,
                  "blocked": blocked}))
"""


def test_runtime_imports_without_torch():
    proc = subprocess.run([sys.executable, "-c", _PROBE, ",".join(FORBIDDEN), str(ROOT)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["blocked"], "the import blocker did not work"
    mine = {"runtime.preprocess", "runtime.postprocess", "runtime.manifest", "runtime.metrics"}
    assert mine <= set(report["modules"])
    runtime_dir = str(ROOT / "runtime")
    # Optional torch imports inside third-party libraries (try/except ImportError) are their business; a request
    # made by runtime code, a module that fails to import, or torch ending up loaded are ours.
    ours = [a for a in report["attempts"] if a["from"].startswith(runtime_dir)]
    assert not ours, f"runtime code imports torch: {ours}"
    assert not report["failures"], "runtime modules that fail to import without torch:\n" + "\n".join(
        f"{name}:\n{tb}" for name, tb in report["failures"].items())
    assert report["loaded"] == [], f"torch modules loaded: {report['loaded']}"


def _torch_imports(path: Path) -> list[str]:
    """'file:line' of every import of a forbidden package anywhere in a source file, including inside functions."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in
              ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)):
            names = [str(node.args[0].value)]
        found += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    return found


def test_runtime_sources_never_import_torch():
    sources = sorted((ROOT / "runtime").rglob("*.py"))
    assert sources
    found = [hit for path in sources for hit in _torch_imports(path)]
    assert not found, f"torch imported in runtime/: {found}"


def test_checker_catches_a_torch_import(tmp_path, monkeypatch):
    """The static check is not vacuous: it sees imports nested in functions and importlib calls."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    import torch.nn\n    from torchvision import ops\n"
                   "    return __import__('torch')\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert len(_torch_imports(bad)) == 3


def test_runtime_parses_as_python_3_10():
    """JetPack 6 ships Python 3.10 (its TensorRT bindings are built for it): runtime/ must not use newer syntax."""
    bad = []
    for path in sorted((ROOT / "runtime").rglob("*.py")):
        try:
            ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=(3, 10))
        except SyntaxError as exc:
            bad.append(f"{path.relative_to(ROOT)}:{exc.lineno}: {exc.msg}")
    assert not bad, bad
