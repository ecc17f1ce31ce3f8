"""What a path holds: one file, a directory of shards, or a PEFT adapter directory."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import CheckpointError
from .paths import inside, member, named_file, read_json
from .tensors import TensorSource

__all__ = ["Checkpoint", "open_checkpoint"]


@dataclass
class Checkpoint:
    """The files of a checkpoint, opened and checked; ``tensors()`` streams them in order."""

    path: Path
    kind: str  #: "safetensors", "sharded safetensors", "peft adapter", "gguf", "torch"
    files: list[Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    adapter: dict[str, Any] | None = None

    def tensors(self) -> Iterator[TensorSource]:
        for f in self.files:
            yield from f.tensors()

    @property
    def count(self) -> int:
        return sum(sum(1 for _ in f.tensors()) for f in self.files)


def _open_file(path: Path) -> Any:
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        from .gguf_file import GGUFFile
        return GGUFFile(path)
    if suffix in (".bin", ".pt", ".pth"):
        from .torch_file import TorchFile
        return TorchFile(path)
    if suffix == ".safetensors":
        from .safetensors_file import SafetensorsFile
        return SafetensorsFile(path)
    try:
        with open(path, "rb") as f:  # unknown suffix: sniff
            head = f.read(4)
    except OSError as exc:
        raise CheckpointError(path, f"cannot read: {exc.strerror or exc}") from None
    if head == b"GGUF":
        from .gguf_file import GGUFFile
        return GGUFFile(path)
    from .safetensors_file import SafetensorsFile
    return SafetensorsFile(path)


def _adapter(path: Path) -> Checkpoint:
    config = read_json(path / "adapter_config.json", path)
    if not isinstance(config, dict):
        raise CheckpointError(path / "adapter_config.json", "not a JSON object")
    targets = config.get("target_modules")
    info = {"peft_type": config.get("peft_type"), "base_model": config.get(
        "base_model_name_or_path"), "target_modules": sorted(map(str, targets)) if isinstance(
        targets, list) else targets, "r": config.get("r"), "lora_alpha": config.get("lora_alpha")}
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (path / name).exists() or (path / name).is_symlink():
            f = _open_file(inside(path, path / name))
            return Checkpoint(path, "peft adapter", [f], dict(getattr(f, "metadata", {})),
                              info)
    raise CheckpointError(path, "adapter_config.json but no adapter_model.safetensors "
                                "(or adapter_model.bin)")


def _sharded(path: Path, index: Path) -> Checkpoint:
    data = read_json(index, path)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(index, "no weight_map object")
    names = sorted({v for v in weight_map.values() if isinstance(v, str)})
    if len(names) != len(set(map(str, weight_map.values()))):
        raise CheckpointError(index, "a weight_map value is not a file name (a string)")
    shards = []
    for name in names:
        try:
            shards.append(member(path, name, index))
        except CheckpointError as exc:
            if "is missing" not in str(exc):
                raise
            missing = sum(not (path / n).exists() for n in names)
            raise CheckpointError(index, f"shard {name[:200]} is missing ({missing} of "
                                         f"{len(names)} missing)") from None
    files = [_open_file(p) for p in shards]
    listed = {src.name for f in files for src in f.tensors()}
    absent = sorted(set(weight_map) - listed)
    if absent:
        raise CheckpointError(index, f"tensor {absent[0][:200]!r} is in the weight_map but in "
                                     f"no shard ({len(absent)} such)")
    meta = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
    return Checkpoint(path, "sharded safetensors", files, {str(k): v for k, v in meta.items()})


def _directory(path: Path) -> Checkpoint:
    config = path / "adapter_config.json"
    if config.exists() or config.is_symlink():
        return _adapter(path)
    index = path / "model.safetensors.index.json"
    if index.exists() or index.is_symlink():
        return _sharded(path, index)
    for pattern, kind in (("*.safetensors", "sharded safetensors"), ("*.gguf", "gguf"),
                          ("*.bin", "torch"), ("*.pt", "torch")):
        found = sorted(path.glob(pattern))
        if found:
            return Checkpoint(path, kind, [_open_file(inside(path, p)) for p in found])
    raise CheckpointError(path, "no checkpoint here: no *.safetensors, *.gguf, *.bin or *.pt "
                                "files, no adapter_config.json")


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open and validate the checkpoint at ``path`` (headers only; no data read yet)."""
    p = Path(path)
    if p.is_dir():
        return _directory(p)
    named_file(p)  # exists, and a regular file (a FIFO would block forever)
    f = _open_file(p)
    kind = {"GGUFFile": "gguf", "TorchFile": "torch"}.get(type(f).__name__, "safetensors")
    return Checkpoint(p, kind, [f], dict(getattr(f, "metadata", {})))
