"""What ``cnds-train --processes N`` runs: torchrun's launcher without its own noise.

Each worker reports its own error in one line (the run lock, a bad spec, a diverged loss); torchrun would
then add its log lines and a ``ChildFailedError`` traceback naming nobody's mistake. Here the launcher
logs nothing and exits with the first failed worker's exit code.

    python -m cnds_compiler.train.launch --nproc_per_node N --master_port P -m cnds_compiler.train.cli ...
"""

from __future__ import annotations

import logging
import sys

from ..errors import Interrupted


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    logging.disable(logging.ERROR)  # this process only: the workers' own output is untouched
    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 1  # < 0: killed by a signal
    except KeyboardInterrupt:
        return Interrupted.exit_code  # the main worker says where the run stopped
    except SignalException as e:  # SIGTERM/SIGINT to the launcher: torchrun has stopped the workers
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
