"""No benchmark imports another: the scripts under bench/ (bench_*.py) share code only through
the libraries beside them (bench/common.py, bench/e2e/presets.py, hf_baseline.py, roofline.py,
synthetic_gsm8k.py), so each benchmark can be read, changed or deleted alone. Read from every
file's import statements (ast), not by importing anything."""

import ast
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
SCRIPTS = {path.stem for path in BENCH.rglob("bench_*.py")}


def imported(path: Path) -> set[str]:
    """The dotted names a file's imports name: `import a.b` gives a.b; `from a.b import c`
    gives a.b and a.b.c (c may be a module); `from . import c` gives .c."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            names.add(module)
            names.update(f"{module.rstrip('.')}.{alias.name}" for alias in node.names)
    return names


def test_no_file_under_bench_imports_a_benchmark():
    assert {"bench_decode", "bench_ops", "bench_e2e"} <= SCRIPTS
    assert "bench.common" in imported(BENCH / "e2e" / "bench_prefill.py")  # the check sees imports
    offenders = {str(path.relative_to(BENCH)): sorted(hits)
                 for path in sorted(BENCH.rglob("*.py"))
                 if (hits := {n for n in imported(path) if n.rsplit(".", 1)[-1] in SCRIPTS})}
    assert offenders == {}
