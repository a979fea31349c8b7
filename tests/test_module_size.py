"""No Python module of the package over 600 lines (STYLE.md): a module that grows past it
splits by what its parts do."""
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "qlora_ext"
MAX_LINES = 600


def test_no_module_over_600_lines():
    sizes = {str(p.relative_to(PKG)): len(p.read_text().splitlines()) for p in PKG.rglob("*.py")}
    assert len(sizes) > 50          # the walk found the package
    over = {p: n for p, n in sizes.items() if n > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines: {over}"
