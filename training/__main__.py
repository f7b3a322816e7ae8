"""``python -m training``: captioning, dataset intake and LoRA training (see README)."""

from training.cli import main

raise SystemExit(main())
