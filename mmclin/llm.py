"""Load a causal language model and its tokenizer: a local directory, a hub id, or a tiny random-init config.

Every tokenizer leaves here with a pad token and the ``<media>`` placeholder (one token id) that the fusion code
replaces with, or attends to, encoder tokens. The LM is frozen by default; LoRA adapters come from peft.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, NamedTuple

import huggingface_hub.constants
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from mmclin.errors import ConfigError

MEDIA_TOKEN = "<media>"  # placeholder for one medium (image, volume, series or lead group) in the prompt

# Small enough for a CPU test step; LlamaConfig fields, overridden by `tiny`.
TINY_LLAMA: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 4096,  # byte-level tokens: one per ASCII character
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_FREEZE = ("none", "all", "all_but_lora")
# Short names accepted in the `lora` dict, mapped to peft LoraConfig fields.
_LORA_ALIASES = {"alpha": "lora_alpha", "dropout": "lora_dropout"}
_LORA_DEFAULTS = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"}


class LoadedLM(NamedTuple):
    """A causal LM and its tokenizer; unpacks as ``model, tokenizer = load_causal_lm(...)``."""

    model: PreTrainedModel  # a peft PeftModel when LoRA is on
    tokenizer: PreTrainedTokenizerBase


_SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", MEDIA_TOKEN]


def byte_tokenizer(model_max_length: int = TINY_LLAMA["max_position_embeddings"]) -> PreTrainedTokenizerFast:
    """A byte-level fast tokenizer built offline: ids 0-255 are the bytes, then the special tokens.

    No merges are learned, so the vocabulary is the same on every machine and library version and any text
    (any script, any symbol) round-trips exactly. ByT5Tokenizer is the library's byte tokenizer, but it is a slow
    Python tokenizer that appends EOS to every encoding, which breaks prompt building for a causal LM.

    Args:
        model_max_length: longest sequence the paired model accepts, in tokens.

    Returns:
        A tokenizer with ``<s>`` (BOS, prepended by the post-processor as Llama does), ``</s>``, ``<pad>``,
        ``<unk>`` and ``<media>``; it round-trips through ``save_pretrained``/``AutoTokenizer.from_pretrained``.
    """
    byte_to_symbol = bytes_to_unicode()  # the printable stand-ins GPT-2's byte-level BPE uses for raw bytes
    backend = Tokenizer(models.BPE(vocab={byte_to_symbol[b]: b for b in range(256)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.add_special_tokens(_SPECIAL_TOKENS)
    return _byte_level_tokenizer(backend, model_max_length)


def bpe_tokenizer(texts: Iterable[str], vocab_size: int,
                  model_max_length: int = TINY_LLAMA["max_position_embeddings"]) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2's scheme) fitted on `texts` with the ``tokenizers`` trainer.

    The 256 bytes are in the vocabulary, so any text still encodes and decodes exactly; merges learned from the
    texts make their frequent words single tokens, so a report is ~4-5x fewer tokens than with
    :func:`byte_tokenizer`. Merges stay inside words (GPT-2's pre-tokenizing pattern). Fitting is deterministic:
    the same texts give the same vocabulary.

    Args:
        texts: the corpus to fit on (e.g. the training reports, questions and answers).
        vocab_size: vocabulary size including the 256 bytes and the special tokens.
        model_max_length: longest sequence the paired model accepts, in tokens.

    Returns:
        A tokenizer with the special tokens of :func:`byte_tokenizer`.
    """
    if vocab_size < 256 + len(_SPECIAL_TOKENS):
        raise ConfigError(f"vocab_size={vocab_size}: needs at least {256 + len(_SPECIAL_TOKENS)} (the bytes and the "
                          "special tokens)")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=_SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    return _byte_level_tokenizer(backend, model_max_length)


def tokenizer_from_json(text: str, model_max_length: int) -> PreTrainedTokenizerFast:
    """A tokenizer of :func:`byte_tokenizer` / :func:`bpe_tokenizer` back from its ``backend_tokenizer.to_str()``."""
    return _byte_level_tokenizer(Tokenizer.from_str(text), model_max_length)


def _byte_level_tokenizer(backend: Tokenizer, model_max_length: int) -> PreTrainedTokenizerFast:
    backend.decoder = decoders.ByteLevel()
    bos_id = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=[MEDIA_TOKEN],
        model_max_length=model_max_length,
    )


def load_causal_lm(
    source: str | None = None,
    tiny: dict[str, Any] | None = None,
    dtype: Literal["auto", "float32", "bfloat16"] = "auto",
    attn_implementation: str = "sdpa",
    freeze: Literal["none", "all", "all_but_lora"] | None = None,
    lora: dict[str, Any] | None = None,
) -> LoadedLM:
    """Build a causal LM and tokenizer, add ``<media>`` and a pad token, freeze, and wrap with LoRA.

    Args:
        source: local directory with ``config.json`` (works offline) or a hub id (needs the hub or its cache).
        tiny: LlamaConfig fields for a random-init model with the offline byte tokenizer, over ``TINY_LLAMA``;
            ``{}`` gives the defaults. Exactly one of `source` and `tiny`.
        dtype: parameter dtype; ``auto`` keeps the checkpoint's dtype (float32 for `tiny`).
        attn_implementation: transformers attention backend (``sdpa``, ``eager``, ``flash_attention_2``).
        freeze: ``all`` freezes every LM parameter, ``all_but_lora`` freezes all but the LoRA adapters,
            ``none`` trains everything. Default: ``all_but_lora`` with `lora`, else ``all``.
        lora: LoRA settings ``{"r", "alpha", "dropout", "target_modules"}`` (defaults 8, 16, 0.0, ``all-linear``);
            any other peft LoraConfig field passes through. None: no adapters.

    Returns:
        ``LoadedLM(model, tokenizer)``; the model is a peft ``PeftModel`` when `lora` is given.
    """
    if (source is None) == (tiny is None):
        raise ConfigError("load_causal_lm: pass exactly one of `source` (directory or hub id) and `tiny` (config dict)")
    if dtype != "auto" and dtype not in _DTYPES:
        raise ConfigError(f"dtype must be 'auto', 'float32' or 'bfloat16', got {dtype!r}")
    if freeze is None:
        freeze = "all_but_lora" if lora is not None else "all"
    if freeze not in _FREEZE:
        raise ConfigError(f"freeze must be one of {_FREEZE}, got {freeze!r}")
    if (freeze == "all_but_lora") != (lora is not None):
        raise ConfigError(
            f"freeze={freeze!r} with lora={lora!r}: LoRA trains adapters on a frozen LM, so use "
            "freeze='all_but_lora' together with a `lora` dict, and 'none' or 'all' without one"
        )

    if tiny is not None:
        tokenizer, model = _tiny_llama(tiny, dtype, attn_implementation)
    else:
        tokenizer, model = _from_pretrained(source, dtype, attn_implementation)
    add_media_token(tokenizer, model)

    if freeze != "none":
        model.requires_grad_(False)
    if lora is not None:
        model = apply_lora(model, lora)
    return LoadedLM(model, tokenizer)


def _tiny_llama(
    tiny: dict[str, Any], dtype: str, attn_implementation: str
) -> tuple[PreTrainedTokenizerFast, PreTrainedModel]:
    # LlamaConfig keeps unknown keyword arguments as attributes, so a typo would silently give the default.
    known = {f.name for f in dataclasses.fields(LlamaConfig)}
    unknown = sorted(set(tiny) - known)
    if unknown:
        raise ConfigError(f"tiny: unknown LlamaConfig fields {unknown}; known fields: {sorted(known)}")
    fields = {**TINY_LLAMA, **tiny}
    tokenizer = byte_tokenizer(model_max_length=fields["max_position_embeddings"])
    fields.setdefault("vocab_size", len(tokenizer))
    if fields["vocab_size"] < len(tokenizer):
        raise ConfigError(f"tiny: vocab_size={fields['vocab_size']} is smaller than the tokenizer ({len(tokenizer)})")
    config = LlamaConfig(
        **fields,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch_dtype = torch.float32 if dtype == "auto" else _DTYPES[dtype]
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch_dtype)
    return tokenizer, model


def _hub_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; reading the environment again honours a value set
    # later in the process, and local_files_only then fails at once instead of after ~20 s of retries.
    flags = (os.environ.get(name, "").strip().upper() for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return huggingface_hub.constants.HF_HUB_OFFLINE or any(f in {"1", "ON", "YES", "TRUE"} for f in flags)


def _from_pretrained(
    source: str, dtype: str, attn_implementation: str
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    path = Path(source).expanduser()
    if path.is_dir():
        local_files_only, name = True, str(path)
    elif source.startswith(("/", "./", "../", "~")) or source.count("/") > 1:
        # Hub ids are "name" or "org/name"; anything else was meant as a path, and the hub's "invalid repo id"
        # error would hide that the directory is missing.
        raise FileNotFoundError(f"LM directory {source!r} does not exist (expected a folder with config.json)")
    else:
        local_files_only, name = _hub_offline(), source
    torch_dtype = "auto" if dtype == "auto" else _DTYPES[dtype]
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_files_only)
        model = AutoModelForCausalLM.from_pretrained(
            name, local_files_only=local_files_only, dtype=torch_dtype, attn_implementation=attn_implementation
        )
    except OSError as err:
        if path.is_dir():
            raise
        reason = "the hub is unreachable (offline mode is on)" if local_files_only else "the hub did not provide it"
        raise OSError(
            f"LM {source!r} not found locally and {reason}; pass a local directory (one holding config.json "
            f"and the tokenizer files) or check the id. Cause: {err}"
        ) from err
    return tokenizer, model


def add_media_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> int:
    """Give `tokenizer` a pad token and the ``<media>`` special token, growing `model`'s embeddings to match.

    Args:
        tokenizer: any transformers tokenizer; changed in place.
        model: the LM that uses it; its input/output embeddings are resized when the vocabulary grew.

    Returns:
        The token id of ``<media>``.
    """
    if tokenizer.pad_token is None:
        # Batches need a pad id. Padded positions are masked out of attention and loss, so reusing EOS changes
        # nothing the model learns, whereas a new pad token would add an untrained embedding row.
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    if MEDIA_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"extra_special_tokens": [MEDIA_TOKEN]}, replace_extra_special_tokens=False)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        # New rows are drawn around the old embeddings' mean (transformers' mean_resizing), so a frozen LM sees an
        # ordinary embedding wherever <media> is left in the text.
        model.resize_token_embeddings(len(tokenizer))
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None and getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = tokenizer.pad_token_id
    return tokenizer.convert_tokens_to_ids(MEDIA_TOKEN)


def apply_lora(model: PreTrainedModel, lora: dict[str, Any]) -> nn.Module:
    """`model` wrapped by peft with LoRA adapters of the `lora` settings (see :func:`load_causal_lm`)."""
    # Imported here: peft pulls in accelerate (~3 s), which runs without LoRA should not pay for.
    from peft import LoraConfig, get_peft_model

    known = {f.name for f in dataclasses.fields(LoraConfig)} - {"task_type"}
    settings = dict(_LORA_DEFAULTS)
    for key, value in lora.items():
        field = _LORA_ALIASES.get(key, key)
        if field not in known:
            raise ConfigError(
                f"lora: unknown setting {key!r}; use r, alpha, dropout, target_modules or a LoraConfig field"
            )
        settings[field] = value
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **settings))


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no `config`; expected a transformers (or peft-wrapped) LM")
    # Multimodal LMs keep the decoder's sizes in a sub-config.
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def lm_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a transformers causal LM, found without knowing its architecture.

    Looks in ``model.get_decoder()`` (the model itself when absent) for the shallowest ``nn.ModuleList`` whose
    length is the config's ``num_hidden_layers``: ``model.layers`` for Llama, Qwen2 and Gemma, ``transformer.h``
    for GPT-2. Works through a peft wrapper.

    Args:
        model: a causal LM, possibly a peft ``PeftModel``.

    Returns:
        The decoder layers, in order.
    """
    n_layers = getattr(_text_config(model), "num_hidden_layers", None)
    if n_layers is None:
        raise ValueError(f"{type(model).__name__}: config has no num_hidden_layers (or n_layer); cannot find layers")
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    lists = [(name, m) for name, m in decoder.named_modules() if isinstance(m, nn.ModuleList)]
    matches = [(name, m) for name, m in lists if len(m) == n_layers]
    if not matches:
        found = ", ".join(f"{name or '<root>'} (len {len(m)})" for name, m in lists) or "none"
        raise ValueError(
            f"{type(model).__name__}: no nn.ModuleList of num_hidden_layers={n_layers} layers in "
            f"{type(decoder).__name__} (from get_decoder()); ModuleLists found: {found}"
        )
    return min(matches, key=lambda item: item[0].count("."))[1]


def lm_hidden_size(model: nn.Module) -> int:
    """Width of the LM's token embeddings (``hidden_size``, ``n_embd`` for GPT-2), which connectors project to."""
    config = _text_config(model)
    for name in ("hidden_size", "n_embd", "d_model"):
        if getattr(config, name, None) is not None:
            return int(getattr(config, name))
    raise ValueError(f"{type(config).__name__} has none of hidden_size, n_embd, d_model")


def save_lm(model: nn.Module, tokenizer: PreTrainedTokenizerBase, directory: str | os.PathLike) -> Path:
    """Save the LM and tokenizer with ``save_pretrained``; a peft model saves only its adapters (merges nothing).

    Args:
        model: the LM, possibly peft-wrapped.
        tokenizer: its tokenizer, with ``<media>``.
        directory: output folder, created if missing; ``load_causal_lm(source=directory)`` reads it back.

    Returns:
        The directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
