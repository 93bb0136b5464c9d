"""``python -m thinktalk ...`` works like the ``thinktalk`` command (so ``torchrun -m thinktalk train ...`` does)."""

from thinktalk.cli import main

raise SystemExit(main())
