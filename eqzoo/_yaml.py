"""Reading a YAML (or JSON) config within fixed bounds, before any object is built from it.

YAML aliases let a few hundred bytes stand for billions of values once expanded, and deep
nesting exhausts Python's stack: the node graph PyYAML composes is measured first (each node
once; an alias adds the size of the node it names), and only a document within
:data:`MAX_CONFIG_NODES` and :data:`MAX_CONFIG_DEPTH` is turned into Python objects.
"""
from __future__ import annotations

import yaml

from .errors import ConfigError

__all__ = ["MAX_CONFIG_BYTES", "MAX_CONFIG_NODES", "MAX_CONFIG_DEPTH", "parse_yaml"]

class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error: YAML says
    keys are unique, and PyYAML's silent "last one wins" hides a typo'd edit of a config."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: the base class reports it
                break
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given on line {first})", key_node.start_mark)
        return super().construct_mapping(node, deep)


MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_NODES = 100_000  # after alias expansion; the largest shipped config has about 60
MAX_CONFIG_DEPTH = 32


def _too_deep(where: str) -> str:
    return f"{where}: nested more than {MAX_CONFIG_DEPTH} deep (eqzoo._yaml.MAX_CONFIG_DEPTH)"


def _check_size(root: yaml.Node, where: str) -> None:
    """Expanded node count and depth of a composed YAML document, without expanding it (each node's
    size is computed once; an alias adds the size of the node it names)."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    open_ = set()  # nodes whose children are being measured: meeting one again is a cycle
    stack = [(root, False)]
    while stack:
        node, finished = stack.pop()
        children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else \
            node.value if isinstance(node, yaml.SequenceNode) else []
        if finished:
            open_.discard(id(node))
            size[id(node)] = 1 + sum(size[id(c)] for c in children)
            depth[id(node)] = 1 + max((depth[id(c)] for c in children), default=0)
            if size[id(node)] > MAX_CONFIG_NODES:
                raise ConfigError(f"{where}: more than {MAX_CONFIG_NODES} values once its YAML aliases are expanded "
                                  "(eqzoo._yaml.MAX_CONFIG_NODES)")
            if depth[id(node)] > MAX_CONFIG_DEPTH:
                raise ConfigError(_too_deep(where))
        elif id(node) not in size:
            if id(node) in open_:
                raise ConfigError(f"{where}: a YAML alias refers to a node that contains it (a recursive structure)")
            open_.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in size)


def parse_yaml(text: str, where: str):
    """The data of a YAML (or JSON) text, read within the bounds above; ``where`` names it in errors."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where}: {len(text)} characters, above the maximum of {MAX_CONFIG_BYTES} for a config")
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_size(node, where)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {e}") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError(_too_deep(where)) from None
    finally:
        loader.dispose()
