"""Every bad input gets one line on stderr, a non-zero exit, no traceback, and leaves a
previously saved model byte-for-byte as it was. Data that is merely unusual trains."""
import json
import shutil

import pytest
from cli_run import QUICK, assert_one_line_error, run_cli, snapshot
from safetensors.torch import save as st_save

from handgrad import checkpoint

ARGPARSE = 2  # a bad flag
REFUSED = 1  # a bad file, folder or combination


@pytest.fixture
def run(saved_run, tmp_path):
    """A copy of a finished run, for a test to aim bad commands at."""
    return shutil.copytree(saved_run, tmp_path / "run")


def write(path, data: bytes):
    path.write_bytes(data)
    return path


def rewrite_header(path, fmt, change):
    """Re-save a safetensors file with its handgrad metadata changed, the tensors as they were."""
    tensors, metadata = checkpoint.read_safetensors(path)
    meta = json.loads(metadata[checkpoint.HEADER_KEY])
    change(meta)
    path.write_bytes(st_save(tensors, {"format": fmt, checkpoint.HEADER_KEY: json.dumps(meta)}))


def truncate(path, keep: float):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def poison(path, name, value=float("nan")):
    """Re-save a safetensors file with one number of tensor `name` set to `value`, the header as it was."""
    tensors, metadata = checkpoint.read_safetensors(path)
    tensors[name].view(-1)[0] = value
    path.write_bytes(st_save(tensors, metadata))


def smaller_hidden(meta):
    (meta["model_config"] if "model_config" in meta else meta["config"])["n_hidden"] = 100


# (id, how to make the bad input in tmp_path / run, the command, exit status, words the message must hold)
CASES = [
    ("missing-file", None, ["train", "-i", "{tmp}/absent.txt"], REFUSED, ["data file not found", "absent.txt"]),
    ("data-is-a-folder", None, ["train", "-i", "{tmp}"], REFUSED, ["is a directory"]),
    ("empty-file", lambda t, r: write(t / "d.txt", b""), ["train", "-i", "{tmp}/d.txt"], REFUSED, ["is empty"]),
    ("blank-lines-only", lambda t, r: write(t / "d.txt", b"\n  \r\n\t\n\n"), ["train", "-i", "{tmp}/d.txt"], REFUSED,
     ["only blank lines"]),
    ("not-utf8", lambda t, r: write(t / "d.txt", b"anna\r\nbob\r\n\xff\xfeoops\r\ncarl\r\n"),
     ["train", "-i", "{tmp}/d.txt"], REFUSED, ["line 3", "not valid UTF-8"]),
    ("too-few-items", lambda t, r: write(t / "d.txt", b"ann\nbob\ncy\n"), ["train", "-i", "{tmp}/d.txt"], REFUSED,
     ["too few items", "3 distinct"]),
    ("too-few-examples", lambda t, r: write(t / "d.txt", b"ab\n"), ["train", "-i", "{tmp}/d.txt", "--split", "examples"],
     REFUSED, ["too few examples"]),
    ("steps-zero", None, ["train", "--steps", "0"], ARGPARSE, ["--steps", "must be positive"]),
    ("steps-negative", None, ["train", "--steps", "-5"], ARGPARSE, ["--steps", "must be positive"]),
    ("steps-not-a-number", None, ["train", "--steps", "many"], ARGPARSE, ["--steps", "expected a whole number"]),
    ("steps-fraction", None, ["train", "--steps", "2.5"], ARGPARSE, ["--steps", "expected a whole number"]),
    ("batch-size-zero", None, ["train", "--batch-size", "0"], ARGPARSE, ["--batch-size", "must be positive"]),
    ("batch-size-one-with-batchnorm", None, ["train", "--batch-size", "1"], REFUSED,
     ["--batch-size 1", "BatchNorm", "variance", "undefined"]),
    ("lr-nan", None, ["train", "--lr", "nan"], ARGPARSE, ["--lr", "finite"]),
    ("lr-negative", None, ["train", "--lr", "-0.1"], ARGPARSE, ["--lr", ">= 0"]),
    ("block-size-zero", None, ["train", "--block-size", "0"], ARGPARSE, ["--block-size", "must be positive"]),
    ("unknown-split", None, ["train", "--split", "letters"], ARGPARSE, ["--split", "invalid choice", "'letters'"]),
    ("unknown-device", None, ["train", "--device", "tpu"], REFUSED, ["unknown device 'tpu'"]),
    ("unknown-device-sample", None, ["sample", "--device", "gpu0"], REFUSED, ["unknown device 'gpu0'"]),
    ("output-is-a-file", lambda t, r: write(t / "f", b"keep me"), ["train", "-o", "{tmp}/f", "--steps", "5"], REFUSED,
     ["not a folder"]),
    ("sample-output-is-a-file", lambda t, r: write(t / "f", b"keep me"), ["sample", "-o", "{tmp}/f"], REFUSED,
     ["is a file, not a run folder"]),
    ("sample-no-model", lambda t, r: (t / "empty").mkdir(), ["sample", "-o", "{tmp}/empty"], REFUSED, ["no saved model"]),
    ("eval-no-model", lambda t, r: (t / "empty").mkdir(), ["eval", "-o", "{tmp}/empty"], REFUSED, ["no saved model"]),
    ("sample-no-folder", None, ["sample", "-o", "{tmp}/nowhere"], REFUSED, ["no such run folder"]),
    ("model-truncated", lambda t, r: truncate(r / checkpoint.MODEL_WEIGHTS, 0.5), ["sample"], REFUSED,
     ["model.safetensors", "not a valid safetensors file", "truncated or corrupt"]),
    ("model-truncated-in-header", lambda t, r: truncate(r / checkpoint.MODEL_WEIGHTS, 0.001), ["eval"], REFUSED,
     ["not a valid safetensors file"]),
    ("model-empty", lambda t, r: write(r / checkpoint.MODEL_WEIGHTS, b""), ["sample"], REFUSED,
     ["not a valid safetensors file"]),
    ("model-corrupt", lambda t, r: write(r / checkpoint.MODEL_WEIGHTS, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" + bytes(64)),
     ["eval"], REFUSED, ["not a valid safetensors file"]),
    ("model-header-not-ours", lambda t, r: write(r / checkpoint.MODEL_WEIGHTS, st_save(checkpoint.read_safetensors(r / checkpoint.MODEL_WEIGHTS)[0])),
     ["sample"], REFUSED, ["not a handgrad-model file"]),
    ("model-config-disagrees-with-weights",
     lambda t, r: rewrite_header(r / checkpoint.MODEL_WEIGHTS, checkpoint.MODEL_FORMAT, smaller_hidden),
     ["sample"], REFUSED, ["weights do not match the model config", "(30, 200)", "(30, 100)"]),
    ("model-config-nonsense",
     lambda t, r: rewrite_header(r / checkpoint.MODEL_WEIGHTS, checkpoint.MODEL_FORMAT, lambda m: m["config"].update(n_embd=-3)),
     ["eval"], REFUSED, ["model config is malformed", "n_embd"]),
    ("checkpoint-truncated", lambda t, r: truncate(r / checkpoint.CHECKPOINT, 0.7), ["train", "--resume", "--steps", "40"],
     REFUSED, ["checkpoint.safetensors", "not a valid safetensors file"]),
    ("checkpoint-corrupt", lambda t, r: write(r / checkpoint.CHECKPOINT, b"\xff" * 100), ["train", "--resume", "--steps", "40"],
     REFUSED, ["checkpoint.safetensors", "not a valid safetensors file"]),
    ("checkpoint-config-disagrees-with-weights",
     lambda t, r: rewrite_header(r / checkpoint.CHECKPOINT, checkpoint.CHECKPOINT_FORMAT, smaller_hidden),
     ["train", "--resume", "--steps", "40"], REFUSED, ["checkpoint.safetensors", "model config", "disagrees"]),
    ("checkpoint-weights-disagree-with-config",
     lambda t, r: rewrite_header(r / checkpoint.CHECKPOINT, checkpoint.CHECKPOINT_FORMAT,
                                 lambda m: (smaller_hidden(m), m["config"].update(n_hidden=100))),
     ["train", "--resume", "--steps", "40"], REFUSED, ["checkpoint.safetensors", "weights do not match the model config"]),
    ("checkpoint-rng-malformed",
     lambda t, r: rewrite_header(r / checkpoint.CHECKPOINT, checkpoint.CHECKPOINT_FORMAT, lambda m: m.update(python_random=[3, [1], None])),
     ["train", "--resume", "--steps", "40"], REFUSED, ["random-number-generator state"]),
    ("cudagraph-on-cpu", None, ["train", "--impl", "cudagraph", "-o", "{tmp}/new"], REFUSED,
     ["--impl cudagraph", "--device cuda"]),
    ("compiled-with-autograd", None, ["train", "--impl", "compiled", "--grad", "autograd", "-o", "{tmp}/new"], REFUSED,
     ["--impl compiled", "--grad autograd"]),
    ("model-nan-sample", lambda t, r: poison(r / checkpoint.MODEL_WEIGHTS, "batchnorm1.running_var"), ["sample"],
     REFUSED, ["model.safetensors holds non-finite values in batchnorm1.running_var", "diverged"]),
    ("model-nan-eval", lambda t, r: poison(r / checkpoint.MODEL_WEIGHTS, "batchnorm1.running_var"), ["eval"],
     REFUSED, ["model.safetensors holds non-finite values in batchnorm1.running_var", "diverged"]),
    ("model-inf-eval", lambda t, r: poison(r / checkpoint.MODEL_WEIGHTS, "linear1.weight", float("-inf")), ["eval"],
     REFUSED, ["model.safetensors holds non-finite values in linear1.weight"]),
    ("checkpoint-nan-resume", lambda t, r: poison(r / checkpoint.CHECKPOINT, "model.linear2.bias"),
     ["train", "--resume", "--steps", "40"], REFUSED,
     ["checkpoint.safetensors holds non-finite values in model.linear2.bias", "cannot be continued"]),
    ("sample-count-negative", None, ["sample", "-n", "-2"], ARGPARSE, ["--num-samples", "must not be negative"]),
    ("train-sample-count-negative", None, ["train", "-n", "-2"], ARGPARSE, ["--num-samples", "must not be negative"]),
    ("temperature-negative", None, ["sample", "--temperature", "-0.5"], ARGPARSE, ["--temperature", ">= 0"]),
    ("temperature-nan", None, ["sample", "--temperature", "nan"], ARGPARSE, ["--temperature", "finite"]),
]


@pytest.mark.parametrize("make, argv, status, needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_touches_nothing(run, tmp_path, capsys, make, argv, status, needles):
    if make is not None:
        make(tmp_path, run)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "-o" not in argv:  # a fresh run into a new folder (a used one is refused first); the others at the saved run
        argv += ["-o", str(tmp_path / "new") if argv[0] == "train" and "--resume" not in argv else str(run)]
    before_run, before_tmp = snapshot(run), snapshot(tmp_path)
    rc, _, err = run_cli(argv, capsys)
    assert rc == status
    assert_one_line_error(rc, err, *needles)
    assert snapshot(run) == before_run  # the saved model, byte for byte, and no leftovers
    assert snapshot(tmp_path) == before_tmp


def test_cuda_without_a_gpu(run, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    before = snapshot(run)
    rc, _, err = run_cli(["train", "-o", run, "--device", "cuda", "--resume", "--steps", "40"], capsys)
    assert_one_line_error(rc, err, "no CUDA GPU")
    assert snapshot(run) == before


def test_unusual_but_fine_data_trains(tmp_path, capsys):
    """CRLF endings, accents and other scripts, items containing '.', and a very long line."""
    long_item = "ab" * 10_000 + "é"
    items = ["zoë", "josé", "łukasz", "søren", "dvořák", "Ἀθηνᾶ", "日本", "мария", "j.r.r.", "st. john", "o'neil",
             "mary-ann", "a.b", long_item]
    data = tmp_path / "names.txt"
    data.write_bytes(("\r\n".join(items) + "\r\n").encode("utf-8"))
    out = tmp_path / "run"
    rc, stdout, err = run_cli(["train", "-i", data, "-o", out, "--steps", 30, "--batch-size", 8, *QUICK], capsys)
    assert rc == 0, err
    meta = json.loads((out / checkpoint.MODEL_META).read_text(encoding="utf-8"))
    vocab = set(meta["vocab"])
    assert {".", "ë", "Ἀ", "日", "м", "'", "-", " "} <= vocab and "\r" not in vocab
    assert f"{len(items)} distinct items" in stdout
    rc, stdout, err = run_cli(["sample", "-o", out, "-n", 5, "--seed", 1], capsys)
    assert rc == 0, err
    assert len(stdout.splitlines()) == 5
    rc, stdout, err = run_cli(["eval", "-o", out], capsys)  # finds the data from the model's own header
    assert rc == 0, err
    assert stdout.startswith("train")


def test_argparse_errors_are_one_line(capsys):
    rc, _, err = run_cli(["train", "--no-such-flag"], capsys)
    assert_one_line_error(rc, err, "unrecognized arguments: --no-such-flag", "--help")
    rc, _, err = run_cli(["fly"], capsys)
    assert_one_line_error(rc, err, "invalid choice: 'fly'")
