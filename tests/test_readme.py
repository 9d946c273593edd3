"""The README works as written: every Python and shell block runs, in order, on a fresh folder.

Blocks run one after another in a temporary folder that has ``../shared`` beside it (a link to the
real data when it is present), so the README's relative paths mean what they say. Python blocks
share one namespace, as in one notebook; shell blocks run in bash with the project's ``medlens`` on
PATH. A block fails the test when it fails, or when what it states is not so:

* a Python line ``EXPR  # VALUE`` whose comment is a literal (a shape, a list, a string) must
  evaluate to that value;
* an HTML comment ``<!-- readme-test: expect PATH ... -->`` before a block names files or
  folders that must exist after it.

Other directives before a block: ``<!-- readme-test: skip REASON -->`` (the block is not run,
e.g. ``make test`` itself) and ``<!-- readme-test: instead ... -->`` (a lighter variant that CI
runs in place of a block too heavy for it; the README shows both).
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHARED = Path(os.environ.get("MEDLENS_SHARED_DATA", ROOT.parent / "shared" / "data")).parent

FENCE = re.compile(r"^```(\w*)\s*$")
DIRECTIVE = re.compile(r"<!--\s*readme-test:\s*(skip|instead|expect)\b(.*?)-->", re.S)
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console"}


@dataclass
class Block:
    line: int
    language: str
    code: str
    skip: str | None = None
    instead: str | None = None
    expect: list[str] = field(default_factory=list)


def readme_blocks(text: str) -> list[Block]:
    """Fenced blocks in order, with the directives in the HTML comments just before each."""
    blocks: list[Block] = []
    lines = text.splitlines()
    pending: list[tuple[str, str]] = []
    i = 0
    while i < len(lines):
        if lines[i].lstrip().startswith("<!--"):
            j = i
            while "-->" not in lines[j]:
                j += 1
            pending += [(m.group(1), m.group(2).strip()) for m in DIRECTIVE.finditer("\n".join(lines[i : j + 1]))]
            i = j + 1
            continue
        fence = FENCE.match(lines[i])
        if fence:
            j = i + 1
            while not lines[j].startswith("```"):
                j += 1
            block = Block(i + 1, fence.group(1), "\n".join(lines[i + 1 : j]))
            for kind, value in pending:
                if kind == "skip":
                    block.skip = value or "skipped"
                elif kind == "instead":
                    block.instead = value
                else:
                    block.expect += value.split()
            blocks.append(block)
            pending = []
            i = j + 1
            continue
        if lines[i].strip():
            pending = []
        i += 1
    return blocks


def stated_value(comment: str) -> object:
    """The literal a comment states (``(4, 1, 224, 224)``, ``['layer4']``), or a sentinel."""
    parts = comment.split(",")
    for end in range(len(parts), 0, -1):
        try:
            return ast.literal_eval(",".join(parts[:end]).strip())
        except (ValueError, SyntaxError):
            continue
    return NOTHING


NOTHING = object()


def plain(value: object) -> object:
    """Tensors, sizes and tuples as plain Python values, to compare with a literal."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return type(value)(plain(v) for v in value) if isinstance(value, list) else tuple(plain(v) for v in value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def same(value: object, stated: object) -> bool:
    value = plain(value)
    if isinstance(stated, tuple) and isinstance(value, list):
        value = tuple(value)
    return value == stated


def run_python(code: str, namespace: dict, where: str) -> None:
    """Exec a block line group by line group; bare ``EXPR  # VALUE`` lines are checked."""
    tree = ast.parse(code)
    lines = code.splitlines()
    for node in tree.body:
        source = ast.get_source_segment(code, node)
        exec(compile(ast.Module([node], []), where, "exec"), namespace)
        if not isinstance(node, ast.Expr):
            continue
        tail = lines[node.end_lineno - 1].split("#", 1)
        if len(tail) < 2:
            continue
        stated = stated_value(tail[1])
        if stated is NOTHING:
            continue
        value = eval(compile(ast.Expression(node.value), where, "eval"), namespace)
        assert same(value, stated), f"{where}: `{source}` is {plain(value)!r}, the README says {stated!r}"


def run_shell(code: str, cwd: Path, where: str) -> None:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "2")
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{where} failed ({done.returncode}):\n{code}\n--- stderr ---\n{done.stderr[-3000:]}\n--- stdout ---\n{done.stdout[-2000:]}"


def test_readme_blocks_are_found_and_directives_parse() -> None:
    blocks = readme_blocks(README.read_text())
    assert len(blocks) >= 10
    assert all(b.language in SHELL_LANGUAGES | {"python", "text", "yaml", "json"} for b in blocks), [b.language for b in blocks]
    assert any(b.skip for b in blocks) and any(b.language == "python" for b in blocks)


def test_stated_values_are_read_from_comments() -> None:
    assert stated_value(" (4, 1, 224, 224), each map in [0, 1]") == (4, 1, 224, 224)
    assert stated_value(" ['layer4'], {'auto_layer': 'layer4'}") == (["layer4"], {"auto_layer": "layer4"})
    assert stated_value(" random init, nothing downloaded") is NOTHING
    assert same((2, 3), (2, 3)) and not same([1, 2], (1, 3))


@pytest.mark.readme
def test_readme_runs_in_order(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    if SHARED.exists():
        (tmp_path / "shared").symlink_to(SHARED, target_is_directory=True)
    namespace: dict = {"__name__": "__readme__"}
    old = Path.cwd()
    os.chdir(work)
    try:
        for block in readme_blocks(README.read_text()):
            where = f"README.md:{block.line}"
            if block.skip or block.language not in SHELL_LANGUAGES | {"python"}:
                continue
            if block.instead is not None:
                run_shell(block.instead, work, where + " (lighter variant)")
            elif block.language == "python":
                run_python(block.code, namespace, where)
            else:
                run_shell(block.code, work, where)
            missing = [p for p in block.expect if not (work / p).exists()]
            assert not missing, f"{where}: the README says it writes {missing}, not there after it ran"
    finally:
        os.chdir(old)
