"""``python -m mvtcae.cli ...``: the same as ``mvtcae ...`` (no console script needed)."""

from mvtcae.cli import main

main(prog_name="mvtcae")
