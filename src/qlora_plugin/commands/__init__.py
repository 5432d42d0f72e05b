"""The ``qlora`` command: argparse and one module per subcommand (the only place that knows argparse)."""
