import os
import sys

# The repository root holds the `methods` and `protocols` packages beside `harness`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness.cli import main  # noqa: E402

sys.exit(main())
