"""Every family declared in fastseq.families has every piece its one name promises, and nothing
names a family that is not declared: the checklist of docs/adding-a-family.md, enforced. Each
failure names the family and the missing piece."""
import importlib
import inspect
import pathlib
import re
import sys

import pytest
import torch

import fastseq
from fastseq.benchmark import cli
from fastseq.families import (CROSS_CUTTING_TESTS, FAMILIES, NEWEST_STACK_ONLY, PIECES,
                              SHARED_EDITS, folders_of_tests, main)

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = pathlib.Path(fastseq.__file__).resolve().parent
FAMILY_NAMES = list(FAMILIES)


def module(name: str):
    """The module itself (fastseq.ops.attention is also the name of a function)."""
    importlib.import_module(name)
    return sys.modules[name]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_piece_exists(family):
    missing = [piece.format(name=family) for piece in PIECES
               if not (ROOT / piece.format(name=family)).is_file()]
    assert not missing, f"family {family} lacks {missing}"


def test_adding_a_family_lists_every_piece_and_shared_edit():
    guide = (ROOT / "docs" / "adding-a-family.md").read_text()
    for path in [*PIECES, *SHARED_EDITS]:
        assert f"`{path}`" in guide, f"docs/adding-a-family.md does not name {path}"


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_op_module_defines_the_ops_and_their_declaration(family):
    ops = module(f"fastseq.ops.{family}")
    for op in FAMILIES[family].ops:
        assert inspect.isfunction(getattr(ops, op, None)), f"fastseq/ops/{family}.py lacks {op}"
        assert getattr(fastseq.ops, op) is getattr(ops, op), f"fastseq.ops does not export {op}"
    assert any(isinstance(v, fastseq.backend.OpBackends) for v in vars(ops).values()), (
        f"fastseq/ops/{family}.py has no OpBackends declaration")
    assert (PACKAGE / "ops" / f"{family}_registration.py").is_file(), (
        f"fastseq/ops/{family}_registration.py (its torch.library ops) is missing")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_kernels_folder_has_a_launcher_with_launch_specs(family):
    launch = module(f"fastseq.kernels.{family}.launch")
    assert callable(getattr(launch, "launch_specs", None)), (
        f"kernels/{family}/launch.py has no launch_specs() (the sm_90 compile test reads it)")
    specs = launch.launch_specs()
    assert specs and all(s["module"].startswith(f"{family}.") or s["module"] == "cell_math"
                         for s in specs), f"kernels/{family}/launch.py: {specs[:1]}"


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_reference_module_exists(family):
    reference = module(f"fastseq.reference.{family}")
    assert any(inspect.isfunction(v) and v.__module__ == reference.__name__
               for v in vars(reference).values()), f"fastseq/reference/{family}.py defines nothing"


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_nn_module_defines_the_layers(family):
    layers = module(f"fastseq.nn.{family}")
    for name in FAMILIES[family].layers:
        cls = getattr(layers, name, None)
        assert inspect.isclass(cls) and cls.__module__ == layers.__name__, (
            f"fastseq/nn/{family}.py does not define {name}")
        assert name in fastseq.nn.__all__, f"fastseq.nn does not export {name}"


def test_every_nn_class_belongs_to_one_family():
    claimed = [name for f in FAMILIES.values() for name in f.layers + f.models]
    assert len(claimed) == len(set(claimed)), "a class claimed by two families"
    classes = {name for name in fastseq.nn.__all__ if inspect.isclass(getattr(fastseq.nn, name))}
    assert classes == set(claimed), (
        f"fastseq.nn classes no family declares: {sorted(classes - set(claimed))}; declared "
        f"but not exported: {sorted(set(claimed) - classes)}")


def test_every_drop_in_for_a_torch_layer_is_in_the_patch_table():
    """A family layer named like a torch.nn class is its drop-in, so fastseq.patch swaps it."""
    swapped = {fast.__name__ for fast in fastseq.patching.SWAPS.values()}
    for family in FAMILIES.values():
        for name in family.layers + family.models:
            if hasattr(torch.nn, name):
                assert name in swapped, f"fastseq.patching.SWAPS lacks torch.nn.{name} -> {name}"


def test_every_family_has_a_suite_and_every_suite_a_family():
    suites = cli.discover_suites()
    expected = set(FAMILIES) | {s for f in FAMILIES.values() for s in f.model_suites}
    assert set(suites) == expected, (
        f"bench/bench_<family>.py missing for {sorted(expected - set(suites))}; suites of no "
        f"family: {sorted(set(suites) - expected)}")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_bench_file_has_the_gpu_smoke_case(family):
    """Read, not imported (the bench package imports its conftest): bench/gpu_smoke.py stops
    the GPU run's stage 1 without it, and tests/gpu/test_gpu_run_script.py runs it on CPU."""
    source = (ROOT / "bench" / f"bench_{family}.py").read_text()
    assert "\ndef gpu_smoke(out)" in source, (
        f"bench/bench_{family}.py has no gpu_smoke(out) (its case for the GPU run's stage 1)")


def test_tests_has_a_folder_per_family_and_per_cross_cutting_concern():
    folders = {p.name for p in (ROOT / "tests").iterdir()
               if p.is_dir() and any(p.glob("test_*.py"))}
    assert folders == set(folders_of_tests()), (
        f"tests/ folders missing: {sorted(set(folders_of_tests()) - folders)}; folders no family or "
        f"CROSS_CUTTING_TESTS entry names: {sorted(folders - set(folders_of_tests()))}")
    assert not list((ROOT / "tests").glob("test_*.py")), "a test file outside a folder"
    names = [p.name for p in (ROOT / "tests").glob("*/test_*.py")]
    assert len(names) == len(set(names)), "two test files share a name (pytest imports by name)"


def test_the_lists_the_scripts_read_are_derived():
    """The Makefile's min-stack leg and the GPU script's chunks ask fastseq/families.py."""
    assert set(NEWEST_STACK_ONLY) <= set(CROSS_CUTTING_TESTS)
    assert main(["--min-stack-tests"]).split() == [
        f"tests/{name}" for name in folders_of_tests() if name not in NEWEST_STACK_ONLY]
    makefile = (ROOT / "Makefile").read_text()
    assert "MIN_STACK_TESTS = $(shell $(PYTHON) fastseq/families.py --min-stack-tests)" in makefile
    script = (ROOT / "bench" / "gpu_run.sh").read_text()
    assert 'fastseq/families.py" --test-folders' in script
    kinds = {f.kind for f in FAMILIES.values()}
    assert kinds == {"recurrent", "attention"}
    assert sorted(main(["--test-folders", "recurrent"]).split()
                  + main(["--test-folders", "attention"]).split()) == sorted(
        f"tests/{name}" for name in FAMILIES)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_docs_say_what_auto_runs_as_the_declaration_does(family):
    declared = module(f"fastseq.ops.{family}").BACKENDS
    f = FAMILIES[family]
    for device, text in (("cpu", f.auto_cpu), ("cuda", f.auto_cuda)):
        order = declared.preference[device]
        firsts = ({order(dict(device=torch.device(device), dtype=dtype))[0]
                   for dtype in (torch.float32, torch.bfloat16)} if callable(order) else {order[0]})
        assert re.match(r"\w+", text)[0] in firsts, (family, device, text, firsts)
        assert all(name in text for name in firsts), (family, device, text, firsts)
