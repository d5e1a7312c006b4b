"""compare-all harness (see compare/METHODOLOGY.md)."""
