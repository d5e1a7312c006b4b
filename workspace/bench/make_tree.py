#!/usr/bin/env python3
"""The tree and rule sets of docs/workspaces.md "Cost": make_tree.py DIR.

DIR/big: 20 top directories of 10 subdirectories of 50 files (10,000 files,
221 directories with the root) plus README.md and .env (10,002 files).
DIR/rules30.txt: 5 `**/` globs, `.env` and m19 hidden (2 whiteouts), m18 a
write directory and 20 write files (21 mounts), 3 rules that change
nothing. DIR/rules50.txt: those 30 and 20 `view` files, each in its own
directory beside 49 readable files (each becomes a landlock grant).
"""
import os
import sys

root = os.path.join(sys.argv[1], "big")
for m in range(20):
    for s in range(10):
        d = os.path.join(root, "m%02d" % m, "s%d" % s)
        os.makedirs(d, exist_ok=True)
        for f in range(50):
            with open(os.path.join(d, "f%02d.py" % f), "w") as fh:
                fh.write("x = %d\n" % f)
for name, text in (("README.md", "readme\n"), (".env", "TOKEN=1\n")):
    with open(os.path.join(root, name), "w") as fh:
        fh.write(text)

rules = ["**/*.env=none", "**/*.key=none", "**/__pycache__=none", "**/*.pem=none",
         "**/node_modules=none", "m19=none", "m18=write"]
rules += ["m%02d/s%d/f00.py=write" % (m, s) for m in (0, 1) for s in range(10)]
rules += ["m17/s0=read", "m16=read", "README.md=read"]
assert len(rules) == 30
view = ["m%02d/s%d/f00.py=view" % (m, s) for m in range(2, 12) for s in (0, 1)]
for name, rs in (("rules30.txt", rules), ("rules50.txt", rules + view)):
    with open(os.path.join(sys.argv[1], name), "w") as fh:
        fh.write("\n".join(rs) + "\n")
