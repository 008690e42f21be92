#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go: the GPU tests, the gradient check, manual against
# autograd training, and the benchmark, all with --device cuda. Each step's output goes to OUTDIR;
# a step that fails is reported and the next one still runs.
#
#   usage: scripts/gpu_check.sh OUTDIR [DATA]     (DATA: a words file; default the built-in names)
#
# Run from the repository root with handgrad importable (installed, or PYTHONPATH=src).
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUTDIR [DATA]}
data=(); [ -n "${2:-}" ] && data=(-i "$2")
mkdir -p "$out"
py=${PYTHON:-python3}
status=0
step() {  # step NAME COMMAND...: run, keep the output, note the exit status
    local name=$1; shift
    echo "== $name: $*"
    local t0=$SECONDS
    "$@" >"$out/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$out/$name.log"
    echo "== $name: exit $rc in $((SECONDS - t0)) s"
    [ $rc -eq 0 ] || status=1
}
hg() { "$py" -m handgrad "$@"; }

nvidia-smi -L
"$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'
# the tests that need the GPU (the rest run on a CPU, in CI)
step tests "$py" -m pytest -q -p no:cacheprovider -k "cuda or cudagraph" tests/test_cuda.py tests/test_fastpath.py \
    tests/test_replay.py
step check-mlp hg check --device cuda --dtype float64 "${data[@]}"
step check-wavenet hg check --device cuda --dtype float64 --model wavenet "${data[@]}"
for impl in auto eager replay; do  # auto takes the CUDA graph on a GPU
    step "train-manual-$impl" hg train --device cuda --impl "$impl" --split examples -n 5 -o "$out/run-manual-$impl" "${data[@]}"
done
step train-autograd hg train --device cuda --grad autograd --split examples -n 5 -o "$out/run-autograd" "${data[@]}"
for grad in manual autograd; do  # a deeper model with its own optimizer (adamw)
    step "train-wavenet-$grad" hg train --device cuda --model wavenet --steps 2000 --grad "$grad" -n 0 \
        -o "$out/run-wavenet-$grad" "${data[@]}"
done
for model in transformer gru; do  # the sequence models: check, a manual/autograd pair, the bench (tokens/s, memory)
    step "check-$model" hg check --device cuda --dtype float64 --model "$model" "${data[@]}"
    for grad in manual autograd; do
        step "train-$model-$grad" hg train --device cuda --model "$model" --steps 2000 --grad "$grad" -n 0 \
            -o "$out/run-$model-$grad" "${data[@]}"
    done
    step "bench-$model" hg bench --device cuda --json --model "$model" --batch-sizes 64,512
done
step bench hg bench --device cuda --json --impls "${HANDGRAD_GPU_IMPLS:-autograd,autograd-compiled,manual,manual-replay,manual-compiled,manual-cudagraph,manual-cudagraph-x32}"
"$py" - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
runs = {}
for name in ("manual-auto", "manual-eager", "manual-replay", "autograd", "wavenet-manual", "wavenet-autograd",
             "transformer-manual", "transformer-autograd", "gru-manual", "gru-autograd"):
    f = out / f"run-{name}" / "metrics.jsonl"
    if f.exists():
        runs[name] = [json.loads(l) for l in f.read_text().splitlines()]
        last = runs[name][-1]
        print(f"{name:18s} steps {last['step'] + 1:>6}  elapsed {last['elapsed']:7.1f} s  "
              f"{(last['step'] + 1) / last['elapsed']:8.1f} steps/s  last val {last.get('val_loss')}")
for name, ref in (("manual-auto", "autograd"), ("manual-eager", "autograd"), ("manual-replay", "autograd"),
                  ("wavenet-manual", "wavenet-autograd"), ("transformer-manual", "transformer-autograd"),
                  ("gru-manual", "gru-autograd")):
    if name in runs and ref in runs:
        d = max(abs(a["train_loss"] - b["train_loss"]) for a, b in zip(runs[name], runs[ref]))
        ratio = runs[ref][-1]["elapsed"] / runs[name][-1]["elapsed"]
        print(f"{name} vs {ref}: {ratio:.2f}x the steps/s; max |train loss diff| {d:.2e} over {len(runs[name])} "
              "logged steps")
PY
exit $status
