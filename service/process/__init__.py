"""Process-level helpers: forking API workers, tuning the garbage collector for serving, and
the all-in-one local stack of `make run`."""
