"""The child side of an engine run in its own process (see ``isolated``), and the framing both
sides speak.

A native engine (llama.cpp) can die of a signal inside its own code: an instruction the OS has
not enabled for the process (AMX tile state in a VM), a bad pointer, an abort. Run in the
lockstep process, that takes every unsaved result with it. Run here, in a child, it takes only
the child: the parent reports the crash in one line and keeps what was recorded.

The child writes its recordings into the dump itself, as an in-process engine would; only
commands, token ids, metadata and logits travel through the pipes. Messages are framed as a
4-byte JSON length, an 8-byte payload length, the JSON object, then the payload (raw array
bytes whose dtype and shape the JSON gives). Nothing is unpickled.

Run as ``python -c`` by the parent with two file descriptors: commands in, replies out.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import traceback
from typing import Any, BinaryIO

import numpy as np

__all__ = ["Channel", "serve"]

_HEAD = struct.Struct("<IQ")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


class Channel:
    """Framed JSON messages, each with an optional numpy array, over a pair of pipes."""

    def __init__(self, rfd: int, wfd: int) -> None:
        self._r: BinaryIO = os.fdopen(rfd, "rb", buffering=0)
        self._w: BinaryIO = os.fdopen(wfd, "wb", buffering=0)

    def send(self, msg: dict[str, Any], array: np.ndarray | None = None) -> None:
        payload = b""
        if array is not None:
            array = np.ascontiguousarray(array)
            msg = {**msg, "array": {"dtype": array.dtype.str, "shape": list(array.shape)}}
            payload = array.tobytes()
        body = json.dumps(msg, default=_json_default).encode()
        self._w.write(_HEAD.pack(len(body), len(payload)) + body)
        view = memoryview(payload)
        while view:
            view = view[self._w.write(view):]

    def _read(self, n: int) -> bytes | None:
        chunks, left = [], n
        while left:
            chunk = self._r.read(left)
            if not chunk:
                return None
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def recv(self) -> tuple[dict[str, Any], np.ndarray | None] | None:
        """The next message and its array; None when the other side has gone (EOF)."""
        head = self._read(_HEAD.size)
        if head is None:
            return None
        n_body, n_payload = _HEAD.unpack(head)
        body = self._read(n_body)
        payload = self._read(n_payload) if n_payload else b""
        if body is None or payload is None:
            return None
        msg = json.loads(body)
        array = None
        spec = msg.pop("array", None)
        if spec is not None:
            array = np.frombuffer(payload, dtype=np.dtype(spec["dtype"])).reshape(spec["shape"])
        return msg, array

    def close(self) -> None:
        for f in (self._w, self._r):
            try:
                f.close()
            except OSError:
                pass


def _handle(engine: Any, op: str, msg: dict[str, Any],
            chan: Channel) -> tuple[dict[str, Any], np.ndarray | None]:
    if op == "meta":
        return {"meta": engine.meta()}, None
    if op == "tokenize":
        return {"ids": engine.tokenize(msg["text"])}, None
    if op == "detokenize":
        return {"text": engine.detokenize(msg["ids"], skip_special=msg["skip_special"])}, None
    if op == "chat_tokens":
        return {"ids": engine.chat_tokens(msg["messages"])}, None
    if op == "decode_logits":
        chosen, rows = engine.decode_logits(msg["ids"], msg["steps"], forced=msg["forced"])
        return {"chosen": [int(t) for t in chosen]}, np.asarray(rows, dtype=np.float32)
    if op == "record":
        chosen = engine.record_run(msg["out"], msg["meta"], msg["ids"], msg["decode"],
                                   forced=msg["forced"], data=msg["data"],
                                   overwrite=msg["overwrite"], include=msg.get("include"),
                                   exclude=msg.get("exclude"), layers=msg.get("layers"),
                                   on_step=lambda step: chan.send({"step": step}))
        return {"chosen": chosen}, None
    if op == "step_times":
        return {"times": engine.step_times(msg["ids"], msg["steps"])}, None
    if op == "max_positions":
        return {"n": engine.max_positions()}, None
    if op == "peak_memory":
        from ..bench.memory import peak_memory

        return {"memory": peak_memory()}, None
    if op == "module_times":
        from ..bench.modules import module_times

        return {"modules": module_times(engine, msg["ids"], msg["steps"], iters=msg["iters"],
                                        warmup=msg["warmup"])}, None
    raise ValueError(f"unknown worker command {op!r}")


def serve(rfd: int, wfd: int) -> int:
    """Answer the parent's commands until ``close`` or EOF."""
    from ..errors import LockstepError
    from .registry import construct

    chan = Channel(rfd, wfd)
    engine: Any = None
    while True:
        got = chan.recv()
        if got is None:
            break
        msg, _ = got
        op = str(msg.get("op"))
        try:
            if op == "close":
                if engine is not None:
                    engine.close()
                chan.send({"ok": True})
                break
            if op == "load":
                engine = construct(msg["spec"], **msg["options"])
                engine.load()
                reply, array = {"name": engine.name}, None
            elif engine is None:
                raise RuntimeError(f"worker command {op!r} before load")
            else:
                reply, array = _handle(engine, op, msg, chan)
            chan.send({"ok": True, **reply}, array)
        except LockstepError as exc:
            chan.send({"error": str(exc), "kind": type(exc).__name__})
        except Exception as exc:  # a bug: the parent re-raises it with this traceback
            chan.send({"error": f"{type(exc).__name__}: {exc}", "kind": "bug",
                       "traceback": traceback.format_exc()})
    chan.close()
    return 0


if __name__ == "__main__":
    sys.exit(serve(int(sys.argv[1]), int(sys.argv[2])))
