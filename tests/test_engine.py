"""The engine under shared layers: a layer used twice, an output layer tied to the embedding, residual
blocks. Each model is checked against autograd and finite differences, and trained against the same
model written in plain torch ops, differentiated by autograd and updated by torch.optim."""
import pytest
import torch
import torch.nn.functional as F

from handgrad import checkpoint
from handgrad.data import Vocab
from handgrad.fastpath import manual_step
from handgrad.gradcheck import check_layer, check_model, finite_difference_check, float64_copy, passed
from handgrad.layers import (Embedding, EmbeddingLinear, Flatten, Linear, Residual, Sequential, Tanh, TiedLinear,
                             core, packed)
from handgrad.model import Model, ModelConfig
from handgrad.errors import HandgradError
from handgrad.optim import SGD, AdamW, make_optimizer

VOCAB, CONTEXT = 11, 5
STEPS = 12
# Manual and reference trajectories in float64 after STEPS steps: measured at most 8.3e-16 apart in
# the parameters (SGD and AdamW, both models); the bound leaves room for other machines' kernels.
TRAJECTORY_ATOL = 1e-12


def batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, CONTEXT), generator=g), torch.randint(0, VOCAB, (n,), generator=g)


def twice_used_model(dtype=torch.float64, seed=0):
    """embedding -> flatten -> hidden -> tanh -> the same hidden again -> tanh -> output."""
    torch.manual_seed(seed)
    hidden = Linear(CONTEXT * 6, CONTEXT * 6, gain=5 / 3)
    with torch.no_grad():
        hidden.params["bias"].normal_()
    net = Sequential([("embedding", Embedding(VOCAB, 6)), ("flatten", Flatten()),
                      ("hidden1", hidden), ("tanh1", Tanh()), ("hidden2", hidden), ("tanh2", Tanh()),
                      ("output", Linear(CONTEXT * 6, VOCAB))])
    return Model(ModelConfig(vocab_size=VOCAB, block_size=CONTEXT, n_embd=6), net).to(dtype=dtype)


def twice_used_reference(t, x, y):
    h = torch.tanh(t["C"][x].reshape(x.shape[0], -1) @ t["W"] + t["b"])
    h = torch.tanh(h @ t["W"] + t["b"])
    return F.cross_entropy(h @ t["Wo"] + t["bo"], y)


def twice_used_tensors(model):
    layers = model.net.layers
    return {"C": layers["embedding"].params["weight"], "W": layers["hidden1"].params["weight"],
            "b": layers["hidden1"].params["bias"], "Wo": layers["output"].params["weight"],
            "bo": layers["output"].params["bias"]}


def tied_model(dtype=torch.float64, seed=0, bias=True):
    """embedding -> flatten -> linear1 -> tanh1 -> output, the output's weight the embedding's table."""
    torch.manual_seed(seed)
    emb = Embedding(VOCAB, 8)
    output = TiedLinear(emb, bias=bias)
    if bias:
        with torch.no_grad():
            output.params["bias"].normal_()
    net = Sequential([("embedding", emb), ("flatten", Flatten()), ("linear1", Linear(CONTEXT * 8, 8)),
                      ("tanh1", Tanh()), ("output", output)])
    return Model(ModelConfig(vocab_size=VOCAB, block_size=CONTEXT, n_embd=8), net).to(dtype=dtype)


def tied_reference(t, x, y, C_out=None):
    """The tied model in torch ops; `C_out`, where given, is the table the output projects onto."""
    h = torch.tanh(t["C"][x].reshape(x.shape[0], -1) @ t["W1"] + t["b1"])
    return F.cross_entropy(h @ (t["C"] if C_out is None else C_out).T + t["bo"], y)


def tied_tensors(model):
    layers = model.net.layers
    return {"C": layers["embedding"].params["weight"], "W1": layers["linear1"].params["weight"],
            "b1": layers["linear1"].params["bias"], "bo": layers["output"].params["bias"]}


def train_both(model, tensors, reference, optimizer, weight_decay, lr):
    """STEPS steps of the model's manual step and its optimizer, and of `reference` (plain torch ops on
    clones of `tensors`) with autograd and torch.optim; both trajectories' parameters at the end."""
    ours = make_optimizer(optimizer, model, lr=lr, weight_decay=weight_decay)
    clones = {k: t.detach().clone().requires_grad_(True) for k, t in tensors.items()}
    matrices = [t for t in clones.values() if t.ndim >= 2]  # make_optimizer decays matrices only
    vectors = [t for t in clones.values() if t.ndim < 2]
    if optimizer == "sgd":
        theirs = torch.optim.SGD(list(clones.values()), lr=lr, foreach=False)
    else:
        theirs = torch.optim.AdamW([{"params": matrices, "weight_decay": weight_decay},
                                    {"params": vectors, "weight_decay": 0.0}], lr=lr, foreach=False)
    for step in range(STEPS):
        x, y = batch(seed=step)
        loss = manual_step(model, x, y)
        ours.step()
        theirs.zero_grad()
        ref_loss = reference(clones, x, y)
        ref_loss.backward()
        theirs.step()
        assert abs(float(loss) - float(ref_loss.detach())) <= TRAJECTORY_ATOL, step
    return {k: t.detach() for k, t in tensors.items()}, {k: t.detach() for k, t in clones.items()}


def assert_same_trajectory(ours, theirs, start):
    for k in ours:
        assert float((ours[k] - theirs[k]).abs().max()) <= TRAJECTORY_ATOL, k
    assert max(float((ours[k] - start[k]).abs().max()) for k in ours) > 1e-2  # the parameters really moved


# ---- one Linear used twice


def test_a_linear_used_twice_passes_the_gradient_check():
    model = twice_used_model()
    x, y = batch()
    results = check_model(model, x, y) + finite_difference_check(model, x, y)
    assert passed(results), [(r.name, r.kind, r.max_abs_diff) for r in results if not r.close]
    assert {"hidden1.out", "hidden2.out"} <= {r.name for r in results}  # each call's output checked by name


def test_a_linear_used_twice_is_one_parameter_everywhere(tmp_path):
    model = twice_used_model()
    hidden = model.net.layers["hidden1"]
    names = [n for n, _ in model.named_parameters()]
    assert names == ["embedding.weight", "hidden1.weight", "hidden1.bias", "output.weight", "output.bias"]
    assert set(model.state_dict()) == set(names)
    opt = make_optimizer("adamw", model, lr=0.01)
    assert sum(p is hidden.params["weight"] for p in opt.params) == 1 and len(opt.params) == 5
    assert len(opt.state_dict()) == 1 + 2 * 5  # the step count, two moments per parameter
    # the flat buffer holds it once; both holders' names point at the one view
    flat = model.param_buffer
    assert flat is not None and flat.numel() == sum(p.numel() for p in model.parameters())
    assert packed(model.parameters()) is flat and packed(model.grads()) is model.grad_buffer
    assert model.net.layers["hidden2"].params["weight"]._base is flat
    # SGD moves it once per step: p - lr * g, exactly
    sgd = make_optimizer("sgd", model, lr=0.1)
    x, y = batch()
    manual_step(model, x, y)
    before, g = hidden.params["weight"].clone(), hidden.grads["weight"].clone()
    sgd.step()
    assert torch.equal(hidden.params["weight"], torch.add(before, g, alpha=-0.1))


@pytest.mark.parametrize("optimizer,weight_decay,lr", [("sgd", 0.0, 0.5), ("adamw", 0.1, 0.02)])
def test_a_linear_used_twice_trains_as_autograd_and_torch_optim(optimizer, weight_decay, lr):
    model = twice_used_model()
    tensors = twice_used_tensors(model)
    start = {k: t.clone() for k, t in tensors.items()}
    ours, theirs = train_both(model, tensors, twice_used_reference, optimizer, weight_decay, lr)
    assert_same_trajectory(ours, theirs, start)


def test_forward_only_use_keeps_one_frame_per_call():
    model = twice_used_model()
    with torch.no_grad():
        for seed in range(3):  # evaluation, sampling: forwards without a backward
            model.forward(batch(seed=seed)[0])
    tape = model.net.saved["tape"]
    assert [layer for layer, _ in tape] == list(model.net.layers.values())
    hidden = model.net.layers["hidden1"]
    frames = [frame for layer, frame in tape if layer is hidden]
    assert len(frames) == 2 and frames[0][0] is not frames[1][0] and hidden.saved is frames[1][0]  # the last call's
    assert frames[1][0]["x"] is model.net.layers["tanh1"].saved["out"]  # each call saved its own input
    assert frames[0][0]["x"] is not frames[1][0]["x"] and frames[0][0]["x"].shape == frames[1][0]["x"].shape
    assert model.net.outputs == {}  # no autograd recording: nothing kept beyond what a backward needs


def test_optimizers_given_a_parameter_twice_hold_it_once():
    p, g = torch.ones(3, dtype=torch.float64), torch.full((3,), 2.0, dtype=torch.float64)
    q, h = torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    sgd = SGD([p, q, p], [g, h, g], lr=0.1, weight_decay=[0.0, 0.0, 0.0])
    assert sgd.params == [p, q] and sgd.grads == [g, h]
    sgd.step()
    assert torch.equal(p, torch.full((3,), 1 - 0.1 * 2.0, dtype=torch.float64))  # one update, not two
    adamw = AdamW([p, p, q], [g, g, h], lr=0.1, weight_decay=[0.5, 0.5, 0.0])
    assert len(adamw.state["exp_avg"]) == 2 and adamw.weight_decay == [0.5, 0.0]
    assert set(adamw.state_dict()) == {"step", "0.exp_avg", "0.exp_avg_sq", "1.exp_avg", "1.exp_avg_sq"}
    with pytest.raises(ValueError, match="two gradient buffers"):
        SGD([p, p], [g, g.clone()], lr=0.1)


# ---- an output layer tied to the embedding


def test_tied_gradients_sum_into_the_one_buffer():
    model = tied_model()
    emb, output = model.net.layers["embedding"], model.net.layers["output"]
    assert output.params["weight"] is emb.params["weight"] and output.grads["weight"] is emb.grads["weight"]
    x, y = batch()
    manual_step(model, x, y)
    # autograd on two copies of the table, one looked up and one projected onto: their gradients add
    t = {k: v.detach().clone().requires_grad_(True) for k, v in tied_tensors(model).items()}
    C_out = t["C"].detach().clone().requires_grad_(True)
    tied_reference(t, x, y, C_out).backward()
    assert float(t["C"].grad.abs().max()) > 0 and float(C_out.grad.abs().max()) > 0
    torch.testing.assert_close(emb.grads["weight"], t["C"].grad + C_out.grad, rtol=0, atol=1e-14)


@pytest.mark.parametrize("bias", [True, False])
def test_a_tied_output_passes_the_gradient_check(bias):
    model = tied_model(bias=bias)
    x, y = batch()
    results = check_model(model, x, y) + finite_difference_check(model, x, y)
    assert passed(results), [(r.name, r.kind, r.max_abs_diff) for r in results if not r.close]
    assert "output.weight" not in {r.name for r in results}  # the table is the embedding's, checked once


def test_tied_linear_passes_the_layer_check():
    torch.manual_seed(3)
    output = TiedLinear(Embedding(7, 4).to(dtype=torch.float64)).to(dtype=torch.float64)
    with torch.no_grad():
        output.params["bias"].normal_()
    for shape in [(5, 4), (3, 2, 4)]:
        results = check_layer(output, torch.randn(*shape, dtype=torch.float64))
        assert passed(results), [(r.name, r.kind, r.max_abs_diff) for r in results if not r.close]


def test_a_tied_output_trains_as_autograd_and_torch_optim_with_weight_decay():
    model = tied_model()
    tensors = tied_tensors(model)
    start = {k: t.clone() for k, t in tensors.items()}
    ours, theirs = train_both(model, tensors, tied_reference, "adamw", 0.1, 0.02)
    assert_same_trajectory(ours, theirs, start)
    assert model.net.layers["output"].params["weight"] is model.net.layers["embedding"].params["weight"]


def test_a_tied_model_saves_the_table_once_and_loads_it_tied(tmp_path):
    model = tied_model(seed=0)
    checkpoint.save_model(tmp_path, model, Vocab(list("abcdefghij")))
    state, _ = checkpoint.read_safetensors(tmp_path / checkpoint.MODEL_WEIGHTS)
    assert set(state) == {"embedding.weight", "linear1.weight", "linear1.bias", "output.bias"}
    loaded = tied_model(seed=1)
    loaded.load_state_dict(state)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    emb, output = loaded.net.layers["embedding"], loaded.net.layers["output"]
    assert output.params["weight"] is emb.params["weight"] and output.grads["weight"] is emb.grads["weight"]


def test_moving_a_tied_model_keeps_it_tied():
    model = tied_model(dtype=torch.float32)
    for moved in (model.to(dtype=torch.float64), float64_copy(model)):
        emb, output = moved.net.layers["embedding"], moved.net.layers["output"]
        assert emb.params["weight"].dtype == torch.float64
        assert output.params["weight"] is emb.params["weight"] and output.grads["weight"] is emb.grads["weight"]
        assert packed(moved.parameters()) is moved.param_buffer is not None


# ---- residual blocks


def residual(fan: int = 5, hidden: int = 7, dtype=torch.float64, seed=0) -> Residual:
    torch.manual_seed(seed)
    block = Sequential([("fc1", Linear(fan, hidden)), ("tanh", Tanh()), ("fc2", Linear(hidden, fan))])
    with torch.no_grad():
        for _, p in block.named_parameters():
            p.normal_()  # biases away from zero too
    return Residual(block).to(dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(4, 5), (3, 2, 5)])
def test_residual_passes_the_layer_check(dtype, shape):
    layer = residual(dtype=dtype)
    results = check_layer(layer, torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(2)))
    assert passed(results), [(r.name, r.kind, r.max_abs_diff) for r in results if not r.close]
    assert {"input", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"} <= {r.name for r in results}


def residual_model(twice: bool) -> Model:
    torch.manual_seed(4)
    block = residual(fan=8, hidden=12, seed=5)
    layers = [("embedding", Embedding(VOCAB, 3)), ("flatten", Flatten()), ("linear1", Linear(CONTEXT * 3, 8)),
              ("tanh1", Tanh()), ("res1", block)]
    layers += [("res2", block)] if twice else []
    net = Sequential(layers + [("output", Linear(8, VOCAB))])
    return Model(ModelConfig(vocab_size=VOCAB, block_size=CONTEXT), net).to(dtype=torch.float64)


@pytest.mark.parametrize("twice", [False, True], ids=["once", "twice"])
def test_a_residual_block_in_a_model_passes_the_model_check(twice):
    model = residual_model(twice)
    x, y = batch()
    results = check_model(model, x, y) + finite_difference_check(model, x, y)
    assert passed(results), [(r.name, r.kind, r.max_abs_diff) for r in results if not r.close]
    names = [n for n, _ in model.named_parameters()]
    assert names == ["embedding.weight", "linear1.weight", "linear1.bias", "res1.fc1.weight", "res1.fc1.bias",
                     "res1.fc2.weight", "res1.fc2.bias", "output.weight", "output.bias"]
    assert "res1.fc1.out" in {r.name for r in results}  # the block's own intermediates, checked by name


def test_the_checks_catch_a_residual_backward_that_drops_the_skip_path(monkeypatch):
    monkeypatch.setattr(Residual, "backward",
                        lambda self, dout: core.backward_on_tape(*self.saved["tape"][0], dout))  # forgot + dout
    results = check_layer(residual(), torch.randn(4, 5, dtype=torch.float64))
    assert [r.name for r in results if not r.close] == ["input", "input"]  # autograd's row, then the differences'
    model = residual_model(twice=False)
    failed = {r.name for r in check_model(model, *batch()) if not r.close}
    assert {"linear1.weight", "embedding.weight", "tanh1.out"} <= failed
    assert not failed & {"res1.fc1.weight", "output.weight"}  # the layers past the skip are right


def test_a_residual_block_that_changes_the_shape_is_refused_in_one_line():
    block = Linear(5, 4)
    with pytest.raises(HandgradError, match=r"^Residual: the block maps \(3, 5\) to \(3, 4\); a skip path needs"):
        Residual(block).forward(torch.randn(3, 5))


# ---- the flat buffers with tensors held twice


def test_flatten_lays_each_held_tensor_once_and_points_every_holder_at_it():
    emb, linear = Embedding(VOCAB, 3), Linear(CONTEXT * 3, 4)
    fused = EmbeddingLinear(emb, linear)  # holds its parts' tensors under its own names too
    output = TiedLinear(Embedding(4, 4))
    net = Sequential([("fused", fused), ("tanh", Tanh()), ("output", output)])
    values = {n: p.clone() for n, p in net.named_parameters()}
    net.flatten()
    flat = net.param_buffer
    assert flat is not None and net.grad_buffer is not None
    distinct = [p for _, p in net.named_parameters()]
    assert flat.numel() == sum(p.numel() for p in distinct) and packed(distinct) is flat
    assert packed([g for _, g in net.named_grads()]) is net.grad_buffer
    assert all(torch.equal(p, values[n]) for n, p in net.named_parameters())  # the values kept
    for held_a, held_b in [(fused.params["embedding"], emb.params["weight"]),
                           (fused.params["weight"], linear.params["weight"]),
                           (fused.grads["embedding"], emb.grads["weight"])]:
        assert held_a is held_b and (held_a._base is flat or held_a._base is net.grad_buffer)
    assert output.params["weight"]._base is flat
    assert set(dict(net.named_parameters())) == {"fused.embedding", "fused.weight", "fused.bias", "output.weight",
                                                 "output.bias"}


# ---- the Embedding's GPU branch, on a CPU


@pytest.mark.parametrize("shape", [(6, 3), (2, 4, 5)])
def test_the_embeddings_index_add_branch_passes_the_layer_check(shape, monkeypatch):
    consulted = []

    def never_index_put(grad):
        consulted.append(grad)
        return False

    monkeypatch.setattr(core, "accumulates_with_index_put", never_index_put)
    torch.manual_seed(6)
    layer = Embedding(4, 3).to(dtype=torch.float64)
    idx = torch.randint(0, 4, shape, generator=torch.Generator().manual_seed(7))  # ids repeat: the adds accumulate
    results = check_layer(layer, idx)
    assert passed(results), [(r.name, r.kind, r.max_abs_diff) for r in results if not r.close]
    assert consulted and all(g.is_cpu for g in consulted)
