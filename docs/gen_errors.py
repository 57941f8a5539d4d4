"""The error index of docs/errors.md, read from the source at every docs build.

Every call that makes an error a user can meet (``UsageError``, ``ModelCodeError``, ``ValueError``, ``TypeError``,
``RuntimeError`` and argparse's ``ArgumentTypeError``) is found with ``ast`` in ``src/massact``, and its message is
rendered as a template: literal text as it is, each f-string placeholder as ``{expression}``. A message held in a
variable is followed to its assignment in the same function, or to the string a function of the same module returns.
``render()`` returns the Markdown, grouped by module, each message with the file and function that raise it.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "massact"
KINDS = ("UsageError", "ModelCodeError", "ValueError", "TypeError", "RuntimeError", "ArgumentTypeError")
LONG = 48  # a placeholder longer than this is shown as {...}


@dataclass
class Message:
    kind: str
    template: str
    where: str  # path:function
    line: int


def _placeholder(node: ast.FormattedValue) -> str:
    if any(isinstance(inner, (ast.JoinedStr, ast.IfExp, ast.Lambda, ast.ListComp, ast.GeneratorExp))
           for inner in ast.walk(node.value)):
        return "{...}"
    text = ast.unparse(node.value)
    if node.conversion != -1:
        text += "!" + chr(node.conversion)
    return "{...}" if len(text) > LONG else "{" + text + "}"


class _Module:
    """One source file: its functions by name, to follow a message built by a helper."""

    def __init__(self, tree: ast.Module):
        self.functions = {node.name: node for node in ast.walk(tree)
                          if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}

    def render(self, node: ast.expr, scope: ast.AST | None, depth: int = 0) -> str:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.JoinedStr):
            return "".join(part.value if isinstance(part, ast.Constant) else _placeholder(part) for part in node.values)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return self.render(node.left, scope, depth) + self.render(node.right, scope, depth)
        if depth < 3 and isinstance(node, ast.Name) and scope is not None:
            assigned = self._assigned(node.id, scope)
            if assigned is not None:
                return self.render(assigned, scope, depth + 1)
        if depth < 3 and isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in self.functions:
            function = self.functions[node.func.id]
            returned = [r.value for r in ast.walk(function) if isinstance(r, ast.Return) and r.value is not None
                        and not (isinstance(r.value, ast.Constant) and r.value.value is None)]
            if returned:
                return self.render(returned[-1], function, depth + 1)
        text = ast.unparse(node)
        return "{...}" if len(text) > LONG else "{" + text + "}"

    @staticmethod
    def _assigned(name: str, scope: ast.AST) -> ast.expr | None:
        """The last value assigned to ``name`` in ``scope`` (a function), if it is a plain assignment."""
        found = None
        for node in ast.walk(scope):
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
                found = node.value
        return found


def _kind(call: ast.Call) -> str | None:
    func = call.func
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
    return name if name in KINDS else None


def messages(path: Path) -> list[Message]:
    """The error messages made in one source file, in source order."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    module = _Module(tree)
    relative = path.relative_to(ROOT).as_posix()
    found: list[Message] = []

    def visit(node: ast.AST, names: tuple[str, ...], function: ast.AST | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, (*names, child.name), child)
                continue
            if isinstance(child, ast.ClassDef):
                visit(child, (*names, child.name), function)
                continue
            if isinstance(child, ast.Call) and (kind := _kind(child)) is not None and child.args:
                template = " ".join(module.render(child.args[0], function).split())
                where = f"{relative}:{'.'.join(names) or '<module>'}"
                found.append(Message(kind, template, where, child.lineno))
            visit(child, names, function)

    visit(tree, (), None)
    return found


def _code(text: str) -> str:
    """``text`` as one Markdown code span, whatever backticks it holds."""
    fence = "`"
    while fence in text:
        fence += "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def render() -> str:
    """The index as Markdown: one section per module, one item per distinct message and place."""
    out: list[str] = []
    total = 0
    sections: list[tuple[str, list[Message]]] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        seen: set[tuple[str, str, str]] = set()
        items = []
        for message in messages(path):
            key = (message.kind, message.template, message.where)
            if key not in seen:
                seen.add(key)
                items.append(message)
        if items:
            module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
            sections.append((module, items))
            total += len(items)
    out.append(f"{total} messages in {len(sections)} modules, read from `src/massact` when this page was built.\n")
    for module, items in sections:
        out.append(f"### {module}\n")
        for message in items:
            out.append(f"- {_code(message.template)}  \n  {message.kind}, `{message.where}` (line {message.line})")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(render())
