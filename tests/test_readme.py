"""The README cannot drift from the code (issue 15): `scripts/check_readme.py` runs every README command that works
offline. The parser and the failure rules are checked on small hand-written READMEs; the slow test runs the real one."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "check_readme.py"


def _module():
    spec = importlib.util.spec_from_file_location("check_readme", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["check_readme"] = mod  # dataclasses resolve the module by name
    spec.loader.exec_module(mod)
    return mod


SAMPLE = '''# t

```bash
# a comment line is skipped
echo one  # a comment after two spaces is dropped
echo two \\
  three
make x    # [long] listed, never run
pip download y  # [hub]
```

```python
# runs offline
print("py")
```

```python
print("not run: no marker")
```

```text
echo not bash
```
'''


def test_snippets_follow_the_tag_and_marker_rules(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(SAMPLE)
    got = [(s.kind, s.text, s.line, s.tag) for s in _module().snippets(readme)]
    assert got == [
        ("bash", "echo one", 5, None),
        ("bash", "echo two    three", 6, None),
        ("bash", "make x", 8, "long"),
        ("bash", "pip download y", 9, "hub"),
        ("python", '# runs offline\nprint("py")', 13, None),
    ]


def test_unknown_tag_is_refused(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("```bash\necho x  # [gpus]\n```\n")
    with pytest.raises(SystemExit, match=r"line 2: unknown tag \[gpus\]"):
        _module().snippets(readme)


@pytest.mark.parametrize("body, ok", [
    ("```bash\ntrue\n```\n", True),
    ("```bash\nfalse\n```\n", False),  # a non-zero exit
    # lmms-eval logs a caught exception's traceback and exits 0: the output decides
    ("```bash\npython -c \"print('Traceback (most recent call last):')\"\n```\n", False),
    ("```python\n# runs offline\nraise SystemExit(3)\n```\n", False),
    ("```python\n# runs offline\nimport vlm_tools\n```\n", True),
])
def test_a_failing_command_fails_the_check(tmp_path, body, ok):
    readme = tmp_path / "README.md"
    readme.write_text(body)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--readme", str(readme), "--timeout", "120"],
                          capture_output=True, text=True)
    assert (proc.returncode == 0) is ok, proc.stdout + proc.stderr


def test_the_readme_has_commands_of_every_kind_and_an_offline_explain_section():
    mod = _module()
    items = mod.snippets(ROOT / "README.md")
    assert {s.tag for s in items} == {None, "gpu", "hub", "long"}
    assert sum(s.kind == "python" for s in items) >= 2
    text = (ROOT / "README.md").read_text()
    assert text.splitlines()[3:5] == ["make demo    # [long] creates .venv, installs, builds the offline default "
                                      "model, runs every method -> out/demo/report.html",
                                      "make test    # [long] creates .venv, installs, runs the test suite (CPU, "
                                      "offline; includes this README's check)"]
    section = text[text.index("## Explain and grounding"):text.index("## Tests and benchmarks")]
    runs = [s for s in items if s.tag is None and s.text in section]
    assert any(s.kind == "python" and "vlm_tools.explain(" in s.text and "vlm_tools.reliability(" in s.text
               and "vlm_tools.similarity_points(" in s.text for s in runs)  # the section's API runs in the check
    assert {"explain", "reliability", "points", "explain-eval"} <= {
        w for s in runs if s.kind == "bash" for line in s.text.splitlines() if line.startswith("vlm-tools ")
        for w in line.split()[1:2]}
    assert "<!--" not in section and "EXPLAIN_FIGURES" not in section
    assert "default_model import format_prompt" not in text


@pytest.mark.slow
@pytest.mark.real_weights
def test_every_offline_readme_command_runs():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--timeout", "600"], cwd=ROOT, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "all README commands that run offline passed" in proc.stdout
