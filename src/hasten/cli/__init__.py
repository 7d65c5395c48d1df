"""hasten's command line: a thin Typer shell over the library."""
