"""The registries are derived, and this file is what keeps them honest: fastseq.ops.PUBLIC_OPS
is fastseq.ops.__all__; every file of tests/across_ops names, for every public op, the tests
that cover it or the reason it is left out (or the op's family names them in its own test file's
ACROSS_OPS); every declaration is an OpBackends and dispatch is
one mechanism. What each family holds is tests/dispatch/test_families.py's."""
import importlib
import importlib.util
import pathlib
import sys

import pytest

import fastseq
import fastseq.families
from fastseq.ops import PUBLIC_OPS

TESTS = pathlib.Path(__file__).resolve().parents[1]
ACROSS_OPS = sorted((TESTS / "across_ops").glob("test_*.py"))


def test_every_public_op_is_registered():
    # fastseq.ops also exports the argument types its ops take (AttentionMask): classes, not ops
    public = {name for name in fastseq.ops.__all__
              if name != "PUBLIC_OPS" and not isinstance(getattr(fastseq.ops, name), type)}
    assert set(PUBLIC_OPS) == public
    for op in PUBLIC_OPS.values():
        assert getattr(fastseq.ops, op.name) is op.function


def _load(path: pathlib.Path):
    """A test module by its path (the one pytest imports when it collects the folder)."""
    if path.stem in sys.modules:
        return sys.modules[path.stem]
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _family_claims(check: str) -> dict:
    """{op: (test module, [tests] or a reason)}: what each family's own test file
    (tests/<family>/test_<family>.py) says of a cross-cutting check in its ACROSS_OPS, so that
    a new family can keep these tests beside its others instead of editing tests/across_ops."""
    claims = {}
    for family in fastseq.families.FAMILIES:
        module = _load(TESTS / family / f"test_{family}.py")
        for op, claim in getattr(module, "ACROSS_OPS", {}).get(check, {}).items():
            claims[op] = (module, claim)
    return claims


def test_family_claims_name_real_checks_and_their_own_ops():
    checks = {path.stem for path in ACROSS_OPS}
    for name, family in fastseq.families.FAMILIES.items():
        module = _load(TESTS / name / f"test_{name}.py")
        for check, claims in getattr(module, "ACROSS_OPS", {}).items():
            assert check in checks, f"tests/{name}: ACROSS_OPS names no check {check!r}"
            assert set(claims) <= set(family.ops), f"tests/{name}: {check} claims another's op"


@pytest.mark.parametrize("path", ACROSS_OPS, ids=lambda p: p.stem)
def test_cross_cutting_tests_cover_or_exclude_every_op(path):
    name, module = path.stem, _load(path)
    covers, excludes = module.COVERS, module.EXCLUDES
    claims = _family_claims(name)
    assert not set(covers) & set(excludes), name
    assert not (set(covers) | set(excludes)) & set(claims), (
        f"{name}: an op is named both here and in its family's ACROSS_OPS")
    missing = set(PUBLIC_OPS) - set(covers) - set(excludes) - set(claims)
    assert not missing, (
        f"{name}: name each public op in COVERS (its tests) or EXCLUDES (why not), or in its "
        f"family's tests/<family>/test_<family>.py ACROSS_OPS[{name!r}]: {sorted(missing)}")
    for op, tests in covers.items():
        assert tests, (name, op)
        for test in tests:
            assert callable(getattr(module, test, None)), f"{name}: no test {test} for {op}"
    for op, reason in excludes.items():
        assert len(reason) > 20, (name, op)
    for op, (family_tests, claim) in claims.items():
        if isinstance(claim, str):
            assert len(claim) > 20, (name, op, "a reason to leave it out")
            continue
        assert claim, (name, op)
        for test in claim:
            assert callable(getattr(family_tests, test, None)), (
                f"{family_tests.__file__}: no test {test} for {op} ({name})")


def _declarations() -> dict:
    """{module.NAME: OpBackends} for every declaration at the top of a module of fastseq.ops
    and fastseq.nn (found, not listed)."""
    import pkgutil

    found = {}
    for package in (fastseq.ops, fastseq.nn):
        for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
            module = importlib.import_module(info.name)
            found.update({f"{info.name}.{name}": value for name, value in vars(module).items()
                          if isinstance(value, fastseq.backend.OpBackends)})
    return found


def test_each_op_declares_its_backends_once():
    """The declarations are the only deciders (fastseq.backend.OpBackends.choose): each family's
    op module holds its own, and each names only backends it declares."""
    declarations = _declarations()
    for family in fastseq.families.FAMILIES:
        assert any(name.startswith(f"fastseq.ops.{family}.") for name in declarations), (
            f"fastseq/ops/{family}.py declares no OpBackends")
    for name, declared in declarations.items():
        for device, order in declared.preference.items():
            assert callable(order) or set(order) <= set(declared.backends), (name, device)
        for backend, served in declared.backends.items():
            assert isinstance(served, fastseq.backend.Backend), (name, backend)
    assert len({id(d) for d in declarations.values()}) == len(declarations), (
        "one declaration bound to two names")


def test_dispatch_is_one_mechanism():
    """No backend if-chains in ops/ or nn/: a backend name is compared nowhere; what runs is
    the declared implementation OpBackends.run picks (and explain reports)."""
    import re

    package = pathlib.Path(fastseq.__file__).parent
    chain = re.compile(r"""(chosen|backend)\s*[!=]=\s*["'](triton|native|torch|reference)["']""")
    offenders = [f"{path.relative_to(package)}:{n}: {line.strip()}"
                 for folder in ("ops", "nn") for path in sorted((package / folder).glob("*.py"))
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if chain.search(line)]
    assert not offenders, "\n".join(offenders)
