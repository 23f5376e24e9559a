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


def test_readme_and_runs_doc_name_only_flags_that_exist():
  from absl import flags  # pylint: disable=g-import-not-at-top
  import experiments.train  # pylint: disable=g-import-not-at-top,unused-import
  text = README.read_text() + (README.parent / "docs" / "runs.md").read_text()
  named = set(re.findall(r"`[^`\n]*?--([a-z_]+)", text))
  named -= {"config"}      # --config.<path> overrides
  known = set(flags.FLAGS)
  assert named and named <= known, sorted(named - known)
