"""Packed batches: several items to a row (`data.pack_batch`), the item layout the transformer reads from
the ids (`layers.ItemLayout`), the position table and the attention built with it, checked against autograd
and five-point central differences in float64; a packed batch's loss and gradients equal one item a row's,
and an attention that looks across items is caught by that equality; the training options."""
import json

import pytest
import torch
from cli_run import QUICK, assert_one_line_error, run_cli

from handgrad.data import IGNORE, PACK_ROWS, pack_batch
from handgrad.errors import HandgradError
from handgrad.fastpath import manual_step
from handgrad.gradcheck import check_layer, check_model, passed
from handgrad.layers import CausalSelfAttention, CausalSelfAttentionStepwise, ItemLayout, PositionEmbedding
from layer_checks import assert_ok, randn


def items_of(lengths, width):
    """One item a row, padded: item i's inputs are its start token and ids i+1 repeated, its targets those
    ids and the end token; the rest of the row padding (boundary inputs, ignored targets)."""
    x = torch.zeros(len(lengths), width, dtype=torch.long)
    y = torch.full((len(lengths), width), IGNORE, dtype=torch.long)
    for i, n in enumerate(lengths):
        x[i, 1:n] = i + 1
        y[i, :n - 1] = i + 1
        y[i, n - 1] = 0
    return x, y


# ---- data.pack_batch


def test_packing_places_every_item_whole_in_one_row_best_fit_longest_first():
    lengths = [3, 8, 5, 2, 8, 6, 4, 2, 7]
    x, y = items_of(lengths, 8)
    xp, yp = pack_batch(x, y, rows_multiple=1)
    # 45 positions in rows of 8, longest first, each into the fullest row it fits: 8 and 8 alone, 7 (1 left
    # over), then 3 into the 5's row, 2 into the 6's, the last 2 beside the 4
    assert xp.shape == yp.shape == (6, 8)
    for i, n in enumerate(lengths):
        places = [(r, o) for r in range(6) for o in range(8 - n + 1)
                  if torch.equal(xp[r, o:o + n], x[i, :n]) and torch.equal(yp[r, o:o + n], y[i, :n])]
        assert len(places) == 1, f"item {i} (length {n}) found at {places}"  # whole, in one row, once
    filled = (yp != IGNORE).sum(1).tolist()
    assert sorted(filled) == [6, 7, 8, 8, 8, 8]
    assert int((yp != IGNORE).sum()) == sum(lengths)  # every target once, nothing else counted
    assert bool((xp[yp == IGNORE] == 0).all())  # padding inputs are the boundary token
    again = pack_batch(x, y, rows_multiple=1)
    assert torch.equal(again[0], xp) and torch.equal(again[1], yp)  # deterministic


def test_packed_rows_come_in_multiples_and_keep_the_width():
    x, y = items_of([4] * 9, 16)  # 36 positions: 3 rows, rounded up to the multiple
    xp, yp = pack_batch(x, y)
    assert xp.shape == (PACK_ROWS, 16)
    assert bool((yp[3:] == IGNORE).all())
    assert pack_batch(x, y, rows_multiple=4)[0].shape == (4, 16)


# ---- layers.ItemLayout


def test_the_item_layout_reads_positions_and_visibility_from_the_start_tokens():
    layout = ItemLayout()
    ids = torch.tensor([[0, 5, 6, 0, 7, 0, 0, 0],   # two items, then padding (each pad an item of its own)
                        [0, 1, 2, 3, 4, 5, 0, 0]])  # one item and its padding, as unpacked data
    with torch.no_grad():
        assert layout.forward(ids) is ids
    assert layout.positions.tolist() == [[0, 1, 2, 0, 1, 0, 0, 0], [0, 1, 2, 3, 4, 5, 0, 0]]
    v = layout.visible
    assert v[0, 2].tolist() == [True, True, True, False, False, False, False, False]
    assert v[0, 4].tolist() == [False, False, False, True, True, False, False, False]  # not the first item
    assert v[0, 6].tolist() == [False] * 6 + [True, False]  # a pad sees itself only
    assert v[1, 5].tolist() == [True] * 6 + [False, False]  # one item a row: the causal mask
    assert layout.backward(None) is None


def packed_layout(seed=0):
    """Ids of 3 rows of 6 positions, items of several lengths (a row of one item, padding), and the layout
    read from them."""
    ids = torch.tensor([[0, 3, 4, 0, 5, 2], [0, 1, 0, 2, 2, 0], [0, 6, 6, 6, 0, 0]])
    layout = ItemLayout()
    layout.forward(ids)
    return layout


def test_position_embedding_by_place_in_item():
    layout = packed_layout()
    layer = PositionEmbedding(6, 5, layout).to(dtype=torch.float64)
    layer.params["weight"].copy_(randn(6, 5, seed=3))
    x, dout = randn(3, 6, 5, seed=1), randn(3, 6, 5, seed=2)
    assert_ok(check_layer(layer, x, dout=dout))
    with torch.no_grad():
        layer.zero_grad()
        out = layer.forward(x)
        layer.backward(dout)
    torch.testing.assert_close(out, x + layer.params["weight"][layout.positions], rtol=0, atol=0)
    for p in range(6):
        torch.testing.assert_close(layer.grads["weight"][p], dout[layout.positions == p].sum(0), rtol=0, atol=1e-14)


class PositionByColumn(PositionEmbedding):
    """A planted error: the backward of one item a row (sum over the batch at each column), though the forward
    added each token's place in its item."""

    def backward(self, dout):
        self.grads["weight"][:dout.shape[1]].add_(dout.sum(0))
        return dout


def test_check_catches_a_position_backward_that_ignores_the_items():
    layer = PositionByColumn(6, 5, packed_layout()).to(dtype=torch.float64)
    results = check_layer(layer, randn(3, 6, 5, seed=1), dout=randn(3, 6, 5, seed=2))
    failed = {(r.name, r.kind) for r in results if not r.close}
    assert {("weight", "parameter"), ("weight", "finite-difference")} <= failed
    assert ("input", "intermediate") not in failed


def attention_with(cls, layout, channels=6, heads=2, seed=0):
    layer = cls(channels, heads, 6, items=layout).to(dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    for _, p in layer.named_parameters():  # biases too: zero biases hide a wrong backward
        p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.7)
    return layer


@pytest.mark.parametrize("cls", [CausalSelfAttention, CausalSelfAttentionStepwise])
def test_attention_within_items(cls):
    layout = packed_layout()
    layer = attention_with(cls, layout)
    x, dout = randn(3, 6, 6, seed=1), randn(3, 6, 6, seed=2)
    assert_ok(check_layer(layer, x, dout=dout))
    # each item's outputs are those of the item alone in a row (the same parameters, no layout)
    alone = attention_with(cls, None)
    with torch.no_grad():
        out = layer.forward(x)
        for r, start, stop in [(0, 0, 3), (0, 3, 6), (1, 0, 2), (1, 2, 5), (1, 5, 6), (2, 0, 4), (2, 4, 5)]:
            torch.testing.assert_close(out[r, start:stop], alone.forward(x[r:r + 1, start:stop])[0], rtol=0, atol=1e-14)


def test_the_fused_and_stepwise_forms_agree_within_items():
    layout = packed_layout()
    fused, stepwise = attention_with(CausalSelfAttention, layout), attention_with(CausalSelfAttentionStepwise, layout)
    x, dout = randn(3, 6, 6, seed=1), randn(3, 6, 6, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(fused.forward(x), stepwise.forward(x), rtol=0, atol=1e-13)
        torch.testing.assert_close(fused.backward(dout), stepwise.backward(dout), rtol=0, atol=1e-13)
    assert fused.saved["visible"] is layout.visible  # the layout's bytes, not a mask per layer and head


def test_layers_refuse_a_layout_of_another_batch():
    layout = packed_layout()
    with pytest.raises(HandgradError, match="has not read this batch"):
        PositionEmbedding(6, 6, layout).forward(torch.randn(2, 6, 6))
    with pytest.raises(HandgradError, match="has not read this batch"):
        CausalSelfAttention(6, 2, 6, items=layout).forward(torch.randn(3, 5, 6))


# ---- the transformer on packed batches


def transformer_and_batch(names_txt, layout_class=ItemLayout):
    from handgrad.model import build_model
    from handgrad.train import TrainConfig

    tc = TrainConfig(model="transformer", data=names_txt, dropout=0.0, attn_dropout=0.0, n_embd=16, n_hidden=32,
                     n_layers=2, n_heads=2).resolved()
    ds = tc.dataset()
    model = build_model(tc.model_config(len(ds.vocab), ds.block_size), seed=3, dtype=torch.float64)
    if layout_class is not ItemLayout:
        items = model.net.layers["items"]
        items.__class__ = layout_class
    with torch.no_grad():
        for p in model.parameters():  # gains and biases away from 1 and 0 as well
            p.add_(torch.randn_like(p) * 0.1)
    idx = torch.randint(0, ds.sizes()["train"], (40,), generator=torch.Generator().manual_seed(5))
    return model, ds.X["train"][idx], ds.Y["train"][idx]


def test_a_packed_batch_has_one_item_a_rows_loss_and_gradients(names_txt):
    model, x, y = transformer_and_batch(names_txt)
    xp, yp = pack_batch(x, y)
    assert xp.shape[0] < x.shape[0] and int((yp != IGNORE).sum()) == int((y != IGNORE).sum())
    loss = float(manual_step(model, x, y))
    grads = model.grad_buffer.clone()
    assert abs(float(manual_step(model, xp, yp)) - loss) <= 1e-12
    torch.testing.assert_close(model.grad_buffer, grads, rtol=0, atol=1e-12)
    assert passed(check_model(model, xp, yp))


def test_items_narrower_than_a_multiple_of_8_pack_into_wider_rows_with_the_same_loss_and_gradients():
    """The built-in names are 12 wide: their rows are 16 wide, longer than the model's context of 12, and
    the positions, the attention and so the loss and every gradient stay one item a row's."""
    from handgrad.data import packed_width

    assert [packed_width(w) for w in (5, 8, 12, 16, 17)] == [8, 8, 16, 16, 24]
    model, x, y = transformer_and_batch(None)
    assert x.shape[1] == model.config.block_size == 12
    xp, yp = pack_batch(x, y)
    assert xp.shape[1] == 16 and int((yp != IGNORE).sum()) == int((y != IGNORE).sum())
    assert (yp != IGNORE).float().mean() > (y != IGNORE).float().mean()  # fuller rows than one item a row
    loss = float(manual_step(model, x, y))
    grads = model.grad_buffer.clone()
    assert abs(float(manual_step(model, xp, yp)) - loss) <= 1e-12
    torch.testing.assert_close(model.grad_buffer, grads, rtol=0, atol=1e-12)
    assert passed(check_model(model, xp, yp))


def test_rows_of_padding_after_a_packed_batch_change_nothing(names_txt):
    from handgrad.data import pad_rows

    model, x, y = transformer_and_batch(names_txt)
    xp, yp = pack_batch(x, y)
    loss = float(manual_step(model, xp, yp))
    grads = model.grad_buffer.clone()
    xq, yq = pad_rows(xp, yp, xp.shape[0] + 5)
    assert xq.shape == (xp.shape[0] + 5, xp.shape[1]) and torch.equal(xq[:xp.shape[0]], xp)
    assert not xq[xp.shape[0]:].any() and (yq[yp.shape[0]:] == IGNORE).all()
    assert abs(float(manual_step(model, xq, yq)) - loss) <= 1e-12
    torch.testing.assert_close(model.grad_buffer, grads, rtol=0, atol=1e-12)
    assert pad_rows(xp, yp, xp.shape[0])[0] is xp
    with pytest.raises(HandgradError, match="cannot be padded"):
        pad_rows(xp, yp, xp.shape[0] - 1)


class CausalOnly(ItemLayout):
    """A planted error: every position sees the whole row before it, items that share the row included."""

    def forward(self, idx):
        super().forward(idx)
        T = idx.shape[1]
        self.visible = torch.ones(T, T, dtype=torch.bool).tril().expand(idx.shape[0], T, T)
        return idx


def test_attention_across_items_is_caught_by_the_packed_batchs_loss(names_txt):
    """The gradient check compares the manual backward with autograd's through the same forward, so a
    forward that lets items see each other passes it; what catches it is that the packed batch's loss and
    gradients are no longer one item a row's."""
    model, x, y = transformer_and_batch(names_txt, CausalOnly)
    xp, yp = pack_batch(x, y)
    assert passed(check_model(model, xp, yp))
    loss = float(manual_step(model, x, y))
    assert abs(float(manual_step(model, xp, yp)) - loss) > 1e-3


# ---- the training options


def test_the_transformer_packs_by_default_and_the_option_belongs_to_it(tmp_path, capsys):
    from handgrad.train import TrainConfig

    assert TrainConfig(model="transformer").resolved().pack is True
    assert TrainConfig(model="transformer").resolved().trim == 0  # nothing to trim in a packed batch
    assert TrainConfig(model="transformer", pack=False).resolved().trim == 4
    assert TrainConfig(model="gru").resolved().pack is False
    rc, _, err = run_cli(["train", "-o", tmp_path / "r", "--model", "gru", "--pack", *QUICK], capsys)
    assert_one_line_error(rc, err, "--pack: the gru has no attention")
    rc, _, err = run_cli(["train", "-o", tmp_path / "r", "--model", "transformer", "--trim", "4", *QUICK], capsys)
    assert_one_line_error(rc, err, "--trim 4 with --pack", "--no-pack")


def test_a_packed_run_records_it_and_resumes_bit_for_bit(tmp_path, capsys):
    from cli_run import assert_resumes_bit_for_bit

    common = ["--model", "transformer", "--n-embd", "16", "--n-hidden", "32", "--n-layers", "2", "--n-heads", "2",
              "--steps", "30", "--warmup", "5", "--batch-size", "24", "--save-every", "0", *QUICK]
    straight, _ = assert_resumes_bit_for_bit(tmp_path, capsys, common, stop_at=12)
    assert json.loads((straight / "run.json").read_text())["config"]["pack"] is True


def test_check_runs_a_packed_batch(names_txt, capsys):
    rc, out, err = run_cli(["check", "--model", "transformer", "-i", names_txt, "--n-embd", "16", "--n-hidden", "32",
                            "--n-layers", "2", "--n-heads", "2", "--fd-samples", "2", "--dtype", "float64"], capsys)
    assert rc == 0, out + err
    assert "packed into 16 rows" in out.splitlines()[0]  # 32 names in rows of 16 positions, in multiples of 8
    rc, out, err = run_cli(["check", "--model", "transformer", "-i", names_txt, "--n-embd", "16", "--n-hidden", "32",
                            "--n-layers", "2", "--n-heads", "2", "--fd-samples", "0", "--no-pack"], capsys)
    assert rc == 0 and "packed" not in out.splitlines()[0], out + err


def test_a_transformer_saved_before_packing_resumes_one_item_a_row(tmp_path, capsys):
    """A checkpoint whose training config has no `pack` (saved by the version before it) ran one item a row:
    it resumes so, whatever the transformer's default says now."""
    from safetensors.torch import save as st_save

    from handgrad import checkpoint

    out = tmp_path / "old"
    rc, _, err = run_cli(["train", "-o", out, "--model", "transformer", "--n-embd", "16", "--n-hidden", "32",
                          "--n-layers", "1", "--n-heads", "2", "--no-pack", "--steps", "20", "--warmup", "5",
                          "--stop-at", "10", *QUICK], capsys)
    assert rc == 0, err
    path = out / checkpoint.CHECKPOINT
    tensors, metadata = checkpoint.read_safetensors(path)
    meta = json.loads(metadata[checkpoint.HEADER_KEY])
    del meta["config"]["pack"]
    path.write_bytes(st_save(tensors, {**metadata, checkpoint.HEADER_KEY: json.dumps(meta)}))
    rc, _, err = run_cli(["train", "-o", out, "--resume"], capsys)
    assert rc == 0, err
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["pack"] is False and run["config"]["trim"] == 4


def test_the_compiled_step_compiles_the_usual_packed_shape_only(names_txt):
    """A packed batch of the usual row count runs compiled, one of fewer rows padded up to it; one of more
    (names.txt at 128 names: 0.3% of them) runs the eager step rather than compile a second shape for a
    few steps; each with the eager step's loss and gradients on the batch as packed, to float32 rounding.
    The usual count depends on the data and batch size alone."""
    from handgrad.data import make_sequence_dataset, usual_packed_rows
    from handgrad.fastpath import compiled_train_step
    from handgrad.model import ModelConfig, build_model

    torch._dynamo.reset()  # the compiled steps of earlier tests count towards the compiler's recompile limit
    ds = make_sequence_dataset(names_txt)
    assert usual_packed_rows(ds.Y["train"], 128) == usual_packed_rows(ds.Y["train"], 128) == 64
    config = ModelConfig(model="transformer", vocab_size=len(ds.vocab), block_size=ds.block_size, n_embd=16,
                         n_hidden=32, n_layers=1, n_heads=2, sequences=True)
    eager, compiled = build_model(config, seed=1), build_model(config, seed=1)
    step = compiled_train_step(compiled, rows=16)
    for items, rows in ((40, 24), (16, 8), (32, 16)):  # eager, then compiled (padded up), then compiled
        x, y = pack_batch(ds.X["train"][:items], ds.Y["train"][:items])
        assert x.shape[0] == rows
        want = manual_step(eager, x, y)
        got = step(compiled, x, y)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(compiled.grad_buffer, eager.grad_buffer, rtol=1e-4, atol=1e-5)
    assert [key[1] for key in step.compiled._seen] == [(16, 16)]  # one shape compiled
