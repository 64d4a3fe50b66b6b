r"""What a formula may say: column names, numbers, operators and an allow-list of transforms.

A formula is text that a model builder evaluates, so it must not be able to run arbitrary code.
Every part of a formula (response, fixed part, each random-effect expression) is read as one
Python expression (formula operators ``:``, ``%in%``, ``^`` and ``{...}`` mapped to Python ones,
backticked and dotted names to placeholders), parsed with :mod:`ast` and checked against an
allow-list **before anything is evaluated and before formulaic's parser sees it** (that parser
evaluates the arguments of some transforms, e.g. ``Q``); then each factor formulaic makes of it
is checked again as formulaic will evaluate it. Grouping factors are checked by
:mod:`torchmix.formula` (column names only).

Allowed in a term
    * column names: bare (``ses``), backticked (`` `my var` ``, `` `school.id` ``) or ``Q("my var")``;
    * numbers, ``True``, ``False``, ``None``;
    * arithmetic ``+ - * / // % **`` (``^`` inside a call means power, as in R: ``I(age^2)``),
      comparisons ``== != < <= > >=``, ``& | ~`` and ``and``/``or``/``not``;
    * calls of the transforms below, with positional or keyword arguments that are themselves
      allowed (keyword names must not start with ``_``); lists/tuples of constants as arguments;
    * string literals only as ``Q("column")`` or inside ``C(...)`` (levels, contrast arguments).

Transforms (:data:`TRANSFORM_NAMES`)
    ``I``, ``C``, ``Q``, ``scale``, ``center``, ``standardize``, ``poly``, ``bs``, ``cr``, ``cs``,
    ``cc``, ``log``, ``log2``, ``log10``, ``log1p``, ``exp``, ``expm1``, ``sqrt``, ``abs``;
    contrast codings ``Treatment``, ``Sum``, ``Helmert``, ``Diff``, ``Poly`` and
    ``contr.<treatment|sum|helmert|poly|diff|SAS>``; and ``np.<f>`` for ``f`` in
    :data:`NUMPY_NAMES` (plus the constants ``np.pi`` and ``np.e``).

Everything else is a :class:`~torchmix.errors.FormulaError` naming the term: other calls
(``eval``, ``exec``, ``getattr``, ``open``, ``__import__``, ...), attribute chains other than
``np.<f>`` / ``contr.<name>``, dunder names, subscripts, lambdas, comprehensions, f-strings,
starred arguments, conditional expressions. Python callers may add functions explicitly with
``mix(..., transforms={"logit": f})``.

As a second wall, formulaic evaluates terms in the context built by
:func:`torchmix.formula_context.evaluation_context`:
the allowed transforms, a namespace ``np`` holding only the allowed numpy functions, and every
Python builtin and every other formulaic transform name bound to a stub that refuses to run.
"""

from __future__ import annotations

import ast
import keyword
import re
from typing import Mapping, Optional

import numpy as np
from formulaic import Formula

from .errors import ConfigError, FormulaError
from .formula_text import python_view, rewrite_power

__all__ = ["TRANSFORM_NAMES", "NUMPY_NAMES", "CONTRAST_NAMES", "rewrite_power", "check_part",
           "part_columns", "formula_columns", "check_transforms"]

NUMPY_NAMES = ("log", "log2", "log10", "log1p", "exp", "exp2", "expm1", "sqrt", "cbrt", "abs", "absolute",
               "square", "power", "floor", "ceil", "round", "rint", "trunc", "sign", "sin", "cos", "tan",
               "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh", "minimum", "maximum", "clip", "where")
NUMPY_CONSTANTS = ("pi", "e")
CONTRAST_NAMES = ("treatment", "sum", "helmert", "poly", "diff", "SAS")
_FORMULAIC = ("I", "C", "Q", "scale", "center", "standardize", "poly", "bs", "cr", "cs", "cc",
              "Treatment", "Sum", "Helmert", "Diff", "Poly")
_MATH = {"log": np.log, "log2": np.log2, "log10": np.log10, "log1p": np.log1p, "exp": np.exp,
         "expm1": np.expm1, "sqrt": np.sqrt, "abs": np.abs}
TRANSFORM_NAMES = _FORMULAIC + tuple(_MATH)
_STRING_CALLS = ("C", "Q")  # the only calls whose arguments may contain string literals

_SIZED = ("poly", "bs", "cr", "cs", "cc")  # calls whose numeric arguments set a number of columns
_MAX_COLUMNS = 100
_MAX_EXPONENT = 1000


def _constant(node) -> bool:
    """True when ``node`` holds no name (evaluated as Python numbers, so it must stay small)."""
    return not any(isinstance(n, (ast.Name, ast.Call)) for n in ast.walk(node))


def _small_exponent(node) -> bool:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        node = node.operand
    return (isinstance(node, ast.Constant) and isinstance(node.value, (int, float))
            and not isinstance(node.value, bool) and abs(node.value) <= _MAX_EXPONENT)


_BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.BitAnd, ast.BitOr)
_UNARY = (ast.UAdd, ast.USub, ast.Not, ast.Invert)
_COMPARE = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)


def check_transforms(transforms: Optional[Mapping]) -> dict:
    """Validate the user's extra transforms: identifiers (not dunder, not ``np``/``contr``) to callables.

    Raises
    ------
    ConfigError
        If ``transforms`` is not a mapping of such names to callables.
    """
    if transforms is None:
        return {}
    if not isinstance(transforms, Mapping):
        raise ConfigError(f"transforms must map names to functions, e.g. {{'logit': f}}, "
                          f"got {type(transforms).__name__}")
    out = {}
    for name, func in transforms.items():
        if (not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name)
                or name.startswith("_") or name in ("np", "contr")):
            raise ConfigError(f"transforms: {name!r} is not a usable function name (a Python identifier "
                              "not starting with '_', other than 'np' and 'contr')")
        if not callable(func):
            raise ConfigError(f"transforms: {name!r} must be a function, got {type(func).__name__}")
        out[name] = func
    return out


class _Checker:
    """Walks one factor's AST; collects column names; raises on anything not allowed."""

    def __init__(self, term: str, where: str, extra: tuple, aliases: dict):
        self.term, self.where, self.extra, self.aliases = term, where, extra, aliases
        self.columns: list = []

    def fail(self, what: str):
        raise FormulaError(f"term {self.term!r} in {self.where} is not allowed: {what}. A formula may use "
                           "column names, numbers, operators and the transforms "
                           f"{', '.join(TRANSFORM_NAMES)}, np.<function> and C()/Q() "
                           "(pass more functions with mix(..., transforms={...}))")

    def name_ok(self, name: str) -> str:
        if name.startswith("__") and name not in self.aliases:
            self.fail(f"the name {name!r}")
        return name

    def column(self, name: str):
        col = self.aliases.get(name, name)
        if col not in self.columns:
            self.columns.append(col)

    def callee(self, func) -> str:
        if isinstance(func, ast.Name):
            name = self.name_ok(func.id)
            if name in TRANSFORM_NAMES or name in self.extra:
                return name
            self.fail(f"calling {name!r} (not an allowed transform)")
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            base, attr = func.value.id, func.attr
            if (base == "np" and attr in NUMPY_NAMES) or (base == "contr" and attr in CONTRAST_NAMES):
                return f"{base}.{attr}"
        self.fail(f"calling {ast.unparse(func)!r}")

    def visit(self, node, strings: bool = False):
        if isinstance(node, ast.Expression):
            return self.visit(node.body, strings)
        if isinstance(node, ast.Constant):
            ok = node.value is None or isinstance(node.value, (bool, int, float))
            if isinstance(node.value, str) and strings:
                ok = True
            if not ok:
                self.fail(f"the literal {node.value!r}" + (" (strings only in Q() and C())"
                                                          if isinstance(node.value, str) else ""))
            return
        if isinstance(node, ast.Name):
            self.column(self.name_ok(node.id))
            return
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and (
                    (node.value.id == "np" and node.attr in NUMPY_CONSTANTS)
                    or (node.value.id == "contr" and node.attr in CONTRAST_NAMES and strings)):
                return
            self.fail(f"the attribute {ast.unparse(node)!r}")
        if isinstance(node, ast.BinOp):
            if isinstance(node.op, ast.BitXor):
                self.fail("'^' is power only inside a call, e.g. I(x^2); write '**'")
            if not isinstance(node.op, _BINOPS):
                self.fail(f"the operator in {ast.unparse(node)!r}")
            if any(isinstance(v, ast.Constant) and isinstance(v.value, str) for v in (node.left, node.right)):
                self.fail(f"arithmetic on a string in {ast.unparse(node)!r}")
            if (isinstance(node.op, ast.Pow) and _constant(node.left) and _constant(node.right)
                    and not _small_exponent(node.right)):
                self.fail(f"the power {ast.unparse(node)!r} of constants (exponents of constants must be "
                          f"numbers up to {_MAX_EXPONENT})")
            self.visit(node.left, strings)
            self.visit(node.right, strings)
            return
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, _UNARY):
            return self.visit(node.operand, strings)
        if isinstance(node, ast.BoolOp):
            for v in node.values:
                self.visit(v, strings)
            return
        if isinstance(node, ast.Compare) and all(isinstance(op, _COMPARE) for op in node.ops):
            for v in [node.left, *node.comparators]:
                self.visit(v, strings)
            return
        if isinstance(node, (ast.List, ast.Tuple)) and isinstance(node.ctx, ast.Load):
            for v in node.elts:
                if not isinstance(v, ast.Constant):
                    self.fail(f"the list {ast.unparse(node)!r} (lists may hold constants only)")
                self.visit(v, strings)
            return
        if isinstance(node, ast.Call):
            return self.call(node, strings)
        self.fail(f"the expression {ast.unparse(node)!r} ({type(node).__name__})")

    def call(self, node: ast.Call, strings: bool):
        name = self.callee(node.func)
        if name == "Q":
            if (len(node.args) != 1 or node.keywords or not isinstance(node.args[0], ast.Constant)
                    or not isinstance(node.args[0].value, str)):
                self.fail("Q() takes one column name in quotes, e.g. Q(\"my var\")")
            self.column(node.args[0].value)
            return
        if name in _SIZED:
            sizes = node.args[1:] + [kw.value for kw in node.keywords]
            if any(not isinstance(v, (ast.Constant, ast.List, ast.Tuple)) or (
                    isinstance(v, ast.Constant) and isinstance(v.value, (int, float)) and abs(v.value) > _MAX_COLUMNS)
                   for v in sizes):
                self.fail(f"{name}() takes plain numbers up to {_MAX_COLUMNS} (or lists) after its first argument")
        inner = strings or name in _STRING_CALLS or name.startswith("contr.") or name in (
            "Treatment", "Sum", "Helmert", "Diff", "Poly")
        for arg in node.args:
            if isinstance(arg, ast.Starred):
                self.fail("starred arguments")
            self.visit(arg, inner)
        for kw in node.keywords:
            if kw.arg is None or kw.arg.startswith("_"):
                self.fail(f"the keyword argument {ast.unparse(kw)!r}")
            self.visit(kw.value, inner)


def _check_code(code: str, aliases: dict, part: str, where: str, transforms: tuple) -> list:
    """Check a Python view term by term (top-level ``+``/``-`` operands); return its columns."""
    try:
        tree = ast.parse(code.strip(), mode="eval")
    except SyntaxError as exc:
        raise FormulaError(f"cannot read {part!r} in {where}: {exc.msg}") from None
    terms, todo = [], [tree.body]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):
            todo += [node.right, node.left]
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            todo.append(node.operand)
        else:
            terms.append(node)
    checker = _Checker(part, where, tuple(transforms), aliases)
    for node in terms:
        text = ast.get_source_segment(code.strip(), node) or part
        checker.term = re.sub(r"_bt_\d+", lambda m: f"`{aliases.get(m.group(), m.group())}`", text)
        checker.visit(node)
    return checker.columns


def _factors(text: str, where: str, formula: str, lhs: bool = False):
    """Factors formulaic would evaluate for ``text`` (only call on text that passed the check:
    formulaic's parser evaluates the arguments of some transforms, e.g. ``Q``)."""
    try:
        parsed = Formula(f"{text} ~ 1" if lhs else text)
        side = parsed.lhs if lhs else (parsed.rhs if hasattr(parsed, "rhs") else parsed)
        return [f for term in side for f in term.factors]
    except FormulaError:
        raise
    except Exception as exc:  # formulaic's own parser errors
        raise FormulaError(f"cannot read {where} {text!r} of formula {formula!r}: {exc}") from None


def part_columns(text: str, where: str, formula: str, transforms: tuple = (), lhs: bool = False) -> list:
    """Check one formula part and return the data columns it reads, in order of appearance.

    Two passes, both before anything is evaluated: the whole part read as one Python expression
    (:func:`_python_view`) is checked against the allow-list without formulaic seeing it; then
    every factor formulaic's parser makes of it is checked again as formulaic will evaluate it.

    Parameters
    ----------
    text : the part, e.g. ``"x + I(x**2) + (a + b):c"`` (formulaic syntax).
    where : what it is, for messages (``"the fixed part"``, ``"random term (x | g)"``).
    formula : the whole formula, for messages.
    transforms : names of the caller's extra transforms.
    lhs : True when ``text`` is the response.

    Raises
    ------
    FormulaError
        Naming the first term that is not allowed.
    """
    place = f"{where} of formula {formula!r}"
    code, aliases = python_view(text)
    columns = _check_code(code, aliases, text.strip(), place, transforms)
    for factor in _factors(text, where, formula, lhs):
        method = getattr(factor.eval_method, "name", str(factor.eval_method)).upper()
        expr = str(factor.expr)
        if method == "LITERAL":
            continue
        if method == "LOOKUP":
            found = [expr]
        elif method == "PYTHON":
            code, aliases = python_view(f"I({expr})")
            found = _check_code(code, aliases, expr, place, transforms)
        else:
            raise FormulaError(f"cannot read term {expr!r} in {place}")
        columns.extend(c for c in found if c not in columns)
    return columns


def formula_columns(parsed, columns, transforms: tuple = ()) -> list:
    """Every data column a parsed formula reads (response, fixed part, random parts, groups).

    Each part is checked against the allow-list again (:func:`part_columns`), so a design is never
    built from an unchecked formula. A response that is exactly a column name is read as is (this
    covers plausible-value columns with any name).
    """
    needed: list = []

    def add(names):
        needed.extend(n for n in names if n not in needed)

    f = parsed.formula
    if parsed.response in columns:
        add([parsed.response])
    else:
        add(part_columns(parsed.response, "the response", f, transforms, lhs=True))
    add(part_columns(parsed.fixed, "the fixed part", f, transforms))
    for t in parsed.random:
        add(part_columns(t.expr, f"random term ({t.expr} | {t.group})", f, transforms))
    for t in parsed.random:
        add(t.group_vars)
    return needed


def check_part(text: str, where: str, formula: str, transforms: tuple = (), lhs: bool = False) -> None:
    """:func:`part_columns` for its check only."""
    part_columns(text, where, formula, transforms, lhs)
