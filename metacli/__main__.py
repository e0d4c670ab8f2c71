"""``python -m metacli``, the same as the ``metacli`` command; what ``torchrun ... -m metacli train ...`` starts."""
from metacli.cli import main

main()
