"""The bfloat16 screen's per-row work in C (`screen_kernel.c`): one pass per row, rows on torch's threads.

After the screen's bfloat16 matmul (torch's, oneDNN on the CPU), what is left is elementwise bounds
over every feature, a top-k or a count over them, and the candidates' float32 columns. As torch ops
that is ~20 passes over an (N, d_sae) tensor and ~30 small kernels (0.8 ms of a 32-row readout of
the default SAE, 2 threads); in C it is one pass per row (0.2 ms). The math and its guarantees are
`rudder.core.screened_topk`'s; this module only runs it, and gives the same answers as the torch ops
there (up to float32 rounding order in the bounds, which carry a safety factor of 2).

The C file is compiled at first use with the system's C compiler (`$CC`, else `cc`; about a
second), for this CPU (`-march=native`), and kept under `RUDDER_CACHE/kernels/`, keyed by the
source, the flags and the CPU. Where it cannot be built (no compiler), a warning says so once and the
torch ops do the work. `RUDDER_SAE_KERNEL=0` chooses the torch ops (for comparisons).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from rudder.core.default_model import cache_dir

if TYPE_CHECKING:
    from rudder.core.screened_topk import Screen
    from rudder.core.steering import SaeTable

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("screen_kernel.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]


def enabled() -> bool:
    return os.environ.get("RUDDER_SAE_KERNEL", "1") != "0"


_CPU_FIELDS = ("model name", "flags", "Features", "CPU implementer", "CPU architecture", "CPU variant", "CPU part",
               "isa", "uarch")


def _machine(cc: list[str]) -> str:
    """What the build depends on beyond the source and flags: the CPU -march=native compiles for (its
    model and features, from /proc/cpuinfo on Linux), the compiler's version and the C library's."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = sorted({ln for ln in info if ln.split(":", 1)[0].strip() in _CPU_FIELDS})
    except OSError:
        cpu = []
    try:
        version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""  # the build itself will say what is wrong
    return "\n".join([platform.machine(), platform.processor(), *cpu, version, *platform.libc_ver()])


def build(fresh: bool = False) -> Path:
    """The compiled kernel, built if it is not in the cache (or `fresh`), atomically: processes that
    build at once each write a file of their own and the last rename wins."""
    cc = shlex.split(os.environ.get("CC", "cc"))
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *cc, *FLAGS, _machine(cc)]).encode()).hexdigest()[:16]
    out = cache_dir() / "kernels" / f"screen-{key}.so"
    if fresh or not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
        os.close(fd)
        try:
            done = subprocess.run([*cc, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                raise OSError(f"{' '.join(cc)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
            os.replace(tmp, out)
        finally:
            Path(tmp).unlink(missing_ok=True)
    return out


_lock = threading.Lock()


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None (with a warning, once) where it cannot be built. A cached file that
    does not load (cut short, say) is built again once."""
    try:
        with _lock:
            try:
                lib = ctypes.CDLL(str(build()))
            except OSError:
                lib = ctypes.CDLL(str(build(fresh=True)))
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("the SAE screen's C kernel could not be built, so its work runs as torch ops (slower "
                    "readouts and TopK edits on the CPU, the same answers): %s. Install a C compiler with "
                    "OpenMP (gcc) or point CC at one; RUDDER_SAE_KERNEL=0 stops trying.", e)
        return None
    p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    common = [i64, i64, i64, p, p, p, p, p, p, f32]  # N, F, d, mm, x, x_lo, b, per_norm, per_bias, sc
    lib.rudder_screen_top.argtypes = [*common, p, i64, i64, i32, p, p, p]
    lib.rudder_screen_top.restype = i64
    lib.rudder_screen_member.argtypes = [*common, i64, i64, p, p, i32, p, p]
    lib.rudder_screen_member.restype = None
    lib.rudder_screen_active.argtypes = [*common, p, i64, i64, p, i32, p, p]
    lib.rudder_screen_active.restype = i64
    lib.rudder_screen_read.argtypes = [*common, p, i64, i64, i64, i64, p, i32, p, p, p, p, p]
    lib.rudder_screen_read.restype = i64
    lib.rudder_edited_top.argtypes = [i64, i64, i64, i64, p, p, p, p, p, p, p]
    lib.rudder_edited_top.restype = None
    lib.rudder_dots_at.argtypes = [i64, i64, i64, i64, p, p, p, p, i32, p]
    lib.rudder_dots_at.restype = i64
    lib.rudder_feature_edits.argtypes = [i64, i64, i64, i64, i64, p, p, p, p, p, p, p, p, p, p, i32, p, p, p]
    lib.rudder_feature_edits.restype = i64
    lib.rudder_screen_edit.argtypes = [*common, p, i64, i64, i64, p, p, p, p, p, p, p, p, p, p, i32, i32, p, p]
    lib.rudder_screen_edit.restype = i64
    lib.rudder_screen_read_edit.argtypes = [*common, p, i64, i64, i64, i64, i64, p, p, p, p, p, p, p, p, p, p, i32,
                                            i64, i32, p, p, p, p]
    lib.rudder_screen_read_edit.restype = i64
    return lib


def _kernel(*tensors: Tensor) -> ctypes.CDLL | None:
    """The loaded kernel where it may take `tensors`: turned on and built, float32 CPU buffers (the
    screen's own weights always are; its callers' rows are cast to the SAE's dtype), none that needs a
    gradient and no graph being traced (the kernel is opaque to autograd and to graphs); else None."""
    if not enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing() \
            or any(t.requires_grad or t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        return None
    return library()


def _check_edited_ids(bad: int, F: int) -> None:
    """Raise where the kernel found `bad` rows editing feature ids outside the SAE's F features."""
    if bad:
        raise IndexError(f"{bad} rows edit feature ids outside the SAE's {F} features")


def _call(screen: Screen, x: Tensor, b: Tensor, sc: float, *more: Tensor):
    """The loaded kernel, the arguments the screen's entry points share, and the tensors that must
    outlive the call; None where `_kernel` does not take the inputs."""
    lib = _kernel(x, b, *more)
    if lib is None:
        return None
    x = x.contiguous()
    x_lo = x.to(torch.bfloat16)
    mm = screen.product(x_lo)  # (N, F) bfloat16: fp32 accumulation, rounded once
    b = b.contiguous()
    N, F = mm.shape
    if mm.dtype != torch.bfloat16 or not mm.is_contiguous() or N != x.shape[0] or b.shape != (F,):
        return None  # not the buffer the kernel reads
    args = [N, F, x.shape[1], mm.data_ptr(), x.data_ptr(), x_lo.data_ptr(), b.data_ptr(),
            screen.per_norm.data_ptr(), screen.per_bias.data_ptr(), sc]
    return lib, args, (x, x_lo, mm, b)


def top(screen: Screen, x: Tensor, b: Tensor, n: int, m: int, sc: float) -> tuple[Tensor, Tensor, Tensor] | None:
    """One round of `screened_topk`'s certified top n from m candidates: values, ids `(N, n)` and which
    rows failed `(N,)`; None where the kernel is not available."""
    call = _call(screen, x, b, sc)
    if call is None:
        return None
    lib, args, _alive = call
    N = args[0]
    values, ids = x.new_empty(N, n), torch.empty(N, n, dtype=torch.long)
    failed = torch.empty(N, dtype=torch.bool)
    lib.rudder_screen_top(*args, screen.w_t.data_ptr(), n, m, torch.get_num_threads(), values.data_ptr(),
                          ids.data_ptr(), failed.data_ptr())
    return values, ids, failed


def member(screen: Screen, x: Tensor, b: Tensor, k: int, feat: Tensor, pre: Tensor,
           sc: float) -> tuple[Tensor, Tensor] | None:
    """`screened_topk`'s membership test: whether each of `feat (N, M)` is surely among its row's k
    (`(N, M)`), and which rows it cannot decide (`(N,)`); None where the kernel is not available."""
    call = _call(screen, x, b, sc, pre)
    if call is None:
        return None
    lib, args, _alive = call
    feat, pre = feat.contiguous().long(), pre.contiguous()
    inside, undecided = torch.empty(feat.shape, dtype=torch.bool), torch.empty(args[0], dtype=torch.bool)
    lib.rudder_screen_member(*args, k, feat.shape[1], feat.data_ptr(), pre.data_ptr(), torch.get_num_threads(),
                             inside.data_ptr(), undecided.data_ptr())
    return inside, undecided


def active(screen: Screen, x: Tensor, b: Tensor, k: int, feat: Tensor, sc: float) -> tuple[Tensor, Tensor] | None:
    """A TopK SAE's activations of `feat (N, M)` at every row of `x (N, d)` in one call: each feature's
    exact pre-activation, ReLU'd where it is among its row's k, else 0 (`(N, M)`), and which rows the
    bounds could not decide (`(N,)`, their activations 0: the caller answers them from the top k); None
    where the kernel is not available."""
    if feat.device.type != "cpu" or feat.dim() != 2 or feat.shape[0] != x.shape[0]:
        return None
    call = _call(screen, x, b, sc)
    if call is None:
        return None
    lib, args, _alive = call
    feat = feat.contiguous().long()
    acts, undecided = x.new_empty(feat.shape), torch.empty(args[0], dtype=torch.bool)
    bad = lib.rudder_screen_active(*args, screen.w_t.data_ptr(), k, feat.shape[1], feat.data_ptr(),
                                   torch.get_num_threads(), acts.data_ptr(), undecided.data_ptr())
    _check_edited_ids(bad, args[1])
    return acts, undecided


def read(screen: Screen, x: Tensor, b: Tensor, k: int, n: int, m: int, feat: Tensor,
         sc: float) -> tuple[Tensor, Tensor, Tensor] | None:
    """A TopK SAE's readout step in one call (`rudder_screen_read`): every row's certified top n
    pre-activations `(N, n)`, values and ids, all above 0 (so they are its top n activations), and its
    activations of `feat (N, M)` as `active` gives them, from one bfloat16 product. None where the
    kernel is not available or some row needs the general path (an uncertified or undecided row, or
    fewer than n features above 0): the caller's `topk_encode` answers that step."""
    if feat.device.type != "cpu" or feat.dim() != 2 or feat.shape[0] != x.shape[0] or not 0 < n <= m:
        return None
    call = _call(screen, x, b, sc)
    if call is None:
        return None
    lib, args, _alive = call
    N, feat = args[0], feat.contiguous().long()
    values, ids = x.new_empty(N, n), torch.empty(N, n, dtype=torch.long)
    acts, failed, bad = x.new_empty(feat.shape), torch.empty(N, dtype=torch.bool), ctypes.c_int64(0)
    nfailed = lib.rudder_screen_read(*args, screen.w_t.data_ptr(), k, n, m, feat.shape[1], feat.data_ptr(),
                                     torch.get_num_threads(), values.data_ptr(), ids.data_ptr(), acts.data_ptr(),
                                     failed.data_ptr(), ctypes.byref(bad))
    _check_edited_ids(bad.value, args[1])
    return None if nfailed else (values, ids, acts)


def edited_top(values: Tensor, ids: Tensor, feat: Tensor, f1: Tensor, last: Tensor,
               top_k: int) -> tuple[Tensor, Tensor] | None:
    """A readout's top `top_k` with the edits written in (`rudder_edited_top`): from the rows' top n
    activations `values, ids (R, n)` and their edits `feat, f1, last (R, M)`, `(R, top_k)` values and ids,
    largest first; None where the kernel is not available or the inputs are not what it reads."""
    if not (values.device.type == "cpu" and values.dim() == 2 and 0 < top_k <= values.shape[1]
            and ids.shape == values.shape and feat.shape == f1.shape == last.shape
            and feat.shape[0] == values.shape[0] and last.dtype == torch.bool):
        return None
    lib = _kernel(values, f1)
    if lib is None:
        return None
    values, f1, ids, feat = values.contiguous(), f1.contiguous(), ids.contiguous().long(), feat.contiguous().long()
    last = last.contiguous()
    (R, n), M = values.shape, feat.shape[1]
    out_values, out_ids = values.new_empty(R, top_k), torch.empty(R, top_k, dtype=torch.long)
    lib.rudder_edited_top(R, n, M, top_k, values.data_ptr(), ids.data_ptr(), feat.data_ptr(), f1.data_ptr(),
                          last.data_ptr(), out_values.data_ptr(), out_ids.data_ptr())
    return out_values, out_ids


def dots_at(w_t: Tensor, b: Tensor, x: Tensor, ids: Tensor) -> Tensor | None:
    """`x (N, d) @ W + b` at features `ids (N, M)` only, each row from its own M rows of `w_t (F, d)`:
    `(N, M)`, in one call (no (N, M, d) gather); None where the kernel is not available or the inputs are
    not contiguous float32 CPU buffers."""
    if not (ids.device.type == "cpu" and w_t.is_contiguous() and ids.dim() == 2 and x.dim() == 2
            and x.shape == (ids.shape[0], w_t.shape[1]) and b.shape == (w_t.shape[0],)):
        return None
    lib = _kernel(w_t, b, x)
    if lib is None:
        return None
    x, b, ids = x.contiguous(), b.contiguous(), ids.contiguous().long()
    out = x.new_empty(ids.shape)
    F, d = w_t.shape
    bad = lib.rudder_dots_at(ids.shape[0], ids.shape[1], d, F, x.data_ptr(), w_t.data_ptr(), b.data_ptr(),
                             ids.data_ptr(), torch.get_num_threads(), out.data_ptr())
    if bad:
        raise IndexError(f"{bad} feature ids outside the SAE's {F} features")
    return out


def feature_edits(table: SaeTable, slot: Tensor, pos: Tensor, f0: Tensor,
                  w_dec: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """`steering._feature_edits` and `_edit_delta` for rows of slots `slot (N,)` (-1: none) at positions
    `pos (N,)`, from their activations `f0 (N, M)` of their slots' features, in one call: `f1, last (N, M)`
    and `delta (N, d)`, (f' - f) W_dec without the SAE's input scale; None where the kernel is not
    available (or a table is not on the CPU)."""
    on_cpu = f0.device.type == table.valid.device.type == slot.device.type == "cpu"
    if not on_cpu or f0.shape != (slot.shape[0], table.feature.shape[1]):
        return None
    lib = _kernel(f0, w_dec)
    if lib is None:
        return None
    valid, start, end, feature, scale, shift = table.kernel_buffers
    f0, w_dec, slot, pos = f0.contiguous(), w_dec.contiguous(), slot.contiguous().long(), pos.contiguous().long()
    (N, M), (S, _), (F, d) = f0.shape, feature.shape, w_dec.shape
    f1, last, delta = f0.new_empty(N, M), torch.empty(N, M, dtype=torch.bool), f0.new_empty(N, d)
    inputs = (slot, pos, valid, start, end, feature, scale, shift, f0, w_dec)
    bad = lib.rudder_feature_edits(N, S, M, F, d, *(t.data_ptr() for t in inputs), torch.get_num_threads(),
                                   f1.data_ptr(), last.data_ptr(), delta.data_ptr())
    _check_edited_ids(bad, F)
    return f1, last, delta


def _edit_inputs(x: Tensor, table: SaeTable, slot: Tensor, pos: Tensor, w_dec: Tensor, stream: Tensor):
    """The buffers `rudder_screen_edit` and `rudder_screen_read_edit` read of a step's rows and tables after
    the screen's own, and y, the stream's copy they write; None where they take another path."""
    if not (stream.dtype in (torch.float32, torch.bfloat16)
            and stream.shape == x.shape == (slot.shape[0], w_dec.shape[1])
            and slot.device.type == pos.device.type == table.valid.device.type == "cpu"):
        return None
    valid, start, end, feature, scale, shift = table.kernel_buffers
    stream, w_dec = stream.contiguous(), w_dec.contiguous()
    slot, pos = slot.contiguous().long(), pos.contiguous().long()
    return torch.empty_like(stream), (slot, pos, valid, start, end, feature, scale, shift, w_dec, stream)


def edit(screen: Screen, x: Tensor, b: Tensor, k: int, table: SaeTable, slot: Tensor, pos: Tensor, w_dec: Tensor,
         stream: Tensor, sc: float) -> Tensor | None:
    """A TopK SAE's edit-only step in one call after the screen's product (`rudder_screen_edit`): the site's
    activation `stream (N, d)` (float32 or bfloat16) with the edits of `table` added, for rows of slots
    `slot (N,)` (-1: none) at positions `pos (N,)`, as `steering._edits` and `stream + delta` give it; `x` is
    the SAE's input of those rows. None where the kernel is not available or takes another path, or some
    row's membership the bounds cannot decide (the caller's general path answers that step)."""
    inputs = _edit_inputs(x, table, slot, pos, w_dec, stream)
    call = None if inputs is None else _call(screen, x, b, sc, w_dec)
    if call is None:
        return None
    (lib, args, _alive), (y, buffers) = call, inputs
    S, M = table.feature.shape
    bad = ctypes.c_int64(0)
    nundecided = lib.rudder_screen_edit(*args, screen.w_t.data_ptr(), k, S, M, *(t.data_ptr() for t in buffers),
                                        int(stream.dtype == torch.bfloat16), torch.get_num_threads(), y.data_ptr(),
                                        ctypes.byref(bad))
    _check_edited_ids(bad.value, args[1])
    return None if nundecided else y


def read_edit(screen: Screen, x: Tensor, b: Tensor, k: int, m: int, table: SaeTable, slot: Tensor, pos: Tensor,
              w_dec: Tensor, stream: Tensor, sc: float) -> tuple[Tensor, Tensor, Tensor] | None:
    """A TopK SAE's readout decode step in one call after the screen's product (`rudder_screen_read_edit`):
    as `edit`, and each row's readout, the top `table.top_k` activations with the edits written in, values
    and ids `(N, top_k)` (as `read`, `feature_edits` and `edited_top` give them); every row of a slot,
    reading. None where the kernel is not available or takes another path, or some row needs the general
    path (see `read`)."""
    S, M = table.feature.shape
    n = table.top_k + M
    inputs = _edit_inputs(x, table, slot, pos, w_dec, stream) if table.top_k > 0 else None
    call = None if inputs is None else _call(screen, x, b, sc, w_dec)
    if call is None:
        return None
    (lib, args, _alive), (y, buffers) = call, inputs
    N = args[0]
    top_values, top_ids, bad = x.new_empty(N, table.top_k), torch.empty(N, table.top_k, dtype=torch.long), \
        ctypes.c_int64(0)
    nfailed = lib.rudder_screen_read_edit(*args, screen.w_t.data_ptr(), k, n, m, S, M,
                                          *(t.data_ptr() for t in buffers), int(stream.dtype == torch.bfloat16),
                                          table.top_k, torch.get_num_threads(), y.data_ptr(), top_values.data_ptr(),
                                          top_ids.data_ptr(), ctypes.byref(bad))
    _check_edited_ids(bad.value, args[1])
    return None if nfailed else (y, top_values, top_ids)
