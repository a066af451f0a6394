"""Plan + store -> frames: compact encoding, the read-ahead pipeline, framing."""
