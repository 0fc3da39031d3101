"""``python -m bench``: run the whole suite (see ``bench.suite``); ``python -m bench --soak
…``: the soak benchmark (see ``bench.soak``)."""

import sys

if "--soak" in sys.argv[1:]:
    from bench.soak import main as soak

    soak([a for a in sys.argv[1:] if a != "--soak"])
else:
    from bench.suite import main

    main()
