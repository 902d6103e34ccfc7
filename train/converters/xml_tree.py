"""A small XML tree that remembers each element's line, for error messages naming file and line.

The standard library's ElementTree drops line numbers; this builds the same kind of
tree from :mod:`xml.parsers.expat` events and keeps ``line`` on every node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from xml.parsers import expat

__all__ = ["XmlNode", "XmlSyntaxError", "parse_xml"]


class XmlSyntaxError(ValueError):
    """Malformed XML; ``line`` is the 1-based line expat stopped at, ``reason`` its message."""

    def __init__(self, path: Path, line: int, reason: str) -> None:
        super().__init__(f"{path}:{line}: malformed XML: {reason}")
        self.line, self.reason = line, reason


@dataclass
class XmlNode:
    """One element: tag, 1-based start line, stripped text and children in document order."""

    tag: str
    line: int
    text: str = ""
    children: list[XmlNode] = field(default_factory=list)

    def find(self, tag: str) -> XmlNode | None:
        """The first child named ``tag``."""
        return next((c for c in self.children if c.tag == tag), None)

    def findall(self, tag: str) -> list[XmlNode]:
        """All children named ``tag``."""
        return [c for c in self.children if c.tag == tag]

    def findtext(self, tag: str) -> str | None:
        """The text of the first child named ``tag`` (``None`` if there is none)."""
        child = self.find(tag)
        return child.text if child is not None else None


def parse_xml(path: Path) -> XmlNode:
    """The root element of an XML file.

    Raises:
        XmlSyntaxError: malformed XML (a ValueError naming file and line).
    """
    parser = expat.ParserCreate()
    stack: list[XmlNode] = []
    roots: list[XmlNode] = []
    texts: list[list[str]] = []

    def start(tag: str, _attrs: dict) -> None:
        node = XmlNode(tag, parser.CurrentLineNumber)
        (stack[-1].children if stack else roots).append(node)
        stack.append(node)
        texts.append([])

    def end(_tag: str) -> None:
        stack.pop().text = "".join(texts.pop()).strip()

    def data(chunk: str) -> None:
        if texts:
            texts[-1].append(chunk)

    parser.StartElementHandler, parser.EndElementHandler, parser.CharacterDataHandler = start, end, data
    try:
        parser.Parse(Path(path).read_bytes(), True)
    except expat.ExpatError as err:
        raise XmlSyntaxError(path, err.lineno, expat.ErrorString(err.code)) from None
    return roots[0]
