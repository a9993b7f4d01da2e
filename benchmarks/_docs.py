"""Write a generated block into a markdown file between markers, leaving the rest untouched."""
from __future__ import annotations

import os
import re


def write_section(path: str, name: str, body: str, title: str = "") -> None:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = open(path).read() if os.path.exists(path) else (f"# {title}\n\n" if title else "")
    if start in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
