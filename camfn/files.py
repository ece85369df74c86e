"""Files camfn reads from users and writes for them: nothing read may run code, nothing written follows a link.

Reading (every file is untrusted):

* tensors (``--weights``, ``camfn eval`` shards): ``torch.load(..., weights_only=True)`` only (:func:`load_tensors`);
* JSON (``camfn eval``'s ``config.json``, ``index.json``, per-shard entries): parsed as JSON, then checked by the
  caller's validator; a truncated or damaged file raises :class:`~camfn.errors.DamagedFileError`
  (:func:`read_json`), never ``JSONDecodeError``;
* ``torch.export`` programs (``.pt2``): :func:`load_exported` reads the archive into memory once, inspects every
  entry (:func:`check_exported`) and only then hands the same bytes to ``torch.export.load``. ``torch.export.load``
  itself would run code from a hostile file in four places: pickled weights, constants and legacy
  ``data/weights/*.pt`` entries are unpickled with ``weights_only=False``; opaque constants with ``pickle.loads``;
  symbolic shape strings with ``sympy.sympify`` (an ``eval``); and ``guards_code`` is compiled into Python. So
  every non-JSON, non-raw entry must load with ``weights_only=True``, custom/opaque objects and TorchScript are
  refused, graph targets must be ``torch.ops`` operators or plain arithmetic, shape expressions and guards must
  match a small grammar of symbols, numbers and operators. A refusal raises
  :class:`~camfn.errors.UnsafeFileError` naming the file and the entry.

Writing: :func:`write_bytes` / :func:`write_json` write a temporary file next to the destination and
``os.replace`` it: a symlink (or anything else) at the destination is replaced, never followed, and a reader
never sees half a file.

Example:
    >>> import io, tempfile, torch
    >>> from pathlib import Path
    >>> from camfn.files import load_tensors, write_bytes
    >>> buffer = io.BytesIO()
    >>> torch.save({"w": torch.ones(2)}, buffer)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     write_bytes(Path(d) / "w.pt", buffer.getvalue())
    ...     load_tensors(Path(d) / "w.pt")["w"].tolist()
    [1.0, 1.0]
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import DamagedFileError, InputError, UnsafeFileError

__all__ = [
    "check_exported",
    "check_folder",
    "load_exported",
    "load_tensors",
    "read_json",
    "write_bytes",
    "write_json",
]

MAX_FILE_BYTES = 16 << 30
"""Largest file camfn reads (16 GiB), and the largest sum of an archive's declared entry sizes."""


# --------------------------------------------------------------------------------------------- writing
def check_folder(path: Path, name: str) -> None:
    """Refuse an output folder ``path`` (the option ``name``) that is a file, lies under a file, or cannot be
    written: checked before any work, so nothing is computed for output that cannot be saved."""
    path = Path(path)
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                where = "is a file" if folder == path else f"is under {folder}, which is a file"
                raise InputError(f"{name} {path} {where}; pass a folder (it is created when missing)")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise InputError(f"{name} {path}: {folder} is not writable; pass a folder you can write to")
            return


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder, then ``os.replace``.

    A symlink at ``path`` is replaced by the new file (its target is never written).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path: Path, data: Any) -> None:
    """:func:`write_bytes` of ``data`` as indented, key-sorted JSON (one line feed at the end)."""
    write_bytes(path, (json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n").encode())


# --------------------------------------------------------------------------------------------- reading
def _read(path: Path, what: str) -> bytes:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} not found: {path}")
    if not path.is_file():
        raise InputError(f"{what} {path} is not a file")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise InputError(f"{what} {path} is larger than {MAX_FILE_BYTES >> 30} GiB; camfn does not read it")
    return path.read_bytes()


def read_json(path: Path, what: str = "JSON file", validate: Callable[[Any], None] | None = None) -> Any:
    """The JSON value in ``path`` (no other format is read); ``validate(value)`` may raise to refuse it.

    A file that is not valid UTF-8 JSON, or that ``validate`` refuses (any exception), raises
    :class:`~camfn.errors.DamagedFileError` naming the file; ``NaN``/``Infinity`` literals are refused.
    """
    data = _read(path, what)

    def no_constants(name: str) -> Any:
        raise ValueError(f"the non-JSON constant {name}")

    try:
        value = json.loads(data.decode("utf-8"), parse_constant=no_constants)
        if validate is not None:
            validate(value)
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as e:
        raise DamagedFileError(
            f"{what} {path} is damaged or not camfn's ({type(e).__name__}: {str(e)[:200]}); delete it (camfn "
            "rewrites it) or restore it"
        ) from None
    return value


def _safe_load(data: bytes) -> Any:
    with warnings.catch_warnings():  # torch warns about pickle protocols before refusing a file: the error says it
        warnings.simplefilter("ignore", UserWarning)
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def load_tensors(path: Path, what: str = "tensor file") -> Any:
    """``torch.load(path, weights_only=True)`` on CPU: tensors and plain containers only, never code.

    A file that is not such a file (or holds other objects) raises :class:`~camfn.errors.InputError` naming it.
    """
    data = _read(path, what)
    try:
        return _safe_load(data)
    except Exception as e:
        raise InputError(
            f"cannot read {what} {path} as tensors (torch.load with weights_only=True): {_load_failure(e)}. Save "
            "plain tensors and dicts of tensors (torch.save(model.state_dict(), path))"
        ) from None


# --------------------------------------------------------------------------------------------- .pt2 inspection
_TEXT_ENTRIES = {"archive_format", "archive_version", "version", "byteorder", ".data/version", ".data/serialization_id"}
_OPERATOR = re.compile(  # a registered operator of a known namespace; no dunder attribute (``__call__``) anywhere
    r"torch\.ops\.(aten|prims|higher_order|quantized_decomposed|torchvision)\.(?!__)[A-Za-z_]\w*(\.(?!__)[A-Za-z_]\w*)?"
)
_SAFE_OPERATORS = {
    "_operator": {
        "getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs", "eq", "ne",
        "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert", "lshift", "rshift", "matmul", "truth",
    },
    "math": {"sqrt", "floor", "ceil", "trunc", "exp", "log", "log2", "log10", "sin", "cos", "tan", "tanh", "pow"},
    "torch": {
        "sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sqrt", "sym_sum", "_sym_sqrt",
        "sym_fresh_size",
    },
}  # fmt: skip
# sympy names torch's deserializer may meet in a shape expression (srepr form: Symbol('s0', integer=True))
_SYMPY_NAMES = {
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs", "Eq", "Ne", "Lt",
    "Le", "Gt", "Ge", "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan", "Equality", "Unequality",
    "And", "Or", "Not", "true", "false", "True", "False", "oo", "zoo", "nan", "floor", "ceiling", "Piecewise",
    "ExprCondPair", "BooleanTrue", "BooleanFalse", "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv",
    "CeilToInt", "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv",
    "IntTrueDiv", "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal",
    "ToFloat", "OpaqueUnaryFn_sqrt", "BitwiseFn_bitwise_and", "BitwiseFn_bitwise_or", "Identity", "int_oo",
    "positive", "negative", "integer", "real", "nonnegative", "nonpositive", "finite", "infinite", "zero",
    "nonzero", "odd", "even", "rational", "commutative", "extended_real", "None",
}  # fmt: skip
_EXPR_TOKEN = re.compile(r"\s+|'[A-Za-z][A-Za-z0-9]*'|\d+\.\d+(e[+-]?\d+)?|\d+|[A-Za-z_]\w*|\*\*|//|[-+*/%(),=<>!&|~]")
_SYMBOL = re.compile(r"[a-z]+\d+")
_GUARD_TOKEN = re.compile(
    r"\s+|L\['[A-Za-z_]\w*'\](\[\d+\]|\['[A-Za-z_]\w*'\])*|\.size\(\)|\.stride\(\)|\.storage_offset\(\)|\.dim\(\)"
    r"|\[\d+\]|\d+|and|or|not|==|!=|<=|>=|//|[-+*%()<>]"
)


def _grammar(text: str, token: re.Pattern[str], names: set[str] | None) -> str | None:
    """The first piece of ``text`` outside the grammar (tokens of ``token``; identifiers in ``names``), or None."""
    pos = 0
    while pos < len(text):
        m = token.match(text, pos)
        if not m or m.end() == pos:
            return text[pos : pos + 20]
        word = m.group(0)
        identifier = re.fullmatch(r"[A-Za-z_]\w*", word)
        if names is not None and identifier and word not in names and not _SYMBOL.fullmatch(word):
            return word
        pos = m.end()
    return None


def _walk(value: Any) -> Iterator[tuple[str | None, Any]]:
    """Every (key, value) pair in a JSON tree (lists give key None)."""
    stack = [(None, value)]
    while stack:
        key, v = stack.pop()
        yield key, v
        if isinstance(v, dict):
            stack.extend(v.items())
        elif isinstance(v, list):
            stack.extend((None, x) for x in v)


def _target_refusal(target: str) -> str | None:
    if _OPERATOR.fullmatch(target):
        return None
    head, _, name = target.partition(".")
    if name in _SAFE_OPERATORS.get(head, ()):
        return None
    return f"the graph calls {target!r}, which is not a torch.ops operator or plain arithmetic"


def _program_refusal(program: Any) -> str | None:
    """Why a serialized program (the JSON of ``models/<name>.json``) could run code, or None."""
    if not isinstance(program, dict):
        return "it is not a serialized program (a JSON object)"
    for guard in program.get("guards_code") or []:
        bad = _grammar(guard, _GUARD_TOKEN, None) if isinstance(guard, str) else "(not a string)"
        if bad is not None:
            return f"its guards_code {str(guard)[:80]!r} is not a shape guard (at {bad!r})"
    for key in program.get("range_constraints") or {}:
        if not re.fullmatch(r"[A-Za-z]\w*", str(key)):
            return f"its range constraint {str(key)[:80]!r} is not a symbol name"
    for key, value in _walk(program):
        if isinstance(value, dict) and {"target", "inputs", "outputs"} <= value.keys():
            target = value["target"]
            why = _target_refusal(target) if isinstance(target, str) else "a graph node has a non-string target"
            if why:
                return why
        if key == "expr_str":
            bad = _grammar(value, _EXPR_TOKEN, _SYMPY_NAMES) if isinstance(value, str) else "(not a string)"
            if bad is not None:
                return f"its shape expression {str(value)[:80]!r} holds {bad!r}, which is not a sympy symbol"
    return None


def _tensor_refusal(data: bytes) -> str | None:
    """Why ``data`` is not a plain ``torch.save`` file of tensors (weights_only), or None."""
    if data[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as inner:
                names = inner.namelist()
        except zipfile.BadZipFile:
            return "it is a damaged zip archive"
        if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
            return "it is a TorchScript archive (code)"
    try:
        _safe_load(data)
    except Exception as e:
        return f"it does not load with torch.load(weights_only=True) ({_load_failure(e)})"
    return None


def _load_failure(e: Exception) -> str:
    """A one-line reason from a ``torch.load`` failure (the global a pickle asked for, when that was it)."""
    text = str(e)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text) or re.search(r"Unsupported operand \S+", text)
    if found:
        what = found.group(1) if found.groups() else found.group(0)
        return f"its pickle asks for the Python object {what}, which is not tensor data"
    first = re.sub(r"\x1b\[[0-9;]*m", "", (text.splitlines() or [""])[0])[:160]
    return f"{type(e).__name__}: {first}"


def _raw_payloads(configs: dict[str, Any]) -> set[str]:
    """Entries that weights/constants configs declare as raw tensor bytes (``use_pickle: false``)."""
    raw = set()
    for folder, config in configs.items():
        entries = config.get("config", {}) if isinstance(config, dict) else {}
        for meta in entries.values() if isinstance(entries, dict) else ():
            if isinstance(meta, dict) and meta.get("use_pickle") is False and isinstance(meta.get("path_name"), str):
                raw.add(folder + meta["path_name"])
    return raw


def check_exported(data: bytes, name: str = "<bytes>") -> bytes:
    """Refuse a ``torch.export`` archive (the bytes of a ``.pt2``) that could run code when loaded or run;
    return the inspected entries as a fresh archive (what ``torch.export.load`` may then read).

    Raises :class:`~camfn.errors.UnsafeFileError` naming ``name`` and the entry, or
    :class:`~camfn.errors.InputError` for a file that is not a zip archive. See :mod:`camfn.files`. The
    returned archive is rebuilt from exactly the bytes inspected (no duplicate names, no data outside the
    entries), so torch's own zip reader cannot see anything the inspection did not.

    Example:
        >>> import io, torch
        >>> from camfn.files import check_exported
        >>> buffer = io.BytesIO()
        >>> torch.export.save(torch.export.export(torch.nn.ReLU(), (torch.randn(2),)), buffer)
        >>> clean = check_exported(buffer.getvalue(), "relu.pt2")  # a plain export passes
        >>> torch.export.load(io.BytesIO(clean)).module()(torch.tensor([-1.0, 2.0]))
        tensor([0., 2.])
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise InputError(
            f"{name} is not a torch.export archive (not a zip file); save the program with torch.export.save"
        ) from None
    with archive:
        infos = archive.infolist()
        if sum(i.file_size for i in infos) > MAX_FILE_BYTES:
            raise UnsafeFileError(f"{name}: its entries declare more than {MAX_FILE_BYTES >> 30} GiB (a zip bomb?)")
        names = [i.filename for i in infos if not i.is_dir()]
        if len(set(names)) != len(names):
            raise UnsafeFileError(
                f"{name}: the archive holds two entries of one name; re-save it with torch.export.save"
            )
        contents = {n: archive.read(n) for n in names}
        prefixes = {n.split("/", 1)[0] + "/" for n in names if "/" in n}
        prefix = prefixes.pop() if len(prefixes) == 1 and all("/" in n for n in names) else ""

        def refuse(entry: str, why: str) -> UnsafeFileError:
            return UnsafeFileError(
                f"{name}: refused to load entry {entry!r}: {why}. camfn never runs code from a file; re-export the "
                "model yourself with torch.export.save (plain tensors), or load it only if you trust its source"
            )

        relative = {n: n[len(prefix) :] for n in names}
        parsed: dict[str, Any] = {}
        for entry, rel in relative.items():
            if rel.endswith(".json"):
                try:
                    parsed[rel] = json.loads(contents[entry].decode("utf-8"))
                except (ValueError, UnicodeDecodeError) as e:
                    raise refuse(entry, f"it is not valid JSON ({type(e).__name__})") from None
        configs = {
            rel.rsplit("/", 1)[0] + "/": value
            for rel, value in parsed.items()
            if rel.endswith(("_weights_config.json", "_constants_config.json"))
        }
        raw = _raw_payloads(configs)
        for entry, rel in relative.items():
            base = rel.rsplit("/", 1)[-1]
            if rel in parsed:
                if rel.startswith("models/") or rel == "serialized_exported_program.json":
                    why = _program_refusal(parsed[rel])
                    if why:
                        raise refuse(entry, why)
                continue
            if rel in _TEXT_ENTRIES or rel.startswith(("extra/", "extra_files/")) or rel in raw:
                continue
            if rel.startswith("data/sample_inputs/") and not contents[entry]:
                continue  # torch.export.save writes an empty entry for a program without example inputs
            if base.startswith(("custom_obj", "opaque_obj")) or rel.startswith("data/aotinductor/"):
                raise refuse(entry, "it holds a Python object or compiled code, not tensors")
            why = _tensor_refusal(contents[entry])
            if why:
                raise refuse(entry, why)
    clean = io.BytesIO()
    with zipfile.ZipFile(clean, "w", zipfile.ZIP_STORED) as out:
        for entry, payload in contents.items():
            out.writestr(entry, payload)
    return clean.getvalue()


def load_exported(path: Path) -> Any:
    """A ``torch.export.ExportedProgram`` from a ``.pt2`` file, after :func:`check_exported` of its bytes.

    The file is read once; ``torch.export.load`` reads the archive rebuilt from the inspected entries (no
    second read of the path).
    """
    clean = check_exported(_read(path, "model file"), str(path))
    try:
        return torch.export.load(io.BytesIO(clean))
    except Exception as e:
        raise InputError(
            f"cannot load {path} with torch.export.load: {type(e).__name__}: {str(e)[:300]}. Save the program "
            "with torch.export.save(torch.export.export(model, (x,)), path) on this torch version"
        ) from None
