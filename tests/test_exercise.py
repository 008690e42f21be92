"""`handgrad exercise`: the files it writes, the check of a learner's gradients (planted mistakes, each
named with the right gradient first and the right hint), the training comparison, and the notebook form,
read and run with no Jupyter server."""
from __future__ import annotations

import json
import re

import nbformat
import pytest
import torch
from cli_run import assert_one_line_error, run_cli

from handgrad.exercise import runtime
from handgrad.exercise.checker import check_file, finite_differences, format_report, reference, sample_coords
from handgrad.exercise.levels import LEVEL_CHOICES, VERSIONS
from handgrad.exercise.notebook import SLOT, read_cells, template_cells, to_notebook, to_python
from handgrad.exercise.training import run_training

FILES = [(key, ext) for key in VERSIONS for ext in (".py", ".ipynb")]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Every level, unsolved and solved, as written by `handgrad exercise new`."""
    root = tmp_path_factory.mktemp("exercise")
    for solved in (False, True):
        argv = ["exercise", "new", str(root / ("solved" if solved else "blank"))] + (["--solved"] if solved else [])
        from handgrad import cli

        assert cli.main(argv) == 0
    return root


def path_of(root, key, ext, solved):
    return root / ("solved" if solved else "blank") / f"{VERSIONS[key].file_stem}{ext}"


def planted(tmp_path, key: str, changes: dict[str, str], ext: str = ".py"):
    """The solved file of `key` with the cells of the gradients in `changes` given other code."""
    cells = template_cells(VERSIONS[key], solved=True)
    for cell in cells:
        mark = SLOT.match(cell.source)
        if cell.kind == "code" and mark and mark.group(2) in changes:
            cell.source = cell.source.splitlines()[0] + "\n" + changes.pop(mark.group(2)) + "\n"
    assert not changes, f"no cell for {list(changes)}"
    path = tmp_path / f"{VERSIONS[key].file_stem}{ext}"
    path.write_text(to_python(cells) if ext == ".py" else to_notebook(cells))
    return path


def rows(report):
    return {r.name: r for r in report.rows}


def assert_only_wrong(report, *names):
    """Exactly `names` are not right, the first of them is reported first, every other gradient passes."""
    bad = [r.name for r in report.rows if not r.ok]
    assert bad == list(names), format_report(report)
    assert report.first_wrong == names[0] and not report.passed


# --- the files -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("key, ext", FILES)
def test_untouched_files_fail_with_every_gradient_missing(written, key, ext, capsys):
    rc, out, err = run_cli(["exercise", "check", path_of(written, key, ext, solved=False), "--json"], capsys)
    report = json.loads(out)
    assert rc == 1 and report["passed"] is False
    names = [g.name for g in VERSIONS[key].gradients if VERSIONS[key].level < 4 or g.of in VERSIONS[key].params]
    assert [g["name"] for g in report["gradients"]] == names
    assert {g["verdict"] for g in report["gradients"]} == {"missing"}
    assert report["first_wrong"] == names[0]


@pytest.mark.parametrize("key, ext", FILES)
def test_solved_files_pass(written, key, ext, capsys):
    rc, out, err = run_cli(["exercise", "check", path_of(written, key, ext, solved=True)], capsys)
    assert rc == 0, out
    assert "PASS" in out.splitlines()[-1] and "Traceback" not in err


def test_json_report_has_the_documented_fields(written, capsys):
    rc, out, _ = run_cli(["exercise", "check", path_of(written, "1-seed", ".py", solved=True), "--json"], capsys)
    report = json.loads(out)
    assert rc == 0 and report["passed"] is True and report["first_wrong"] is None
    for g in report["gradients"]:
        assert {"name", "shape", "expected_shape", "verdict", "max_abs_diff", "hint"} <= set(g)
        assert g["shape"] == g["expected_shape"] and g["verdict"] in ("exact", "close")
    params = [g for g in report["gradients"] if g["name"].removesuffix("_grad") in VERSIONS["1-seed"].params]
    assert len(params) == 6 and all(g["fd_max_abs_diff"] < 1e-8 for g in params)


def test_the_seed_version_uses_the_seed_notebooks_names():
    version = VERSIONS["1-seed"]
    assert [g.of for g in version.gradients][:11] == ["nlls", "probs", "count", "exp_l", "logits", "h", "hpreact_bn",
                                                      "bnmeani", "bnstdi", "hpreact", "emb"]
    assert version.params == ("C", "w1", "w2", "b2", "bnw", "bnb")
    assert all(g.name == f"{g.of}_grad" for g in version.gradients)


def test_python_file_and_notebook_hold_the_same_cells(written):
    for key in VERSIONS:
        py = read_cells(path_of(written, key, ".py", solved=False))
        nb = read_cells(path_of(written, key, ".ipynb", solved=False))
        assert [(c.kind, c.source.strip()) for c in py] == [(c.kind, c.source.strip()) for c in nb]
        nbformat.validate(nbformat.read(path_of(written, key, ".ipynb", solved=False), as_version=4))


def test_unsolved_files_do_not_give_the_answers_away(written):
    for key, version in VERSIONS.items():
        text = path_of(written, key, ".py", solved=False).read_text()
        for g in version.gradients:
            for line in g.answer.splitlines():
                expression = line.partition(" = ")[2] or line
                if not expression.startswith("torch.zeros_like("):  # an allocation, not an answer
                    assert expression not in text, (key, line)


def test_levels_cover_the_issue(written):
    assert set(LEVEL_CHOICES["1"]) == {"1-seed", "1-fine"}
    fine = [g.of for g in VERSIONS["1-fine"].gradients]
    for name in ("norm_logits", "logit_maxes", "counts_sum_inv", "bnvar_inv"):
        assert name in fine
    assert [g.name for g in VERSIONS["2"].gradients] == ["dlogits"]
    assert [g.name for g in VERSIONS["3"].gradients] == ["dhprebn"]


def test_new_refuses_to_overwrite_a_learners_work(written, capsys):
    folder = written / "blank"
    before = (folder / "level1_seed.py").read_bytes()
    rc, _, err = run_cli(["exercise", "new", folder, "--level", "1"], capsys)
    assert_one_line_error(rc, err, "already exists", "--force")
    assert (folder / "level1_seed.py").read_bytes() == before


def test_new_writes_one_level(tmp_path, capsys):
    rc, out, err = run_cli(["exercise", "new", tmp_path / "three", "--level", "3"], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "three").iterdir()) == ["level3_batchnorm.ipynb", "level3_batchnorm.py"]


# --- the oracle: what every judgement stands on ---------------------------------------------------------

@pytest.mark.parametrize("key", [k for k in VERSIONS if k != "4"])
def test_branches_add_up_to_autograds_gradient(key):
    ref = reference(VERSIONS[key])
    assert ref.branches or key == "2"
    for name, parts in ref.branches.items():
        total = sum(parts.values())
        assert torch.allclose(total, ref.expected[name], rtol=1e-12, atol=1e-15), name
        if name != "dlogits":  # the max's part is ~1e-18: subtracting the max does not change the loss
            assert all(not torch.allclose(p, ref.expected[name]) for p in parts.values()), name  # each part matters


@pytest.mark.parametrize("key", [k for k in VERSIONS if k != "4"])
def test_autograds_parameter_gradients_match_finite_differences(key):
    version = VERSIONS[key]
    ref = reference(version)
    x, y = ref.batch
    for g in version.gradients:
        if g.of in version.params:
            coords = sample_coords(ref.expected[g.name], seed=0)
            fd = finite_differences(version, x, y, ref.params, g.of, coords)
            assert torch.allclose(fd, ref.expected[g.name].reshape(-1)[coords], atol=1e-8, rtol=0), g.name


def test_the_check_batch_repeats_ids_and_moves_every_parameter_off_its_start():
    x, y, (C, w1, w2, b2, bnw, bnb) = runtime.check_batch()
    assert x.shape == (32, 3) and torch.bincount(x.view(-1)).max() > 1  # the embedding's accumulate is tested
    assert (bnw != 1).all() and (b2 != 0).all() and (bnb != 0).all()
    assert C.dtype == torch.float64


# --- planted mistakes: each named at the right gradient, first, with the right hint ----------------------

def test_a_dropped_keepdim(tmp_path):
    report = check_file(planted(tmp_path, "1-fine", {"dcounts_sum_inv": "dcounts_sum_inv = (counts * dprobs).sum(1)"}))
    assert_only_wrong(report, "dcounts_sum_inv")
    row = rows(report)["dcounts_sum_inv"]
    assert row.verdict == "wrong shape" and row.shape == (32,) and row.expected_shape == (32, 1)
    assert "axis 1 is missing" in row.hint and "keepdim=True" in row.hint and "it is right" in row.hint


def test_a_dropped_one_over_n(tmp_path):
    report = check_file(planted(tmp_path, "1-fine", {
        "dlogprobs": "dlogprobs = torch.zeros_like(logprobs)\ndlogprobs[torch.arange(n), y] = -1"}))
    assert_only_wrong(report, "dlogprobs")
    assert rows(report)["dlogprobs"].verdict == "WRONG"
    assert "N = 32: a 1/N is missing" in rows(report)["dlogprobs"].hint


def test_a_sign_error(tmp_path):
    report = check_file(planted(tmp_path, "1-seed", {"probs_grad": "probs_grad = nlls_grad / probs"}))
    assert_only_wrong(report, "probs_grad")
    assert "-1: the sign is flipped" in rows(report)["probs_grad"].hint


def test_a_transposed_matmul(tmp_path):
    report = check_file(planted(tmp_path, "1-seed", {"w2_grad": "w2_grad = logits_grad.T @ h"}))
    assert_only_wrong(report, "w2_grad")
    row = rows(report)["w2_grad"]
    assert row.verdict == "wrong shape" and row.shape == (27, 200)
    assert "transposed (its .T is right)" in row.hint


def test_the_wrong_variable(tmp_path):
    report = check_file(planted(tmp_path, "1-seed", {"hpreact_bn_grad": "hpreact_bn_grad = h_grad"}))
    assert_only_wrong(report, "hpreact_bn_grad")
    assert "equals h_grad, the gradient of h: the wrong variable" in rows(report)["hpreact_bn_grad"].hint


def test_a_never_assigned_gradient(tmp_path):
    report = check_file(planted(tmp_path, "1-fine", {"dh": "pass"}))
    assert_only_wrong(report, "dh")
    assert rows(report)["dh"].verdict == "missing" and "never assigned" in rows(report)["dh"].hint


def test_a_missing_second_branch(tmp_path):
    report = check_file(planted(tmp_path, "1-fine", {"dcounts": "dcounts = counts_sum_inv * dprobs"}))
    assert_only_wrong(report, "dcounts")
    hint = rows(report)["dcounts"].hint
    assert "missing branch" in hint and "feeds probs and counts_sum" in hint and "back through counts_sum" in hint


def test_an_embedding_gradient_assigned_where_it_must_accumulate(tmp_path):
    report = check_file(planted(tmp_path, "1-fine", {"dC": "dC = torch.zeros_like(C)\ndC[x] = demb"}))
    assert_only_wrong(report, "dC")
    hint = rows(report)["dC"].hint
    assert "wrong on the" in hint and "rows whose id repeats" in hint and "index_add_" in hint


def test_an_embedding_gradient_added_through_fancy_indexing(tmp_path):
    """`C_grad[ids] += ...` reads like accumulation, yet each repeated id keeps one write."""
    report = check_file(planted(tmp_path, "1-seed", {
        "C_grad": "C_grad = torch.zeros_like(C)\nC_grad[x.view(-1)] += emb_grad.view(-1, n_embd)"}))
    assert_only_wrong(report, "C_grad")
    assert "rows whose id repeats" in rows(report)["C_grad"].hint


def test_two_independent_mistakes_are_reported_as_two(tmp_path):
    report = check_file(planted(tmp_path, "1-seed", {
        "probs_grad": "probs_grad = nlls_grad / probs",
        "bnmeani_grad": "bnmeani_grad = (-bnw / bnstdi * hpreact_bn_grad).sum(dim=0)"}))
    assert_only_wrong(report, "probs_grad", "bnmeani_grad")  # and nothing downstream of either
    assert "sign is flipped" in rows(report)["probs_grad"].hint
    assert "keepdim=True" in rows(report)["bnmeani_grad"].hint
    text = format_report(report)
    assert re.search(r"^>>\s+probs_grad\b", text, re.MULTILINE)
    assert len(re.findall(r"^>>", text, re.MULTILINE)) == 1


def test_a_missing_sum_over_a_broadcast_axis(tmp_path):
    report = check_file(planted(tmp_path, "1-fine", {"db2": "db2 = dlogits"}))
    assert_only_wrong(report, "db2")
    row = rows(report)["db2"]
    assert row.verdict == "wrong shape" and "axis 0 is extra" in row.hint and ".sum(0) (summed so, it is right)" in row.hint


def test_a_missing_sum_with_keepdim(tmp_path):
    report = check_file(planted(tmp_path, "1-fine", {"dbnvar_inv": "dbnvar_inv = bndiff * dbnraw"}))
    assert_only_wrong(report, "dbnvar_inv")
    assert "axis 0 is 32 where 1 is expected" in rows(report)["dbnvar_inv"].hint
    assert ".sum(0, keepdim=True) (summed so, it is right)" in rows(report)["dbnvar_inv"].hint


def test_nan_and_inf(tmp_path):
    report = check_file(planted(tmp_path, "1-seed", {"logits_grad": "logits_grad = exp_l * exp_l_grad / (exp_l - exp_l)"}))
    assert_only_wrong(report, "logits_grad")
    assert rows(report)["logits_grad"].hint.startswith("holds ") and "inf in" in rows(report)["logits_grad"].hint
    report = check_file(planted(tmp_path, "1-seed", {"h_grad": "h_grad = (logits_grad @ w2.T) * torch.log(-h.abs() - 1)"}))
    assert_only_wrong(report, "h_grad")
    assert "NaN in 6400 of 6400 entries" in rows(report)["h_grad"].hint


def test_all_zeros(tmp_path):
    report = check_file(planted(tmp_path, "1-seed", {"w1_grad": "w1_grad = torch.zeros_like(w1)"}))
    assert_only_wrong(report, "w1_grad")
    assert rows(report)["w1_grad"].verdict == "missing" and "all zeros" in rows(report)["w1_grad"].hint


def test_a_variance_divided_by_n_minus_one(tmp_path):
    report = check_file(planted(tmp_path, "1-fine", {"dbndiff2": "dbndiff2 = torch.ones_like(bndiff2) * dbnvar / (n - 1)"}))
    assert_only_wrong(report, "dbndiff2")
    assert "N/(N-1) = 32/31" in rows(report)["dbndiff2"].hint


def test_level_2_without_the_mean(tmp_path):
    report = check_file(planted(tmp_path, "2", {"dlogits": "dlogits = F.softmax(logits, 1) - F.one_hot(y, 27)"}, ext=".ipynb"))
    assert_only_wrong(report, "dlogits")
    assert "a 1/N is missing" in rows(report)["dlogits"].hint


def test_level_3_without_the_variance_branch(tmp_path):
    report = check_file(planted(tmp_path, "3", {
        "dhprebn": "dhprebn = bnw * bnvar_inv * (dhpreact - dhpreact.mean(0))"}, ext=".ipynb"))
    assert_only_wrong(report, "dhprebn")
    hint = rows(report)["dhprebn"].hint
    assert "missing branch" in hint and "back through bnvar" in hint


def test_a_mistake_in_a_parameter_is_also_seen_by_finite_differences(tmp_path):
    report = check_file(planted(tmp_path, "1-seed", {"b2_grad": "b2_grad = logits_grad.sum(dim=0) * 2"}))
    assert_only_wrong(report, "b2_grad")
    assert "factor 2 too many" in rows(report)["b2_grad"].hint
    assert rows(report)["b2_grad"].extra["fd_max_abs_diff"] > 1e-3
    assert rows(report)["bnb_grad"].extra["fd_max_abs_diff"] < 1e-8


# --- the learner's code: errors in one line, a time limit ------------------------------------------------

def test_an_exception_is_one_line_with_its_line_number_and_the_rest_is_still_judged(tmp_path, capsys):
    path = planted(tmp_path, "1-seed", {"count_grad": "scale = 1\ncount_grad = -(exp_l * probs_gard).sum(-1, keepdim=True)"})
    line = next(n for n, text in enumerate(path.read_text().splitlines(), start=1) if "probs_gard" in text)
    rc, out, err = run_cli(["exercise", "check", path, "--json"], capsys)
    report = json.loads(out)
    assert rc == 1 and "Traceback" not in out + err
    (row,) = [g for g in report["gradients"] if g["verdict"] not in ("exact", "close")]
    assert row["name"] == "count_grad" and row["verdict"] == "error"
    assert row["hint"] == f"your code raised, line {line}: NameError: name 'probs_gard' is not defined"


def test_an_error_in_a_notebook_names_its_cell(tmp_path):
    path = planted(tmp_path, "1-fine", {"dh": "dh = dlogits @ w2"}, ext=".ipynb")
    cell = next(n for n, c in enumerate(nbformat.read(path, as_version=4).cells, start=1) if "-> dh," in c.source)
    row = rows(check_file(path))["dh"]
    assert row.verdict == "error"
    assert row.hint.startswith(f"your code raised, cell {cell}, line 2: RuntimeError: mat1 and mat2 shapes cannot be multiplied")


def test_a_syntax_error_stays_in_its_cell(tmp_path):
    report = check_file(planted(tmp_path, "1-seed", {"h_grad": "h_grad = (logits_grad @ w2.T"}))
    assert_only_wrong(report, "h_grad")
    assert "SyntaxError" in rows(report)["h_grad"].hint


def test_a_loop_that_never_ends_is_stopped(tmp_path, capsys):
    path = planted(tmp_path, "1-seed", {"h_grad": "while True:\n    pass"})
    rc, out, err = run_cli(["exercise", "check", path, "--time-limit", "1"], capsys)
    assert rc == 1
    assert "stopped after 1 s (--time-limit)" in out and "Traceback" not in err


# --- level 4: the training loop beside autograd's ------------------------------------------------------

def training_file(tmp_path, backward: str | None = None, update: str | None = None, ext=".py"):
    cells = template_cells(VERSIONS["4"], solved=True)
    for cell in cells:
        if backward and cell.source.startswith("def backward():"):
            cell.source = backward
        if update and cell.source.startswith("def update(lr):"):
            cell.source = update
    path = tmp_path / f"level4{ext}"
    path.write_text(to_python(cells) if ext == ".py" else to_notebook(cells))
    return path


# the seed notebook's backward and update, as it had them: every gradient checks out, and the
# assignments bind local names, so the update reads buffers nothing fills
SEED_BACKWARD = """\
def backward():
    nlls_grad = torch.zeros_like(nlls)
    nlls_grad[torch.arange(y.shape[0]), y] = 1 / bs
    probs_grad = -nlls_grad / probs.data
    count_grad = -(exp_l.data * probs_grad).sum(dim=-1, keepdim=True) / count.data**2
    exp_l_grad = probs_grad / count.data + count_grad
    logits_grad = exp_l.data * exp_l_grad
    h_grad = logits_grad @ w2.data.T
    hpreact_bn_grad = h_grad * (1 - h.data**2)
    bnmeani_grad = ((-bnw.data / bnstdi.data) * hpreact_bn_grad).sum(dim=0, keepdim=True)
    bnstdi_grad = (-((hpreact.data - bnmeani.data) * bnw.data / bnstdi.data**2) * hpreact_bn_grad).sum(dim=0, keepdim=True)
    hpreact_grad_mean = bnmeani_grad * torch.ones_like(hpreact.data) / bs
    hpreact_grad_std = bnstdi_grad * (1 / 2 / bnstdi.data) * (1 / bs) * (2 * var_proj @ hpreact.data)
    hpreact_grad_direct = hpreact_bn_grad * (bnw.data / bnstdi.data)
    hpreact_grad = hpreact_grad_mean + hpreact_grad_std + hpreact_grad_direct
    emb_grad = hpreact_grad @ w1.data.T
    C_grad.index_add_(dim=0, index=x.view(-1), source=emb_grad.view(-1, n_embd))
    w1_grad = emb.data.T @ hpreact_grad
    w2_grad = h.data.T @ logits_grad
    b2_grad = logits_grad.sum(dim=0)
    bnw_grad = ((hpreact.data - bnmeani.data) / bnstdi.data * hpreact_bn_grad).sum(dim=0)
    bnb_grad = hpreact_bn_grad.sum(dim=0)


def zero_grad():
    for g in param_grads:
        g.fill_(0)
"""
SEED_UPDATE = """\
def update(lr):
    for p, g in zip(params, param_grads):
        p.data -= lr * g
        zero_grad()
"""


@pytest.mark.parametrize("ext", [".py", ".ipynb"])
def test_train_catches_the_seed_notebooks_bug_within_100_steps(tmp_path, capsys, ext):
    path = training_file(tmp_path, SEED_BACKWARD, SEED_UPDATE, ext)
    rc, out, err = run_cli(["exercise", "train", path, "--steps", 100], capsys)
    assert rc == 1 and "Traceback" not in err
    (fail,) = [line for line in out.splitlines() if line.startswith("FAIL")]
    step = int(re.match(r"FAIL at step (\d+):", fail).group(1))
    assert step < 100
    assert "w1, w2, b2, bnw and bnb never moved" in fail and "the gradients never reach the update" in fail
    assert "C" not in fail.split("never moved")[0].split(":")[1]  # C's buffer is filled in place: it moves
    assert (tmp_path / "level4-loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_passes_the_solved_loop_with_the_losses_within_1e_6_at_every_logged_step(tmp_path, capsys):
    path = training_file(tmp_path)
    png = tmp_path / "curves.png"
    rc, out, err = run_cli(["exercise", "train", path, "--steps", 300, "--log-every", 10, "--plot", png], capsys)
    assert rc == 0, out
    logged = [line.split() for line in out.splitlines() if re.match(r"^\s*\d+\s+\d", line)]
    assert [int(r[0]) for r in logged] == list(range(0, 300, 10)) + [299]
    assert all(abs(float(mine) - float(ref)) <= 1e-6 for _, mine, ref, _ in logged)
    assert float(logged[-1][1]) < float(logged[0][1]) - 0.3  # it learns
    assert out.splitlines()[-2].startswith("PASS: 300 steps")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing left behind


def test_the_compared_losses_are_every_logged_steps_and_agree():
    """The same figure as the test above, read from the run itself rather than the printed table."""
    cells = template_cells(VERSIONS["4"], solved=True)
    run = run_training(None, cells, VERSIONS["4"], max_steps=200, log_every=1)
    assert run.failure is None and run.steps == 200 and len(run.losses) == 200
    assert max(abs(mine - ref) for _, mine, ref in run.losses) <= 1e-6
    assert run.max_param_diff <= 1e-6


def test_train_names_the_parameter_whose_update_drifts(tmp_path, capsys):
    backward = template_cells(VERSIONS["4"], solved=True)[2].source.replace(
        "bnb_grad.copy_(hpreact_bn_grad.sum(dim=0))", "bnb_grad.copy_(-hpreact_bn_grad.sum(dim=0))")
    path = training_file(tmp_path, backward)
    rc, out, err = run_cli(["exercise", "train", path, "--steps", 50], capsys)
    assert rc == 1
    fail = out.splitlines()[-2]
    assert fail.startswith("FAIL at step 0: bnb drifts from autograd's at step 0") and "sign is flipped" in fail


def test_train_names_a_parameter_that_stops_moving_later(tmp_path, capsys):
    update = ("def update(lr):\n    for name, p, g in zip('C w1 w2 b2 bnw bnb'.split(), params, param_grads):\n"
              "        if name != 'w2' or lr_steps.append(1) or len(lr_steps) < 30:\n            p -= lr * g\n\n\nlr_steps = []\n")
    path = training_file(tmp_path, update=update)
    rc, out, err = run_cli(["exercise", "train", path, "--steps", 100], capsys)
    assert rc == 1
    assert "FAIL at step 29: w2 never moved at step 29" in out


def test_check_of_a_level_4_file_judges_each_parameters_step(tmp_path, capsys):
    rc, out, err = run_cli(["exercise", "check", training_file(tmp_path, SEED_BACKWARD, SEED_UPDATE), "--json"], capsys)
    report = json.loads(out)
    assert rc == 1 and report["first_wrong"] == "w1_grad"
    verdicts = {g["name"]: g["verdict"] for g in report["gradients"]}
    assert verdicts == {"C_grad": "close", "w1_grad": "missing", "w2_grad": "missing", "b2_grad": "missing",
                        "bnw_grad": "missing", "bnb_grad": "missing"}
    assert "never reach the update" in report["gradients"][1]["hint"]


def test_train_refuses_a_file_of_another_level(written, capsys):
    rc, _, err = run_cli(["exercise", "train", path_of(written, "1-seed", ".py", solved=True)], capsys)
    assert_one_line_error(rc, err, "is exercise 1-seed, not a training loop", "handgrad exercise check")


def test_train_stops_a_loop_past_its_time_limit(tmp_path, capsys):
    update = "def update(lr):\n    while True:\n        pass\n"
    rc, out, err = run_cli(["exercise", "train", training_file(tmp_path, update=update), "--time-limit", "1"], capsys)
    assert rc == 1 and "stopped after 1 s (--time-limit)" in out


# --- the command line ----------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, needles", [
    (["exercise", "check", "no-such-file.py"], ["exercise file not found: no-such-file.py"]),
    (["exercise", "check", "README.md"], ["expected a .py or .ipynb exercise file"]),
    (["exercise", "check", "src/handgrad/cli.py"], ["is not a handgrad exercise", "handgrad exercise new DIR"]),
    (["exercise", "train", "no-such-file.ipynb"], ["exercise file not found"]),
    (["exercise", "new", "README.md"], ["README.md is a file, not a folder"]),
    (["exercise", "new", "x", "--level", "5"], ["invalid choice: '5'"]),
    (["exercise", "check", "x.py", "--jsn"], ["unrecognized arguments: --jsn", "did you mean --json?",
                                             "see handgrad exercise check --help"]),
    (["exercise", "chek", "x.py"], ["invalid choice: 'chek'", "did you mean check?"]),
])
def test_bad_input_is_one_line(capsys, argv, needles):
    rc, _, err = run_cli(argv, capsys)
    assert_one_line_error(rc, err, *needles)


def test_a_broken_notebook_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.ipynb"
    bad.write_text("{not json")
    rc, _, err = run_cli(["exercise", "check", bad], capsys)
    assert_one_line_error(rc, err, "is not a readable notebook")


def test_every_exercise_option_states_its_default():
    import argparse

    from handgrad import cli

    (top,) = [a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    (steps,) = [a for a in top.choices["exercise"]._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(steps.choices) == {"new", "check", "train"}
    for name, sub in steps.choices.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, (name, action.dest)
            if action.default not in (None, False):
                assert re.search(rf"\bdefault {re.escape(str(action.default).removesuffix('.0'))}\b", action.help), (name, action.dest)


def test_the_answers_page_holds_every_answer_as_the_solved_files_have_it():
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "exercise-answers.md").read_text(encoding="utf-8")
    for key, version in VERSIONS.items():
        if key != "4":
            for g in version.gradients:
                assert f"```python\n{g.answer}\n```" in page, (key, g.name)
