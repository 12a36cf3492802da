"""Tools every pool offers: `calculator` (safe arithmetic) and `web_search` (offline corpus)."""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Callable
from typing import Any, cast

from agentpool.errors import ToolError
from agentpool.tools import tool
from agentpool.vocabulary import ToolErrorKind

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "sqrt": math.sqrt,
    "abs": abs,
    "round": round,
    "min": min,
    "max": max,
    "log": math.log,
    "exp": math.exp,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
}
_CONSTANTS = {"pi": math.pi, "e": math.e}
MAX_EXPRESSION_CHARS = 500
MAX_EXPONENT = 10_000
MAX_MAGNITUDE = 10**300


def evaluate(expression: str) -> int | float:
    """Evaluates arithmetic by walking its syntax tree: no `eval`, no names but a few math
    functions, and bounds on exponents and magnitudes so no input can hang the process.

    Raises:
        ValueError: For anything that is not bounded arithmetic.
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.replace("^", "**"), mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"not an arithmetic expression: {exc.msg}") from None
    return _eval(tree.body)


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return cast(int | float, node.value)
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > MAX_EXPONENT or abs(left) > MAX_MAGNITUDE):
            raise ValueError("exponent too large")
        try:
            value = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ValueError("division by zero") from None
        except OverflowError:
            raise ValueError("result too large") from None
        if isinstance(value, complex):
            raise ValueError("result is not a real number")
        if isinstance(value, int) and abs(value) > MAX_MAGNITUDE:
            raise ValueError("result too large")
        return value
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in _FUNCTIONS
        and not node.keywords
        and len(node.args) <= 4
    ):
        try:
            return _FUNCTIONS[node.func.id](*(_eval(a) for a in node.args))
        except (ValueError, OverflowError, TypeError) as exc:
            raise ValueError(f"{node.func.id}: {exc}") from None
    raise ValueError(f"unsupported element: {type(node).__name__}")


def _format(value: int | float) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


@tool(timeout_s=5.0, idempotent=True)
def calculator(expression: str) -> str:
    """Evaluates an arithmetic expression exactly (integers) or in floating point.

    Args:
        expression: Arithmetic such as '1234*5678' or 'sqrt(2)/3'; + - * / // % ** ^, parentheses, sqrt, log, exp, sin, cos, tan, abs, round, min, max, pi, e.
    """
    try:
        return _format(evaluate(expression))
    except ValueError as exc:  # a refusal is the answer for this input: trying again gives the same
        raise ToolError(str(exc), tool="calculator", kind=ToolErrorKind.INVALID_ARGUMENTS) from None


CORPUS: list[tuple[str, str]] = [
    (
        "Ray (distributed computing)",
        "Ray is an open-source framework for scaling Python applications with tasks and actors across a cluster.",
    ),
    (
        "Ray actors",
        "A Ray actor is a stateful worker process; method calls on an actor run in order unless the actor is async or threaded.",
    ),
    (
        "Redis streams",
        "Redis streams are append-only logs with consumer groups, XADD to append, XREADGROUP to consume and XACK to acknowledge.",
    ),
    (
        "Token bucket",
        "A token bucket refills at a fixed rate up to a capacity; a request proceeds when enough tokens are available.",
    ),
    (
        "Circuit breaker",
        "A circuit breaker stops calls to a failing dependency after a failure threshold and retries after a wait in the half-open state.",
    ),
    (
        "Anthropic Messages API",
        "The Messages API takes a list of user and assistant messages and returns content blocks such as text and tool_use.",
    ),
    (
        "Prompt caching",
        "Prompt caching reuses a prefix of tools, system prompt and messages; cache reads are billed at a tenth of the input price.",
    ),
    (
        "Exponential backoff",
        "Exponential backoff with jitter spreads retries out in time so that clients do not retry in lockstep after a failure.",
    ),
    (
        "Load shedding",
        "Load shedding rejects work early when a system is overloaded so that the work it admits still finishes on time.",
    ),
    (
        "OpenTelemetry",
        "OpenTelemetry is a vendor-neutral standard for traces, metrics and logs, with semantic conventions for generative AI.",
    ),
    ("Paris", "Paris is the capital and most populous city of France, on the Seine river."),
    (
        "Mount Everest",
        "Mount Everest is Earth's highest mountain above sea level, at 8,849 metres, on the border of Nepal and China.",
    ),
    ("Python", "Python is a high-level programming language created by Guido van Rossum and first released in 1991."),
    ("Speed of light", "The speed of light in vacuum is exactly 299,792,458 metres per second."),
    (
        "Jain's fairness index",
        "Jain's index measures fairness of allocations: 1 when all shares are equal, 1/n when one party gets everything.",
    ),
]
_WORD = re.compile(r"[a-z0-9]+")


def search(query: str, max_results: int = 3) -> list[tuple[str, str]]:
    """Ranks corpus documents by how many distinct query words they contain."""
    words = set(_WORD.findall(query.lower()))
    scored = []
    for title, text in CORPUS:
        doc_words = set(_WORD.findall(f"{title} {text}".lower()))
        score = len(words & doc_words)
        if score:
            scored.append((score, title, text))
    scored.sort(key=lambda item: (-item[0], item[1]))
    return [(title, text) for _, title, text in scored[:max_results]]


@tool(timeout_s=10.0, idempotent=True)
def web_search(query: str, max_results: int = 3) -> str:
    """Searches a small offline encyclopedia and returns the best matching passages.

    Args:
        query: What to look for, in a few words.
        max_results: How many passages to return (1 to 10).
    """
    hits = search(query[:500], max(1, min(10, max_results)))
    if not hits:
        return "No results."
    return "\n".join(f"{title}: {text}" for title, text in hits)
