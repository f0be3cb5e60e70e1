"""The README's Python API example runs as written, and the output type is convenient in eval."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from cnds_compiler import compile_spec
from cnds_compiler.backends.pytorch import CndsOutput, build_module
from cnds_compiler.cli import compile_main

from .conftest import ROOT, SPECS


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "specs").symlink_to(SPECS)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    assert (tmp_path / "runs" / "api" / "model.onnx").exists()
    assert len(namespace["seen"]) == 2 and set(namespace["seen"][0]) == {"main", "loss1", "loss2"}
    assert set(namespace["out"].aux) == {"loss1", "loss2"}
    assert namespace["report"].parity.ok
    assert set(namespace["top1"]) == {"main", "loss1", "loss2"} and 0 <= namespace["top1"]["main"] <= 1


def test_output_stands_for_the_main_logits():
    model = build_module(compile_spec(SPECS / "digits_cnds8.cnds"), seed=0).eval()
    with torch.no_grad():
        out = model(torch.randn(3, 1, 8, 8))
    assert isinstance(out, CndsOutput) and out.aux == {}
    assert torch.equal(out.argmax(1), out.logits.argmax(1)) and out.shape == (3, 10)
    assert torch.equal(torch.softmax(out, 1), torch.softmax(out.logits, 1))
    y = torch.tensor([1, 2, 3])
    assert torch.equal(F.cross_entropy(out, y), F.cross_entropy(out.logits, y))
    assert torch.equal(torch.cat([out, out.logits]), torch.cat([out.logits, out.logits]))


def test_compile_spec_reads_ir_json(tmp_path):
    ir = tmp_path / "net.json"
    assert compile_main([str(SPECS / "digits_inception.cnds"), "--emit", "ir", "-o", str(ir), "-q"]) == 0
    assert compile_spec(ir) == compile_spec(SPECS / "digits_inception.cnds")


def test_eval_json_and_per_class(tmp_path, capsys):
    import json

    from cnds_compiler.checkpoint import save_checkpoint
    from cnds_compiler.train.cli import eval_main

    net = compile_spec(SPECS / "digits_inception.cnds")
    save_checkpoint(tmp_path / "c.pt", {"model": build_module(net, seed=0).state_dict(), "ir_hash": net.digest()})
    args = [str(SPECS / "digits_inception.cnds"), str(tmp_path / "c.pt"), "--cpu", "--data", "digits"]
    assert eval_main([*args, "--json", "--per-class"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc["heads"]) == {"main", "loss1", "loss2"} and doc["examples"] == 359
    per_class = doc["per_class"]
    assert [c["class"] for c in per_class] == [str(i) for i in range(10)]
    assert sum(c["examples"] for c in per_class) == 359
    mistakes = sum(round(c["top1_error"] * c["examples"]) for c in per_class)
    assert mistakes == round(doc["heads"]["main"]["top1_error"] * 359)  # the per-class split of the same count
    assert eval_main([*args, "--per-class"]) == 0
    text = capsys.readouterr().out
    assert "class (main head)" in text and len(text.strip().splitlines()) == 1 + 4 + 2 + 10


def test_thread_choice(monkeypatch, capsys):
    import os

    from cnds_compiler import threads

    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(threads, "busy_cores", lambda seconds=0.1: 0.1)
    env: dict = {}
    assert "spinning" in threads.configure_threads(env) and env == {}  # quiet: torch's defaults
    monkeypatch.setattr(threads, "busy_cores", lambda seconds=0.1: cores - 1.0)
    env = {}
    threads.configure_threads(env)
    assert env == {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}  # busy: the free core, sleeping waits
    env = {"OMP_NUM_THREADS": "4"}
    threads.configure_threads(env)
    assert env == {"OMP_NUM_THREADS": "4"}  # the user's choice stands
    env = {"CNDS_THREADS": "3"}
    threads.configure_threads(env)
    assert env["OMP_NUM_THREADS"] == "3"
    for bad in ("abc", "0", "-3", "2.5"):  # said in one line, and the machine's cores used
        env = {"CNDS_THREADS": bad}
        threads.configure_threads(env)
        assert env["OMP_NUM_THREADS"] == str(cores)
        assert capsys.readouterr().err == (f"note: CNDS_THREADS={bad!r} is not 'auto', 'torch' or a number of "
                                           f"threads (1 or more); using {cores}, this machine's cores\n")
    env = {}
    threads.configure_threads(env, processes=cores + 1)  # busy, and more processes than free cores: 1 each
    assert env == {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    monkeypatch.setattr(threads, "busy_cores", lambda seconds=0.1: 0.1)
    env = {}
    assert "per process, spinning" in threads.configure_threads(env, processes=2)
    assert env == {"OMP_NUM_THREADS": str(max(1, cores // 2))}  # quiet: the cores shared out
    assert threads.busy_cores(0.01) is not None  # /proc/stat is readable here


def test_allocator_choice(capsys):
    from cnds_compiler import threads

    calls = []

    def mallopt(param, value):
        calls.append((param, value))
        return 1

    assert threads.configure_allocator({}, mallopt) == "memory: freed blocks kept for reuse"
    assert calls == [(threads.M_MMAP_MAX, 0), (threads.M_TRIM_THRESHOLD, 2**31 - 1)]
    calls.clear()
    for env in ({"CNDS_ALLOCATOR": "system"}, {"MALLOC_TRIM_THRESHOLD_": "0"},
                {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"}):
        assert "reuse" not in threads.configure_allocator(dict(env), mallopt) and not calls, env  # the user's choice
    assert "refused" in threads.configure_allocator({}, lambda param, value: 0)
    assert threads.configure_allocator({"CNDS_ALLOCATOR": "bogus"}, mallopt) == "memory: freed blocks kept for reuse"
    assert capsys.readouterr().err == ("note: CNDS_ALLOCATOR='bogus' is not 'reuse' or 'system'; keeping freed "
                                       "memory for reuse\n")


REUSE_PROBE = """
import resource
from cnds_compiler.threads import configure_allocator
print(configure_allocator())
import torch
import torch.nn.functional as F
from cnds_compiler import compile_text
from cnds_compiler.backends.pytorch import build_module
from cnds_compiler.train.optim import make_optimizer
torch.set_num_threads(1)
# fc1's weight gradient is 64 MiB, above the largest block glibc ever serves from its heap by default (32 MiB)
net = compile_text("network wide_fc\\ninput 1x64x64\\nclasses 10\\nfc1: linear(4096) relu\\nfc2: linear(classes)\\n"
                   "train { optimizer sgd  lr 0.01  momentum 0.9 }\\n", "wide_fc.cnds")
model = build_module(net, seed=0).train()
opt = make_optimizer(model, net.train, None)
x, y = torch.randn(16, 1, 64, 64), torch.randint(0, 10, (16,))
faults = []
for step in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    F.cross_entropy(model(x).logits, y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""


@pytest.mark.skipif(not __import__("platform").libc_ver()[0] == "glibc", reason="the reuse setting is glibc's mallopt")
def test_training_steps_reuse_memory_instead_of_faulting_it_in_again():
    """Real page faults of real training steps of a net whose weight gradient (64 MiB, like the 227² nets'
    fc6/fc7 and branch fc1 gradients) is above the 32 MiB up to which glibc's own heuristics may serve a
    block from its heap: with the system's defaults every step faults it in again (16,384 pages of 4 KiB);
    with cnds' setting the steps after the first three reuse it. (Fashion-MNIST's 6 MiB blocks were
    flaky evidence: glibc's adaptive threshold sometimes reaches the same steady state by itself.)"""
    import os
    import subprocess
    import sys

    def faults(allocator: str) -> tuple[str, list[int]]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | {"CNDS_ALLOCATOR": allocator}
        said, counts = subprocess.run([sys.executable, "-c", REUSE_PROBE], capture_output=True, text=True, env=env,
                                      check=True, cwd=ROOT).stdout.strip().splitlines()[-2:]
        return said, [int(n) for n in counts.split()]

    said, system = faults("system")
    assert "system" in said and min(system[3:]) >= 16_384, system  # the 64 MiB gradient, page by page
    said, reuse = faults("reuse")
    assert said == "memory: freed blocks kept for reuse"
    assert max(reuse[3:]) < min(system[3:]) / 10, (reuse, system)


def test_train_help_lists_every_environment_variable_cnds_reads(capsys):
    """Every ``CNDS_*`` name in the compiler's and the runtime's source is explained by ``cnds-train --help``
    (and the ones cnds-eval reads by its help): a variable added later cannot be left out."""
    from cnds_compiler.train.cli import eval_main, train_main

    names = set()
    for folder in (ROOT / "cnds_compiler", ROOT / "runtime" / "cnds_runtime"):
        for path in folder.rglob("*.py"):
            names |= set(re.findall(r"\"(CNDS_[A-Z_]+)\"", path.read_text(encoding="utf-8")))
    assert {"CNDS_THREADS", "CNDS_ALLOCATOR", "CNDS_MAX_IMAGE_PIXELS", "CNDS_MEMORY_BUDGET_GIB"} <= names
    for main, expected in ((train_main, names), (eval_main, names - {"CNDS_MEMORY_BUDGET_GIB"})):
        with pytest.raises(SystemExit):
            main(["--help"])
        text = capsys.readouterr().out
        assert all(f"{name}=" in text for name in expected), (main.__name__, expected)


def test_grammar_cache_is_rebuilt_when_the_grammar_changes(tmp_path):
    from lark import Lark

    cache = str(tmp_path / "g.lark-cache")
    grammar = tmp_path / "g.lark"
    grammar.write_text('start: "a"+\n')
    assert Lark.open(str(grammar), parser="lalr", cache=cache).parse("aa")  # builds and stores the tables
    grammar.write_text('start: "b"+\n')  # same cache file, another grammar: lark's hash check rebuilds
    assert Lark.open(str(grammar), parser="lalr", cache=cache).parse("bb")
