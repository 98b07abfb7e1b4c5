"""Check the project's TensorRT calls against the ``tensorrt-stubs`` description of TensorRT 10's API.

TensorRT cannot be installed on CI, so ``utils/trt_runtime.py`` would otherwise never be run before it
reaches a GPU machine. This reads the stub files (never importing them) and the callers' source,
follows the values the code gets from ``tensorrt`` through the return types the stubs declare, and
reports every class, enum member, property or method that does not exist, every call whose
positional / keyword arguments fit none of the declared signatures, every property called like a
method and method used like a property, every assignment to a read-only property, and every attribute
taken from a TensorRT value whose type the stubs leave open (so nothing goes unchecked silently).
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

from tests.project_files import project_files

STUBS_ROOT = Path(__file__).resolve().parents[1] / ".trt-stubs"
VERSIONS_FILE = Path(__file__).resolve().parent / "data" / "tensorrt_stubs_versions.txt"
INSTALL_HINT = "scripts/install_trt_stubs.sh"
# The package a file imports to call TensorRT.
TRT_MODULE = "tensorrt"
# Module path prefixes the stubs use when they name a bindings class from another module.
_STUB_MODULE_PREFIXES = ("tensorrt_bindings", "tensorrt")


@dataclass(frozen=True)
class Param:
    name: str
    has_default: bool
    kind: str  # "pos" (positional or keyword), "posonly", "kwonly", "varargs", "varkw"


@dataclass(frozen=True)
class Signature:
    params: tuple[Param, ...]
    returns: ast.expr | None
    text: str

    def bound(self) -> Signature:
        """The signature as called on an instance or class: without ``self``."""
        return Signature(self.params[1:], self.returns, self.text)

    def rejects(self, n_positional: int | None, keywords: list[str] | None) -> str | None:
        """Why a call with these arguments cannot bind; None when it can (None counts: unknown)."""
        positional = [p for p in self.params if p.kind in ("pos", "posonly")]
        takes_varargs = any(p.kind == "varargs" for p in self.params)
        takes_varkw = any(p.kind == "varkw" for p in self.params)
        if n_positional is not None and n_positional > len(positional) and not takes_varargs:
            return f"takes at most {len(positional)} positional argument(s), {n_positional} given"
        named = {p.name for p in self.params if p.kind in ("pos", "kwonly")}
        for kw in keywords or []:
            if kw not in named and not takes_varkw:
                return f"has no keyword argument {kw!r}"
        if n_positional is None or keywords is None:
            return None  # a *args or **kwargs call: its count is unknown
        filled = positional[:n_positional]
        for kw in keywords:
            if any(p.name == kw for p in filled):
                return f"argument {kw!r} given twice"
        missing = [p.name for p in self.params if p.kind in ("pos", "posonly", "kwonly") and not p.has_default
                   and p not in filled and p.name not in keywords]
        return f"missing required argument(s) {', '.join(missing)}" if missing else None


@dataclass
class Member:
    kind: str  # "method", "property", "attribute", "class"
    signatures: list[Signature] = field(default_factory=list)
    annotation: ast.expr | None = None
    settable: bool = False
    static: bool = False
    cls: StubClass | None = None


@dataclass
class StubClass:
    name: str
    bases: list[str]
    members: dict[str, Member]


class StubAPI:
    """The ``tensorrt`` module as one tensorrt-stubs release describes it."""

    def __init__(self, root: Path):
        self.root = root
        self.version = _installed_version(root)
        bindings = _parse_stub(root / "tensorrt_bindings" / "tensorrt.pyi")
        helpers = _parse_stub(root / "tensorrt_bindings" / "__init__.pyi")
        self.classes: dict[str, StubClass] = {}
        self.bindings = self._namespace(bindings)
        helper_names = self._namespace(helpers)
        self.module = self._package_namespace(_parse_stub(root / TRT_MODULE / "__init__.pyi"), helper_names)

    def _namespace(self, tree: ast.Module) -> dict[str, Member]:
        names: dict[str, Member] = {}
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                names[node.name] = Member("class", cls=self._class(node, node.name))
            else:
                _add_definition(names, node)
        return names

    def _class(self, node: ast.ClassDef, qualname: str) -> StubClass:
        members: dict[str, Member] = {}
        for item in node.body:
            if isinstance(item, ast.ClassDef):
                members[item.name] = Member("class", cls=self._class(item, f"{qualname}.{item.name}"))
            else:
                _add_definition(members, item)
        cls = StubClass(qualname, [ast.unparse(b) for b in node.bases], members)
        self.classes[qualname] = cls
        return cls

    def _package_namespace(self, tree: ast.Module, helpers: dict[str, Member]) -> dict[str, Member]:
        """The ``tensorrt`` package: what it re-exports from the bindings plus its own names."""
        names: dict[str, Member] = {}
        for node in tree.body:
            if isinstance(node, ast.ImportFrom):
                source = self.bindings if node.module == "tensorrt_bindings.tensorrt" else helpers
                for alias in node.names:
                    names[alias.asname or alias.name] = source.get(alias.name, Member("attribute"))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    names[alias.asname or alias.name.split(".")[0]] = Member("attribute")
            else:
                _add_definition(names, node)
        return names

    def lookup(self, cls: StubClass, name: str) -> Member | None:
        """``name`` on ``cls`` or one of its stub base classes."""
        seen: set[str] = set()
        pending = [cls]
        while pending:
            current = pending.pop(0)
            if current.name in seen:
                continue
            seen.add(current.name)
            if name in current.members:
                return current.members[name]
            pending += [base for base in map(self.resolve_class_name, current.bases) if base]
        return None

    def resolve_class_name(self, dotted: str) -> StubClass | None:
        parts = dotted.split(".")
        while parts and parts[0] in _STUB_MODULE_PREFIXES:
            parts = parts[1:]
        return self.classes.get(".".join(parts)) if parts else None


def _installed_version(root: Path) -> str:
    for meta in root.glob("tensorrt_stubs-*.dist-info/METADATA"):
        for line in meta.read_text().splitlines():
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def _parse_stub(path: Path) -> ast.Module:
    """Parse a generated stub; the few headers that are not valid Python (a parameter named ``in``,
    a required parameter after defaulted ones) are parsed by ``_split_params`` from the original text."""
    lines = path.read_text().replace("\r\n", "\n").split("\n")
    original = list(lines)
    while True:
        try:
            tree = ast.parse("\n".join(lines))
            break
        except SyntaxError as err:
            index = (err.lineno or 0) - 1
            if index < 0 or not lines[index].lstrip().startswith("def ") or lines[index] != original[index]:
                raise
            lines[index] = re.sub(r"\(.*\)(?=\s*(->|:))", "(*args, **kwargs)", lines[index], count=1)
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            node.header = original[node.lineno - 1].strip().removeprefix("def ").removesuffix(":")  # type: ignore[attr-defined]
    return tree


def _split_top_level(text: str, separator: str) -> list[str]:
    """``text`` cut at each ``separator`` outside brackets, up to the bracket that closes around it."""
    pieces, depth, current = [], 0, ""
    for char in text:
        depth += (char in "([{") - (char in ")]}")
        if depth < 0:
            break
        if char == separator and depth == 0:
            pieces.append(current.strip())
            current = ""
        else:
            current += char
    return pieces + [current.strip()]


def _split_params(header: str) -> tuple[Param, ...]:
    """The parameters of a one-line ``name(...) -> T`` header."""
    params: list[Param] = []
    kind = "pos"
    for piece in filter(None, _split_top_level(header[header.index("(") + 1:], ",")):
        if piece == "/":
            params = [Param(p.name, p.has_default, "posonly") for p in params]
        elif piece == "*":
            kind = "kwonly"
        elif piece.startswith("**"):
            params.append(Param(piece[2:].split(":")[0].strip(), False, "varkw"))
        elif piece.startswith("*"):
            params.append(Param(piece[1:].split(":")[0].strip(), False, "varargs"))
            kind = "kwonly"
        else:
            name = re.split(r"[:=]", piece, maxsplit=1)[0].strip()
            params.append(Param(name, len(_split_top_level(piece, "=")) > 1, kind))
    return tuple(params)


def _add_definition(names: dict[str, Member], node: ast.stmt) -> None:
    """Record a function, property (and its setter) or annotated attribute of a stub namespace."""
    if isinstance(node, ast.FunctionDef):
        decorators = [ast.unparse(d) for d in node.decorator_list]
        signature = Signature(_split_params(node.header), node.returns, node.header)  # type: ignore[attr-defined]
        if "property" in decorators:
            names[node.name] = Member("property", [signature], annotation=node.returns)
        elif any(d.endswith(".setter") for d in decorators):
            if node.name in names:
                names[node.name].settable = True
        else:
            member = names.setdefault(node.name, Member("method", static="staticmethod" in decorators))
            member.signatures.append(signature)
    elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        is_classvar = "ClassVar" in ast.unparse(node.annotation)
        names[node.target.id] = Member("attribute", annotation=node.annotation, settable=not is_classvar)


# --- values the analysed code holds --------------------------------------------------------------

@dataclass(frozen=True)
class TrtValue:
    """What the checker knows about an expression that came from TensorRT."""
    kind: str  # "module", "class" (the class object), "instance", "list" (of instances), "callable", "opaque"
    cls: StubClass | None = None
    member: Member | None = None
    bound: bool = False
    origin: str = ""  # how the code got it, for messages

    def describe(self) -> str:
        if self.kind == "module":
            return TRT_MODULE
        return self.cls.name if self.cls else self.origin


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


class _Checker(ast.NodeVisitor):
    """Walks one module twice: the first pass learns what ``self.x`` and module names hold, the
    second reports. Values not from TensorRT are None and are not checked."""

    def __init__(self, api: StubAPI, path: str):
        self.api, self.path = api, path
        self.module_scope: dict[str, TrtValue | None] = {}
        self.class_scopes: dict[str, dict[str, TrtValue | None]] = {}
        self.scopes: list[dict[str, TrtValue | None]] = [self.module_scope]
        self.class_stack: list[str] = []
        self.findings: list[Finding] = []
        self.uses: set[str] = set()  # every TensorRT name the code was checked for
        self.reporting = False
        self.called: set[int] = set()

    def run(self, tree: ast.Module) -> tuple[list[Finding], set[str]]:
        self.called = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
        self.visit(tree)
        self.reporting = True
        self.visit(tree)
        unique = {(f.line, f.message): f for f in self.findings}
        return [unique[key] for key in sorted(unique)], self.uses

    def report(self, node: ast.AST, message: str) -> None:
        if self.reporting:
            self.findings.append(Finding(self.path, getattr(node, "lineno", 0), message))

    # -- bindings --
    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name == TRT_MODULE:
                self.scopes[-1][alias.asname or alias.name] = TrtValue("module")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module == TRT_MODULE:
            for alias in node.names:
                self.scopes[-1][alias.asname or alias.name] = self._module_attr(node, alias.name, imported=True)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for expr in node.bases + node.decorator_list:
            self.value_of(expr)
        self.class_stack.append(node.name)
        self.scopes.append(self.class_scopes.setdefault(node.name, {}))  # class attributes, seen as self.x
        for stmt in node.body:
            self.visit(stmt)
        self.scopes.pop()
        self.class_stack.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for expr in node.decorator_list + node.args.defaults + [d for d in node.args.kw_defaults if d]:
            self.value_of(expr)
        self._declared(node.returns)
        scope = {arg.arg: self._declared(arg.annotation)
                 for arg in node.args.posonlyargs + node.args.args + node.args.kwonlyargs}
        self.scopes.append(scope)
        for stmt in node.body:
            self.visit(stmt)
        self.scopes.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Assign(self, node: ast.Assign) -> None:
        value = self.value_of(node.value)
        for target in node.targets:
            self.bind(target, value)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        declared = self._declared(node.annotation)
        self.bind(node.target, self.value_of(node.value) if node.value else declared)

    def visit_For(self, node: ast.For) -> None:
        iterable = self.value_of(node.iter)
        self.bind(node.target, self._element_of(iterable))
        for stmt in node.body + node.orelse:
            self.visit(stmt)

    def visit_With(self, node: ast.With) -> None:
        for item in node.items:
            value = self.value_of(item.context_expr)  # TensorRT objects return themselves from __enter__
            if item.optional_vars is not None:
                self.bind(item.optional_vars, value)
        for stmt in node.body:
            self.visit(stmt)

    def visit_Expr(self, node: ast.Expr) -> None:
        self.value_of(node.value)

    def generic_visit(self, node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                self.value_of(child)
            else:
                self.visit(child)

    def bind(self, target: ast.expr, value: TrtValue | None) -> None:
        if isinstance(target, ast.Name):
            self.scopes[-1][target.id] = value
        elif isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self" \
                and self.class_stack:
            self.class_scopes[self.class_stack[-1]][target.attr] = value
        elif isinstance(target, ast.Attribute):
            self._store_attribute(target)
        elif isinstance(target, (ast.Tuple, ast.List)):
            for element in target.elts:
                self.bind(element, self._element_of(value))
        else:
            self.value_of(target)

    def lookup_name(self, name: str) -> TrtValue | None:
        """A name as a function body sees it: its own scopes, outwards, never a class body's."""
        for scope in reversed(self.scopes):
            if name in scope and not any(scope is c for c in self.class_scopes.values()):
                return scope[name]
        return None

    # -- expressions --
    def value_of(self, node: ast.expr | None) -> TrtValue | None:
        """What TensorRT value ``node`` evaluates to (None: not a TensorRT value), checking it on the way."""
        if node is None:
            return None
        if isinstance(node, ast.Name):
            return self.lookup_name(node.id)
        if isinstance(node, ast.Attribute):
            return self._attribute(node)
        if isinstance(node, ast.Call):
            return self._call(node)
        if isinstance(node, ast.Subscript):
            container = self.value_of(node.value)
            self.value_of(node.slice)
            return self._item_of(container)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                self.value_of(child)
            elif isinstance(child, ast.comprehension):
                self.bind(child.target, self._element_of(self.value_of(child.iter)))
                for condition in child.ifs:
                    self.value_of(condition)
        return None

    def _attribute(self, node: ast.Attribute) -> TrtValue | None:
        if isinstance(node.value, ast.Name) and node.value.id == "self" and self.class_stack:
            return self.class_scopes[self.class_stack[-1]].get(node.attr)
        owner = self.value_of(node.value)
        if owner is None:
            return None
        if owner.kind == "module":
            return self._module_attr(node, node.attr)
        if owner.kind in ("opaque", "list", "callable") or owner.cls is None:
            self.report(node, f"cannot check .{node.attr}: the stubs do not say what {owner.describe()} is")
            return None
        member = self.api.lookup(owner.cls, node.attr)
        if member is None:
            what = "class" if owner.kind == "class" else "instance"
            self.report(node, f"TensorRT {owner.cls.name} has no attribute {node.attr!r} ({what}; "
                              f"tensorrt-stubs {self.api.version})")
            return None
        return self._member_value(node, member, owner.kind == "instance", f"{owner.cls.name}.{node.attr}")

    def _module_attr(self, node: ast.AST, name: str, imported: bool = False) -> TrtValue | None:
        member = self.api.module.get(name)
        if member is None:
            self.report(node, f"module tensorrt has no attribute {name!r} (tensorrt-stubs {self.api.version})")
            return None
        return self._member_value(node, member, False, f"tensorrt.{name}", imported)

    def _member_value(self, node: ast.AST, member: Member, on_instance: bool, origin: str,
                      imported: bool = False) -> TrtValue | None:
        if self.reporting:
            self.uses.add(origin)
        if member.kind == "class":
            return TrtValue("class", member.cls, origin=origin)
        if member.kind == "method":
            if id(node) not in self.called and not imported:
                self.report(node, f"{origin} is a method: call it")
            return TrtValue("callable", member=member, bound=on_instance and not member.static, origin=origin)
        if member.kind == "property" and id(node) in self.called:
            self.report(node, f"{origin} is a property, not a method")
        return self._annotation_value(member.annotation, origin)

    def _store_attribute(self, target: ast.Attribute) -> None:
        owner = self.value_of(target.value)
        if owner is None or owner.kind != "instance" or owner.cls is None:
            if owner is not None:
                self.report(target, f"cannot check assignment to .{target.attr} on {owner.describe()}")
            return
        member = self.api.lookup(owner.cls, target.attr)
        if member is None:
            self.report(target, f"TensorRT {owner.cls.name} has no attribute {target.attr!r} to set "
                                f"(tensorrt-stubs {self.api.version})")
        elif not member.settable:
            self.report(target, f"{owner.cls.name}.{target.attr} is read-only")

    def _call(self, node: ast.Call) -> TrtValue | None:
        func = self.value_of(node.func)
        for arg in node.args:
            self.value_of(arg.value if isinstance(arg, ast.Starred) else arg)
        for keyword in node.keywords:
            self.value_of(keyword.value)
        if func is None:
            return None
        n_positional = None if any(isinstance(a, ast.Starred) for a in node.args) else len(node.args)
        keywords = None if any(k.arg is None for k in node.keywords) else [k.arg for k in node.keywords]
        if func.kind == "class":
            init = self.api.lookup(func.cls, "__init__") if func.cls else None
            if init is None or init.kind != "method":
                self.report(node, f"TensorRT {func.describe()} has no constructor")
                return None
            self._check_arity(node, [s.bound() for s in init.signatures], n_positional, keywords,
                              f"{func.describe()}()")
            return TrtValue("instance", func.cls, origin=func.origin)
        if func.kind == "callable" and func.member:
            signatures = [s.bound() if func.bound else s for s in func.member.signatures]
            candidates = self._check_arity(node, signatures, n_positional, keywords, f"{func.origin}()") or signatures
            return self._one_of([self._annotation_value(s.returns, f"{func.origin}()") for s in candidates],
                                f"{func.origin}()")
        self.report(node, f"cannot check the call of {func.describe()}")
        return None

    def _check_arity(self, node: ast.Call, signatures: list[Signature], n_positional: int | None,
                     keywords: list[str] | None, what: str) -> list[Signature]:
        matching = [s for s in signatures if s.rejects(n_positional, keywords) is None]
        if not matching:
            reasons = "; ".join(f"{s.text}: {s.rejects(n_positional, keywords)}" for s in signatures)
            self.report(node, f"{what}: no TensorRT signature accepts these arguments "
                              f"(tensorrt-stubs {self.api.version}): {reasons}")
        return matching

    def _declared(self, annotation: ast.expr | None) -> TrtValue | None:
        """What a project annotation such as ``trt.ICudaEngine`` declares (checked like any other use)."""
        annotated = self.value_of(annotation)
        return TrtValue("instance", annotated.cls, origin=annotated.origin) \
            if annotated and annotated.kind == "class" else None

    def _annotation_value(self, annotation: ast.expr | None, origin: str = "") -> TrtValue | None:
        """The value a stub annotation describes: a stub class instance, a list of them, opaque or None."""
        if annotation is None:
            return None
        if isinstance(annotation, ast.Constant) and annotation.value is Ellipsis:
            return TrtValue("opaque", origin=origin)
        if isinstance(annotation, ast.Subscript):
            outer = ast.unparse(annotation.value)
            if outer.endswith("ClassVar"):
                return self._annotation_value(annotation.slice, origin)
            if outer == "list":
                inner = self._annotation_value(annotation.slice, origin)
                return TrtValue("list", inner.cls, origin=origin) if inner and inner.cls else None
            return None
        cls = self.api.resolve_class_name(ast.unparse(annotation))
        return TrtValue("instance", cls, origin=origin) if cls else None

    @staticmethod
    def _one_of(values: list[TrtValue | None], origin: str) -> TrtValue | None:
        """The value of a call that matches several overloads: theirs if they agree, else opaque."""
        if all(v is None for v in values):
            return None  # plain Python results (int, str, tuple ...)
        kinds = {(v.kind, v.cls.name if v.cls else None) if v else None for v in values}
        return values[0] if len(kinds) == 1 else TrtValue("opaque", origin=origin)

    def _item_of(self, value: TrtValue | None) -> TrtValue | None:
        """An element of a TensorRT list, or what ``__getitem__`` of a TensorRT object returns."""
        if value is None:
            return None
        if value.kind == "list":
            return TrtValue("instance", value.cls, origin=value.origin)
        origin = f"an item of {value.describe()}"
        member = self.api.lookup(value.cls, "__getitem__") if value.kind == "instance" and value.cls else None
        if member is None or not member.signatures:
            return TrtValue("opaque", origin=origin)
        return self._one_of([self._annotation_value(s.returns, origin) for s in member.signatures], origin)

    _element_of = _item_of


def check_source(api: StubAPI, source: str, path: str = "<snippet>") -> tuple[list[Finding], set[str]]:
    """Every TensorRT API misuse the stubs reveal in ``source``, and the TensorRT names it was checked for."""
    return _Checker(api, path).run(ast.parse(source))


def imports_tensorrt(tree: ast.Module) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == TRT_MODULE for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == TRT_MODULE and not node.level:
            return True
    return False


def tensorrt_callers(root: Path) -> list[Path]:
    """Project Python files that import ``tensorrt``."""
    sources = {path: path.read_text() for path in project_files(root, ".py")}
    return [path for path, text in sources.items()
            if TRT_MODULE in text and imports_tensorrt(ast.parse(text, str(path)))]


def pinned_versions() -> list[str]:
    """The tensorrt-stubs releases the check runs against (tests/data/tensorrt_stubs_versions.txt)."""
    lines = (line.split("#", 1)[0].strip() for line in VERSIONS_FILE.read_text().splitlines())
    return [line for line in lines if line]


def load_stubs(version: str) -> StubAPI:
    """The API one pinned release describes; a clear error, saying how to get it, when it is missing."""
    root = STUBS_ROOT / version
    if not (root / "tensorrt_bindings" / "tensorrt.pyi").is_file():
        raise FileNotFoundError(f"{root}: tensorrt-stubs {version} is not installed; run {INSTALL_HINT} "
                                f"(pip install --no-deps --target {root} tensorrt-stubs=={version})")
    api = StubAPI(root)
    if api.version != version:
        raise FileNotFoundError(f"{root} holds tensorrt-stubs {api.version}, not {version}; "
                                f"delete it and run {INSTALL_HINT}")
    return api
