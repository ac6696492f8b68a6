"""Sphinx configuration: the documentation set (HTML) and the man pages, from MyST Markdown."""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE / "_ext")]

project = "license-proxy"
author = "the license-proxy developers"
extensions = ["myst_parser", "configkeys"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
root_doc = "index"
# "[text](page.md#heading)" links: every heading down to ### gets an anchor, checked at build.
myst_heading_anchors = 3
html_theme = "alabaster"
html_title = "license-proxy"
man_pages = [
    ("man/license-proxy", "license-proxy", "drop-in License Proxy for self-hosted speech containers",
     [author], 8),
    ("man/license-proxy-status", "license-proxy-status", "print license-proxy's state; exit with it",
     [author], 1),
]
man_show_urls = False
