"""A model read from its checkpoint one block at a time: built on the meta device, each block's tensors read from the
safetensors shards when a pass reaches that block, then released.

The tensors go through transformers' own loading (``convert_and_load_state_dict_in_model``), with the key renamings
and conversions its ``from_pretrained`` applies (per-expert tensors fused into 3-D parameters, for example) and the
dtype conversion: a streamed block holds exactly what the model loaded in memory holds. The model is built on the
meta device; the buffers it computes rather than stores (rotary frequencies) are then computed as transformers'
loading computes them, and those that the checkpoint stores are read with their block. A quantized checkpoint (block-
scaled FP8, MXFP4 experts: ``models.quantized``) is dequantized to the dtype asked for as each block is read, its
scales read with their weights.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import UsageError
from .loading import LoadedModel, first_line

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
          "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(kw_only=True)
class Checkpoint:
    """A safetensors checkpoint (one file, or shards with an index) of a model built empty: ``files`` maps each
    stored tensor's name to its file and ``sizes`` to its bytes as stored; ``blocks`` lists, per block, the stored
    names whose loaded parameter is in that block (after transformers' renamings; a quantized weight's scales go with
    it), ``rest`` the others (embeddings, final norm, head). ``quantizer`` is transformers' quantizer of a quantized
    checkpoint, in its dequantizing mode (None otherwise). ``bytes_read`` counts the bytes read from the files, as
    stored (quantized)."""

    root: Path
    files: dict[str, str]
    sizes: dict[str, int]
    blocks: list[list[str]]
    rest: list[str]
    mapping: list = field(default_factory=list, repr=False)  # transformers' weight conversions for this model
    quantizer: object | None = field(default=None, repr=False)
    bytes_read: int = 0

    @property
    def size(self) -> int:
        """The checkpoint's tensors' bytes, as stored."""
        return sum(self.sizes.values())

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The stored tensors ``names``, copied from their files into host memory (counted in ``bytes_read``). Each file
        is mapped only while its tensors are copied, so that the pages read do not stay in the process."""
        from safetensors import safe_open

        tensors, by_file = {}, {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        for file, wanted in by_file.items():
            path = self.root / file
            try:
                with safe_open(path, framework="pt", device="cpu") as handle:
                    for name in wanted:
                        tensors[name] = handle.get_tensor(name).clone()
            except FileNotFoundError:
                raise UsageError(f"cannot read {path}: the shard is missing (the index names it for {wanted[0]})") from None
            except Exception as error:  # safetensors' own error kinds: a damaged file, a tensor the file lacks
                raise UsageError(f"cannot read {wanted[0]} from {path}: {first_line(error)}") from None
            self.bytes_read += sum(self.sizes[name] for name in wanted)
        return tensors

    def load(self, model: nn.Module, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype, device: torch.device) -> None:
        """Put ``tensors`` (stored names, as ``read`` gives them) into ``model``'s parameters on ``device`` in ``dtype``,
        converted (and dequantized) as transformers' loading converts them; a tensor whose shape is not the
        parameter's, or one its conversion refuses, is one UsageError line naming it and its file."""
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig
        from transformers.utils import logging as hf_logging

        config = LoadStateDictConfig(dtype=dtype, dtype_plan=model._get_dtype_plan(dtype), weight_mapping=self.mapping,
                                     device_map={"": device}, ignore_mismatched_sizes=True, hf_quantizer=self.quantizer)
        shown = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # one bar per block would flood the pass's own progress
        try:
            info, _ = convert_and_load_state_dict_in_model(model=model, state_dict=dict(tensors), load_config=config)
        finally:
            if shown:
                hf_logging.enable_progress_bar()
        for key, stored, expected in sorted(info.mismatched_keys):
            raise UsageError(f"cannot load tensor {key}: shape {list(stored)} in {self.root / self._file(key, tensors)}, "
                             f"the model needs {list(expected)}")
        for key, message in sorted(info.conversion_errors.items()):  # transformers logs these and leaves the parameter empty
            raise UsageError(f"cannot load tensor {key} from {self.root / self._file(key, tensors)}: {_reason(message)}")

    def _file(self, key: str, tensors: Mapping[str, torch.Tensor]) -> str:
        """The file of the stored tensor that loads into parameter ``key`` (its name, or one that ends as it does)."""
        return self.files.get(key) or next((self.files[name] for name in tensors if key.endswith(name.split(".", 1)[-1])), "?")


def _reason(message: str) -> str:
    """The error's own words in transformers' record of a failed conversion: a traceback, the error's message, then
    a line beginning "Error:" that names the conversion."""
    lines = [line for line in message.splitlines() if line.strip() and not line.startswith("Error:")]
    return lines[-1] if lines else message


def stored_names(root: Path) -> dict[str, str]:
    """Each stored tensor's name -> its file: from the shards' index, or from the one file. A directory with neither
    is one UsageError line."""
    if (root / INDEX).is_file():
        try:
            return dict(json.loads((root / INDEX).read_text())["weight_map"])
        except (ValueError, KeyError, TypeError) as error:
            raise UsageError(f"cannot read {root / INDEX}: {error}") from None
    if (root / SINGLE).is_file():
        from safetensors import safe_open

        with safe_open(root / SINGLE, framework="pt", device="cpu") as handle:
            return dict.fromkeys(handle.keys(), SINGLE)
    raise UsageError(f"{root} has no {SINGLE} and no {INDEX}: a streamed model is read from safetensors")


def stored_headers(root: Path, files: Mapping[str, str]) -> dict[str, tuple[str, int]]:
    """Each stored tensor's (safetensors dtype, bytes), from its file's header (no tensor is read); a missing shard is
    one UsageError line."""
    from safetensors import safe_open

    headers = {}
    for file in sorted(set(files.values())):
        try:
            with safe_open(root / file, framework="pt", device="cpu") as handle:
                for name in (name for name in files if files[name] == file):
                    piece = handle.get_slice(name)
                    headers[name] = piece.get_dtype(), math.prod(piece.get_shape()) * _BYTES[piece.get_dtype()]
        except FileNotFoundError:
            raise UsageError(f"cannot read {root / file}: the shard is missing (named by {INDEX})") from None
        except Exception as error:
            raise UsageError(f"cannot read {root / file}: {first_line(error)}") from None
    return headers


def weights_bytes(root: Path, dtype: torch.dtype) -> int | None:
    """The bytes the safetensors checkpoint at ``root`` takes once loaded in ``dtype`` (its floating-point tensors
    in ``dtype``, the others as stored), from the files' headers alone; None where ``root`` holds no safetensors
    checkpoint, or a damaged one (said when the model is read)."""
    try:
        headers = stored_headers(root, stored_names(root))
    except Exception:
        return None
    width = torch.empty((), dtype=dtype).element_size()
    return sum(size // _BYTES[kind] * width if kind.startswith(("F", "BF")) else size for kind, size in headers.values())


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
          "TIB": 2**40}


def parse_size(text: str) -> int:
    """A memory size in bytes from ``text``: a number and a unit (``1.5GB``, ``800MB``, ``2GiB``; none: bytes). A text
    that is not one is a UsageError line."""
    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = found.group(2).upper() if found else ""
    if found is None or unit not in _UNITS or float(found.group(1)) <= 0:
        raise UsageError(f"--memory {text!r}: give a size such as 1.5GB, 800MB or 2GiB")
    return int(float(found.group(1)) * _UNITS[unit])


def available_memory() -> int | None:
    """The host memory available now (MemAvailable in /proc/meminfo), in bytes; None where that is not known."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def streams(directory: Path | None, dtype: str, stream: bool, memory: int | None, name: str) -> tuple[bool, str | None]:
    """Whether a scan reads the model ``name`` block by block, and the line that says why where it was not asked
    for. ``directory``: the model's files on disk (None: a .gguf file or the default model). With ``stream`` it must
    hold safetensors (else a UsageError line); without, the model streams where its weights in ``dtype`` exceed
    ``memory`` (None: the memory available)."""
    from ..numbers import size as in_bytes
    from .loading import DTYPES

    size = weights_bytes(directory, DTYPES[dtype]) if directory is not None and directory.is_dir() else None
    if stream:
        if size is None:
            raise UsageError(f"--stream reads a model directory of safetensors files; {name} is not one")
        return True, None
    limit = memory if memory is not None else available_memory()
    if size is None or limit is None or size <= limit:
        return False, None
    where = "--memory" if memory is not None else "the memory available; --memory sets it"
    return True, (f"streaming the model block by block: its weights ({in_bytes(size)} in {dtype}) exceed the memory "
                  f"limit ({in_bytes(limit)}, {where})")


def empty_model(config, dtype: torch.dtype, auto=None) -> nn.Module:
    """The model of ``config`` in ``dtype``, in eval mode with eager attention (the attention probabilities are read),
    built on the meta device: no parameter or stored buffer holds memory until it is loaded. The buffers the model
    computes rather than stores (rotary frequencies, scales) are computed as transformers' loading computes them: made
    real on the CPU, then set by the model's own weight initialisation of their module."""
    from transformers import AutoModelForCausalLM

    auto = auto or AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config, attn_implementation="eager", dtype=dtype)
    owners: dict[str, nn.Module] = {}
    for name, buffer in list(model.named_non_persistent_buffers()):
        owner, _, key = name.rpartition(".")
        module = model.get_submodule(owner)
        module._buffers[key] = torch.empty_like(buffer, device="cpu")
        owners[owner] = module
    for module in owners.values():
        model._init_weights(module)
    return model.eval()


def open_checkpoint(root: Path, model: nn.Module, layers: str, n_layers: int, quantizer=None) -> Checkpoint:
    """The checkpoint at ``root`` of ``model`` (built empty), its stored tensors grouped by the block that holds
    their loaded parameter: ``layers`` is the block list's path in ``model`` (e.g. "model.layers"). ``quantizer``
    (``quantized.dequantizer``) adds the conversions that dequantize a quantized checkpoint, which take each scale to
    its weight's parameter; a quantized tensor stored without its scales is one UsageError line naming them."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    from .quantized import check_scales, quant_method

    files = stored_names(root)
    headers = stored_headers(root, files)
    mapping = get_model_conversion_mapping(model, hf_quantizer=quantizer)
    renamings = [m for m in mapping if not isinstance(m, WeightConverter)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    meta = model.state_dict()
    renamed = {name: rename_source_key(name, renamings, [], model.base_model_prefix, meta)[0] for name in files}
    check_scales(root, quant_method(model.config), files, {name: dtype for name, (dtype, _) in headers.items()}, renamed)
    block = re.compile(rf"^{re.escape(layers)}\.(\d+)\.")
    blocks: list[list[str]] = [[] for _ in range(n_layers)]
    rest = []
    for name in files:
        target, _ = rename_source_key(name, renamings, converters, model.base_model_prefix, meta)
        found = block.match(target)
        if found and int(found.group(1)) < n_layers:
            blocks[int(found.group(1))].append(name)
        else:
            rest.append(name)
    return Checkpoint(root=root, files=files, sizes={name: size for name, (_, size) in headers.items()}, blocks=blocks,
                      rest=rest, mapping=mapping, quantizer=quantizer)


def release(module: nn.Module) -> None:
    """Free ``module``'s parameters (back to the meta device, shapes kept); its buffers stay."""
    for child in module.modules():
        for name, parameter in list(child.named_parameters(recurse=False)):
            child.register_parameter(name, nn.Parameter(torch.empty_like(parameter, device="meta"), requires_grad=False))


@dataclass(kw_only=True)
class StreamedModel:
    """A model built on the meta device (``lm``: its embeddings, final norm and head are loaded, its blocks are not)
    and its ``checkpoint``, from which a pass reads each block; ``dtype`` is the one the blocks are read in.
    ``samples``: each block parameter's ``identity.weights_sample``, taken when a pass loads it (the model's
    ``weights_sha256`` is then the one it has in memory)."""

    lm: LoadedModel
    checkpoint: Checkpoint
    dtype: torch.dtype
    samples: dict[str, bytes] = field(default_factory=dict)
    computing: float = 0.0  # seconds the passes spent with a block loaded, computing (its reads apart)

    def loaded(self, layer: int) -> None:
        """Note block ``layer``'s parameters' samples, as it is loaded."""
        from .identity import weights_sample

        prefix = f"{self.lm.adapter.layers_path(self.lm.model)}.{layer}."
        for name, parameter in self.lm.adapter.blocks(self.lm.model)[layer].named_parameters():
            self.samples.setdefault(prefix + name, weights_sample(parameter))


def load_streamed(source: str, dtype: torch.dtype, device: torch.device, name: str | None = None) -> StreamedModel:
    """The model directory ``source`` built empty, with everything but its blocks read (embeddings, final norm, head):
    each block is read when a pass reaches it (``capture.streaming``), a quantized checkpoint's (block-scaled FP8,
    MXFP4 experts) dequantized to ``dtype``. Its architecture needs a written adapter (an inferred one is checked on a
    probe batch, which a model without its blocks cannot run)."""
    from transformers import AutoTokenizer

    from .adapters import adapter_for, claimed
    from .loading import read_config
    from .quantized import dequantizer

    name = name or source.rstrip("/")
    config = read_config(source, name)
    if not claimed(config):
        raise UsageError(f"{name}: a streamed model needs a written adapter; {config.model_type!r} has none")
    adapter = adapter_for(config)
    quantizer = dequantizer(config, name)
    model = empty_model(config, dtype)
    checkpoint = open_checkpoint(Path(source), model, adapter.layers_path(model), config.num_hidden_layers, quantizer)
    checkpoint.load(model, checkpoint.read(checkpoint.rest), dtype, device)
    model.tie_weights()
    for owner in model.modules():  # the computed buffers on the blocks' device
        for key, buffer in list(owner.named_buffers(recurse=False)):
            if buffer.device.type != "meta":
                owner._buffers[key] = buffer.to(device)
    tokenizer = AutoTokenizer.from_pretrained(source)
    return StreamedModel(lm=LoadedModel(model, tokenizer, adapter, name, source=str(Path(source).resolve())),
                         checkpoint=checkpoint, dtype=dtype)
