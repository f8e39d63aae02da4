import os
import sys

# The repository root holds the `methods` and `protocols` packages beside `harness`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness.cli import main  # noqa: E402

try:
    sys.exit(main())
except BrokenPipeError:
    # Output piped into a reader that stopped early (`... list | head`): no traceback.
    # Python's documented recipe: point stdout at devnull so the exit flush cannot fail again.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(1)
