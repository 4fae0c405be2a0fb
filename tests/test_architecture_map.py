"""docs/ARCHITECTURE.md's module tree and the code agree: every module is on the map, and
every file on the map exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tqedge", "exporters", "runtime")


def _map_files() -> set[str]:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    block = text.split("## Modules", 1)[1].split("```", 2)[1]
    stack: list[tuple[int, str]] = []
    files = set()
    for line in block.splitlines():
        m = re.match(r"^( *)(\S+)", line)
        if not m:
            continue
        indent, name = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if name.endswith("/"):
            stack.append((indent, name))
        elif name.endswith(".py"):
            files.add("".join(d for _, d in stack) + name)
    return {f for f in files if f.split("/")[0] in PACKAGES}


def _code_files() -> set[str]:
    return {p.relative_to(ROOT).as_posix() for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
            if p.name != "__init__.py"}


def test_every_module_is_on_the_map():
    assert len(_map_files()) > 40  # the parser really reads the tree
    assert _code_files() - _map_files() == set()


def test_every_mapped_module_exists():
    assert _map_files() - _code_files() == set()


def test_modules_stay_small():
    big = {f: n for f in _code_files() if (n := len((ROOT / f).read_text().splitlines())) > 450}
    assert big == {}, f"split these modules (one concept per file): {big}"
