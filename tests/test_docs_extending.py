"""The snippets of docs/extending.md run as shown, top to bottom in one session: a user's estimator
and loss defined in the page train, sweep their own number, and a broken one is refused."""

import contextlib
import io
import os
import pathlib
import re

import pytest

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "extending.md"
SNIPPET = re.compile(r"```python\n(.*?)```", re.S)


@pytest.mark.slow
def test_extending_snippets_run(tmp_path):
    snippets = SNIPPET.findall(DOC.read_text())
    assert len(snippets) == 4
    namespace = {"__name__": "extending_doc"}
    stdout = io.StringIO()
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the snippets write runs/ under the current directory
    try:
        with contextlib.redirect_stdout(stdout):
            for i, code in enumerate(snippets):
                exec(compile(code, f"{DOC.name}[snippet {i}]", "exec"), namespace)
    finally:
        os.chdir(cwd)
    lines = stdout.getvalue().splitlines()
    match = re.fullmatch(r"score (\S+) -> (\S+); logged: baseline=\S+", lines[0])
    assert match and float(match.group(2)) > float(match.group(1)) + 0.1, lines[0]
    assert len(eval(lines[1])) == 3  # one final score per run of the sweep
    assert lines[2] == "policy loss 'python_if' (extending_doc.python_if) failed to trace", lines[2]
