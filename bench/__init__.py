"""lens-server's benchmark suite: ``python -m bench`` (or ``make bench``).

It starts a real service (``app.stack.Stack``: Redis, one worker, the API) on a
random Llama built here, measures what a user of a shared server cares about, prints
a table and writes it with the machine it ran on to ``bench/results.md``. The same
command runs unchanged on a GPU machine (the worker then loads the model in bf16 on
CUDA, and the table adds CUDA memory).
"""
