"""Hardening (issue 12), families 2 and 3: no command loses or clobbers a file, and nothing that is not a
cnds checkpoint gets further than one line naming it.

Family 2: the run lock on ``--out``; a kill at every point of an epoch's writes (simulated by making the
writer stop there, the way a SIGKILL would), then ``--resume`` repairs the folder and ends bit-identical to
an uninterrupted run; Ctrl-C at any moment in every command is one line and exit code 130.
Family 3: a matrix of files that are not checkpoints, read by every command that reads one; the content
digest; a fuzz test of the loader with over a thousand mutated files.
"""

import copy
import csv
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cnds_compiler import compile_spec
from cnds_compiler.checkpoint import checkpoint_bytes, content_digest, load_checkpoint, save_checkpoint
from cnds_compiler.errors import CheckpointError, CorruptCheckpointError, RunLockedError
from cnds_compiler.train import rundir
from cnds_compiler.train.plots import plot_curves as draw_curves  # the real one: `quick` stubs it out
from cnds_compiler.train.rundir import LOCK_NAME, RunLock
from cnds_compiler.train.state import restore_training_state, saved_channels_last
from cnds_compiler.train.trainer import RunOptions, Trainer, effective_config

from .conftest import ROOT

GOLDEN = ROOT / "tests" / "golden" / "checkpoints"
SPEC = GOLDEN / "tiny_resume.cnds"  # 1x8x8 digits, two convs, one branch: a run of 3 epochs takes ~1 s
OLD_CHECKPOINT = GOLDEN / "tiny_resume_before_digest.pt"  # written by cnds-train before checkpoints had a digest
# 256 images, 8 steps an epoch: the main head's validation error falls every epoch (asserted in `reference`)
LIMITS = {"limit_train": 256, "limit_val": 128}


@pytest.fixture
def quick(monkeypatch):
    """One torch thread (no spinning on a shared 2-core machine) and no curves.png (matplotlib costs ~1 s a run
    and is not what these tests are about)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # also keeps the CLI from sampling the machine's load
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr("cnds_compiler.train.plots.plot_curves", lambda *a, **k: None)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    yield
    for sig, handler in handlers.items():  # train_main installs its own
        signal.signal(sig, handler)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def net():
    return compile_spec(SPEC)


def train(net, out: Path, epochs: int = 3, resume: bool = False, stop_after: int | None = None) -> list[dict]:
    """Train the tiny net; ``stop_after`` N epochs of an ``epochs``-epoch run (the schedules depend on ``epochs``)."""
    opts = RunOptions(data="digits", out_dir=out, cpu=True, progress=False, resume=resume,
                      max_steps=None if stop_after is None else 8 * stop_after, **LIMITS)
    return Trainer(net, effective_config(net, {"epochs": epochs}), opts).run()


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def same_weights(a: Path, b: Path) -> bool:
    x, y = weights(a), weights(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def log_rows(out: Path) -> list[tuple]:
    """metrics.jsonl without the timings (which differ between runs)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["epoch"], r["train_loss"], r["val_top1_error"], r["val_top5_error"]) for r in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, net):
    """An uninterrupted 3-epoch run: every repaired run must end exactly here."""
    out = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("cnds_compiler.train.plots.plot_curves", lambda *a, **k: None)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            history = train(net, out)
        finally:
            torch.set_num_threads(threads)
    errors = [m["val_top1_error"]["main"] for m in history]
    assert errors == sorted(errors, reverse=True) and len(set(errors)) == 3, errors  # every epoch is the best
    return out


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ---- family 2: the run lock -------------------------------------------------------------------------------


def test_a_live_lock_refuses_a_second_training_naming_the_holder(tmp_path, net, quick):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_NAME).write_text(f"{holder.pid} {socket.gethostname()}\n")
        with pytest.raises(RunLockedError, match=f"another cnds-train \\(pid {holder.pid}\\) is training"):
            train(net, tmp_path, epochs=1)
        assert (tmp_path / LOCK_NAME).read_text() == f"{holder.pid} {socket.gethostname()}\n"
        assert not (tmp_path / "network.ir.json").exists()  # refused before writing anything
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_from_another_host_is_not_taken_over(tmp_path, net, quick):
    (tmp_path / LOCK_NAME).write_text("4242 some-other-host\n")
    with pytest.raises(RunLockedError, match="pid 4242 on host some-other-host"):
        train(net, tmp_path, epochs=1)


def test_a_stale_lock_is_taken_over_with_a_note_and_released_after_the_run(tmp_path, net, quick, capsys):
    pid = dead_pid()
    (tmp_path / LOCK_NAME).write_text(f"{pid} {socket.gethostname()}\n")
    train(net, tmp_path, epochs=1)
    out = capsys.readouterr().out
    assert f"took over the stale run lock of process {pid}" in out and out.count("stale run lock") == 1
    assert not (tmp_path / LOCK_NAME).exists() and (tmp_path / "last.pt").exists()


def test_the_lock_is_released_when_a_run_fails(tmp_path, net, quick):
    opts = RunOptions(data=f"imagefolder:{tmp_path / 'nothing'}", out_dir=tmp_path / "run", cpu=True, progress=False)
    with pytest.raises(Exception) as failure:
        Trainer(net, effective_config(net, {"epochs": 1}), opts).run()
    assert "data error" in str(failure.value)
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_lock_is_exclusive_within_one_host(tmp_path):
    notes = []
    with RunLock(tmp_path, note=notes.append):
        pid, host, start = (tmp_path / LOCK_NAME).read_text().split()
        assert [pid, host] == [str(os.getpid()), socket.gethostname()] and start == rundir._start_time(os.getpid())
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_NAME).exists() and not notes
    (tmp_path / LOCK_NAME).write_text("")  # not a lock cnds writes (they appear whole): taken over
    with RunLock(tmp_path, note=notes.append):
        pass
    assert len(notes) == 1 and not list(tmp_path.iterdir())


def test_a_lock_whose_pid_now_belongs_to_a_later_process_is_stale(tmp_path):
    """A restarted container's training gets the same small pid as the killed one: the recorded start time
    tells the two apart, while the real holder (same pid, same start time) still refuses."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = rundir._start_time(holder.pid)
        assert start is not None and start.isdigit()
        lock = tmp_path / LOCK_NAME
        lock.write_text(f"{holder.pid} {socket.gethostname()} {start}\n")
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
            RunLock(tmp_path).acquire()
        assert lock.read_text() == f"{holder.pid} {socket.gethostname()} {start}\n"
        lock.write_text(f"{holder.pid} {socket.gethostname()} {int(start) - 1}\n")  # an earlier process's
        notes = []
        with RunLock(tmp_path, note=notes.append):
            assert lock.read_text().split()[0] == str(os.getpid())
        assert len(notes) == 1 and f"process {holder.pid}, which is no longer running (the pid now" in notes[0]
        assert not lock.exists()
        lock.write_text(f"{os.getpid()} {socket.gethostname()} -\n")  # start time unknown: the pid decides
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()


def test_metrics_csv_holds_every_finished_epoch_while_the_run_goes_on(tmp_path, net, quick):
    """A kill between epochs leaves a table of the finished epochs (read as each epoch's callback runs)."""
    seen = []

    def read_csv(metrics) -> None:
        with open(tmp_path / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        seen.append([(int(r["epoch"]), float(r["val_top1_error/main"])) for r in rows])

    opts = RunOptions(data="digits", out_dir=tmp_path, cpu=True, progress=False, callbacks=(read_csv,), **LIMITS)
    history = Trainer(net, effective_config(net, {"epochs": 3}), opts).run()
    table = [(m["epoch"], m["val_top1_error"]["main"]) for m in history]
    assert seen == [table[:1], table[:2], table[:3]]


def test_curves_are_redrawn_while_a_long_run_goes_on(tmp_path, net, quick, monkeypatch):
    """curves.png is redrawn after an epoch once ``curves_every`` seconds have passed (a long run shows its
    curves as it goes) and always at the end; a short run draws it once."""
    drawn, seen = [], []

    def record(history, out, title=""):
        drawn.append(len(history))
        draw_curves(history, out, title)

    monkeypatch.setattr("cnds_compiler.train.plots.plot_curves", record)
    for every, folder in ((0.0, tmp_path / "long"), (60.0, tmp_path / "short")):
        drawn.clear()
        seen.clear()
        opts = RunOptions(data="digits", out_dir=folder, cpu=True, progress=False, curves_every=every,
                          callbacks=(lambda m, f=folder: seen.append((f / "curves.png").exists()),), **LIMITS)
        Trainer(net, effective_config(net, {"epochs": 3}), opts).run()
        assert (folder / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if every == 0.0:
            assert drawn == [1, 2, 3] and seen == [True, True, True]  # the end does not draw the same curves again
        else:  # three epochs of a second each: only the end draws
            assert drawn == [3] and seen == [False, False, False]


# ---- family 2: a kill at any point of an epoch's writes, then --resume ------------------------------------


class SimulatedKill(BaseException):
    """Stands for SIGKILL: nothing after the point it is raised at runs, no handler catches it."""


def _kill_at(monkeypatch, target: str, epoch: int, how: str) -> None:
    """Stop the run at epoch ``epoch``'s write of ``target`` (``last.pt``, ``best.pt`` or ``metrics.jsonl``):
    ``before`` it starts, ``during`` it (a partial temp file or half a log line is left) or ``after`` it."""
    real_write, real_append = rundir.atomic_write_bytes, rundir.append_metrics
    counts: dict[str, int] = {}

    def write(path, data):
        path = Path(path)
        counts[path.name] = counts.get(path.name, 0) + 1
        if path.name == target and counts[path.name] == epoch:
            if how == "during":
                (path.parent / f".{path.name}.killed.tmp").write_bytes(data[: len(data) // 3])
            if how == "after":
                real_write(path, data)
            raise SimulatedKill
        real_write(path, data)

    def append(folder, record):
        if target == "metrics.jsonl" and record["epoch"] == epoch:
            if how == "during":
                with open(folder / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record)[:40])
            if how == "after":
                real_append(folder, record)
            raise SimulatedKill
        real_append(folder, record)

    monkeypatch.setattr(rundir, "atomic_write_bytes", write)
    monkeypatch.setattr("cnds_compiler.train.trainer.append_metrics", append)


KILL_POINTS = [(target, how) for target in ("last.pt", "best.pt", "metrics.jsonl")
               for how in ("before", "during", "after")]


@pytest.mark.parametrize("target, how", KILL_POINTS, ids=[f"{how}-{t}" for t, how in KILL_POINTS])
def test_a_kill_at_any_write_of_an_epoch_is_repaired_by_resume(tmp_path, net, quick, reference, target, how):
    with pytest.MonkeyPatch.context() as mp:
        _kill_at(mp, target, epoch=2, how=how)
        with pytest.raises(SimulatedKill):
            train(net, tmp_path)
    (tmp_path / LOCK_NAME).write_text(f"{dead_pid()} {socket.gethostname()}\n")  # a killed run leaves its lock
    train(net, tmp_path, resume=True)
    assert_like_reference(tmp_path, reference)


def assert_like_reference(out: Path, reference: Path) -> None:
    assert same_weights(out / "last.pt", reference / "last.pt"), "the resumed run differs from the uninterrupted one"
    assert same_weights(out / "best.pt", reference / "best.pt")
    assert load_checkpoint(out / "best.pt")["epoch"] == load_checkpoint(reference / "best.pt")["epoch"]
    assert log_rows(out) == log_rows(reference)
    assert not list(out.glob(".*.tmp")) and not (out / LOCK_NAME).exists()


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_weight_bit(path: Path) -> None:
    """Flip one bit inside the first tensor's stored bytes (zip entry ``*/data/0``), the damage torch.load
    does not notice."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
    data = bytearray(path.read_bytes())
    name_len, extra_len = int.from_bytes(data[info.header_offset + 26: info.header_offset + 28], "little"), \
        int.from_bytes(data[info.header_offset + 28: info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(data))


DAMAGE = {
    "last.pt-truncated": lambda out: _truncate(out / "last.pt"),
    "last.pt-bit-flipped": lambda out: _flip_a_weight_bit(out / "last.pt"),
    "last.pt-empty": lambda out: (out / "last.pt").write_bytes(b""),
    "last.pt-missing": lambda out: (out / "last.pt").unlink(),
    "best.pt-truncated": lambda out: _truncate(out / "best.pt"),
    "best.pt-missing": lambda out: (out / "best.pt").unlink(),
    "log-torn-and-short": lambda out: (out / "metrics.jsonl").write_text(
        (out / "metrics.jsonl").read_text()[:-30]),
    "log-rows-beyond-the-checkpoint": lambda out: (out / "metrics.jsonl").write_text(
        (out / "metrics.jsonl").read_text() + '{"epoch": 3, "val_top1_error": {"main": 0.0}}\n{"epoch": 4}\n'),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_run_folder_is_repaired_by_resume(tmp_path, net, quick, reference, damage, capsys):
    train(net, tmp_path, stop_after=2)
    DAMAGE[damage](tmp_path)
    capsys.readouterr()
    train(net, tmp_path, resume=True)
    notes = capsys.readouterr().out
    assert_like_reference(tmp_path, reference)
    if "truncated" in damage or "flipped" in damage or "empty" in damage:
        name = damage.split("-")[0]
        assert (tmp_path / f"{name}.corrupt").exists(), "a damaged checkpoint is kept aside, never deleted"
        assert f"{name} is damaged" in notes
    if damage == "last.pt-bit-flipped":
        assert "tensor digest mismatch" in notes


def test_resume_with_both_checkpoints_damaged_is_one_line_and_moves_nothing(tmp_path, net, quick):
    train(net, tmp_path, stop_after=1)
    _truncate(tmp_path / "last.pt")
    _flip_a_weight_bit(tmp_path / "best.pt")
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.pt")}
    with pytest.raises(CheckpointError, match="no intact checkpoint to resume from") as e:
        train(net, tmp_path, resume=True)
    assert "\n" not in str(e.value) and "tensor digest mismatch" in str(e.value)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.pt")} == before


def test_a_checkpoint_written_before_the_digest_still_loads_and_resumes(tmp_path, net, quick):
    old = torch.load(OLD_CHECKPOINT, weights_only=True)
    assert "digest" not in old and old["epoch"] == 1  # as cnds-train wrote it then
    assert load_checkpoint(OLD_CHECKPOINT, net, need="training")["epoch"] == 1
    shutil.copy(OLD_CHECKPOINT, tmp_path / "last.pt")
    history = train(net, tmp_path, epochs=2, resume=True)
    assert [m["epoch"] for m in history] == [1, 2]
    assert "digest" in torch.load(tmp_path / "last.pt", weights_only=True)  # new saves carry one


# ---- family 2: Ctrl-C at any moment -------------------------------------------------------------------------


def train_layout(net, out: Path, channels_last, epochs: int = 2, resume: bool = False) -> Trainer:
    opts = RunOptions(data="digits", out_dir=out, cpu=True, progress=False, resume=resume,
                      channels_last=channels_last, max_steps=None if resume else 8, **LIMITS)
    trainer = Trainer(net, effective_config(net, {"epochs": epochs}), opts)
    trainer.run()
    return trainer


@pytest.mark.parametrize("layout", [False, True], ids=["contiguous", "channels-last"])
def test_resume_keeps_the_layout_its_checkpoint_was_trained_in_and_ends_bit_identical(tmp_path, net, quick,
                                                                                       layout):
    whole = train_layout(net, tmp_path / "whole", layout)  # the first epoch (8 steps) of a 2-epoch run...
    train_layout(net, tmp_path / "whole", layout, resume=True)  # ...and the second: the uninterrupted reference
    first = train_layout(net, tmp_path / "cut", layout)
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["channels_last"] is layout is first.channels_last
    resumed = train_layout(net, tmp_path / "cut", None, resume=True)  # the layout not given: the checkpoint's
    assert resumed.channels_last is layout
    assert same_weights(tmp_path / "cut" / "last.pt", tmp_path / "whole" / "last.pt")
    assert whole.channels_last is layout


@pytest.mark.parametrize("layout", [False, True], ids=["to-channels-last", "to-contiguous"])
def test_resume_in_another_layout_says_so_and_continues_the_same_training(tmp_path, net, quick, capsys, layout):
    train_layout(net, tmp_path / "whole", layout)
    train_layout(net, tmp_path / "whole", layout, resume=True)
    train_layout(net, tmp_path / "cut", layout)
    first = weights(tmp_path / "cut" / "last.pt")
    capsys.readouterr()
    trainer = train_layout(net, tmp_path / "cut", not layout, resume=True)
    assert trainer.channels_last is not layout
    assert (f"note: resuming in {'contiguous (NCHW)' if layout else 'channels-last'} layout, the checkpoint was "
            f"trained in {'channels-last' if layout else 'contiguous (NCHW)'}") in capsys.readouterr().out
    # the momentum buffers follow their parameters into the new layout: the second epoch is the same training,
    # rounded differently (torch's fused CPU update would read a buffer in the other layout scrambled)
    whole, cut = weights(tmp_path / "whole" / "last.pt"), weights(tmp_path / "cut" / "last.pt")
    drift = {k: float((whole[k] - cut[k]).abs().max()) / float((whole[k] - first[k]).abs().max()) for k in whole}
    assert max(drift.values()) < 1e-4, drift  # measured 5.5e-7 of the movement (0.53 for c2 without the fix)


def test_a_checkpoint_without_a_recorded_layout_tells_it_by_its_weights():
    old = torch.load(OLD_CHECKPOINT, weights_only=True)  # a contiguous run, before layouts were recorded
    assert "channels_last" not in old and not saved_channels_last(old)
    as_nhwc = {**old, "model": {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v
                                for k, v in old["model"].items()}}
    assert saved_channels_last(as_nhwc)
    assert saved_channels_last({**old, "channels_last": True}) and not saved_channels_last({**as_nhwc, "channels_last": False})


def _interrupt_at(monkeypatch, where: str) -> None:
    """Raise KeyboardInterrupt (what Ctrl-C does) in epoch 2: in a training step, inside the fsync of
    last.pt's temp file (the real atomic write, with its clean-up), or while the log line is written."""
    if where == "training-step":
        from cnds_compiler.train import trainer

        real, calls = trainer.deep_supervision_loss, [0]

        def loss(*args, **kw):
            calls[0] += 1
            if calls[0] == 8 + 3:  # epoch 2, step 3
                raise KeyboardInterrupt
            return real(*args, **kw)

        monkeypatch.setattr(trainer, "deep_supervision_loss", loss)
    elif where == "writing-last.pt":
        from cnds_compiler import io as cnds_io

        real_fsync, calls = os.fsync, [0]

        def fsync(fd):
            if os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1].startswith(".last.pt."):  # its temp file
                calls[0] += 1
                if calls[0] == 2:  # epoch 2
                    raise KeyboardInterrupt
            real_fsync(fd)

        monkeypatch.setattr(cnds_io.os, "fsync", fsync)
    else:
        real_append = rundir.append_metrics

        def append(folder, record):
            if record["epoch"] == 2:
                raise KeyboardInterrupt
            real_append(folder, record)

        monkeypatch.setattr("cnds_compiler.train.trainer.append_metrics", append)


@pytest.mark.parametrize("where", ["training-step", "writing-last.pt", "writing-the-log"])
def test_ctrl_c_in_training_is_one_line_exit_130_and_resumable(tmp_path, quick, reference, capsys, where):
    from cnds_compiler.train.cli import train_main

    args = [str(SPEC), "--out", str(tmp_path), "--data", "digits", "--cpu", "--no-progress", "--epochs", "3",
            "--limit-train", "256", "--limit-val", "128"]
    with pytest.MonkeyPatch.context() as mp:
        _interrupt_at(mp, where)
        code = train_main(args)
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err
    assert err.strip().count("\n") == 0, err
    kept = "(epoch 2)" if where == "writing-the-log" else "(epoch 1)"
    assert "interrupted: at epoch 2 step" in err and f"last.pt {kept} is intact: resume with --resume" in err
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / LOCK_NAME).exists()
    assert train_main([*args, "--resume"]) == 0
    assert_like_reference(tmp_path, reference)


def _raise_interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def _cli_cases(tmp_path):
    """(prog, main, argv, what to interrupt): each command stopped in the library call it makes first."""
    from cnds_runtime.cli import extract_main, predict_main

    from cnds_compiler.cli import compile_main
    from cnds_compiler.importers.cli import import_main
    from cnds_compiler.probe.cli import gradplot_main, probe_main
    from cnds_compiler.train.cli import eval_main, train_main

    spec, model = str(SPEC), str(tmp_path / "m.onnx")
    return [
        ("cnds-compile", compile_main, [spec], "cnds_compiler.frontend.compile_spec"),
        ("cnds-train", train_main, [spec, "--out", str(tmp_path / "r"), "--cpu"], "cnds_compiler.frontend.compile_spec"),
        ("cnds-eval", eval_main, [spec, str(OLD_CHECKPOINT), "--cpu"], "cnds_compiler.frontend.compile_spec"),
        ("cnds-probe", probe_main, [spec, "--no-plot"], "cnds_compiler.frontend.compile_spec"),
        ("cnds-gradplot", gradplot_main, [str(tmp_path)], "cnds_compiler.probe.plots.load_gradient_log"),
        ("cnds-import", import_main, [str(tmp_path / "a.prototxt"), "-o", str(tmp_path / "a.cnds")],
         "cnds_compiler.importers.caffe.import_caffe"),
        ("cnds-extract", extract_main, [model, str(tmp_path)], "cnds_runtime.cli.CndsModel"),
        ("cnds-predict", predict_main, [model, str(tmp_path)], "cnds_runtime.cli.CndsModel"),
    ]


def test_ctrl_c_in_every_command_is_one_line_and_exit_130(tmp_path, quick, capsys, monkeypatch):
    from PIL import Image

    (tmp_path / "a.prototxt").write_text('name: "a"\n')
    Image.new("L", (8, 8)).save(tmp_path / "one.png")
    cases = _cli_cases(tmp_path)
    for prog, main, argv, target in cases:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(target, _raise_interrupt)
            code = main(argv)
        err = capsys.readouterr().err
        assert code == 130, (prog, err)
        assert err.strip().count("\n") == 0 and "Traceback" not in err and "interrupted" in err, (prog, err)
    assert len(cases) == 8


@pytest.mark.slow
def test_a_real_sigint_and_a_second_training_meanwhile(tmp_path, net, quick, capsys):
    """Real processes: a second cnds-train into a folder in use is refused naming the first's pid; SIGINT
    stops the first with one line and exit 130; --resume completes it like the uninterrupted run."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "runtime"), os.environ.get("PYTHONPATH", "")]))
    args = [sys.executable, "-m", "cnds_compiler.train.cli", str(SPEC), "--out", str(tmp_path), "--cpu",
            "--no-progress", "--epochs", "5000", "--limit-train", "256", "--limit-val", "128"]  # still running at the end
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (tmp_path / "metrics.jsonl").exists():
            time.sleep(0.05)
        from cnds_compiler.train.cli import train_main

        capsys.readouterr()
        assert train_main([*args[3:], "--resume"]) == 1  # a second cnds-train into the same folder
        second = capsys.readouterr().err
        assert f"(pid {first.pid})" in second and second.strip().count("\n") == 0, second
        assert first.poll() is None
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 130 and "Traceback" not in err, err
    assert err.strip().count("\n") == 0 and "interrupted: at epoch" in err and "resume with --resume" in err
    assert not (tmp_path / LOCK_NAME).exists()
    epoch = load_checkpoint(tmp_path / "last.pt", net, need="training")["epoch"]
    assert epoch >= 1 and f"last.pt (epoch {epoch}) is intact" in err
    history = train(net, tmp_path, epochs=5000, resume=True, stop_after=epoch + 1)  # one more epoch
    assert [m["epoch"] for m in history] == list(range(1, epoch + 2))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_and_a_closed_terminal_release_the_lock_and_leave_a_resumable_run(tmp_path, sig):
    """``kill`` (or a batch system's time limit) and SIGHUP (the terminal or ssh session closed) unwind like
    an error: exit 128 + the signal, no traceback, the lock released, last.pt whole."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "runtime"), os.environ.get("PYTHONPATH", "")]))
    args = [sys.executable, "-m", "cnds_compiler.train.cli", str(SPEC), "--out", str(tmp_path), "--cpu",
            "--no-progress", "--epochs", "5000", "--limit-train", "256", "--limit-val", "128"]
    run = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (tmp_path / "metrics.jsonl").exists():
            time.sleep(0.05)
        run.send_signal(sig)
        _, err = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 128 + sig and "Traceback" not in err, err
    assert not (tmp_path / LOCK_NAME).exists() and not list(tmp_path.glob(".*.tmp"))
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] >= 1


# ---- family 3: anything that is not a cnds checkpoint ---------------------------------------------------------


@pytest.fixture(scope="module")
def good(tmp_path_factory, net):
    """A real training checkpoint of the tiny net (from the golden one, re-saved with a digest)."""
    state = torch.load(OLD_CHECKPOINT, weights_only=True)
    path = tmp_path_factory.mktemp("good") / "good.pt"
    save_checkpoint(path, {k: v for k, v in state.items() if k not in ("format", "version")})
    return path


def _edit(good: Path, path: Path, change) -> None:
    """The good checkpoint changed by ``change``, with a digest that matches the change (as if written so)."""
    state = torch.load(good, weights_only=True)
    change(state)
    state.pop("digest")
    state["digest"] = content_digest(state)
    torch.save(state, path)


def _forbidden_pickle(path: Path) -> None:
    import pickle

    class Payload:  # never instantiated on load: weights_only refuses the global
        def __reduce__(self):
            return (os.system, ("echo pwned > pwned.txt",))

    path.write_bytes(pickle.dumps({"model": Payload()}, protocol=2))  # torch's protocol: refused for its global


def _zip_not_torch(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello")


# case -> (make the file from the good checkpoint, a fragment of the one line every command prints)
BAD_FILES = {
    "text-file": (lambda g, p: p.write_text("epoch 3\nweights: lots\n"), "not a torch checkpoint file (it is text"),
    "zip-not-torch": (lambda g, p: _zip_not_torch(p), "cannot read checkpoint"),
    "empty-file": (lambda g, p: p.write_bytes(b""), "checkpoint is empty"),
    "truncated": (lambda g, p: p.write_bytes(g.read_bytes()[:5000]), "cannot read checkpoint"),
    "folder": (lambda g, p: p.mkdir(), "is a folder, not a checkpoint file"),
    "forbidden-globals": (lambda g, p: _forbidden_pickle(p), "holds objects other than tensors"),
    "bit-flipped": (lambda g, p: (shutil.copy(g, p), _flip_a_weight_bit(p)), "tensor digest mismatch"),
    "a-list": (lambda g, p: torch.save([torch.zeros(2)], p), "holds a list, not a dict"),
    "missing-key": (lambda g, p: _edit(g, p, lambda s: s["model"].pop("c2.weight")), "missing c2.weight"),
    "extra-key": (lambda g, p: _edit(g, p, lambda s: s["model"].update({"c9.weight": torch.zeros(1)})),
                  "unexpected tensors c9.weight"),
    "wrong-shape": (lambda g, p: _edit(g, p, lambda s: s["model"].update({"fc.weight": torch.zeros(10, 7)})),
                    "shape mismatch at fc.weight"),
    "wrong-dtype": (lambda g, p: _edit(g, p, lambda s: s["model"].update(
        {"c1.weight": s["model"]["c1.weight"].to(torch.int32)})), "wrong dtype at c1.weight"),
    "non-finite": (lambda g, p: _edit(g, p, lambda s: s["model"]["c1.bias"].fill_(float("nan"))),
                   "non-finite values in c1.bias"),
    "model-not-a-dict": (lambda g, p: _edit(g, p, lambda s: s.update(model=[1, 2])), "'model' is a list"),
    "future-version": (lambda g, p: _edit(g, p, lambda s: s.update(version=7)), "version 7 is not supported"),
}
# what the file-level cases are to --init-from, which copies from any network's checkpoint whatever fits
FILE_LEVEL = ["text-file", "zip-not-torch", "empty-file", "truncated", "folder", "forbidden-globals",
              "bit-flipped", "a-list", "model-not-a-dict", "future-version"]


def _command(kind: str, tmp_path: Path, path: Path) -> tuple[int, str]:
    from cnds_compiler.cli import compile_main
    from cnds_compiler.train.cli import eval_main, train_main

    common = ["--cpu", "--no-progress", "--epochs", "2", "--limit-train", "64", "--limit-val", "32"]
    if kind == "resume":
        run = tmp_path / "run"
        run.mkdir()
        if path.is_dir():
            (run / "last.pt").mkdir()
        else:
            shutil.copy(path, run / "last.pt")
        return train_main([str(SPEC), "--out", str(run), "--resume", *common]), str(run / "last.pt")
    if kind == "init-from":
        return train_main([str(SPEC), "--out", str(tmp_path / "run"), "--init-from", str(path), *common]), str(path)
    if kind == "eval":
        return eval_main([str(SPEC), str(path), "--cpu", "--limit-val", "32"]), str(path)
    return compile_main([str(SPEC), "--emit", "onnx", "-o", str(tmp_path / "m.onnx"), "--weights", str(path)]), str(path)


COMMANDS = ["resume", "init-from", "eval", "export-weights"]
MATRIX = [(case, kind) for case in BAD_FILES for kind in COMMANDS if kind != "init-from" or case in FILE_LEVEL]


@pytest.mark.parametrize("case, kind", MATRIX, ids=[f"{c}-{k}" for c, k in MATRIX])
def test_a_file_that_is_not_a_usable_checkpoint_is_one_line_naming_it(tmp_path, good, quick, capsys, case, kind,
                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the forbidden pickle would write, had it run
    make, fragment = BAD_FILES[case]
    path = tmp_path / "bad.pt"
    make(good, path)
    before = path.read_bytes() if path.is_file() else None
    code, named = _command(kind, tmp_path, path)
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    assert err.strip().count("\n") == 0, err
    assert fragment in err and named in err, err
    assert (path.read_bytes() if path.is_file() else None) == before  # the file is left as it was
    assert not (tmp_path / "pwned.txt").exists() and not (tmp_path / "m.onnx").exists()
    if kind == "resume" and case != "folder":
        assert (tmp_path / "run" / "last.pt").exists()  # not moved aside when there is nothing to resume from


def test_init_from_leaves_the_layers_that_do_not_fit_and_says_why(tmp_path, good, quick, capsys):
    from cnds_compiler.backends.pytorch import build_module
    from cnds_compiler.train.state import init_from

    path = tmp_path / "mixed.pt"
    _edit(good, path, lambda s: s["model"].update({
        "fc.weight": torch.zeros(10, 7), "c1.weight": s["model"]["c1.weight"].to(torch.int32),
        "c2.bias": torch.full((8,), float("nan"))}))
    model = build_module(compile_spec(SPEC), seed=3)
    report = init_from(model, path)
    left = dict(report.left_layers)
    assert left["fc"] == "weight shape differs" and left["c1"] == "weight dtype differs"
    assert left["c2"] == "bias non-finite" and "aux.c1.l" in report.copied_layers
    assert torch.isfinite(model.c2.bias).all()


@pytest.mark.parametrize("case", ["bare-full", "bare-trunk-only"])
def test_a_bare_state_dict_serves_where_weights_are_enough(tmp_path, good, quick, capsys, case):
    from cnds_compiler.cli import compile_main
    from cnds_compiler.train.cli import eval_main, train_main

    state = torch.load(good, weights_only=True)["model"]
    if case == "bare-trunk-only":
        state = {k: v for k, v in state.items() if not k.startswith("aux.")}
    path = tmp_path / "bare.pt"
    torch.save(state, path)
    assert compile_main([str(SPEC), "--emit", "onnx", "-o", str(tmp_path / "m.onnx"), "--weights", str(path),
                         "-q"]) == 0
    evaluated = eval_main([str(SPEC), str(path), "--cpu", "--limit-val", "32"])
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(path, run / "last.pt")
    resumed = train_main([str(SPEC), "--out", str(run), "--resume", "--cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert resumed == 1 and "no training state to resume from" in err and "--init-from" in err
    if case == "bare-full":
        assert evaluated == 0
    else:  # every head is evaluated: a trunk-only state dict cannot be
        assert evaluated == 1 and "missing aux." in err and "trunk-only state dict" in err


def test_import_weights_refuse_what_is_not_a_state_dict_with_one_line(tmp_path, good):
    from cnds_compiler.importers.torchvision import load_state_dict

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(2, 3)

    ok = tmp_path / "ok.pth"
    torch.save(Two().state_dict(), ok)
    assert set(load_state_dict(ok, Two())) == {"a.weight", "a.bias"}
    cases = {"folder": "is a folder", "empty": "checkpoint is empty", "text": "not a torch checkpoint file \\(it is text",
             "dtype": "wrong dtype at ['a.weight']", "forbidden": "holds objects other than tensors"}
    (tmp_path / "folder").mkdir()
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "text").write_text("hello")
    torch.save({"a.weight": torch.zeros(3, 2, dtype=torch.int64), "a.bias": torch.zeros(3)}, tmp_path / "dtype")
    _forbidden_pickle(tmp_path / "forbidden")
    for name, fragment in cases.items():
        with pytest.raises(CheckpointError, match=fragment.replace("[", r"\[").replace("]", r"\]")) as e:
            load_state_dict(tmp_path / name, Two())
        assert str(tmp_path / name) in str(e.value) and "\n" not in str(e.value)


# ---- family 3: the content digest ---------------------------------------------------------------------------


def test_the_digest_covers_every_tensor_byte_and_every_field(good):
    state = torch.load(good, weights_only=True)
    digest = state["digest"]
    assert digest.startswith("sha256:") and content_digest(state) == digest
    flipped = copy.deepcopy(state)
    flipped["model"]["fc.weight"].view(-1).view(torch.int32)[5] ^= 1  # one bit of one weight
    assert content_digest(flipped) != digest
    for change in (lambda s: s.update(epoch=2), lambda s: s["metrics"][0].update(lr=0.5),
                   lambda s: s["model"].update({"fc.bias": s["model"]["fc.bias"].double()}),
                   lambda s: s["model"].update({"fc.weight": s["model"]["fc.weight"].reshape(5, -1)}),
                   lambda s: s["rng"].update(torch=s["rng"]["torch"][:-1])):
        other = copy.deepcopy(state)
        change(other)
        assert content_digest(other) != digest
    reordered = dict(reversed(list(state.items())))  # key order is not content
    assert content_digest(reordered) == digest


def test_digest_checked_on_every_load_and_a_stripped_one_is_an_old_checkpoint(tmp_path, good, net):
    bad = tmp_path / "bad.pt"
    shutil.copy(good, bad)
    _flip_a_weight_bit(bad)
    assert torch.load(bad, weights_only=True)["model"]  # torch alone reads the damaged file without complaint
    with pytest.raises(CorruptCheckpointError, match=r"bad.pt: checkpoint error: checkpoint is corrupt \(tensor "
                                                     r"digest mismatch\)$"):
        load_checkpoint(bad, net)
    state = torch.load(good, weights_only=True)
    del state["digest"]
    torch.save(state, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt", net, need="training")["epoch"] == 1


# ---- family 3: fuzzing the loader ------------------------------------------------------------------------------

FUZZ_SPEC = """
network fuzz
input 1x4x4
classes 3
c: conv2d(2, 3, pad=1) relu
fc: linear(classes)
"""
FUZZ_CASES = 1000


class Hang(Exception):
    pass


def _fuzz_base():
    """A complete training checkpoint of a 2-layer net (weights, SGD momentum, RNG states, metrics)."""
    from cnds_compiler import compile_text
    from cnds_compiler.backends.pytorch import build_module
    from cnds_compiler.serialize import dumps
    from cnds_compiler.train.optim import make_optimizer
    from cnds_compiler.train.state import rng_state

    fnet = compile_text(FUZZ_SPEC, "fuzz.cnds")
    model = build_module(fnet, seed=0)
    opt = make_optimizer(model, fnet.train)
    model(torch.rand(2, 1, 4, 4)).logits.sum().backward()
    opt.step()
    metrics = [{"epoch": 1, "val_top1_error": {"main": 0.5}, "lr": 0.01, "alphas": {}}]
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": None, "epoch": 1, "step": 1,
             "rng": rng_state(), "spec_name": fnet.name, "spec_text": dumps(fnet), "ir_hash": fnet.digest(),
             "metrics": metrics, "best_val_error": 0.5, "best_epoch": 1, "grad_log": []}
    return fnet, state, build_module(fnet, seed=1)


def _random_plain(rng: random.Random, depth: int = 0):
    """A random value of the types torch's weights_only loader admits."""
    kinds = ["int", "float", "str", "none", "bool", "tensor"] + (["list", "tuple", "dict"] if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.choice([0, -1, 1, 2**40, -(2**63), rng.randint(-5, 5)])
    if kind == "float":
        return rng.choice([0.0, -1.5, float("nan"), float("inf"), 1e308])
    if kind == "str":
        return rng.choice(["", "main", "cnds-checkpoint", "x" * 50, "\u00e9\u2603"])
    if kind == "none":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "tensor":
        dtype = rng.choice([torch.float32, torch.float64, torch.float16, torch.int64, torch.uint8, torch.bool])
        shape = tuple(rng.randint(0, 3) for _ in range(rng.randint(0, 3)))
        return torch.zeros(shape, dtype=dtype)
    items = [_random_plain(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if kind == "list":
        return items
    if kind == "tuple":
        return tuple(items)
    return {rng.choice(["model", "epoch", "c.weight", "state", "param_groups", 0, 1]): v for v in items}


def _tensor_paths(state) -> list[tuple]:
    paths = []

    def walk(value, path):
        if isinstance(value, torch.Tensor):
            paths.append(path)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, (*path, k))
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, (*path, i))

    walk(state, ())
    return paths


def _set(state, path, value):
    target = state
    for key in path[:-1]:
        target = target[key]
    if isinstance(target, tuple):
        raise TypeError("tuple")
    target[path[-1]] = value


def _mutate(rng: random.Random, base: bytes, state: dict, paths: list[tuple]) -> tuple[str, bytes]:
    """One mutated checkpoint file: (kind, bytes); ``paths`` lead to the tensors of ``state``."""
    kind = rng.choice(["bit-flips", "truncate", "insert", "zip-entry", "swap", "dtype", "shape", "random-field",
                       "drop-field", "random-pickle"])
    data = bytearray(base)
    if kind == "bit-flips":
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return kind, bytes(data)
    if kind == "truncate":
        return kind, bytes(data[: rng.randrange(len(data))])
    if kind == "insert":
        at = rng.randrange(len(data))
        return kind, bytes(data[:at] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))) + data[at:])
    if kind == "zip-entry":  # damage one entry's local header, data or the central directory
        with zipfile.ZipFile(io.BytesIO(base)) as z:
            info = rng.choice(z.infolist())
        start = rng.choice([info.header_offset, info.header_offset + 30, len(base) - 100])
        for i in range(rng.randint(1, 16)):
            if 0 <= start + i < len(data):
                data[start + i] = rng.randrange(256)
        return kind, bytes(data)
    edited = copy.deepcopy(state)
    try:
        if kind == "swap":
            a, b = rng.sample(paths, 2)
            va, vb = _get(edited, a), _get(edited, b)
            _set(edited, a, vb)
            _set(edited, b, va)
        elif kind == "dtype":
            path = rng.choice(paths)
            _set(edited, path, _get(edited, path).to(rng.choice([torch.float64, torch.float16, torch.int32,
                                                                  torch.int64, torch.uint8, torch.bool])))
        elif kind == "shape":
            path = rng.choice(paths)
            t = _get(edited, path)
            _set(edited, path, t.reshape(-1)[: max(0, t.numel() - 1)] if rng.random() < 0.5 else t.reshape(-1))
        elif kind == "random-field":
            field = rng.choice(sorted(edited) + ["model", "optimizer", "rng"])
            target = edited[field] if isinstance(edited.get(field), dict) and rng.random() < 0.5 else edited
            key = rng.choice(sorted(target, key=str)) if target else field
            target[key] = _random_plain(rng)
        elif kind == "drop-field":
            target = rng.choice([edited, edited["model"], edited["optimizer"], edited["rng"]])
            target.pop(rng.choice(sorted(target, key=str)))
        else:  # a pickle of allowed types that is not a checkpoint at all
            edited = _random_plain(rng)
    except TypeError:  # a tensor inside a tuple cannot be replaced in place: leave this one unchanged
        pass
    buffer = io.BytesIO()
    if isinstance(edited, dict) and rng.random() < 0.7:  # mostly with a valid digest, to reach the later checks
        edited.pop("digest", None)
        edited["digest"] = content_digest(edited)
    torch.save(edited, buffer)
    return kind, buffer.getvalue()


def _get(state, path):
    for key in path:
        state = state[key]
    return state


def test_fuzzed_checkpoints_raise_only_checkpoint_errors_never_hang_and_overwrite_nothing(tmp_path):
    from cnds_compiler.train.optim import make_optimizer

    fnet, state, model = _fuzz_base()
    optimizer = make_optimizer(model, fnet.train)
    base = checkpoint_bytes(state)
    original = torch.load(io.BytesIO(base), weights_only=True)  # as written: format, version, digest
    digest = original["digest"]
    paths = _tensor_paths(original)
    rng = random.Random(20261203)
    saved_rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    outcomes: dict[str, dict[str, int]] = {}
    escaped, silently_wrong = [], []

    def alarm(signum, frame):
        raise Hang

    previous = signal.signal(signal.SIGALRM, alarm)
    folder = tmp_path / "fuzz"
    folder.mkdir()
    sentinel = folder / "keep.txt"
    sentinel.write_text("untouched")
    try:
        for i in range(FUZZ_CASES):
            kind, data = _mutate(rng, base, original, paths)
            path = folder / "case.pt"
            path.write_bytes(data)
            signal.setitimer(signal.ITIMER_REAL, 20.0)  # a hang detector, far above the ~5 ms a case takes
            try:
                # what --resume does, then what --weights / cnds-eval do with the same file
                ckpt = load_checkpoint(path, fnet, need="training")
                restore_training_state(model, optimizer, ckpt, path)
                load_checkpoint(path, fnet, need="weights")
                result = "loaded"
                if kind in ("bit-flips", "truncate", "insert", "zip-entry") and ckpt.get("digest") != digest:
                    silently_wrong.append((i, kind))
            except CheckpointError as e:
                result = "refused"
                assert "\n" not in str(e) and str(path) in str(e)
            except Hang:
                escaped.append((i, kind, "hang"))
                result = "hang"
            except Exception as e:  # noqa: BLE001 - the point of the test: nothing else may escape
                escaped.append((i, kind, f"{type(e).__name__}: {str(e)[:200]}"))
                result = "escaped"
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            assert path.read_bytes() == data, f"case {i} ({kind}) changed the file it read"
            outcomes.setdefault(kind, {}).setdefault(result, 0)
            outcomes[kind][result] += 1
    finally:
        signal.signal(signal.SIGALRM, previous)
        random.setstate(saved_rng[0])
        np.random.set_state(saved_rng[1])
        torch.set_rng_state(saved_rng[2])
    assert not escaped, f"{len(escaped)} cases escaped: {escaped[:5]}"
    assert not silently_wrong, f"damaged files loaded as if intact: {silently_wrong[:5]}"
    assert sorted(p.name for p in folder.iterdir()) == ["case.pt", "keep.txt"] and sentinel.read_text() == "untouched"
    total = sum(sum(r.values()) for r in outcomes.values())
    assert total == FUZZ_CASES >= 1000 and len(outcomes) == 10
    assert all(r.get("refused", 0) for r in outcomes.values()), outcomes  # every kind of damage is caught
    print("fuzz outcomes:", json.dumps(outcomes, sort_keys=True))
