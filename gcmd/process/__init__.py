"""The process: start-up, signals, reload and stop (run), and --workers."""
