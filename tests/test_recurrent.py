"""nn.LSTM and nn.GRU convert to NestedSparseRNN (each gate matrix a nested layer): against torch's own layer with
the level's weights, in float64, over the configurations torch has; gradients, save / load, to_dense, export."""

import pytest
import torch
from torch import nn

import nestsparse
from nestsparse import NestedSparseRNN


class Seq(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(rnn.hidden_size * (2 if rnn.bidirectional else 1), 3)

    def forward(self, x, hx=None):
        out, state = self.rnn(x, hx)
        return self.head(out), state


def pair(mode, seed=0, **kw):
    torch.manual_seed(seed)
    dense = Seq(getattr(nn, mode)(5, 7, **kw)).double().eval()
    tags = nestsparse.model_tags(dense, (0.6, 0.3, 0.1))
    return dense, tags, nestsparse.convert(dense, tags).eval()


CONFIGS = [
    {},
    {"num_layers": 2, "bidirectional": True},
    {"batch_first": True, "bias": False},
    {"num_layers": 2, "batch_first": True, "bidirectional": True},
]


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_nested_rnn_matches_torch_with_the_level_weights(mode, config):
    dense, tags, model = pair(mode, **config)
    assert isinstance(model.rnn, NestedSparseRNN)
    assert {k for k in tags if k.startswith("rnn.")} == {f"rnn.{w}" for w in nestsparse.nn.recurrent_weights(dense.rnn)}
    first = config.get("batch_first", False)
    x = torch.randn(*((3, 4) if first else (4, 3)), 5, dtype=torch.float64)  # 4 steps of a batch of 3
    states = (2 if config.get("bidirectional") else 1) * config.get("num_layers", 1)
    h0 = torch.randn(states, 3, 7, dtype=torch.float64)
    hx = (h0, torch.randn_like(h0)) if mode == "LSTM" else h0
    outs = []
    for level in range(3):
        nestsparse.set_level(model, level)
        reference = nestsparse.to_dense(model, level)
        assert isinstance(reference.rnn, getattr(nn, mode))
        for name in nestsparse.nn.recurrent_weights(dense.rnn):  # to_dense holds the level's weights
            want = getattr(dense.rnn, name) * (tags[f"rnn.{name}"] >= level)
            torch.testing.assert_close(getattr(reference.rnn, name), want)
        got, want = model(x, hx), reference(x, hx)
        torch.testing.assert_close(got, want)
        unbatched_hx = tuple(h[:, 0] for h in hx) if mode == "LSTM" else hx[:, 0]
        one = model(x[0] if first else x[:, 0], unbatched_hx)[0]  # unbatched: the first sequence alone
        torch.testing.assert_close(one, want[0][0] if first else want[0][:, 0])
        outs.append(got[0])
    assert not torch.allclose(outs[0], outs[2])


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_nested_rnn_gradients_match_torch(mode):
    dense, tags, model = pair(mode, num_layers=2)
    nestsparse.set_level(model, 1)
    reference = nestsparse.to_dense(model, 1)
    x = torch.randn(6, 2, 5, dtype=torch.float64, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    model(x)[0].square().sum().backward()
    reference(xr)[0].square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    cell = model.rnn.cells["weight_hh_l1"]
    assert cell.values.grad is not None and cell.values.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_nested_rnn_saves_loads_and_exports(mode, tmp_path):
    dense, tags, model = pair(mode, bidirectional=True)
    nestsparse.save(model, tmp_path / "m.safetensors")
    loaded = nestsparse.load(tmp_path / "m.safetensors", model=pair(mode, seed=1, bidirectional=True)[0]).eval()
    x = torch.randn(5, 2, 5, dtype=torch.float64)
    program = nestsparse.export(model, (x,))
    for level in range(3):
        nestsparse.set_level(model, level)
        nestsparse.set_level(loaded, level)
        want = model(x)
        assert torch.equal(loaded(x)[0], want[0])
        torch.testing.assert_close(program.module()(torch.tensor(level), x)[0], want[0])
    wrong = Seq(getattr(nn, mode)(5, 7, num_layers=2)).double()
    with pytest.raises(nestsparse.CheckpointError, match="skeleton mismatch at 'rnn'"):
        nestsparse.load(tmp_path / "m.safetensors", model=wrong)


def test_partial_recurrent_tags_and_unknown_weights_are_named():
    dense, tags, _ = pair("LSTM")
    partial = {k: v for k, v in tags.items() if k != "rnn.weight_hh_l0"}
    with pytest.raises(ValueError, match=r"some weights of the LSTM 'rnn' but not \['weight_hh_l0'\]"):
        nestsparse.convert(dense, partial)
    with pytest.raises(KeyError, match="without a weight 'weight_ih_l3'"):
        nestsparse.convert(dense, {**tags, "rnn.weight_ih_l3": tags["rnn.weight_ih_l0"]})
    with pytest.warns(UserWarning, match=r"left dense, no nested kernel for them: 1 LSTM \(rnn\)"):
        nestsparse.convert(dense, {"head": tags["head"]})


def test_a_bias_on_only_some_gate_matrices_is_refused(tmp_path):
    """A re-signed checkpoint with a bias on some LSTM gate matrices loaded into an nn.LSTM(bias=False) skeleton;
    forward and to_dense then differed."""
    from test_io import forge, read_all  # noqa: PLC0415

    dense, tags, model = pair("LSTM", bias=False)
    nestsparse.save(model, tmp_path / "m.safetensors")
    desc, meta, tensors = read_all(tmp_path / "m.safetensors")
    desc["nested"]["rnn.cells.weight_ih_l0"]["bias"] = True
    tensors["rnn.cells.weight_ih_l0.bias"] = torch.ones(28, dtype=torch.float64)
    forge(tmp_path / "forged.safetensors", desc, meta, tensors)
    skeleton = pair("LSTM", seed=1, bias=False)[0]
    with pytest.raises(nestsparse.CheckpointError, match="weight_ih_l0 have a bias but .*weight_hh_l0 do not"):
        nestsparse.load(tmp_path / "forged.safetensors", model=skeleton)
    cells = dict(model.rnn.cells)
    cells["weight_ih_l0"] = nestsparse.NestedSparseLinear(cells["weight_ih_l0"].nested(), torch.zeros(28))
    with pytest.raises(ValueError, match="every gate matrix has a bias, or none"):
        NestedSparseRNN("LSTM", 5, 7, 1, cells)


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("config", CONFIGS[:2], ids=["plain", "2-layers-bidirectional"])
@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_packed_sequences_run_as_torch_runs_them(mode, config, enforce_sorted):
    dense, tags, model = pair(mode, **config)
    nestsparse.set_level(model, 1)
    reference = nestsparse.to_dense(model, 1).rnn
    lengths = [6, 4, 4, 1] if enforce_sorted else [3, 6, 1, 4]
    x = torch.randn(6, 4, 5, dtype=torch.float64)
    packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=enforce_sorted)
    states = (2 if config.get("bidirectional") else 1) * config.get("num_layers", 1)
    h0 = torch.randn(states, 4, 7, dtype=torch.float64)
    hx = (h0, torch.randn_like(h0)) if mode == "LSTM" else h0
    for h in (None, hx):
        got, got_state = model.rnn(packed, h)
        want, want_state = reference(packed, h)
        assert isinstance(got, nn.utils.rnn.PackedSequence)
        torch.testing.assert_close(got.data, want.data)
        assert torch.equal(got.batch_sizes, want.batch_sizes)
        for a, b in zip(got_state if mode == "LSTM" else [got_state], want_state if mode == "LSTM" else [want_state]):
            torch.testing.assert_close(a, b)
    model.rnn.flatten_parameters()  # code written for torch's layers calls it


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_initial_states_torch_refuses_are_refused(mode):
    dense, tags, model = pair(mode)
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    h0 = torch.randn(1, 3, 7, dtype=torch.float64)
    wrong = [torch.stack([h0, h0]), [h0], h0[:, :2], (h0, h0, h0)] if mode == "LSTM" else [(h0,), h0[None], h0[:, :2]]
    for hx in wrong:
        with pytest.raises(Exception):  # noqa: B017  (torch's own layer refuses it too)
            dense.rnn(x, hx)
        with pytest.raises((TypeError, ValueError), match=r"NestedSparseRNN \(\w+\): (hx|h0)"):
            model.rnn(x, hx)
