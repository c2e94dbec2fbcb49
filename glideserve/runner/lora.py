"""Per-row LoRA: adapters beside the unmerged base weights, each row of a batch with its own deltas.

A ``LoraAdapter`` holds, per target ``nn.Linear`` of the denoiser, the low-rank pair
``(A, B)`` and its scaling (``lora_alpha / r``). ``RowLoRALinear`` replaces such a
linear layer inside this engine's own denoiser instance (nothing is patched globally)
and adds, for every row, the deltas of the adapters that row asked for:
``out = base(x) + sum_i scale_i * alpha_i / r_i * (x A_i^T) B_i^T``, in the order the
request lists them, as peft does for ``set_adapters(names, weights)``. Rows without an
adapter pay nothing beyond the base layer; an adapter's delta is computed only on the
rows that use it.

``RowAdapters`` says which adapters each row of the current forward uses. The block
loop narrows it when it runs a subset of the rows (full rows of a mixed batch), so a
layer always sees the mapping of exactly the rows it is given.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from pathlib import Path

import torch
from torch import nn

from glideserve.errors import InvalidRequestError
from glideserve.runner.lora_files import TARGETABLE_SUFFIXES, LoraAdapter, read_lora_file
from glideserve.scheduler.memory import MemoryLedger


class RowAdapters:
    """The adapters of each row of the current forward; see the module docstring."""

    def __init__(self):
        self._levels: list[list[tuple[tuple[LoraAdapter, float], ...]]] = []
        self._plans: list[list[tuple[LoraAdapter, torch.Tensor, torch.Tensor]]] = []

    @property
    def active(self) -> bool:
        return bool(self._levels) and bool(self._plans[-1])

    @property
    def in_use(self) -> bool:
        """Rows of the current forward carry adapters (some of its sub-batches may not)."""
        return bool(self._levels)

    @contextlib.contextmanager
    def rows(self, per_row: list[tuple[tuple[LoraAdapter, float], ...]], device: torch.device):
        """Set the adapters of every row for one forward."""
        self._push(per_row, device)
        try:
            yield
        finally:
            self._pop()

    @contextlib.contextmanager
    def narrow(self, index: torch.Tensor | None):
        """Within this block, the forward runs only the rows at ``index`` (in that order)."""
        if index is None or not self._levels:
            yield
            return
        current = self._levels[-1]
        self._push([current[i] for i in index.tolist()], index.device)
        try:
            yield
        finally:
            self._pop()

    def plan(self) -> list[tuple[LoraAdapter, torch.Tensor, torch.Tensor]]:
        """Per adapter in use: the rows that use it and each row's scale, in first-use order."""
        return self._plans[-1] if self._levels else []

    def _push(self, per_row, device) -> None:
        by_adapter: dict[int, tuple[LoraAdapter, list[int], list[float]]] = {}
        for row, adapters in enumerate(per_row):
            for adapter, scale in adapters:
                entry = by_adapter.setdefault(id(adapter), (adapter, [], []))
                entry[1].append(row)
                entry[2].append(scale)
        self._levels.append(per_row)
        self._plans.append([(adapter, torch.tensor(rows, device=device), torch.tensor(scales))
                            for adapter, rows, scales in by_adapter.values()])

    def _pop(self) -> None:
        self._levels.pop()
        self._plans.pop()


class RowLoRALinear(nn.Module):
    """A linear layer of the denoiser with per-row LoRA deltas; the base layer is kept unmerged."""

    def __init__(self, base: nn.Linear, path: str, rows: RowAdapters, component: str | None = None):
        super().__init__()
        self.base = base
        self.path = path
        self.rows = rows
        self.component = component  # None: a denoiser layer; else the text encoder it belongs to

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.rows.active:
            return out
        for adapter, index, scales in self.rows.plan():
            layer = adapter.table(self.component).get(self.path)
            if layer is None:
                continue
            a, b, scaling = layer
            scale = (scales * scaling).to(out).view(-1, *([1] * (x.dim() - 1)))
            delta = nn.functional.linear(nn.functional.linear(x[index], a), b) * scale
            out = out.index_add(0, index, delta)
        return out


def check_fits(name: str, module: nn.Module | None, component: str, layers: dict) -> None:
    """Raise InvalidRequestError unless every layer of the adapter is a linear layer of ``module`` with
    matching sizes (a LoRA made for another model never reaches a forward)."""
    if module is None:
        raise InvalidRequestError(f"LoRA {name!r} has {component} weights, and this model has no {component}",
                                  "lora")
    for path, (a, b, _) in layers.items():
        try:
            layer = module.get_submodule(path)
        except AttributeError:
            raise InvalidRequestError(f"LoRA {name!r} targets {component}.{path}, which this model does not have; "
                                      "it was made for another model", "lora") from None
        layer = layer.base if isinstance(layer, RowLoRALinear) else layer
        if not isinstance(layer, nn.Linear) or a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
            raise InvalidRequestError(f"LoRA {name!r} does not fit {component}.{path} of this model (sizes "
                                      f"{tuple(a.shape)} / {tuple(b.shape)}); it was made for another model", "lora")


def install_row_lora(module: nn.Module, paths, rows: RowAdapters, component: str | None = None) -> int:
    """Wrap the linear layers at ``paths`` of the denoiser (``component`` None) or of a text encoder
    (once each); returns how many were wrapped now."""
    wrapped = 0
    for path in paths:
        parent_path, _, child = path.rpartition(".")
        parent = module.get_submodule(parent_path) if parent_path else module
        layer = getattr(parent, child) if not child.isdigit() else parent[int(child)]
        if isinstance(layer, RowLoRALinear):
            continue
        if not isinstance(layer, nn.Linear):
            raise InvalidRequestError(f"LoRA targets {path}, which is not a linear layer of this model", "lora")
        replacement = RowLoRALinear(layer, path, rows, component)
        if child.isdigit():
            parent[int(child)] = replacement
        else:
            setattr(parent, child, replacement)
        wrapped += 1
    return wrapped


def targetable_linear_paths(module: nn.Module) -> list[str]:
    """Paths of the linear layers of ``module`` a LoRA may target (see ``TARGETABLE_SUFFIXES``)."""
    return [name for name, layer in module.named_modules()
            if isinstance(layer, nn.Linear) and name.endswith(TARGETABLE_SUFFIXES)]


def _suffix(module: str) -> str:
    """The layer kind of a module path (``to_q``, ``ff.net.2``, ...)."""
    return max((sfx for sfx in TARGETABLE_SUFFIXES if module.endswith(sfx)), key=len)


class LoraStore:
    """Adapters from one directory, by name; files are read once and the most recently used kept.

    ``NAME`` is ``DIR/NAME.safetensors`` or ``DIR/NAME/pytorch_lora_weights.safetensors``
    (diffusers' ``save_lora_weights``). Names are plain (letters, digits, ``._-``), and the
    resolved file must stay inside the directory, so neither ``..`` nor a symlink can
    reach outside it. Only safetensors are read.
    """

    def __init__(self, directory: str | Path, denoiser_prefix: str, pipeline_class: str, dtype: torch.dtype,
                 device: torch.device, max_resident: int = 16, modules: dict[str, nn.Module] | None = None,
                 max_resident_bytes: int = 512 * 2**20):
        self.directory = Path(directory).resolve()
        if not self.directory.is_dir():
            raise ValueError(f"the LoRA directory {directory} does not exist")
        self.denoiser_prefix = denoiser_prefix
        self.pipeline_class = pipeline_class
        self.dtype, self.device = dtype, device
        self.max_resident = max_resident
        self.modules = modules or {}  # denoiser_prefix / text encoder name -> module, to check adapters against
        self._resident: dict[str, LoraAdapter] = {}
        self.memory = MemoryLedger(max_resident_bytes)  # the resident adapters' low-rank weights
        self._lock = threading.Lock()  # admission (any thread) and prefill (the compute thread) both look up

    def path_of(self, name: str) -> Path:
        from glideserve.errors import LoraNotFoundError

        for candidate in (self.directory / f"{name}.safetensors",
                          self.directory / name / "pytorch_lora_weights.safetensors"):
            if candidate.is_file():
                real = candidate.resolve()
                if not real.is_relative_to(self.directory):
                    raise InvalidRequestError(f"LoRA {name!r} points outside the LoRA directory", "lora")
                return real
        raise LoraNotFoundError(f"no LoRA named {name!r} in the server's LoRA directory; GET /v1/loras lists them",
                                "lora")

    def get(self, name: str) -> LoraAdapter:
        with self._lock:
            adapter = self._resident.pop(name, None)
        if adapter is None:
            adapter = self._read(self.path_of(name), name)
        self._keep(name, adapter)
        return adapter

    def _read(self, path: Path, name: str) -> LoraAdapter:
        """Read an adapter file and check every component against this model."""
        adapter = read_lora_file(path, name, self.denoiser_prefix, self.pipeline_class, self.dtype, self.device)
        for component, layers in {self.denoiser_prefix: adapter.layers, **adapter.text_layers}.items():
            if layers:
                check_fits(name, self.modules.get(component), component, layers)
        return adapter

    def _keep(self, name: str, adapter: LoraAdapter) -> None:
        """Make ``adapter`` the most recently used resident one, evicting the least recently used beyond
        ``max_resident`` adapters or the memory budget. (A running request keeps its own reference, so an
        evicted adapter's memory returns once the requests that use it finish.)"""
        if adapter.nbytes > self.memory.budget_bytes:
            raise InvalidRequestError(f"LoRA {name!r} holds {adapter.nbytes / 2**20:.1f} MiB of weights, more than "
                                      f"the server's adapter budget ({self.memory.budget_bytes / 2**20:.1f} MiB, "
                                      "--lora-memory-mb)", "lora")
        with self._lock:
            self._resident[name] = adapter
            self.memory.release(name)
            while len(self._resident) > self.max_resident or adapter.nbytes > self.memory.free:
                self._evict(next(iter(self._resident)))
            self.memory.claim(name, adapter.nbytes)

    def _evict(self, name: str) -> None:
        self._resident.pop(name)
        self.memory.release(name)

    def evict_all(self) -> None:
        """Forget every resident adapter (they are read again from the folder when named)."""
        with self._lock:
            for name in list(self._resident):
                self._evict(name)

    def add(self, name: str, data: bytes) -> dict:
        """Keep an uploaded adapter as ``DIR/NAME.safetensors`` once it reads and fits the model."""
        from glideserve.errors import LoraExistsError
        from glideserve.params import LORA_NAME

        if not LORA_NAME.fullmatch(name):
            raise InvalidRequestError("a LoRA name is 1-64 letters, digits, '.', '_' or '-', starting with a letter "
                                      f"or digit; got {name!r}", "name")
        target = self.directory / f"{name}.safetensors"
        if target.exists() or (self.directory / name).exists():
            raise LoraExistsError(f"a LoRA named {name!r} exists; DELETE /v1/loras/{name} first", "name")
        handle, temp = tempfile.mkstemp(dir=self.directory, prefix=".upload-", suffix=".part")
        try:
            with os.fdopen(handle, "wb") as f:
                f.write(data)
            adapter = self._read(Path(temp), name)
            os.replace(temp, target)  # visible under its name only once it is known to be good
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        self._keep(name, adapter)
        return next(card for card in self.describe() if card["name"] == name)

    def delete(self, name: str) -> None:
        """Remove an adapter kept as ``DIR/NAME.safetensors``; requests already running keep their copy."""
        path = self.path_of(name)
        if path.parent != self.directory:
            raise InvalidRequestError(f"LoRA {name!r} is a folder; remove it on the server's disk", "name")
        path.unlink()
        with self._lock:
            if name in self._resident:
                self._evict(name)

    def describe(self) -> list[dict]:
        """Every adapter in the directory: whether it is resident and, if so, its rank and target layers."""
        with self._lock:
            resident = dict(self._resident)
        cards = []
        for name in self.available():
            adapter = resident.get(name)
            cards.append({"name": name, "resident": adapter is not None,
                          "rank": adapter.rank if adapter else None,
                          "target_modules": sorted({_suffix(m) for m in adapter.layers}) if adapter else None})
        return cards

    def available(self) -> list[str]:
        return available_adapters(self.directory)

    def forget(self, name: str) -> None:
        """Drop a resident adapter (its file was removed through another model's store)."""
        with self._lock:
            if name in self._resident:
                self._evict(name)


def available_adapters(directory: str | Path) -> list[str]:
    """Names of the adapters in a LoRA directory (files and ``save_lora_weights`` folders)."""
    directory = Path(directory)
    names = {p.stem for p in directory.glob("*.safetensors")}
    names |= {p.parent.name for p in directory.glob("*/pytorch_lora_weights.safetensors")}
    return sorted(names)
