"""The report as one self-contained HTML page: every figure and thumbnail inline as a data: URI.

The page opens from disk with no network and no other file. A small inline script marks
`document.body.dataset.imagesLoaded = "<loaded>/<total>"` once the page has loaded, so a headless
browser can check that every image decoded (the report's test does).
"""

from __future__ import annotations

import base64
from html import escape

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1400px;
       padding: 0 1em; color: #1c2833; line-height: 1.45; }
h1 { font-size: 1.6em; border-bottom: 2px solid #2e86c1; padding-bottom: .3em; }
h2 { font-size: 1.25em; margin-top: 1.8em; color: #1a5276; }
table { border-collapse: collapse; margin: .8em 0; font-size: .85em; }
th, td { border: 1px solid #d5d8dc; padding: .3em .55em; text-align: right; vertical-align: top; }
th { background: #eaf2f8; text-align: left; }
td:first-child, th:first-child, td.text { text-align: left; }
td:not(.text):not(.fail) { white-space: nowrap; }
tr:nth-child(even) td { background: #f8f9f9; }
.warning { background: #fdedec; border: 2px solid #c0392b; color: #922b21; font-weight: bold; padding: .7em 1em;
           margin: 1em 0; border-radius: 4px; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #d5d8dc; }
figcaption { font-size: .85em; color: #566573; }
.gallery { display: flex; flex-wrap: wrap; gap: 12px; }
.gallery figure { width: 180px; margin: 0; }
.gallery figcaption { font-size: .75em; }
.fail { color: #c0392b; font-weight: bold; text-align: left; }
"""

# Counts the images that decoded once everything has loaded; read by the headless-browser test.
_SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (img) { return img.complete && img.naturalWidth > 0; }).length;
  document.body.dataset.imagesLoaded = loaded + "/" + images.length;
});
"""


def data_uri(name: str, data: bytes) -> str:
    kind = "image/png" if name.endswith(".png") else "image/jpeg"
    return f"data:{kind};base64,{base64.b64encode(data).decode('ascii')}"


def render(report: dict, sections: list[dict], images: dict[str, bytes]) -> str:
    """The page for `sections` (see `pipeline.report.sections`); `images` maps the files they name to bytes."""
    body = []
    for number, section in enumerate(sections):
        tag = "h1" if number == 0 else "h2"
        body.append(f"<section><{tag}>{escape(section['title'])}</{tag}>")
        body += [_block(block, images) for block in section["blocks"]]
        body.append("</section>")
    title = f"{report.get('model')} / {report.get('target')}: quantization accuracy report"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head>\n<body>\n"
        + "\n".join(body)
        + f"\n<script>{_SCRIPT}</script>\n</body></html>\n"
    )


def _block(block: tuple, images: dict[str, bytes]) -> str:
    kind = block[0]
    if kind == "text":
        return f"<p>{escape(block[1])}</p>"
    if kind == "warning":
        return f"<div class=\"warning\">{escape(block[1])}</div>"
    if kind == "list":
        return "<ul>" + "".join(f"<li>{escape(item)}</li>" for item in block[1]) + "</ul>"
    if kind == "table":
        return _table(block[1], block[2])
    if kind == "figure":
        return _figure(block[1], block[2], images)
    if kind == "gallery":
        return "<div class=\"gallery\">" + "".join(_figure(i["file"], i["caption"], images) for i in block[1]) + "</div>"
    raise ValueError(f"unknown report block {kind!r}")


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers) if any(headers) else ""
    lines = []
    for row in rows:
        cells = []
        for cell in row:
            text = str(cell)
            css = "fail" if text.startswith("FAIL") else "" if _numeric(text) else "text"
            cells.append(f"<td class=\"{css}\">{escape(text)}</td>" if css else f"<td>{escape(text)}</td>")
        lines.append("<tr>" + "".join(cells) + "</tr>")
    thead = f"<thead><tr>{head}</tr></thead>" if head else ""
    return f"<table>{thead}<tbody>{''.join(lines)}</tbody></table>"


def _numeric(text: str) -> bool:
    """Figures are right-aligned, words left-aligned."""
    return bool(text) and (text[0].isdigit() or text[0] in "-+.—∞")


def _figure(name: str, caption: str, images: dict[str, bytes]) -> str:
    return (f"<figure><img src=\"{data_uri(name, images[name])}\" alt=\"{escape(caption)}\">"
            f"<figcaption>{escape(caption)}</figcaption></figure>")
