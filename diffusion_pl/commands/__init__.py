"""Commands beyond Lightning's fit/validate/test: each module exposes one typed function, parsed by jsonargparse."""
