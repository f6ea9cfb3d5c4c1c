"""Stages: one module per subcommand, directory in -> directory out."""
