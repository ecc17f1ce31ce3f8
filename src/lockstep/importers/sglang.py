"""SGLang's dumper output (``sglang.srt.debug_utils.dumper``) as a lockstep dump.

SGLang's dumper writes one file per tensor into ``DIR/EXP_NAME/``, named by its tags joined
with ``___``: ``step=3___rank=0___dump_index=17___name=layer_start__hidden_states___
recompute_status=disabled___layer_id=2.pt`` (older versions: ``forward_pass_id=3___rank=0___
name=...___dump_index=17.pt``). Each file is ``torch.save``'d: a dict ``{"value": tensor,
"meta": {...}}``, or the tensor alone in older versions. Its non-intrusive mode names module
outputs ``non_intrusive__<module>.output`` (``.output.K`` for the K-th tensor of a tuple) and
inputs ``non_intrusive__<module>.inputs.K``, and the forward batch's ``input_ids`` and
``positions`` under those names.

The import writes one lockstep dump per rank (a multi-rank recording when there are several,
docs/format.md "Ranks": ``compare`` merges them): each SGLang step is a step, numbered from 0
in order, records in ``dump_index`` order. Names: a module's output under the module's name
(``model.layers.0.mlp``), its K-th output ``name:K``, its inputs ``name:input.K``, as
``lockstep.record`` names them; a manual dump's name is kept, under ``layers.N.`` when it has a
``layer_id`` tag and no layer of its own. The other tags are kept in each record's ``tags``
field. A ``dims`` annotation that marks a dim ``[tp]`` (or ``[tp:partial]``) becomes the
record's ``shard`` field, which ``compare`` merges the ranks by. A tensor the dumper saved
twice in a step (the same bytes, dtype and shape: a module passing its input on) is recorded
once and pointed at, as a recording of the program does.

Files are read with ``torch.load(weights_only=True)``: never unpickled beyond tensors and
plain values. A file that cannot be read so, or that holds no tensor, is skipped and counted.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import UsageError

__all__ = ["SGLangImport", "import_sglang", "parse_filename", "record_name"]

_PREFIX = "non_intrusive__"
#: a hooked module's value: ``<module>.output``, ``<module>.output.K``, ``<module>.inputs.K``
#: (the root module has no name: ``output``, ``inputs.0``)
_DIM = re.compile(r"[^\[\]]+(?:\[([^\]]*)\])?")  # ``h[tp]``, ``(h*d)[tp:partial]``
_HOOKED = re.compile(r"(?:(.*)\.)?(output|inputs)(?:\.([^.]+))?")
_LAYERED = re.compile(r"(?:^|[._])(?:layers?|blk|h)[._]\d+(?:[._]|$)")
#: tags that say where a record goes rather than what it is
_PLACE = ("step", "forward_pass_id", "rank", "dump_index", "name")


def parse_filename(filename: str) -> dict[str, str] | None:
    """The tags of an SGLang dumper file name (``k=v`` joined by ``___``, then ``.pt``), or
    None when the name is not one."""
    if not filename.endswith(".pt"):
        return None
    tags: dict[str, str] = {}
    for part in filename[:-3].split("___"):
        key, sep, value = part.partition("=")
        if not sep or not key:
            return None
        tags[key] = value
    if "name" not in tags or not ({"step", "forward_pass_id"} & tags.keys()):
        return None
    return tags


def record_name(tags: dict[str, str]) -> str:
    """The lockstep name of an SGLang record (see the module docstring)."""
    name = tags["name"]
    if name.startswith(_PREFIX):
        m = _HOOKED.fullmatch(name[len(_PREFIX):])
        if m is None:
            return name[len(_PREFIX):]
        module, kind, key = m.group(1) or "", m.group(2), m.group(3)
        if kind == "inputs":
            return f"{module}:input" + (f".{key}" if key else "")
        return f"{module}:{key}" if key else module
    layer = tags.get("layer_id")
    if layer is not None and layer.lstrip("-").isdigit() and not _LAYERED.search(name):
        return f"layers.{layer}.{name}"
    return name


@dataclass
class SGLangImport:
    """What an import read and wrote."""

    out: Path
    ranks: int
    steps: int
    records: int
    files: int  #: dumper files found
    skipped: list[tuple[str, str]] = field(default_factory=list)  #: (file, why)


def _number(value: str, what: str, path: Path) -> int:
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"{path.name}: its {what} tag is {value!r:.40}, not an integer; "
                         "is this an SGLang dumper file?") from None


def _files(src: Path) -> list[tuple[int, int, int, dict[str, str], Path]]:
    """(rank, step, dump_index, tags, path) of every dumper file under ``src`` (the
    experiment directory, or the dumper's directory holding exactly one experiment)."""
    if not src.is_dir():
        raise UsageError(f"{src} is not a directory: give the SGLang dumper's experiment "
                         "directory (DUMPER_DIR/EXP_NAME, e.g. /tmp/dumper/dump_2025...)")
    names = [p for p in src.iterdir() if p.is_file()]
    found = [(parse_filename(p.name), p) for p in names]
    if not any(tags for tags, _ in found):
        subdirs = [p for p in src.iterdir() if p.is_dir() and any(
            parse_filename(q.name) for q in p.iterdir() if q.is_file())]
        if len(subdirs) == 1:
            return _files(subdirs[0])
        if subdirs:
            raise UsageError(f"{src} holds {len(subdirs)} SGLang dumper experiments ("
                             f"{', '.join(sorted(p.name for p in subdirs)[:4])}): give one")
        raise UsageError(f"{src} holds no SGLang dumper files (step=...___rank=...___name="
                         "...___dump_index=....pt)")
    out = []
    for tags, path in found:
        if tags is None:
            continue
        step = _number(tags.get("step", tags.get("forward_pass_id", "")), "step", path)
        rank = _number(tags.get("rank", "0"), "rank", path)
        index = _number(tags.get("dump_index", "0"), "dump_index", path)
        out.append((rank, step, index, tags, path))
    out.sort(key=lambda f: f[:3])
    return out


def _load(path: Path) -> tuple[Any, dict[str, Any], str | None]:
    """(value, its meta, None) of one dumper file, or (None, {}, why) when it cannot be read
    safely."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # an unpickling refusal, a torn file: skipped and counted
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return None, {}, f"not readable as tensors and plain values: {first[:200]}"
    if isinstance(obj, dict) and "value" in obj and set(obj) <= {"value", "meta"}:
        meta = obj.get("meta")
        return obj["value"], meta if isinstance(meta, dict) else {}, None
    return obj, {}, None


def shard_of_dims(dims: Any, ndim: int) -> list[Any] | None:
    """The ``shard`` field (docs/format.md "Ranks") of SGLang's ``dims`` annotation: a dim
    marked ``[tp]`` is column-parallel on that dim (``["col", i]``), ``[tp:partial]`` holds
    partial sums (``["row", 0]``); None when it names no tensor-parallel dim, or does not fit
    the tensor's dims (the ranks are then merged as detected)."""
    if not isinstance(dims, str):
        return None
    tokens = dims.split("#", 1)[0].split()
    if len(tokens) != ndim:
        return None
    found: list[Any] | None = None
    for i, token in enumerate(tokens):
        m = _DIM.fullmatch(token)
        if m is None or not m.group(1):
            continue
        for modifier in m.group(1).split(","):
            axis, _, qualifiers = modifier.strip().partition(":")
            if axis.strip() != "tp":
                continue
            rule = ["row", 0] if "partial" in qualifiers.split("+") else ["col", i]
            if found is not None and found != rule:
                return None  # two tensor-parallel dims: no one rule merges them
            found = rule
    return found


def _first_copy(value: Any, seen: dict[tuple[Any, ...], Any]) -> Any:
    """``value``, or the tensor of the same dtype, shape and bytes loaded earlier in the step:
    the dumper saved one tensor twice (a module passing on its input, a parent returning its
    child's output), and passing the first copy again makes the record point at its data,
    as a recording of the running program does (pairing reads such repeats)."""
    import torch

    if not isinstance(value, torch.Tensor) or value.layout is not torch.strided:
        return value
    try:
        raw = value.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    except (RuntimeError, TypeError):  # bytes torch will not show: never shared
        return value
    digest = hashlib.blake2b(raw.tobytes()).digest()
    key = (value.dtype, tuple(value.shape), digest)
    return seen.setdefault(key, value)


def import_sglang(src: str | os.PathLike[str], out: str | os.PathLike[str], *,
                  overwrite: bool = False,
                  progress: Callable[[int, int], Any] | None = None) -> SGLangImport:
    """Write the SGLang dumper experiment at ``src`` as a lockstep dump at ``out`` (one per
    rank under it when the run had several ranks)."""
    from ..capture.ranks import rank_path
    from ..capture.recorder import Recorder
    from ..capture.tensors import leaves

    files = _files(Path(src))
    target = Path(out)
    ranks = sorted({f[0] for f in files})
    if ranks != list(range(len(ranks))):
        raise UsageError(f"{src}: the files are of ranks {ranks[:8]}, not 0 to "
                         f"{len(ranks) - 1}: a rank's files are missing")
    steps = sorted({f[1] for f in files})
    renumber = {s: i for i, s in enumerate(steps)}
    result = SGLangImport(target, len(ranks), len(steps), 0, len(files))
    meta = {"engine": "sglang", "imported_from": str(src), "format_imported": "sglang-dumper",
            "sglang_steps": steps}
    done = 0
    for rank in ranks:
        where = target if len(ranks) == 1 else rank_path(target, rank, len(ranks))
        rank_meta = meta if len(ranks) == 1 else {**meta, "rank": rank,
                                                  "world_size": len(ranks)}
        rec = Recorder(where, meta=rank_meta, overwrite=overwrite)
        seen: dict[tuple[Any, ...], Any] = {}  # this step's tensors, by their content
        try:
            for _, step, _, tags, path in (f for f in files if f[0] == rank):
                done += 1
                if progress is not None:
                    progress(done, len(files))
                value, file_meta, why = _load(path)
                if why is None and next(leaves(value), None) is None:  # what capture records
                    why = f"holds no tensor ({type(value).__name__})"
                if why is not None:
                    result.skipped.append((path.name, why))
                    continue
                if renumber[step] != rec.current_step:
                    rec.next_step(renumber[step])
                    seen.clear()
                value = _first_copy(value, seen)
                fields: dict[str, Any] = {}
                extra = {k: v for k, v in tags.items() if k not in _PLACE and
                         (k, v) != ("recompute_status", "disabled")}
                if extra:
                    fields["tags"] = extra
                shard = shard_of_dims(file_meta.get("dims"), getattr(value, "ndim", -1))
                if shard is not None and len(ranks) > 1:
                    fields["shard"] = shard
                rec.capture(record_name(tags), value, strict=False, **fields)
                result.records += 1
        except BaseException as exc:
            rec.close(error=f"{type(exc).__name__}: {exc}")
            raise
        rec.close()
    return result
