"""Where to supervise: the paper's gradient rule (``cnds-probe``) and gradient figures (``cnds-gradplot``).

* :mod:`.rule` — the rule as a pure function of per-layer gradient levels (no torch);
* :mod:`.run` — the probe itself: a few back-prop iterations of the trunk (torch);
* :mod:`.rewrite` — a spec with the proposed ``supervise`` blocks, edited at span offsets (no torch);
* :mod:`.plots` — Figure 2(a)-style probe plots and Figure 2(b–d)-style run comparisons.
"""

from .rule import DEFAULT_MIN_GAP, DEFAULT_THRESHOLD, Point, Proposal, final_level, propose

__all__ = [
    "DEFAULT_MIN_GAP", "DEFAULT_THRESHOLD", "Point", "Proposal", "final_level", "propose",
    "ProbeSettings", "ProbeResult", "run_probe", "edit_spec_text", "write_supervised_spec", "branch_template",
]


def __getattr__(name: str):
    # torch-free import of the package: the probe's runner loads on first use
    if name in ("ProbeSettings", "ProbeResult", "run_probe"):
        from . import run

        return getattr(run, name)
    if name in ("edit_spec_text", "write_supervised_spec", "branch_template"):
        from . import rewrite

        return getattr(rewrite, name)
    raise AttributeError(name)
