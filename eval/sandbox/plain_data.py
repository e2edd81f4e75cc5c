"""Plain data across a process boundary: values as Python literals, read back without running any code.

The HumanEval checker and the sandboxed candidate exchange arguments and
results as one line of `repr` text per message. The reader parses it with
`ast.literal_eval`, which can build numbers, strings, bytes, None and lists,
tuples, dicts and sets of them, and nothing else: whatever the candidate's
process does, what reaches the checker is data, compared there with the
checker's own `==`.

`repr` writes float infinities and NaN as the names inf and nan, which are not
literals; they are read back as floats. The sender rebuilds subclasses of the
plain types (and numbers registered with the `numbers` ABCs, such as numpy
scalars) as the plain type, so an overridden `__eq__` never travels; any other
object cannot be sent.

Standard library only: the checker and the candidate server load this file as
a top-level module beside them.
"""

import ast
import math
import numbers

MAX_LINE_BYTES = 8 * 1024 * 1024
_NON_LITERAL_FLOATS = {"inf": math.inf, "nan": math.nan, "infj": complex(0, math.inf), "nanj": complex(0, math.nan)}
_EXACT_TYPES = (bool, int, float, complex, str, bytes, type(None))


class UnreadableData(ValueError):
    """A line that is not one plain-data literal within the size limit."""


def to_plain(value):
    """`value` rebuilt from the exact plain types; TypeError for anything that is not plain data."""
    if type(value) in _EXACT_TYPES:
        return value
    for plain in (str, bytes):
        if isinstance(value, plain):
            return plain(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, numbers.Complex):
        return complex(value)
    if isinstance(value, list):
        return [to_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(to_plain(item) for item in value)
    if isinstance(value, dict):
        return {to_plain(key): to_plain(item) for key, item in value.items()}
    if isinstance(value, (set, frozenset)):
        return {to_plain(item) for item in value}
    raise TypeError(
        f"the function returned a {type(value).__name__}, which cannot be checked: only plain data "
        "(numbers, strings, bytes, None, and lists, tuples, dicts and sets of them) leaves the sandbox"
    )


def encode(value) -> bytes:
    """One line: the repr of plain data (repr escapes every line break inside strings)."""
    return repr(value).encode("utf-8") + b"\n"


class _ReadNonLiteralFloats(ast.NodeTransformer):
    def visit_Name(self, node: ast.Name):
        if node.id in _NON_LITERAL_FLOATS:
            return ast.copy_location(ast.Constant(_NON_LITERAL_FLOATS[node.id]), node)
        return node  # literal_eval refuses any other name


def decode(line: bytes):
    """The value of one line written by `encode`; UnreadableData for anything else."""
    if len(line) > MAX_LINE_BYTES or not line.endswith(b"\n"):
        raise UnreadableData(f"a message longer than {MAX_LINE_BYTES} bytes, or cut off")
    try:
        tree = _ReadNonLiteralFloats().visit(ast.parse(line.decode("utf-8"), mode="eval"))
        return ast.literal_eval(tree)
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError, UnicodeDecodeError) as err:
        raise UnreadableData(f"not plain data ({type(err).__name__})") from None
