"""nn.LSTM and nn.GRU with nested gate matrices: each layer's and direction's weight_ih and weight_hh is a
NestedSparseLinear, so the recurrences run on the sparse kernels and switch level with the rest of the model."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .sparse import NestedSparseLinear

__all__ = ["NestedSparseRNN", "RECURRENT", "recurrent_weights"]

# The torch recurrent layers that convert, by mode, and their gate count.
RECURRENT = {"LSTM": (nn.LSTM, 4), "GRU": (nn.GRU, 3)}


def recurrent_weights(rnn: nn.LSTM | nn.GRU) -> list[str]:
    """The names of the weight matrices of ``rnn`` that nest, in torch's order: weight_ih_l0, weight_hh_l0, ...,
    with a _reverse pair per layer when bidirectional. Tags of an nn.LSTM / GRU named ``name`` are keyed
    ``f"{name}.{weight}"``."""
    dirs = ("", "_reverse") if rnn.bidirectional else ("",)
    return [f"weight_{kind}_l{layer}{d}" for layer in range(rnn.num_layers) for d in dirs for kind in ("ih", "hh")]


class NestedSparseRNN(nn.Module):
    """An LSTM or GRU (``mode``) whose gate matrices are nested: ``cells`` maps each of torch's weight names
    (``recurrent_weights``: weight_ih_l0, weight_hh_l0, ...) to a NestedSparseLinear holding that matrix and its
    bias. Same inputs and outputs as the torch layer (batch_first, unbatched input, h0 / (h0, c0), multi-layer,
    bidirectional, dropout between layers in training). The input-to-hidden product runs once for the whole
    sequence; the hidden-to-hidden product once per step (batch-sized, the small-batch kernel)."""

    def __init__(
        self,
        mode: str,
        input_size: int,
        hidden_size: int,
        num_layers: int,
        cells: dict[str, NestedSparseLinear],
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
    ):
        super().__init__()
        if mode not in RECURRENT:
            raise ValueError(f"NestedSparseRNN: mode must be one of {list(RECURRENT)}, got {mode!r}")
        self.mode, self.input_size, self.hidden_size, self.num_layers = mode, input_size, hidden_size, num_layers
        self.batch_first, self.dropout, self.bidirectional = batch_first, float(dropout), bidirectional
        self.num_directions = 2 if bidirectional else 1
        gates = RECURRENT[mode][1]
        for layer in range(num_layers):
            for d in range(self.num_directions):
                suffix = f"l{layer}{'_reverse' if d else ''}"
                width = input_size if layer == 0 else hidden_size * self.num_directions
                for kind, k in (("ih", width), ("hh", hidden_size)):
                    cell = cells.get(f"weight_{kind}_{suffix}")
                    if not isinstance(cell, NestedSparseLinear) or (cell.out_features, cell.in_features) != (
                        gates * hidden_size,
                        k,
                    ):
                        raise ValueError(
                            f"NestedSparseRNN: weight_{kind}_{suffix} must be a NestedSparseLinear of "
                            f"({gates * hidden_size}, {k}), got {cell!r}"
                        )
                    if cell.activation != "none":
                        raise ValueError(f"NestedSparseRNN: weight_{kind}_{suffix} must not fuse an activation")
        biased = sorted(name for name, cell in cells.items() if cell.bias is not None)
        if biased and len(biased) != len(cells):  # torch's layers have a bias on every gate matrix or on none
            unbiased = sorted(set(cells) - set(biased))
            raise ValueError(
                f"NestedSparseRNN: {', '.join(biased)} have a bias but {', '.join(unbiased)} do not; every gate "
                "matrix has a bias, or none"
            )
        self.bias = bool(biased)
        self.cells = nn.ModuleDict(cells)

    @classmethod
    def from_dense(cls, rnn: nn.LSTM | nn.GRU, tags: dict[str, Tensor], **options) -> NestedSparseRNN:
        """The nested twin of ``rnn``: ``tags`` by weight name (``recurrent_weights``), ``options`` as for
        NestedSparseLinear.from_dense (densities, num_levels, format, block_shape)."""
        mode = type(rnn).__name__
        if mode not in RECURRENT or not isinstance(rnn, RECURRENT[mode][0]):
            raise TypeError(f"NestedSparseRNN.from_dense: expected nn.LSTM or nn.GRU, got {type(rnn).__name__}")
        if getattr(rnn, "proj_size", 0):
            raise ValueError("NestedSparseRNN: an LSTM with proj_size is not supported; leave it out of the tags")
        cells = {}
        for name in recurrent_weights(rnn):
            weight = getattr(rnn, name)
            bias_name = name.replace("weight", "bias", 1)
            linear = nn.Linear(*weight.shape[::-1], bias=rnn.bias, device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(weight)
                if rnn.bias:
                    linear.bias.copy_(getattr(rnn, bias_name))
            cells[name] = NestedSparseLinear.from_dense(linear, tags[name], **options)
        sizes = (rnn.input_size, rnn.hidden_size, rnn.num_layers)
        return cls(mode, *sizes, cells, rnn.batch_first, rnn.dropout, rnn.bidirectional)

    def _step(self, xi: Tensor, h: Tensor, c: Tensor | None, hh: NestedSparseLinear):
        gh = hh(h)
        if self.mode == "LSTM":
            i, f, g, o = (xi + gh).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c), c
        ir, iz, inn = xi.chunk(3, -1)
        hr, hz, hn = gh.chunk(3, -1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(inn + r * hn)
        return (1 - z) * n + z * h, None

    def flatten_parameters(self) -> None:
        """Nothing to flatten: each gate matrix is a nested weight of its own (torch's layers compact theirs into
        one buffer for cuDNN). Here so that code written for nn.LSTM / nn.GRU runs unchanged."""

    def _hidden(self, hx, states: int, batch: int, unbatched: bool, like: Tensor):
        """(h0, c0) from ``hx`` as torch's layer takes it (LSTM: a tuple (h0, c0); GRU: a tensor), each
        (states, batch, hidden); c0 is None for a GRU. Anything torch's layer refuses is refused with the shape
        wanted."""
        lstm = self.mode == "LSTM"
        want = (states, self.hidden_size) if unbatched else (states, batch, self.hidden_size)
        what = f"({want[0]}, {self.hidden_size})" if unbatched else f"({states}, {batch}, {self.hidden_size})"
        if hx is None:
            zeros = like.new_zeros(states, batch, self.hidden_size)
            return zeros, (zeros if lstm else None)
        if lstm:
            if not (isinstance(hx, (tuple, list)) and len(hx) == 2 and all(isinstance(h, Tensor) for h in hx)):
                raise TypeError(
                    f"NestedSparseRNN (LSTM): hx is a tuple (h0, c0) of two tensors {what}, as nn.LSTM takes it; "
                    f"got {type(hx).__name__}{tuple(hx.shape) if isinstance(hx, Tensor) else ''}"
                )
            h0, c0 = hx
        else:
            if not isinstance(hx, Tensor):
                raise TypeError(f"NestedSparseRNN (GRU): hx is one tensor {what}, got {type(hx).__name__}")
            h0, c0 = hx, None
        for name, h in (("h0", h0), ("c0", c0)):
            if h is not None and tuple(h.shape) != want:
                raise ValueError(
                    f"NestedSparseRNN ({self.mode}): {name} must be {what} for this input, got {tuple(h.shape)}"
                )
        if unbatched:
            h0, c0 = h0.unsqueeze(1), (c0.unsqueeze(1) if lstm else None)
        return h0, c0

    def forward(self, x: Tensor | PackedSequence, hx=None):
        """The torch layer's forward: ``x`` (L, N, input_size) (batch first: (N, L, input_size)), unbatched
        (L, input_size), or a PackedSequence (the output is then packed the same way); ``hx`` the initial state."""
        if isinstance(x, PackedSequence):
            return self._forward_packed(x, hx)
        if not isinstance(x, Tensor):
            raise TypeError(f"NestedSparseRNN ({self.mode}): x is a tensor or a PackedSequence, got {type(x).__name__}")
        return self._forward(x, hx, None)

    def _forward_packed(self, packed: PackedSequence, hx):
        """A PackedSequence as torch's layer runs it: sequences sorted by length, each stopping at its own length
        (the state is held past it), the final states at each sequence's own last step, in the caller's order."""
        padded, lengths = pad_packed_sequence(packed)  # (L, N, I), the caller's order
        h0, c0 = self._hidden(hx, self.num_layers * self.num_directions, padded.shape[1], False, padded)
        order, back = packed.sorted_indices, packed.unsorted_indices
        if order is not None:
            padded, lengths, h0 = padded.index_select(1, order), lengths[order], h0.index_select(1, order)
            c0 = None if c0 is None else c0.index_select(1, order)
        out, state = self._forward(padded, (h0, c0) if self.mode == "LSTM" else h0, lengths, time_major=True)
        if back is not None:
            state = tuple(s.index_select(1, back) for s in state) if c0 is not None else state.index_select(1, back)
        return PackedSequence(pack_padded_sequence(out, lengths).data, packed.batch_sizes, order, back), state

    def _forward(self, x: Tensor, hx, lengths: Tensor | None, time_major: bool = False):
        """``x`` as forward takes it (``time_major``: (L, N, I) whatever batch_first says); ``lengths``: each
        sequence's length, sorted longest first (packed input)."""
        lstm = self.mode == "LSTM"
        if x.dim() not in (2, 3) or x.shape[-1] != self.input_size:
            raise ValueError(
                f"NestedSparseRNN ({self.mode}): expected input (L, N, {self.input_size}), (N, L, {self.input_size}) "
                f"with batch_first, or (L, {self.input_size}); got {tuple(x.shape)}"
            )
        unbatched = x.dim() == 2
        batch_first = self.batch_first and not time_major
        x = x.unsqueeze(1) if unbatched else (x.transpose(0, 1) if batch_first else x)  # (L, N, I)
        steps, batch = x.shape[0], x.shape[1]
        states = self.num_layers * self.num_directions
        h0, c0 = self._hidden(hx, states, batch, unbatched, x)
        # Packed sequences: at step t only the sequences longer than t advance; the others hold their state.
        live = None if lengths is None else [(t < lengths).unsqueeze(1).to(x.device) for t in range(steps)]
        hn, cn = [], []
        layer_input = x
        for layer in range(self.num_layers):
            outs = []
            for d in range(self.num_directions):
                suffix = f"l{layer}{'_reverse' if d else ''}"
                xi = self.cells[f"weight_ih_{suffix}"](layer_input)  # every step's input product at once
                hh = self.cells[f"weight_hh_{suffix}"]
                k = layer * self.num_directions + d
                h, c = h0[k], (c0[k] if lstm else None)
                ys: list[Tensor] = [x] * steps
                for t in reversed(range(steps)) if d else range(steps):
                    h1, c1 = self._step(xi[t], h, c, hh)
                    if live is not None:
                        h1 = torch.where(live[t], h1, h)
                        c1 = torch.where(live[t], c1, c) if lstm else None
                    h, c = h1, c1
                    ys[t] = h
                outs.append(torch.stack(ys))
                hn.append(h)
                cn.append(c)
            layer_input = outs[0] if len(outs) == 1 else torch.cat(outs, -1)
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_input = nn.functional.dropout(layer_input, self.dropout, True)
        out, h_n = layer_input, torch.stack(hn)
        state = (h_n, torch.stack(cn)) if lstm else h_n
        if unbatched:
            out = out.squeeze(1)
            state = tuple(s.squeeze(1) for s in state) if lstm else state.squeeze(1)
        elif batch_first:
            out = out.transpose(0, 1)
        return out, state

    def to_dense(self, level: int) -> nn.LSTM | nn.GRU:
        """The torch layer holding ``level``'s weights (dense, with zeros where the level prunes)."""
        first = next(iter(self.cells.values()))
        bias = self.bias
        dense = RECURRENT[self.mode][0](
            self.input_size,
            self.hidden_size,
            self.num_layers,
            bias=bias,
            batch_first=self.batch_first,
            dropout=self.dropout,
            bidirectional=self.bidirectional,
            device=first.values.device,
            dtype=first.values.dtype,
        )
        with torch.no_grad():
            for name, cell in self.cells.items():
                getattr(dense, name).copy_(cell.nested().to_dense(level))
                if bias:
                    getattr(dense, name.replace("weight", "bias", 1)).copy_(cell.bias)
        return dense.train(self.training)

    def describe(self) -> dict:
        """The constructor arguments besides the cells (what a checkpoint records)."""
        return {
            "mode": self.mode,
            "input_size": self.input_size,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "batch_first": self.batch_first,
            "dropout": self.dropout,
            "bidirectional": self.bidirectional,
        }

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.describe().items())
