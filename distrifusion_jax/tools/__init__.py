"""Measurement, reporting and test/demo support, apart from the runtime: nothing in the runtime imports this."""
