"""Testing helpers that ship with tinydiff: the strict CuPy stand-in."""
