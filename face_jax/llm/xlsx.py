"""Reads the cells of an .xlsx worksheet with the standard library alone.

An .xlsx file is a zip of XML parts: `xl/workbook.xml` names the sheets,
`xl/_rels/workbook.xml.rels` says which part holds each, `xl/sharedStrings.xml`
holds the text that cells refer to by index, and each worksheet lists its
rows of cells. This covers what word-frequency spreadsheets contain (text
and numbers); formulas are read as their cached values.
"""

from __future__ import annotations

import os
import posixpath
import re
import zipfile
from xml.etree import ElementTree

_MAIN = "{http://schemas.openxmlformats.org/spreadsheetml/2006/main}"
_REL = "{http://schemas.openxmlformats.org/officeDocument/2006/relationships}"
_PACKAGE_REL = "{http://schemas.openxmlformats.org/package/2006/relationships}"


class XlsxError(ValueError):
  """The file is not a readable .xlsx workbook."""


def _column_index(reference: str) -> int:
  """'A1' -> 0, 'AB7' -> 27."""
  letters = re.match(r"[A-Z]+", reference)
  if letters is None:
    raise XlsxError(f"Bad cell reference {reference!r}.")
  index = 0
  for letter in letters.group():
    index = index * 26 + ord(letter) - ord("A") + 1
  return index - 1


def _text(element: ElementTree.Element) -> str:
  # Rich text splits a string into runs, each with its own <t>.
  return "".join(t.text or "" for t in element.iter(f"{_MAIN}t"))


def _first_sheet_part(archive: zipfile.ZipFile) -> str:
  workbook = ElementTree.fromstring(archive.read("xl/workbook.xml"))
  sheet = workbook.find(f"{_MAIN}sheets/{_MAIN}sheet")
  if sheet is None:
    raise XlsxError("The workbook has no sheets.")
  relation_id = sheet.get(f"{_REL}id")
  relations = ElementTree.fromstring(archive.read("xl/_rels/workbook.xml.rels"))
  for relation in relations.iter(f"{_PACKAGE_REL}Relationship"):
    if relation.get("Id") == relation_id:
      target = relation.get("Target", "")
      if target.startswith("/"):
        return target.lstrip("/")
      return posixpath.normpath(posixpath.join("xl", target))
  raise XlsxError(f"The workbook does not say where sheet {relation_id} is.")


def read_first_sheet(path: str | os.PathLike) -> list[list[str | None]]:
  """Returns the rows of the workbook's first sheet as lists of strings.

  Numbers come back as their text (e.g. "12", "0.5"); empty cells as None.

  Raises:
    XlsxError: the file is not a zip of the expected XML parts.
  """
  try:
    archive = zipfile.ZipFile(path)
  except zipfile.BadZipFile as error:
    raise XlsxError(f"{path} is not an .xlsx (zip) file: {error}") from error
  with archive:
    names = set(archive.namelist())
    if "xl/workbook.xml" not in names:
      raise XlsxError(f"{path} has no xl/workbook.xml; is it an .xlsx file?")
    shared = []
    if "xl/sharedStrings.xml" in names:
      strings = ElementTree.fromstring(archive.read("xl/sharedStrings.xml"))
      shared = [_text(item) for item in strings.iter(f"{_MAIN}si")]
    rows = []
    with archive.open(_first_sheet_part(archive)) as sheet:
      for _, element in ElementTree.iterparse(sheet):
        if element.tag != f"{_MAIN}row":
          continue
        cells: dict[int, str] = {}
        for position, cell in enumerate(element.iter(f"{_MAIN}c")):
          reference = cell.get("r")
          column = _column_index(reference) if reference else position
          kind = cell.get("t", "n")
          value = cell.find(f"{_MAIN}v")
          if kind == "inlineStr":
            cells[column] = _text(cell)
          elif value is None or value.text is None:
            continue
          elif kind == "s":
            cells[column] = shared[int(value.text)]
          else:
            cells[column] = value.text
        width = max(cells, default=-1) + 1
        rows.append([cells.get(i) for i in range(width)])
        element.clear()
  return rows
