"""llama.cpp as an engine, through llama-cpp-python: a GGUF file, every graph tensor recorded.

Spec: ``llamacpp:FILE.gguf``. The adapter drives llama.cpp's C API (the ctypes bindings of
``llama_cpp``, imported only when this engine is used) and records the compute graph through
the scheduler's evaluation callback (``cb_eval``): in the "ask" phase every node says whether
it is wanted (asking splits the graph there, so the node's data can be read); in the second
call its data is valid only during the callback, so it is copied there, once, by
``Recorder.capture``.

Names. A node is recorded under its graph name (``attn_norm-0``, ``kq_soft_max-3``,
``result_output``). Several nodes share one name (``Qcur-0`` is the MUL_MAT, then its RESHAPE,
then its ROPE): the first in an eval keeps the plain name, each later one is recorded as
``name:op`` with the op as ``ggml_op_desc`` spells it, lowercased (``Qcur-0:reshape``,
``Qcur-0:rope``). Every record also carries the op (its ``op`` field).

Shapes are numpy's: ggml's ``ne`` reversed, all four dims kept (``ne = (576, 5, 1, 1)`` is
recorded as ``(1, 1, 5, 576)``; comparisons ignore size-1 dims). Views and permutes are read
through their byte strides ``nb``. f32 is stored as float32, f16 (the KV cache) as float16,
bf16 as float32 (exact; numpy has no bfloat16), integer types as themselves; quantized tensors
are skipped (weights are graph leaves, never nodes, so in practice nothing is lost).

Steps: the prefill is step 0 and each decode token its own step, with ``input_ids`` (int64,
shape ``(1, n)``) recorded before each eval, as the transformers adapter does. Logits are
requested at every position, so ``result_output`` holds all of them.

The ``ggml_tensor`` fields that ggml has no accessor for (``type``, ``ne``, ``nb``, ``data``,
``buffer``) are read from the struct as ggml.h lays it out for GGML_MAX_DIMS 4, GGML_MAX_SRC 10,
GGML_MAX_OP_PARAMS 64, GGML_MAX_NAME 64; the layout is checked against ggml's own functions at
every eval (and ``embd``'s ``ne`` against the model's width and the batch), and a mismatch
stops with a LockstepError naming the llama-cpp-python version.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from ..errors import LockstepError, UsageError
from ..extras import require
from .base import Engine, timed_steps
from .forcing import fed_token

if TYPE_CHECKING:
    from ..capture.recorder import Recorder

__all__ = ["LlamaCppEngine"]

#: ggml types recorded: id -> (ggml_type_name, numpy typestr of the bytes, stored as float32)
_TYPES: dict[int, tuple[str, str]] = {
    0: ("f32", "<f4"), 1: ("f16", "<f2"), 24: ("i8", "|i1"), 25: ("i16", "<i2"),
    26: ("i32", "<i4"), 27: ("i64", "<i8"), 28: ("f64", "<f8"), 30: ("bf16", "<u2"),
}
_BF16 = 30
#: ops whose result is a view of their source's bytes, holding no new values
_VIEW_OPS = frozenset({"view", "reshape", "permute", "transpose"})
_CTX_ALIGN = 256  # llama.cpp pads the KV cache to 256 cells; contexts are sized in these units
_EMBD_NAMES = ("embd", "inp_embd")  # the token embeddings node, by llama.cpp version


class _GgmlTensor(ctypes.Structure):
    """``struct ggml_tensor`` (ggml.h) for GGML_MAX_DIMS 4, GGML_MAX_OP_PARAMS 64,
    GGML_MAX_SRC 10, GGML_MAX_NAME 64: 336 bytes."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


_NAME_OFFSET = _GgmlTensor.name.offset


class _Strided:
    """A numpy view of raw memory (address, shape, byte strides) through the array interface."""

    __slots__ = ("__array_interface__",)

    def __init__(self, address: int, shape: tuple[int, ...], strides: tuple[int, ...],
                 typestr: str) -> None:
        self.__array_interface__ = {"data": (address, True), "shape": shape,
                                    "strides": strides, "typestr": typestr, "version": 3}


def _import() -> Any:
    return require("llama_cpp", "llamacpp")


def _version(llama_cpp: Any) -> str:
    return str(getattr(llama_cpp, "__version__", "unknown"))


def _ggml_lib(llama_cpp: Any) -> ctypes.CDLL:
    """The ggml library llama_cpp loaded, with our own prototypes for the functions we call
    (a second handle on the same loaded library: the same code and globals, separate
    function-pointer objects, so llama_cpp's own prototypes are left alone)."""
    loaded = getattr(getattr(llama_cpp, "llama_cpp", None), "_lib", None)
    candidates = [getattr(loaded, "_name", None)]
    libdir = Path(llama_cpp.__file__).parent / "lib"
    candidates += [str(p) for p in sorted(libdir.glob("libggml-base.*"))]
    candidates += [str(p) for p in sorted(libdir.glob("ggml-base.*"))]
    lib = None
    for name in candidates:
        if not name:
            continue
        try:
            cand = ctypes.CDLL(name)
            cand.ggml_nbytes  # noqa: B018 - resolves or raises AttributeError
        except (OSError, AttributeError):
            continue
        lib = cand
        break
    if lib is None:
        raise LockstepError(f"llama-cpp-python {_version(llama_cpp)}: cannot find the ggml "
                            "library it loaded (ggml_nbytes is not exported)")
    vp, sz = ctypes.c_void_p, ctypes.c_size_t
    protos: dict[str, tuple[list[Any], Any]] = {
        "ggml_get_name": ([vp], vp),
        "ggml_op_desc": ([vp], ctypes.c_char_p),
        "ggml_op_name": ([ctypes.c_int], ctypes.c_char_p),
        "ggml_type_name": ([ctypes.c_int], ctypes.c_char_p),
        "ggml_nbytes": ([vp], sz),
        "ggml_nelements": ([vp], ctypes.c_int64),
        "ggml_type_size": ([ctypes.c_int], sz),
        "ggml_backend_buffer_is_host": ([vp], ctypes.c_bool),
        "ggml_backend_tensor_get": ([vp, vp, sz, sz], None),
    }
    for fname, (argtypes, restype) in protos.items():
        try:
            fn = getattr(lib, fname)
        except AttributeError:
            raise LockstepError(f"llama-cpp-python {_version(llama_cpp)}: its ggml library "
                                f"does not export {fname}") from None
        fn.argtypes = argtypes
        fn.restype = restype
    for type_id, (type_name, _) in _TYPES.items():
        got = lib.ggml_type_name(type_id)
        if got is None or got.decode() != type_name:
            raise LockstepError(f"llama-cpp-python {_version(llama_cpp)}: ggml type {type_id} is "
                                f"{got!r}, expected {type_name!r}; this ggml's type ids are not "
                                "ones lockstep supports")
    return lib


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class _GraphTap:
    """The cb_eval callback and its per-eval state. One per context."""

    def __init__(self, llama_cpp: Any, lib: ctypes.CDLL) -> None:
        self.lib = lib
        self.version = _version(llama_cpp)
        self.rec: Recorder | None = None
        self.error: BaseException | None = None
        self.n_embd = 0
        self.n_tokens = 0
        self.skipped: dict[str, str] = {}  #: record name -> why it was not recorded
        self.ops: set[str] = set()  #: ops seen as a ":op" suffix
        self.selected: Callable[[str], bool] | None = None
        self.views = False  # record pure view nodes too (see LlamaCppEngine)
        self.crash_step: int | None = None  # for tests: die of SIGSEGV in this step's graph
        self._reset()
        self.c_callback = llama_cpp.ggml_backend_sched_eval_callback(self._make())

    def _reset(self) -> None:
        self.seen: dict[str, int] = {}
        self.index = 0
        self.pending: tuple[Any, ...] | None = None
        self.checked = False

    def begin(self, rec: Recorder | None, n_tokens: int) -> None:
        """Arm for one eval (``rec`` None: ask for nothing, record nothing)."""
        self._reset()
        self.rec = rec
        self.n_tokens = n_tokens
        self.error = None
        if rec is not None:
            self.selected = rec.wants if rec.selective else None

    def end(self) -> None:
        self.rec = None
        self.pending = None
        if self.error is not None:
            err, self.error = self.error, None
            raise err

    def _layout_error(self, what: str) -> LockstepError:
        return LockstepError(
            f"llama-cpp-python {self.version}: the ggml_tensor layout is not one lockstep "
            f"supports ({what}); record with a llama-cpp-python whose ggml.h has "
            "GGML_MAX_DIMS 4, GGML_MAX_SRC 10, GGML_MAX_OP_PARAMS 64, GGML_MAX_NAME 64")

    def _check_layout(self, t: int) -> None:
        """The struct fields we read agree with ggml's own functions on this tensor."""
        lib = self.lib
        s = _GgmlTensor.from_address(t)
        if lib.ggml_get_name(t) != t + _NAME_OFFSET:
            raise self._layout_error("ggml_get_name does not point at the name field")
        ne = list(s.ne)
        if any(n < 1 for n in ne) or lib.ggml_nelements(t) != ne[0] * ne[1] * ne[2] * ne[3]:
            raise self._layout_error(f"ne {ne} disagrees with ggml_nelements "
                                     f"{lib.ggml_nelements(t)}")
        op_name = lib.ggml_op_name(s.op)
        if op_name is None or (op_name.decode() not in ("UNARY", "GLU")
                               and op_name != lib.ggml_op_desc(t)):
            raise self._layout_error(f"op field {s.op} ({op_name!r}) disagrees with "
                                     f"ggml_op_desc {lib.ggml_op_desc(t)!r}")
        if s.type in _TYPES and s.nb[0] != lib.ggml_type_size(s.type):
            raise self._layout_error(f"nb[0] {s.nb[0]} is not the size of type {s.type}")

    def _check_embd(self, t: int, name: str) -> None:
        ne = tuple(_GgmlTensor.from_address(t).ne)
        if ne[:2] != (self.n_embd, self.n_tokens) or ne[2:] != (1, 1):
            raise self._layout_error(f"{name} has ne {ne}, expected ({self.n_embd}, "
                                     f"{self.n_tokens}, 1, 1)")

    def _make(self) -> Callable[[int, bool, Any], bool]:
        lib = self.lib
        string_at = ctypes.string_at
        c_int = ctypes.c_int
        from_address = _GgmlTensor.from_address
        op_desc = lib.ggml_op_desc
        is_host = lib.ggml_backend_buffer_is_host
        tensor_get = lib.ggml_backend_tensor_get
        nbytes_of = lib.ggml_nbytes
        asarray = np.asarray
        types = _TYPES
        host_cache: dict[int, bool] = {}
        op_cache: dict[bytes, str] = {}
        self.host_cache = host_cache

        def callback(t: int, ask: bool, _user: Any) -> bool:
            rec = self.rec
            if rec is None:
                return False
            try:
                if ask:
                    if not self.checked:
                        self._check_layout(t)
                        self.checked = True
                    index = self.index
                    self.index = index + 1
                    if self.crash_step is not None and index == 8 \
                            and rec.current_step == self.crash_step:
                        os.kill(os.getpid(), signal.SIGSEGV)  # inside llama_decode's graph
                    name = string_at(t + _NAME_OFFSET).decode("utf-8", "replace") \
                        or f"node-{index}"
                    seen = self.seen.get(name, 0)
                    self.seen[name] = seen + 1
                    raw = op_desc(t)
                    op = op_cache.get(raw)
                    if op is None:
                        op = op_cache[raw] = raw.decode().lower()
                    if seen:
                        full = f"{name}:{op}"
                        self.ops.add(op)
                    else:
                        full = name
                        if name in _EMBD_NAMES:
                            self._check_embd(t, name)
                    if op in _VIEW_OPS and not self.views:
                        return False  # the same bytes as its source: no new values
                    type_id = c_int.from_address(t).value
                    if type_id not in types:
                        self.skipped[full] = f"ggml type {type_id} (quantized or unsupported)"
                        return False
                    if self.selected is not None and not self.selected(full):
                        return False
                    self.pending = (t, full, op)
                    return True
                pending = self.pending
                if pending is None or pending[0] != t:
                    return True
                self.pending = None
                _, full, op = pending
                s = from_address(t)
                typestr = types[s.type][1]
                ne = s.ne
                nb = s.nb
                shape = (ne[3], ne[2], ne[1], ne[0])
                strides = (nb[3], nb[2], nb[1], nb[0])
                buf = s.buffer
                host = host_cache.get(buf)
                if host is None:
                    host = host_cache[buf] = bool(buf) and bool(is_host(buf))
                if host and s.data:
                    arr = asarray(_Strided(s.data, shape, strides, typestr))
                else:  # device memory: one copy of the tensor's byte span, then the view
                    if not buf:
                        self.skipped[full] = "no backend buffer"
                        return True
                    size = nbytes_of(t)
                    raw_copy = np.empty(size, dtype=np.uint8)
                    tensor_get(t, raw_copy.ctypes.data, 0, size)
                    arr = asarray(_Strided(raw_copy.ctypes.data, shape, strides, typestr))
                if s.type == _BF16:
                    arr = (arr.astype(np.uint32) << 16).view(np.float32)
                rec.capture(full, arr, role="output", op=op)
                return True
            except BaseException as exc:  # raised on the engine's thread after the eval
                self.error = exc
                self.rec = None
                return False

        return callback


class LlamaCppEngine(Engine):
    """A GGUF model run by llama.cpp on the CPU (or offloaded with ``n_gpu_layers``)."""

    name = "llama.cpp"
    native = True

    def __init__(self, spec: str, path: str, *, n_threads: int | None = None,
                 n_gpu_layers: int = 0, verbose: bool = False, views: bool = False,
                 test_crash_at_step: int | None = None) -> None:
        super().__init__(spec)
        #: for tests of crash handling: the process kills itself with SIGSEGV from inside the
        #: graph callback (native frames on the stack) while recording this step, or before
        #: this step's eval in ``decode_logits``
        self.test_crash_at_step = None if test_crash_at_step is None \
            else int(test_crash_at_step)
        self.path = Path(path)
        self.n_threads = int(n_threads) if n_threads else _usable_cpus()
        self.n_gpu_layers = int(n_gpu_layers)
        self.verbose = verbose
        #: also record pure view nodes (VIEW, RESHAPE, PERMUTE, TRANSPOSE): the same bytes as
        #: the node they view, so off by default (in a 32-token eval they are a quarter of
        #: the data, most of it the KV cache seen five ways)
        self.views = views
        self.llama_cpp: Any = None
        self.lib: ctypes.CDLL | None = None
        self.model: Any = None
        self.vocab: Any = None
        self.ctx: Any = None
        self.n_ctx = 0
        self._batch: Any = None
        self._tap: _GraphTap | None = None
        self.info: dict[str, Any] = {}

    # -- lifecycle -------------------------------------------------------------------------
    def load(self) -> None:
        if not self.path.is_file():
            raise UsageError(f"{self.spec}: {self.path} is not a file (give a .gguf model)")
        L = self.llama_cpp = _import()
        logger = logging.getLogger("llama-cpp-python")
        if not self.verbose and logger.level == logging.NOTSET:
            logger.setLevel(logging.ERROR)  # llama.cpp's load chatter, through llama_cpp's hook
        self.lib = _ggml_lib(L)
        _backend_init(L)
        params = L.llama_model_default_params()
        params.n_gpu_layers = self.n_gpu_layers
        self.model = L.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.model:
            raise LockstepError(f"{self.spec}: llama.cpp could not load {self.path} "
                                "(not a GGUF model it supports?)")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.info = self._model_info()

    def _meta_str(self, key: str) -> str | None:
        L = self.llama_cpp
        buf = ctypes.create_string_buffer(512)
        n = L.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    def _model_info(self) -> dict[str, Any]:
        L = self.llama_cpp
        m = self.model
        ftype = int(L.llama_model_ftype(m)) if hasattr(L, "llama_model_ftype") else None
        quant = None
        if ftype is not None and hasattr(L, "llama_ftype_name"):
            raw = L.llama_ftype_name(ftype)
            quant = raw.decode() if raw else None
        if not quant:
            buf = ctypes.create_string_buffer(256)
            L.llama_model_desc(m, buf, len(buf))
            quant = buf.value.decode().split()[-1] if buf.value else None
        n_embd = int(L.llama_model_n_embd(m))
        n_head = int(L.llama_model_n_head(m))
        arch = self._meta_str("general.architecture")
        # the MLP width: what splits a fused gate_up of the other side (align.tables)
        n_ff = self._meta_str(f"{arch}.feed_forward_length") if arch else None
        return {
            "quantization": quant or "unknown", "file_type": ftype,
            "architecture": arch,
            "n_ff": int(n_ff) if n_ff and n_ff.isdigit() else None,
            "vocab_size": int(L.llama_vocab_n_tokens(self.vocab)),
            "n_layer": int(L.llama_model_n_layer(m)), "n_embd": n_embd, "n_head": n_head,
            "n_head_kv": int(L.llama_model_n_head_kv(m)),
            "head_dim": n_embd // n_head if n_head else None,
            "n_ctx_train": int(L.llama_model_n_ctx_train(m))
            if hasattr(L, "llama_model_n_ctx_train") else None,
        }

    def close(self) -> None:
        L = self.llama_cpp
        self._free_context()
        if self.model:
            L.llama_model_free(self.model)
            self.model = None
        self.vocab = None

    def _free_context(self) -> None:
        L = self.llama_cpp
        if self._batch is not None:
            L.llama_batch_free(self._batch)
            self._batch = None
        if self.ctx:
            L.llama_free(self.ctx)
        self.ctx = None
        self.n_ctx = 0
        self._tap = None  # the callback outlives no context that could call it

    def context_params(self, n_ctx: int, callback: Any = None) -> Any:
        """llama.cpp context parameters: one ubatch holds the whole context (so one eval is one
        graph), no flash attention (the attention probabilities are a node), ``callback`` as
        cb_eval (None: plain llama.cpp, as the benchmark's baseline)."""
        L = self.llama_cpp
        p = L.llama_context_default_params()
        p.n_ctx = p.n_batch = p.n_ubatch = n_ctx
        p.n_seq_max = 1
        p.n_threads = p.n_threads_batch = self.n_threads
        if hasattr(L, "LLAMA_FLASH_ATTN_TYPE_DISABLED"):
            p.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        if callback is not None:
            p.cb_eval = callback
            p.cb_eval_user_data = None
        return p

    def _ensure_context(self, n_positions: int) -> None:
        """A context of the smallest padded size that holds ``n_positions`` (the KV cache views
        recorded each step are as large as the context, so it is kept tight)."""
        if self.model is None:
            raise UsageError(f"{self.spec}: load() the engine before generating")
        n_ctx = max(_CTX_ALIGN, -(-n_positions // _CTX_ALIGN) * _CTX_ALIGN)
        if self.ctx and self.n_ctx == n_ctx:
            return
        self._free_context()
        L = self.llama_cpp
        assert self.lib is not None
        tap = _GraphTap(L, self.lib)
        tap.views = self.views
        tap.crash_step = self.test_crash_at_step
        tap.n_embd = self.info["n_embd"]
        self.ctx = L.llama_init_from_model(self.model, self.context_params(n_ctx,
                                                                           tap.c_callback))
        if not self.ctx:
            raise LockstepError(f"{self.spec}: llama.cpp could not create a context of "
                                f"{n_ctx} tokens")
        self._tap = tap
        self.n_ctx = n_ctx
        self._batch = L.llama_batch_init(n_ctx, 0, 1)

    # -- engine ----------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """Token ids as llama.cpp's tokenizer gives them: no BOS/EOS added, special tokens
        in the text parsed (as transformers' tokenizer with add_special_tokens=False)."""
        if self.model is None:
            raise UsageError(f"{self.spec}: load() the engine before tokenizing")
        L = self.llama_cpp
        data = text.encode("utf-8")
        size = len(data) + 8
        for _ in range(2):
            out = (L.llama_token * size)()
            n = L.llama_tokenize(self.vocab, data, len(data), out, size, False, True)
            if n >= 0:
                return [int(x) for x in out[:n]]
            size = -n
        raise LockstepError(f"{self.spec}: llama.cpp could not tokenize {text[:40]!r}")

    def meta(self) -> dict[str, Any]:
        L = self.llama_cpp
        return {**super().meta(), "model": str(self.path), **self.info,
                "compute_dtype": "float32", "n_threads": self.n_threads,
                "n_gpu_layers": self.n_gpu_layers, "device": "cpu" if not self.n_gpu_layers
                else "offloaded", "flash_attn": False,
                "llama_cpp_python_version": _version(L) if L is not None else None,
                "views_recorded": self.views,
                "logits": ["result_output"]}

    def eval(self, ids: Sequence[int], pos: int, rec: Recorder | None = None, *,
             all_logits: bool = True) -> None:
        """One llama_decode of ``ids`` at positions ``pos...``, logits at every position (only
        the last one with ``all_logits=False``), recording every graph node into ``rec``
        (None: the callback asks for nothing)."""
        L = self.llama_cpp
        n = len(ids)
        if pos + n > self.n_ctx:
            raise UsageError(f"{self.spec}: {pos + n} positions do not fit the context "
                             f"({self.n_ctx})")
        b = self._batch
        b.n_tokens = n
        token, position, n_seq, seq, logits = b.token, b.pos, b.n_seq_id, b.seq_id, b.logits
        for i, tok in enumerate(ids):
            token[i] = int(tok)
            position[i] = pos + i
            n_seq[i] = 1
            seq[i][0] = 0
            logits[i] = 1 if all_logits or i == n - 1 else 0
        tap = self._tap
        assert tap is not None
        tap.begin(rec, n)
        try:
            rc = L.llama_decode(self.ctx, b)
        finally:
            tap.end()  # raises what the callback caught (a layout mismatch, a capture error)
        if rc != 0:
            raise LockstepError(f"{self.spec}: llama_decode failed with code {rc}")

    def last_logits(self) -> np.ndarray:
        """The logits of the last evaluated position (float32, a copy)."""
        L = self.llama_cpp
        ptr = L.llama_get_logits_ith(self.ctx, -1)
        if not ptr:
            raise LockstepError(f"{self.spec}: llama.cpp returned no logits")
        return np.ctypeslib.as_array(ptr, shape=(self.info["vocab_size"],)).copy()

    def reset(self, n_positions: int) -> None:
        """A context for ``n_positions`` with an empty KV cache."""
        self._ensure_context(n_positions)
        L = self.llama_cpp
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)

    def _greedy(self, prompt_ids: Sequence[int], steps: int,
                forced: Sequence[int] | None) -> Iterator[tuple[int, np.ndarray]]:
        """Greedy decoding, nothing recorded: yields (token, last-position logits) per step."""
        ids = [int(i) for i in prompt_ids]
        if not ids:
            raise UsageError(f"{self.spec}: the prompt has no tokens")
        self.reset(len(ids) + steps)
        pos, feed = 0, ids
        for step in range(steps):
            if step == self.test_crash_at_step:
                os.kill(os.getpid(), signal.SIGSEGV)  # for tests: the worker dies mid-decode
            self.eval(feed, pos, all_logits=False)  # nothing recorded: the callback asks for none
            pos += len(feed)
            row = self.last_logits()
            token = int(np.argmax(row))
            yield token, row
            feed = [fed_token(forced, step, token)]

    def decode_logits(self, prompt_ids: Sequence[int], steps: int, *,
                      forced: Sequence[int] | None = None) -> tuple[list[int], np.ndarray]:
        rows = np.empty((steps, self.info["vocab_size"]), dtype=np.float32)
        chosen: list[int] = []
        for step, (token, row) in enumerate(self._greedy(prompt_ids, steps, forced)):
            rows[step] = row
            chosen.append(token)
        return chosen, rows

    def step_times(self, prompt_ids: Sequence[int], steps: int) -> list[float]:
        return timed_steps(self._greedy(prompt_ids, steps, None))

    def max_positions(self) -> int | None:
        return self.info.get("n_ctx_train")

    def detokenize(self, ids: Sequence[int], *, skip_special: bool = False) -> str | None:
        if self.model is None:
            return None
        L = self.llama_cpp
        pieces = b""
        buf = ctypes.create_string_buffer(256)
        for tok in ids:
            n = L.llama_token_to_piece(self.vocab, int(tok), buf, len(buf), 0, not skip_special)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = L.llama_token_to_piece(self.vocab, int(tok), buf, len(buf), 0,
                                           not skip_special)
            pieces += buf.raw[:max(n, 0)]
        return pieces.decode("utf-8", "replace")

    def generate(self, rec: Recorder, prompt_ids: Sequence[int], decode: int, *,
                 forced: Sequence[int] | None = None) -> list[int]:
        ids = [int(i) for i in prompt_ids]
        if not ids:
            raise UsageError(f"{self.spec}: the prompt has no tokens")
        self.reset(len(ids) + decode)
        chosen: list[int] = []
        pos = 0
        feed = ids
        for step in range(decode + 1):
            # one step scope per eval, as a watched module's call is: the prefill is step 0,
            # each decode token the next, each on disk when its scope is left
            with rec.step(root=self):
                rec.capture("input_ids", np.asarray([feed], dtype=np.int64), role="input")
                self.eval(feed, pos, rec)
            pos += len(feed)
            token = int(np.argmax(self.last_logits()))
            chosen.append(token)
            feed = [fed_token(forced, step, token)]
        return chosen


_BACKEND_READY = False


def _backend_init(L: Any) -> None:
    global _BACKEND_READY
    if not _BACKEND_READY:
        L.llama_backend_init()
        _BACKEND_READY = True
