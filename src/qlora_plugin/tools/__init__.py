"""Library functions behind the ``qlora`` command: inspect, estimate, merge, check, convert (plain arguments)."""
