"""Corpus half, part 1: read the raw formats, convert them to the normalized corpus, split it into passages."""
