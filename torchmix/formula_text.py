"""Formula text as Python: the one reading of a formula part that the allow-list check sees.

:func:`rewrite_power` gives ``^`` inside calls R's meaning (power); :func:`python_view` maps a
formula part (formulaic syntax) to one Python expression for :mod:`ast`, with placeholders for
names that are not Python names. Neither evaluates anything.
"""

from __future__ import annotations

import re

from .errors import FormulaError

__all__ = ["rewrite_power", "python_view"]


def rewrite_power(text: str) -> str:
    """Replace ``^`` by ``**`` inside calls and ``{...}`` blocks, outside quotes.

    In R, ``^`` inside a function call (``I(age^2)``, ``log(x^2)``) is arithmetic power, while
    at formula level (``(a + b)^2``) it crosses terms; formulaic would read the former as
    Python's bitwise xor. Formula-level ``^`` is left alone.
    """
    out, stack, quote = [], [], None
    for pos, ch in enumerate(text):
        if quote:
            out.append(ch)
            quote = None if ch == quote else quote
            continue
        if ch in "'\"`":
            quote = ch
        elif ch == "(":
            prev = text[:pos].rstrip()[-1:]
            stack.append(bool(prev) and (prev.isalnum() or prev in "_.`"))
        elif ch == "{":
            stack.append(True)
        elif ch in ")}" and stack:
            stack.pop()
        elif ch == "^" and any(stack):
            out.append("**")
            continue
        out.append(ch)
    return "".join(out)


_NUMBER = re.compile(r"\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?")
_DOTTED = re.compile(r"(?:[A-Za-z_]|\.(?=[A-Za-z_]))[A-Za-z0-9_.]*")


def python_view(text: str) -> tuple[str, dict]:
    """The formula part as one Python expression, without evaluating or parsing it with formulaic.

    At formula level (outside calls and ``{...}``) ``:`` and ``%in%`` become ``*``, ``^`` becomes
    ``**``, ``{...}`` becomes ``(...)`` and dotted names (``school.id``) become placeholders, as do
    backticked names everywhere; inside calls ``^`` becomes ``**``. Returns the code and the
    placeholder -> column name map.
    """
    out, aliases, stack = [], {}, []
    i, n = 0, len(text)

    def alias(name: str) -> str:
        key = f"_bt_{len(aliases)}"
        aliases[key] = name
        return key

    bad = sorted({c for c in text if c in "#\\" or (not c.isprintable() and c not in " \t\r\n")})
    if bad or "'" * 3 in text or '"' * 3 in text:
        raise FormulaError(f"{text!r} contains {', '.join(map(repr, bad)) or 'triple quotes'}, which a formula "
                           "may not use")
    while i < n:
        ch = text[i]
        top = all(kind == "paren" for kind in stack)
        if ch in "'\"":
            j = text.find(ch, i + 1)
            if j < 0:
                raise FormulaError(f"unclosed quote in {text!r}")
            if text[j + 1:].lstrip()[:1] in ("'", '"'):
                raise FormulaError(f"adjacent strings in {text!r}")
            out.append(text[i:j + 1])
            i = j + 1
            continue
        if ch in "\t\r\n":
            out.append(" ")
            i += 1
            continue
        if ch == "`":
            j = text.find("`", i + 1)
            if j < 0:
                raise FormulaError(f"unclosed backtick in {text!r}")
            out.append(alias(text[i + 1:j]))
            i = j + 1
            continue
        m = _NUMBER.match(text, i)
        if m and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] in "_.")):
            out.append(m.group())
            i = m.end()
            continue
        m = _DOTTED.match(text, i)
        if m:
            name, j = m.group(), m.end()
            rest = text[j:].lstrip()
            out.append(alias(name) if top and "." in name and not rest.startswith("(") else name)
            i = j
            continue
        if top and text.startswith("%in%", i):
            out.append("*")
            i += 4
            continue
        if ch == "(":
            prev = "".join(out).rstrip()[-1:]
            stack.append("call" if prev and (prev.isalnum() or prev in "_)]") else "paren")
        elif ch == "{" and top:
            stack.append("brace")
            ch = "("
        elif ch in ")}" and stack:
            ch = ")" if stack.pop() == "brace" else ch
        elif ch == ":" and top:
            ch = "*"
        elif ch == "^":
            ch = "**"
        out.append(ch)
        i += 1
    return "".join(out), aliases
