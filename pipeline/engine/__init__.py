"""The Luigi engine: configuration, parameter checks, the stage task base, the run log, scheduling, sharding, clean
stops, build()."""
