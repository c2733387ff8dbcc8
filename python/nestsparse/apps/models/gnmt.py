"""GNMT-style LSTM encoder-decoder with additive attention, every weight matrix an nn.Linear.

Encoder: embedding, a bidirectional first layer (a forward and a backward LSTM, outputs concatenated), then
unidirectional layers with residual connections where input and output widths match (layer 2 on). Decoder
(as in GNMT and the MLPerf reference): the first LSTM layer reads the target embeddings; its output attends
over the encoder outputs (Bahdanau attention with a padding mask); the attention context is concatenated to
the input of every later decoder layer, each of which adds its input state back (residual); a linear
output projection gives the logits. The decoder starts from zero states.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..data import BOS, EOS, PAD

__all__ = ["gnmt", "GNMT", "LSTM", "Encoder", "Decoder", "BahdanauAttention", "DENSE_LAYERS", "dense_layers"]

DENSE_LAYERS = ("encoder.embed", "decoder.embed", "decoder.attn.v", "out")
"""Left dense: the embeddings (not Linear layers anyway), the attention's scoring vector ``v`` (one row) and the
output projection ``out``."""


def dense_layers(model: nn.Module) -> list[str]:
    return list(DENSE_LAYERS)


class LSTM(nn.Module):
    """One LSTM layer from two nn.Linear: ``ih`` (input -> 4*hidden, with the bias) projects the whole input
    sequence once, ``hh`` (hidden -> 4*hidden, no bias) is applied at every step. Gate order i, f, g, o."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.ih = nn.Linear(input_size, 4 * hidden_size)
        self.hh = nn.Linear(hidden_size, 4 * hidden_size, bias=False)
        bound = hidden_size**-0.5
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)
        with torch.no_grad():  # forget gate bias 1: remember by default
            self.ih.bias[hidden_size : 2 * hidden_size] = 1.0

    def forward(
        self, x: Tensor, state: tuple[Tensor, Tensor] | None = None, mask: Tensor | None = None, reverse: bool = False
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x (B, T, input_size) -> outputs (B, T, hidden), final (h, c). ``mask`` (B, T) bool marks real
        steps: at a masked step the state is kept and the output is zero (so a reversed pass over
        right-padded sequences starts at each sequence's last real token). ``reverse`` runs from T-1 to 0."""
        B, T, _ = x.shape
        if state is None:
            h = x.new_zeros(B, self.hidden_size)
            state = (h, h)
        h, c = state
        gates_x = self.ih(x)
        outs: list[Tensor] = [x.new_empty(0)] * T
        for t in range(T - 1, -1, -1) if reverse else range(T):
            i, f, g, o = (gates_x[:, t] + self.hh(h)).chunk(4, -1)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h_new = torch.sigmoid(o) * torch.tanh(c_new)
            if mask is not None:
                m = mask[:, t].unsqueeze(1)
                h_new, c_new = torch.where(m, h_new, h), torch.where(m, c_new, c)
                outs[t] = h_new * m
            else:
                outs[t] = h_new
            h, c = h_new, c_new
        return torch.stack(outs, 1), (h, c)


class BahdanauAttention(nn.Module):
    """score(q, k) = v . tanh(query(q) + key(k)); softmax over the unmasked keys; context = sum of weights x
    values (the encoder outputs)."""

    def __init__(self, query_size: int, key_size: int, hidden: int):
        super().__init__()
        self.query = nn.Linear(query_size, hidden, bias=False)
        self.key = nn.Linear(key_size, hidden)
        self.v = nn.Linear(hidden, 1, bias=False)

    def forward(self, q: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
        """q (B, T, Dq), keys (B, S, Dk), mask (B, S) True at real tokens -> context (B, T, Dk)."""
        scores = self.v(torch.tanh(self.query(q).unsqueeze(2) + self.key(keys).unsqueeze(1))).squeeze(-1)
        scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
        return torch.softmax(scores, -1) @ keys


class Encoder(nn.Module):
    def __init__(self, vocab: int, embed: int, hidden: int, layers: int, dropout: float):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed, padding_idx=PAD)
        self.fwd = LSTM(embed, hidden)
        self.bwd = LSTM(embed, hidden)
        self.layers = nn.ModuleList([LSTM(2 * hidden if i == 0 else hidden, hidden) for i in range(layers - 1)])
        self.dropout = nn.Dropout(dropout)

    def forward(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """src (B, S) -> outputs (B, S, hidden), mask (B, S)."""
        mask = src != PAD
        x = self.dropout(self.embed(src))
        x = torch.cat([self.fwd(x, mask=mask)[0], self.bwd(x, mask=mask, reverse=True)[0]], -1)
        for lstm in self.layers:
            y = lstm(self.dropout(x), mask=mask)[0]
            x = y + x if y.shape == x.shape else y
        return x, mask


class Decoder(nn.Module):
    def __init__(self, vocab: int, embed: int, hidden: int, layers: int, dropout: float, memory_size: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed, padding_idx=PAD)
        self.first = LSTM(embed, hidden)
        self.attn = BahdanauAttention(hidden, memory_size, hidden)
        self.layers = nn.ModuleList([LSTM(hidden + memory_size, hidden) for _ in range(layers - 1)])
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt_in: Tensor, memory: Tensor, mask: Tensor, states: list | None = None):
        """tgt_in (B, T) -> outputs (B, T, hidden) and the new per-layer states."""
        states = states or [None] * (1 + len(self.layers))
        new_states = []
        x, st = self.first(self.dropout(self.embed(tgt_in)), states[0])
        new_states.append(st)
        ctx = self.attn(x, memory, mask)
        for i, lstm in enumerate(self.layers):
            y, st = lstm(self.dropout(torch.cat([x, ctx], -1)), states[i + 1])
            new_states.append(st)
            x = y + x
        return x, new_states


class GNMT(nn.Module):
    """GNMT-style encoder-decoder (see the module docstring). ``forward(src, tgt_in)`` gives teacher-forced
    logits (B, T, vocab) with tgt_in = BOS + target[:-1]; ``greedy(src, max_len)`` decodes greedily.

    Normally left dense when pruning: the embeddings ``encoder.embed`` and ``decoder.embed``, the attention's
    one-row scoring layer ``decoder.attn.v`` and the output projection ``out``; see ``DENSE_LAYERS``. Every
    other weight (LSTM ``ih``/``hh``, attention ``query``/``key``) is an nn.Linear that nestsparse prunes."""

    def __init__(self, vocab: int, embed: int, hidden: int, enc_layers: int, dec_layers: int, dropout: float):
        super().__init__()
        if enc_layers < 1 or dec_layers < 1:
            raise ValueError(f"GNMT: need at least one encoder and one decoder layer, got {enc_layers}, {dec_layers}")
        self.vocab = vocab
        self.encoder = Encoder(vocab, embed, hidden, enc_layers, dropout)
        self.decoder = Decoder(vocab, embed, hidden, dec_layers, dropout, hidden if enc_layers > 1 else 2 * hidden)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        memory, mask = self.encoder(src)
        x, _ = self.decoder(tgt_in, memory, mask)
        return self.out(self.dropout(x))

    @torch.no_grad()
    def greedy(self, src: Tensor, max_len: int) -> Tensor:
        """Greedy decoding: tokens (B, max_len), PAD after each sequence's first EOS."""
        memory, mask = self.encoder(src)
        B = src.shape[0]
        tok = torch.full((B, 1), BOS, dtype=torch.int64, device=src.device)
        states, out = None, []
        done = torch.zeros(B, dtype=torch.bool, device=src.device)
        for _ in range(max_len):
            x, states = self.decoder(tok, memory, mask, states)
            tok = self.out(x).argmax(-1)
            out.append(tok.masked_fill(done.unsqueeze(1), PAD))
            done |= tok.squeeze(1) == EOS
        return torch.cat(out, 1) if out else torch.zeros(B, 0, dtype=torch.int64, device=src.device)


def gnmt(
    vocab: int = 20, embed: int = 64, hidden: int = 128, enc_layers: int = 2, dec_layers: int = 2, dropout: float = 0.1
) -> GNMT:
    """A GNMT-style LSTM encoder-decoder with attention (defaults sized for ``nestsparse.apps.data.seq2seq``)."""
    model = GNMT(vocab, embed, hidden, enc_layers, dec_layers, dropout)
    model.arch = {
        "name": "gnmt",
        "kwargs": {
            "vocab": vocab,
            "embed": embed,
            "hidden": hidden,
            "enc_layers": enc_layers,
            "dec_layers": dec_layers,
            "dropout": dropout,
        },
    }
    return model
