"""``python -m bench``: run the whole suite (see ``bench.suite``)."""

from bench.suite import main

main()
