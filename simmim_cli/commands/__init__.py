"""What each command does around the engine: check inputs, resolve paths, build, launch, report."""
