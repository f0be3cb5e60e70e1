"""Text → AST. The lark Transformer only maps parse trees to :mod:`cnds_compiler.ast` nodes."""

from __future__ import annotations

from pathlib import Path

from lark import Lark, Token, Transformer, Tree, UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, v_args
from lark.exceptions import UnexpectedToken

from . import ast
from .errors import CndsError, SpecIncludeError, SpecSyntaxError
from .source import Source, Span


def grammar_cache() -> str | bool:
    """Where lark keeps the built parser tables between runs (building them is most of a spec check's
    time). Lark names the grammar text, options and its version in a hash it checks on load, so a changed
    grammar is rebuilt, never served stale. ``False`` (build every time) when no cache folder is writable."""
    import os

    folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cnds"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return str(folder / "grammar") if os.access(folder, os.W_OK) else False


def load_grammar(name: str, **options) -> Lark:
    """A LALR parser for the grammar file ``name`` beside this package's modules, cached across runs."""
    cache = grammar_cache()
    if cache:
        cache = f"{cache}-{Path(name).stem}.lark-cache"
    return Lark.open(name, rel_to=__file__, parser="lalr", cache=cache, **options)


_PARSER = load_grammar("cnds.lark", propagate_positions=True, strict=True, maybe_placeholders=True)

# Malformed snippets and what to tell the user; lark's match_examples picks the closest.
_SYNTAX_EXAMPLES: dict[str, list[str]] = {
    "a layer needs a name and a colon, e.g. `conv1: conv2d(64, 3)`": [
        "network n\nconv2d(64, 3)\n",
        "network n\nconv1 conv2d(64, 3)\n",
    ],
    "unclosed parenthesis": ["network n\nconv1: conv2d(64, 3\n", "network n\nc: conv2d((64, 3)\n"],
    "unclosed `{`: a supervise or section block must end with `}` on its own line": [
        "network n\ntrain { epochs 3\n",
        "network n\nsupervise c {\n a: relu\n",
    ],
    "input takes CxHxW, e.g. `input 3x227x227`": ["network n\ninput 3\n", "network n\ninput 3x227\n"],
    "an argument is missing between commas": ["network n\nc: conv2d(64,, 3)\n", "network n\nc: conv2d(,3)\n"],
    "a setting needs a name and a value, e.g. `epochs 10`": ["network n\ntrain { epochs }\n"],
}


def _span(source: Source, meta_or_token) -> Span:
    if isinstance(meta_or_token, Token):
        return Span(source, meta_or_token.start_pos, meta_or_token.end_pos)
    return Span(source, meta_or_token.start_pos, meta_or_token.end_pos)


@v_args(meta=True, inline=True)
class _ToAst(Transformer):
    """Maps each grammar rule to the AST dataclass of the same name; nothing more."""

    def __init__(self, source: Source) -> None:
        super().__init__()
        self.src = source

    def _s(self, meta) -> Span:
        return _span(self.src, meta)

    # expressions
    def _int(self, digits: str, span: Span) -> int:
        try:
            return int(digits)
        except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
            raise _RangeError(span, f"number too large ({len(digits)} digits)") from None

    def number(self, meta, tok):
        text = str(tok)
        is_int = text.isdigit()
        return ast.Number(self._int(text, self._s(tok)) if is_int else float(text), self._s(tok))

    def ref(self, meta, tok):
        return ast.Ref(str(tok), self._s(tok))

    def string(self, meta, tok):
        return ast.String(str(tok)[1:-1], self._s(tok))

    def _bin(op):  # noqa: N805 - a factory used in the class body
        def rule(self, meta, left, right):
            return ast.BinOp(op, left, right, self._s(meta))

        return rule

    add, sub, mul, div = _bin("+"), _bin("-"), _bin("*"), _bin("/")

    def neg(self, meta, operand):
        return ast.Neg(operand, self._s(meta))

    def list(self, meta, *items):
        return ast.ListValue(tuple(i for i in items if i is not None), self._s(meta))

    def positional(self, meta, value):
        return ast.Arg(None, value, self._s(meta))

    def keyword(self, meta, name, value):
        return ast.Arg(str(name), value, self._s(meta))

    def call(self, meta, name, *args):
        return ast.Call(str(name), tuple(a for a in args if a is not None), self._s(meta), self._s(name))

    fcall = call

    # statements
    def network(self, meta, name):
        return ast.NetworkDecl(str(name), self._s(meta))

    def extends(self, meta, path):
        return ast.ExtendsDecl(str(path)[1:-1], self._s(meta))

    def input(self, meta, shape):
        c, h, w = (self._int(d, self._s(shape)) for d in str(shape).split("x"))
        return ast.InputDecl((c, h, w), self._s(meta))

    def classes(self, meta, value):
        return ast.ClassesDecl(value, self._s(meta))

    def init(self, meta, call):
        return ast.InitDecl(call, self._s(meta))

    def pooling(self, meta, mode):
        return ast.PoolingDecl(str(mode), self._s(meta))

    def param(self, meta, name, default):
        return ast.Param(str(name), default, self._s(meta))

    def block_def(self, meta, name, *rest):
        params = tuple(r for r in rest if isinstance(r, ast.Param))
        body = tuple(r for r in rest if isinstance(r, ast.Call))
        graph = tuple(r for r in rest if isinstance(r, ast.LayerDef))
        is_graph = not body  # `= call+` always has a call; `{ ... }` has none
        return ast.BlockDef(str(name), params, body, self._s(meta), self._s(name), graph if is_graph else None)

    def rep_item(self, meta, first, last):
        if last is None:
            return (str(first),)
        lo, hi = self._int(first, self._s(first)), self._int(last, self._s(last))
        if hi < lo:
            raise _RangeError(self._s(meta), f"empty repetition range {lo}..{hi}")
        if hi - lo >= MAX_REPEAT:
            raise _RangeError(self._s(meta), f"repetition range {lo}..{hi} makes more than {MAX_REPEAT} layers")
        return range(lo, hi + 1)  # kept lazy: the label's total is checked before any name is made

    def _suffixes(self, meta, items, prefix: str) -> tuple[str, ...]:
        total = sum(len(r) for r in items)
        if total > MAX_REPEAT:  # `c_{1..999,1001..1999,...}`: every range within the limit, the label not
            raise _RangeError(self._s(meta), f"repetition makes {total:,} layers, more than {MAX_REPEAT}")
        return tuple(prefix + str(s) for r in items for s in r)

    def repeat(self, meta, *items):
        return self._suffixes(meta, items, "")

    def repeat_dotted(self, meta, *items):
        return self._suffixes(meta, items, ".")

    def label(self, meta, name, suffixes):
        return (str(name), suffixes, self._s(name))

    def sources(self, meta, *names):
        return tuple((str(n), self._s(n)) for n in names)

    def condition(self, meta, expr):
        return expr

    def layer(self, meta, label, sources, *rest):
        name, repeat, name_span = label
        ops = tuple(r for r in rest if isinstance(r, ast.Call))
        condition = rest[-1] if rest and not isinstance(rest[-1], ast.Call) else None
        return ast.LayerDef(name, repeat, ops, self._s(meta), name_span, sources, condition)

    def setting(self, meta, key, value):
        return ast.Setting(str(key), value, self._s(meta), self._s(key))

    def head_name(self, meta, name):
        return ("as", str(name), self._s(name))

    def supervise(self, meta, *items):
        taps = tuple((str(t), self._s(t)) for t in items if isinstance(t, Token))
        settings = tuple(i for i in items if isinstance(i, ast.Setting))
        layers = tuple(i for i in items if isinstance(i, ast.LayerDef))
        head = next(((i[1], i[2]) for i in items if isinstance(i, tuple) and i and i[0] == "as"), None)
        return ast.Supervise(taps, settings, layers, self._s(meta), head)

    def unsupervise(self, meta, *taps):
        return ast.Unsupervise(tuple((str(t), self._s(t)) for t in taps), self._s(meta))

    def section(self, meta, name, *settings):
        return ast.Section(str(name), tuple(settings), self._s(meta), self._s(name))

    def start(self, meta, *statements):
        return statements


class _RangeError(Exception):
    """A value the grammar accepts but the AST cannot hold; carried out of the Transformer as a syntax error."""

    def __init__(self, span: Span, message: str) -> None:
        self.span, self.message = span, message


MAX_REPEAT = 1000
"""Most layers one ``name_{a..b, c..d}`` label may stand for, over all its ranges together."""

MAX_NESTING = 200
"""Deepest expression nesting accepted (the Transformer and the evaluator recurse over it)."""


_NESTING_RULES = frozenset({"add", "sub", "mul", "div", "neg", "list"})


def _check_nesting(source: Source, tree: Tree) -> None:
    """Reject expressions nested deeper than :data:`MAX_NESTING` before anything recurses over them."""
    for statement in tree.children:
        if not isinstance(statement, Tree):
            continue
        stack: list[tuple[Tree, int, Tree | None]] = [(statement, 1, None)]
        while stack:
            node, depth, outermost = stack.pop()
            if outermost is None and node.data in _NESTING_RULES:
                outermost = node  # the whole expression is what the error points at
            if depth > MAX_NESTING:
                raise SpecSyntaxError(
                    f"expression nested more than {MAX_NESTING} levels deep", _span(source, (outermost or statement).meta)
                )
            stack.extend((child, depth + 1, outermost) for child in node.children if isinstance(child, Tree))


def parse_text(text: str, name: str = "<spec>") -> ast.SpecFile:
    """Parse spec text into an AST; raise :class:`SpecSyntaxError` pointing at the offending token."""
    source = Source(name, text if text.endswith("\n") else text + "\n")
    try:
        tree = _PARSER.parse(source.text)
    except UnexpectedInput as e:
        raise _syntax_error(source, e) from None
    _check_nesting(source, tree)
    try:
        statements = _ToAst(source).transform(tree)
    except Exception as e:  # lark wraps callback errors in VisitError
        inner = getattr(e, "orig_exc", e)
        if isinstance(inner, _RangeError):
            raise SpecSyntaxError(inner.message, inner.span) from None
        raise
    return ast.SpecFile(name, tuple(statements))


def parse_file(path: str | Path) -> ast.SpecFile:
    """Read and parse a spec file; a missing, unreadable, non-regular or oversized file is a
    :class:`CndsError` naming it (checked before reading: ``/dev/zero`` or a FIFO as a spec never hangs)."""
    from .io import read_bounded_text

    return parse_text(read_bounded_text(path, "spec file", SpecIncludeError), str(path))


def _describe(token: Token) -> str:
    if token.type == "$END":
        return "end of file"
    if token.type == "_NL":
        return "end of line"
    return repr(str(token))  # quoted; a NUL or '\r' inside a string token stays escaped on one line


_TERMINAL_WORDS = {
    "NAME": "a name", "NUMBER": "a number", "INT": "an integer", "STRING": "a quoted string",
    "SHAPE": "a shape such as 3x227x227", "_NL": "end of line", "LPAR": "'('", "RPAR": "')'",
    "LBRACE": "'{'", "RBRACE": "'}'", "LSQB": "'['", "RSQB": "']'", "COLON": "':'", "COMMA": "','",
    "EQUAL": "'='", "MINUS": "'-'", "__ANON_0": "'->'", "PLUS": "'+'", "STAR": "'*'", "SLASH": "'/'", "$END": "end of file",
}


def _expected(e: UnexpectedInput) -> str:
    names = sorted(getattr(e, "expected", None) or getattr(e, "allowed", None) or ())
    words = []
    for n in names:
        words.append(_TERMINAL_WORDS.get(n, f"'{n.lower()}'" if n.isupper() else n))
    words = sorted(set(words))
    if not words:
        return ""
    if len(words) > 6:
        words = words[:6] + ["..."]
    return "; expected " + ", ".join(words)


def _syntax_error(source: Source, e: UnexpectedInput) -> CndsError:
    pos = e.pos_in_stream if e.pos_in_stream is not None else len(source.text)
    pos = min(pos, len(source.text))
    end = pos
    if isinstance(e, UnexpectedToken) and e.token.type not in ("$END", "_NL"):
        end = min(len(source.text), pos + len(str(e.token)))
    elif isinstance(e, UnexpectedCharacters):
        end = min(len(source.text), pos + 1)
    span = Span(source, pos, end)
    try:
        label = e.match_examples(_PARSER.parse, _SYNTAX_EXAMPLES, use_accepts=True)
    except Exception:  # match_examples re-parses examples; never let that mask the real error
        label = None
    if isinstance(e, UnexpectedCharacters):
        message = f"unexpected character {source.text[pos]!r}"  # repr keeps \r, \0 on one line
    elif isinstance(e, UnexpectedEOF):
        message = "unexpected end of file"
    else:
        message = f"unexpected {_describe(e.token)}"
    return SpecSyntaxError(message + _expected(e), span, hint=label)
