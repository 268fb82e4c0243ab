"""Backends and how an op chooses one.

  triton     fastseq's Triton kernels (CUDA GPUs; CPU tensors through TRITON_INTERPRET=1)
  native     the C++/CUDA extension fastseq._C: CUDA kernels for GPU tensors, C++ for CPU ones
  torch      PyTorch's own kernels for the same computation (aten/cuDNN), where torch has them
  reference  fastseq.reference: plain, readable PyTorch; the ground truth

Each op declares its backends once (OpBackends, beside the op): for every backend, why it
cannot serve a call (None when it can), auto's preference order per device, and what a backend
runs inside where it has several ways (the native recurrence's persistent kernel or GEMM loop,
the Triton bidirectional layer's one launch). `auto` (the default) takes, per call, the first
backend of the order that can serve the call; an explicitly requested backend that cannot
raises BackendError with its reason instead of silently running something else. Override
order: an op's `backend=` keyword, then the innermost `use_backend(...)` block, then the
FASTSEQ_BACKEND variables; a choice may name one kind or family (use_backend(recurrent="native"),
FASTSEQ_BACKEND_RECURRENT=native) and leave the others to auto. fastseq.explain(fn, *args) runs
a call and reports each choice made.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from typing import Any, Callable, Iterator, Mapping, Optional

import torch

from . import _extension, described_gpu
from ._versions import MIN_TRITON, dotted, version_tuple
from .families import FAMILIES

BACKENDS = ("triton", "native", "torch", "reference")
CHOICES = ("auto",) + BACKENDS

try:
    import triton

    TRITON_VERSION: str | None = triton.__version__
except ImportError:
    TRITON_VERSION = None


def triton_refusal(version: str | None) -> str | None:
    """Why a Triton of this version (None: not installed) cannot serve any call, or None."""
    if version is None:
        return "Triton is not installed"
    if version_tuple(version) < MIN_TRITON:
        return f"Triton {version} is older than fastseq's kernels support (>= {dotted(MIN_TRITON)})"
    return None


# Decided once, at import (a module constant: nothing to look up in a traced call).
_TRITON_REFUSAL = triton_refusal(TRITON_VERSION)

# The use_backend() blocks in force, innermost last: each maps a group (ALL, a kind such as
# "recurrent", or a family such as "kv_cache") to a backend name. A plain module global, which
# torch.compile guards on.
ALL = "*"
_forced_backend: list[dict] = []


class BackendError(RuntimeError):
    """The requested backend cannot run this call, or no backend can."""


def _check_choice(name: str, where: str) -> str:
    if name not in CHOICES:
        raise ValueError(f"{where}: backend must be one of {', '.join(CHOICES)}; got {name!r}")
    return name


# Every group a choice may name: each kind and each family (fastseq.families).
GROUPS = tuple(sorted({f.kind for f in FAMILIES.values()} | set(FAMILIES)))
# A declared op's name -> (family, kind); the cells share one declaration, "fastseq.ops.*_cell".
_FAMILY_OF_OP = {f"fastseq.ops.{op}": (f.name, f.kind) for f in FAMILIES.values() for op in f.ops}
_FAMILY_OF_OP["fastseq.ops.*_cell"] = ("rnn_cell", FAMILIES["rnn_cell"].kind)


def family_of(op: str) -> tuple[str, str]:
    """(family, kind) of a declared op's name ("fastseq.ops.rnn_stack" -> ("rnn",
    "recurrent")); ("", "") for a name no family declares."""
    return _FAMILY_OF_OP.get(op, ("", ""))


@contextlib.contextmanager
def use_backend(name: Optional[str] = None, **groups: str) -> Iterator[None]:
    """Run the fastseq ops inside the block on backend `name` ("auto" restores the choice), and
    per kind or family by keyword: use_backend(recurrent="native") runs the recurrent families
    on native and leaves attention to the outer choice; use_backend("auto", rnn="triton").
    A family's keyword beats its kind's, which beats `name`; an inner block beats an outer one
    for what it names."""
    for group, choice in groups.items():
        if group not in GROUPS:
            raise ValueError(f"fastseq.use_backend: {group!r} is neither a kind nor a family; "
                             f"one of {', '.join(GROUPS)}")
        _check_choice(choice, f"fastseq.use_backend({group}=...)")
    choices = dict(groups)
    if name is not None:
        choices[ALL] = _check_choice(name, "fastseq.use_backend")
    _forced_backend.append(choices)
    try:
        yield
    finally:
        _forced_backend.pop()


def _environment_choice(group: str) -> Optional[str]:
    variable = "FASTSEQ_BACKEND" + ("" if group == ALL else "_" + group.upper())
    value = os.environ.get(variable)
    return _check_choice(value, variable) if value else None


def requested_backend(keyword: str | None, op: str = "") -> str:
    """The backend asked for a call of `op`: its keyword, else the innermost use_backend block
    naming its family, its kind or everything, else the variables FASTSEQ_BACKEND_<FAMILY>,
    FASTSEQ_BACKEND_<KIND> (e.g. FASTSEQ_BACKEND_RECURRENT=native), FASTSEQ_BACKEND; else auto."""
    if keyword is not None:
        return _check_choice(keyword, "backend=")
    # most specific first ("attention" is a family and a kind: asked once)
    order = [g for g in dict.fromkeys(family_of(op)) if g] + [ALL]
    for block in reversed(_forced_backend):
        for group in order:
            if group in block:
                return block[group]
    for group in order:
        choice = _environment_choice(group)
        if choice is not None:
            return choice
    return "auto"


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_unavailable(device: torch.device) -> str | None:
    """Why the Triton backend cannot run on `device`, or None if it can."""
    if _TRITON_REFUSAL is not None:
        return _TRITON_REFUSAL
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if _interpreter_on():
            return None
        return "CPU tensors need Triton's interpreter (TRITON_INTERPRET=1 before importing fastseq)"
    return f"Triton runs on CUDA tensors (and CPU ones through its interpreter), not {device.type}"


def triton_attention_unavailable(query: torch.Tensor, value: torch.Tensor,
                                 max_head_dim: int) -> str | None:
    """Why a Triton attention kernel cannot take these tensors: the device, or a head dim above
    the kernel's limit (its accumulators hold a block of rows x head dim in registers)."""
    reason = triton_unavailable(query.device)
    if reason is not None:
        return reason
    if max(query.shape[-1], value.shape[-1]) > max_head_dim:
        return (f"head dims up to {max_head_dim} (got query {query.shape[-1]}, "
                f"value {value.shape[-1]})")
    return None


def attention_backends(op: str, max_head_dim: int, *, triton: tuple[Variant, ...],
                       torch_backend: Backend, reference: tuple[Variant, ...]) -> "OpBackends":
    """The attention families' declaration (attention, relative attention, the KV-cache step):
    Triton on GPUs (refused without Triton or past the kernels' head-dim limit), torch's own
    kernels on CPUs (the interpreter is never chosen automatically), the reference anywhere.
    The call needs its "query" and "value" tensors."""
    return OpBackends(
        op,
        backends={"triton": Backend(lambda call: triton_attention_unavailable(
                                        call["query"], call["value"], max_head_dim), triton),
                  "torch": torch_backend,
                  "reference": Backend(serves_every_call, reference)},
        preference={"cuda": ("triton", "torch", "reference"),
                    "cpu": ("torch", "reference", "triton")})


def native_unavailable(device: torch.device) -> str | None:
    """Why the native (C++/CUDA) backend cannot run on `device`, or None if it can."""
    if not _extension.is_built():
        return f"the extension fastseq._C is not built ({_extension.LOAD_ERROR})"
    if device.type == "cuda":
        if not _extension.has_cuda_kernels():
            return "fastseq._C was built without CUDA kernels (no nvcc at build time)"
        gpu = described_gpu.current()  # fastseq.explain_on_gpu's stand-in for a device
        if gpu is not None:
            return _extension.cuda_arch_mismatch(gpu.capability)
        # Dynamo folds get_device_properties to a constant; torch caches it per device.
        properties = torch.cuda.get_device_properties(device)
        return _extension.cuda_arch_mismatch((properties.major, properties.minor))
    if device.type not in ("cpu", "cuda"):
        return f"fastseq._C has kernels for CPU and CUDA tensors, not {device.type}"
    return None


def triton_refuses(call: dict) -> str | None:
    """The triton backend's refusal of a call on its "device" (for a declaration)."""
    return triton_unavailable(call["device"])


def native_refuses(call: dict) -> str | None:
    """The native backend's refusal of a call on its "device" (for a declaration)."""
    return native_unavailable(call["device"])


def serves_every_call(call: dict) -> None:
    """A backend's refusal for a backend that can serve any call (the reference)."""
    return None


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way a backend runs a call: `run(**call)` computes the op's result from the call's
    arguments (each implementation names the ones it reads and takes the rest as **_), `what`
    (text, or call -> text) says what it runs for explain, and `when(call)` selects it (None:
    always, the last of a backend's variants)."""
    what: Any  # str or Callable[[dict], str]
    run: Callable[..., Any]
    when: Optional[Callable[[dict], bool]] = None

    def describe(self, call: dict) -> str:
        return self.what(call) if callable(self.what) else self.what


@dataclasses.dataclass(frozen=True)
class Backend:
    """A backend of one op: why it cannot serve a call (`refuse(call)`, None when it can) and
    the ways it runs one, tried in order (the first variant whose `when` holds runs)."""
    refuse: Callable[[dict], Optional[str]]
    variants: tuple[Variant, ...]

    def __post_init__(self) -> None:
        if not self.variants or self.variants[-1].when is not None:
            raise ValueError("a backend's last variant must run every call it serves (when=None)")

    def variant(self, call: dict) -> Variant:
        return next(v for v in self.variants if v.when is None or v.when(call))


def serves(refuse: Callable[[dict], Optional[str]], run: Callable[..., Any], what: Any = "",
           *exceptions: Variant) -> Backend:
    """A Backend that runs `run` (described by `what`), after any `exceptions` whose `when`
    holds (an empty shape with nothing to launch, a split-KV decode step, ...)."""
    return Backend(refuse, (*exceptions, Variant(what, run)))


@dataclasses.dataclass(frozen=True)
class OpBackends:
    """One op's backends, declared once, and the only place a backend is decided and run.

    backends: name -> Backend (its refusal and its implementations); `call` is the op's dict of
    checked arguments plus the facts the choice reads, with its "device" (and its "op" name
    where one declaration serves several public functions). preference: device type -> auto's
    order, or f(call) -> order ("cpu" serves any other type). `run(call, backend)` chooses and
    runs the chosen backend's variant: the path from a public function to its kernel is the
    declaration, read top to bottom."""
    op: str
    backends: Mapping[str, Backend]
    preference: Mapping[str, Any]  # device type -> tuple of names, or f(call) -> tuple

    def order(self, call: dict) -> tuple[str, ...]:
        order = self.preference.get(call["device"].type, self.preference["cpu"])
        return order(call) if callable(order) else order

    def run(self, call: dict, backend: Optional[str] = None) -> Any:
        """Choose (below) and run the chosen backend's variant for this call."""
        return self.run_chosen(self.choose(call, backend), call)

    def run_chosen(self, chosen: str, call: dict) -> Any:
        """Run a backend this declaration chose earlier for an equivalent call (a streaming
        step chooses once per frame and runs one cell per layer)."""
        return self.backends[chosen].variant(call).run(**call)

    def choose(self, call: dict, backend: Optional[str] = None) -> str:
        """The backend that runs this call: the requested one, or under auto the first of the
        order that can serve the call; BackendError with the reasons otherwise, never a silent
        fallback from a backend the user asked for. Only the refusals it needs are evaluated (a
        streaming step at batch 1 calls this per frame)."""
        requested = requested_backend(backend, self.op)
        if _explanations:  # inside fastseq.explain(): record the verdicts (never under compile)
            _explanations[-1].append(Decision.of(self, call, requested))
        chosen, error = self.resolve(call, requested,
                                     lambda name: self.backends[name].refuse(call))
        if error is not None:
            raise BackendError(f"{call.get('op', self.op)}: {error}")
        return chosen

    def resolve(self, call: dict, requested: str,
                verdict: Callable[[str], Optional[str]]) -> tuple[Optional[str], Optional[str]]:
        """(the backend, None), or (None, why none): the rule itself, given verdict(name), a
        backend's refusal of this call (choose asks each only as needed; explain has them all)."""
        if requested != "auto":
            if requested not in self.backends:
                return None, (f"backend {requested!r} has no implementation of this op "
                              f"(it has: {', '.join(self.backends)})")
            reason = verdict(requested)
            if reason is not None:
                return None, f"backend {requested!r} cannot run this call: {reason}"
            return requested, None
        reasons = []
        for name in self.order(call):
            reason = verdict(name)
            if reason is None:
                return name, None
            reasons.append(f"{name}: {reason}")
        return None, f"no backend can run this call ({'; '.join(reasons)})"


# The decision logs of the fastseq.explain() calls in progress (innermost last).
_explanations: list[list] = []


def report_path(op: str, device: torch.device, what: str) -> None:
    """Tell fastseq.explain about code that runs without a backend choice (plain PyTorch a
    layer runs whatever the backend: MultiheadAttention's need_weights=True path, the projected
    LSTM's step), so its report shows every path a call took. Free outside explain."""
    if _explanations:
        _explanations[-1].append(Decision(op, requested_backend(None, op), str(device), (), {},
                                          "plain PyTorch", what, None))


@dataclasses.dataclass
class Decision:
    """One op call's choice: what was asked, what ran, and every backend's verdict."""
    op: str
    requested: str
    device: str
    order: tuple[str, ...]
    verdicts: dict  # backend -> None (can serve) or why not
    chosen: Optional[str]
    variant: Optional[str]
    error: Optional[str]

    @classmethod
    def of(cls, backends: OpBackends, call: dict, requested: str) -> "Decision":
        verdicts = {name: b.refuse(call) for name, b in backends.backends.items()}
        order = backends.order(call)
        chosen, error = backends.resolve(call, requested, verdicts.__getitem__)
        variant = backends.backends[chosen].variant(call).describe(call) if chosen else None
        return cls(call.get("op", backends.op), requested, str(call["device"]), order, verdicts,
                   chosen, variant, error)

    def __str__(self) -> str:
        head = f"{self.op} on {self.device}, backend={self.requested}: "
        head += f"runs {self.chosen}" if self.chosen else f"raises BackendError ({self.error})"
        if self.variant:
            head += f" ({self.variant})"
        lines = [head]
        ranked = list(self.order) + [name for name in self.verdicts if name not in self.order]
        for name in ranked:
            if name == self.chosen:
                continue
            reason = self.verdicts[name]
            if reason is not None:
                lines.append(f"  {name}: passed over: {reason}")
            elif self.requested != "auto":
                lines.append(f"  {name}: could serve it; not requested")
            elif name in self.order and self.order.index(name) > self.order.index(self.chosen):
                lines.append(f"  {name}: could serve it; later in auto's order {self.order}")
            else:
                lines.append(f"  {name}: could serve it; not in auto's order for this device")
        return "\n".join(lines)


@dataclasses.dataclass
class Explanation:
    """What fastseq.explain() saw: one Decision per fastseq op or layer call, in order (on a
    described GPU for explain_on_gpu: `described`)."""
    decisions: list
    result: Any = None
    error: Optional[Exception] = None
    described: Optional[described_gpu.GPUDescription] = None

    def __str__(self) -> str:
        lines = [str(d) for d in self.decisions] or ["no fastseq op chose a backend in this call"]
        if self.described is not None:
            gpu = self.described
            lines.insert(0, f"on {gpu.name}: sm_{gpu.capability[0]}{gpu.capability[1]}, "
                            f"{gpu.multiprocessors} multiprocessors, "
                            f"{gpu.shared_memory_per_block_optin} bytes of shared memory a block "
                            f"(fake tensors: every choice made, no kernel run)")
        if self.error is not None:
            verb = "stopped at" if self.described is not None else "raised"
            first_line = (str(self.error).splitlines() or [""])[0]  # an error may have no text
            lines.append(f"{verb} {type(self.error).__name__}: {first_line}")
        return "\n".join(lines)


def explain(fn: Callable, *args, **kwargs) -> Explanation:
    """Run fn(*args, **kwargs) (a fastseq op, a layer or a whole model) and return what each
    fastseq call inside it ran and why every other backend was passed over (print it). The
    call runs for real, so the report is what happened, not a prediction; a call that a
    backend refuses returns its decisions with the BackendError in `error`."""
    _explanations.append([])
    try:
        return Explanation(_explanations[-1], result=fn(*args, **kwargs))
    except BackendError as error:
        return Explanation(_explanations[-1], error=error)
    finally:
        _explanations.pop()


def explain_on_gpu(fn: Callable, *args, gpu: described_gpu.GPUDescription = described_gpu.H200,
                   **kwargs) -> Explanation:
    """fastseq.explain for a GPU this machine need not have: what fn(*args, **kwargs) (an op, a
    layer or a model) would run on `gpu` (default: the H200 this project is lent), and why.

    The call runs on fake CUDA tensors (torch's FakeTensorMode: shapes, dtypes and strides, no
    data, no kernel launched): the tensors in args and kwargs, and fn's parameters and buffers
    when fn is a module, take their place there; `gpu` stands in for the device wherever a
    choice reads one (the native kernels' architectures, the persistent recurrence's plan).
    Every fastseq choice is the one that GPU would make. A kernel of torch's own that needs the
    real device (cuDNN's RNNs) stops the run where it is called: `error` holds what stopped it,
    and the report holds every choice made before."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._pytree import tree_map

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)

    def on_fake_gpu(value):
        if not isinstance(value, torch.Tensor):
            return value
        with fake_mode:
            fake = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype,
                                       device="cuda")
        return fake.requires_grad_() if value.requires_grad else fake

    call_args, call_kwargs = tree_map(on_fake_gpu, (args, kwargs))
    run = fn
    if isinstance(fn, torch.nn.Module):
        state = {name: on_fake_gpu(t) for name, t in
                 list(fn.named_parameters()) + list(fn.named_buffers())}

        def run(*a, **k):
            return torch.func.functional_call(fn, state, a, k)
    _explanations.append([])
    try:
        with described_gpu.describing(gpu), fake_mode, warnings.catch_warnings():
            # torch's RNN modules read their weights' data pointers (cuDNN's flat buffer),
            # which fake tensors warn about: noise here, where no kernel runs.
            warnings.filterwarnings("ignore", message=".*data pointer of FakeTensor")
            result = run(*call_args, **call_kwargs)
        return Explanation(_explanations[-1], result=result, described=gpu)
    except Exception as error:  # noqa: BLE001 (a real kernel on fake tensors: the run stops)
        return Explanation(_explanations[-1], error=error, described=gpu)
    finally:
        _explanations.pop()


def backends() -> dict:
    """What each backend can do on this machine, and why not where it cannot."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None

    def per_device(unavailable: Callable[[torch.device], str | None]) -> dict:
        report = {"cpu": unavailable(cpu) is None}
        cuda_reason = unavailable(cuda) if gpu else "no GPU (torch.cuda.is_available() is False)"
        report["cuda"] = cuda_reason is None
        reasons = {"cpu": unavailable(cpu), "cuda": cuda_reason}
        report["available"] = report["cpu"] or report["cuda"]
        report["reasons"] = {k: v for k, v in reasons.items() if v is not None}
        return report

    everywhere = {"available": True, "cpu": True, "cuda": gpu is not None, "reasons": {}}
    return {
        "triton": dict(per_device(triton_unavailable), version=TRITON_VERSION,
                       interpreter=_interpreter_on()),
        "native": dict(per_device(native_unavailable), build=_extension.build_info()),
        "torch": dict(everywhere),
        "reference": dict(everywhere),
        "environment": {"device": gpu or "cpu", "torch": torch.__version__,
                        "triton": TRITON_VERSION},
    }
