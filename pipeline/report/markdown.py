"""report.md: the sections as markdown; figures and thumbnails are files beside it."""

from __future__ import annotations


def render_markdown(report: dict, sections: list[dict]) -> str:
    lines = []
    for number, section in enumerate(sections):
        lines += [("# " if number == 0 else "## ") + section["title"], ""]
        for block in section["blocks"]:
            kind = block[0]
            if kind == "text":
                lines += [block[1], ""]
            elif kind == "warning":
                lines += [f"> **WARNING:** {block[1]}", ""]
            elif kind == "list":
                lines += [f"- {item}" for item in block[1]] + [""]
            elif kind == "table":
                headers, rows = block[1], block[2]
                lines.append("| " + " | ".join(_md_cell(h) for h in headers) + " |")
                lines.append("|" + "|".join(" --- " for _ in headers) + "|")
                lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
                lines.append("")
            elif kind == "figure":
                lines += [f"![{block[2]}]({block[1]})", ""]
            elif kind == "gallery":
                lines += [f"![{item['caption']}]({item['file']})  \n{_md_cell(item['caption'])}\n" for item in block[1]]
    return "\n".join(lines).rstrip() + "\n"


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
