"""The `handgrad` command: check, train, sample, eval, bench."""
from __future__ import annotations

import argparse
import json
import math
import sys

from . import __version__
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    p.add_argument("--steps", type=positive_int, default=10_000, help="optimization steps (default 10000)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="examples per step (default 32)")
    p.add_argument("--lr", type=nonnegative_float, default=1.0, help="learning rate; lr/10 from the halfway step (default 1.0)")
    p.add_argument("--eval-every", type=nonnegative_int, default=1000, help="steps between validation losses (0: only at the end)")
    p.add_argument("--log-every", type=positive_int, default=100, help="steps between logged train losses (default 100)")
    p.add_argument("--grad", choices=["manual", "autograd"], default="manual",
                   help="manual: the hand-written backward (default); autograd: the reference, to compare")
    p.add_argument("--check-every", type=nonnegative_int, default=0,
                   help="compare manual and autograd gradients every N steps and stop on a mismatch (0: never)")
    p.add_argument("--no-check", action="store_true", help="skip the gradient check before the first step")
    p.add_argument("-n", "--num-samples", type=nonnegative_int, default=20, help="samples printed at the end (default 20)")

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
    return parser


def cmd_check(args) -> int:
    import torch

    from .data import make_dataset
    from .gradcheck import check_model, finite_difference_check, format_table, passed
    from .model import ModelConfig, build_model
    from .train import DTYPES, TrainConfig, resolve_device

    device = resolve_device(args.device)
    tc = TrainConfig(model=args.model, block_size=args.block_size, n_embd=args.n_embd,
                     n_hidden=args.n_hidden, n_layers=args.n_layers)
    block = tc.model_config(0).block_size
    ds = make_dataset(args.data, block_size=block, split=args.split, seed=args.seed)
    mc = tc.model_config(len(ds.vocab))
    mc = ModelConfig(**{**mc.to_dict(), "stepwise": not args.fused})
    model = build_model(mc, seed=args.seed, device=device, dtype=DTYPES[args.dtype])
    gen = torch.Generator().manual_seed(args.seed)
    n = ds.sizes()["train"]
    idx = torch.randint(0, n, (args.batch_size,), generator=gen)
    x, y = ds.X["train"][idx].to(device), ds.Y["train"][idx].to(device)
    results = check_model(model, x, y)
    if args.fd_samples:
        results += finite_difference_check(model, x.cpu(), y.cpu(), samples_per_param=args.fd_samples) if device.type == "cpu" \
            else finite_difference_check(model, x, y, samples_per_param=args.fd_samples)
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
    from .train import TrainConfig, train

    cfg = TrainConfig(
        data=args.data, out=args.out, model=args.model, split=args.split, block_size=args.block_size,
        n_embd=args.n_embd, n_hidden=args.n_hidden, n_layers=args.n_layers, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, eval_every=args.eval_every,
        log_every=args.log_every, grad=args.grad, check=not args.no_check, check_every=args.check_every,
        device=args.device, dtype=args.dtype, num_samples=args.num_samples,
    )
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
    from .checkpoint import load_json, load_model
    from .data import BUILTIN_NAME, SPLITS, make_dataset
    from .train import evaluate, resolve_device
    from pathlib import Path

    device = resolve_device(args.device)
    model, vocab, _ = load_model(args.out, device=device)
    run = load_json(Path(args.out) / "run.json") if (Path(args.out) / "run.json").exists() else {}
    cfg = run.get("config", {})
    data = args.data if args.data is not None else (None if cfg.get("data") in (None, BUILTIN_NAME) else cfg["data"])
    ds = make_dataset(data, block_size=model.config.block_size, split=cfg.get("split", "words"),
                      seed=cfg.get("seed", 42), vocab=vocab)
    for s in SPLITS:
        print(f"{s:<5} {evaluate(model, ds.X[s].to(device), ds.Y[s].to(device)):.4f}  ({ds.sizes()[s]:,} examples)")
    return 0


COMMANDS = {"check": cmd_check, "train": cmd_train, "sample": cmd_sample, "eval": cmd_eval}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
