"""Multi-exit models: the contract, the registry and the backbones.

- ``multiexit``: ``MultiExitModel``, the contract every backbone fulfils;
- ``registry``: ``ModelSpec``, ``register_model``, ``build_model`` (``weights=``: pretrained weights),
  ``model_config``, ``list_models``, ``get_spec`` and the spec lookups (foreign weights, data options);
- ``common``: helpers the backbone files share (``check_fields``, the check every config dataclass makes;
  ``parse_ic_after`` / ``resolve_ic_after``, the IC placement ``ic_after=``; ``feature_info_for``,
  ``stage_costs``, ``init_conv_bn``);
- ``heads``: IC head designs;
- one file per backbone, each with its config dataclass (``MLPConfig``, ``ResNetConfig``, ``ViTConfig``,
  ``EfficientNetConfig``, ``MSDNetConfig``, ``BertModelConfig``) and its registered sizes, instances of it:
  ``resnet``, ``efficientnet``, ``mlp``, ``vit``, ``msdnet``, ``bert`` (its pretrained weights in ``bert_weights``);
- ``torchvision_any``: the family ``torchvision:NAME``, any torchvision classifier traced and cut into stages,
  and ``from_module`` for your own traceable classifier (``tvgraph``: the torch.fx cutting; ``graphperm``: the
  permutation symmetries weight matching reads from the graph).

Importing this package imports every backbone file, so every model is registered.
"""

from __future__ import annotations

from ..tree import slice_state, state_batch_size
from . import bert, efficientnet, mlp, msdnet, resnet, torchvision_any, vit  # noqa: F401  (each registers its models)
from .common import check_fields, feature_info_for, init_conv_bn, parse_ic_after, resolve_ic_after, stage_costs
from .multiexit import MultiExitModel
from .torchvision_any import from_module
from .registry import (ModelSpec, adapt_foreign_weights, build_model, data_options, get_spec, list_models,
                       load_pretrained, model_config, register_family, register_model, spec_of, unregister_model)

__all__ = ["MultiExitModel", "ModelSpec", "build_model", "model_config", "load_pretrained", "from_module", "list_models",
           "get_spec", "spec_of",
           "register_model", "register_family",
           "unregister_model", "adapt_foreign_weights", "data_options", "slice_state", "state_batch_size",
           "check_fields", "parse_ic_after", "resolve_ic_after", "feature_info_for", "stage_costs", "init_conv_bn"]
