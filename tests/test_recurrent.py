"""The recurrent cells and the layer that runs one over a sequence: their forward is torch.nn's (same weights,
same outputs), their backward through time is checked against autograd and central differences in float64
over several shapes and lengths (1 included), planted mistakes are caught, and a small model trains as
autograd trains it."""
import copy

import pytest
import torch

from handgrad.data import IGNORE, make_sequence_dataset
from handgrad.errors import HandgradError
from handgrad.gradcheck import check_layer, check_model, passed
from handgrad.layers import Embedding, Linear, Sequential
from handgrad.layers.recurrent import GRUCell, LSTMCell, Recurrent, RNNCell
from handgrad.loss import CrossEntropy
from handgrad.model import Model, ModelConfig
from handgrad.optim import AdamW
from handgrad.train import autograd_step
from layer_checks import randn

CELLS = {"rnn": RNNCell, "gru": GRUCell, "lstm": LSTMCell}
TORCH_CELLS = {"rnn": torch.nn.RNNCell, "gru": torch.nn.GRUCell, "lstm": torch.nn.LSTMCell}
TORCH_LAYERS = {"rnn": torch.nn.RNN, "gru": torch.nn.GRU, "lstm": torch.nn.LSTM}
TIGHT = dict(rtol=1e-12, atol=1e-13)  # float64: the same sums in another order differ by a few ulps


def randomised(layer, seed=0, scale=0.6):
    """Every parameter drawn anew (the learned initial state too, which starts at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in layer.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    return layer


def cell64(kind, C, H, seed=0):
    torch.manual_seed(seed)
    return randomised(CELLS[kind](C, H).to(dtype=torch.float64), seed)


def recurrent64(kind, C, H, seed=0, learn_initial_state=True):
    torch.manual_seed(seed)
    layer = Recurrent(CELLS[kind](C, H), learn_initial_state=learn_initial_state).to(dtype=torch.float64)
    return randomised(layer, seed)


def copy_weights_into(module, cell, suffix=""):
    """torch's weights are (G*H, C) and (G*H, H): the transposes of the x @ W layout."""
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh"):
            getattr(module, name + suffix).copy_(cell.params[name].T)
        for name in ("bias_ih", "bias_hh"):
            getattr(module, name + suffix).copy_(cell.params[name])
    return module


def torch_grads(module, suffix=""):
    def grad(name):
        return getattr(module, name + suffix).grad

    return {"weight_ih": grad("weight_ih").T, "weight_hh": grad("weight_hh").T, "bias_ih": grad("bias_ih"),
            "bias_hh": grad("bias_hh")}


def failing(results):
    return {r.name for r in results if not r.close}


def assert_ok(results):
    bad = [(r.name, r.kind, r.max_abs_diff, r.note) for r in results if not r.close]
    assert not bad, bad
    assert {"intermediate", "parameter", "finite-difference"} <= {r.kind for r in results}  # every reference ran


# --- the forward is torch.nn's ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", CELLS)
@pytest.mark.parametrize("B,C,H", [(1, 2, 3), (5, 4, 6)])
def test_cell_matches_the_torch_cell_with_the_same_weights(kind, B, C, H):
    cell = cell64(kind, C, H, seed=B)
    n_state = len(cell.state_names)
    x, state = randn(B, C, seed=1), [randn(B, H, seed=2 + k) for k in range(n_state)]
    dstate = [randn(B, H, seed=5 + k) for k in range(n_state)]  # upstream gradients on h' (and c')
    with torch.no_grad():
        cell.zero_grad()
        out = cell.forward(torch.cat([x, *state], 1))
        dinputs = cell.backward(torch.cat(dstate, 1))

    ref = copy_weights_into(TORCH_CELLS[kind](C, H).double(), cell)
    xr, stater = x.clone().requires_grad_(), [s.clone().requires_grad_() for s in state]
    ref_out = ref(xr, tuple(stater)) if kind == "lstm" else ref(xr, stater[0])
    ref_out = ref_out if kind == "lstm" else (ref_out,)
    sum((o * d).sum() for o, d in zip(ref_out, dstate)).backward()

    torch.testing.assert_close(out, torch.cat(ref_out, 1).detach(), **TIGHT)
    torch.testing.assert_close(dinputs, torch.cat([xr.grad, *(s.grad for s in stater)], 1), **TIGHT)
    for name, g in torch_grads(ref).items():
        torch.testing.assert_close(cell.grads[name], g, **TIGHT)


@pytest.mark.parametrize("kind", CELLS)
@pytest.mark.parametrize("B,T,C,H", [(3, 1, 2, 4), (2, 6, 3, 5)])
def test_sequence_layer_matches_the_torch_layer_with_the_same_weights(kind, B, T, C, H):
    """Outputs at every step and every gradient, the learned initial state's included (fed to the
    torch layer as its initial state, expanded over the batch)."""
    layer = recurrent64(kind, C, H, seed=T)
    x, dout = randn(B, T, C, seed=1), randn(B, T, H, seed=2)
    with torch.no_grad():
        layer.zero_grad()
        out = layer.forward(x)
        dx = layer.backward(dout)

    ref = copy_weights_into(TORCH_LAYERS[kind](C, H, batch_first=True).double(), layer.cell, suffix="_l0")
    xr = x.clone().requires_grad_()
    init = {n: layer.params[f"{n}0"].clone().requires_grad_() for n in layer.cell.state_names}
    expanded = tuple(p.expand(1, B, H) for p in init.values())
    ref_out, _ = ref(xr, expanded if kind == "lstm" else expanded[0])
    (ref_out * dout).sum().backward()

    torch.testing.assert_close(out, ref_out.detach(), **TIGHT)
    torch.testing.assert_close(dx, xr.grad, **TIGHT)
    for name, g in torch_grads(ref, "_l0").items():
        torch.testing.assert_close(layer.cell.grads[name], g, **TIGHT)
    for n, p in init.items():
        torch.testing.assert_close(layer.grads[f"{n}0"], p.grad, **TIGHT)


# --- the backward against autograd and central differences -------------------------------------------------------

@pytest.mark.parametrize("kind", CELLS)
@pytest.mark.parametrize("B,C,H", [(1, 1, 2), (3, 2, 3), (4, 3, 5)])
def test_cell_step_passes_the_check(kind, B, C, H):
    """One step with random upstream gradients on the whole new state (the LSTM's c' too)."""
    cell = cell64(kind, C, H, seed=C)
    inputs = randn(B, C + H * len(cell.state_names), seed=H)
    results = check_layer(cell, inputs, dout=randn(B, H * len(cell.state_names), seed=7))
    assert_ok(results)
    assert {"input", "weight_ih", "weight_hh", "bias_ih", "bias_hh"} <= {r.name for r in results}


SEQUENCE_SHAPES = [(1, 1, 2, 3), (3, 1, 3, 2), (2, 4, 3, 4), (4, 7, 2, 3)]  # (B, T, C, H): length 1 included


@pytest.mark.parametrize("kind", CELLS)
@pytest.mark.parametrize("B,T,C,H", SEQUENCE_SHAPES)
def test_sequence_layer_passes_the_check(kind, B, T, C, H):
    """Random upstream gradients on every time step's output, randomised parameters."""
    layer = recurrent64(kind, C, H, seed=B + T)
    results = check_layer(layer, randn(B, T, C, seed=T), dout=randn(B, T, H, seed=11))
    assert_ok(results)
    assert {f"{n}0" for n in layer.cell.state_names} <= {r.name for r in results}  # the learned initial state


@pytest.mark.parametrize("kind", CELLS)
@pytest.mark.parametrize("T", [1, 5])
def test_sequence_layer_with_a_zero_initial_state_passes_the_check(kind, T):
    layer = recurrent64(kind, 3, 4, seed=T, learn_initial_state=False)
    assert not {"h0", "c0"} & {n for n, _ in layer.named_parameters()}
    assert_ok(check_layer(layer, randn(2, T, 3, seed=1), dout=randn(2, T, 4, seed=2)))


@pytest.mark.parametrize("kind", CELLS)
def test_only_the_last_output_graded_reaches_every_step(kind):
    """Only the last step's output gets a gradient: it must flow back through every step to the first
    input and the initial state."""
    B, T, C, H = 3, 6, 2, 3
    layer = recurrent64(kind, C, H, seed=4)
    dout = torch.zeros(B, T, H, dtype=torch.float64)
    dout[:, -1] = randn(B, H, seed=5)
    x = randn(B, T, C, seed=6)
    assert_ok(check_layer(layer, x, dout=dout))
    with torch.no_grad():
        layer.zero_grad()
        layer.forward(x)
        dx = layer.backward(dout)
    assert (dx[:, 0].abs() > 1e-8).all()
    assert (layer.grads["h0"].abs() > 1e-8).all()


@pytest.mark.parametrize("kind", CELLS)
def test_sequence_layer_passes_the_check_in_float32(kind):
    layer = recurrent64(kind, 3, 4, seed=2).to(dtype=torch.float32)
    results = check_layer(layer, randn(3, 5, 3, seed=3).float(), dout=randn(3, 5, 4, seed=4).float())
    assert_ok(results)


@pytest.mark.parametrize("kind", CELLS)
def test_padding_at_the_end_leaves_the_real_positions_gradients_as_unpadded(kind):
    """A row padded at the end, the padding's output gradient zero (the loss ignores its targets), gives
    the same gradients as the same rows cut to the real length, and zero for the padding's inputs."""
    B, T, L, C, H = 3, 7, 4, 2, 3
    padded, cut = recurrent64(kind, C, H, seed=1), recurrent64(kind, C, H, seed=1)
    x, dout = randn(B, T, C, seed=2), randn(B, T, H, seed=3)
    dout[:, L:] = 0
    with torch.no_grad():
        padded.zero_grad(), cut.zero_grad()
        padded.forward(x)
        dx_padded = padded.backward(dout)
        cut.forward(x[:, :L].contiguous())
        dx_cut = cut.backward(dout[:, :L].contiguous())
    torch.testing.assert_close(dx_padded[:, :L], dx_cut, **TIGHT)
    assert torch.equal(dx_padded[:, L:], torch.zeros_like(dx_padded[:, L:]))
    for (name, g), (_, g_cut) in zip(padded.named_grads(), cut.named_grads()):
        torch.testing.assert_close(g, g_cut, **TIGHT, msg=name)


def test_sequence_layer_refuses_an_input_of_the_wrong_shape():
    layer = Recurrent(GRUCell(3, 4))
    with pytest.raises(HandgradError, match="takes \\(batch, time, 3\\)"):
        layer.forward(torch.randn(2, 3))
    with pytest.raises(HandgradError, match="takes \\(batch, time, 3\\)"):
        layer.forward(torch.randn(2, 5, 4))
    with pytest.raises(HandgradError, match="one step takes \\(batch, 7\\)"):
        layer.cell.forward(torch.randn(2, 5))  # a step takes the input and the state side by side


# --- planted mistakes the check must catch -----------------------------------------------------------------------

def plant(cell, mistake):
    """The cell's backward_step with its results passed through `mistake(cache, dstate, results)`."""
    right = cell.backward_step

    def wrong(dstate, cache, record=None):
        return mistake(cache, dstate, right(dstate, cache, record))

    cell.backward_step = wrong
    return cell


def hidden_not_carried(cache, dstate, results):
    """The classic BPTT mistake: the previous hidden state gets no gradient from this step."""
    dxw, dhw, (dh, *rest) = results
    return dxw, dhw, (torch.zeros_like(dh), *rest)


def cell_state_not_carried(cache, dstate, results):
    dxw, dhw, (dh, dc) = results
    return dxw, dhw, (dh, torch.zeros_like(dc))


def gru_without_the_direct_share(cache, dstate, results):
    """h feeds the update h' = (1 - z) n + z h and the hidden projection: the first branch, dh' z, dropped."""
    dxw, dhw, (dh,) = results
    return dxw, dhw, (dh - dstate[0] * cache["z"],)


class LSTMCellWithoutTheOutputBranch(LSTMCell):
    """c' feeds the next step and h' = o tanh(c'): its gradient without the second branch."""

    def backward_step(self, dstate, cache, record=None):
        dh_new, dc_carried = dstate
        c, i, f, g, o, tanh_c = (cache[k] for k in ("c_prev", "i", "f", "g", "o", "tanh_c"))
        dc_new = dc_carried  # missing: + dh' o (1 - tanh(c')^2)
        do = dh_new * tanh_c
        da = torch.cat([dc_new * g * i * (1 - i), dc_new * c * f * (1 - f), dc_new * i * (1 - g * g),
                        do * o * (1 - o)], 1)
        return da, da, (self.hidden_gradient(da), dc_new * f)


@pytest.mark.parametrize("kind", CELLS)
def test_check_catches_the_hidden_state_gradient_not_carried_back(kind):
    layer = recurrent64(kind, 2, 3, seed=1)
    x, dout = randn(2, 4, 2, seed=2), randn(2, 4, 3, seed=3)
    assert_ok(check_layer(layer, x, dout=dout))
    plant(layer.cell, hidden_not_carried)
    bad = failing(check_layer(layer, x, dout=dout))
    assert {"input", "weight_hh", "h0"} <= bad


def test_check_catches_the_lstm_cell_state_gradient_not_carried_back():
    layer = recurrent64("lstm", 2, 3, seed=1)
    plant(layer.cell, cell_state_not_carried)
    bad = failing(check_layer(layer, randn(2, 4, 2, seed=2), dout=randn(2, 4, 3, seed=3)))
    assert {"input", "weight_hh", "c0"} <= bad


def test_check_catches_a_gru_gate_missing_a_branch():
    cell = cell64("gru", 2, 3, seed=1)
    inputs, dout = randn(3, 5, seed=2), randn(3, 3, seed=3)
    assert_ok(check_layer(cell, inputs, dout=dout))
    plant(cell, gru_without_the_direct_share)
    assert "input" in failing(check_layer(cell, inputs, dout=dout))
    layer = recurrent64("gru", 2, 3, seed=1)
    plant(layer.cell, gru_without_the_direct_share)
    assert {"input", "weight_hh"} <= failing(check_layer(layer, randn(2, 4, 2, seed=2), dout=randn(2, 4, 3, seed=3)))


def test_check_catches_an_lstm_cell_state_missing_a_branch():
    right = cell64("lstm", 2, 3, seed=1)
    wrong = LSTMCellWithoutTheOutputBranch(2, 3).to(dtype=torch.float64)
    for name, p in right.params.items():
        wrong.params[name].copy_(p)
    inputs, dout = randn(3, 8, seed=2), randn(3, 6, seed=3)
    assert_ok(check_layer(right, inputs, dout=dout))
    assert {"input", "weight_ih", "weight_hh"} <= failing(check_layer(wrong, inputs, dout=dout))


# --- a small model on the sequence data ----------------------------------------------------------------------------

def sequence_model(kind, data, C=8, H=12, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    V = len(data.vocab)
    net = Sequential([("embedding", Embedding(V, C)), ("rnn", Recurrent(CELLS[kind](C, H))), ("output", Linear(H, V))])
    model = Model(ModelConfig(vocab_size=V), net)
    model.loss_fn = CrossEntropy(ignore_index=IGNORE)
    return model.to(dtype=dtype)


@pytest.fixture(scope="module")
def sequences():
    return make_sequence_dataset()


@pytest.mark.parametrize("kind", CELLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_model_passes_the_check(kind, dtype, sequences):
    model = sequence_model(kind, sequences, dtype=dtype)
    randomised(model.net.layers["rnn"], seed=3, scale=0.3)
    X, Y = sequences.X["train"][:16], sequences.Y["train"][:16]
    assert (Y == IGNORE).any()  # padding is in the batch
    results = check_model(model, X, Y)
    assert passed(results), [(r.name, r.max_abs_diff) for r in results if not r.close]
    T, names = X.shape[1], {r.name for r in results}
    cell = model.net.layers["rnn"].cell
    for t in (0, T - 1):  # the first and the last step's intermediates are compared
        assert {f"rnn.step{t}.{n}" for n in cell.step_intermediates} <= names
    assert {"rnn.xw", "rnn.out", "rnn.weight_ih", "rnn.weight_hh", "rnn.h0"} <= names


def test_model_parameters_are_the_cells_own_after_flattening(sequences):
    """The model lays every parameter into one tensor: the cell must compute with those very views."""
    model = sequence_model("lstm", sequences)
    cell, params = model.net.layers["rnn"].cell, model.parameters()
    base = model.param_buffer
    assert base is not None
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        assert any(cell.params[name] is p for p in params)
        assert cell.params[name]._base is base and cell.grads[name]._base is model.grad_buffer


def test_gru_model_trains_as_autograd_trains_it(sequences):
    """50 AdamW steps on the manual gradients against 50 on autograd's, from the same weights, float64."""
    manual = sequence_model("gru", sequences)
    reference = copy.deepcopy(manual)
    opt_manual = AdamW(manual.parameters(), manual.grads(), lr=1e-2, weight_decay=0.01)
    opt_reference = AdamW(reference.parameters(), reference.grads(), lr=1e-2, weight_decay=0.01)
    X, Y = sequences.X["train"], sequences.Y["train"]
    gen = torch.Generator().manual_seed(0)
    first = last = None
    for _ in range(50):
        rows = torch.randint(0, len(X), (32,), generator=gen)
        with torch.no_grad():
            manual.zero_grad()
            loss = manual.forward(X[rows], Y[rows])
            manual.backward()
        ref_loss = autograd_step(reference, X[rows], Y[rows])
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
        opt_manual.step()
        opt_reference.step()
        first = float(loss) if first is None else first
        last = float(loss)
    for (name, p), q in zip(manual.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
    assert last < first - 0.3  # it learned something: the comparison is not of two idle runs


@pytest.mark.parametrize("kind", CELLS)
def test_a_layer_called_twice_keeps_each_calls_steps(kind):
    """The same layer twice in a row (C = H): each call's step caches are its own frame's, and both calls'
    gradients add into the one set of buffers."""
    layer = recurrent64(kind, 3, 3, seed=2)
    twice = Sequential([("first", layer), ("second", layer)])
    assert_ok(check_layer(twice, randn(2, 4, 3, seed=3), dout=randn(2, 4, 3, seed=4)))
