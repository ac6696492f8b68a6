"""
The ``{config-keys}`` directive: the configuration reference's table, built from
``license_proxy.config._KEYS`` (the table the loader reads), so the two cannot drift.
"""

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective

from license_proxy.config import _KEYS, Bounded


def rows() -> list[str]:
    """The table as Markdown: one row per key, or per group of keys documented together."""
    lines = ["| section | key | default | meaning |", "|---|---|---|---|"]
    groups: list[list] = []
    for (section, key), spec in _KEYS.items():
        if spec.doc is None:
            groups[-1][1].append(key)
        else:
            groups.append([section, [key], spec])
    previous = None
    for section, keys, spec in groups:
        shown = f"`[{section}]`" if section != previous else ""
        previous = section
        names = ", ".join(f"`{key}`" for key in keys)
        default = spec.default
        if spec.default_is_value or spec.default.isupper():  # a value, or a variable's name
            default = f"`{default}`"
        meaning = spec.doc
        if isinstance(spec.parse, Bounded):
            meaning += f" ({spec.parse.range})"
        lines.append(f"| {shown} | {names} | {default} | {meaning} |")
    return lines


class ConfigKeys(SphinxDirective):
    def run(self) -> list[nodes.Node]:
        self.env.note_dependency("license_proxy/config.py")
        node = nodes.container()
        self.state.nested_parse(StringList(rows(), "license_proxy/config.py"), 0, node)
        return node.children


def setup(app):
    app.add_directive("config-keys", ConfigKeys)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
