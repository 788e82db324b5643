"""Encoded weight blobs: exact codecs, the container file, and writing/restoring them."""
