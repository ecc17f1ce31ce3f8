"""The engine registry: every kind's factory imports and says what its class says, the CLI's
help and errors come from it, and opening an engine leaves the process as it found it."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lockstep.engines import Engine, open_engine
from lockstep.engines.registry import KINDS, find_kind, recording, spec_help, takes
from lockstep.engines.rerun import options_from_meta
from lockstep.errors import UsageError

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.mark.parametrize("kind", [k for k in KINDS if k.factory is not None],
                         ids=lambda k: k.kind)
def test_each_factory_imports_and_matches_its_entry(kind):
    factory = kind.load_factory()
    assert callable(factory)
    if isinstance(factory, type):  # a class: the entry's flags are the class's
        assert issubclass(factory, Engine)
        assert factory.native == kind.native
        import inspect

        params = inspect.signature(factory).parameters
        assert ("dtype" in params) == kind.dtype and ("device" in params) == kind.device


def test_specs_are_looked_up_in_the_registry():
    assert takes("hf:x", "dtype") and takes("zoo:x", "device")
    assert not takes("llamacpp:x.gguf", "dtype") and not takes("py:m:F", "device")
    assert not takes("", "dtype") and not takes("nothing", "dtype")
    assert recording("dump:some/dir") == Path("some/dir") and recording("hf:d") is None
    assert find_kind("vllm:x") is None
    listed = spec_help(recordings=True)
    assert all(e in listed for k in KINDS for e in k.examples)
    assert "dump:" not in spec_help() and "llamacpp:" not in spec_help(module_tree=True)


def test_errors_name_what_the_registry_knows():
    with pytest.raises(UsageError, match="unknown engine 'vllm'.*known engines: hf, "
                                         "llamacpp, zoo, py$"):
        open_engine("vllm:model")
    with pytest.raises(UsageError, match="dump:d names a recording, not an engine"):
        open_engine("dump:d")
    with pytest.raises(UsageError, match="takes no option 'dtype'.*a dtype is for hf: and zoo: "
                                         "engines"):
        open_engine("llamacpp:x.gguf", dtype="float32")


def test_options_from_a_dumps_metadata_follow_each_kinds_entry():
    meta = {"dtype": "bfloat16", "bug": "wrong_kv_slot", "vm": False}
    assert options_from_meta("zoo:d", meta) == {"dtype": "bfloat16", "bug": "wrong_kv_slot"}
    assert options_from_meta("hf:d", meta, {"device": "cpu"}) == {"dtype": "bfloat16",
                                                                  "device": "cpu"}
    assert options_from_meta("llamacpp:f.gguf", meta) == {}


ENGINE_FILE = '''
from engine_helper_h3 import NAME
from lockstep.engines import Engine

class Mine(Engine):
    name = NAME
    def load(self): pass
    def tokenize(self, text): return [1]
    def generate(self, rec, prompt_ids, decode, *, forced=None): return []
'''


def test_a_python_engine_file_leaves_sys_path_as_it_was(tmp_path):
    (tmp_path / "engine_helper_h3.py").write_text("NAME = 'mine'\n")
    (tmp_path / "eng_h3.py").write_text(ENGINE_FILE)
    before = list(sys.path)
    try:
        engine = open_engine(f"py:{tmp_path / 'eng_h3.py'}:Mine")
    finally:
        for name in ("eng_h3", "engine_helper_h3"):
            sys.modules.pop(name, None)
    assert engine.name == "mine"  # its own import of a file beside it worked
    assert sys.path == before


def test_a_python_engine_file_runs_once_however_often_its_engine_is_constructed(tmp_path):
    """diff constructs each engine to check its options, then again to record: the user's
    file ran twice (a second model load at its top, prints twice). It runs as an import does:
    once, and again only once edited."""
    runs = tmp_path / "runs.txt"
    body = ENGINE_FILE.replace("from engine_helper_h3 import NAME", "NAME = 'mine'")
    count = f"open({str(runs)!r}, 'a').write('x')\n"
    path = tmp_path / "eng_once.py"
    path.write_text(count + body)
    spec = f"py:{path}:Mine"
    try:
        first, second = open_engine(spec), open_engine(spec)
        assert runs.read_text() == "x" and type(first) is type(second)
        path.write_text(count + body.replace("'mine'", "'edited'"))
        assert open_engine(spec).name == "edited" and runs.read_text() == "xx"
    finally:
        sys.modules.pop("eng_once", None)


def test_loading_a_transformers_model_leaves_the_environment_and_asks_no_hub(tmp_path):
    """In a fresh process with no offline setting: the load asks the hub nothing (a local
    server stands in for it and counts requests), and sets no HF_HUB_OFFLINE."""
    from models import save_tiny

    save_tiny("llama", tmp_path / "m")
    asked: list[str] = []

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_response(404)
            self.end_headers()

        do_HEAD = do_GET

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(PYTHONPATH=SRC, HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}")
    code = ("import os, sys; from lockstep.engines import open_engine; "
            "e = open_engine('hf:' + sys.argv[1]); e.load(); "
            "print(e.model is not None, os.environ.get('HF_HUB_OFFLINE'), "
            "os.environ.get('TRANSFORMERS_OFFLINE'))")
    try:
        done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], env=env,
                              check=False,
                              capture_output=True, text=True, timeout=300)
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", "None", "None"]
    assert asked == []
