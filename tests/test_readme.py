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
