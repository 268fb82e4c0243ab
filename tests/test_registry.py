"""The registries are derived, and this file is what keeps them honest: every public op is in
fastseq.ops.PUBLIC_OPS with a kernel family that exists and a benchmark suite that fastseq-bench
finds; every suite times some op; every cross-cutting test file names, for every public op,
the tests that cover it or the reason it is left out; every op declares its backends once."""
import importlib

import pytest

import fastseq
from fastseq.benchmark import cli
from fastseq.ops import PUBLIC_OPS
from fastseq.ops.registry import LAYER_SUITES

CROSS_CUTTING = ["test_autocast", "test_numerics", "test_properties", "test_strided_inputs",
                 "test_cuda_runtime"]


def test_every_public_op_is_registered():
    public = {name for name in fastseq.ops.__all__ if name != "PUBLIC_OPS"}
    assert set(PUBLIC_OPS) == public
    for op in PUBLIC_OPS.values():
        assert getattr(fastseq.ops, op.name) is op.function


def test_every_op_has_its_kernels_and_a_suite_and_every_suite_an_op():
    suites = cli.discover_suites()
    assert suites, "fastseq-bench found no suite"
    for op in PUBLIC_OPS.values():
        module = importlib.import_module(f"fastseq.kernels.{op.kernels}")
        assert hasattr(module, "launch_specs"), op.kernels
        assert op.suite in suites, (op.name, op.suite, sorted(suites))
    assert set(suites) == {op.suite for op in PUBLIC_OPS.values()} | set(LAYER_SUITES)


@pytest.mark.parametrize("name", CROSS_CUTTING)
def test_cross_cutting_tests_cover_or_exclude_every_op(name):
    module = importlib.import_module(name)
    covers, excludes = module.COVERS, module.EXCLUDES
    assert not set(covers) & set(excludes), name
    assert set(covers) | set(excludes) == set(PUBLIC_OPS), (
        f"{name}: name each public op in COVERS (its tests) or EXCLUDES (why not)")
    for op, tests in covers.items():
        assert tests, (name, op)
        for test in tests:
            assert callable(getattr(module, test, None)), f"{name}: no test {test} for {op}"
    for op, reason in excludes.items():
        assert len(reason) > 20, (name, op)


def test_each_op_declares_its_backends_once():
    """The ops' declarations are the only deciders (fastseq.backend.OpBackends.choose)."""
    def module(name):  # fastseq.ops.<name> is the function; the module is in sys.modules
        return importlib.import_module(f"fastseq.ops.{name}")
    declarations = {"rnn_cell": module("rnn_cell").BACKENDS,
                    "rnn_layer": module("rnn_layer").BACKENDS,
                    "rnn_bidirectional_layer": module("rnn_layer").BIDIRECTIONAL_BACKENDS,
                    "layer_norm_rnn_layer": module("layer_norm_rnn_layer").BACKENDS,
                    "attention": module("attention").BACKENDS,
                    "rel_attention": module("rel_attention").BACKENDS,
                    "attention_with_kv_cache": module("kv_cache").BACKENDS,
                    "nn recurrent layers": importlib.import_module("fastseq.nn.rnn").LAYER_BACKENDS}
    for name, declared in declarations.items():
        assert isinstance(declared, fastseq.backend.OpBackends), name
        for device, order in declared.preference.items():
            assert callable(order) or set(order) <= set(declared.backends), (name, device)
        for backend, served in declared.backends.items():
            assert isinstance(served, fastseq.backend.Backend), (name, backend)


def test_dispatch_is_one_mechanism():
    """No backend if-chains in ops/ or nn/: a backend name is compared nowhere; what runs is
    the declared implementation OpBackends.run picks (and explain reports)."""
    import pathlib
    import re

    package = pathlib.Path(fastseq.__file__).parent
    chain = re.compile(r"""(chosen|backend)\s*[!=]=\s*["'](triton|native|torch|reference)["']""")
    offenders = [f"{path.relative_to(package)}:{n}: {line.strip()}"
                 for folder in ("ops", "nn") for path in sorted((package / folder).glob("*.py"))
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if chain.search(line)]
    assert not offenders, "\n".join(offenders)
