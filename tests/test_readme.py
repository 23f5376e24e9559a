"""The README's code runs as written."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
  assert blocks, "the README has a python example"
  for block in blocks:
    scope = {}
    exec(compile(block, str(README), "exec"), scope)  # pylint: disable=exec-used
    assert scope["y"].shape == scope["x"].shape
    assert set(scope["state"]["moe"]) == {"aux_loss", "metrics"}
