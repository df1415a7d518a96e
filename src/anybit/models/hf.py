"""Hugging Face ``transformers`` models and tokenizers from a local directory -- never downloaded.

``transformers`` is an optional dependency (``pip install 'anybit[hf]'``), imported only when one of
these functions is called. Every load passes ``local_files_only=True``, so nothing is fetched from
the Hub whatever ``HF_HUB_OFFLINE`` says (and with it set, ``transformers`` itself refuses to try).
A directory that lacks what is needed is a clear error before ``transformers`` is asked.

    model = anybit.models.hf.load_pretrained("path/to/all-MiniLM-L6-v2")
    tokenizer = anybit.models.hf.load_tokenizer("path/to/all-MiniLM-L6-v2")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                   "vocab.json")
AUTO_CLASSES = ("AutoModel", "AutoModelForSequenceClassification", "AutoModelForMaskedLM",
                "AutoModelForTokenClassification", "AutoModelForCausalLM", "AutoModelForImageClassification")


class HFModelError(ValueError):
    """A Hugging Face model directory that cannot be used (missing files, transformers not installed)."""


class HFModelNotFoundError(HFModelError, FileNotFoundError):
    """No Hugging Face model directory at the given path."""


def transformers():
    """The ``transformers`` module, or a clear error if it is not installed."""
    try:
        import transformers as tf
    except ImportError as e:
        raise HFModelError("Hugging Face models need the transformers package, which is not installed: "
                           "pip install 'anybit[hf]' (or pip install transformers)") from e
    return tf


def is_model_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory holding a Hugging Face ``config.json``."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


def check_model_dir(path: str | os.PathLike, tokenizer: bool = False) -> Path:
    """``path`` as a Path if it holds a config, weights and (``tokenizer=True``) tokenizer files; otherwise a
    one-line :class:`HFModelNotFoundError` that says what is missing."""
    p = Path(path)
    local = ("anybit never downloads models: save one with model.save_pretrained(DIR) and "
             "tokenizer.save_pretrained(DIR), or give the directory of an installed copy")
    if not p.exists():
        raise HFModelNotFoundError(f"no model directory at {path}: expected a local Hugging Face model directory "
                                   f"(config.json, weights, tokenizer); {local}")
    if not p.is_dir():
        raise HFModelNotFoundError(f"{path} is a file, not a Hugging Face model directory; {local}")
    if not (p / "config.json").is_file():
        raise HFModelNotFoundError(f"{path} has no config.json, so it is not a Hugging Face model directory; {local}")
    if not any((p / f).is_file() for f in WEIGHT_FILES):
        raise HFModelNotFoundError(f"{path} has a config.json but no weights ({' or '.join(WEIGHT_FILES[::2])}); "
                                   f"{local}")
    if tokenizer and not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise HFModelNotFoundError(f"{path} has no tokenizer files (tokenizer.json, vocab.txt, ...), needed to "
                                   f"tokenize calibration text; save it there with tokenizer.save_pretrained(DIR)")
    return p


def load_pretrained(path: str | os.PathLike, auto_class: str = "AutoModel", **kwargs: Any) -> nn.Module:
    """The model in directory ``path``, in eval mode, loaded by ``transformers.<auto_class>`` from local files
    only. ``AutoModel`` gives the base model (a feature extractor: PTQ compares its hidden states); a
    class with a head (``AutoModelForSequenceClassification``, ...) gives logits."""
    if auto_class not in AUTO_CLASSES:
        raise HFModelError(f"auto_class={auto_class!r} is unknown: expected one of {list(AUTO_CLASSES)}")
    p = check_model_dir(path)
    tf = transformers()
    try:
        model = getattr(tf, auto_class).from_pretrained(str(p), local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HFModelError(f"transformers could not load the model in {path} with {auto_class}: {first}") from e
    model.eval()
    model.anybit_meta = {**(getattr(model, "anybit_meta", None) or {}), "hf": describe(model, p, auto_class)}
    return model


def load_tokenizer(path: str | os.PathLike, **kwargs: Any):
    """The tokenizer in directory ``path``, from local files only."""
    p = check_model_dir(path, tokenizer=True)
    tf = transformers()
    try:
        return tf.AutoTokenizer.from_pretrained(str(p), local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HFModelError(f"transformers could not load the tokenizer in {path}: {first}") from e


def describe(model: nn.Module, source: str | os.PathLike | None = None, auto_class: str | None = None) -> dict:
    """What a checkpoint's sidecar records of a transformers model: its class, its config and where it came from,
    enough for :func:`build` to rebuild the architecture without the source directory."""
    config = getattr(model, "config", None)
    return {"class": type(model).__name__, "auto_class": auto_class,
            "source": str(source) if source is not None else None,
            "config": config.to_dict() if config is not None else None}


def build(info: dict) -> nn.Module:
    """An untrained model of the architecture :func:`describe` recorded (weights come from the checkpoint)."""
    tf = transformers()
    cls = getattr(tf, str(info.get("class")), None)
    config = info.get("config")
    if cls is None or not isinstance(config, dict) or "model_type" not in config:
        raise HFModelError(f"the checkpoint records a transformers model ({info.get('class')}) that this "
                           f"transformers cannot rebuild; pass it: anybit.load(path, model=AutoModel.from_pretrained(DIR))")
    config = dict(config)
    model_type = config.pop("model_type")
    model = cls(tf.AutoConfig.for_model(model_type, **config))
    return model.eval()
