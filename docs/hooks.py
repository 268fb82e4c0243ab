"""MkDocs hooks: one page per family, generated from fastseq/families.py, and the families table
of the home page. A family's prose is its modules' docstrings (fastseq/ops/<name>.py,
fastseq/nn/<name>.py), which mkdocstrings renders, so adding a family edits no docs file.

fastseq/families.py is loaded by path: importing fastseq would need torch and the built
extension, which the docs build does not.
"""
from __future__ import annotations

import importlib.util
import pathlib
import re
import sys

from mkdocs.structure.files import File

ROOT = pathlib.Path(__file__).resolve().parents[1]
TABLE_MARK = "<!-- families table -->"


def _families():
    spec = importlib.util.spec_from_file_location("fastseq_families", ROOT / "fastseq/families.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses looks its module up
    spec.loader.exec_module(module)
    return module.FAMILIES


def _module_of(cls: str) -> str:
    """fastseq.nn.<module> that defines class `cls` (found by reading the sources)."""
    for path in sorted((ROOT / "fastseq/nn").glob("*.py")):
        if re.search(rf"^class {cls}\b", path.read_text(), flags=re.M):
            return f"fastseq.nn.{path.stem}"
    raise ValueError(f"no fastseq/nn module defines class {cls}")


def _code(names, prefix: str) -> str:
    return ", ".join(f"`{prefix}{n}`" for n in names)


def families_table() -> str:
    rows = ["| family | what | ops (`fastseq.ops`) | layers (`fastseq.nn`) | `auto` on CPU | "
            "`auto` on CUDA | bench suite |", "|---|---|---|---|---|---|---|"]
    for f in _families().values():
        rows.append(f"| [{f.name}](families/{f.name}.md) | {f.what} | {_code(f.ops, '')} | "
                    f"{_code(f.layers, '')} | {f.auto_cpu} | {f.auto_cuda} | `{f.name}` |")
    return "\n".join(rows)


def family_page(f) -> str:
    models = "\n".join(f"::: {_module_of(m)}.{m}\n" for m in f.models)
    suites = ", ".join(f"`{s}`" for s in (f.name,) + f.model_suites)
    return f"""# {f.name}

{f.what[0].upper() + f.what[1:]}.

| | |
|---|---|
| ops | {_code(f.ops, 'fastseq.ops.')} |
| layers | {_code(f.layers, 'fastseq.nn.')} |
| models built on it | {_code(f.models, 'fastseq.nn.') or 'none'} |
| `auto` runs | CPU: {f.auto_cpu}; CUDA: {f.auto_cuda} |
| benchmarks | `fastseq-bench --ops {f.name}`: suites {suites} |
| ground truth | `fastseq.reference.{f.name}` (plain PyTorch, run in float64 by the tests) |
| sources | `fastseq/ops/{f.name}.py`, `kernels/{f.name}/`, `fastseq/nn/{f.name}.py`, `tests/{f.name}/` |

`fastseq.explain(fn, *args)` shows which backend each call runs and why the others were passed
over ([Backends and explain](../backends.md)).

## Ops

::: fastseq.ops.{f.name}
    options:
      show_root_heading: false
      members: [{", ".join(f.ops)}]

## Layers

::: fastseq.nn.{f.name}
    options:
      show_root_heading: false
      members: [{", ".join(f.layers)}]
""" + (f"\n## Models built on it\n\n{models}" if f.models else "")


def on_config(config):
    families = [{f.name: f"families/{f.name}.md"} for f in _families().values()]
    config.nav.insert(1, {"Families": families})
    return config


def on_files(files, config):
    for f in _families().values():
        files.append(File.generated(config, f"families/{f.name}.md", content=family_page(f)))
    return files


def on_page_markdown(markdown, page, config, files):
    return markdown.replace(TABLE_MARK, families_table())
