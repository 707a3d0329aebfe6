"""docs/sdk-python.md as written: its ```python blocks run in order, in one namespace, against
the real service (real VMs), so every example on the page works."""

from __future__ import annotations

import pathlib
import re

DOC = pathlib.Path(__file__).resolve().parents[3] / "docs" / "sdk-python.md"


def blocks() -> list[tuple[int, str]]:
    text = DOC.read_text()
    out = []
    for m in re.finditer(r"^```python\n(.*?)^```$", text, re.S | re.M):
        out.append((text[: m.start()].count("\n") + 2, m.group(1)))
    return out


def test_the_page_has_examples():
    assert len(blocks()) >= 7


def test_every_example_on_the_page_runs(debian_image):
    namespace: dict = {"__name__": "sdk_docs"}
    for line, code in blocks():
        # Line numbers in tracebacks point into the page.
        exec(compile("\n" * (line - 1) + code, str(DOC), "exec"), namespace)
    sb = namespace["sb"]
    assert sb.state.value == "terminated"
