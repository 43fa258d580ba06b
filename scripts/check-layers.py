#!/usr/bin/env python3
"""Checks the module structure (docs/architecture.md, "Module layers"); fails listing
every offence.

1. No import loop between source files: in every crate of the workspace, no file
   imports (through `use` or a `crate::`/`super::`/`self::` path) from a file that
   imports from it, directly or through others. A `mod x;` declaration is not an
   import.
2. statefun-runtime's layers: a module imports only from its own layer or the layers
   below it (LAYERS, bottom up).

Reads the sources as text, like a reviewer would: paths in comments are ignored.
"""
import os
import re
import sys

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# statefun-runtime's top-level modules, bottom up.
LAYERS = [
    ("plain data", ["config", "metrics", "partitioner", "records", "stats"]),
    ("the envelope", ["envelope"]),
    ("state, timers and the egress sinks", ["state", "timers", "egress"]),
    ("the errors users see and the shared context", ["errors", "shared"]),
    ("the partition and the ingress", ["partition", "ingress"]),
    ("the runtime: builder, run loop, handle", ["runtime"]),
    ("the crate root and the test kit", ["lib", "testkit"]),
]
LAYER_OF = {m: i for i, (_, ms) in enumerate(LAYERS) for m in ms}

PATH = re.compile(r"\b(crate|super|self)((?:::[A-Za-z_][A-Za-z0-9_]*)+)")
GROUP = re.compile(r"\b(crate|super|self)((?:::[A-Za-z_][A-Za-z0-9_]*)*)::\{([^;]*?)\}", re.S)


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return "\n".join(re.sub(r"//.*", "", line) for line in text.splitlines())


def strip_tests(text):
    """Drops `#[cfg(test)] mod tests { ... }` blocks (tests import their parent)."""
    out, i = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]\s*mod\s+\w+\s*\{", text):
        if m.start() < i:
            continue
        out.append(text[i:m.start()])
        depth, j = 1, m.end()
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        i = j
    out.append(text[i:])
    return "".join(out)


def module_path(src, path):
    """The module path of a source file: src/a/b.rs and src/a/b/mod.rs are a::b."""
    rel = os.path.relpath(path, src)[:-3].split(os.sep)
    if rel[-1] in ("mod", "lib", "main"):
        rel = rel[:-1]
    return rel


def resolve(src, files, segments):
    """The file that holds module path `segments` (longest existing prefix)."""
    for n in range(len(segments), -1, -1):
        base = os.path.join(src, *segments[:n]) if n else None
        candidates = [base + ".rs", os.path.join(base, "mod.rs")] if base else [
            os.path.join(src, "lib.rs"), os.path.join(src, "main.rs")]
        for c in candidates:
            if c in files:
                return c
    return None


def imports(src, files, path, text):
    """The files `path` imports from."""
    here = module_path(src, path)
    found = set()
    paths = []
    for m in GROUP.finditer(text):
        for item in re.split(r",", m.group(3)):
            item = item.strip().split(" as ")[0].strip()
            if item and item != "self" and not item.startswith("{"):
                paths.append((m.group(1), m.group(2) + "::" + item.split("::")[0]))
            elif item == "self":
                paths.append((m.group(1), m.group(2)))
    for m in PATH.finditer(text):
        paths.append((m.group(1), m.group(2)))
    for root, rest in paths:
        segs = [s for s in rest.split("::") if s]
        if root == "crate":
            base = []
        elif root == "self":
            base = here
        else:
            # `super` from a/b.rs and from a/b/mod.rs (both module a::b) is `a`.
            base = here[:-1]
        while segs and segs[0] == "super":
            base, segs = base[:-1], segs[1:]
        target = resolve(src, files, base + segs)
        if target and target != path:
            found.add(target)
    return found


def crates():
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in ("target", ".git", "node_modules")]
        if "Cargo.toml" in filenames and os.path.isdir(os.path.join(dirpath, "src")):
            yield os.path.join(dirpath, "src")


def main():
    offences = []
    checked = 0
    for src in sorted(crates()):
        files = set()
        for dirpath, _, filenames in os.walk(src):
            files.update(os.path.join(dirpath, f) for f in filenames if f.endswith(".rs"))
        graph = {}
        for f in files:
            with open(f, encoding="utf-8") as fh:
                text = strip_tests(strip_comments(fh.read()))
            graph[f] = imports(src, files, f, text)
        checked += len(files)
        rel = lambda p: os.path.relpath(p, ROOT)
        # 1. Loops (Tarjan's strongly connected components).
        index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]

        def visit(v):
            index[v] = low[v] = counter[0]
            counter[0] += 1
            stack.append(v)
            on.add(v)
            for w in graph[v]:
                if w not in index:
                    visit(w)
                    low[v] = min(low[v], low[w])
                elif w in on:
                    low[v] = min(low[v], index[w])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    sccs.append(comp)

        sys.setrecursionlimit(10000)
        for v in sorted(graph):
            if v not in index:
                visit(v)
        for comp in sccs:
            members = set(comp)
            ties = [f"{rel(a)} -> {rel(b)}" for a in sorted(comp) for b in sorted(graph[a]) if b in members]
            offences.append("import loop between " + ", ".join(rel(c) for c in sorted(comp)) +
                            ":\n      " + "\n      ".join(ties))
        # 2. statefun-runtime's layers.
        if os.path.relpath(src, ROOT) == os.path.join("statefun-runtime", "src"):
            for f, targets in sorted(graph.items()):
                top = (module_path(src, f) or ["lib"])[0]
                if top not in LAYER_OF:
                    offences.append(f"{rel(f)}: module {top!r} has no layer; add it to LAYERS in scripts/check-layers.py")
                    continue
                for t in sorted(targets):
                    tt = (module_path(src, t) or ["lib"])[0]
                    if tt in LAYER_OF and LAYER_OF[tt] > LAYER_OF[top]:
                        offences.append(
                            f"{rel(f)} ({LAYERS[LAYER_OF[top]][0]}) imports from {rel(t)} "
                            f"({LAYERS[LAYER_OF[tt]][0]}), a layer above it")
    if offences:
        print("module structure check failed (docs/architecture.md, \"Module layers\"):", file=sys.stderr)
        for o in offences:
            print("  " + o, file=sys.stderr)
        return 1
    print(f"module structure: {checked} source files, no import loop, statefun-runtime's layers hold")
    return 0


if __name__ == "__main__":
    sys.exit(main())
