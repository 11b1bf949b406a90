"""The ``cbt`` command line: one thin module per command, all work in the library."""
