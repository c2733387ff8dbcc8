"""The README's Deploy and Interoperability sections run verbatim: their python blocks in one namespace per section,
their bash blocks with this interpreter first on PATH, in document order, in a scratch directory that sees the
repository's examples/."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```(python|bash)\n(.*?)^```$", re.S | re.M)


def section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def blocks(title: str) -> list[tuple[str, str]]:
    found = BLOCK.findall(section(title))
    assert found, f"README section {title!r} has no code block"
    return found


@pytest.mark.parametrize("title", ["Deploy", "Interoperability"])
def test_readme_section_runs_verbatim(title, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    namespace: dict = {"__name__": f"readme_{title.lower()}"}
    for i, (lang, code) in enumerate(blocks(title)):
        if lang == "python":
            exec(compile(code, f"README.md:{title}:block{i}", "exec"), namespace)
        else:
            done = subprocess.run(["bash", "-euo", "pipefail", "-c", code], env=env, capture_output=True, text=True)
            output = f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            assert done.returncode == 0, f"README {title} block {i} failed:\n{output}"
