"""Line counts of ``src/dfm_ext/metrics`` at two commits: ``python docs/scripts/metrics_lines.py [BEFORE] [AFTER]``.

Defaults: ``cf7ac3c`` (before issue 29's sample/evaluate work) and ``HEAD``. Prints a Markdown table, one row
per file: all lines (``wc -l``) and code lines (without docstrings, comments and blank lines), before and after.
The table in ``docs/guides/metrics.md`` ("What dfm_ext.metrics writes itself, and why") comes from here.
"""

from __future__ import annotations

import ast
import io
import subprocess
import sys
import tokenize

FOLDER = "src/dfm_ext/metrics"
_SKIPPED = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}


def code_lines(source: str) -> int:
    """Lines holding a token other than a comment, and not part of a module/class/function docstring."""
    docstrings: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                docstrings.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in _SKIPPED:
            lines.update(n for n in range(token.start[0], token.end[0] + 1) if n not in docstrings)
    return len(lines)


def counts(commit: str) -> dict[str, tuple[int, int]]:
    files = subprocess.run(["git", "ls-tree", "-r", "--name-only", commit, FOLDER], capture_output=True, text=True, check=True)
    out = {}
    for path in files.stdout.split():
        if path.endswith(".py"):
            source = subprocess.run(["git", "show", f"{commit}:{path}"], capture_output=True, text=True, check=True).stdout
            out[path.rsplit("/", 1)[-1]] = (len(source.splitlines()), code_lines(source))
    return out


def main() -> None:
    before_commit, after_commit = (sys.argv[1:] + ["cf7ac3c", "HEAD"][len(sys.argv[1:]) :])[:2]
    before, after = counts(before_commit), counts(after_commit)
    print(f"| file | lines before ({before_commit}) | lines after ({after_commit}) | code lines before | code lines after |")
    print("|---|---|---|---|---|")
    total = [0, 0, 0, 0]
    for name in sorted(before.keys() | after.keys()):
        b, a = before.get(name), after.get(name)
        row = [b[0] if b else 0, a[0] if a else 0, b[1] if b else 0, a[1] if a else 0]
        total = [t + r for t, r in zip(total, row)]
        print(f"| `{name}` | " + " | ".join(str(r) if r else "-" for r in row) + " |")
    print("| **total** | " + " | ".join(f"**{t:,}**" for t in total) + " |")


if __name__ == "__main__":
    main()
