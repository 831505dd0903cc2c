"""Training: the one loop, schedules and losses."""
