"""``python -m thinktalk ...`` is ``thinktalk ...`` (so ``torchrun -m thinktalk train ...`` works)."""

from thinktalk.cli import main

raise SystemExit(main())
