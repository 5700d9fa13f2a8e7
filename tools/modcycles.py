#!/usr/bin/env python3
"""File-level import cycles of a Rust crate, from its `crate::`/`super::`/`self::` paths.

Usage: python3 tools/modcycles.py CRATE_SRC_DIR [--edges]   (exit 1 when a cycle exists)

A path is resolved to the file that defines the item (following `pub use`
re-exports), so a module root that only re-exports is not a hub. `mod x;`
declarations are not edges, nor are `pub use` re-exports themselves (facades), nor
inline `mod tests { ... }` blocks (test code).
Prints each cycle (strongly connected component).
"""
import os, re, sys

src = sys.argv[1]
files = {}  # module path tuple -> file
for root, _, fs in os.walk(src):
    for f in fs:
        if not f.endswith('.rs'):
            continue
        p = os.path.join(root, f)
        rel = os.path.relpath(p, src)[:-3].split(os.sep)
        if rel == ['lib'] or rel == ['main']:
            mod = ()
        elif rel[-1] == 'mod':
            mod = tuple(rel[:-1])
        else:
            mod = tuple(rel)
        files[mod] = p

def strip_comments(s):
    s = re.sub(r'//[^\n]*', '', s)
    s = re.sub(r'/\*.*?\*/', '', s, flags=re.S)
    s = re.sub(r'"(\\.|[^"\\])*"', '""', s)
    return s

def strip_inline_modules(s):
    """Drops inline `mod name { ... }` blocks (test modules): their `super::` means the
    file's own module, and test-only references are not the crate's structure."""
    out, i = [], 0
    for m in re.finditer(r'\bmod\s+\w+\s*\{', s):
        if m.start() < i:
            continue
        depth, j = 0, m.end() - 1
        while j < len(s):
            depth += {'{': 1, '}': -1}.get(s[j], 0)
            if depth == 0:
                break
            j += 1
        out.append(s[i:m.start()])
        i = j + 1
    out.append(s[i:])
    return ''.join(out)

texts = {m: strip_inline_modules(strip_comments(open(p).read())) for m, p in files.items()}
defs = {}      # (mod, name) -> mod (file) defining it
reexp = {}     # (mod, name) -> absolute path tuple
DEF = re.compile(r'\b(?:struct|enum|trait|fn|const|static|type|union|macro_rules!)\s+([A-Za-z_]\w*)')
for m, t in texts.items():
    for n in DEF.findall(t):
        defs.setdefault((m, n), m)

def expand(tree):
    """Expands a use tree `a::{b, c::{d, e}}` into paths (lists of segments)."""
    # `a::b as c` names `a::b`: drop the alias before the spaces go.
    tree = re.sub(r'\s+as\s+\w+', '', tree)
    tree = re.sub(r'\s+', '', tree)
    out = []
    def rec(prefix, t):
        # split top-level commas
        parts, depth, cur = [], 0, ''
        for ch in t:
            if ch == '{': depth += 1
            if ch == '}': depth -= 1
            if ch == ',' and depth == 0:
                parts.append(cur); cur = ''
            else:
                cur += ch
        if cur: parts.append(cur)
        for part in parts:
            if '{' in part:
                i = part.index('{')
                head = [x for x in part[:i].split('::') if x]
                rec(prefix + head, part[i + 1:part.rindex('}')])
            else:
                segs = [x for x in part.split('::') if x]
                out.append(prefix + segs)
    rec([], tree)
    return out

def absolute(m, segs):
    if not segs: return None
    if segs[0] == 'crate': return list(segs[1:])
    cur = list(m)
    i = 0
    if segs[0] == 'self':
        i = 1
    while i < len(segs) and segs[i] == 'super':
        cur = cur[:-1]; i += 1
    if i == 0:
        # A child module named without `self::` (2018 paths); else an external crate.
        return cur + list(segs) if tuple(cur + [segs[0]]) in files else None
    return cur + list(segs[i:])

USE = re.compile(r'\b(pub(?:\([^)]*\))?\s+)?use\s+([^;]+);')
refs = {m: [] for m in texts}
for m, t in texts.items():
    for vis, tree in USE.findall(t):
        for segs in expand(tree):
            a = absolute(m, segs)
            if a is None: continue
            if vis and a and a[-1] not in ('*', 'self'):
                # A re-export is a facade, not a dependency of its file: paths through
                # it resolve to the file that defines the item.
                reexp[(m, segs[-1])] = a
                continue
            refs[m].append(a)
    for path in re.findall(r'\b((?:crate|super|self)(?:::\w+)+)', t):
        a = absolute(m, path.split('::'))
        if a is not None: refs[m].append(a)

def resolve(a, depth=0):
    if depth > 10: return None
    # longest module prefix that is a file
    for k in range(len(a), -1, -1):
        mod = tuple(a[:k])
        if mod in files:
            if k == len(a): return mod
            name = a[k]
            if name == '*': return mod
            if (mod, name) in reexp and reexp[(mod, name)] != a:
                r = resolve(reexp[(mod, name)], depth + 1)
                if r is not None: return r
            return defs.get((mod, name), mod)
    return None

edges = {m: set() for m in texts}
for m, rs in refs.items():
    for a in rs:
        r = resolve(a)
        if r is not None and r != m:
            edges[m].add(r)

# Tarjan
index, low, stack, on, out, n = {}, {}, [], set(), [], [0]
sys.setrecursionlimit(10000)
def sc(v):
    index[v] = low[v] = n[0]; n[0] += 1; stack.append(v); on.add(v)
    for w in edges[v]:
        if w not in index:
            sc(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop(); on.discard(w); comp.append(w)
            if w == v: break
        if len(comp) > 1: out.append(comp)
for v in edges:
    if v not in index: sc(v)
name = lambda m: '::'.join(m) or 'crate'
if '--edges' in sys.argv:
    for m in sorted(edges):
        print(name(m), '->', ', '.join(sorted(name(x) for x in edges[m])))
for comp in out:
    print('cycle:', ' <-> '.join(sorted(name(m) for m in comp)))
    for m in comp:
        print('   ', name(m), '->', ', '.join(sorted(name(x) for x in edges[m] if x in comp)))
if not out:
    print('no cycles among', len(files), 'files')
sys.exit(1 if out else 0)
