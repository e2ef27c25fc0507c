"""One report, two renderings: a self-contained HTML page (inline CSS, images as PNG files beside it,
relative links only, nothing fetched from the network) and the same content as Markdown."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

from .tables import Table

CSS = """
body { font: 14px/1.45 -apple-system, "Segoe UI", "DejaVu Sans", Helvetica, Arial, sans-serif; color: #222;
       margin: 0 auto; padding: 1.2em 2em 3em; max-width: 1180px; background: #fff; }
h1 { font-size: 1.6em; margin: 0.2em 0 0.4em; }
h2 { font-size: 1.3em; margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
h3 { font-size: 1.08em; margin-top: 1.3em; }
p.meta, p.note, figcaption { color: #555; font-size: 0.92em; }
table { border-collapse: collapse; margin: 0.6em 0 0.4em; font-size: 0.92em; display: block; overflow-x: auto; }
caption { caption-side: top; text-align: left; font-weight: 600; padding-bottom: 0.3em; }
th, td { border: 1px solid #d0d0d0; padding: 0.28em 0.6em; text-align: right; white-space: nowrap; }
th { background: #f3f4f6; white-space: normal; vertical-align: bottom; }
td:first-child, th:first-child { text-align: left; white-space: normal; min-width: 10em; max-width: 26em; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: 0.8em 0; display: inline-block; vertical-align: top; max-width: 100%; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; image-rendering: auto; }
figure img.pixels { image-rendering: pixelated; }
details { margin: 0.6em 0; }
summary { cursor: pointer; font-weight: 600; }
ul.notes li { color: #8a4b00; }
"""


@dataclass
class Image:
    """A PNG beside the page (``src`` relative to it) and its caption."""

    src: str
    caption: str
    pixels: bool = False  # sample grids: no smoothing when scaled


@dataclass
class Page:
    """The report's content as a list of blocks, rendered by :meth:`html` and :meth:`markdown`."""

    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        """A section (level 2) or sub-section (level 3) heading."""
        self.blocks.append((f"h{level}", text))

    def text(self, text: str, cls: str = "") -> None:
        """A paragraph (``cls`` "meta" or "note" for the greyed ones)."""
        self.blocks.append(("p", (text, cls)))

    def table(self, table: Table | None) -> None:
        """A table; None adds nothing."""
        if table is not None:
            self.blocks.append(("table", table))

    def images(self, images: list[Image]) -> None:
        """Figures shown side by side where the width allows."""
        if images:
            self.blocks.append(("images", images))

    def notes(self, notes: list[str]) -> None:
        """A list of remarks (what is missing and why)."""
        if notes:
            self.blocks.append(("notes", notes))

    def fold(self, summary: str) -> None:
        """Start a collapsed part (HTML ``<details>``; a plain heading in Markdown) up to :meth:`unfold`."""
        self.blocks.append(("fold", summary))

    def unfold(self) -> None:
        """End the part opened by :meth:`fold`."""
        self.blocks.append(("unfold", None))

    # -- HTML --------------------------------------------------------------------------------------------
    def html(self) -> str:
        """The page as one HTML document: inline CSS, no script, images by relative path."""
        e = html.escape
        out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
               '<meta name="viewport" content="width=device-width, initial-scale=1">',
               f"<title>{e(self.title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>",
               f"<h1>{e(self.title)}</h1>"]
        for kind, value in self.blocks:
            if kind in ("h2", "h3"):
                out.append(f"<{kind}>{e(value)}</{kind}>")
            elif kind == "p":
                text, cls = value
                out.append(f'<p class="{e(cls)}">{e(text)}</p>' if cls else f"<p>{e(text)}</p>")
            elif kind == "table":
                out.append(_html_table(value))
            elif kind == "images":
                for im in value:
                    cls = ' class="pixels"' if im.pixels else ""
                    out.append(f'<figure><img src="{e(im.src)}" alt="{e(im.caption)}"{cls}>'
                               f"<figcaption>{e(im.caption)}</figcaption></figure>")
            elif kind == "notes":
                out.append('<ul class="notes">' + "".join(f"<li>{e(n)}</li>" for n in value) + "</ul>")
            elif kind == "fold":
                out.append(f"<details><summary>{e(value)}</summary>")
            elif kind == "unfold":
                out.append("</details>")
        out += ["</body>", "</html>", ""]
        return "\n".join(out)

    # -- Markdown ----------------------------------------------------------------------------------------
    def markdown(self) -> str:
        """The same content as Markdown (pipe tables, the same image paths)."""
        out = [f"# {self.title}", ""]
        for kind, value in self.blocks:
            if kind in ("h2", "h3"):
                out += ["#" * int(kind[1]) + " " + value, ""]
            elif kind == "p":
                out += [_md_text(value[0]), ""]
            elif kind == "table":
                out += _md_table(value)
            elif kind == "images":
                for im in value:
                    out += [f"![{_md_text(im.caption)}]({im.src})", "", f"*{_md_text(im.caption)}*", ""]
            elif kind == "notes":
                out += [f"- {_md_text(n)}" for n in value] + [""]
            elif kind == "fold":
                out += [f"**{_md_text(value)}**", ""]
        return "\n".join(out).rstrip() + "\n"


def _html_table(t: Table) -> str:
    e = html.escape
    head = "".join(f"<th>{e(c)}</th>" for c in t.columns)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in t.rows)
    notes = "".join(f'<p class="note">{e(n)}</p>' for n in t.notes)
    return f"<table><caption>{e(t.title)}</caption><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{notes}"


def _md_text(text: str) -> str:
    return text.replace("\\", "\\\\").replace("*", "\\*").replace("<", "&lt;")


def _md_cell(text: str) -> str:
    return _md_text(text).replace("|", "\\|").replace("\n", " ")


def _md_table(t: Table) -> list[str]:
    out = [f"**{_md_text(t.title)}**", ""]
    out.append("| " + " | ".join(_md_cell(c) for c in t.columns) + " |")
    out.append("|" + "|".join(":---" if i == 0 else "---:" for i in range(len(t.columns))) + "|")
    out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
    out.append("")
    for n in t.notes:
        out += [_md_text(n), ""]
    return out
