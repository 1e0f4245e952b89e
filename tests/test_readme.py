"""The README's Python example runs as written."""

import re
import runpy
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(tmp_path, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    script = tmp_path / "example.py"
    script.write_text(blocks[0])
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    nll = float(re.search(r"NLL (-?\d+\.\d+)", out).group(1))
    # The data are N(1, diag(4, 0.25)): entropy log(2πe) + log(2 * 0.5) = 2.838 nats; a short
    # fit should be near it and certainly finite.
    assert 2.0 < nll < 4.0, out
    assert "samples (1000, 2)" in out


def _python_blocks(path: Path) -> list[str]:
    """The page's ```python blocks; a ``>>>`` session becomes its statements."""
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
    return [
        "\n".join(line[4:] for line in b.splitlines() if line.startswith((">>> ", "... ")))
        if b.lstrip().startswith(">>>")
        else b
        for b in blocks
    ]


def test_every_readme_snippet_runs_in_order(capsys):
    """Each Python block of the README runs after the ones above it (they share imports),
    and the ``explain()`` session prints the plan line it shows."""
    namespace: dict = {}
    for i, block in enumerate(_python_blocks(README)):
        exec(compile(block, f"README.md python block {i}", "exec"), namespace)
    session = re.search(r"```python\n>>>.*?\n([^>\n][^\n]*)\n```", README.read_text(), re.S)
    assert session is not None and session.group(1) in capsys.readouterr().out


def test_profiling_page_snippet_runs():
    (block,) = _python_blocks(README.parent / "docs" / "profiling.md")
    assert "num_layers=200" in block  # run at 4 layers below, the page's 200 being slow
    namespace: dict = {}
    exec(
        compile(block.replace("num_layers=200", "num_layers=4"), "profiling.md", "exec"), namespace
    )
    assert namespace["flow"].last_reconstruction.ok
