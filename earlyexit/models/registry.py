"""The model registry: one ``ModelSpec`` per name, ``register_model``, ``build_model`` and the spec lookups.

Each backbone file registers its builders with ``@register_model(name, ...)``;
the spec carries everything the rest of the package would otherwise have to
ask "which model is this?" about:

- ``builder``: ``builder(num_classes=, in_chans=, exits=, **options) -> MultiExitModel``;
- ``input``: what the model reads, ``"image"`` (``(B, C, H, W)`` tensors) or
  ``"text"`` (token-id dicts);
- ``tiny``: build options for a small but faithful model (the registry-wide
  contract tests build every model with them);
- ``foreign_weights``: ``adapter(model, state_dict) -> state_dict or None``:
  recognises an upstream checkpoint (torchvision's ResNet or ViT) and returns it
  in this model's names (``--init``); None when the file is not of that kind;
- ``data_options``: ``hook(build_options) -> dict`` of options for a text
  dataset the model's weights decide (BERT weights: ``{"vocab": path}``);
- ``options``: the functions a ``**kw`` builder passes its options on to, whose
  signatures say what each option must be (``earlyexit.preflight`` checks
  ``--model-opt`` values against them before anything runs).

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

import types
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from torch import Tensor

from ..errors import ConfigError
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
    input: str = "image"                                  # "image" or "text"
    tiny: Mapping[str, Any] = field(default_factory=dict)  # build options of a small test model
    foreign_weights: WeightsAdapter | None = None          # upstream checkpoint -> our names, or None
    data_options: DataOptions | None = None                # build options -> text dataset options
    options: tuple[Callable[..., Any], ...] = ()           # where a **kw builder's options are declared
    grad_clip: float | None = None                         # default max gradient norm of its training (None: off);
                                                           # the paper clips at 1 for the ViT (its code) and EfficientNet (its appendix D.3)

    def __post_init__(self) -> None:
        if self.input not in INPUT_KINDS:
            raise ValueError(f"model {self.name!r}: input must be one of {', '.join(INPUT_KINDS)}, got {self.input!r}")
        object.__setattr__(self, "tiny", types.MappingProxyType(dict(self.tiny)))
        object.__setattr__(self, "options", tuple(self.options))


_REGISTRY: dict[str, ModelSpec] = {}
_FAMILIES: dict[str, tuple[Callable[[str], ModelSpec], str]] = {}   # prefix -> (resolver, what its names are)
_RESOLVED: dict[str, ModelSpec] = {}


def register_model(name: str, **spec_fields: Any) -> Callable[[Builder], Builder]:
    """Decorator: register the builder it wraps under ``name`` with the other ``ModelSpec`` fields.

    Args:
        name: registry name (unique).
        **spec_fields: ``input``, ``tiny``, ``foreign_weights``, ``data_options``, ``options``, ``grad_clip``.
    Returns:
        A decorator that registers the builder and returns it unchanged.
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


def build_model(name: str, *, num_classes: int, in_chans: int = 3, exits: Any = None, **kwargs: Any) -> MultiExitModel:
    """Build a registered model.

    Args:
        name: registry name (see ``list_models()``).
        num_classes: classes of every exit.
        in_chans: input channels (image models).
        exits: IC placement (see ``earlyexit.models.common``).
        **kwargs: model-specific options (e.g. ``image_size``).
    Returns:
        A ``MultiExitModel``.
    """
    spec = get_spec(name)
    try:
        model = spec.builder(num_classes=num_classes, in_chans=in_chans, exits=exits, **kwargs)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        bad = str(e).split("argument")[-1].strip()
        raise ConfigError(f"model {name!r} does not take the option {bad}") from None
    model.arch = name
    return model


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
