"""A project's README, rendered for its overview page.

The Markdown comes from users, so it is rendered with raw HTML turned off (any <script> or
<img onerror> is shown as text) and markdown-it's link check, which refuses javascript:, vbscript:,
file: and non-image data: URLs. Relative links and images point into the project's files.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote, unquote

from markdown_it import MarkdownIt

from cml_appliance.core.errors import AppError, InvalidArgument
from cml_appliance.projects import files

README_NAMES = ("README.md", "readme.md", "Readme.md", "README.markdown", "README.txt", "README")
MAX_README_BYTES = 256 * 1024


def find(root: Path) -> str | None:
    """The project path of its README, if it has one inside the project."""
    for name in README_NAMES:
        try:
            target = files.resolve(root, name)
        except AppError:  # missing, or a link that leads out of the project
            continue
        if target.is_file():
            return name
    return None


def render(root: Path, name: str, project_public_id: str) -> str:
    """HTML for the README (plain text files are shown preformatted)."""
    target = files.resolve(root, name)
    with open(target, "rb") as fh:
        raw = fh.read(MAX_README_BYTES)
    text = raw.decode("utf-8", errors="replace")
    md = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False}).enable("table")
    if not name.lower().endswith((".md", ".markdown")):
        return md.render("```\n" + text.replace("```", "` ` `") + "\n```")
    file_base = f"/projects/{project_public_id}/files/"
    download_base = f"/projects/{project_public_id}/download/"

    def relative(url: str) -> bool:
        return bool(url) and not url.startswith(("#", "/")) and ":" not in url.split("/", 1)[0]

    def inside(url: str) -> str | None:
        try:
            return quote(files.clean_relative(unquote(url)))
        except InvalidArgument:  # "../elsewhere": not a file of this project
            return None

    tokens = md.parse(text)
    for token in tokens:
        for child in token.children or []:
            if child.type == "link_open":
                href = str(child.attrGet("href") or "")
                if relative(href):
                    path = inside(href.split("#")[0])
                    child.attrSet("href", file_base + path if path is not None else "#")
                elif href.startswith(("http://", "https://")):
                    child.attrSet("rel", "noopener noreferrer nofollow")
            elif child.type == "image":
                src = str(child.attrGet("src") or "")
                if relative(src):
                    path = inside(src)
                    child.attrSet("src", download_base + path + "?inline=1" if path is not None else "")
    return md.renderer.render(tokens, md.options, {})
