"""Griffe extension: render the library's docstrings (Google style with a few reST habits) as Markdown.

The docstrings are written for ``help()``, doctest and Sphinx-like readers. mkdocstrings parses
Google style, so this rewrites, before parsing and without touching the source files:

* reST roles ``:func:`~a.b.c``` / ``:class:`a.b.C``` -> inline code (``c`` / ``a.b.C``);
* ``Example:`` section titles -> ``Examples:`` (griffe reads only the plural as an examples
  section, where ``>>>`` lines become highlighted code);
* reST "simple tables" (``===  ===``) -> Markdown tables;
* one ``Args:`` entry that names several parameters (``a, b: ...`` or ``a / b: ...``) -> one entry
  per parameter with the same description.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj|exc|const|py:\w+):`(~?)([^`]+)`")
_RULE = re.compile(r"^(\s*)(=+)((?:\s+=+)+)\s*$")
_MULTI = re.compile(r"^(\s+)(\w+(?:\s*[,/]\s*\w+)+):(\s.*)?$")


def _role(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


def _tables(lines: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = _RULE.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        # column spans from the rule line
        indent = m.group(1)
        spans = [(s.start(), s.end()) for s in re.finditer(r"=+", lines[i])]
        rows: list[list[str]] = []
        rules = 1
        i += 1
        while i < len(lines) and rules < 3:
            if _RULE.match(lines[i]):
                rules += 1
                if rules == 2:
                    rows.append([])  # header separator marker
            elif lines[i].strip():
                line = lines[i]
                cells = [line[a : (spans[k + 1][0] if k + 1 < len(spans) else len(line))].strip()
                         for k, (a, _) in enumerate(spans)]  # fmt: skip
                rows.append(cells)
            i += 1
        header, body = (rows[0], rows[2:]) if len(rows) > 1 and rows[1] == [] else ([""] * len(spans), rows)
        out.append(indent + "| " + " | ".join(header) + " |")
        out.append(indent + "|" + "---|" * len(spans))
        out += [indent + "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    return out


def _split_multi(lines: list[str]) -> list[str]:
    out: list[str] = []
    section = ""
    for k, line in enumerate(lines):
        head = line.strip()
        if re.fullmatch(r"[A-Z][A-Za-z ]*:", head):
            section = head
        m = _MULTI.match(line) if section in ("Args:", "Arguments:", "Parameters:") else None
        if not m:
            out.append(line)
            continue
        indent, names, rest = m.group(1), re.split(r"\s*[,/]\s*", m.group(2)), m.group(3) or ""
        cont = []
        j = k + 1
        while j < len(lines) and lines[j].startswith(indent + " ") and lines[j].strip():
            cont.append(lines[j])
            j += 1
        for n, name in enumerate(names):
            out.append(f"{indent}{name}:{rest}")
            if n < len(names) - 1:
                out += cont
    return out


def rewrite(text: str) -> str:
    text = _ROLE.sub(_role, text)
    text = re.sub(r"^(\s*)Example:\s*$", r"\1Examples:", text, flags=re.MULTILINE)
    lines = _split_multi(_tables(text.splitlines()))
    return "\n".join(lines)


class MarkdownDocstrings(griffe.Extension):
    """Rewrite each docstring once, when griffe creates the object."""

    def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
