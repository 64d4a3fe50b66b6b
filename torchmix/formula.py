r"""lme4-style formulas: split the random-effect bars out, hand the rest to formulaic.

``y ~ x + (1 + x | school) + (1 | district)`` becomes a response, a fixed part ``x`` and a tuple of
:class:`RandomTerm`. Supported bars (MATH.md 1.3): ``(e | g)``, ``(e || g)`` (one term per
model-matrix column, a factor's dummies kept together), ``(e | a/b)`` = ``(e | a) + (e | a:b)``
and ``(e | a:b)`` (the factor of observed combinations).

The scan tracks parenthesis depth, string quotes and backticks, so calls such as ``poly(x, 2)``,
``I(x + 1)`` or ``Q("a|b")`` stay whole. Column names that are not Python names are written with
backticks or ``Q("...")`` anywhere, grouping factors included: ``(1 | `school.id`)``.

Every part is checked against the allow-list of :mod:`torchmix.formula_safety` before anything is
evaluated, and ``^`` inside a call means power as in R (``I(age^2)``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import FormulaError
from .formula_safety import check_part, check_transforms
from .formula_text import rewrite_power

__all__ = ["RandomTerm", "ParsedFormula", "parse_formula"]


@dataclass(frozen=True)
class RandomTerm:
    """One random-effect term for one grouping factor.

    Attributes
    ----------
    expr : right-hand side of the bar, e.g. ``"1 + Days"`` (formulaic syntax).
    group : grouping factor name, e.g. ``"Subject"`` or ``"school:class"``.
    group_vars : the data columns whose combination defines the groups.
    independent : True for ``||`` (split into uncorrelated terms per column).
    """

    expr: str
    group: str
    group_vars: tuple
    independent: bool = False


@dataclass(frozen=True)
class ParsedFormula:
    """A formula split into response, fixed part and random terms."""

    formula: str
    response: str
    fixed: str
    random: tuple
    offsets: tuple = ()  # expressions of top-level offset(...) terms, e.g. ("log(n)",)

    @property
    def group_names(self) -> list[str]:
        """Distinct grouping factor names, in order of first appearance."""
        seen = []
        for t in self.random:
            if t.group not in seen:
                seen.append(t.group)
        return seen


def _split_top(text: str, sep: str) -> list[str]:
    """Split ``text`` on single-character ``sep`` at parenthesis depth 0, outside quotes."""
    parts, depth, quote, cur = [], 0, None, []
    for ch in text:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = None
            continue
        if ch in "'\"`":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth < 0:
                raise FormulaError(f"unbalanced parentheses in formula part {text!r}")
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0 or quote:
        raise FormulaError(f"unbalanced parentheses or quotes in formula part {text!r}")
    parts.append("".join(cur))
    return parts


def _split_signed(text: str) -> list[tuple[str, str]]:
    """Split a right-hand side into ``(sign, term)`` pairs at depth-0 ``+`` and ``-``."""
    out = []
    for chunk in _split_top(text, "+"):
        pieces = _split_top(chunk, "-")
        if pieces[0].strip():
            out.append(("+", pieces[0].strip()))
        out.extend(("-", piece.strip()) for piece in pieces[1:])
    return out


def _wrapped(item: str) -> bool:
    """True when ``item`` is one parenthesised group ``( ... )``."""
    if not (item.startswith("(") and item.endswith(")")):
        return False
    depth, quote = 0, None
    for pos, ch in enumerate(item):
        if quote:
            quote = None if ch == quote else quote
            continue
        if ch in "'\"`":
            quote = ch
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0 and pos < len(item) - 1:
            return False
    return True


def _group_name(piece: str, spec: str, formula: str) -> str:
    """One grouping column: ``school``, ``school.id``, `` `school id` `` or ``Q("school id")``."""
    piece = piece.strip()
    if len(piece) >= 2 and piece[0] == piece[-1] == "`" and "`" not in piece[1:-1]:
        name = piece[1:-1]
    elif (piece.startswith("Q(") and piece.endswith(")") and len(piece) >= 5
          and piece[2] in "'\"" and piece[-2] == piece[2] and piece[2] not in piece[3:-2]):
        name = piece[3:-2]
    elif piece and piece.replace("_", "a").replace(".", "a").isalnum():
        name = piece
    else:
        name = ""
    if not name:
        raise FormulaError(f"grouping factor {spec.strip()!r} in {formula!r} must be column names joined by "
                           "':' or '/' (write `my name` or Q(\"my name\") for names with spaces or symbols)")
    return name


def _group_factors(spec: str, formula: str) -> list[tuple[str, tuple]]:
    """``a/b/c`` -> [("a", (a,)), ("a:b", (a, b)), ("a:b:c", (a, b, c))]; ``a:b`` -> [("a:b", (a, b))]."""
    spec = spec.strip()
    if not spec:
        raise FormulaError(f"a random-effect term has no grouping factor in {formula!r}")
    out, prefix = [], []
    for piece in _split_top(spec, "/"):
        names = tuple(_group_name(s, spec, formula) for s in _split_top(piece, ":"))
        prefix = prefix + list(names)
        out.append((":".join(prefix), tuple(prefix)))
    return out


def _join_signed(terms: list[tuple[str, str]]) -> str:
    if not terms:
        return "1"
    text = " ".join(f"{sign} {item}" for sign, item in terms)
    return text[2:] if text.startswith("+ ") else text


def parse_formula(formula: str, transforms=None) -> ParsedFormula:
    """Parse an lme4-style mixed-model formula and check every term against the allow-list.

    Parameters
    ----------
    formula : e.g. ``"y ~ x + I(x^2) + (1 + x | `school.id`)"``.
    transforms : optional ``{name: function}`` the formula may call besides the built-in
        transforms (:mod:`torchmix.formula_safety`).

    Raises
    ------
    FormulaError
        If ``formula`` is not a string with one ``~``, a bar stands outside parentheses,
        a bar term has an empty side, there is no random-effect term, or a term uses anything
        outside the allow-list (named in the message).
    ConfigError
        If ``transforms`` is not a mapping of names to functions.
    """
    if not isinstance(formula, str):
        raise FormulaError(f"formula must be a string such as 'y ~ x + (1 | g)', got {type(formula).__name__}")
    extra = tuple(check_transforms(transforms))
    original, formula = formula, rewrite_power(formula)
    sides = _split_top(formula, "~")
    if len(sides) != 2 or not sides[0].strip() or not sides[1].strip():
        raise FormulaError(f"formula {formula!r} must have the form 'response ~ terms'")
    response, rhs = sides[0].strip(), sides[1]
    fixed, random, offsets = [], [], []
    for sign, item in _split_signed(rhs):
        if not item:
            raise FormulaError(f"empty term in formula {formula!r}")
        if item.startswith("offset") and _wrapped(item[6:].strip()):  # offset(expr): a known term of eta
            if sign == "-":
                raise FormulaError(f"offset term {item!r} cannot be subtracted in {formula!r}")
            offsets.append(item[6:].strip()[1:-1].strip())
            continue
        if _wrapped(item):
            inner = item[1:-1]
            bars = _split_top(inner, "|")
            if len(bars) == 1:
                fixed.append((sign, item))
                continue
            if sign == "-":
                raise FormulaError(f"random-effect term {item!r} cannot be subtracted in {formula!r}")
            independent = len(bars) == 3 and bars[1] == ""
            if len(bars) > 3 or (len(bars) == 3 and not independent):
                raise FormulaError(f"cannot read random-effect term {item!r} in {formula!r}")
            expr, spec = bars[0].strip(), bars[-1]
            if not expr:
                raise FormulaError(f"random-effect term {item!r} has nothing left of the bar")
            for name, vars_ in _group_factors(spec, formula):
                random.append(RandomTerm(expr=expr, group=name, group_vars=vars_, independent=independent))
            continue
        if len(_split_top(item, "|")) > 1:
            raise FormulaError(
                f"the bar in {item!r} must be inside parentheses, e.g. '(1 | g)'; "
                f"formula {formula!r}")
        fixed.append((sign, item))
    if not random:
        raise FormulaError(
            f"formula {formula!r} has no random-effect term such as '(1 | group)'; "
            "a single-level model is a survey GLM, not a mixed model")
    parsed = ParsedFormula(formula=original, response=response, fixed=_join_signed(fixed), random=tuple(random),
                           offsets=tuple(offsets))
    check_part(parsed.response, "the response", original, extra, lhs=True)
    check_part(parsed.fixed, "the fixed part", original, extra)
    for t in parsed.random:
        check_part(t.expr, f"random term ({t.expr} | {t.group})", original, extra)
    for e in parsed.offsets:
        check_part(e, f"offset({e})", original, extra, lhs=True)
    return parsed
