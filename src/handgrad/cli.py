"""The `handgrad` command: check, train, sample, eval, bench."""
from __future__ import annotations

import argparse
import json
import math
import sys

from . import __version__
from .allocator import keep_freed_memory
from .errors import HandgradError


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
                   help="split 80/10/10 by words (default) or by examples (the seed notebook's)")
    p.add_argument("--seed", type=int, default=42, help="seed for the shuffle, the init and the batches (default 42)")


def add_model_args(p: argparse.ArgumentParser) -> None:
    from .model import MODELS

    p.add_argument("--model", choices=sorted(MODELS), default="mlp", help="model family (default mlp, the seed's)")
    p.add_argument("--block-size", type=positive_int, default=None, help="context length (default: the model's)")
    p.add_argument("--n-embd", type=positive_int, default=None, help="embedding size (default: the model's)")
    p.add_argument("--n-hidden", type=positive_int, default=None, help="hidden width (default: the model's)")
    p.add_argument("--n-layers", type=positive_int, default=None, help="hidden layers, where the model has several")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")


class ArgumentParser(argparse.ArgumentParser):
    """A bad flag is one line on stderr (`handgrad train: error: ...`), exit status 2, no usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.add_argument("--fd-samples", type=nonnegative_int, default=8,
                   help="coordinates per parameter for the float64 finite-difference check (0: skip)")

    p = sub.add_parser("train", help="train a model with hand-written gradients")
    add_data_args(p)
    add_model_args(p)
    p.add_argument("-o", "--out", default="out", help="run folder (default out)")
    p.add_argument("--steps", type=positive_int, default=None, help="optimization steps (default: the model's; mlp 10000)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="examples per step (default: the model's; mlp 32)")
    p.add_argument("--lr", type=nonnegative_float, default=None, help="peak learning rate (default: the model's; mlp 1.0)")
    p.add_argument("--optimizer", choices=["sgd", "momentum", "adamw"], default=None,
                   help="sgd (the seed's), momentum (sgd with momentum) or adamw (default: the model's; mlp sgd)")
    p.add_argument("--schedule", choices=["step", "cosine"], default=None,
                   help="step: lr, then lr/10 from the halfway step (the seed's); cosine: warm-up, then a cosine "
                        "down to lr/100 (default: the model's; mlp step)")
    p.add_argument("--warmup", type=nonnegative_int, default=None, help="warm-up steps of the cosine schedule (default: the model's)")
    p.add_argument("--weight-decay", type=nonnegative_float, default=None,
                   help="weight decay of the embedding and weight matrices (default: the model's; mlp 0)")
    p.add_argument("--momentum", type=nonnegative_float, default=0.9, help="momentum of --optimizer momentum (default 0.9)")
    p.add_argument("--diagnostics", action="store_true",
                   help="at each evaluation, log tanh saturation and gradient-to-data ratios to metrics.jsonl and draw activations.png")
    p.add_argument("--eval-every", type=nonnegative_int, default=1000, help="steps between validation losses (0: only at the end)")
    p.add_argument("--log-every", type=positive_int, default=100, help="steps between logged train losses (default 100)")
    p.add_argument("--impl", choices=["auto", "eager", "replay", "compiled", "cudagraph"], default="auto",
                   help="how the manual step runs: eager (the layers' methods, call by call), replay (the eager "
                        "step's torch calls recorded at the first step and replayed without the Python between "
                        "them: the same results bit for bit), compiled (forward and backward traced from the same "
                        "layers and compiled; seconds to a minute to compile), cudagraph (GPU only: the eager step "
                        "recorded once as a CUDA graph and replayed), or auto: cudagraph on a GPU; on a CPU, compiled "
                        "on one thread when the run is long and its batches large enough to repay the compile, else "
                        "replay (default)")
    p.add_argument("--grad", choices=["manual", "autograd"], default="manual",
                   help="manual: the hand-written backward (default); autograd: the reference, to compare")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads (default: 1 for batches up to 256, whose steps are many tiny ops; "
                        "otherwise torch's default)")
    p.add_argument("--check-every", type=nonnegative_int, default=0,
                   help="compare manual and autograd gradients every N steps and stop on a mismatch (0: never)")
    p.add_argument("--no-check", action="store_true", help="skip the gradient check before the first step")
    p.add_argument("-n", "--num-samples", type=nonnegative_int, default=20, help="samples printed at the end (default 20)")
    p.add_argument("--save-every", type=nonnegative_int, default=1000,
                   help="steps between checkpoints of the whole training state (default 1000; 0: only at the end). "
                        "Ctrl-C also saves one, at the end of the current step")
    p.add_argument("--stop-at", type=nonnegative_int, default=0, metavar="STEP",
                   help="save the whole training state after STEP steps and stop, as if interrupted there; "
                        "the schedule still spans --steps, and --resume continues the same run (0: run to the end)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run saved in -o from its last checkpoint, exactly as if it had not stopped; "
                        "--steps N sets a new total (the learning-rate schedule then spans N steps); other settings are the saved run's")

    p = sub.add_parser("sample", help="print items sampled from a saved model")
    p.add_argument("-o", "--out", default="out", help="run folder holding the model (default out)")
    p.add_argument("-n", "--num-samples", type=nonnegative_int, default=20)
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (default: random)")
    p.add_argument("--temperature", type=nonnegative_float, default=1.0, help="softmax temperature; 0 picks the most likely (default 1.0)")
    p.add_argument("--device", default="cpu")

    p = sub.add_parser("eval", help="print the loss of a saved model on each split")
    p.add_argument("-o", "--out", default="out", help="run folder holding the model (default out)")
    p.add_argument("-i", "--data", metavar="FILE", default=None,
                   help="data file (default: the one the model was trained on)")
    p.add_argument("--device", default="cpu")

    p = sub.add_parser("bench", help="training steps per second of the seed model: autograd, compiled autograd, "
                                     "the manual backward and its fast paths, side by side")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--threads", type=positive_int, default=1, help="CPU threads (default 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--batch-sizes", type=positive_int_list, default=[32, 8192], metavar="N,N",
                   help="batch sizes, comma-separated (default 32,8192)")
    p.add_argument("--impls", type=name_list, default=None, metavar="NAME,NAME",
                   help="implementations, comma-separated (default autograd,autograd-compiled,manual,"
                        "manual-replay,manual-compiled, and manual-compiled-x32 below batch 1024; "
                        "manual-compiled-xK runs K steps per call)")
    p.add_argument("--rounds", type=positive_int, default=7, help="timed rounds, implementations taking turns (default 7)")
    p.add_argument("--seconds", type=positive_float, default=0.25,
                   help="seconds per implementation per round (default 0.25)")
    p.add_argument("-i", "--data", metavar="FILE", default=None, help="text file to draw batches from (default: built-in names)")
    return parser


def cmd_check(args) -> int:
    import torch

    from .data import make_dataset
    from .gradcheck import check_model, finite_difference_check, format_table, passed
    from .model import ModelConfig, build_model
    from .train import DTYPES, TrainConfig, require_batch_statistics, resolve_device

    device = resolve_device(args.device)
    tc = TrainConfig(model=args.model, block_size=args.block_size, n_embd=args.n_embd,
                     n_hidden=args.n_hidden, n_layers=args.n_layers)
    block = tc.model_config(0).block_size
    ds = make_dataset(args.data, block_size=block, split=args.split, seed=args.seed)
    mc = tc.model_config(len(ds.vocab))
    mc = ModelConfig(**{**mc.to_dict(), "stepwise": not args.fused})
    model = build_model(mc, seed=args.seed, device=device, dtype=DTYPES[args.dtype])
    require_batch_statistics(model, args.batch_size)
    gen = torch.Generator().manual_seed(args.seed)
    n = ds.sizes()["train"]
    idx = torch.randint(0, n, (args.batch_size,), generator=gen)
    x, y = ds.X["train"][idx].to(device), ds.Y["train"][idx].to(device)
    results = check_model(model, x, y)
    if args.fd_samples:
        results += finite_difference_check(model, x, y, samples_per_param=args.fd_samples)
    ok = passed(results)
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=1))
    else:
        print(f"model {mc.model} ({'fused' if args.fused else 'stepwise'}), {args.dtype}, batch {args.batch_size}, data {ds.source}")
        print(format_table(results))
        bad = sum(not r.close for r in results)
        print(f"{'PASS' if ok else 'FAIL'}: {len(results) - bad}/{len(results)} tensors match")
    return 0 if ok else 1


def cmd_train(args) -> int:
    from .train import TrainConfig, resume_config, train

    cfg = TrainConfig(
        data=args.data, out=args.out, model=args.model, split=args.split, block_size=args.block_size,
        n_embd=args.n_embd, n_hidden=args.n_hidden, n_layers=args.n_layers, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, eval_every=args.eval_every,
        optimizer=args.optimizer, schedule=args.schedule, warmup=args.warmup, weight_decay=args.weight_decay,
        momentum=args.momentum, diagnostics=args.diagnostics,
        log_every=args.log_every, grad=args.grad, impl=args.impl, check=not args.no_check, check_every=args.check_every,
        device=args.device, threads=args.threads, dtype=args.dtype, num_samples=args.num_samples,
        save_every=args.save_every, stop_at=args.stop_at,
    )
    if args.resume:
        given = {"check" if d == "no_check" else d for d in given_options(args.argv)}
        cfg, ckpt = resume_config(args.out, {k: getattr(cfg, k) for k in given if hasattr(cfg, k)})
        train(cfg, resume=ckpt)
    else:
        train(cfg)
    return 0


def cmd_sample(args) -> int:
    from .checkpoint import load_model
    from .sample import generate
    from .train import resolve_device

    device = resolve_device(args.device)
    model, vocab, _ = load_model(args.out, device=device)
    for s in generate(model, vocab, args.num_samples, temperature=args.temperature, seed=args.seed, device=device):
        print(s)
    return 0


def cmd_eval(args) -> int:
    from .checkpoint import load_model
    from .data import BUILTIN_NAME, SPLITS, make_dataset
    from .train import evaluate, resolve_device

    device = resolve_device(args.device)
    model, vocab, meta = load_model(args.out, device=device)
    saved = meta.get("data") or {}  # the data the model was trained on, as its file's header says
    data = args.data if args.data is not None else (None if saved.get("source") in (None, BUILTIN_NAME) else saved["source"])
    ds = make_dataset(data, block_size=model.config.block_size, split=saved.get("split", "words"),
                      seed=saved.get("seed", 42), vocab=vocab)
    for s in SPLITS:
        print(f"{s:<5} {evaluate(model, ds.X[s].to(device), ds.Y[s].to(device)):.4f}  ({ds.sizes()[s]:,} examples)")
    return 0


def cmd_bench(args) -> int:
    from .bench import BenchConfig, format_table, run_bench

    cfg = BenchConfig(batch_sizes=tuple(args.batch_sizes), impls=args.impls or None, threads=args.threads,
                      device=args.device, rounds=args.rounds, seconds=args.seconds, data=args.data)
    report = run_bench(cfg)
    print(json.dumps(report, indent=1) if args.json else format_table(report))
    return 0


COMMANDS = {"check": cmd_check, "train": cmd_train, "sample": cmd_sample, "eval": cmd_eval, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return COMMANDS[args.command](args)
    except HandgradError as e:
        print(f"handgrad: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("handgrad: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
