"""The transformer family through the whole pipeline: check (every block's intermediates, every parameter,
finite differences), train, eval, sample, exact resume; and manual training tracking autograd's."""
import json

import pytest
from cli_run import QUICK, assert_resumes_bit_for_bit, assert_tracks_autograd, run_cli

SMALL = ["--n-embd", "16", "--n-hidden", "32", "--n-layers", "2", "--n-heads", "2"]


@pytest.mark.parametrize("form", [[], ["--fused"]], ids=["stepwise", "fused"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_check_passes_on_the_seed_data_listing_every_block(dtype, form, names_txt, capsys):
    rc, out, err = run_cli(["check", "--model", "transformer", "--dtype", dtype, "-i", names_txt, *SMALL,
                            "--fd-samples", "3", *form], capsys)
    assert rc == 0, out + err
    assert out.rstrip().splitlines()[-1].startswith("PASS")
    for name in ("attn1.attn.out", "attn2.ln.out", "mlp2.gelu.out", "ln_f.out", "position.weight", "attn1.attn.qkv_weight"):
        assert name in out, name
    if not form:  # the stepwise forms list their intermediates
        assert "attn2.attn.att " in out and "mlp1.ln.lnrstd " in out


def test_train_eval_sample_and_resume_bit_for_bit(tmp_path, capsys):
    common = ["--model", "transformer", *SMALL, "--steps", "40", "--warmup", "10", "--save-every", "0", *QUICK]
    straight, _ = assert_resumes_bit_for_bit(tmp_path, capsys, common, stop_at=15)
    run = json.loads((straight / "run.json").read_text())
    assert run["model_config"]["n_heads"] == 2 and run["config"]["n_heads"] == 2
    rc, out, err = run_cli(["eval", "-o", straight], capsys)
    assert rc == 0 and abs(float(out.splitlines()[1].split()[1]) - run["final"]["val"]) <= 5e-5, err
    rc, out, err = run_cli(["sample", "-o", straight, "-n", "4", "--seed", "2", "--temperature", "0.8"], capsys)
    assert rc == 0 and len(out.splitlines()) == 4, err


def test_manual_training_tracks_autograd_at_every_logged_step(tmp_path, capsys):
    """2,000 steps, float32, to 1e-4 at every logged step."""
    common = ["--model", "transformer", *SMALL, "--batch-size", "16", "--steps", "2000", "--warmup", "100",
              "--log-every", "100", "--eval-every", "1000", "-n", "0", "--no-check", "--save-every", "0"]
    m = assert_tracks_autograd(tmp_path, capsys, common, tolerance=1e-4)
    assert len(m) == 21 and m[-1]["val_loss"] < m[0]["val_loss"] - 0.5


def test_heads_belong_to_the_transformer(tmp_path, capsys):
    from cli_run import assert_one_line_error

    rc, _, err = run_cli(["train", "-o", tmp_path / "r", "--model", "gru", "--n-heads", "2", *QUICK], capsys)
    assert_one_line_error(rc, err, "--n-heads 2: the gru has no attention; it belongs to --model transformer")
    rc, _, err = run_cli(["train", "-o", tmp_path / "r", "--model", "wavenet", "--dropout", "0.1", *QUICK], capsys)
    assert_one_line_error(rc, err, "--dropout 0.1: the wavenet has no dropout layers")


def test_auto_compiles_a_long_transformer_run_at_its_training_batch():
    """The transformer's compiled step repays its compile within a few thousand steps, even at the small
    batches where the seed model's does not (fastpath.worth_compiling); short runs stay replayed."""
    from handgrad.fastpath import TRANSFORMER_COMPILE_SECONDS, TRANSFORMER_SAVED_PER_EXAMPLE, choose_impl

    assert choose_impl("auto", "manual", 16_000, 64)[0] == "replay"  # the seed model's rule, without the family
    impl, why = choose_impl("auto", "manual", 16_000, 64, model="transformer")
    assert impl == "compiled" and "16,000 steps of batch 64" in why
    break_even = TRANSFORMER_COMPILE_SECONDS / (TRANSFORMER_SAVED_PER_EXAMPLE * 64)
    assert choose_impl("auto", "manual", int(break_even * 0.9), 64, model="transformer")[0] == "replay"
    assert choose_impl("auto", "manual", int(break_even * 1.1), 64, model="transformer")[0] == "compiled"
    # diagnostics keep their own rule; on several threads the transformer's compiled step stays ahead
    assert choose_impl("auto", "manual", 16_000, 64, diagnostics=True, model="transformer")[0] == "eager"
    assert choose_impl("auto", "manual", 16_000, 64, threads=2, model="transformer")[0] == "compiled"
    assert choose_impl("auto", "manual", 16_000, 64, threads=2)[0] == "replay"
    # a short run is replayed, on one thread or several (the loop's sums in a fixed order: train.repeatable_sums)
    impl, why = choose_impl("auto", "manual", 1_000, 64, threads=2, model="transformer")
    assert impl == "replay" and "would not repay" in why


def test_a_transformer_step_counts_its_positions_as_rows_for_threads():
    """`train.cpu_threads`: one thread up to 256 rows a step; the transformer's rows are its items times
    their positions (every layer reads them at once), a recurrent model's only its items."""
    from handgrad.train import SMALL_BATCH, TORCH_THREADS, cpu_threads, step_rows

    assert step_rows("transformer", 64, 16) == 1024 and step_rows("gru", 64, 16) == 64 and step_rows("mlp", 32, 3) == 32
    assert cpu_threads(None, step_rows("transformer", 64, 16)) == TORCH_THREADS
    assert cpu_threads(None, step_rows("lstm", 128, 16)) == 1 and cpu_threads(None, SMALL_BATCH) == 1
    assert cpu_threads(3, 10) == 3


@pytest.mark.parametrize("family", ["transformer", "gru"])
def test_a_trimmed_batch_has_the_whole_widths_loss_and_gradients(family, names_txt):
    """Cutting a batch to its longest item (`--trim`) cuts padding only: in float64 the loss and every gradient
    equal those of the batch at the data's whole width (no dropout: masks of another shape are other draws)."""
    import torch

    from handgrad.data import IGNORE, trim_batch
    from handgrad.fastpath import manual_step
    from handgrad.model import build_model
    from handgrad.train import TrainConfig

    no_attention_dropout = {"attn_dropout": 0.0} if family == "transformer" else {}
    tc = TrainConfig(model=family, data=names_txt, dropout=0.0, n_embd=16, n_hidden=32, n_layers=2,
                     **no_attention_dropout).resolved()
    ds = tc.dataset()
    X, Y = ds.X["train"], ds.Y["train"]
    lengths = (Y != IGNORE).sum(1)
    idx = torch.cat([torch.nonzero(lengths == n)[:3, 0] for n in (2, 5, 6)])  # the longest item: 6 positions
    x, y = X[idx], Y[idx]
    assert x.shape[1] == 16
    model = build_model(tc.model_config(len(ds.vocab), ds.block_size), seed=3, dtype=torch.float64)
    with torch.no_grad():
        for p in model.parameters():  # gains and biases away from 1 and 0 as well
            p.add_(torch.randn_like(p) * 0.1)
    results = []
    for k in (0, 1, 4, 5):
        xt, yt = trim_batch(x, y, k)
        assert xt.shape[1] == {0: 16, 1: 6, 4: 8, 5: 10}[k] and yt.shape == xt.shape
        assert torch.equal(xt, x[:, :xt.shape[1]]) and bool((y[:, xt.shape[1]:] == IGNORE).all())
        loss = float(manual_step(model, xt, yt))
        results.append((loss, model.grad_buffer.clone()))
    for loss, grads in results[1:]:
        assert abs(loss - results[0][0]) <= 1e-12
        torch.testing.assert_close(grads, results[0][1], rtol=0, atol=1e-12)
    assert trim_batch(x, y, 32)[0].shape[1] == 16  # rounded up, never past the data's width


def test_trim_defaults_and_belongs_to_sequence_models(tmp_path, capsys):
    from cli_run import assert_one_line_error

    from handgrad.train import TrainConfig

    assert TrainConfig(model="transformer", pack=False).resolved().trim == 4  # packed by default: nothing to trim
    assert TrainConfig(model="lstm").resolved().trim == 0 and TrainConfig(model="mlp").resolved().trim == 0
    rc, _, err = run_cli(["train", "-o", tmp_path / "r", "--model", "mlp", "--trim", "4", *QUICK], capsys)
    assert_one_line_error(rc, err, "--trim 4: the mlp has no batches of whole items to trim")


def test_two_threads_resume_bit_for_bit(tmp_path, capsys, names_txt):
    """On two threads torch's accumulating scatter (the token table's gradient) lands in any order unless the
    loop asks for a fixed one (`train.repeatable_sums`): the resumed run still ends bit for bit where the
    straight one does, and the setting is undone after the run."""
    import torch

    # 64 channels: a token table's gradient wide enough for torch to split its scatter over the threads
    common = ["--model", "transformer", "--n-embd", "64", "--n-hidden", "64", "--n-layers", "1", "--n-heads", "2",
              "-i", names_txt, "--batch-size", "64", "--steps", "30",
              "--warmup", "5", "--save-every", "0", "--threads", "2", *QUICK]
    assert_resumes_bit_for_bit(tmp_path, capsys, common, stop_at=12)
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize("form", [[], ["--fused"]], ids=["stepwise", "fused"])
def test_check_passes_with_attention_dropout_and_tied_weights(form, names_txt, capsys):
    rc, out, err = run_cli(["check", "--model", "transformer", "--dtype", "float64", "-i", names_txt, *SMALL,
                            "--attn-dropout", "0.2", "--tie-weights", "--fd-samples", "3", *form], capsys)
    assert rc == 0, out + err
    assert out.rstrip().splitlines()[-1].startswith("PASS")
    names = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert "embedding.weight" in names and "output.weight" not in names  # the tied table, listed once
    if not form:  # the kept weights, after the attention dropout, are an intermediate of their own
        assert {"attn1.attn.kept", "attn2.attn.kept"} <= names


def test_attention_dropout_and_tied_weights_train_and_resume_bit_for_bit(tmp_path, capsys):
    from handgrad import checkpoint

    common = ["--model", "transformer", *SMALL, "--attn-dropout", "0.1", "--tie-weights", "--steps", "30",
              "--warmup", "5", "--save-every", "0", *QUICK]
    straight, _ = assert_resumes_bit_for_bit(tmp_path, capsys, common, stop_at=12)
    run = json.loads((straight / "run.json").read_text())
    assert run["model_config"]["attn_dropout"] == 0.1 and run["model_config"]["tie_weights"] is True
    assert run["config"]["attn_dropout"] == 0.1 and run["config"]["tie_weights"] is True
    tensors, _ = checkpoint.read_safetensors(straight / checkpoint.MODEL_WEIGHTS)
    assert "embedding.weight" in tensors and "output.weight" not in tensors and "output.bias" in tensors
    rc, out, err = run_cli(["sample", "-o", straight, "-n", "3", "--seed", "1"], capsys)
    assert rc == 0 and len(out.splitlines()) == 3, err


def test_a_transformer_saved_before_attention_dropout_resumes_without_it(tmp_path, capsys):
    """A checkpoint whose training config has no attn_dropout or tie_weights (saved by the version before
    them) resumes as the model it was: neither, whatever the defaults say now."""
    from safetensors.torch import save as st_save

    from handgrad import checkpoint

    out = tmp_path / "old"
    rc, _, err = run_cli(["train", "-o", out, "--model", "transformer", *SMALL, "--attn-dropout", "0", "--no-tie-weights",
                          "--steps", "20", "--warmup", "5", "--stop-at", "10", *QUICK], capsys)
    assert rc == 0, err
    path = out / checkpoint.CHECKPOINT
    tensors, metadata = checkpoint.read_safetensors(path)
    meta = json.loads(metadata[checkpoint.HEADER_KEY])
    for key in ("attn_dropout", "tie_weights"):
        del meta["config"][key], meta["model_config"][key]
    path.write_bytes(st_save(tensors, {**metadata, checkpoint.HEADER_KEY: json.dumps(meta)}))
    rc, _, err = run_cli(["train", "-o", out, "--resume"], capsys)
    assert rc == 0, err
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["attn_dropout"] == 0.0 and run["config"]["tie_weights"] is False


def test_attention_dropout_and_tied_weights_belong_to_the_transformer(tmp_path, capsys):
    from cli_run import assert_one_line_error

    rc, _, err = run_cli(["train", "-o", tmp_path / "r", "--model", "gru", "--attn-dropout", "0.1", *QUICK], capsys)
    assert_one_line_error(rc, err, "--attn-dropout 0.1: the gru has no attention; it belongs to --model transformer")
    rc, _, err = run_cli(["train", "-o", tmp_path / "r", "--model", "mlp", "--tie-weights", *QUICK], capsys)
    assert_one_line_error(rc, err, "--tie-weights: the mlp has no output layer to tie to a token table")


def test_the_compiled_step_draws_the_eager_steps_dropout_masks(names_txt):
    """Dropout's masks come from torch's own random kernels in the compiled step too (`fallback_random`):
    from one generator state, the compiled and the eager transformer step, dropout and attention dropout
    on, give the same loss and gradients to float32 rounding; other masks would move the loss by ~1e-2."""
    import torch

    from handgrad.data import make_sequence_dataset
    from handgrad.fastpath import compiled_train_step, manual_step
    from handgrad.model import ModelConfig, build_model

    torch._dynamo.reset()  # the compiled steps of earlier tests count towards the compiler's recompile limit
    ds = make_sequence_dataset(names_txt)
    config = ModelConfig(model="transformer", vocab_size=len(ds.vocab), block_size=ds.block_size, n_embd=16,
                         n_hidden=32, n_layers=2, n_heads=2, dropout=0.3, attn_dropout=0.3, sequences=True)
    eager, compiled = build_model(config, seed=1), build_model(config, seed=1)
    step = compiled_train_step(compiled)
    x, y = ds.X["train"][:32], ds.Y["train"][:32]
    state = torch.get_rng_state()
    try:
        for seed in (5, 6):
            torch.manual_seed(seed)
            with torch.no_grad():
                want = manual_step(eager, x, y)
            torch.manual_seed(seed)
            got = step(compiled, x, y)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
            for (name, g), (_, h) in zip(compiled.net.named_grads(), eager.net.named_grads()):
                torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-5, msg=name)
        torch.manual_seed(7)
        with torch.no_grad():
            assert abs(float(manual_step(eager, x, y)) - float(want)) > 1e-3  # other masks: another loss
    finally:
        torch.set_rng_state(state)
