"""Deep-supervision training: the paper's loss and schedule, optimiser groups, sampling, checkpoints,
init-from, multi-process parity and kill/resume."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cnds_compiler import compile_text
from cnds_compiler.backends.pytorch import build_module
from cnds_compiler.checkpoint import load_checkpoint, save_checkpoint
from cnds_compiler.errors import CheckpointError, OutputError
from cnds_compiler.ir import LossKind
from cnds_compiler.train.evaluate import topk_errors
from cnds_compiler.train.loss import LossTally, alphas, deep_supervision_loss, squared_hinge
from cnds_compiler.train.optim import param_groups
from cnds_compiler.train.rundir import append_metrics
from cnds_compiler.train.state import init_from
from cnds_compiler.train.trainer import GlobalBatchSampler

from .conftest import SPECS, run_reader_gone

TINY = """
network tiny
input 1x8x8
classes 10
init kaiming(bias=0)
c1: conv2d(8, 3, pad=1) relu
c2: conv2d(8, 3, pad=1) relu
p: maxpool(2)
fc: linear(classes)
supervise c1 loss hinge weight 0.3 decay linear { g: gap; l: linear(classes) }
supervise c2 weight [0.5, 0.0, 0.2] { g: gap; l: linear(classes) }
train { epochs 4  bias_lr_mult 2  weight_decay 0.001 }
"""

# digits CNDS-8 without dropout, so that runs differing only in process layout are comparable
NO_DROPOUT = 'extends "{base}"\nnetwork digits_nodrop\nblock fc(n) = linear(n) relu\n'


def tiny():
    return compile_text(TINY, "tiny.cnds")


def test_alpha_follows_eq2_and_alternatives():
    net = compile_text(TINY.replace("decay linear", "decay linear"), "t.cnds")
    n = 4
    for t in range(n):
        a = alphas(net, t, n)
        assert a["c1"] == pytest.approx(0.3 * (1 - t / n))  # eq. 2
    assert [alphas(net, t, n)["c2"] for t in range(5)] == [0.5, 0.0, 0.2, 0.2, 0.2]  # list, last holds
    const = compile_text(TINY.replace("decay linear", "decay none"), "t.cnds")
    assert {alphas(const, t, n)["c1"] for t in range(n)} == {0.3}


def test_squared_hinge_matches_definition():
    torch.manual_seed(0)
    s = torch.randn(5, 4)
    y = torch.tensor([0, 3, 1, 1, 2])
    expected = 0.0
    for i in range(5):
        for k in range(4):
            sign = 1.0 if k == y[i] else -1.0
            expected += max(0.0, 1 - sign * float(s[i, k])) ** 2
    assert float(squared_hinge(s, y)) == pytest.approx(expected / 5, rel=1e-6)


def test_total_loss_is_eq1_with_both_loss_kinds():
    net = tiny()
    torch.manual_seed(0)
    logits, a1, a2 = torch.randn(6, 10), torch.randn(6, 10), torch.randn(6, 10)
    y = torch.randint(0, 10, (6,))
    w = {"c1": 0.25, "c2": 0.5}
    total, parts = deep_supervision_loss(net, logits, {"c1": a1, "c2": a2}, y, w)
    expected = F.cross_entropy(logits, y) + 0.25 * squared_hinge(a1, y) + 0.5 * F.cross_entropy(a2, y)
    assert float(total) == pytest.approx(float(expected), rel=1e-6)
    assert net.branch("c1").loss is LossKind.HINGE and set(parts) == {"main", "c1", "c2"}
    total2, parts2 = deep_supervision_loss(net, logits, {"c1": a1}, y, w)  # c2 not computed
    assert set(parts2) == {"main", "c1"}
    assert float(total2) == pytest.approx(float(F.cross_entropy(logits, y) + 0.25 * squared_hinge(a1, y)), rel=1e-6)


def test_loss_tally_sums_heads_over_folds_and_flags_a_nonfinite_total_once_folded():
    torch.manual_seed(0)
    steps = [(torch.rand(()) * 3, {"main": torch.rand(()), "c1": torch.rand(())}) for _ in range(7)]
    steps.insert(3, (torch.tensor(0.4), {"main": torch.tensor(0.4)}))  # an empty micro-batch: main only
    tally = LossTally(("main", "c1"), torch.device("cpu"))
    assert tally.fold() is False  # nothing pending
    for i, (total, parts) in enumerate(steps):
        tally.add(total, parts)
        if i == 4:
            assert tally.fold() is False
    assert tally.fold() is False and tally.fold() is False  # folded once: a second fold adds nothing
    expected = [sum(float(p.get(k, 0.0)) for _, p in steps) for k in ("main", "c1")]
    assert tally.sums.tolist() == pytest.approx(expected, rel=1e-6)
    tally.add(torch.tensor(float("nan")), {"main": torch.tensor(1.0), "c1": torch.tensor(1.0)})
    tally.add(torch.tensor(2.0), {"main": torch.tensor(1.0), "c1": torch.tensor(1.0)})
    assert tally.fold() is True
    assert tally.fold() is False  # reported once; the trainer stops at the first report
    tally.add(torch.tensor(float("inf")), {"main": torch.tensor(1.0)})
    assert tally.fold() is True


def test_bias_lr_mult_and_decay_on_weights_only():
    net = tiny()
    model = build_module(net, seed=0)
    groups = param_groups(model, net.train)
    by_mult = {g["lr_mult"]: g for g in groups}
    assert by_mult[2.0]["weight_decay"] == 0.0 and by_mult[2.0]["lr"] == pytest.approx(2 * net.train.lr)
    assert all(p.ndim == 1 for p in by_mult[2.0]["params"])
    assert by_mult[1.0]["weight_decay"] == pytest.approx(0.001)
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len(list(model.parameters()))


def test_global_batch_sampler_splits_each_global_batch_across_ranks():
    one = list(GlobalBatchSampler(100, 16, seed=3, epoch=2))
    r0 = list(GlobalBatchSampler(100, 16, seed=3, epoch=2, rank=0, world=2))
    r1 = list(GlobalBatchSampler(100, 16, seed=3, epoch=2, rank=1, world=2))
    assert len(one) == 96 and len(r0) == len(r1) == 48
    for i in range(6):
        assert sorted(one[16 * i : 16 * i + 16]) == sorted(r0[8 * i : 8 * i + 8] + r1[8 * i : 8 * i + 8])
    assert one == list(GlobalBatchSampler(100, 16, seed=3, epoch=2))  # a resumed epoch replays its order
    assert one != list(GlobalBatchSampler(100, 16, seed=3, epoch=3))


def test_topk_errors():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    assert topk_errors(logits, labels, ks=(1, 2)) == [2, 1]


def test_init_from_copies_matching_names_and_shapes(tmp_path):
    cnds8 = compile_text((SPECS / "digits_cnds8.cnds").read_text(), "digits_cnds8.cnds", base_dir=SPECS)
    wide = compile_text(
        'extends "digits_cnds8.cnds"\nnetwork wider\nfc6: linear(256) relu dropout(0.3)\nunsupervise conv3_2\n',
        "wider.cnds", base_dir=SPECS,
    )
    src = build_module(cnds8, seed=1)
    save_checkpoint(tmp_path / "src.pt", {"model": src.state_dict(), "ir_hash": cnds8.digest()})
    dst = build_module(wide, seed=2)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    report = init_from(dst, tmp_path / "src.pt")
    assert "conv1.weight" in report.copied and torch.equal(dst.conv1.weight, src.conv1.weight)
    assert "fc6.weight" in report.shape_mismatch and torch.equal(dst.fc6.weight, before["fc6.weight"])
    assert "fc7.weight" in report.shape_mismatch  # fc7's input width changed with fc6
    # whole layers or nothing: fc7's bias has the right shape but its weight does not, so it stays too
    assert "fc7.bias" not in report.copied and torch.equal(dst.fc7.bias, before["fc7.bias"])
    assert ("fc7", "weight shape differs") in report.left_layers and "conv1" in report.copied_layers
    assert not any(k.startswith("aux.") for k in report.copied)
    text = report.format("src.pt")
    assert "copied" in text and "fc7 (weight shape differs)" in text


def test_checkpoint_from_another_spec_is_refused(tmp_path):
    net = tiny()
    other = compile_text(TINY.replace("c2: conv2d(8,", "c2: conv2d(16,"), "other.cnds")
    save_checkpoint(tmp_path / "a.pt", {"model": build_module(net).state_dict(), "ir_hash": net.digest(),
                                        "spec_name": "tiny"})
    with pytest.raises(CheckpointError, match="made from an earlier version of 'tiny' whose layers differ"):
        load_checkpoint(tmp_path / "a.pt", other)
    # initialisation is not architecture: the same layers with another init load the checkpoint
    reinit = compile_text(TINY.replace("init kaiming(bias=0)", "init gaussian(std=0.01)"), "tiny.cnds")
    assert load_checkpoint(tmp_path / "a.pt", reinit)["ir_hash"] == reinit.digest()
    (tmp_path / "bad.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="not a torch checkpoint file"):
        load_checkpoint(tmp_path / "bad.pt")


# ---- end-to-end runs (subprocesses) --------------------------------------------------------------


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _train(args, **kw):
    return subprocess.run([sys.executable, "-m", "cnds_compiler.train.cli", *args], capture_output=True,
                          text=True, env=_env(), timeout=600, **kw)


def _nodrop_spec(tmp_path: Path) -> Path:
    spec = tmp_path / "digits_nodrop.cnds"
    spec.write_text(NO_DROPOUT.format(base=SPECS / "digits_cnds8.cnds"))
    return spec


def test_train_digits_end_to_end_with_branch_metrics(tmp_path):
    out = tmp_path / "run"
    r = _train([str(SPECS / "digits_cnds8.cnds"), "--data", "digits", "--out", str(out), "--epochs", "2",
                "--no-progress", "--cpu"])
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in rows] == [1, 2]
    assert set(rows[0]["val_top1_error"]) == {"main", "conv3_2"}  # every head is evaluated
    assert rows[0]["alphas"]["conv3_2"] == pytest.approx(0.3) and rows[1]["alphas"]["conv3_2"] == pytest.approx(0.15)
    assert all(0 <= m["val_top1_error"]["main"] <= 1 for m in rows)
    for f in ("last.pt", "best.pt", "metrics.csv", "curves.png", "network.ir.json"):
        assert (out / f).exists(), f
    assert list(out.rglob("events.out.tfevents.*")), "TensorBoard logs (tensorboard is a dev dependency)"
    ck = load_checkpoint(out / "last.pt")
    assert ck["epoch"] == 2 and ck["spec_name"] == "digits_cnds8"
    again = _train([str(SPECS / "digits_cnds8.cnds"), "--out", str(out), "--no-progress", "--cpu"])
    assert again.returncode == 1 and "already holds a run" in again.stderr and "Traceback" not in again.stderr
    ev = subprocess.run([sys.executable, "-c", "from cnds_compiler.train.cli import eval_main; "
                         f"raise SystemExit(eval_main(['{SPECS / 'digits_cnds8.cnds'}', '{out / 'best.pt'}', '--cpu']))"],
                        capture_output=True, text=True, env=_env())
    assert ev.returncode == 0 and "conv3_2" in ev.stdout and "top-1" in ev.stdout


def test_nonfinite_loss_stops_with_message_and_keeps_checkpoint(tmp_path):
    out = tmp_path / "run"
    spec = _nodrop_spec(tmp_path)
    ok = _train([str(spec), "--out", str(out), "--epochs", "1", "--no-progress", "--cpu", "--limit-train", "256"])
    assert ok.returncode == 0, ok.stderr
    saved = (out / "last.pt").read_bytes()
    r = _train([str(spec), "--out", str(out), "--resume", "--epochs", "3", "--lr", "1e30", "--no-progress",
                "--cpu", "--limit-train", "256"])
    assert r.returncode == 1 and "non-finite loss" in r.stderr and "Traceback" not in r.stderr
    assert (out / "last.pt").read_bytes() == saved


def test_a_closed_output_pipe_stops_the_run_with_every_record_of_the_last_epoch_kept(tmp_path):
    """``cnds-train … | head -n 2``: the run stops at the next line it prints (epoch 2's), says where in one
    line, releases its lock, and every file of the epochs it finished is complete, so --resume continues it."""
    out = tmp_path / "run"
    args = [str(SPECS / "digits_cnds8.cnds"), "--out", str(out), "--epochs", "3", "--no-progress", "--cpu",
            "--limit-train", "256"]
    code, read, err = run_reader_gone([sys.executable, "-m", "cnds_compiler.train.cli", *args], lines=2, env=_env())
    assert read[0].startswith("training digits_cnds8") and read[1].startswith("epoch 1/3")
    assert code == 141 and err.strip().splitlines() == [
        f"{out}: output closed: at epoch 2 step 8; {out / 'last.pt'} (epoch 2) is intact: resume with --resume"]
    assert load_checkpoint(out / "last.pt")["epoch"] == 2 and not (out / "train.lock").exists()
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    resumed = _train([*args, "--resume"])
    assert resumed.returncode == 0 and "epoch 3/3" in resumed.stdout and "note:" not in resumed.stdout


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (a device that is always full)")
def test_training_output_on_a_full_disk_stops_in_one_line_and_a_metrics_write_names_its_file(tmp_path):
    out = tmp_path / "run"
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "cnds_compiler.train.cli", str(SPECS / "digits_cnds8.cnds"), "--out",
                            str(out), "--epochs", "1", "--no-progress", "--cpu", "--limit-train", "128"],
                           stdout=full, stderr=subprocess.PIPE, text=True, env=_env(), timeout=600)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"{out}: cannot write the output: No space left on device; before the first epoch; no epoch was completed, "
        "so nothing was saved"]
    assert not (out / "train.lock").exists()
    (tmp_path / "blocked" / "metrics.jsonl").mkdir(parents=True)  # what the append opens is a folder
    with pytest.raises(OutputError, match="cannot write") as e:
        append_metrics(tmp_path / "blocked", {"epoch": 1})
    assert e.value.path == str(tmp_path / "blocked" / "metrics.jsonl")


def test_resume_alone_continues_with_the_runs_own_flags_and_a_flag_given_again_overrides_with_a_note(tmp_path):
    """A run started with --epochs 4 and stopped after 2: --resume without the flag trains epochs 3-4 of that
    run (the spec says 30), ending bit-identical to the uninterrupted run; --epochs below what is done is
    refused in one line; --lr given again overrides the run's, with a note."""
    common = [str(SPECS / "digits_cnds8.cnds"), "--no-progress", "--cpu", "--limit-train", "128", "--limit-val", "64"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert _train([*common, "--out", str(whole), "--epochs", "4"]).returncode == 0
    assert _train([*common, "--out", str(part), "--epochs", "4", "--max-steps", "4"]).returncode == 0  # 2 epochs
    resumed = _train([*common, "--out", str(part), "--resume"])
    assert resumed.returncode == 0 and "resumed" in resumed.stdout and "at epoch 2/4" in resumed.stdout
    assert "done: 4 epochs" in resumed.stdout and "note:" not in resumed.stdout
    a, b = (load_checkpoint(d / "last.pt")["model"] for d in (whole, part))
    assert all(torch.equal(a[k], b[k]) for k in a)
    fewer = _train([*common, "--out", str(whole), "--resume", "--epochs", "3"])
    assert fewer.returncode == 1 and fewer.stderr.strip().splitlines() == [
        f"{whole}: training error: the run has trained 4 epochs already, more than --epochs 3: nothing to train; "
        "give --epochs above 4 to train it further"]
    more = _train([*common, "--out", str(whole), "--resume", "--epochs", "5", "--lr", "0.01"])
    assert more.returncode == 0 and "note: --epochs 5 replaces the run's 4 from here on" in more.stdout
    assert "note: --lr 0.01 replaces the run's 0.05 from here on" in more.stdout and "done: 5 epochs" in more.stdout
    assert json.loads(load_checkpoint(whole / "last.pt")["train_config"])["lr"] == 0.01


def test_a_batchnorm_with_one_example_per_micro_batch_is_refused_before_training(tmp_path):
    spec = tmp_path / "bn1.cnds"
    spec.write_text("network bn1\ninput 1x8x8\nclasses 10\nc1: conv2d(8, 3, pad=1) relu\np: gap\n"
                    "f: linear(16) batchnorm relu\nfc: linear(classes)\n")
    r = _train([str(spec), "--out", str(tmp_path / "run"), "--no-progress", "--cpu", "--limit-train", "64",
                "--batch-size", "4", "--grad-accum", "4"])
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "training error: batchnorm (f) needs at least 2 examples per micro-batch, but batch 4 over 1 process "
        "× 4 accumulation gives 1; raise --batch-size or lower --grad-accum / --processes"]
    assert not (tmp_path / "run").exists()


def _free_port() -> int:
    """A port nothing listens on now (a fixed one can still be in TIME_WAIT from the previous run)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _final_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


# A weight list with a zero epoch: in epoch 2 the branch is not computed, and DDP must not wait for its
# gradients (the unused-parameter crash other tools need find_unused_parameters for).
ZERO_WEIGHT = "unsupervise conv3_2\nsupervise conv3_2 weight [0.3, 0, 0.2] { g: gap; l: linear(classes) }\n"


@pytest.mark.slow
@pytest.mark.parametrize("branch", ["linear-decay", "zero-weight-epoch", "dag-two-heads"])
def test_two_processes_match_one_process(tmp_path, branch):
    spec = _nodrop_spec(tmp_path)
    if branch == "dag-two-heads":  # inception modules, two heads (one decaying, one constant), no dropout
        spec.write_text((SPECS / "digits_inception.cnds").read_text())
    if branch == "zero-weight-epoch":
        spec.write_text(spec.read_text() + ZERO_WEIGHT)
    # lr 0.01: small enough that SGD does not amplify float rounding chaotically over the run
    common = ["--epochs", "3" if branch == "zero-weight-epoch" else "2", "--batch-size", "32", "--lr", "0.01",
              "--no-progress", "--cpu", "--limit-train", "512"]
    one = _train([str(spec), "--out", str(tmp_path / "one"), *common])
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         "-m", "cnds_compiler.train.cli", str(spec), "--out", str(tmp_path / "two"), *common],
        capture_output=True, text=True, env=_env(), timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 processes" in two.stdout and two.stdout.count("done:") == 1  # only the main process reports
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    if branch == "zero-weight-epoch":
        assert rows[1]["alphas"]["conv3_2"] == 0 and "conv3_2" not in rows[1]["train_loss"]  # not computed
        assert "conv3_2" in rows[2]["train_loss"]
    a, b = _final_weights(tmp_path / "one" / "last.pt"), _final_weights(tmp_path / "two" / "last.pt")
    # Exact: one process that splits each global batch into the same two halves and accumulates their
    # gradients performs the same float operations as the two processes' all-reduce: bit-identical weights.
    split = _train([str(spec), "--out", str(tmp_path / "split"), "--grad-accum", "2", *common])
    assert split.returncode == 0, split.stderr
    c = _final_weights(tmp_path / "split" / "last.pt")
    assert all(torch.equal(b[k], c[k]) for k in b), "2 processes differ from 1 process with the same split"
    # Stated tolerance against one process taking each batch of 32 in one piece: its batch mean rounds in
    # another order, and SGD carries that forward through ReLU boundaries. Measured: < 1% of how far training
    # moved each tensor (linear decay, 2 epochs) and up to 19% (zero-weight epoch, 3 epochs); bound 25%. The
    # exact check above is the proof of synchronisation; this one bounds the size of the rounding effect.
    init = build_module(compile_text(spec.read_text(), str(spec)), seed=0).state_dict()
    for k in a:
        if not k.endswith(("weight", "bias")):
            continue
        moved = float((a[k] - init[k]).abs().max())
        drift = float((a[k] - b[k]).abs().max())
        assert moved > 0, f"{k} never changed"
        assert drift <= 0.25 * moved, f"{k}: 2-process run drifted by {drift:.3g}, training moved it {moved:.3g}"


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_identical_weights(tmp_path):
    spec = _nodrop_spec(tmp_path)
    common = ["--epochs", "4", "--batch-size", "16", "--no-progress", "--cpu", "--limit-train", "800"]
    ref = _train([str(spec), "--out", str(tmp_path / "ref"), *common])
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "cnds_compiler.train.cli", str(spec), "--out", str(out), *common],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    log = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 2):
        time.sleep(0.02)
    time.sleep(0.15)  # well into epoch 3
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(out / "last.pt")["epoch"] in (2, 3)  # never half-written
    resumed = _train([str(spec), "--out", str(out), "--resume", *common])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout
    a, b = _final_weights(tmp_path / "ref" / "last.pt"), _final_weights(out / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from the uninterrupted run"
    assert not list(out.glob(".*.tmp"))
    assert math.isclose(load_checkpoint(out / "last.pt")["epoch"], 4)


IMAGE_SPEC = """
network tiny_rgb
input 3x32x32
classes 3
init kaiming(bias=0)
c1: conv2d(8, 3, pad=1) relu
p1: maxpool(2)
c2: conv2d(8, 3, pad=1) relu
g: gap
fc: linear(classes)
supervise c1 { g: gap; l: linear(classes) }
data { resize 40  mirror true }
train { epochs 1  batch 8  lr 0.01 }
"""


def test_imagefolder_run_skips_and_counts_corrupt_images_or_stops_under_strict(tmp_path):
    from cnds_compiler.train.synthetic import make_imagefolder

    root = make_imagefolder(tmp_path / "imgs", classes=3, per_class=12, size=(48, 48), corrupt=4)
    spec = tmp_path / "tiny_rgb.cnds"
    spec.write_text(IMAGE_SPEC)
    ok = _train([str(spec), "--data", f"imagefolder:{root}", "--out", str(tmp_path / "run"), "--no-progress",
                 "--cpu", "--workers", "2"])
    assert ok.returncode == 0, ok.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["skipped"] >= 1 and "skipped" in ok.stdout
    strict = _train([str(spec), "--data", f"imagefolder:{root}", "--out", str(tmp_path / "strict"), "--no-progress",
                     "--cpu", "--strict"])
    assert strict.returncode == 1 and "Traceback" not in strict.stderr
    assert "corrupt_" in strict.stderr and "data error" in strict.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lr", "-1"], "--lr must be >= 0.0"),
        (["--momentum", "1.5"], "--momentum must be in [0.0, 1.0]"),
        (["--out", "/dev/null/run"], "cannot create the run folder"),
        (["--init-from", "{empty}"], "copied nothing"),
        (["--resume", "--out", "{fresh}"], "no such checkpoint"),
    ],
    ids=["negative-lr", "momentum-range", "out-below-a-file", "init-from-nothing", "resume-without-run"],
)
def test_train_cli_bad_values_are_one_line_errors(tmp_path, capsys, args, message):
    from cnds_compiler.train.cli import train_main

    empty = tmp_path / "empty.pt"
    torch.save({"unrelated.weight": torch.zeros(3)}, empty)
    args = [a.format(empty=empty, fresh=tmp_path / "fresh") for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "run")]
    code = train_main([str(SPECS / "digits_cnds8.cnds"), "--epochs", "1", "--limit-train", "128", "--no-progress",
                       "--cpu", *args])
    err = capsys.readouterr().err
    assert code == 1 and message in err and "Traceback" not in err
    assert err.splitlines()[0].count(": ") >= 1  # "path: kind: message" or "kind: message"


@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--grad-accum", "0"), ("--epochs", "0"),
                                         ("--workers", "-1"), ("--max-steps", "0")])
def test_train_cli_out_of_range_counts_are_usage_errors(flag, value, capsys):
    from cnds_compiler.train.cli import train_main

    with pytest.raises(SystemExit) as e:
        train_main([str(SPECS / "digits_cnds8.cnds"), flag, value])
    assert e.value.code == 2 and "must be >=" in capsys.readouterr().err


def test_train_cli_val_split_is_stated_in_the_run(tmp_path, capsys):
    from cnds_compiler.train.cli import train_main

    out = tmp_path / "run"
    code = train_main([str(SPECS / "digits_cnds8.cnds"), "--epochs", "1", "--limit-train", "128", "--no-progress",
                       "--cpu", "--max-steps", "1", "--val-split", "0.2", "--split-seed", "5", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    doc = json.loads((out / "data.json").read_text())
    assert doc["val_split"] == 0.2 and doc["split_seed"] == 5
    assert doc["val_examples"] == round(0.2 * 1438) and doc["train_examples"] == 128
    assert "val = 0.2 of train held out (split seed 5)" in printed and doc["description"] in printed


@pytest.mark.parametrize("value", ["0", "1", "1.5", "x"])
def test_train_cli_val_split_out_of_range_is_a_usage_error(value, capsys):
    from cnds_compiler.train.cli import train_main

    with pytest.raises(SystemExit) as e:
        train_main([str(SPECS / "digits_cnds8.cnds"), "--val-split", value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--val-split" in err and "Traceback" not in err


def test_unwritable_outputs_are_one_line_errors(tmp_path, capsys):
    from cnds_compiler.cli import compile_main

    code = compile_main([str(SPECS / "digits_cnds8.cnds"), "--emit", "ir", "-o", "/dev/null/x.json"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("/dev/null/x.json: output error: cannot write") and "Traceback" not in err


@pytest.mark.slow
def test_processes_flag_runs_ddp_on_cpu_and_single_process_launch_is_reported(tmp_path):
    common = [str(SPECS / "digits_cnds8.cnds"), "--epochs", "1", "--limit-train", "128", "--no-progress", "--cpu"]
    # without --cpu on a machine with no GPU: Accelerate alone would make each process a lone single one
    cpu_flag = common[-1:] if torch.cuda.is_available() else []
    two = _train([*common[:-1], *cpu_flag, "--out", str(tmp_path / "two"), "--processes", "2"])
    assert two.returncode == 0, two.stderr[-2000:]
    assert "(2 processes × 32)" in two.stdout and two.stdout.count("done:") == 1
    assert "OMP_NUM_THREADS" not in two.stderr  # the cores are shared out by cnds-train, not torchrun's banner
    # a worker's error is one line, said once, with its exit code: no launcher log lines or traceback
    again = _train([*common, "--out", str(tmp_path / "two"), "--processes", "2"])
    assert again.returncode == 1 and again.stderr.strip() == (
        f"{tmp_path / 'two'}: error: {tmp_path / 'two'} already holds a run; pass --resume to continue it or "
        "choose another --out"), again.stderr
    # what `accelerate launch --cpu --num_processes 2` leaves a process: a rendezvous address, no world size
    env = {**_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "ACCELERATE_USE_CPU": "True"}
    env.pop("WORLD_SIZE", None)
    one = subprocess.run([sys.executable, "-m", "cnds_compiler.train.cli", *common, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    assert "asked for several processes but started 1" in one.stderr and "--processes N" in one.stderr


def test_a_diverged_run_is_never_saved_or_reported_as_good(tmp_path):
    common = [str(SPECS / "digits_cnds8.cnds"), "--epochs", "2", "--no-progress", "--cpu"]
    nan = _train([*common, "--out", str(tmp_path / "a"), "--momentum", "nan"])
    assert nan.returncode == 1 and "--momentum must be a finite number" in nan.stderr and "Traceback" not in nan.stderr
    # one step at lr 1e30: the loss it saw was finite, the weights stay finite, the outputs are NaN
    huge = _train([*common, "--out", str(tmp_path / "b"), "--lr", "1e30", "--max-steps", "1"])
    assert huge.returncode == 1 and "the run diverged" in huge.stderr and "non-finite outputs" in huge.stderr
    assert not (tmp_path / "b" / "best.pt").exists() and not (tmp_path / "b" / "last.pt").exists()
