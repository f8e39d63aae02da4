import os
import sys

# The repository root holds the `methods` and `protocols` packages beside `harness`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

try:
    from harness import interrupts  # first: a Ctrl-C during the imports below is handled too

    interrupts.install()
    from harness.cli import main

    sys.exit(main())
except KeyboardInterrupt:
    print("interrupted: every finished task is checkpointed; the same command resumes", file=sys.stderr)
    sys.exit(130)
except BrokenPipeError:
    # Output piped into a reader that stopped early (`... list | head`): no traceback.
    # Python's documented recipe: point stdout at devnull so the exit flush cannot fail again.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(1)
