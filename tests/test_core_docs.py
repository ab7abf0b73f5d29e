"""The snippets in docs/concepts.md run and print exactly what the page shows."""

import contextlib
import io
import pathlib
import re

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "concepts.md"
# A ```python block immediately followed by the ```text block holding its printed output.
SNIPPET = re.compile(r"```python\n(.*?)```\n\n```text\n(.*?)```", re.S)


def test_concepts_snippets_print_what_the_doc_shows():
    text = DOC.read_text()
    snippets = SNIPPET.findall(text)
    assert len(snippets) == text.count("```python") >= 7, "every python block needs a text block after it"
    namespace = {"__name__": "concepts_doc"}  # the snippets share one session, top to bottom
    for i, (code, expected_output) in enumerate(snippets):
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            exec(compile(code, f"{DOC.name}[snippet {i}]", "exec"), namespace)
        assert stdout.getvalue() == expected_output, f"snippet {i}:\n{code}"
