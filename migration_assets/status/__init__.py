"""What an operator asks during a long migration, per pipeline: progress, rate, ETA, failures, stuck work."""
