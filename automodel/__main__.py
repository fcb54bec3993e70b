"""`python -m automodel`, which is what `torchrun -m automodel` runs on every rank."""

from automodel.cli import main

main()
