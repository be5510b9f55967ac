"""Notes through a Hugging Face transformer loaded from a local path (``pip install mmclin[notes-hf]``).

For users with a clinical language model on disk (nothing is downloaded: the path must hold
``config.json``, the weights and the tokenizer files, e.g. from ``save_pretrained``):

* ``mode: frozen`` (default): the featurizer runs the model once per note text (no
  gradients, cached by text) and stores one mean-pooled embedding per note; the encoder
  learns only a projection, an MLP and the time attention pooling. Cheap to train.
* ``mode: finetune``: the featurizer stores token ids; the encoder runs the transformer on
  each batch's notes (mean-pooled over tokens) and trains it end to end.

    ModalitySpec(name="notes", kind="notes", columns=["notes"], encoder="notes_hf",
                 options={"model_path": "/models/clinical-bert", "mode": "frozen", "max_length": 256})
"""
from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from mmclin.batch import ModalityTokens
from mmclin.encoders.base import ModalityEncoder
from mmclin.encoders.notes import TimeAttentionPool, example_notes
from mmclin.registry import ENCODERS

MODES = ("frozen", "finetune")


def _transformers():
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("the 'notes_hf' encoder needs Hugging Face transformers: pip install 'mmclin[notes-hf]'") from err
    return transformers


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Masked mean over tokens. Shapes: hidden ``[N, K, H]``, mask ``[N, K]`` -> ``[N, H]``."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class HFText:
    """Text featurizer for ``notes_hf``: token ids (finetune) or cached frozen embeddings (frozen).

    Options: ``model_path`` (required), ``mode`` (``frozen``), ``max_length`` (256),
    ``embed_batch_size`` (32).
    """

    option_names: ClassVar[tuple[str, ...]] = ("model_path", "mode", "max_length", "embed_batch_size")
    mask_key = "token_mask"

    def __init__(self, model_path: str | None = None, mode: str = "frozen", max_length: int = 256,
                 embed_batch_size: int = 32) -> None:
        if not model_path:
            raise ValueError("encoder 'notes_hf' needs options={'model_path': <a local folder with config.json, weights "
                             "and tokenizer>}; nothing is downloaded")
        if mode not in MODES:
            raise ValueError(f"notes_hf mode={mode!r}: choose one of {MODES}")
        self.model_path, self.mode, self.max_length, self.embed_batch_size = str(model_path), mode, int(max_length), int(embed_batch_size)
        self._tokenizer = None
        self._model = None
        self._cache: dict[str, np.ndarray] = {}

    def _check_path(self) -> None:
        from pathlib import Path

        if not (Path(self.model_path) / "config.json").exists():
            raise FileNotFoundError(f"notes_hf model_path {self.model_path!r} has no config.json; save a model there with "
                                    "model.save_pretrained(path) and tokenizer.save_pretrained(path)")

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._check_path()
            self._tokenizer = _transformers().AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
        return self._tokenizer

    @property
    def model(self):
        if self._model is None:
            self._check_path()
            self._model = _transformers().AutoModel.from_pretrained(self.model_path, local_files_only=True).eval()
        return self._model

    def fit(self, texts: list[str]) -> "HFText":
        self.hidden_size = int(_transformers().AutoConfig.from_pretrained(self.model_path, local_files_only=True).hidden_size)
        return self

    def _tokens(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length, add_special_tokens=True)
        ids = enc["input_ids"]
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter((t for x in ids for t in x), dtype=np.int64, count=int(lengths.sum()))
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return flat, offsets

    @torch.no_grad()
    def _embed(self, texts: list[str]) -> np.ndarray:
        todo = sorted({t for t in texts if t not in self._cache})
        for start in range(0, len(todo), self.embed_batch_size):
            chunk = todo[start:start + self.embed_batch_size]
            enc = self.tokenizer(chunk, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
            hidden = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            for t, v in zip(chunk, mean_pool(hidden, enc["attention_mask"].bool()).float().numpy()):
                self._cache[t] = v
        if not texts:
            return np.zeros((0, self.hidden_size), dtype=np.float32)
        return np.stack([self._cache[t] for t in texts]).astype(np.float32)

    def transform(self, texts: list[str]) -> tuple[dict[str, Tensor], np.ndarray | None]:
        if self.mode == "frozen":
            return {"embedding": torch.from_numpy(self._embed(texts))}, None
        flat, offsets = self._tokens(texts)
        return {"token": torch.from_numpy(flat)}, offsets

    def encoder_kwargs(self) -> dict[str, Any]:
        return {"model_path": self.model_path, "mode": self.mode, "hidden_size": self.hidden_size}

    def state_dict(self) -> dict[str, Any]:
        return {"model_path": self.model_path, "mode": self.mode, "max_length": self.max_length,
                "embed_batch_size": self.embed_batch_size, "hidden_size": self.hidden_size}

    def load_state_dict(self, state: dict[str, Any]) -> "HFText":
        for k, v in state.items():
            setattr(self, k, v)
        return self


@ENCODERS.register("notes_hf")
class HFNotesEncoder(ModalityEncoder):
    """Notes through a local Hugging Face transformer, frozen (cached embeddings) or fine-tuned.

    Args:
        model_path: local model folder (from the featurizer's options); None with ``hf_config``
            builds a randomly initialised model from a config dict (tests, no files).
        mode: ``"frozen"`` or ``"finetune"``. hidden_size: the transformer's width H.
        d_model: output width D. dropout. hf_config: a ``transformers`` config as a dict.

    Shapes:
        frozen: ``embedding [B, L, H]``, ``note_time, note_mask [B, L]``;
        finetune: ``token [B, L, K]`` (long), ``token_mask [B, L, K]``, ``note_time, note_mask [B, L]``.
        output: tokens ``[B, 1, D]``, mask True.
    """

    kind = "notes"
    requires: ClassVar[tuple[str, ...]] = ("transformers",)

    def __init__(self, model_path: str | None = None, mode: str = "frozen", hidden_size: int | None = None,
                 d_model: int = 64, dropout: float = 0.1, hf_config: dict | None = None) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"notes_hf mode={mode!r}: choose one of {MODES}")
        self.output_dim, self.mode = d_model, mode
        self.transformer = None
        if mode == "finetune":
            tf = _transformers()
            if hf_config is not None:
                cfg = tf.AutoConfig.for_model(**hf_config)
                self.transformer = tf.AutoModel.from_config(cfg)
            else:
                self.transformer = tf.AutoModel.from_pretrained(model_path, local_files_only=True)
            if getattr(self.transformer, "pooler", None) is not None:
                self.transformer.pooler = None  # unused: notes are mean-pooled over tokens
            hidden_size = int(self.transformer.config.hidden_size)
        if hidden_size is None:
            raise ValueError("notes_hf (frozen) needs hidden_size (the featurizer provides it)")
        self.hidden_size = hidden_size
        self.project = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, d_model), nn.GELU(),
                                     nn.Dropout(dropout), nn.Linear(d_model, d_model), nn.LayerNorm(d_model))
        self.pool = TimeAttentionPool(d_model)

    @classmethod
    def text_featurizer(cls, options: dict[str, Any]) -> HFText:
        return HFText(**{k: options[k] for k in HFText.option_names if k in options})

    def _note_vectors(self, inputs: dict[str, Tensor]) -> Tensor:
        if self.mode == "frozen":
            return inputs["embedding"]
        tokens, mask, notes = inputs["token"], inputs["token_mask"], inputs["note_mask"]
        b, length, _ = tokens.shape
        out = torch.zeros(b, length, self.hidden_size, device=tokens.device)
        if notes.any():  # run the transformer on real notes only
            hidden = self.transformer(input_ids=tokens[notes], attention_mask=mask[notes].long()).last_hidden_state
            out = out.to(hidden.dtype).index_put((notes.nonzero(as_tuple=True)), mean_pool(hidden, mask[notes]))
        return out

    def forward(self, inputs: dict[str, Tensor]) -> ModalityTokens:
        x = self.project(self._note_vectors(inputs))
        pooled = self.pool(x, inputs["note_time"], inputs["note_mask"])
        return ModalityTokens(pooled.unsqueeze(1), torch.ones(pooled.shape[0], 1, dtype=torch.bool, device=pooled.device))

    @classmethod
    def example(cls) -> "HFNotesEncoder":
        config = {"model_type": "bert", "vocab_size": 40, "hidden_size": 8, "num_hidden_layers": 1,
                  "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 16}
        return cls(mode="finetune", d_model=8, hf_config=config)

    def example_input(self, batch_size: int, seed: int = 0) -> dict[str, Tensor]:
        vocab = int(self.transformer.config.vocab_size)
        return example_notes(batch_size, seed, {"token": lambda g, shape: torch.randint(1, vocab, shape, generator=g)},
                             "token_mask")
