"""Citations resolve inside the repository: the code and docs cite only `docs/`, every citation outside docs/ names
its docs/ file, and every cited pitfall, file and section exists there."""

from __future__ import annotations

import re
import subprocess

from tests.conftest import REPO


def _tracked_text() -> dict[str, str]:
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    texts = {}
    for name in files:
        if name.endswith((".py", ".md", ".smk", ".yaml", ".yml", ".rst", ".txt", ".json")) or name.endswith("Snakefile"):
            texts[name] = (REPO / name).read_text(encoding="utf-8", errors="replace")
    return texts


def test_every_citation_resolves_in_docs():
    texts = _tracked_text()
    methods = (REPO / "docs" / "methods.md").read_text()
    anchors = set(re.findall(r'<a id="(P-\d+)"></a>', methods))
    sections = {m.group(1) for m in re.finditer(r"^#+ (\d+(?:\.\d+)*)\.? ", (REPO / "docs" / "datasets.md").read_text(),
                                                re.M)}
    dangling = []
    for name, text in texts.items():
        if name == "tests/test_docs.py":
            continue
        for line_no, line in enumerate(text.splitlines(), 1):
            where = f"{name}:{line_no}"
            dangling += [f"{where} cites {p}" for p in re.findall(r"\bP-\d+\b", line)
                         if p not in anchors and "P-NN" not in line]
            if not name.startswith("docs/"):  # docs/ also quotes other repositories' docs/ files as evidence
                dangling += [f"{where} cites {m}" for m in re.findall(r"docs/[\w.-]+\.md", line)
                             if not (REPO / m).exists()]
                # a section or pitfall number names its file on the same line: a bare "§7" or "P-41" could be read as
                # a reference outside the repository
                if re.search(r"§\d", line) and not re.search(r"docs/[\w.-]+\.md", line):
                    dangling.append(f"{where} cites a section without naming its docs/ file")
                if re.search(r"\bP-\d+\b", line) and "docs/methods.md" not in line:
                    dangling.append(f"{where} cites a pitfall without naming docs/methods.md")
            dangling += [f"{where} cites datasets.md §{s}" for s in re.findall(r"datasets\.md §(\d+(?:\.\d+)*)", line)
                         if s not in sections]
            if re.search(r"protocols\.md|shared/reference", line):
                dangling.append(f"{where} cites a file outside the repository")
    assert not dangling, "\n".join(dangling)
