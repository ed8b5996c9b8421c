"""The Python faces of the compiled kernels (converter._kernels): numpy, torch, CUDA, custom ops."""

#: The most threads one CPU kernel launch runs: the C++ pool's ``kMaxThreads`` (csrc/thread_pool.cpp), which
#: caps a larger count without a word; so the entry points (``threads_arg``, ``convert(threads=)``,
#: ``--threads``, a batch plan's ``threads``) refuse one, naming this limit, and the default (one thread
#: per CPU of the affinity mask) is this many at most.
MAX_THREADS = 256


def threads_beyond_limit(threads: int) -> str:
    """Why ``threads`` above MAX_THREADS is refused: '300 threads: the kernels run at most 256 ...'."""
    return (
        f"{threads} threads: the kernels run at most {MAX_THREADS} threads (the limit of their thread "
        f"pool); give 1 to {MAX_THREADS}"
    )
