"""How a run stops: the exceptions bori raises, and the one line and exit code each ends in.

Every failure a user can cause is a ValueError, OSError (FileNotFoundError) or RankError
whose message names the problem and the fix; main() prints it as `error: ...` with exit code 2.
"""
import sys
from contextlib import contextmanager

import torch
import torch.distributed as dist

EXIT_ERROR, EXIT_OOM = 2, 3
EXIT_INTERRUPTED = 143  # 128 + SIGTERM, what schedulers and notebooks expect


class TrainingStopped(Exception):
    """A clean stop (signal, time or step limit), after a checkpoint where one was due."""


class TrainingDiverged(Exception):
    """Loss, gradients or weights stayed or ended non-finite."""


class RankError(ValueError):
    """What one rank alone met (its share of a corpus, a file only it writes): under torchrun
    that rank says it, whichever rank it is, and the others stop quietly."""


class CorpusError(RankError):
    """A corpus file that cannot be read as text: its sentence names the file."""


class PeerStopped(Exception):
    """Another rank stopped the run with an error and says why; this one stops quietly."""


def warn(message: str):
    """A line a user should read, that does not stop the run."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


@contextmanager
def about(flag: str):
    """Within the block, a ValueError or OSError (FileNotFoundError, CorpusError...) keeps its
    type and sentence and gains the option it is about: `--data_new: ...`."""
    try:
        yield
    except (ValueError, OSError) as e:
        raise type(e)(f"--{flag}: {e}") from None


OOM_FIX = ("out of GPU memory; lower micro_batch (batch_tokens stays, gradient accumulation "
           "grows) or set grad_checkpointing=true")


def exit_code(e: BaseException, rank: int) -> int:
    """Print e's sentence and return the exit code; re-raise what is not a user's error (a bug:
    its traceback is wanted). Rank 0 speaks for what every rank meets alike; another rank
    speaks only for what it alone met (its corpus, its lost peers)."""
    if rank and isinstance(e, (ValueError, OSError, TrainingDiverged, PeerStopped,
                               torch.cuda.OutOfMemoryError)) and not isinstance(e, RankError):
        return EXIT_ERROR
    if rank and isinstance(e, (TrainingStopped, KeyboardInterrupt)):
        return EXIT_INTERRUPTED
    if isinstance(e, TrainingStopped):
        if rank == 0:
            print(f"interrupted: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if isinstance(e, KeyboardInterrupt):
        print("interrupted at once by a second Ctrl-C; the last checkpoint stands: run the same "
              "command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    if isinstance(e, PeerStopped):
        return EXIT_ERROR
    if isinstance(e, torch.cuda.OutOfMemoryError):
        print(f"error: {OOM_FIX}", file=sys.stderr)
        return EXIT_OOM
    # a collective failed: another rank died first (gloo says so as a plain RuntimeError)
    if isinstance(e, dist.DistError) or isinstance(e, RuntimeError) and (
            "Connection closed by peer" in str(e) or "Connection reset by peer" in str(e)):
        print(f"error: rank {rank} lost the other processes ({str(e).splitlines()[0][:120]}); "
              "the first failing rank's message says why", file=sys.stderr)
        return EXIT_ERROR
    if isinstance(e, (ValueError, OSError, TrainingDiverged)):
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    raise e
