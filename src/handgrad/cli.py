"""The `handgrad` command: check, train, sample, eval, bench."""
from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import math
import os
import sys
import time

from . import __version__
from .allocator import keep_freed_memory
from .errors import HandgradError

# `sample --max-len` of a model whose header lacks max_item_len (saved before it had one): the
# fixed limit samples had then
FALLBACK_MAX_LEN = 100


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {v}")
    return v


def nonnegative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {v}")
    return v


def nonnegative_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return v


def positive_float(text: str) -> float:
    v = nonnegative_float(text)
    if v == 0:
        raise argparse.ArgumentTypeError("must be positive, got 0")
    return v


def dropout_probability(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"a dropout probability is in [0, 1), got {text}")
    return v


def positive_int_list(text: str) -> list[int]:
    return [positive_int(t.strip()) for t in text.split(",") if t.strip()] or [positive_int(text)]


def name_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected at least one name")
    return names


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-i", "--data", metavar="FILE", default=None,
                   help="text file, one item per line (default: built-in US census first names)")
    p.add_argument("--split", choices=["words", "examples"], default="words",
                   help="split 80/10/10 by words, or by examples as the seed notebook does (default words)")
    p.add_argument("--seed", type=int, default=42, help="seed for the shuffle, the init and the batches (default 42)")


def add_model_args(p: argparse.ArgumentParser) -> None:
    from .model import MODELS

    p.add_argument("--model", choices=sorted(MODELS), default="mlp", help="model family (default mlp, the seed's)")
    p.add_argument("--block-size", type=positive_int, default=None, help="context length (default: the model's)")
    p.add_argument("--n-embd", type=positive_int, default=None, help="embedding size (default: the model's)")
    p.add_argument("--n-hidden", type=positive_int, default=None, help="hidden width (default: the model's)")
    p.add_argument("--n-heads", type=positive_int, default=None,
                   help="attention heads of --model transformer (default: the model's, 4)")
    p.add_argument("--n-layers", type=positive_int, default=None, help="hidden layers, where the model has several (default: the model's)")
    p.add_argument("--dropout", type=dropout_probability, default=None,
                   help="transformer and recurrent models: dropout probability after the embedding and after each "
                        "attention, MLP or recurrent layer, in training only (default: the model's)")
    p.add_argument("--attn-dropout", type=dropout_probability, default=None, metavar="P",
                   help="transformer: dropout probability of the attention weights, in training only "
                        "(default: the model's)")
    p.add_argument("--tie-weights", action=argparse.BooleanOptionalAction, default=None,
                   help="transformer: the output layer projects onto the token table, one tensor whose "
                        "gradients from both layers add (default: the model's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="floating-point type of the weights and activations (default float32)")


def closest(word: str, candidates) -> str:
    """'; did you mean X?' for the candidate nearest a misspelt `word`, or nothing when none is near."""
    close = difflib.get_close_matches(word, [str(c) for c in candidates], n=1)
    return f"; did you mean {close[0]}?" if close else ""


class ArgumentParser(argparse.ArgumentParser):
    """A bad flag is one line on stderr (`handgrad train: error: ...`), exit status 2, no usage block;
    it names the help of the command it was given to and suggests the nearest flag or choice."""

    def error(self, message: str):
        if int(os.environ.get("RANK", "0") or 0) > 0:  # every rank of a torchrun launch parses the same line:
            time.sleep(RANK_0_SAYS_S)  # rank 0 says what is wrong with it
            self.exit(2)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        # argparse hands a command's unknown flags up to the top-level parser, whose error would
        # name `handgrad --help`; the command's own parser reports them instead
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            owner = self.subcommand(getattr(parsed, "command", None)) or self
            first = next((u.partition("=")[0] for u in unknown if u.startswith("-")), None)
            options = [o for a in owner._actions for o in a.option_strings]
            owner.error(f"unrecognized arguments: {' '.join(unknown)}" + (closest(first, options) if first else ""))
        return parsed

    def subcommand(self, name: str | None) -> argparse.ArgumentParser | None:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                return action.choices.get(name)
        return None

    def _check_value(self, action, value):
        try:
            super()._check_value(action, value)
        except argparse.ArgumentError as e:
            raise argparse.ArgumentError(action, e.message + closest(str(value), action.choices)) from None


def given_options(argv: list[str]) -> set[str]:
    """The options the command line itself sets, as opposed to their defaults."""
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                for a in sub._actions:
                    a.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="handgrad",
        description="Train character-level language models with hand-written backward passes, "
                    "checked tensor by tensor against autograd.",
    )
    parser.add_argument("--version", action="version", version=f"handgrad {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("check", help="compare every manual gradient with autograd and finite differences")
    add_data_args(p)
    add_model_args(p)
    p.add_argument("--fused", action="store_true",
                   help="check the fused BatchNorm and cross-entropy (default: the stepwise chains, every intermediate)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="examples in the batch the check runs (default 32)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.add_argument("--fd-samples", type=nonnegative_int, default=8,
                   help="coordinates per parameter for the float64 finite-difference check (default 8; 0: skip)")
    p.add_argument("--pack", action=argparse.BooleanOptionalAction, default=None,
                   help="transformer: check a batch of items packed several to a row, as training runs them "
                        "(default: as the model's training does; the transformer packs)")

    p = sub.add_parser("train", help="train a model with hand-written gradients")
    add_data_args(p)
    add_model_args(p)
    p.add_argument("-o", "--out", default="out", help="run folder (default out)")
    p.add_argument("--steps", type=positive_int, default=None, help="optimization steps (default: the model's; mlp 10000)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="examples per step (default: the model's; mlp 32)")
    p.add_argument("--lr", type=positive_float, default=None, help="peak learning rate (default: the model's; mlp 1.0)")
    p.add_argument("--optimizer", choices=["sgd", "momentum", "adamw"], default=None,
                   help="sgd (the seed's), momentum (sgd with momentum) or adamw (default: the model's; mlp sgd)")
    p.add_argument("--schedule", choices=["step", "cosine"], default=None,
                   help="step: lr, then lr/10 from the halfway step (the seed's); cosine: warm-up, then a cosine "
                        "down to lr/100 (default: the model's; mlp step)")
    p.add_argument("--warmup", type=nonnegative_int, default=None, help="warm-up steps of the cosine schedule (default: the model's)")
    p.add_argument("--lr-floor", type=nonnegative_float, default=None, metavar="F",
                   help="where the cosine schedule ends, as a fraction of --lr (default: the model's; 0.01, the "
                        "transformer 0.1)")
    p.add_argument("--ema", type=nonnegative_float, default=None, metavar="DECAY",
                   help="keep a moving average of the weights (each step: average += (1 - DECAY) (weights - average)) "
                        "and evaluate, sample and save that rather than the last weights (default: the model's; "
                        "the transformer 0.999, others 0: none; not for models with BatchNorm)")
    p.add_argument("--weight-decay", type=nonnegative_float, default=None,
                   help="weight decay of the embedding and weight matrices (default: the model's; mlp 0)")
    p.add_argument("--momentum", type=nonnegative_float, default=None, help="momentum of --optimizer momentum (default 0.9)")
    p.add_argument("--trim", type=nonnegative_int, default=None, metavar="K",
                   help="sequence models: cut each batch to its longest item, rounded up to a multiple of K positions "
                        "(the padding cut predicts nothing; 0: every batch at the data's positions; default: the "
                        "model's; transformer 4 with --no-pack, the recurrent models 0)")
    p.add_argument("--pack", action=argparse.BooleanOptionalAction, default=None,
                   help="transformer: pack each batch's items several to a row of the data's positions, each item seeing only "
                        "itself (the same loss and gradients as one item a row, with no padding to compute; --no-pack: one "
                        "item a row) (default: the model's; transformer packs)")
    p.add_argument("--diagnostics", action="store_true",
                   help="at each evaluation, log tanh saturation and gradient-to-data ratios to metrics.jsonl and draw activations.png")
    p.add_argument("--eval-every", type=nonnegative_int, default=1000, help="steps between validation losses (default 1000; 0: only at the end)")
    p.add_argument("--log-every", type=positive_int, default=100, help="steps between logged train losses (default 100)")
    p.add_argument("--impl", choices=["auto", "eager", "replay", "compiled", "cudagraph"], default="auto",
                   help="how the manual step runs: eager (the layers' methods, call by call), replay (the eager "
                        "step's torch calls recorded at the first step and replayed without the Python between "
                        "them: the same results bit for bit), compiled (forward and backward traced from the same "
                        "layers and compiled; seconds to a minute to compile), cudagraph (GPU only: the eager step "
                        "recorded once as a CUDA graph and replayed), or auto: cudagraph on a GPU; on a CPU, compiled "
                        "on one thread when the run is long and its batches large enough to repay the compile, else "
                        "replay (default auto)")
    p.add_argument("--grad", choices=["manual", "autograd"], default="manual",
                   help="manual: the hand-written backward; autograd: the reference, to compare (default manual)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads (default: 1 for batches up to 256 rows, whose steps are many tiny ops, "
                        "otherwise torch's default; a transformer's rows are its items times their positions)")
    p.add_argument("--check-every", type=nonnegative_int, default=0,
                   help="compare manual and autograd gradients every N steps and stop on a mismatch (default 0: never)")
    p.add_argument("--no-check", action="store_true", help="skip the gradient check before the first step")
    p.add_argument("-n", "--num-samples", type=nonnegative_int, default=20, help="samples printed at the end (default 20)")
    p.add_argument("--save-every", type=nonnegative_int, default=1000,
                   help="steps between checkpoints of the whole training state (default 1000; 0: only at the end). "
                        "Ctrl-C also saves one, at the end of the current step")
    p.add_argument("--stop-at", type=nonnegative_int, default=0, metavar="STEP",
                   help="save the whole training state after STEP steps and stop, as if interrupted there; "
                        "the schedule still spans --steps, and --resume continues the same run (default 0: run to the end)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run saved in -o from its last checkpoint, exactly as if it had not stopped; "
                        "--steps N sets a new total (the learning-rate schedule then spans N steps); other settings are the saved run's")
    p.add_argument("--nproc", type=positive_int, default=1, metavar="N",
                   help="train in N processes on this machine, each on its share of every batch (--batch-size stays "
                        "the whole batch), as torchrun --standalone --nproc-per-node N -m handgrad train would (default 1)")
    p.add_argument("--reduce", choices=["once", "buckets"], default="once",
                   help="in a run of several processes, sum the gradients once after the backward, or in buckets "
                        "started as the layers finish (default once, the faster here: docs/parallel.md)")

    p = sub.add_parser("sample", help="print items sampled from a saved model")
    p.add_argument("-o", "--out", default="out", help="run folder holding the model (default out)")
    p.add_argument("-n", "--num-samples", type=nonnegative_int, default=20, help="items to print (default 20)")
    p.add_argument("--max-len", type=positive_int, default=None, metavar="N",
                   help="characters per item at most; an item still going at N is cut there, and stderr says how "
                        "many were (default: the longest item of the training data, from the model's file; "
                        f"{FALLBACK_MAX_LEN} for a model saved without it)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (default: random)")
    p.add_argument("--temperature", type=nonnegative_float, default=1.0, help="softmax temperature; 0 picks the most likely (default 1.0)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")

    p = sub.add_parser("eval", help="print the loss of a saved model on each split")
    p.add_argument("-o", "--out", default="out", help="run folder holding the model (default out)")
    p.add_argument("-i", "--data", metavar="FILE", default=None,
                   help="data file (default: the one the model was trained on)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")

    p = sub.add_parser("bench", help="training steps per second of the seed model (or --model M): autograd, compiled "
                                     "autograd, the manual backward and its fast paths, side by side")
    from .model import MODELS

    p.add_argument("--model", choices=sorted(MODELS), default="mlp",
                   help="model family, at its default sizes (default mlp, the seed's); other families also report "
                        "tokens/s and the bytes a training forward keeps, manual against autograd")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--threads", type=positive_int, default=1, help="CPU threads (default 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--batch-sizes", type=positive_int_list, default=None, metavar="N,N",
                   help="batch sizes, comma-separated (default 32,8192; for families other than the mlp, "
                        "their training batch and 1024; with --processes, 8192)")
    p.add_argument("--impls", type=name_list, default=None, metavar="NAME,NAME",
                   help="implementations, comma-separated (default autograd,autograd-compiled,manual,"
                        "manual-replay,manual-compiled, and manual-compiled-x32 below batch 1024; "
                        "manual-compiled-xK runs K steps per call)")
    p.add_argument("--rounds", type=positive_int, default=7, help="timed rounds, implementations taking turns (default 7)")
    p.add_argument("--seconds", type=positive_float, default=0.25,
                   help="seconds per implementation per round (default 0.25)")
    p.add_argument("-i", "--data", metavar="FILE", default=None, help="text file to draw batches from (default: built-in names)")
    p.add_argument("--pack", action=argparse.BooleanOptionalAction, default=None,
                   help="draw batches of items packed several to a row (default: as the model's training; the "
                        "transformer packs)")
    p.add_argument("--processes", type=positive_int_list, default=None, metavar="N,N",
                   help="instead: steps/s of data-parallel training in N processes (gloo, --threads each) against "
                        "one, the eager step (the gradients summed once and in buckets) and the compiled one; "
                        "--seconds per measurement (then default 2), --rounds (then default 3)")
    add_exercise_parser(sub)
    return parser


class ExerciseStepParser(ArgumentParser):
    """`exercise new|check|train`: a flag none of them knows is reported by the step's own parser, with the
    nearest of its flags (the top-level parser would only see `exercise`)."""

    def parse_known_args(self, args=None, namespace=None):
        parsed, unknown = super().parse_known_args(args, namespace)
        if unknown:
            first = next((u.partition("=")[0] for u in unknown if u.startswith("-")), None)
            options = [o for a in self._actions for o in a.option_strings]
            self.error(f"unrecognized arguments: {' '.join(unknown)}" + (closest(first, options) if first else ""))
        return parsed, unknown


def add_exercise_parser(sub) -> None:
    """`handgrad exercise new | check | train`: the learners' exercise (docs/exercise.md)."""
    from .exercise.levels import LEVEL_CHOICES

    p = sub.add_parser("exercise", help="the learners' exercise: derive every gradient by hand; handgrad finds "
                                        "the first wrong one and says why")
    steps = p.add_subparsers(dest="exercise_command", metavar="new|check|train", parser_class=ExerciseStepParser,
                             help="new: write the exercise files; check: judge a file's gradients; "
                                  "train: run a level-4 file's loop beside autograd's")
    steps.required = True
    q = steps.add_parser("new", help="write every level as a Python file and as a notebook")
    q.add_argument("dir", metavar="DIR", help="folder to write the files into (created if need be)")
    q.add_argument("--level", choices=list(LEVEL_CHOICES), default="all",
                   help="which level: 1 (both versions: 1-seed, with the seed notebook's names, and 1-fine), "
                        "2 (cross-entropy), 3 (BatchNorm), 4 (training loop), or all (default all)")
    q.add_argument("--solved", action="store_true", help="write the files filled in correctly (default: blanks to fill in)")
    q.add_argument("--force", action="store_true", help="overwrite exercise files already in DIR (default: refuse)")
    q = steps.add_parser("check", help="run a file's gradient cells on a fixed float64 batch and judge each one")
    q.add_argument("file", metavar="EXERCISE", help="the .py or .ipynb exercise file")
    q.add_argument("--json", action="store_true", help="print the report as JSON (default: a table)")
    q.add_argument("--time-limit", type=positive_float, default=60.0, metavar="SECONDS",
                   help="stop the learner's code after this many seconds (default 60)")
    q = steps.add_parser("train", help="run a level-4 file's loop beside the same loop on autograd's gradients")
    q.add_argument("file", metavar="EXERCISE", help="the .py or .ipynb level-4 exercise file")
    q.add_argument("--steps", type=positive_int, default=2000,
                   help="stop after this many steps, or at the end of the file's loop if sooner (default 2000)")
    q.add_argument("--log-every", type=positive_int, default=100,
                   help="steps between printed (and compared) losses (default 100)")
    q.add_argument("--plot", metavar="PNG", default=None,
                   help="where to write the PNG of both loss curves (default: beside the file, <name>-loss.png)")
    q.add_argument("--time-limit", type=positive_float, default=600.0, metavar="SECONDS",
                   help="stop the learner's loop after this many seconds (default 600)")


def cmd_check(args) -> int:
    from .data import check_batch, pack_batch
    from .gradcheck import check_model, finite_difference_check, format_table, passed
    from .model import ModelConfig, build_model
    from .train import DTYPES, TrainConfig, require_batch_statistics, resolve_device

    device = resolve_device(args.device)
    tc = TrainConfig(data=args.data, model=args.model, split=args.split, seed=args.seed, block_size=args.block_size,
                     n_embd=args.n_embd, n_hidden=args.n_hidden, n_layers=args.n_layers, n_heads=args.n_heads,
                     dropout=args.dropout, attn_dropout=args.attn_dropout, tie_weights=args.tie_weights,
                     pack=args.pack).resolved()
    ds = tc.dataset()
    mc = tc.model_config(len(ds.vocab), ds.block_size)
    mc = ModelConfig(**{**mc.to_dict(), "stepwise": not args.fused})
    model = build_model(mc, seed=args.seed, device=device, dtype=DTYPES[args.dtype])
    require_batch_statistics(model, args.batch_size)
    x, y = check_batch(ds, args.batch_size, args.seed)
    if tc.pack:
        x, y = pack_batch(x, y)
    x, y = x.to(device), y.to(device)
    results = check_model(model, x, y)
    if args.fd_samples:
        results += finite_difference_check(model, x, y, samples_per_param=args.fd_samples)
    ok = passed(results)
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=1))
    else:
        print(f"model {mc.model} ({'fused' if args.fused else 'stepwise'}), {args.dtype}, batch {args.batch_size}"
              f"{f' packed into {x.shape[0]} rows' if tc.pack else ''}, data {ds.source}")
        print(format_table(results))
        bad = sum(not r.close for r in results)
        print(f"{'PASS' if ok else 'FAIL'}: {len(results) - bad}/{len(results)} tensors match")
    return 0 if ok else 1


def without_option(argv: list[str], option: str) -> list[str]:
    """`argv` less `option` and its value (as `--opt V` or `--opt=V`)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == option:
            skip = True
        elif not a.startswith(option + "="):
            out.append(a)
    return out


def cmd_train(args) -> int:
    from pathlib import Path

    from . import parallel
    from .checkpoint import CHECKPOINT
    from .train import TrainConfig, resume_config, train

    cfg = TrainConfig(
        data=args.data, out=args.out, model=args.model, split=args.split, block_size=args.block_size,
        n_embd=args.n_embd, n_hidden=args.n_hidden, n_layers=args.n_layers, n_heads=args.n_heads, dropout=args.dropout,
        attn_dropout=args.attn_dropout, tie_weights=args.tie_weights,
        steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, eval_every=args.eval_every,
        optimizer=args.optimizer, schedule=args.schedule, warmup=args.warmup, lr_floor=args.lr_floor, ema=args.ema,
        weight_decay=args.weight_decay,
        trim=args.trim, pack=args.pack, momentum=args.momentum, diagnostics=args.diagnostics,
        log_every=args.log_every, grad=args.grad, impl=args.impl, check=not args.no_check, check_every=args.check_every,
        device=args.device, threads=args.threads, dtype=args.dtype, num_samples=args.num_samples,
        save_every=args.save_every, stop_at=args.stop_at, reduce=args.reduce,
    )
    if args.nproc > 1:
        if parallel.launched_world_size() > 1:
            raise HandgradError("--nproc starts the processes itself; under torchrun, leave it out")
        return parallel.launch(args.nproc, without_option(args.argv, "--nproc"))
    if not args.resume and parallel.restarted() and (Path(args.out) / CHECKPOINT).exists():
        args.resume = True  # the launcher restarted a failed run: continue it from its last checkpoint
        if parallel.launched_rank() == 0:
            print(f"restarted by the launcher: resuming the run in {args.out} from its last checkpoint", file=sys.stderr)
    if args.resume:
        given = {"check" if d == "no_check" else d for d in given_options(args.argv)}
        cfg, ckpt = resume_config(args.out, {k: getattr(cfg, k) for k in given if hasattr(cfg, k)})
        train(cfg, resume=ckpt)
    else:
        train(cfg)
    parallel.leave()
    return 0


def cmd_sample(args) -> int:
    from .checkpoint import load_model
    from .sample import sample_items
    from .train import resolve_device

    device = resolve_device(args.device)
    model, vocab, meta = load_model(args.out, device=device)
    saved_max = meta.get("max_item_len")
    max_len = args.max_len or (saved_max if type(saved_max) is int and saved_max > 0 else FALLBACK_MAX_LEN)
    items, cut = sample_items(model, vocab, args.num_samples, temperature=args.temperature, seed=args.seed,
                              max_len=max_len, device=device)
    for s in items:
        print(s)
    if cut:
        print(f"handgrad: note: {cut} of {len(items)} samples reached --max-len {max_len} without ending",
              file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    from .checkpoint import load_model
    from .data import BUILTIN_NAME, SPLITS, make_model_data
    from .train import evaluate, resolve_device

    device = resolve_device(args.device)
    model, vocab, meta = load_model(args.out, device=device)
    saved = meta.get("data") or {}  # the data the model was trained on, as its file's header says
    data = args.data if args.data is not None else (None if saved.get("source") in (None, BUILTIN_NAME) else saved["source"])
    ds = make_model_data(model.sequences, data, model.config.block_size, saved.get("split", "words"),
                         saved.get("seed", 42), vocab)
    for s in SPLITS:  # the predictions the loss counts: examples, or every character and end of the items
        print(f"{s:<5} {evaluate(model, ds.X[s].to(device), ds.Y[s].to(device)):.4f}  ({ds.targets()[s]:,} "
              f"{'predictions' if ds.sequences else 'examples'})")
    return 0


def cmd_bench(args) -> int:
    from .bench import BenchConfig, default_batch_sizes, format_table, run_bench

    if args.processes:
        return cmd_bench_processes(args)
    cfg = BenchConfig(batch_sizes=tuple(args.batch_sizes or default_batch_sizes(args.model)), impls=args.impls or None,
                      threads=args.threads, device=args.device, rounds=args.rounds, seconds=args.seconds, data=args.data,
                      model=args.model, pack=args.pack)
    report = run_bench(cfg)
    print(json.dumps(report, indent=1) if args.json else format_table(report))
    return 0


def cmd_bench_processes(args) -> int:
    from .parallel_bench import ParallelBenchConfig, format_parallel_table, run_parallel_bench

    if args.device != "cpu":
        raise HandgradError("bench --processes measures gloo on a CPU; on GPUs, time handgrad train under torchrun")
    given = given_options(args.argv)
    reports = []
    for batch in args.batch_sizes or (8192,):
        cfg = ParallelBenchConfig(processes=tuple(args.processes), batch_size=batch, model=args.model,
                                  threads=args.threads, data=args.data,
                                  rounds=args.rounds if "rounds" in given else 3,
                                  seconds=args.seconds if "seconds" in given else 2.0)
        reports.append(run_parallel_bench(cfg, log=lambda s: print(s, file=sys.stderr, flush=True)))
    if args.json:
        print(json.dumps(reports[0] if len(reports) == 1 else reports, indent=1))
    else:
        print("\n\n".join(format_parallel_table(r) for r in reports))
    return 0


def cmd_exercise(args) -> int:
    from .exercise import commands

    if args.exercise_command == "new":
        return commands.new(args.dir, args.level, args.solved, args.force)
    if args.exercise_command == "check":
        return commands.check(args.file, args.json, args.time_limit)
    return commands.train(args.file, args.steps, args.log_every, args.plot, args.time_limit)


COMMANDS = {"check": cmd_check, "train": cmd_train, "sample": cmd_sample, "eval": cmd_eval, "bench": cmd_bench,
            "exercise": cmd_exercise}


class OutputThatOutlivesItsReader:
    """sys.stdout or sys.stderr for one command. When its reader goes away (`handgrad train | head -2`),
    what is written from then on is discarded and the command carries on: a run still trains and saves."""

    def __init__(self, stream):
        self.stream = stream
        self.discarding = False

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self.discard()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            self.discard()

    def discard(self) -> None:
        # the file descriptor too: the interpreter flushes the original stream once more at exit,
        # and on the closed pipe that flush would fail and print a warning
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self.stream.fileno())
        except (AttributeError, OSError, ValueError):
            pass  # a stream with no descriptor of its own
        finally:
            os.close(devnull)
        self.stream = open(os.devnull, "w", encoding="utf-8")
        self.discarding = True

    def release(self) -> None:
        """Close the stand-in for a gone reader; the real streams stay open, the interpreter's."""
        if self.discarding:
            self.stream.close()

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def output_that_outlives_its_reader():
    """sys.stdout and sys.stderr guarded while a command runs, then put back as they were."""
    streams = sys.stdout, sys.stderr
    guards = [OutputThatOutlivesItsReader(s) if s is not None else None for s in streams]
    sys.stdout, sys.stderr = guards
    try:
        yield
    finally:
        for guard in guards:
            if guard is not None:
                guard.flush()  # within the guard: what print() left buffered meets the gone reader here
                guard.release()
        sys.stdout, sys.stderr = streams


RANK_0_SAYS_S = 3.0


def said_by_another_rank(error: Exception) -> bool:
    """In a run of several processes, rank 0 says the errors every rank meets alike (the same settings,
    data and state); another rank says only its own (parallel.RankError)."""
    if "handgrad.parallel" not in sys.modules:
        return False
    from . import parallel

    return parallel.rank() > 0 and not isinstance(error, parallel.RankError)


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()
    with output_that_outlives_its_reader():
        parser = build_parser()
        args = parser.parse_args(argv)
        args.argv = sys.argv[1:] if argv is None else list(argv)
        try:
            return COMMANDS[args.command](args)
        except HandgradError as e:
            if said_by_another_rank(e):
                time.sleep(RANK_0_SAYS_S)  # rank 0 meets the same error: give it time to say it before the launcher
                return 1  # stops the rest (it stops every rank once one has ended)
            print(f"handgrad: error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            if not said_by_another_rank(KeyboardInterrupt()):
                print("handgrad: interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
