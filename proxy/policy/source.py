"""Reading policy files: YAML documents as plain values, with the position of every field.

What it does
  `read_paths(paths)` expands files and directories (recursively, `*.yaml`/`*.yml`/`*.json`,
  sorted, hidden names left out) and returns one `Document` per YAML document: its plain Python value (dicts, lists,
  str/int/float/bool/None) and, for every field path, the 1-based (line, column) of the key (for
  a mapping entry) or of the item (for a list element). `format_path` prints a path the way the
  errors do: `spec.ingress[0].toPorts[0].ports[0].port`.

What it never does
  It never interprets a document (that is `schema`), never raises on bad input and never lets
  one bad document stop the others: every problem becomes a `PolicyError` with layer "yaml" on
  the document (or file) it concerns, with the line/column of the YAML mark.

Guards against abuse
  * files over `MAX_FILE_BYTES` (8 MiB) are refused unread, and only the first
    `MAX_DOCUMENTS` documents of a file are read;
  * text that is not UTF-8 (or UTF-16 with a BOM) is refused as binary;
  * nesting deeper than `MAX_DEPTH` is refused while parsing;
  * alias expansion ("billion laughs") is bounded: a document may expand to at most
    `MAX_VALUES` values, and recursive aliases are refused;
  * duplicate keys are errors (kubectl's strict decoding rejects them too); the last one wins so
    that the rest of the document can still be checked.

How (and why not `yaml.compose_all`)
  The file is cut into chunks at `---` lines (a document marker at column 0 ends any YAML
  document, even inside a block scalar), so a syntax error only loses its own chunk. Each chunk
  is read as libyaml *events* (`yaml.parse` with the C loader) and built into nodes here, without
  recursion: libyaml's C composer recurses per nesting level and crashes the interpreter on
  `[[[[...` a few tens of thousands deep, and its scanner is quadratic in flow depth, so depth
  must be cut off while the events arrive. Scalars are resolved with PyYAML's YAML 1.1 resolver
  (as Kubernetes' go-yaml does: `on`/`yes` are booleans); timestamps stay strings.
"""
from __future__ import annotations

import itertools
import os
import re
import stat
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.reader import ReaderError
from yaml.resolver import Resolver

from .errors import LAYER_YAML, PolicyError

__all__ = ["Document", "read_paths", "read_file", "parse_text", "list_files", "format_path",
           "Path", "MAX_FILE_BYTES", "MAX_DEPTH", "MAX_VALUES", "MAX_DOCUMENTS", "EXTENSIONS",
           "FILE_PATH", "DOCUMENT_PATH"]

MAX_FILE_BYTES = 8 * 1024 * 1024
MAX_DEPTH = 100          # nesting levels as written
MAX_VALUES = 200_000     # values per document after alias expansion (a policy has hundreds)
MAX_DOCUMENTS = 10_000   # documents per file
EXTENSIONS = (".yaml", ".yml", ".json")

# Path placeholders for errors that concern a whole file or a whole document.
FILE_PATH = "<file>"
DOCUMENT_PATH = "<document>"

Path = tuple  # of str (mapping keys) and int (list indexes)
Pos = tuple[int, int]

_TAG = "tag:yaml.org,2002:"
_STR, _NULL, _BOOL, _INT, _FLOAT = (_TAG + t for t in ("str", "null", "bool", "int", "float"))
_TIMESTAMP, _BINARY, _MERGE = _TAG + "timestamp", _TAG + "binary", _TAG + "merge"
_CONSTRUCTED = {_NULL, _BOOL, _INT, _FLOAT}
# Kept as the text written (go-yaml gives Kubernetes strings for these too).
_AS_TEXT = {_STR, _TIMESTAMP, _BINARY, _TAG + "value"}

_RESOLVER = Resolver()
_CONSTRUCTOR = SafeConstructor()

_BREAKS = "\r\n\x85\u2028\u2029"
_DOC_MARK = re.compile(rf"(?:\A|(?<=[{_BREAKS}]))---(?=[ \t{_BREAKS}]|\Z)")
_LINE_BREAK = re.compile(r"\r\n|[\r\n\x85\u2028\u2029]")  # libyaml's line breaks (YAML 1.1)
_IDENT = re.compile(r"[A-Za-z_$][A-Za-z0-9_$-]*\Z")


@dataclass
class Document:
    """One YAML document of a file. `value` is None when the document could not be read."""
    file: str
    index: int                      # 0-based, in file order
    value: Any = None
    positions: dict = field(default_factory=dict)  # Path -> (line, column)
    errors: list[PolicyError] = field(default_factory=list)  # layer "yaml"
    pos: Pos = (0, 0)               # where the document starts
    readable: bool = True           # False: syntax error, refused file, ... (value unusable)
    empty: bool = False             # the file holds no document at all (only comments, `---`)

    def pos_of(self, path: Path) -> Pos:
        """Position of `path`, or of its nearest ancestor that has one."""
        path = tuple(path)
        while True:
            p = self.positions.get(path)
            if p is not None:
                return p
            if not path:
                return self.pos
            path = path[:-1]


def format_path(path: Path) -> str:
    """("spec", "ingress", 0, "toPorts") -> "spec.ingress[0].toPorts"; odd keys in brackets."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _IDENT.match(part):
            out += f".{part}" if out else part
        else:
            out += f"[{part}]"
    return out


# --------------------------------------------------------------------------------------------
# Files and directories
# --------------------------------------------------------------------------------------------

def list_files(path: str, onerror=None) -> list[str]:
    """The policy files under a directory (recursive, sorted), as joined with `path`.

    Hidden files and directories (`.git`, editor lock files such as `.#x.yaml`) are left out;
    a file named explicitly is always read. `onerror(OSError)`: told of a directory that could
    not be listed (os.walk's hook; by default such a directory is silently skipped).
    """
    found = []
    for root, dirs, files in os.walk(path, onerror=onerror):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.lower().endswith(EXTENSIONS) and not name.startswith("."):
                found.append(os.path.join(root, name))
    return sorted(found, key=lambda f: os.path.relpath(f, path).split(os.sep))


def read_paths(paths: list[str], regular_only: bool = False) -> list[Document]:
    """Every document of every file named or found under a named directory, in order.

    A directory with no policy file yields nothing (an empty policy set is legitimate); a path
    that does not exist yields one unreadable document carrying the error.
    """
    docs: list[Document] = []
    for p in paths:
        if os.path.isdir(p):
            for f in list_files(p):
                docs += read_file(f, regular_only=True)
        else:
            docs += read_file(p, regular_only)
    return docs


def _file_error(file: str, message: str) -> Document:
    err = PolicyError(FILE_PATH, message, LAYER_YAML, 1, 1, file)
    return Document(file=file, index=0, errors=[err], pos=(1, 1), readable=False)


def read_file(file: str, regular_only: bool = False) -> list[Document]:
    """regular_only: for files found in a directory (the agent's policies): a FIFO or device
    named like a policy is refused, never waited on. A file named explicitly may be a pipe
    (`l7gate policy validate <(...)`)."""
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block the open
        with open(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                if regular_only:
                    return [_file_error(file, "not a regular file")]
                os.set_blocking(fd, True)  # named explicitly: read it as it comes
            elif st.st_size > MAX_FILE_BYTES:
                return [_file_error(file, f"file is too large ({st.st_size} bytes; the limit is "
                                          f"{MAX_FILE_BYTES} bytes)")]
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        return [_file_error(file, f"cannot read file: {e.strerror or e}")]
    if len(data) > MAX_FILE_BYTES:  # grew while we looked, or a special file
        return [_file_error(file, f"file is too large (the limit is {MAX_FILE_BYTES} bytes)")]
    try:
        text = _decode(data)
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        err = PolicyError(FILE_PATH, f"not a text file: invalid UTF-8 at byte {e.start}",
                          LAYER_YAML, line, col, file)
        return [Document(file=file, index=0, errors=[err], pos=(1, 1), readable=False)]
    return parse_text(text, file)


def _decode(data: bytes) -> str:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16")
    return data.decode("utf-8-sig")


# --------------------------------------------------------------------------------------------
# Text -> documents
# --------------------------------------------------------------------------------------------

def parse_text(text: str, file: str = "") -> list[Document]:
    """Every document of a YAML stream. Empty documents are dropped; a stream with none at all
    gives one `empty` document (no value, no error)."""
    docs: list[Document] = []
    for n, (first_line, chunk) in enumerate(_chunks(text)):
        if n >= MAX_DOCUMENTS:  # empty documents count too: `---` x 2 million is abuse as well
            err = PolicyError(DOCUMENT_PATH, f"file has more than {MAX_DOCUMENTS} documents; "
                                             "the rest is not read", LAYER_YAML,
                              first_line + 1, 1, file)
            docs.append(Document(file=file, index=len(docs), errors=[err],
                                 pos=(first_line + 1, 1), readable=False))
            break
        if _blank(chunk):
            continue
        for doc in _parse_chunk(chunk, first_line, file, len(docs)):
            if doc.readable and doc.value is None and not doc.errors:
                continue
            docs.append(doc)
    if not docs:  # say so: loading may accept it (no policy), `validate` calls it an error
        docs.append(Document(file=file, index=0, pos=(1, 1), readable=False, empty=True))
    return docs


def _chunks(text: str):
    """Cut the stream at `---` lines: yields (0-based first line, chunk text)."""
    starts = (m.start() for m in _DOC_MARK.finditer(text) if m.start() > 0)
    begin, line = 0, 0
    carry: tuple[int, str] | None = None
    for end in itertools.chain(starts, [len(text)]):
        chunk = text[begin:end]
        first, begin = line, end
        line += len(_LINE_BREAK.findall(chunk))
        if carry is not None:
            first, chunk = carry[0], carry[1] + chunk
            carry = None
        if _only_directives(chunk):
            # Directives (`%YAML 1.1`) belong to the document after them: glue them forward.
            carry = (first, chunk)
            continue
        yield first, chunk
    if carry is not None:
        yield carry


def _lines(text: str):
    pos = 0
    for m in _LINE_BREAK.finditer(text):
        yield text[pos:m.start()]
        pos = m.end()
    yield text[pos:]


def _content(chunk: str):
    """The lines of a chunk that are neither blank nor comments (lazily)."""
    for ln in _lines(chunk):
        s = ln.strip()
        if s and not s.startswith("#"):
            yield s


def _blank(chunk: str) -> bool:
    """Nothing but a `---` marker, comments and blank lines (no document to parse)."""
    first = next(_content(chunk), None)
    if first == "---" or (first is not None and first.startswith("---") and first[3] in " \t"
                          and first[3:].strip().startswith("#")):
        first = next(itertools.islice(_content(chunk), 1, None), None)
    return first is None


def _only_directives(chunk: str) -> bool:
    if "%" not in chunk:
        return False
    seen = False
    for s in _content(chunk):
        if not s.startswith("%"):
            return False
        seen = True
    return seen


class _Fatal(Exception):
    """Stops reading a document (and the rest of its chunk)."""

    def __init__(self, message: str, pos: Pos):
        super().__init__(message)
        self.message = message
        self.pos = pos


class _Node:
    __slots__ = ("kind", "value", "pos", "items", "path")

    def __init__(self, kind: str, pos: Pos, value: Any = None, path: Path = ()):
        self.kind = kind        # "scalar" | "seq" | "map"
        self.value = value      # scalar value
        self.pos = pos
        self.items: list = []   # seq: [_Node]; map: [(key, key_pos, _Node)]
        self.path = path        # where it was written (for errors about its own content)


def _yaml_message(e: yaml.YAMLError, chunk: str, first_line: int) -> tuple[str, Pos | None]:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    context = getattr(e, "context", None)
    msg = problem if not context else f"{problem} ({context})"
    if "maximum nesting depth" in problem:
        # newer PyYAML has a limit of its own, which its scanner (reading ahead) may reach before
        # the parser hands us the event at depth MAX_DEPTH: the same refusal, in our words
        msg = f"nesting is deeper than {MAX_DEPTH} levels"
    if mark is None:
        return msg, None
    lines = _LINE_BREAK.split(chunk)
    line = lines[mark.line] if mark.line < len(lines) else ""
    if "\t" in line[:mark.column + 1] and not line[:mark.column].strip(" "):
        msg += "; a tab indents this line: YAML indentation must use spaces"
    return msg, (mark.line + 1 + first_line, mark.column + 1)


def _parse_chunk(chunk: str, first_line: int, file: str, index0: int) -> list[Document]:
    """Documents of one chunk; a syntax error ends the chunk with an error document."""
    builder = _Builder(first_line)
    docs: list[Document] = []

    def fail(message: str, pos: Pos) -> None:
        start = builder.doc_pos or pos
        docs.append(Document(file=file, index=index0 + len(docs), pos=start, readable=False,
                             errors=[PolicyError(DOCUMENT_PATH, message, LAYER_YAML,
                                                 pos[0], pos[1], file)]))

    try:
        for event in yaml.parse(chunk, Loader=yaml.CSafeLoader):
            done = builder.feed(event)
            if done is not None:
                root, errors, pos = done
                docs.append(_materialize(root, errors, pos, file, index0 + len(docs)))
    except ReaderError as e:  # a character YAML does not allow (NUL, other controls)
        before = chunk[:e.position]
        line = first_line + before.count("\n") + 1
        col = e.position - (before.rfind("\n") + 1) + 1
        char = e.character if isinstance(e.character, str) else chr(e.character)
        fail(f"character {char!r} is not allowed in YAML ({e.reason}; binary file?)", (line, col))
    except yaml.YAMLError as e:
        msg, pos = _yaml_message(e, chunk, first_line)
        fail(msg, pos or (first_line + 1, 1))
    except _Fatal as e:
        fail(e.message, e.pos)
    except (ValueError, RecursionError, MemoryError) as e:  # libyaml reader edge cases
        fail(f"cannot read YAML: {e}", (first_line + 1, 1))
    return docs


class _Builder:
    """libyaml events -> `_Node` trees, one per document, without recursion."""

    def __init__(self, first_line: int):
        self.first_line = first_line
        self.doc_pos: Pos | None = None
        self._reset()

    def _reset(self) -> None:
        self.stack: list[_Node] = []
        self.pending: list = []   # per open mapping: [key, key_pos] or None
        self.anchors: dict[str, _Node] = {}
        self.root: _Node | None = None
        self.errors: list[tuple[str, Path, Pos]] = []
        self.events = 0

    def pos(self, mark) -> Pos:
        return (mark.line + 1 + self.first_line, mark.column + 1)

    def feed(self, ev):
        if isinstance(ev, yaml.DocumentStartEvent):
            self._reset()
            self.doc_pos = self.pos(ev.start_mark)
        elif isinstance(ev, yaml.DocumentEndEvent):
            done = (self.root, self.errors, self.doc_pos or self.pos(ev.start_mark))
            self.doc_pos = None
            return done
        elif isinstance(ev, yaml.ScalarEvent):
            self._attach(_Node("scalar", self.pos(ev.start_mark), self._scalar(ev)), ev)
        elif isinstance(ev, yaml.AliasEvent):
            node = self.anchors.get(ev.anchor)
            if node is None:
                raise _Fatal(f"found undefined alias {ev.anchor!r}", self.pos(ev.start_mark))
            self._attach(node, ev, alias=True)
        elif isinstance(ev, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            if len(self.stack) >= MAX_DEPTH:
                raise _Fatal(f"nesting is deeper than {MAX_DEPTH} levels", self.pos(ev.start_mark))
            kind = "seq" if isinstance(ev, yaml.SequenceStartEvent) else "map"
            node = _Node(kind, self.pos(ev.start_mark))
            self._attach(node, ev)
            self.stack.append(node)
            self.pending.append(None)
        elif isinstance(ev, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            node = self.stack.pop()
            self.pending.pop()
            if node.kind == "map":
                self._finish_map(node)
        return None

    def _scalar(self, ev) -> Any:
        tag = ev.tag
        if tag is None or tag == "!":
            tag = _RESOLVER.resolve(yaml.ScalarNode, ev.value, ev.implicit)
        if tag in _AS_TEXT or tag == _MERGE:
            return _MergeKey() if tag == _MERGE else ev.value
        if tag in _CONSTRUCTED:
            node = yaml.ScalarNode(tag, ev.value, ev.start_mark, ev.end_mark, ev.style)
            try:
                return _CONSTRUCTOR.yaml_constructors[tag](_CONSTRUCTOR, node)
            except (ConstructorError, ValueError) as e:
                raise _Fatal(f"invalid {tag[len(_TAG):]} value {ev.value!r}: {e}",
                             self.pos(ev.start_mark)) from None
        raise _Fatal(f"unsupported YAML tag {tag!r}", self.pos(ev.start_mark))

    def _child_path(self, parent: _Node) -> Path:
        if parent.kind == "seq":
            return parent.path + (len(parent.items),)
        key = self.pending[-1]
        return parent.path + ((key[0] if key else "?"),)

    def _attach(self, node: _Node, ev, alias: bool = False) -> None:
        self.events += 1
        if self.events > MAX_VALUES:
            raise _Fatal(f"document has more than {MAX_VALUES} values", node.pos)
        anchor = getattr(ev, "anchor", None)
        if not alias and anchor:
            self.anchors[anchor] = node
        if not self.stack:
            self.root = node
            return
        parent = self.stack[-1]
        if parent.kind == "seq":
            if isinstance(node.value, _MergeKey):
                node.value = "<<"
            if not alias:
                node.path = self._child_path(parent)
            parent.items.append(node)
            return
        key = self.pending[-1]
        if key is None:  # this node is a key
            if node.kind != "scalar":
                raise _Fatal("mapping keys must be strings, not a "
                             + ("list" if node.kind == "seq" else "mapping"), node.pos)
            value = node.value
            if not isinstance(value, (str, _MergeKey)):
                # Kubernetes turns YAML keys into JSON strings; keep the text as written.
                value = ev.value if isinstance(ev, yaml.ScalarEvent) else str(value)
            self.pending[-1] = [value, node.pos]
            return
        if isinstance(node.value, _MergeKey):  # `<<` as a value is just text
            node.value = "<<"
        if not alias:
            node.path = self._child_path(parent)
        parent.items.append((key[0], key[1], node))
        self.pending[-1] = None

    def _finish_map(self, node: _Node) -> None:
        """Duplicate keys and `<<` merge keys."""
        own: dict[str, tuple] = {}
        merged: list[tuple] = []
        for key, kpos, value in node.items:
            if isinstance(key, _MergeKey):
                sources = value.items if value.kind == "seq" else [value]
                for src in sources:
                    if src.kind != "map":
                        raise _Fatal("a merge key (<<) needs a mapping or a list of mappings",
                                     kpos)
                    merged += src.items
                continue
            if key in own:
                first = own[key][1]
                self.errors.append((f"duplicate key {key!r} (first at line {first[0]}, "
                                    f"column {first[1]}); the last one is used",
                                    node.path + (key,), kpos))
            own[key] = (key, kpos, value)
        inherited: dict[str, tuple] = {}
        for key, kpos, value in merged:
            if key not in own:
                inherited.setdefault(key, (key, kpos, value))
        node.items = list(own.values()) + list(inherited.values())


class _MergeKey:
    """The `<<` key of a YAML merge."""


def _materialize(root: _Node | None, errors: list, pos: Pos, file: str, index: int) -> Document:
    doc = Document(file=file, index=index, pos=pos)
    for message, path, at in errors:
        doc.errors.append(PolicyError(format_path(path), message, LAYER_YAML, at[0], at[1], file))
    if root is None:
        return doc
    count = 0
    positions = doc.positions
    positions[()] = root.pos
    active: set[int] = set()

    def build(node: _Node, path: Path) -> Any:
        nonlocal count
        count += 1
        if count > MAX_VALUES:
            raise _Fatal(f"document expands to more than {MAX_VALUES} values "
                         "(too many aliases?)", node.pos)
        if node.kind == "scalar":
            return node.value
        if len(path) > 4 * MAX_DEPTH:
            raise _Fatal(f"document nests deeper than {4 * MAX_DEPTH} levels through aliases",
                         node.pos)
        if id(node) in active:
            raise _Fatal("recursive alias: a node contains itself", node.pos)
        active.add(id(node))
        try:
            if node.kind == "seq":
                out_list = []
                for i, item in enumerate(node.items):
                    p = path + (i,)
                    positions[p] = item.pos
                    out_list.append(build(item, p))
                return out_list
            out: dict = {}
            for key, kpos, value in node.items:
                p = path + (key,)
                positions[p] = kpos
                out[key] = build(value, p)
            return out
        finally:
            active.discard(id(node))

    try:
        doc.value = build(root, ())
    except _Fatal as e:
        doc.value = None
        doc.positions = {}
        doc.readable = False
        doc.errors.append(PolicyError(DOCUMENT_PATH, e.message, LAYER_YAML, e.pos[0], e.pos[1],
                                      file))
    return doc
