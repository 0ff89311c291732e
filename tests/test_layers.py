"""Issue "A house others copy": every module sits on one floor and imports only from its floor or below
(function-level imports included); configuration and the CLI's start-up load no torch."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "src" / "scalevec"

# floor of each module (a package's name covers the modules in it unless listed themselves)
# export/__init__ holds ExportError only, so the package itself sits on the bottom floor
FLOORS = {
    "_version": 0, "errors": 0, "outputs": 0, "config": 0, "strategy": 0, "hf_keys": 0, "export": 0,
    "scales": 1, "rope": 1, "kernels": 1,
    "projection": 2, "model": 2, "moe": 2, "summary": 2,
    "optim": 3, "schedule": 3, "data": 3, "dist": 3,
    "rundir": 4, "checkpoint": 4,
    "train": 5,
    "export.fold": 6, "export.remote": 6, "convert": 6, "export.hf": 6, "hf_import": 6, "apply": 6, "generate": 6,
    "evaluate": 6,
    "experiments": 7, "bench": 7, "theory": 7,
    "cli": 8, "__main__": 8, "": 8,  # "" is the package's __init__, which loads names lazily
}


def floor(module: str) -> int:
    parts = module.split(".")
    for end in range(len(parts), -1, -1):
        if ".".join(parts[:end]) in FLOORS:
            return FLOORS[".".join(parts[:end])]
    raise KeyError(f"module scalevec.{module} has no floor; add it to FLOORS")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, name: str) -> set[str]:
    """scalevec modules `path` imports anywhere (module level or inside functions)."""
    parts = name.split(".") if name else []
    package = parts if path.name == "__init__.py" else parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            for alias in node.names:  # `from . import x` may name a module
                candidate = ".".join([*base, alias.name]).strip(".")
                found.add(candidate if (PACKAGE / Path(*candidate.split("."))).with_suffix(".py").exists()
                          else ".".join(base))
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found |= {n.removeprefix("scalevec.") for n in names if n == "scalevec" or n.startswith("scalevec.")}
    return {m for m in found if m != name}


def test_no_module_imports_from_a_higher_floor():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        for target in imported(path, name):
            if floor(target) > floor(name):
                upward.append(f"scalevec.{name} (floor {floor(name)}) imports scalevec.{target} "
                              f"(floor {floor(target)})")
    assert not upward, upward


def test_the_floor_check_sees_relative_and_lazy_imports(tmp_path):
    assert {"config", "strategy", "_version"} <= imported(PACKAGE / "__init__.py", "")
    assert {"config", "outputs"} <= imported(PACKAGE / "rundir.py", "rundir")
    assert "export" in imported(PACKAGE / "export" / "hf.py", "export.hf")


def _loads_torch(code: str) -> bool:
    result = subprocess.run([sys.executable, "-c", f"import sys\n{code}\nprint('torch' in sys.modules)"],
                            capture_output=True, text=True, check=True)
    return result.stdout.strip().splitlines()[-1] == "True"


def test_configuration_and_help_load_no_torch():
    assert not _loads_torch("import scalevec.config")
    assert not _loads_torch("import scalevec; scalevec.load_config(None)")
    assert not _loads_torch("from scalevec.cli import build_parser; build_parser().format_help()")
    assert not _loads_torch("from scalevec.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass")
    assert _loads_torch("import scalevec; scalevec.Decoder")  # the model side still loads on use
