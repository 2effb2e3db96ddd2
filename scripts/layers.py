#!/usr/bin/env python3
"""Check the module layering of src/: every `crate::X` reference between top-level modules
must point down the layer table below (or sideways where allowed), and the graph of top-level
modules must have no circle. Run by scripts/test.sh; prints the offending `use` lines."""
import os
import re
import sys

# Layer of each top-level module: a module may use modules of a lower layer, and of its own
# layer only where listed in SIDEWAYS. Keep in step with the README's architecture section.
LAYERS = {
    "main": 6, "server": 6, "lib": 6,
    "api": 5, "control": 5, "app": 5,
    "workflow": 4,
    "residency": 3, "integrations": 3,
    "branches": 2, "sync": 2, "evict": 2, "mirror": 2,
    "base": 1, "auth": 1, "stream": 1, "llm": 1, "tools": 1, "sandbox": 1, "git": 1,
    "worker": 1,
    "config": 0, "ids": 0, "excludes": 0, "background": 0, "fsx": 0, "pgconn": 0,
}
# Same-layer uses that are allowed (from, to): branches asks the syncer for a push after a
# version, eviction pushes and verifies before it deletes, base wraps the stream bus, tools run
# commands in the sandbox and describe themselves with llm's ToolSpec, the interfaces use the
# composition root, the control socket shows errors as the API does, and integration installs
# make their branch present.
SIDEWAYS = {
    ("branches", "sync"), ("evict", "sync"), ("base", "stream"), ("tools", "sandbox"),
    ("tools", "llm"), ("api", "app"), ("control", "app"), ("control", "api"), ("config", "ids"),
    ("main", "server"), ("integrations", "residency"),
}
# Leaf files inside a layered module that lower layers may use (path prefix -> layer).
LEAVES = {"branches::layout": 0, "branches::layers": 0}

src = os.path.join(os.path.dirname(__file__), "..", "src")
edges = {}
bad = []
for root, _, files in os.walk(src):
    for f in files:
        if not f.endswith(".rs"):
            continue
        path = os.path.join(root, f)
        rel = os.path.relpath(path, src)
        top = rel.split(os.sep)[0].removesuffix(".rs")
        text = open(path, encoding="utf-8").read()
        # Unit tests may reach anywhere.
        text = text.split("#[cfg(test)]")[0]
        # Comments (doc links among them) are not dependencies.
        text = "\n".join(re.sub(r"//.*", "", line) for line in text.split("\n"))
        for m in re.finditer(r"crate::([a-z_]+)(::[a-z_]+)?", text):
            target, sub = m.group(1), (m.group(2) or "")[2:]
            if target == top or target not in LAYERS:
                continue
            layer = LEAVES.get(f"{target}::{sub}", LAYERS[target])
            edges.setdefault(top, set()).add(target if layer == LAYERS[target] else f"{target}::{sub}")
            mine = LAYERS.get(top, 6)
            if layer > mine or (layer == mine and (top, target) not in SIDEWAYS):
                line = text[: m.start()].count("\n") + 1
                bad.append(f"{rel}:{line}: {top} (layer {mine}) uses {target}{'::' + sub if sub else ''} (layer {layer})")

# Circles among top-level modules (leaves excluded: they are files below their module).
graph = {k: {t for t in v if "::" not in t} for k, v in edges.items()}
def cycle_from(start):
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in graph.get(node, ()):
            if nxt == start:
                return path + [start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, path + [nxt]))
    return None
cycles = {tuple(sorted(c)) : c for c in (cycle_from(n) for n in graph) if c}
for c in cycles.values():
    bad.append("circle: " + " -> ".join(c))

if bad:
    print("module layering violated:", *bad, sep="\n  ")
    sys.exit(1)
print(f"module layering ok ({sum(len(v) for v in edges.values())} dependencies between {len(edges)} modules)")
