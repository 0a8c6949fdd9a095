"""Runtime: model sources, backends, the denoise loop, clips, CLI, server."""
