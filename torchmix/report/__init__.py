"""What a person reads: the call line, HTML rendering, the interface results share."""
