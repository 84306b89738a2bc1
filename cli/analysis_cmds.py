"""Analysis commands (routing diff, report): registered on the main `moetrace` group."""
