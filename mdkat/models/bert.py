"""`model.text_encoder: bert`: any model of the registry, reading text through a fine-tuned BERT.

Every strong MOSI/MOSEI result since 2020 (MISA, Self-MM, MMIM, DMD) fine-tunes BERT on the transcripts
instead of reading frozen 768-d vectors; MMSA's pickles carry the word pieces as `text_bert` (ids, attention
mask, segment ids over the text steps), which `prepare` keeps as `text_ids`, `text_mask`, `text_segment`.

`WithBert` wraps a model: BERT's last hidden states (B, L, H) replace the batch's text features and the
attention mask's sum its text lengths, and the wrapped model runs unchanged, so every model reads BERT the
same way. BERT comes from a local folder only (`model.bert.checkpoint`, `local_files_only`): a missing
folder is an error naming the key, never a download. Its parameters train at their own learning rate
(`model.bert.lr`, the field's 5e-5) through `parameter_groups`.

The wrapped model's text path takes BERT's states as they are: no principal components and no
standardisation (`input_pca.text` is set to 0 for it), since a fine-tuned encoder's output has no fixed
statistics to take from the training split. A model file stores BERT's configuration with the weights,
so it is rebuilt without the checkpoint folder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from torch import Tensor, nn

from mdkat.config import BertConfig, ConfigError
from mdkat.data import Batch
from mdkat.errors import MdkatError
from mdkat.models.base import Model, ModelOutput

CHECKPOINT_KEY = "model.bert.checkpoint"


class BertError(MdkatError):
    """A BERT checkpoint or data without word pieces where `model.text_encoder` is `bert`."""


def require_checkpoint(cfg: BertConfig, file: str) -> Path:
    """The folder of `model.bert.checkpoint`; a `ConfigError` naming the key when it is not a BERT folder."""
    if cfg.checkpoint is None:
        raise ConfigError(
            f"{file}: {CHECKPOINT_KEY}: null, but model.text_encoder 'bert' needs a local folder",
            CHECKPOINT_KEY,
        )
    folder = Path(cfg.checkpoint)
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"{file}: {CHECKPOINT_KEY}: {folder} is not a BERT folder (no config.json there); nothing is "
            "downloaded: save a checkpoint there first (README, 'BERT')",
            CHECKPOINT_KEY,
        )
    return folder


def load_bert(cfg: BertConfig, file: str) -> nn.Module:
    """The pretrained BERT of `model.bert.checkpoint`, from local files only."""
    from transformers import AutoModel  # slow to import: only runs that use BERT pay for it
    from transformers.utils import logging

    folder = require_checkpoint(cfg, file)
    verbosity = logging.get_verbosity()
    # the pooler is left out (nothing reads it); its weights in the file are not a problem worth a table
    logging.set_verbosity_error()
    try:
        return AutoModel.from_pretrained(folder, local_files_only=True, add_pooling_layer=False)
    except (OSError, ValueError) as e:
        raise BertError(f"{file}: {CHECKPOINT_KEY}: {folder}: not a loadable BERT ({e})") from None
    finally:
        logging.set_verbosity(verbosity)


def bert_from_config(config: dict[str, Any]) -> nn.Module:
    """A BERT of the architecture `config` (a `BertConfig.to_dict()`), randomly initialised."""
    from transformers import AutoConfig, AutoModel

    fields = {k: v for k, v in config.items() if k != "model_type"}
    return AutoModel.from_config(
        AutoConfig.for_model(config.get("model_type", "bert"), **fields), add_pooling_layer=False
    )


def load_tokenizer(folder: str | Path):
    """The tokenizer saved with a BERT checkpoint, from local files only."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise BertError(f"{folder}: no loadable tokenizer ({e})") from None


def text_config(cfg: BaseModel) -> BaseModel:
    """A model config whose text path takes BERT's states as they are (`input_pca.text` = 0)."""
    pca = getattr(cfg, "input_pca", None)
    if pca is None or pca.text == 0:
        return cfg
    return cfg.model_copy(update={"input_pca": pca.model_copy(update={"text": 0})})


class WithBert(Model):
    """`model` reading its text through `bert`; forward and loss are the wrapped model's."""

    LEARNED_INPUTS = ("text",)  # `fit_input_statistics` leaves these projections as they are

    def __init__(self, model: Model, bert: nn.Module, bert_lr: float):
        super().__init__()
        self.model, self.bert, self.bert_lr = model, bert, bert_lr
        self.Config = model.Config
        self.LABEL = model.LABEL

    @property
    def decoupled(self) -> bool:
        return self.model.decoupled

    def encode_text(self, batch: Batch) -> Batch:
        """`batch` with BERT's last hidden states (B, L, H) as its text and the word pieces as lengths."""
        if not batch.has_tokens:
            raise BertError(
                "model.text_encoder is 'bert' but the data have no word pieces (text_ids): use mmsa data "
                "with text_bert, or model.text_encoder=features"
            )
        hidden = self.bert(
            input_ids=batch.text_ids, attention_mask=batch.text_mask, token_type_ids=batch.text_segment
        ).last_hidden_state  # (B, L, H)
        return dataclasses.replace(batch, text=hidden, text_len=batch.text_mask.sum(1).clamp_min(1))

    def forward(self, batch: Batch) -> ModelOutput:
        return self.model(self.encode_text(batch))

    def loss(
        self, out: ModelOutput, batch: Batch, weights: Mapping[str, float]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        return self.model.loss(out, batch, weights)

    def parameter_groups(self, lr: float) -> list[dict[str, Any]]:
        """The wrapped model's groups (the first: the history's `lr`), then BERT's at its own rate."""
        bert = {"params": list(self.bert.parameters()), "lr": self.bert_lr}
        return [*self.model.parameter_groups(lr), bert]

    def bert_config(self) -> dict[str, Any]:
        """What rebuilds this BERT without its checkpoint folder."""
        return self.bert.config.to_dict()
