"""Recurrent cells (vanilla tanh RNN, GRU, LSTM) and the layer that runs one over a sequence and
backpropagates through time; each forward with its hand-written backward right below it.

A cell is a pair of step functions over a per-step cache:

    forward_step(xw, state) -> (state', cache)
    backward_step(dstate', cache, record=None) -> (dxw, dhw, dstate)

`xw = x_t W_ih + b_ih` is the step's input projection and `hw = h W_hh + b_hh` its hidden projection;
a state is a tuple, (h,) or for the LSTM (h, c). The step functions turn the gradient of the new state
into the gradients of the two projections and of the previous state; the caller turns dxw and dhw into
the weights' gradients: the cell's own one-step `forward`/`backward` (what `check_layer` runs on one
step) by a matmul each, `Recurrent` by one matmul over all the steps after its backward loop, as it
computes every step's input projection in one matmul before its forward loop.

Parameters follow torch.nn.RNNCell / GRUCell / LSTMCell term by term, transposed to the x @ W layout
of `Linear`: weight_ih (C, G*H), weight_hh (H, G*H), bias_ih and bias_hh (G*H,), the G blocks of H
columns in torch's gate order (GRU: r, z, n; LSTM: i, f, g, o). torch's `weight_ih` is this
`weight_ih.T`, its `weight_hh` this `weight_hh.T`, the biases the same.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import HandgradError
from .core import Module

State = tuple[torch.Tensor, ...]


class RecurrentCell(Module):
    """One step of a recurrence: parameters and the step pair; `forward(inputs)` / `backward(dout)` are
    the step as a layer on the input and the state side by side, (B, C + S) -> (B, S), S = H per state
    tensor (h, then c for the LSTM), so that the check can run one step with gradients on every part."""

    gates = 1  # blocks of H columns in each projection
    state_names: tuple[str, ...] = ("h",)
    step_intermediates: tuple[str, ...] = ()  # the names in a step's cache that a check compares

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        width, bound = self.gates * hidden_size, hidden_size**-0.5
        # as torch.nn's cells: every weight and bias from U(-1/sqrt(H), 1/sqrt(H))
        for name, shape in (("weight_ih", (input_size, width)), ("weight_hh", (hidden_size, width)),
                            ("bias_ih", (width,)), ("bias_hh", (width,))):
            self.add_param(name, torch.empty(shape).uniform_(-bound, bound))

    @property
    def inspectable(self) -> tuple[str, ...]:
        return self.step_intermediates

    def forward_step(self, xw: torch.Tensor, state: State) -> tuple[State, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def backward_step(self, dstate: State, cache: dict[str, torch.Tensor],
                      record: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor, State]:
        raise NotImplementedError

    def hidden_gradient(self, dhw: torch.Tensor) -> torch.Tensor:
        """d h from the hidden projection hw = h W_hh + b_hh:  dhw W_hh^T."""
        return F.linear(dhw, self.params["weight_hh"])  # the transpose taken inside the one call

    def forward(self, inputs):
        C, H = self.input_size, self.hidden_size
        width = C + H * len(self.state_names)
        if inputs.ndim != 2 or inputs.shape[1] != width:
            raise HandgradError(f"{type(self).__name__}: one step takes (batch, {width}): the input's {C} channels "
                                f"and the state's {width - C}; got {tuple(inputs.shape)}")
        x, state = inputs[:, :C], tuple(inputs[:, C:].split(H, 1))
        xw = torch.addmm(self.params["bias_ih"], x, self.params["weight_ih"])
        new_state, cache = self.forward_step(xw, state)
        self.saved.clear()
        self.saved.update(cache)
        self.saved["x"] = x
        return torch.cat(new_state, 1)

    # xw = x W_ih + b_ih, hw = h W_hh + b_hh, the step's own backward giving dxw, dhw and its state's gradient:
    # dW_ih = x^T dxw, db_ih = sum over rows of dxw, dx = dxw W_ih^T; dW_hh = h^T dhw, db_hh = sum of dhw
    def backward(self, dout):
        s, g = self.saved, self.grads
        self.saved_grads.clear()
        dxw, dhw, dstate = self.backward_step(tuple(dout.split(self.hidden_size, 1)), s, self.saved_grads)
        g["weight_ih"].addmm_(s["x"].T, dxw)
        g["bias_ih"].add_(dxw.sum(0))
        g["weight_hh"].addmm_(s["h_prev"].T, dhw)
        g["bias_hh"].add_(dhw.sum(0))
        return torch.cat([F.linear(dxw, self.params["weight_ih"]), *dstate], 1)


class RNNCell(RecurrentCell):
    """h' = tanh(x W_ih + b_ih + h W_hh + b_hh), as torch.nn.RNNCell with its tanh."""

    step_intermediates = ("a", "h")
    saturating = ("h",)  # what saturates, and so passes little gradient: diagnostics.gate_saturation

    def forward_step(self, xw, state):
        (h,) = state
        a = xw + torch.addmm(self.params["bias_hh"], h, self.params["weight_hh"])
        h_new = a.tanh()
        return (h_new,), {"h_prev": h, "a": a, "h": h_new}

    # h' = tanh(a), a = xw + hw:  da = dh' (1 - h'^2) = dxw = dhw;  dh = da W_hh^T
    def backward_step(self, dstate, cache, record=None):
        (dh_new,) = dstate
        h_new = cache["h"]
        da = torch.addcmul(dh_new, dh_new * h_new, h_new, value=-1)
        if record is not None:
            record.update(h=dh_new, a=da)
        return da, da, (self.hidden_gradient(da),)


class GRUCell(RecurrentCell):
    """As torch.nn.GRUCell, with separate input and hidden biases and the reset gate applied to the
    hidden projection's n block (W_hn h + b_hn):

        r = sigmoid(xw_r + hw_r)    z = sigmoid(xw_z + hw_z)    n = tanh(xw_n + r * hw_n)
        h' = (1 - z) * n + z * h
    """

    gates = 3
    step_intermediates = ("hw", "a_rz", "r", "z", "a_n", "n", "h")
    saturating = ("r", "z", "n")

    def forward_step(self, xw, state):
        (h,) = state
        H = self.hidden_size
        hw = torch.addmm(self.params["bias_hh"], h, self.params["weight_hh"])
        a_rz = xw[:, :2 * H] + hw[:, :2 * H]
        rz = a_rz.sigmoid()
        r, z = rz[:, :H], rz[:, H:]
        a_n = torch.addcmul(xw[:, 2 * H:], r, hw[:, 2 * H:])
        n = a_n.tanh()
        h_minus_n = h - n
        h_new = torch.addcmul(n, z, h_minus_n)  # (1 - z) n + z h = n + z (h - n)
        return (h_new,), {"h_prev": h, "hw": hw, "a_rz": a_rz, "rz": rz, "r": r, "z": z, "a_n": a_n, "n": n,
                          "h_minus_n": h_minus_n, "h": h_new}

    # h' = n + z (h - n):  dn = dh' (1 - z),  dz = dh' (h - n),  and h's direct share dh' z;
    # n = tanh(a_n), a_n = xw_n + r hw_n:  da_n = dn (1 - n^2),  dr = da_n hw_n,  dhw_n = da_n r;
    # (r, z) = sigmoid(a_rz):  da_rz = (dr, dz) s (1 - s);  dxw = (da_rz, da_n),  dhw = (da_rz, da_n r);
    # h feeds both the update and the hidden projection:  dh = dh' z + dhw W_hh^T
    def backward_step(self, dstate, cache, record=None):
        (dh_new,) = dstate
        H = self.hidden_size
        rz, r, z, n = cache["rz"], cache["r"], cache["z"], cache["n"]
        dn = torch.addcmul(dh_new, dh_new, z, value=-1)
        dz = dh_new * cache["h_minus_n"]
        da_n = torch.addcmul(dn, dn * n, n, value=-1)
        dr = da_n * cache["hw"][:, 2 * H:]
        drz_rz = torch.cat([dr, dz], 1).mul_(rz)
        da_rz = torch.addcmul(drz_rz, drz_rz, rz, value=-1)
        dxw = torch.cat([da_rz, da_n], 1)
        dhw = torch.cat([da_rz, da_n * r], 1)
        dh = torch.addmm(dh_new * z, dhw, self.params["weight_hh"].T)
        if record is not None:
            record.update(h=dh_new, n=dn, z=dz, a_n=da_n, r=dr, a_rz=da_rz, hw=dhw)
        return dxw, dhw, (dh,)


class LSTMCell(RecurrentCell):
    """As torch.nn.LSTMCell: a = xw + hw, the gates i, f, g, o its four blocks,

        i = sigmoid(a_i)    f = sigmoid(a_f)    g = tanh(a_g)    o = sigmoid(a_o)
        c' = f * c + i * g    h' = o * tanh(c')
    """

    gates = 4
    state_names = ("h", "c")
    step_intermediates = ("a", "i", "f", "g", "o", "c", "h")
    saturating = ("i", "f", "g", "o")

    def forward_step(self, xw, state):
        h, c = state
        H = self.hidden_size
        a = xw + torch.addmm(self.params["bias_hh"], h, self.params["weight_hh"])
        s = a.sigmoid()  # the g block's sigmoid is not used: one call over all four blocks is cheaper than three
        i, f, o = s[:, :H], s[:, H:2 * H], s[:, 3 * H:]
        g = a[:, 2 * H:3 * H].tanh()
        c_new = torch.addcmul(f * c, i, g)
        tanh_c = c_new.tanh()
        h_new = o * tanh_c
        return (h_new, c_new), {"h_prev": h, "c_prev": c, "a": a, "i": i, "f": f, "g": g, "o": o, "c": c_new,
                                "tanh_c": tanh_c, "h": h_new}

    # h' = o tanh(c'):  do = dh' tanh(c'); c' feeds h' and the next step:  dc' = carried dc' + dh' o (1 - tanh(c')^2);
    # c' = f c + i g:  df = dc' c,  di = dc' g,  dg = dc' i,  dc = dc' f;
    # pre-activations: da = (di i (1 - i), df f (1 - f), dg (1 - g^2), do o (1 - o)) = dxw = dhw;  dh = da W_hh^T
    def backward_step(self, dstate, cache, record=None):
        dh_new, dc_carried = dstate
        c, i, f, g, o, tanh_c = (cache[k] for k in ("c_prev", "i", "f", "g", "o", "tanh_c"))
        do = dh_new * tanh_c
        dtanh_c = dh_new * o
        dc_new = torch.addcmul(dc_carried + dtanh_c, dtanh_c * tanh_c, tanh_c, value=-1)
        di, df, dg = dc_new * g, dc_new * c, dc_new * i

        def through_sigmoid(ds, s):  # ds s (1 - s)
            ds_s = ds * s
            return torch.addcmul(ds_s, ds_s, s, value=-1)

        da = torch.cat([through_sigmoid(di, i), through_sigmoid(df, f), torch.addcmul(dg, dg * g, g, value=-1),
                        through_sigmoid(do, o)], 1)
        if record is not None:
            record.update(h=dh_new, c=dc_new, i=di, f=df, g=dg, o=do, a=da)
        return da, da, (self.hidden_gradient(da), dc_new * f)


class Recurrent(Module):
    """A cell run over a sequence: (B, T, C) -> the hidden state after every step, (B, T, H) (the
    LSTM's h, not its c).

    The initial state is learned by default: a parameter per state tensor, `h0` (and `c0` for the
    LSTM), of shape (H,), starting at zero and shared by every row; its gradient is the gradient of
    the state before step 0, summed over the batch. With `learn_initial_state=False` it is zeros, not
    trained.

    The cell is the layer's child under no name of its own: its parameters read as the layer's
    (`rnn.weight_ih`, ..., beside `rnn.h0`). Every step's input projection is one matmul
    (B*T, C) x (C, G*H) before the loop, and the weights' gradients one matmul each after the backward
    loop; only the hidden projection runs step by step.

    Intermediates for the check (`named_intermediates`): `xw`, every step's input projection, time-major
    (T, B, G*H), and the cell's `step_intermediates` of the first and the last step, as `step0.<name>`
    and `step{T-1}.<name>` (gate pre-activations, gates, states).

    Padding sits at the end of a row, and the loss ignores its targets, so the output gradient at a
    padding position is exactly zero; the state there feeds only later steps, which are padding too,
    so the gradient carried back out of the padding is zero as well: real positions get exactly the
    gradient they would unpadded, and no mask is needed inside the layer.
    """

    def __init__(self, cell: RecurrentCell, learn_initial_state: bool = True):
        super().__init__()
        self.cell = cell
        self.learn_initial_state = learn_initial_state
        if learn_initial_state:
            for name in cell.state_names:
                self.add_param(f"{name}0", torch.zeros(cell.hidden_size))

    def named_children(self):
        return (("", self.cell),)

    def initial_state(self, batch: int, like: torch.Tensor) -> State:
        H = self.cell.hidden_size
        if self.learn_initial_state:
            return tuple(self.params[f"{name}0"].expand(batch, H) for name in self.cell.state_names)
        return tuple(like.new_zeros(batch, H) for _ in self.cell.state_names)

    def forward(self, x):
        if x.ndim != 3 or x.shape[2] != self.cell.input_size:
            raise HandgradError(f"{type(self.cell).__name__} over a sequence takes (batch, time, "
                                f"{self.cell.input_size}); got {tuple(x.shape)}")
        B, T, C = x.shape
        cell, params = self.cell, self.cell.params
        # time-major rows (T*B, C), so that each step's block of the projection (T, B, G*H) is contiguous
        rows = x.transpose(0, 1).reshape(T * B, C)
        xw = torch.addmm(params["bias_ih"], rows, params["weight_ih"]).view(T, B, -1)
        state = self.initial_state(B, x)
        steps, hs = [], []
        for t in range(T):
            state, cache = cell.forward_step(xw[t], state)
            steps.append(cache)
            hs.append(state[0])
        self.saved.update(rows=rows, xw=xw, steps=steps)  # steps: one cache per time step
        self.saved_grads.clear()
        return torch.stack(hs, 1)

    def inspected_steps(self) -> list[int]:
        """The time steps whose intermediates a check compares: the first and the last."""
        steps = self.saved.get("steps")
        return sorted({0, len(steps) - 1}) if steps else []

    def named_intermediates(self, prefix: str = ""):
        if "xw" in self.saved:
            yield prefix + "xw", self.saved["xw"]
        for t in self.inspected_steps():
            for name in self.cell.step_intermediates:
                yield f"{prefix}step{t}.{name}", self.saved["steps"][t][name]

    # backpropagation through time: h_t feeds the output at t and step t+1, so its gradient is dout[:, t] plus
    # what step t+1 hands back (the LSTM's c_t only the latter); over every step and row then
    # dW_ih = X^T dXW, db_ih = sum dXW, dX = dXW W_ih^T, dW_hh = H_prev^T dHW, db_hh = sum dHW, d(h0, c0) = row sums
    def backward(self, dout):
        cell, steps = self.cell, self.saved["steps"]
        B, T, H = dout.shape
        rows = self.saved["rows"]
        C = rows.shape[1]
        inspected = self.inspected_steps()
        dxws, dhws = [None] * T, [None] * T
        # nothing but the output takes the state after the last step
        carried = tuple(dout.new_zeros(B, H) for _ in cell.state_names)
        for t in reversed(range(T)):
            record = {} if t in inspected else None
            dstate = (dout[:, t] + carried[0], *carried[1:])
            dxws[t], dhws[t], carried = cell.backward_step(dstate, steps[t], record)
            if record is not None:
                self.saved_grads.update({f"step{t}.{name}": record[name] for name in cell.step_intermediates})
        dXW = torch.stack(dxws)  # time-major, as the forward's projection
        self.saved_grads["xw"] = dXW
        # where the cell's two projections share one gradient (RNN, LSTM) it is stacked once
        dHW = dXW if dhws[0] is dxws[0] else torch.stack(dhws)
        dXW, dHW = dXW.view(T * B, -1), dHW.view(T * B, -1)
        h_prev = torch.stack([cache["h_prev"] for cache in steps]).view(T * B, H)
        g = cell.grads
        g["weight_ih"].addmm_(rows.T, dXW)
        g["bias_ih"].add_(dXW.sum(0))
        g["weight_hh"].addmm_(h_prev.T, dHW)
        g["bias_hh"].add_(dHW.sum(0))
        if self.learn_initial_state:
            for name, d in zip(cell.state_names, carried):
                self.grads[f"{name}0"].add_(d.sum(0))
        return F.linear(dXW, cell.params["weight_ih"]).view(T, B, C).transpose(0, 1)  # (B, T, C), a view
