"""The README's usage example runs as written."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def test_readme_usage_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python example"
    exec(compile(blocks[0], str(README), "exec"), {})


def test_readme_families_table_is_the_declarations():
    """The README's table says what fastseq/families.py declares (the docs' table is generated
    from it; the README, read on its own, keeps a copy this test holds equal)."""
    from fastseq.families import FAMILIES

    def code(names):
        return ", ".join(f"`{n}`" for n in names)

    text = README.read_text()
    for f in FAMILIES.values():
        row = (f"| {f.name} | {code(f.ops)} | {code(f.layers)} | {f.auto_cpu} | {f.auto_cuda} | "
               f"`{f.name}` |")
        assert row in text, f"README.md's families table lacks or differs for {f.name}:\n{row}"
    rows = [line for line in text.splitlines() if line.startswith("| ") and "`" in line
            and line.split(" | ")[0][2:] in FAMILIES]
    assert len(rows) == len(FAMILIES)
