"""The model registry: one ``ModelSpec`` per name, ``register_model``, ``build_model`` and the spec lookups.

Each backbone file registers its sizes with ``register_model(name, config=...)`` (timm's
``create_model``, torchtitan's ``ModelSpec``); the spec carries everything the rest of the package would
otherwise have to ask "which model is this?" about:

- ``config``: the size's config, an instance of the architecture's frozen config dataclass
  (``ResNetConfig``, ``ViTConfig``, ...; nanoGPT's ``GPTConfig``), validated when it is built;
  ``build_model(name, **options)`` (and ``--model-opt KEY=VALUE``) sets its fields by name;
- ``builder``: ``builder(config, num_classes=, in_chans=, ic_after=) -> MultiExitModel``; a spec without a
  ``config`` (a model registered the older way, e.g. in a test) has ``builder(num_classes=, in_chans=,
  ic_after=, **options)``;
- ``input``: what the model reads, ``"image"`` (``(B, C, H, W)`` tensors) or
  ``"text"`` (token-id dicts);
- ``tiny``: build options for a small but faithful model (the registry-wide
  contract tests build every model with them);
- ``foreign_weights``: ``adapter(model, state_dict) -> state_dict or None``:
  recognises an upstream checkpoint (torchvision's ResNet or ViT) and returns it
  in this model's names (``build_model(..., weights=FILE)``); None when the file is not of that kind;
- ``weights_at_build``: the builder reads ``weights`` itself (its config's ``weights`` field: a registered
  name such as torchvision's ``IMAGENET1K_V1`` or ``minilm-l6``, or an upstream folder);
- ``data_options``: ``hook(build_options) -> dict`` of options for a text
  dataset the model's weights decide (BERT weights: ``{"vocab": path}``).

What a model's parts know about themselves stays on the parts: heads and blocks
that weight matching can permute declare ``permutation_axes``, blocks with
foldable BatchNorm declare ``conv_bn_pairs`` (see ``MultiExitModel``).
``build_model`` stamps the registry name on the model (``model.arch``), which
is how ``spec_of`` finds a built model's spec.

A *family* serves names of the form ``PREFIX:NAME`` that are not listed one by
one (``register_family``; ``torchvision:NAME`` for any torchvision classifier):
its resolver makes the ``ModelSpec`` of a name on first use. ``list_models``
lists the registered names only; ``get_spec``, ``build_model`` and the lookups
accept family names too.
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from torch import Tensor

from ..errors import CheckpointError, ConfigError
from .multiexit import MultiExitModel

INPUT_KINDS = ("image", "text")

Builder = Callable[..., MultiExitModel]
WeightsAdapter = Callable[[MultiExitModel, Mapping[str, Tensor]], "dict[str, Tensor] | None"]
DataOptions = Callable[[Mapping[str, Any]], "dict[str, Any]"]


@dataclass(frozen=True)
class ModelSpec:
    """Everything the package knows about one registered model (see the module docstring)."""

    name: str
    builder: Builder
    config: Any = None                                    # the size's config dataclass instance (None: a **kw builder)
    input: str = "image"                                  # "image" or "text"
    tiny: Mapping[str, Any] = field(default_factory=dict)  # build options of a small test model
    foreign_weights: WeightsAdapter | None = None          # upstream checkpoint -> our names, or None
    weights_at_build: bool = False                         # the builder reads config.weights itself
    data_options: DataOptions | None = None                # build options -> text dataset options
    grad_clip: float | None = None                         # default max gradient norm of its training (None: off);
                                                           # the paper clips at 1 for the ViT (its code) and EfficientNet (its appendix D.3)

    def __post_init__(self) -> None:
        if self.input not in INPUT_KINDS:
            raise ValueError(f"model {self.name!r}: input must be one of {', '.join(INPUT_KINDS)}, got {self.input!r}")
        if self.config is not None and not dataclasses.is_dataclass(self.config):
            raise ValueError(f"model {self.name!r}: config must be a dataclass instance, got {self.config!r}")
        object.__setattr__(self, "tiny", types.MappingProxyType(dict(self.tiny)))


_REGISTRY: dict[str, ModelSpec] = {}
_FAMILIES: dict[str, tuple[Callable[[str], ModelSpec], str]] = {}   # prefix -> (resolver, what its names are)
_RESOLVED: dict[str, ModelSpec] = {}


def register_model(name: str, **spec_fields: Any) -> Callable[[Builder], Builder]:
    """Decorator: register the builder it wraps under ``name`` with the other ``ModelSpec`` fields.

    Args:
        name: registry name (unique).
        **spec_fields: ``config``, ``input``, ``tiny``, ``foreign_weights``, ``weights_at_build``, ``data_options``,
            ``grad_clip``.
    Returns:
        A decorator that registers the builder and returns it unchanged (so one builder can serve several sizes).
    Raises:
        ValueError: the name is taken, or a field is invalid.
    """
    def decorate(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = ModelSpec(name=name, builder=builder, **spec_fields)
        return builder
    return decorate


def unregister_model(name: str) -> None:
    """Remove a registered model (models defined for a test)."""
    if _REGISTRY.pop(name, None) is None:
        raise ValueError(f"unknown model {name!r}")


def register_family(prefix: str, resolve: Callable[[str], ModelSpec], what: str) -> None:
    """Serve the names ``PREFIX:NAME``: ``resolve(NAME)`` returns the spec (its ``name`` the full name) or raises
    an ``earlyexit.errors.ConfigError`` for a NAME it does not know; ``what`` describes the names in errors."""
    if prefix in _FAMILIES:
        raise ValueError(f"model family {prefix!r} is already registered")
    _FAMILIES[prefix] = (resolve, what)


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The ``ModelSpec`` registered under ``name``, or made by its family (``PREFIX:NAME``).

    Raises:
        ConfigError: an unknown name (a ``ValueError``).
    """
    if name in _REGISTRY:
        return _REGISTRY[name]
    prefix, sep, rest = name.partition(":") if isinstance(name, str) else ("", "", "")
    if sep and prefix in _FAMILIES:
        if name not in _RESOLVED:
            _RESOLVED[name] = _FAMILIES[prefix][0](rest)
        return _RESOLVED[name]
    families = "".join(f", or {p}:NAME ({w})" for p, (_, w) in sorted(_FAMILIES.items()))
    raise ConfigError(f"unknown model {name!r}; valid: {', '.join(list_models())}{families}")


def _lookup(name: Any) -> ModelSpec | None:
    """The spec of ``name``, or None for a name no registry or family knows."""
    if not isinstance(name, str):
        return None
    try:
        return get_spec(name)
    except ValueError:
        return None


def spec_of(model: MultiExitModel) -> ModelSpec | None:
    """The spec of a model built by ``build_model`` (None for a model built otherwise)."""
    return _lookup(getattr(model, "arch", None))


def default_grad_clip(name: str | None) -> float | None:
    """The gradient clipping norm a run of model ``name`` uses by default (None: off, or not a registered model)."""
    spec = _lookup(name)
    return None if spec is None else spec.grad_clip


def effective_grad_clip(grad_clip: float | str | None, model: MultiExitModel) -> float | None:
    """``TrainConfig.grad_clip`` with ``"model"`` replaced by the default of ``model``'s spec (off for an
    unregistered model)."""
    return default_grad_clip(getattr(model, "arch", None)) if grad_clip == "model" else grad_clip


def model_config(name: str, **options: Any) -> Any:
    """The config of model ``name`` with ``options`` set by field name, validated by the config class.

    Raises:
        ConfigError: an option the config has no field for, or a value it refuses (one line, a ValueError).
    """
    spec = get_spec(name)
    if spec.config is None:
        raise ConfigError(f"model {name!r} has no config class (it takes its options as keywords)")
    names = [f.name for f in dataclasses.fields(spec.config)]
    for key in options:
        if key not in names:
            raise ConfigError(f"model {name!r} does not take the option {key!r}; its options: {', '.join(names)}")
    try:
        return dataclasses.replace(spec.config, **options)
    except ValueError as e:
        raise ConfigError(f"model {name!r}: {' '.join(str(e).split())}") from None


def build_model(name: str, *, num_classes: int, in_chans: int = 3, ic_after: Any = None, weights: Any = None,
                **options: Any) -> MultiExitModel:
    """Build a registered model (timm's ``create_model``).

    Args:
        name: registry name (see ``list_models()``).
        num_classes: classes of every exit.
        in_chans: input channels (image models).
        ic_after: IC placement, the stages ICs follow (see ``earlyexit.models.common``).
        weights: pretrained weights: a run folder or a weights file of this package's (every model), a
            registered name its builder knows (``weights_at_build``: BERT's ``minilm-l6``, torchvision's
            ``IMAGENET1K_V1``), or a file in the upstream layout its spec's adapter recognises (torchvision's
            ResNet, ViT, EfficientNet); None: random initialisation. The backbone must be covered; ICs the
            source lacks keep their initialisation (``load_pretrained``).
        **options: fields of the model's config (e.g. ``image_size``, ``width``, ``head``).
    Returns:
        A ``MultiExitModel``.
    Raises:
        ConfigError: an unknown name or option, a value the config refuses, a weights name for a model that has
            no upstream weights.
        CheckpointError: weights that cannot be read or do not fit.
    """
    spec = get_spec(name)
    own_run = isinstance(weights, (str, Path)) and _is_run_folder(Path(weights))
    load_after = weights is not None and (own_run or not spec.weights_at_build)
    if load_after and not own_run and spec.foreign_weights is None and not Path(str(weights)).exists():
        raise ConfigError(f"model {name!r} has no upstream weights: weights={str(weights)!r} must be a run folder "
                          "or a weights file of this package's")
    if weights is not None and not load_after:
        options["weights"] = weights  # the builder reads them (a **kw builder: if it takes them)
    if spec.config is None:
        try:
            model = spec.builder(num_classes=num_classes, in_chans=in_chans, ic_after=ic_after, **options)
        except TypeError as e:
            if "unexpected keyword argument" not in str(e):
                raise
            bad = str(e).split("argument")[-1].strip()
            raise ConfigError(f"model {name!r} does not take the option {bad}") from None
    else:
        model = spec.builder(model_config(name, **options), num_classes=num_classes, in_chans=in_chans,
                             ic_after=ic_after)
    model.arch = name
    if load_after:
        load_pretrained(model, weights)
    return model


def _is_run_folder(path: Path) -> bool:
    """A run folder of this package's: its config.json names the model and the training (a Hugging Face folder's
    config.json names neither)."""
    from ..io import read_json_object

    if not (path / "config.json").is_file():
        return False
    try:
        cfg = read_json_object(path / "config.json")
    except CheckpointError:
        return False
    return "model" in cfg and "train" in cfg


def load_pretrained(model: MultiExitModel, path: str | Path, *, what: str = "weights", foreign: bool = True) -> None:
    """Initialise ``model`` from a run folder or a weights file (ours, or a foreign format its spec's adapter converts).

    The backbone must be covered entirely; IC heads missing from the file keep their initialisation,
    and so does the final classifier when the file's is for another number of classes (e.g.
    ImageNet weights for a 10-class task). Nothing is loaded when the file does not fit.

    Args:
        model: a model built by ``build_model``.
        path: a weights file (``.safetensors``, ``.pt``) or a run folder (its ``model.safetensors``).
        what: how errors name the source (``"--init"``).
        foreign: accept a foreign format (False: ``--init``, which starts only from a run of one's own).
    Raises:
        CheckpointError: a missing or unreadable file, weights that do not fit, or a foreign format when
            ``foreign`` is False.
    """
    from ..io import find_weights, load_state_strict, load_weights

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what}: {path} does not exist")
    sd = load_weights(find_weights(path) if path.is_dir() else path)
    ours = model.state_dict()
    final = f"heads.{model.num_exits - 1}."
    replaced: set[str] = set()  # final-classifier keys left at their initialisation (another number of classes)
    try:
        conv = adapt_foreign_weights(model, sd)  # e.g. a torchvision state_dict, in our names
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{what}: {path} does not fit the model: {e.args[0] if e.args else e}") from None
    if conv is not None and not foreign:
        raise CheckpointError(f"{what}: {path} holds upstream (e.g. torchvision) weights, not a run of this "
                              "package's: pretrained weights go to --weights")
    if conv is not None:
        replaced = {k for k in ours if k.startswith(final) and k not in conv}
        sd = conv
    mismatched = {k for k in sd if k.startswith(final) and k in ours and sd[k].shape != ours[k].shape}
    if mismatched and all(sd[k].shape[0] != ours[k].shape[0] for k in mismatched):
        replaced |= mismatched
        sd = {k: v for k, v in sd.items() if k not in mismatched}
    head_prefixes = tuple(f"heads.{k}." for k in range(model.num_exits - 1)) + tuple(replaced)
    missing = [k for k in ours if k not in sd and not k.startswith(head_prefixes)]
    if missing:
        raise CheckpointError(f"{what}: {path} does not fit the model: missing backbone weights such as {missing[0]}")
    unexpected = [k for k in sd if k not in ours]
    if unexpected:
        raise CheckpointError(f"{what}: {path} does not fit the model: unexpected weights such as {unexpected[0]}")
    load_state_strict(model, sd, source=f"{what} {path}", strict=False)


def adapt_foreign_weights(model: MultiExitModel, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
    """``state_dict`` converted to ``model``'s names by its spec's adapter, or None when it is not a foreign format.

    Raises:
        KeyError, ValueError: the adapter recognised the format, but the weights do not fit the model.
    """
    spec = spec_of(model)
    if spec is None or spec.foreign_weights is None:
        return None
    return spec.foreign_weights(model, state_dict)


def data_options(name: str, build_options: Mapping[str, Any]) -> dict[str, Any]:
    """Options a text dataset needs for the model ``name`` built with ``build_options`` (empty for most models)."""
    spec = _lookup(name)
    if spec is None or spec.data_options is None:
        return {}
    return dict(spec.data_options(build_options))
